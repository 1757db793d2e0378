//! Model-based test of a snapshot: random reads, writes, TRIMs, WRITE_ZEROES,
//! flushes and reopenings against an in-memory reference. Every read must
//! equal the reference.
#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)]

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use proptest::prelude::*;
use virtman_cache::{CacheError, CacheGroup, GroupConfig, Snapshot, Upstream};

const CHUNK: u32 = 16384;
/// Not a multiple of 4 KiB: the last block is short.
const SIZE: usize = 5 * CHUNK as usize + 1536;

#[derive(Clone, Debug)]
enum Op {
    Read(u64, u32),
    Write(u64, u32, u8),
    Trim(u64, u32),
    WriteZeroes(u64, u32),
    Flush,
    Reopen,
    PastEnd(u64, u32),
}

fn range() -> impl Strategy<Value = (u64, u32)> {
    // Mostly small unaligned ranges, some block-aligned, some large.
    prop_oneof![
        (0..SIZE as u64, 1..9000u32),
        (0..(SIZE as u64 / 4096), 1..6u32).prop_map(|(b, n)| (b * 4096, n * 4096)),
        (0..SIZE as u64, 1..SIZE as u32),
    ]
    .prop_map(|(o, l)| (o, l.min((SIZE as u64 - o) as u32).max(1)))
    .prop_filter("inside", |(o, l)| o + u64::from(*l) <= SIZE as u64)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => range().prop_map(|(o, l)| Op::Read(o, l)),
        4 => (range(), any::<u8>()).prop_map(|((o, l), b)| Op::Write(o, l, b)),
        1 => range().prop_map(|(o, l)| Op::Trim(o, l)),
        1 => range().prop_map(|(o, l)| Op::WriteZeroes(o, l)),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        1 => (0..10u64, 1..100u32).prop_map(|(o, l)| Op::PastEnd(SIZE as u64 - o, l + 10)),
    ]
}

fn fill(off: u64, len: u32, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed ^ ((off + u64::from(i)) as u8).wrapping_mul(31))
        .collect()
}

struct World {
    dir: tempfile::TempDir,
    image: Vec<u8>,
    group: Option<CacheGroup>,
    snap: Option<Arc<Snapshot>>,
}

impl World {
    fn open(&mut self) {
        let g = CacheGroup::open(self.dir.path(), GroupConfig::with_capacity(1 << 30)).unwrap();
        let v = g.volume("img").unwrap();
        v.set_upstream(Some(
            MemUpstream::new(self.image.clone()) as Arc<dyn Upstream>
        ));
        self.snap = Some(g.snapshot("vm").unwrap());
        self.group = Some(g);
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let image = image_bytes(7, SIZE, CHUNK as usize);
        let mut w = World {
            dir: tempfile::tempdir().unwrap(),
            image: image.clone(),
            group: None,
            snap: None,
        };
        {
            let g = CacheGroup::open(w.dir.path(), GroupConfig::with_capacity(1 << 30)).unwrap();
            let m = virtman_image::Manifest::of_bytes(&image, CHUNK).unwrap();
            g.add_volume("img", &m).unwrap();
            g.create_snapshot("vm", "img").unwrap();
        }
        w.open();
        let mut model = image.clone();
        for op in ops {
            let s = w.snap.clone().unwrap();
            match op {
                Op::Read(o, l) => {
                    let got = s.read_bytes(o, l).await.unwrap();
                    prop_assert_eq!(
                        &got[..],
                        &model[o as usize..(o + u64::from(l)) as usize],
                        "read {} {}",
                        o,
                        l
                    );
                }
                Op::Write(o, l, b) => {
                    let d = fill(o, l, b);
                    s.write(o, Bytes::from(d.clone()), b % 5 == 0)
                        .await
                        .unwrap();
                    model[o as usize..o as usize + l as usize].copy_from_slice(&d);
                }
                Op::Trim(o, l) | Op::WriteZeroes(o, l) => {
                    s.zero(o, u64::from(l), false).await.unwrap();
                    model[o as usize..o as usize + l as usize].fill(0);
                }
                Op::Flush => s.flush().await.unwrap(),
                Op::Reopen => {
                    drop(s);
                    w.snap = None;
                    w.group = None;
                    w.open();
                }
                Op::PastEnd(o, l) => {
                    let e = s.write(o, Bytes::from(vec![1u8; l as usize]), false).await;
                    let ok = matches!(e, Err(CacheError::PastEnd { .. }));
                    prop_assert!(ok, "write past the end accepted");
                    let ok = matches!(s.read(o, l).await, Err(CacheError::PastEnd { .. }));
                    prop_assert!(ok, "read past the end accepted");
                }
            }
        }
        // Finally the whole image, and the base volume untouched.
        let s = w.snap.clone().unwrap();
        let got = s.read_bytes(0, SIZE as u32).await.unwrap();
        prop_assert!(got[..] == model[..], "final image differs");
        let base = s.base().read_bytes(0, SIZE as u32).await.unwrap();
        prop_assert!(base[..] == image[..], "the base volume was modified");
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn snapshot_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        run(ops)?;
    }
}

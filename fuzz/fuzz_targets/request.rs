//! Feeds arbitrary bytes to the request decoder and the request validator, and
//! checks that validation never accepts a request outside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtman_nbd::proto::transmission::{self as tm, Negotiated, REQUEST_LEN};
use virtman_nbd::proto::{BlockSizes, transmission_flags as tf};

fuzz_target!(|data: &[u8]| {
    if data.len() < REQUEST_LEN + 10 {
        return;
    }
    let header: [u8; REQUEST_LEN] = data[..REQUEST_LEN].try_into().unwrap();
    let rest = &data[REQUEST_LEN..];
    let size = u64::from_be_bytes(rest[..8].try_into().unwrap()) >> (rest[8] % 64);
    let flags = u16::from_be_bytes([rest[9], rest.get(10).copied().unwrap_or(0)]) | tf::HAS_FLAGS;
    let n = Negotiated {
        size,
        flags,
        block_sizes: BlockSizes::DEFAULT,
        structured: rest[8] & 1 == 1,
        meta_contexts: rest[8] & 2 == 2,
    };
    if let Ok(req) = tm::decode_request(&header) {
        if tm::validate(&req, &n).is_ok() {
            let end = req.offset.checked_add(u64::from(req.length));
            assert!(end.is_some_and(|e| e <= size), "accepted a request outside the export");
        }
    }
});

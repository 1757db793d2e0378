//! The etcd backend: the same records as redb, as keys under one prefix, for
//! several coordinators of which one leads and writes.
//!
//! ```text
//!   PREFIX/format                 "virtman-coordinator/1"
//!   PREFIX/leader                 LeaderInfo (JSON; bound to the leader's lease)
//!   PREFIX/images/NAME            ImageRecord (JSON)
//!   PREFIX/members/IMAGE/NODE     MemberRecord (JSON)
//!   PREFIX/bans/NODE              "1"
//!   PREFIX/preheats/IMAGE         PreheatOrder (JSON)
//! ```
//!
//! Fencing: every commit is a transaction that applies only while the
//! leader key's create revision is still the one this coordinator was
//! elected with (its term). A leader that lost its lease (a long pause, a
//! partition) finds the key gone or another's, and etcd refuses its writes:
//! [`StoreError::Fenced`]. A batch larger than one transaction may hold
//! (etcd allows 128 operations by default) goes in several transactions,
//! each fenced; a batch cut by a lost lease is never answered as done, and
//! the next leader loads whatever landed.
//!
//! A prefix that holds keys but no format key, or a format key of another
//! program or a newer version, is refused before anything is written.

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use super::{Backend, Batch, FORMAT, ImageRecord, Loaded, MemberRecord, StoreError, encode};
use crate::api::PreheatOrder;
use crate::lease::LeaseClock;
use crate::metrics::Metrics;

/// The format key's value names the program and the version.
const FORMAT_TAG: &str = "virtman-coordinator/";

/// Operations per transaction (etcd's default `--max-txn-ops` is 128).
const OPS_PER_TXN: usize = 100;

/// Keys per page when loading (answers stay well under gRPC's 4 MiB).
const PAGE: i64 = 1000;

/// Turns an etcd client error into a store error that says what it was.
pub fn etcd_err(what: &str, e: &etcd_client::Error) -> StoreError {
    StoreError::Etcd(format!("{what}: {e}"))
}

/// The keys of one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (a trailing `/` is dropped; empty means `/virtman`).
    pub fn new(prefix: &str) -> Self {
        let p = prefix.trim_end_matches('/');
        let p = if p.is_empty() { "/virtman" } else { p };
        Self {
            prefix: p.to_owned(),
        }
    }

    /// The prefix, without a trailing `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Everything under the prefix starts with this.
    pub fn all(&self) -> String {
        format!("{}/", self.prefix)
    }

    /// The format key.
    pub fn format(&self) -> String {
        format!("{}/format", self.prefix)
    }

    /// The leader key.
    pub fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }

    fn image(&self, name: &str) -> String {
        format!("{}/images/{name}", self.prefix)
    }

    fn member(&self, image: &str, node: &str) -> String {
        format!("{}/members/{image}/{node}", self.prefix)
    }

    fn ban(&self, node: &str) -> String {
        format!("{}/bans/{node}", self.prefix)
    }

    fn preheat(&self, image: &str) -> String {
        format!("{}/preheats/{image}", self.prefix)
    }
}

/// Checks that `keys`' prefix is virtman's, of this format, or empty. With
/// `create`, an empty prefix gets its format key (only if still absent).
pub async fn check_prefix(client: &Client, keys: &Keys, create: bool) -> Result<(), StoreError> {
    let mut kv = client.kv_client();
    let format = kv
        .get(keys.format(), None)
        .await
        .map_err(|e| etcd_err(&format!("reading {}", keys.format()), &e))?;
    match format.kvs().first() {
        Some(kv) => {
            let value = String::from_utf8_lossy(kv.value()).into_owned();
            let Some(version) = value.strip_prefix(FORMAT_TAG) else {
                return Err(StoreError::Foreign {
                    prefix: keys.prefix().to_owned(),
                    key: keys.format(),
                });
            };
            match version.parse::<u64>() {
                Ok(FORMAT) => Ok(()),
                Ok(other) => Err(StoreError::Format(other)),
                Err(_) => Err(StoreError::Foreign {
                    prefix: keys.prefix().to_owned(),
                    key: keys.format(),
                }),
            }
        }
        None => {
            let any = kv
                .get(
                    keys.all(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_keys_only()
                            .with_limit(1),
                    ),
                )
                .await
                .map_err(|e| etcd_err(&format!("listing {}", keys.all()), &e))?;
            if let Some(kv) = any.kvs().first() {
                return Err(StoreError::Foreign {
                    prefix: keys.prefix().to_owned(),
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                });
            }
            if create {
                // Only if the format key is still absent: two coordinators
                // starting together write it once.
                let txn = Txn::new()
                    .when([Compare::create_revision(keys.format(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(
                        keys.format(),
                        format!("{FORMAT_TAG}{FORMAT}"),
                        None,
                    )]);
                kv.txn(txn)
                    .await
                    .map_err(|e| etcd_err("writing the format key", &e))?;
            }
            Ok(())
        }
    }
}

/// Reads every record under the prefix (in pages).
pub async fn load(client: &Client, keys: &Keys) -> Result<Loaded, StoreError> {
    let mut kv = client.kv_client();
    let mut loaded = Loaded::default();
    let all = keys.all();
    let end = prefix_end(all.as_bytes());
    let mut from = all.clone().into_bytes();
    loop {
        let page = kv
            .get(
                from.clone(),
                Some(GetOptions::new().with_range(end.clone()).with_limit(PAGE)),
            )
            .await
            .map_err(|e| etcd_err(&format!("loading {all}"), &e))?;
        for item in page.kvs() {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            let rest = key.strip_prefix(&all).unwrap_or(&key);
            decode_into(&mut loaded, keys, &key, rest, item.value())?;
        }
        match page.kvs().last() {
            Some(last) if page.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    Ok(loaded)
}

fn decode_into(
    loaded: &mut Loaded,
    keys: &Keys,
    key: &str,
    rest: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    fn json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, StoreError> {
        serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
            key: key.to_owned(),
            source,
        })
    }
    let foreign = || StoreError::Foreign {
        prefix: keys.prefix().to_owned(),
        key: key.to_owned(),
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        ["format"] | ["leader"] => {}
        ["images", _] => loaded.images.push(json::<ImageRecord>(key, value)?),
        ["members", image, node] => loaded.members.push((
            (*image).to_owned(),
            (*node).to_owned(),
            json::<MemberRecord>(key, value)?,
        )),
        ["bans", node] => loaded.bans.push((*node).to_owned()),
        ["preheats", _] => loaded.preheats.push(json::<PreheatOrder>(key, value)?),
        _ => return Err(foreign()),
    }
    Ok(())
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The store of one elected leader: its writes hold only while the leader
/// key is still the one of its term.
pub struct EtcdStore {
    client: Client,
    keys: Keys,
    term: i64,
    /// Commits stop once the lease may have expired.
    lease: Arc<LeaseClock>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("keys", &self.keys)
            .field("term", &self.term)
            .finish_non_exhaustive()
    }
}

impl EtcdStore {
    /// The store of the leader of `term`; `lease` says whether its lease
    /// still holds (retries of a failed transaction stop when it does not).
    pub fn new(
        client: Client,
        keys: Keys,
        term: i64,
        lease: Arc<LeaseClock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            keys,
            term,
            lease,
            metrics,
        }
    }

    fn ops(&self, batch: &Batch) -> Vec<TxnOp> {
        let k = &self.keys;
        let mut ops = Vec::new();
        for image in &batch.images {
            ops.push(TxnOp::put(k.image(&image.name), encode(image), None));
        }
        for (image, node) in &batch.removed {
            ops.push(TxnOp::delete(k.member(image, node), None));
        }
        for ((image, node), record) in &batch.members {
            ops.push(TxnOp::put(k.member(image, node), encode(record), None));
        }
        for (node, banned) in &batch.bans {
            ops.push(if *banned {
                TxnOp::put(k.ban(node), "1", None)
            } else {
                TxnOp::delete(k.ban(node), None)
            });
        }
        for (image, order) in &batch.preheats {
            ops.push(match order {
                Some(o) => TxnOp::put(k.preheat(image), encode(o), None),
                None => TxnOp::delete(k.preheat(image), None),
            });
        }
        ops
    }

    async fn fenced_txn(&self, ops: Vec<TxnOp>) -> Result<(), StoreError> {
        let fence = Compare::create_revision(self.keys.leader(), CompareOp::Equal, self.term);
        let mut kv = self.client.kv_client();
        let mut wait = Duration::from_millis(50);
        loop {
            if !self.lease.valid() {
                return Err(StoreError::Fenced { term: self.term });
            }
            let txn = Txn::new().when([fence.clone()]).and_then(ops.clone());
            let started = Instant::now();
            let result = kv.txn(txn).await;
            self.metrics
                .etcd_seconds
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(r) if r.succeeded() => return Ok(()),
                Ok(_) => {
                    self.metrics.fenced.inc();
                    return Err(StoreError::Fenced { term: self.term });
                }
                // A lost connection or a member without a leader: the same
                // transaction again (puts and deletes are idempotent) while
                // the lease may still hold.
                Err(e) => {
                    tracing::warn!(error = %e, "etcd transaction failed; retrying");
                    if !self.lease.valid() {
                        return Err(etcd_err("committing", &e));
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(400));
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Backend for EtcdStore {
    async fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let ops = self.ops(batch);
        for chunk in ops.chunks(OPS_PER_TXN) {
            self.fenced_txn(chunk.to_vec()).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/virtman/"), b"/virtman0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }

    #[test]
    fn keys_drop_trailing_slashes() {
        assert_eq!(Keys::new("/x/").format(), "/x/format");
        assert_eq!(Keys::new("").leader(), "/virtman/leader");
    }
}

//! The redb backend: one file, one coordinator, one transaction per batch
//! (group commit).
//!
//! ```text
//!   coordinator.redb
//!   ├── meta     "format" ─► 1
//!   ├── images   name ─► ImageRecord (JSON)
//!   ├── members  (image, node) ─► MemberRecord (JSON: addr, labels,
//!   │                              parents by name, complete, epoch)
//!   ├── bans     node ─► 1         (nodes refused until unbanned)
//!   └── preheats image ─► PreheatOrder (JSON: id, labels, hosts, whole)
//! ```

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use super::{Backend, Batch, FORMAT, ImageRecord, Loaded, MemberRecord, StoreError, encode};
use crate::api::PreheatOrder;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");
const MEMBERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("members");
const BANS: TableDefinition<&str, u64> = TableDefinition::new("bans");
const PREHEATS: TableDefinition<&str, &[u8]> = TableDefinition::new("preheats");

/// The file inside the data directory.
pub const FILE_NAME: &str = "coordinator.redb";

/// The open database.
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the store in `dir` and reads everything back.
    pub fn open(dir: &Path) -> Result<(Self, Loaded), StoreError> {
        let db = Database::create(dir.join(FILE_NAME)).map_err(redb_err)?;
        let txn = db.begin_write().map_err(redb_err)?;
        let mut loaded = Loaded::default();
        {
            let mut meta = txn.open_table(META).map_err(redb_err)?;
            let format = meta.get("format").map_err(redb_err)?.map(|g| g.value());
            match format {
                None => {
                    meta.insert("format", FORMAT).map_err(redb_err)?;
                }
                Some(FORMAT) => {}
                Some(other) => return Err(StoreError::Format(other)),
            }
            let images = txn.open_table(IMAGES).map_err(redb_err)?;
            for entry in images.iter().map_err(redb_err)? {
                let (k, v) = entry.map_err(redb_err)?;
                let record: ImageRecord =
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                        key: format!("images/{}", k.value()),
                        source,
                    })?;
                loaded.images.push(record);
            }
            let members = txn.open_table(MEMBERS).map_err(redb_err)?;
            for entry in members.iter().map_err(redb_err)? {
                let (k, v) = entry.map_err(redb_err)?;
                let (image, node) = k.value();
                let record: MemberRecord =
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                        key: format!("members/{image}/{node}"),
                        source,
                    })?;
                loaded
                    .members
                    .push((image.to_owned(), node.to_owned(), record));
            }
            let bans = txn.open_table(BANS).map_err(redb_err)?;
            for entry in bans.iter().map_err(redb_err)? {
                let (k, _) = entry.map_err(redb_err)?;
                loaded.bans.push(k.value().to_owned());
            }
            let preheats = txn.open_table(PREHEATS).map_err(redb_err)?;
            for entry in preheats.iter().map_err(redb_err)? {
                let (k, v) = entry.map_err(redb_err)?;
                let order: PreheatOrder =
                    serde_json::from_slice(v.value()).map_err(|source| StoreError::Corrupt {
                        key: format!("preheats/{}", k.value()),
                        source,
                    })?;
                loaded.preheats.push(order);
            }
        }
        txn.commit().map_err(redb_err)?;
        Ok((Self { db }, loaded))
    }

    /// Applies `batch` in one durable transaction.
    pub fn commit_now(&self, batch: &Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(redb_err)?;
        {
            let mut images = txn.open_table(IMAGES).map_err(redb_err)?;
            for image in &batch.images {
                let bytes = encode(image);
                images
                    .insert(image.name.as_str(), bytes.as_slice())
                    .map_err(redb_err)?;
            }
            let mut members = txn.open_table(MEMBERS).map_err(redb_err)?;
            for (image, node) in &batch.removed {
                members
                    .remove((image.as_str(), node.as_str()))
                    .map_err(redb_err)?;
            }
            for ((image, node), record) in &batch.members {
                let bytes = encode(record);
                members
                    .insert((image.as_str(), node.as_str()), bytes.as_slice())
                    .map_err(redb_err)?;
            }
            let mut bans = txn.open_table(BANS).map_err(redb_err)?;
            for (node, banned) in &batch.bans {
                if *banned {
                    bans.insert(node.as_str(), 1).map_err(redb_err)?;
                } else {
                    bans.remove(node.as_str()).map_err(redb_err)?;
                }
            }
            let mut preheats = txn.open_table(PREHEATS).map_err(redb_err)?;
            for (image, order) in &batch.preheats {
                match order {
                    Some(o) => {
                        let bytes = encode(o);
                        preheats
                            .insert(image.as_str(), bytes.as_slice())
                            .map_err(redb_err)?;
                    }
                    None => {
                        preheats.remove(image.as_str()).map_err(redb_err)?;
                    }
                }
            }
        }
        txn.commit().map_err(redb_err)?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Backend for RedbStore {
    async fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        // One small transaction and its fsync: not worth a thread hop.
        self.commit_now(batch)
    }
}

fn redb_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb(e.into())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn a_batch_survives_reopen_and_removals_apply() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = ImageRecord {
            name: "debian".into(),
            size: 1 << 30,
            manifest_digest: "ab".repeat(32),
            origins: vec!["10.0.0.1:10809".into()],
            fanout: None,
            parents: Some(3),
            stripes: Some(2),
        };
        let member = MemberRecord {
            addr: "10.0.0.2:10809".into(),
            labels: BTreeMap::from([("rack".into(), "r1".into())]),
            parents: vec!["origin:0".into()],
            complete: false,
            epoch: 3,
            home: 1,
            lent: vec![0],
            stripe_parents: vec![vec!["origin:0".into()], vec!["n2".into()]],
        };
        {
            let (store, loaded) = RedbStore::open(dir.path()).expect("open");
            assert!(loaded.images.is_empty());
            let mut batch = Batch::default();
            batch.images.push(image.clone());
            batch
                .members
                .insert(("debian".into(), "n1".into()), member.clone());
            batch
                .members
                .insert(("debian".into(), "n2".into()), member.clone());
            store.commit_now(&batch).expect("commit");
            let mut batch = Batch::default();
            batch.removed.push(("debian".into(), "n2".into()));
            batch.bans.insert("n3".into(), true);
            batch.bans.insert("n4".into(), true);
            store.commit_now(&batch).expect("commit");
            let mut batch = Batch::default();
            batch.bans.insert("n4".into(), false);
            store.commit_now(&batch).expect("commit");
        }
        let (_store, loaded) = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(loaded.images, vec![image]);
        assert_eq!(
            loaded.members,
            vec![("debian".to_owned(), "n1".to_owned(), member)]
        );
        assert_eq!(loaded.bans, ["n3"]);
    }

    #[test]
    fn a_corrupt_record_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Database::create(dir.path().join(FILE_NAME)).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut images = txn.open_table(IMAGES).expect("table");
                images.insert("x", b"{not json".as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let err = RedbStore::open(dir.path()).expect_err("corrupt");
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
    }
}

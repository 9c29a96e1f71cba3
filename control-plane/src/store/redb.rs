//! The embedded store: one redb file, one JSON value per record.
//!
//! Every write is its own transaction committed with redb's default
//! durability (an fsync before the commit returns), so an acknowledged write
//! survives `kill -9` and power loss. redb's file lock keeps a second server
//! from opening the same file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;

use super::{Snapshot, Store, StoreError, StoreFuture};
use crate::job::Job;
use crate::node::Node;

/// Jobs by id, as JSON.
const JOBS: TableDefinition<'_, u32, &[u8]> = TableDefinition::new("jobs");
/// Nodes by id, as JSON.
const NODES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("nodes");

/// A redb file holding every job and node.
#[derive(Debug, Clone)]
pub struct RedbStore {
    /// Shared with the blocking tasks that run each transaction.
    db: Arc<Database>,
}

fn transaction_error(operation: impl Into<String>) -> impl FnOnce(::redb::Error) -> StoreError {
    let operation = operation.into();
    move |e| StoreError::Transaction {
        operation,
        source: Box::new(e),
    }
}

impl RedbStore {
    /// Opens the file at `path`, creating it and its tables if needed.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let open_error = |e: ::redb::Error| StoreError::Open {
            path: PathBuf::from(path),
            source: Box::new(e),
        };
        let db = Database::create(path).map_err(|e| open_error(e.into()))?;

        // Create both tables so that readers never meet a missing one.
        let txn = db.begin_write().map_err(|e| open_error(e.into()))?;
        txn.open_table(JOBS).map_err(|e| open_error(e.into()))?;
        txn.open_table(NODES).map_err(|e| open_error(e.into()))?;
        txn.commit().map_err(|e| open_error(e.into()))?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs `f` on a blocking thread: redb waits for fsync.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> StoreFuture<'static, T> {
        let db = Arc::clone(&self.db);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&db))
                .await
                .map_err(StoreError::TaskLost)?
        })
    }
}

fn decode<T: DeserializeOwned>(key: String, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        key,
        source: Box::new(source),
    })
}

fn read_all(db: &Database) -> Result<Snapshot, StoreError> {
    let failed = |e: ::redb::Error| StoreError::Transaction {
        operation: "read every record".to_owned(),
        source: Box::new(e),
    };
    let txn = db.begin_read().map_err(|e| failed(e.into()))?;
    let mut snapshot = Snapshot::default();

    let jobs = txn.open_table(JOBS).map_err(|e| failed(e.into()))?;
    for entry in jobs.iter().map_err(|e| failed(e.into()))? {
        let (key, value) = entry.map_err(|e| failed(e.into()))?;
        snapshot
            .jobs
            .push(decode(format!("jobs/{}", key.value()), value.value())?);
    }

    let nodes = txn.open_table(NODES).map_err(|e| failed(e.into()))?;
    for entry in nodes.iter().map_err(|e| failed(e.into()))? {
        let (key, value) = entry.map_err(|e| failed(e.into()))?;
        snapshot
            .nodes
            .push(decode(format!("nodes/{}", key.value()), value.value())?);
    }
    Ok(snapshot)
}

fn write_job(db: &Database, id: u32, bytes: &[u8]) -> Result<(), ::redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(JOBS)?.insert(id, bytes)?;
    txn.commit()?;
    Ok(())
}

fn write_node(db: &Database, id: &str, bytes: &[u8]) -> Result<(), ::redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(NODES)?.insert(id, bytes)?;
    txn.commit()?;
    Ok(())
}

impl Store for RedbStore {
    fn load(&self) -> StoreFuture<'_, Snapshot> {
        self.blocking(read_all)
    }

    fn put_job(&self, job: &Job) -> StoreFuture<'_, ()> {
        let id = job.id;
        let encoded = serde_json::to_vec(job).map_err(|source| StoreError::Encode {
            key: format!("jobs/{id}"),
            source,
        });
        self.blocking(move |db| {
            write_job(db, id, &encoded?).map_err(transaction_error(format!("write job {id}")))
        })
    }

    fn put_node(&self, node: &Node) -> StoreFuture<'_, ()> {
        let id = node.id.clone();
        let encoded = serde_json::to_vec(node).map_err(|source| StoreError::Encode {
            key: format!("nodes/{id}"),
            source,
        });
        self.blocking(move |db| {
            write_node(db, &id, &encoded?).map_err(transaction_error(format!("write node {id}")))
        })
    }
}

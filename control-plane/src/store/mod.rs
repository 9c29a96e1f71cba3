//! Durable state behind one trait, so the services never know which backend
//! holds it: an embedded redb file by default ([`RedbStore`]), memory for
//! tests ([`MemoryStore`]), and room for an etcd backend later.
//!
//! The store holds whole records (one job, one node) keyed by id. A `put_*`
//! that returns `Ok` is durable: the coordinator acknowledges a request only
//! after its write came back.

mod memory;
mod redb;

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

pub use self::memory::MemoryStore;
pub use self::redb::RedbStore;
use crate::job::Job;
use crate::node::Node;

/// A store operation in flight.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Everything a store holds, read at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// Every job, by ascending id.
    pub jobs: Vec<Job>,
    /// Every node ever registered, by id.
    pub nodes: Vec<Node>,
}

/// A place where jobs and nodes outlive the process.
pub trait Store: Send + Sync + fmt::Debug {
    /// Reads every record.
    fn load(&self) -> StoreFuture<'_, Snapshot>;
    /// Writes a job, replacing any job with the same id.
    fn put_job(&self, job: &Job) -> StoreFuture<'_, ()>;
    /// Writes a node, replacing any node with the same id.
    fn put_node(&self, node: &Node) -> StoreFuture<'_, ()>;
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store file could not be opened or created.
    #[error("open store {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// What the backend said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A read or write transaction failed.
    #[error("store {operation} failed")]
    Transaction {
        /// What was being done, such as `write job 3`.
        operation: String,
        /// What the backend said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A stored record does not decode, or decodes to something that
    /// fails validation (a spec this version refuses).
    #[error("stored record {key} is corrupt")]
    Corrupt {
        /// The record's key, such as `jobs/3`.
        key: String,
        /// Why it is unusable.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record does not encode (a bug, not bad input).
    #[error("encode record {key}")]
    Encode {
        /// The record's key.
        key: String,
        /// Why it does not encode.
        #[source]
        source: serde_json::Error,
    },
    /// The blocking task that ran the operation died.
    #[error("store task did not finish")]
    TaskLost(#[source] tokio::task::JoinError),
}

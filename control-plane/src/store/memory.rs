//! A store that keeps records in memory, for tests and throw-away servers.

use std::collections::BTreeMap;
use std::sync::Mutex;

use super::{Snapshot, Store, StoreFuture};
use crate::job::Job;
use crate::node::Node;

/// Records in memory; gone with the process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    /// Jobs and nodes, guarded together; never held across an await.
    records: Mutex<(BTreeMap<u32, Job>, BTreeMap<String, Node>)>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut (BTreeMap<u32, Job>, BTreeMap<String, Node>)) -> T) -> T {
        // A poisoned lock only means another caller panicked mid-insert of a
        // whole record; the map itself is still consistent.
        let mut records = self.records.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut records)
    }
}

impl Store for MemoryStore {
    fn load(&self) -> StoreFuture<'_, Snapshot> {
        let snapshot = self.with(|(jobs, nodes)| Snapshot {
            jobs: jobs.values().cloned().collect(),
            nodes: nodes.values().cloned().collect(),
        });
        Box::pin(async move { Ok(snapshot) })
    }

    fn put_job(&self, job: &Job) -> StoreFuture<'_, ()> {
        self.with(|(jobs, _)| jobs.insert(job.id, job.clone()));
        Box::pin(async { Ok(()) })
    }

    fn put_node(&self, node: &Node) -> StoreFuture<'_, ()> {
        self.with(|(_, nodes)| nodes.insert(node.id.clone(), node.clone()));
        Box::pin(async { Ok(()) })
    }
}

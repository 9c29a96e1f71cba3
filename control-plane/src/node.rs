//! Nodes: the sidecars that host aggregators, what they can hold, and whether
//! they are alive.

use serde::{Deserialize, Serialize};

/// A node as registered; the part of it that is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Stable id the sidecar chose.
    pub id: String,
    /// Cores aggregators may use.
    pub cores: u32,
    /// Arena bytes the sidecar can give jobs.
    pub arena_bytes: u64,
    /// `host:port` of the trainer gateway.
    pub gateway_address: String,
    /// `host:port` of the peer endpoint.
    pub peer_address: String,
}

/// A node with its liveness, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// The registered node.
    pub node: Node,
    /// Whether heartbeats arrive in time.
    pub online: bool,
    /// Last heartbeat or registration, in milliseconds since the Unix epoch;
    /// 0 if none since this control plane started.
    pub last_heartbeat_unix_ms: u64,
}

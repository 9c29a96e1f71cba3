//! Messages between an endpoint and its node's sidecar on the registration
//! socket: newline-delimited JSON, one object per line.
//!
//! The connection that registers an endpoint stays open for the endpoint's
//! life and carries its buffer requests; when it closes, the sidecar releases
//! everything the endpoint held. Requests carry an `id` that the response
//! echoes; a release needs no answer, so dropping a buffer never waits.
//! The registration response travels with two descriptors attached by
//! `SCM_RIGHTS`: the endpoint's end of its descriptor socket, then the job's
//! arena memfd.

use serde::{Deserialize, Serialize};

/// Longest control line either side accepts, in bytes; longer input is a
/// protocol error, so a peer cannot make the other buffer without bound.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// Most references one release request may carry.
pub const MAX_RELEASE_BATCH: usize = 1024;

/// A request from an endpoint (or an operator's tool) to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Registers an endpoint; must be the first request on a connection.
    Register {
        /// Echoed in the response.
        id: u64,
        /// Job the endpoint works for.
        job: u32,
        /// Free-form role (`leaf`, `middle`, `top`, `gateway`, ...), for logs.
        role: String,
        /// Endpoint id to take; `None` lets the sidecar pick a free one.
        endpoint: Option<u32>,
    },
    /// Allocates a buffer of `len` bytes in the job's arena.
    Alloc {
        /// Echoed in the response.
        id: u64,
        /// Payload bytes wanted; at least 1.
        len: u64,
    },
    /// Takes one more reference to a buffer the endpoint holds a reference to.
    Share {
        /// Echoed in the response.
        id: u64,
        /// The held reference.
        slot: u32,
        /// Its generation.
        gen: u32,
    },
    /// Gives references back; fire and forget.
    Release {
        /// `(slot, generation)` pairs, at most [`MAX_RELEASE_BATCH`].
        refs: Vec<(u32, u32)>,
    },
    /// Reports the sidecar's state; allowed without registering.
    Stats {
        /// Echoed in the response.
        id: u64,
    },
}

/// A reference the sidecar issued: where the buffer is and how to name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Slot in the ref table.
    pub slot: u32,
    /// Generation of the slot.
    pub gen: u32,
    /// Buffer offset in the job's arena.
    pub offset: u64,
    /// Buffer length in bytes.
    pub len: u64,
}

/// What the sidecar says back, or tells an endpoint unasked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Registration done; the socket and arena fds ride along.
    Registered {
        /// The request's id.
        id: u64,
        /// The endpoint id now bound to this connection.
        endpoint: u32,
        /// Job of the endpoint.
        job: u32,
        /// Size of the arena whose fd is attached.
        arena_bytes: u64,
        /// `sk_msg` or `userspace`.
        dataplane: String,
    },
    /// A buffer reference was issued (alloc or share).
    Granted {
        /// The request's id.
        id: u64,
        /// The reference.
        grant: Grant,
    },
    /// Sidecar state, for `stats`.
    Stats {
        /// The request's id.
        id: u64,
        /// The report.
        stats: SidecarStats,
    },
    /// A request failed.
    Error {
        /// The request's id; 0 when the request could not be read.
        id: u64,
        /// What went wrong, for programs.
        code: ErrorCode,
        /// What went wrong, for people.
        message: String,
    },
    /// A descriptor this endpoint sent was refused and its reference freed.
    Refused {
        /// The descriptor's sequence number.
        seq: u32,
        /// Where it was addressed.
        dst: u32,
        /// Why it was refused.
        reason: RefuseReason,
    },
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed or not allowed in this state.
    InvalidRequest,
    /// The arena has no free range large enough; retry after releases.
    ArenaFull,
    /// The ref table is full; retry after releases.
    RefsExhausted,
    /// This endpoint holds its whole credit of live references; retry after
    /// releases.
    CreditExhausted,
    /// The named reference is not held by this endpoint.
    NotHolder,
    /// The endpoint id is taken by a live endpoint.
    EndpointTaken,
    /// The node serves its limit of endpoints or jobs; retry elsewhere or
    /// later.
    NodeFull,
    /// The sidecar failed on its side.
    Internal,
}

impl ErrorCode {
    /// Whether the same request can succeed later without change.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::ArenaFull
                | Self::RefsExhausted
                | Self::CreditExhausted
                | Self::NodeFull
                | Self::Internal
        )
    }
}

/// Why a descriptor was not delivered. Each is counted by the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseReason {
    /// Fewer than 64 bytes arrived and no more followed in time.
    Short,
    /// Wrong magic number.
    BadMagic,
    /// Unsupported layout version.
    BadVersion,
    /// Unknown kind.
    BadKind,
    /// `src` is not the endpoint that owns the sending socket.
    SpoofedSource,
    /// No endpoint with the destination id is registered here.
    UnknownEndpoint,
    /// Source and destination belong to different jobs.
    CrossJob,
    /// The buffer range lies outside the job's arena.
    OutOfBounds,
    /// The reference is stale, not the sender's, or does not match the range.
    NotHolder,
}

impl RefuseReason {
    /// Every reason, in a stable order for reports.
    pub const ALL: [RefuseReason; 9] = [
        Self::Short,
        Self::BadMagic,
        Self::BadVersion,
        Self::BadKind,
        Self::SpoofedSource,
        Self::UnknownEndpoint,
        Self::CrossJob,
        Self::OutOfBounds,
        Self::NotHolder,
    ];

    /// The name used in logs, JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Short => "short",
            Self::BadMagic => "bad_magic",
            Self::BadVersion => "bad_version",
            Self::BadKind => "bad_kind",
            Self::SpoofedSource => "spoofed_source",
            Self::UnknownEndpoint => "unknown_endpoint",
            Self::CrossJob => "cross_job",
            Self::OutOfBounds => "out_of_bounds",
            Self::NotHolder => "not_holder",
        }
    }
}

/// A sidecar's state, as `stats` reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SidecarStats {
    /// `sk_msg` or `userspace`.
    pub dataplane: String,
    /// One entry per job with an arena.
    pub jobs: Vec<JobStats>,
    /// One entry per registered endpoint.
    pub endpoints: Vec<EndpointStats>,
    /// Endpoint ids whose sockets are in the kernel's socket map right now,
    /// read from the map itself (empty in user-space mode).
    pub sockmap_endpoints: Vec<u32>,
    /// Descriptors the sidecar refused, by reason, over its whole life.
    pub refused: std::collections::BTreeMap<RefuseReason, u64>,
    /// Descriptors the sidecar routed itself (user space or fallback).
    pub routed_by_sidecar: u64,
}

/// One job's arena.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStats {
    /// Job id.
    pub job: u32,
    /// Arena size, header included.
    pub arena_bytes: u64,
    /// Bytes in live buffers.
    pub used_bytes: u64,
    /// Live buffers.
    pub buffers: u64,
    /// Live references to them.
    pub refs: u64,
    /// Page size backing the arena.
    pub page_bytes: u64,
    /// Descriptors of this job the kernel redirected, over the job's life on
    /// this node (endpoints that have left included).
    pub kernel_routed: u64,
    /// Kernel refusals (cross-job) of this job's senders, likewise.
    pub kernel_refused: u64,
    /// Descriptors of this job the kernel handed to the sidecar, likewise.
    pub kernel_passed: u64,
}

/// One registered endpoint.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStats {
    /// Endpoint id.
    pub endpoint: u32,
    /// Its job.
    pub job: u32,
    /// Its role, as registered.
    pub role: String,
    /// Process id read with `SO_PEERCRED` at registration.
    pub pid: i32,
    /// Live references this endpoint allocated or shared (its credit use).
    pub credit_used: u64,
    /// Kernel counters for descriptors this endpoint sent (zero in user space).
    pub kernel_routed: u64,
    /// Kernel refusals (cross-job) for this sender.
    pub kernel_refused: u64,
    /// Descriptors the kernel handed to the sidecar for this sender.
    pub kernel_passed: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_tagged_json_and_unknown_fields_are_errors() {
        let line = serde_json::to_string(&Request::Alloc { id: 3, len: 10 }).unwrap();
        assert_eq!(line, r#"{"op":"alloc","id":3,"len":10}"#);
        assert_eq!(
            serde_json::from_str::<Request>(&line).unwrap(),
            Request::Alloc { id: 3, len: 10 }
        );

        let err = serde_json::from_str::<Request>(r#"{"op":"alloc","id":3,"len":10,"x":1}"#);
        assert!(err.unwrap_err().to_string().contains("unknown field"));
    }

    #[test]
    fn only_capacity_errors_are_retryable() {
        assert!(ErrorCode::ArenaFull.is_retryable());
        assert!(ErrorCode::CreditExhausted.is_retryable());
        assert!(!ErrorCode::NotHolder.is_retryable());
        assert!(!ErrorCode::InvalidRequest.is_retryable());
    }
}

//! Every contract between lifl processes, in one crate that both ends link.
//!
//! - [`descriptor`]: the 64-byte record that moves an arena buffer between
//!   endpoints, and the BPF map values, mirrored from `bpf-c/include/lifl.h`.
//! - [`arena`]: the header at the start of every job's shared-memory arena and
//!   the checked mapping that readers and writers go through.
//! - [`control`]: the messages an endpoint exchanges with its node's sidecar
//!   over the registration socket.
//! - [`v1`]: the control plane's gRPC contract (`lifl.v1`), generated from
//!   `proto/lifl/v1/*.proto`, and [`bearer`], the token its clients present.

pub mod arena;
pub mod bearer;
pub mod control;
pub mod descriptor;
pub mod v1;

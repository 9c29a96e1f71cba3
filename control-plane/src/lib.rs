//! The lifl control plane: owns jobs, nodes and the aggregation tree of every
//! round, keeps them in a durable store, and serves them over gRPC.
//!
//! The domain never sees tonic: [`spec`] validates job specs, [`planner`]
//! sizes and places trees, [`coordinator`] owns state and rounds, [`store`]
//! persists it, [`auth`] checks tokens. [`grpc`] validates requests, calls
//! the domain and converts, and [`server`] wires it into a running process.
//! [`ctl`] is the library half of the `liflctl` CLI.

pub mod auth;
pub mod coordinator;
pub mod ctl;
pub mod grpc;
pub mod job;
pub mod node;
pub mod planner;
pub mod server;
pub mod spec;
pub mod store;

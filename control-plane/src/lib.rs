//! The lifl control plane: stores jobs, nodes and round topology and serves
//! them over gRPC. Built out by the control-plane work; empty for now.

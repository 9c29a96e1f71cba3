//! The gRPC contract of the control plane (package `lifl.v1`), generated from
//! `proto/lifl/v1/*.proto`: messages, clients and server traits.
//!
//! The `.proto` files are the documentation; this module only includes what
//! `build.rs` generated from them, and the encoded descriptor set that servers
//! register with gRPC reflection.

#![allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms
)]

tonic::include_proto!("lifl.v1");

/// Encoded `FileDescriptorSet` of every `lifl.v1` file, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lifl_v1_descriptor");

//! The lifl SDK: what aggregator and trainer code links to move model
//! updates through a lifl node by reference.
//!
//! An [`Endpoint`] registers with the node's sidecar for a job. It allocates
//! a buffer in the job's shared-memory arena and writes the update into it in
//! place; [`Endpoint::send`] then moves a 64-byte descriptor, never the
//! bytes, to another endpoint, which reads them in place as `&[u8]` or
//! `&[f32]`. Dropping a buffer or an update gives its reference back.
//!
//! ```no_run
//! use lifl_sdk::{Endpoint, Registration, UpdateMeta};
//!
//! # async fn demo() -> Result<(), lifl_sdk::SdkError> {
//! let socket = "/run/lifl/sidecar.sock";
//! let leaf = Endpoint::register(Registration::new(socket, 7, "leaf")).await?;
//! let top = Endpoint::register(Registration::new(socket, 7, "top")).await?;
//!
//! // Write an update once, in place in the arena.
//! let mut update = leaf.alloc(4 * 3).await?;
//! update.as_mut_f32()?.copy_from_slice(&[0.5, -1.0, 2.0]);
//!
//! // Move it by reference: only a descriptor travels.
//! let meta = UpdateMeta::update(1, 600);
//! leaf.send(top.id(), update, meta).await?;
//!
//! // Read it in place on the other side; dropping it releases the buffer.
//! let received = top.recv().await?;
//! assert_eq!(received.as_f32()?, &[0.5, -1.0, 2.0]);
//! assert_eq!(received.meta().samples, 600);
//! # Ok(())
//! # }
//! ```
//!
//! The same steps run as a program against a live sidecar:
//! `cargo run -p lifl-sdk --example round_trip -- /run/lifl/sidecar.sock`.
//!
//! [`fedavg`] folds received updates into a weighted average in place, for
//! aggregators.
//!
//! [`training`] is the trainers' side: a seeded non-IID synthetic dataset
//! and softmax regression trained locally by SGD. [`trainer`] takes it over
//! the network: join a round at the control plane, fetch the global model
//! from a node's gateway, push the update back; `lifl-trainer` runs many
//! simulated trainers that way in one process.
//!
//! Errors say whose fault they are ([`SdkError::fault`]) and whether the
//! same call can succeed later ([`SdkError::is_retryable`]).

pub mod aggregator;
mod buffer;
pub mod checksum;
mod endpoint;
mod error;
pub mod fedavg;
pub mod trainer;
pub mod training;

pub use buffer::{BufferMut, Sendable, Update, UpdateMeta};
pub use endpoint::{stats, Endpoint, Registration};
pub use error::{Fault, SdkError};
pub use lifl_proto::control::{ErrorCode, RefuseReason, SidecarStats};
pub use lifl_proto::descriptor::DescKind;

//! Buffer references held by an endpoint: one it allocated and is writing
//! ([`BufferMut`]), and one it received ([`Update`]). Both read and write the
//! arena in place, and both give their reference back when dropped.

use std::sync::Arc;

use lifl_proto::control::Grant;
use lifl_proto::descriptor::{DescKind, Descriptor};

use crate::endpoint::Shared;
use crate::error::SdkError;

/// One buffer reference the sidecar issued to this endpoint. Dropping it
/// releases the reference, unless it was moved away by a send.
#[derive(Debug)]
pub(crate) struct HeldRef {
    pub(crate) grant: Grant,
    pub(crate) shared: Arc<Shared>,
    sent: bool,
}

impl HeldRef {
    pub(crate) fn new(grant: Grant, shared: Arc<Shared>) -> Self {
        Self {
            grant,
            shared,
            sent: false,
        }
    }

    /// Marks the reference as moved to another endpoint: no release on drop.
    pub(crate) fn into_sent(mut self) -> Grant {
        self.sent = true;
        self.grant
    }

    fn bytes(&self) -> &[u8] {
        self.shared
            .arena
            .bytes(self.grant.offset, self.grant.len)
            .expect("grants are bounds-checked when they arrive")
    }
}

impl Drop for HeldRef {
    fn drop(&mut self) {
        if !self.sent {
            self.shared.release(self.grant.slot, self.grant.gen);
        }
    }
}

fn as_f32(bytes: &[u8]) -> Result<&[f32], SdkError> {
    bytemuck::try_cast_slice(bytes).map_err(|_| SdkError::NotF32 {
        len: bytes.len() as u64,
    })
}

/// A buffer this endpoint allocated in its job's arena, writable in place
/// until it is sent.
#[derive(Debug)]
pub struct BufferMut {
    pub(crate) held: HeldRef,
}

impl BufferMut {
    /// The buffer's bytes, writable in place.
    pub fn as_mut_bytes(&mut self) -> &mut [u8] {
        let grant = self.held.grant;
        // SAFETY: the sidecar issued this reference to this endpoint alone
        // and nothing has been sent yet, so no other process writes the
        // range; `&mut self` makes this the only slice of it here.
        unsafe { self.held.shared.arena.bytes_mut(grant.offset, grant.len) }
            .expect("grants are bounds-checked when they arrive")
    }

    /// The buffer as `f32` values, writable in place.
    pub fn as_mut_f32(&mut self) -> Result<&mut [f32], SdkError> {
        let len = self.held.grant.len;
        bytemuck::try_cast_slice_mut(self.as_mut_bytes()).map_err(|_| SdkError::NotF32 { len })
    }

    /// The buffer's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        self.held.bytes()
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> u64 {
        self.held.grant.len
    }

    /// Whether the buffer has no bytes (never, for an allocated one).
    pub fn is_empty(&self) -> bool {
        self.held.grant.len == 0
    }
}

/// What a descriptor says about its payload, besides where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateMeta {
    /// Federated round the payload belongs to.
    pub round: u32,
    /// What the payload is.
    pub kind: DescKind,
    /// Training samples behind it: its weight in FedAvg.
    pub samples: u64,
    /// Trainers' updates folded into it: 1 for an update, the sum over the
    /// children for a partial result or a model.
    pub updates: u32,
}

impl UpdateMeta {
    /// One trainer's update for `round`, trained on `samples` samples.
    pub fn update(round: u32, samples: u64) -> Self {
        Self {
            round,
            kind: DescKind::Update,
            samples,
            updates: 1,
        }
    }
}

/// A buffer reference this endpoint received, read in place.
#[derive(Debug)]
pub struct Update {
    pub(crate) held: HeldRef,
    pub(crate) desc: Descriptor,
}

impl Update {
    /// The payload's bytes, in place in the arena.
    pub fn as_bytes(&self) -> &[u8] {
        self.held.bytes()
    }

    /// The payload as `f32` values, in place in the arena.
    pub fn as_f32(&self) -> Result<&[f32], SdkError> {
        as_f32(self.as_bytes())
    }

    /// The payload's length in bytes.
    pub fn len(&self) -> u64 {
        self.held.grant.len
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.held.grant.len == 0
    }

    /// The endpoint that sent it.
    pub fn src(&self) -> u32 {
        self.desc.src
    }

    /// The sender's sequence number.
    pub fn seq(&self) -> u32 {
        self.desc.seq
    }

    /// Round, kind and sample count.
    pub fn meta(&self) -> UpdateMeta {
        UpdateMeta {
            round: self.desc.round,
            // The receive path only admits descriptors with a known kind.
            kind: self.desc.kind().unwrap_or(DescKind::Control),
            samples: self.desc.samples,
            updates: self.desc.updates,
        }
    }
}

/// A reference that can be sent: a freshly written buffer or a received one
/// passed on.
pub trait Sendable: sealed::Sealed {
    #[doc(hidden)]
    fn into_held(self) -> HeldRefToken;
}

/// Opaque carrier of a reference into [`crate::Endpoint::send`].
#[doc(hidden)]
#[derive(Debug)]
pub struct HeldRefToken(pub(crate) HeldRef);

impl Sendable for BufferMut {
    fn into_held(self) -> HeldRefToken {
        HeldRefToken(self.held)
    }
}

impl Sendable for Update {
    fn into_held(self) -> HeldRefToken {
        HeldRefToken(self.held)
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::BufferMut {}
    impl Sealed for super::Update {}
}

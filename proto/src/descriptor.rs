//! The descriptor and BPF map layouts, mirrored by hand from
//! `bpf-c/include/lifl.h`.
//!
//! The C header asserts the same sizes and offsets with `_Static_assert`; the
//! `const` assertions and the tests at the bottom of this file pin the Rust
//! side to the same numbers, so a change to one side fails to build until the
//! other follows.

use bytemuck::{Pod, Zeroable};

/// `"LIFD"` read as a little-endian `u32`.
pub const DESC_MAGIC: u32 = 0x4446_494c;
/// Layout version; a receiver refuses any other.
pub const DESC_VERSION: u16 = 2;
/// Every descriptor is exactly this many bytes on the wire.
pub const DESC_SIZE: usize = 64;

/// What a descriptor's payload is, from the platform's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum DescKind {
    /// A trainer's model update.
    Update = 1,
    /// An aggregator's partial result.
    Partial = 2,
    /// A global model.
    Model = 3,
    /// Application-defined; the platform gives the payload no meaning.
    Control = 4,
}

impl TryFrom<u16> for DescKind {
    type Error = DescError;

    fn try_from(raw: u16) -> Result<Self, DescError> {
        match raw {
            1 => Ok(Self::Update),
            2 => Ok(Self::Partial),
            3 => Ok(Self::Model),
            4 => Ok(Self::Control),
            other => Err(DescError::UnknownKind(other)),
        }
    }
}

/// One reference to one arena buffer, moved from `src` to `dst`
/// (`struct lifl_desc`). Fields are little-endian, as on every host lifl runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct Descriptor {
    /// Destination endpoint id: the routing key the BPF program reads.
    pub dst: u32,
    /// Sending endpoint id; it must match the socket it was written on.
    pub src: u32,
    /// [`DESC_MAGIC`].
    pub magic: u32,
    /// [`DESC_VERSION`].
    pub version: u16,
    /// A [`DescKind`] as its raw value.
    pub kind: u16,
    /// Job id; source and destination must both belong to it.
    pub job: u32,
    /// Federated round the payload belongs to.
    pub round: u32,
    /// Slot of the reference in the sidecar's ref table.
    pub ref_slot: u32,
    /// Generation of that slot; a stale generation is refused.
    pub ref_gen: u32,
    /// Byte offset of the buffer in the job's arena.
    pub offset: u64,
    /// Byte length of the buffer.
    pub len: u64,
    /// Training samples behind the payload: its FedAvg weight.
    pub samples: u64,
    /// The sender's sequence number, echoed back in refusals.
    pub seq: u32,
    /// Trainers' updates folded into the payload: 1 for an update, the sum
    /// over its children for a partial result. Lets the top of a tree count
    /// what a round aggregated.
    pub updates: u32,
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == DESC_SIZE);
const _: () = assert!(std::mem::offset_of!(Descriptor, job) == 16);
const _: () = assert!(std::mem::offset_of!(Descriptor, ref_slot) == 24);
const _: () = assert!(std::mem::offset_of!(Descriptor, offset) == 32);
const _: () = assert!(std::mem::offset_of!(Descriptor, seq) == 56);
const _: () = assert!(std::mem::offset_of!(Descriptor, updates) == 60);

/// Why a 64-byte record is not a descriptor this build understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DescError {
    /// Fewer than [`DESC_SIZE`] bytes.
    #[error("descriptor is {found} bytes, expected {DESC_SIZE}")]
    Short {
        /// Bytes that arrived.
        found: usize,
    },
    /// The magic number is not [`DESC_MAGIC`].
    #[error("bad descriptor magic {found:#010x}")]
    BadMagic {
        /// The magic that arrived.
        found: u32,
    },
    /// The layout version is not [`DESC_VERSION`].
    #[error("descriptor version {found}, this build speaks {DESC_VERSION}")]
    BadVersion {
        /// The version that arrived.
        found: u16,
    },
    /// The kind field holds no [`DescKind`].
    #[error("unknown descriptor kind {0}")]
    UnknownKind(u16),
}

impl Descriptor {
    /// Reads a descriptor from the first [`DESC_SIZE`] bytes of `bytes`,
    /// checking magic, version and kind. Alignment of `bytes` does not matter.
    pub fn parse(bytes: &[u8]) -> Result<Self, DescError> {
        let raw = bytes
            .get(..DESC_SIZE)
            .ok_or(DescError::Short { found: bytes.len() })?;
        let desc: Descriptor = bytemuck::pod_read_unaligned(raw);
        if desc.magic != DESC_MAGIC {
            return Err(DescError::BadMagic { found: desc.magic });
        }
        if desc.version != DESC_VERSION {
            return Err(DescError::BadVersion {
                found: desc.version,
            });
        }
        DescKind::try_from(desc.kind)?;
        Ok(desc)
    }

    /// The descriptor's wire bytes.
    pub fn as_bytes(&self) -> &[u8; DESC_SIZE] {
        bytemuck::cast_ref(self)
    }

    /// The kind, already checked by [`Descriptor::parse`].
    pub fn kind(&self) -> Result<DescKind, DescError> {
        DescKind::try_from(self.kind)
    }
}

/// `endpoints` map value: what the sidecar registered for an endpoint id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
#[repr(C)]
pub struct EndpointEntry {
    /// Job the endpoint belongs to.
    pub job: u32,
    /// Reserved, zero.
    pub flags: u32,
}

/// `sender_ports` map value: who owns the client end bound to a local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
#[repr(C)]
pub struct SenderEntry {
    /// Endpoint id of the socket's owner.
    pub endpoint: u32,
    /// Job of that endpoint.
    pub job: u32,
}

/// `refs` map value: one live reference to an arena buffer. A zero `holder`
/// marks a free slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
#[repr(C)]
pub struct RefEntry {
    /// Endpoint that may send or release the reference.
    pub holder: u32,
    /// Bumped each time the slot is reused.
    pub gen: u32,
    /// Job whose arena holds the buffer.
    pub job: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// Buffer offset in the arena.
    pub offset: u64,
    /// Buffer length.
    pub len: u64,
}

/// `route_stats` map value (summed over CPUs): what the program did for one
/// sending endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Pod, Zeroable)]
#[repr(C)]
pub struct RouteStats {
    /// Redirected in the kernel to the destination's socket.
    pub routed: u64,
    /// Refused: the destination belongs to another job.
    pub refused: u64,
    /// Handed to the sidecar: malformed, unknown destination or stale ref.
    pub passed: u64,
}

impl std::ops::AddAssign for RouteStats {
    fn add_assign(&mut self, other: Self) {
        self.routed += other.routed;
        self.refused += other.refused;
        self.passed += other.passed;
    }
}

const _: () = assert!(std::mem::size_of::<EndpointEntry>() == 8);
const _: () = assert!(std::mem::size_of::<SenderEntry>() == 8);
const _: () = assert!(std::mem::size_of::<RefEntry>() == 32);
const _: () = assert!(std::mem::size_of::<RouteStats>() == 24);

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        Descriptor {
            dst: 7,
            src: 3,
            magic: DESC_MAGIC,
            version: DESC_VERSION,
            kind: DescKind::Update as u16,
            job: 42,
            round: 5,
            ref_slot: 9,
            ref_gen: 2,
            offset: 4096,
            len: 1 << 20,
            samples: 600,
            seq: 11,
            updates: 1,
        }
    }

    #[test]
    fn wire_layout_matches_the_c_header() {
        let bytes = sample().as_bytes().to_vec();
        assert_eq!(
            &bytes[0..4],
            &7u32.to_le_bytes(),
            "dst comes first for the BPF program"
        );
        assert_eq!(&bytes[8..12], b"LIFD");
        assert_eq!(&bytes[16..20], &42u32.to_le_bytes());
        assert_eq!(&bytes[32..40], &4096u64.to_le_bytes());
        assert_eq!(&bytes[56..60], &11u32.to_le_bytes());
        assert_eq!(&bytes[60..64], &1u32.to_le_bytes());
    }

    #[test]
    fn parse_round_trips_from_an_unaligned_buffer() {
        let mut buf = [0u8; DESC_SIZE + 1];
        buf[1..].copy_from_slice(sample().as_bytes());
        assert_eq!(Descriptor::parse(&buf[1..]), Ok(sample()));
    }

    #[test]
    fn parse_refuses_short_bad_magic_version_and_kind() {
        let good = *sample().as_bytes();
        assert_eq!(
            Descriptor::parse(&good[..63]),
            Err(DescError::Short { found: 63 })
        );

        let mut bad = sample();
        bad.magic = 0xdead_beef;
        assert_eq!(
            Descriptor::parse(bad.as_bytes()),
            Err(DescError::BadMagic { found: 0xdead_beef })
        );

        let mut bad = sample();
        bad.version = 9;
        assert_eq!(
            Descriptor::parse(bad.as_bytes()),
            Err(DescError::BadVersion { found: 9 })
        );

        let mut bad = sample();
        bad.kind = 77;
        assert_eq!(
            Descriptor::parse(bad.as_bytes()),
            Err(DescError::UnknownKind(77))
        );
    }
}

//! Each job's shared-memory arena: the memfd that holds its buffers, and the
//! allocator and reference counts that only the sidecar keeps.
//!
//! The memfd is sized once, backed by hugepages when the machine has enough
//! free, pre-faulted so no writer pays for first touches, and sealed against
//! resizing so no process that maps it can make another one fault. Processes
//! receive the fd and map it; they never allocate or free. Buffers start at
//! multiples of [`BUFFER_ALIGN`] after the header page.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use lifl_proto::arena::{ArenaMap, ARENA_HEADER_BYTES, BUFFER_ALIGN};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};

/// Why an arena could not be created or a buffer allocated.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// A system call failed while creating the arena.
    #[error("{call} for the arena of job {job}: {source}")]
    Create {
        /// The job whose arena it was.
        job: u32,
        /// The failing call.
        call: &'static str,
        /// The OS error.
        source: nix::Error,
    },
    /// Mapping or writing the header failed.
    #[error("map the arena: {0}")]
    Map(#[from] lifl_proto::arena::ArenaError),
    /// No free range is large enough.
    #[error("arena full: {requested} bytes requested, {free} free in {fragments} ranges")]
    Full {
        /// Bytes asked for, after alignment.
        requested: u64,
        /// Bytes free in total.
        free: u64,
        /// Number of free ranges.
        fragments: usize,
    },
    /// A zero-length or larger-than-arena request.
    #[error("buffer of {requested} bytes cannot fit an arena of {capacity} bytes")]
    BadSize {
        /// Bytes asked for.
        requested: u64,
        /// Buffer space of the arena.
        capacity: u64,
    },
}

/// One job's arena: the memfd, the sidecar's own mapping, and its buffers.
#[derive(Debug)]
pub struct Arena {
    job: u32,
    fd: OwnedFd,
    map: ArenaMap,
    page_bytes: u64,
    allocator: RangeAllocator,
    /// Live buffers by offset: rounded length and reference count.
    buffers: HashMap<u64, Buffer>,
}

#[derive(Debug, Clone, Copy)]
struct Buffer {
    len: u64,
    refs: u32,
}

impl Arena {
    /// Creates the arena of `job` with room for `bytes`, on hugepages when
    /// `hugepage_bytes` is given and the kernel can back it, else 4 KiB pages.
    pub fn create(job: u32, bytes: u64, hugepage_bytes: Option<u64>) -> Result<Self, ArenaError> {
        if let Some(huge) = hugepage_bytes {
            match Self::create_with(job, bytes.next_multiple_of(huge), huge, true) {
                Ok(arena) => return Ok(arena),
                Err(err) => tracing::warn!(job, %err, "hugepage arena failed; using 4 KiB pages"),
            }
        }
        Self::create_with(job, bytes.next_multiple_of(BUFFER_ALIGN), 4096, false)
    }

    fn create_with(job: u32, bytes: u64, page: u64, huge: bool) -> Result<Self, ArenaError> {
        let err = |call| move |source| ArenaError::Create { job, call, source };
        let mut flags = MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING;
        if huge {
            flags |= MemFdCreateFlag::MFD_HUGETLB;
        }
        let fd = memfd_create(c"lifl-arena", flags).map_err(err("memfd_create"))?;
        let len = i64::try_from(bytes).map_err(|_| err("size")(nix::Error::EFBIG))?;
        nix::unistd::ftruncate(&fd, len).map_err(err("ftruncate"))?;
        // Allocate every page now: a first write into a fresh memfd costs
        // several times a write into a populated one.
        fallocate(fd.as_raw_fd(), FallocateFlags::empty(), 0, len).map_err(err("fallocate"))?;
        // No process that maps the arena may resize it under the others.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(fd.as_raw_fd(), FcntlArg::F_ADD_SEALS(seals)).map_err(err("fcntl(F_ADD_SEALS)"))?;

        let map = ArenaMap::initialise(fd.as_fd(), job, page as u32)?;
        let allocator = RangeAllocator::new(ARENA_HEADER_BYTES, bytes - ARENA_HEADER_BYTES);
        Ok(Self {
            job,
            fd,
            map,
            page_bytes: page,
            allocator,
            buffers: HashMap::new(),
        })
    }

    /// The memfd, to pass to a process of this job.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The sidecar's own mapping.
    pub fn map(&self) -> &ArenaMap {
        &self.map
    }

    /// The job this arena belongs to.
    pub fn job(&self) -> u32 {
        self.job
    }

    /// Total size, header included.
    pub fn len(&self) -> u64 {
        self.map.len()
    }

    /// Always false: an arena holds at least its header.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Page size backing the arena.
    pub fn page_bytes(&self) -> u64 {
        self.page_bytes
    }

    /// Bytes held by live buffers.
    pub fn used_bytes(&self) -> u64 {
        self.buffers.values().map(|b| b.len).sum()
    }

    /// Live buffers.
    pub fn buffers(&self) -> usize {
        self.buffers.len()
    }

    /// Allocates a buffer of at least `len` bytes with one reference, and
    /// returns its offset.
    pub fn alloc(&mut self, len: u64) -> Result<u64, ArenaError> {
        let capacity = self.allocator.capacity;
        if len == 0 || len > capacity {
            return Err(ArenaError::BadSize {
                requested: len,
                capacity,
            });
        }
        let rounded = len.next_multiple_of(BUFFER_ALIGN);
        let offset = self.allocator.take(rounded).ok_or(ArenaError::Full {
            requested: rounded,
            free: self.allocator.free_bytes(),
            fragments: self.allocator.free.len(),
        })?;
        self.buffers.insert(
            offset,
            Buffer {
                len: rounded,
                refs: 1,
            },
        );
        Ok(offset)
    }

    /// Adds a reference to the live buffer at `offset`.
    pub fn retain(&mut self, offset: u64) -> bool {
        match self.buffers.get_mut(&offset) {
            Some(buffer) => {
                buffer.refs += 1;
                true
            }
            None => false,
        }
    }

    /// Drops a reference to the buffer at `offset`, freeing it with its last.
    pub fn release(&mut self, offset: u64) {
        let Some(buffer) = self.buffers.get_mut(&offset) else {
            tracing::error!(
                job = self.job,
                offset,
                "release of an unknown buffer ignored"
            );
            return;
        };
        buffer.refs -= 1;
        if buffer.refs == 0 {
            let len = buffer.len;
            self.buffers.remove(&offset);
            self.allocator.give_back(offset, len);
        }
    }
}

/// First-fit allocator over one contiguous range, coalescing on free.
#[derive(Debug)]
struct RangeAllocator {
    /// Free ranges: offset to length, never adjacent to each other.
    free: BTreeMap<u64, u64>,
    capacity: u64,
}

impl RangeAllocator {
    fn new(start: u64, len: u64) -> Self {
        Self {
            free: BTreeMap::from([(start, len)]),
            capacity: len,
        }
    }

    fn free_bytes(&self) -> u64 {
        self.free.values().sum()
    }

    fn take(&mut self, len: u64) -> Option<u64> {
        let (&offset, &free_len) = self.free.iter().find(|&(_, &free_len)| free_len >= len)?;
        self.free.remove(&offset);
        if free_len > len {
            self.free.insert(offset + len, free_len - len);
        }
        Some(offset)
    }

    fn give_back(&mut self, mut offset: u64, mut len: u64) {
        // Merge with the free range that ends where this one starts...
        if let Some((&prev, &prev_len)) = self.free.range(..offset).next_back() {
            if prev + prev_len == offset {
                self.free.remove(&prev);
                offset = prev;
                len += prev_len;
            }
        }
        // ...and with the one that starts where this one ends.
        if let Some(next_len) = self.free.remove(&(offset + len)) {
            len += next_len;
        }
        self.free.insert(offset, len);
    }
}

/// Size of a hugepage the kernel can back an arena of `bytes` with right now,
/// read from `/proc/meminfo`; `None` when too few are free.
pub fn usable_hugepage_bytes(bytes: u64) -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    let page = field("Hugepagesize:")? * 1024;
    let free = field("HugePages_Free:")?;
    (page > 0 && free * page >= bytes.next_multiple_of(page)).then_some(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_ranges_coalesce_so_the_whole_space_can_be_taken_again() {
        let mut alloc = RangeAllocator::new(4096, 4 * 4096);
        let a = alloc.take(4096).unwrap();
        let b = alloc.take(4096).unwrap();
        let c = alloc.take(2 * 4096).unwrap();
        assert_eq!((a, b, c), (4096, 8192, 12288));
        assert_eq!(alloc.take(4096), None);

        alloc.give_back(b, 4096);
        alloc.give_back(a, 4096);
        alloc.give_back(c, 2 * 4096);
        assert_eq!(alloc.free.len(), 1);
        assert_eq!(alloc.take(4 * 4096), Some(4096));
    }

    #[test]
    fn a_buffer_is_freed_with_its_last_reference() {
        let mut arena = Arena::create(1, 64 * 1024, None).unwrap();
        let offset = arena.alloc(100).unwrap();
        assert_eq!(offset % BUFFER_ALIGN, 0);
        assert!(arena.retain(offset));
        arena.release(offset);
        assert_eq!(arena.used_bytes(), 4096);
        arena.release(offset);
        assert_eq!(arena.used_bytes(), 0);
        assert_eq!(arena.buffers(), 0);
    }

    #[test]
    fn exhaustion_is_a_clear_error_and_release_makes_room() {
        let mut arena = Arena::create(1, 4 * 4096, None).unwrap();
        let first = arena.alloc(3 * 4096).unwrap();
        let err = arena.alloc(4096).unwrap_err();
        assert!(
            matches!(
                err,
                ArenaError::Full {
                    requested: 4096,
                    free: 0,
                    ..
                }
            ),
            "{err}"
        );
        arena.release(first);
        assert!(arena.alloc(4096).is_ok());
        assert!(matches!(arena.alloc(0), Err(ArenaError::BadSize { .. })));
    }

    #[test]
    fn the_arena_is_sealed_against_resizing() {
        let arena = Arena::create(1, 64 * 1024, None).unwrap();
        let file = std::fs::File::from(arena.fd().try_clone_to_owned().unwrap());
        assert!(
            file.set_len(4096).is_err(),
            "a process must not shrink the arena"
        );
        assert_eq!(file.metadata().unwrap().len(), 64 * 1024);
    }
}

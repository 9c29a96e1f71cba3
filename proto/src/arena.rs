//! The shared-memory arena's header and the checked mapping every process
//! reads and writes buffers through.
//!
//! A job's arena is one memfd owned by the sidecar. Its first page holds an
//! [`ArenaHeader`] that readers check before trusting anything else; buffers
//! follow, each aligned to [`BUFFER_ALIGN`]. Only offsets cross process
//! boundaries, and every offset is bounds-checked here against the mapping, so
//! a forged descriptor can at worst name bytes of its own job's arena.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use bytemuck::{Pod, Zeroable};

/// `"LIFLAREN"` read as a little-endian `u64`.
pub const ARENA_MAGIC: u64 = u64::from_le_bytes(*b"LIFLAREN");
/// Header layout version; a mapper refuses any other.
pub const ARENA_VERSION: u32 = 1;
/// Bytes reserved for the header at the start of the arena.
pub const ARENA_HEADER_BYTES: u64 = 4096;
/// Every buffer starts at a multiple of this, so `f32` views are aligned and
/// no two buffers share a page.
pub const BUFFER_ALIGN: u64 = 4096;

/// The first bytes of every arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
#[repr(C)]
pub struct ArenaHeader {
    /// [`ARENA_MAGIC`].
    pub magic: u64,
    /// [`ARENA_VERSION`].
    pub version: u32,
    /// Size of the page backing the arena (4 KiB or a hugepage size).
    pub page_bytes: u32,
    /// Total size of the arena, header included.
    pub arena_bytes: u64,
    /// Job the arena belongs to.
    pub job: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// What is wrong with an arena mapping or a range inside it.
#[derive(Debug, thiserror::Error)]
pub enum ArenaError {
    /// `fstat` or `mmap` failed.
    #[error("{call} arena: {source}")]
    Sys {
        /// The failing call.
        call: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is smaller than a header or the header does not check out.
    #[error("arena header invalid: {0}")]
    BadHeader(String),
    /// A range does not lie inside the arena's buffer space.
    #[error("range {offset}+{len} lies outside the arena of {arena_bytes} bytes")]
    OutOfBounds {
        /// Requested offset.
        offset: u64,
        /// Requested length.
        len: u64,
        /// Size of the arena.
        arena_bytes: u64,
    },
}

/// A shared, read-write mapping of a whole arena, unmapped on drop.
#[derive(Debug)]
pub struct ArenaMap {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain shared memory with no thread affinity; the
// pointer is only dereferenced through bounds-checked slices.
unsafe impl Send for ArenaMap {}
// SAFETY: as above; `&ArenaMap` hands out only shared slices safely, and the
// one mutable accessor is `unsafe` with its exclusivity contract stated.
unsafe impl Sync for ArenaMap {}

impl ArenaMap {
    /// Maps the arena behind `fd` and checks its header, and that it belongs
    /// to `job` when one is given.
    ///
    /// Page tables are filled on demand, not up front: a short-lived
    /// aggregator touches a few buffers of an arena that may be gigabytes,
    /// and populating all of it cost seconds per process on 4 KiB pages.
    /// Writers populate what they allocate ([`ArenaMap::populate_for_write`]);
    /// readers fault in sixteen pages at a time (the kernel's fault-around).
    pub fn open(fd: BorrowedFd<'_>, job: Option<u32>) -> Result<Self, ArenaError> {
        let map = Self::map_whole(fd)?;
        map.check_header(job)?;
        Ok(map)
    }

    /// Maps a freshly sized arena and writes its header; for the sidecar,
    /// which creates arenas.
    pub fn initialise(fd: BorrowedFd<'_>, job: u32, page_bytes: u32) -> Result<Self, ArenaError> {
        let map = Self::map_whole(fd)?;
        let header = ArenaHeader {
            magic: ARENA_MAGIC,
            version: ARENA_VERSION,
            page_bytes,
            arena_bytes: map.len as u64,
            job,
            reserved: 0,
        };
        // SAFETY: the sidecar has just created the memfd and handed it to no
        // one, so nothing else reads or writes the header range yet.
        let head = unsafe { map.bytes_mut(0, std::mem::size_of::<ArenaHeader>() as u64)? };
        head.copy_from_slice(bytemuck::bytes_of(&header));
        Ok(map)
    }

    fn map_whole(fd: BorrowedFd<'_>) -> Result<Self, ArenaError> {
        let sys = |call| move |source| ArenaError::Sys { call, source };
        let len = file_len(fd).map_err(sys("fstat"))?;
        if len < ARENA_HEADER_BYTES as usize {
            return Err(ArenaError::BadHeader(format!(
                "file is {len} bytes, below one header"
            )));
        }

        // SAFETY: a fresh mapping at an address the kernel picks aliases no
        // Rust object; `len` is the file's size, so every byte is backed.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(sys("mmap")(std::io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).expect("mmap never returns null on success");
        Ok(Self { ptr, len })
    }

    fn check_header(&self, job: Option<u32>) -> Result<(), ArenaError> {
        let raw = self.bytes(0, std::mem::size_of::<ArenaHeader>() as u64)?;
        let header: ArenaHeader = bytemuck::pod_read_unaligned(raw);
        let bad = |why: String| Err(ArenaError::BadHeader(why));
        if header.magic != ARENA_MAGIC {
            return bad(format!("magic {:#x}", header.magic));
        }
        if header.version != ARENA_VERSION {
            return bad(format!(
                "version {}, expected {ARENA_VERSION}",
                header.version
            ));
        }
        if header.arena_bytes != self.len as u64 {
            return bad(format!(
                "says {} bytes, file has {}",
                header.arena_bytes, self.len
            ));
        }
        match job {
            Some(job) if job != header.job => bad(format!("job {}, expected {job}", header.job)),
            _ => Ok(()),
        }
    }

    /// Fills the page tables of `offset..offset + len` for writing, in one
    /// call instead of one fault per page. Best effort: on a kernel without
    /// `MADV_POPULATE_WRITE` (before 5.14) the pages fault in as written.
    pub fn populate_for_write(&self, offset: u64, len: u64) -> Result<(), ArenaError> {
        let range = self.check_range(offset, len)?;
        let page = 4096usize;
        let start = range.start / page * page;
        let end = range.end.div_ceil(page).saturating_mul(page).min(self.len);
        if end <= start {
            return Ok(());
        }
        // SAFETY: `start..end` lies inside the live mapping (page-rounded
        // within its length); populating changes no byte of it.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_POPULATE_WRITE,
            );
        }
        Ok(())
    }

    /// Size of the whole arena in bytes, header included.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Always false: an arena holds at least its header.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `offset..offset + len` lies inside the mapping.
    pub fn check_range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, ArenaError> {
        let out = || ArenaError::OutOfBounds {
            offset,
            len,
            arena_bytes: self.len as u64,
        };
        let end = offset.checked_add(len).ok_or_else(out)?;
        if end > self.len as u64 {
            return Err(out());
        }
        Ok(offset as usize..end as usize)
    }

    /// The bytes at `offset..offset + len`, read in place.
    ///
    /// Another process of the same job may write the same range only if the
    /// platform's ownership protocol is broken (a buffer has one writer, its
    /// allocator, before it is first sent); such a peer can change the values
    /// read but never the bounds.
    pub fn bytes(&self, offset: u64, len: u64) -> Result<&[u8], ArenaError> {
        let range = self.check_range(offset, len)?;
        // SAFETY: the range was bounds-checked against the live mapping,
        // which outlives the returned borrow of `self`.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(range.start), range.len()) })
    }

    /// The bytes at `offset..offset + len`, writable in place.
    ///
    /// # Safety
    ///
    /// No other slice of this range may be alive in this process while the
    /// returned one is, and the caller must hold the only reference the
    /// sidecar issued for the buffer (so no other process writes it either).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self, offset: u64, len: u64) -> Result<&mut [u8], ArenaError> {
        let range = self.check_range(offset, len)?;
        // SAFETY: bounds-checked as in `bytes`; exclusivity is the caller's
        // contract above.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(range.start), range.len())
        })
    }
}

impl Drop for ArenaMap {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe a mapping this value created and owns;
        // every borrow of it ended with the borrow of `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

fn file_len(fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    let file = std::fs::File::from(fd.try_clone_to_owned()?);
    let len = file.metadata()?.len();
    usize::try_from(len).map_err(|_| std::io::Error::other("arena larger than the address space"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    fn arena_file(bytes: u64) -> std::fs::File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(bytes).unwrap();
        file
    }

    #[test]
    fn a_second_mapping_sees_the_header_and_the_bytes_written_through_the_first() {
        let file = arena_file(64 * 1024);
        let writer = ArenaMap::initialise(file.as_fd(), 7, 4096).unwrap();
        // SAFETY: the test holds the only slice of this range.
        unsafe { writer.bytes_mut(8192, 4).unwrap() }.copy_from_slice(&[1, 2, 3, 4]);

        let reader = ArenaMap::open(file.as_fd(), Some(7)).unwrap();
        assert_eq!(reader.bytes(8192, 4).unwrap(), &[1, 2, 3, 4]);
        assert!(matches!(
            ArenaMap::open(file.as_fd(), Some(8)),
            Err(ArenaError::BadHeader(_))
        ));
    }

    #[test]
    fn ranges_outside_the_arena_are_refused_without_overflow() {
        let file = arena_file(16 * 1024);
        let map = ArenaMap::initialise(file.as_fd(), 1, 4096).unwrap();
        assert!(map.bytes(16 * 1024 - 4, 4).is_ok());
        assert!(matches!(
            map.bytes(16 * 1024 - 4, 5),
            Err(ArenaError::OutOfBounds { .. })
        ));
        assert!(matches!(
            map.bytes(u64::MAX, 2),
            Err(ArenaError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn a_file_without_a_header_is_refused() {
        let file = arena_file(8192);
        assert!(matches!(
            ArenaMap::open(file.as_fd(), None),
            Err(ArenaError::BadHeader(_))
        ));
    }
}

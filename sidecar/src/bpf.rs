//! The one module that talks to libbpf: it opens the embedded SK_MSG object,
//! loads and attaches it, and reads and writes its maps.
//!
//! Each libbpf object has one owning handle here, freed on drop, and the
//! handle's type says how far it got: [`OpenedObject`] (maps still resizable),
//! [`LoadedObject`] (verified by the kernel), [`SkMsgRouter`] (attached to the
//! socket map). Every C return code goes through one converter that names the
//! failing call; a verifier rejection keeps the verifier's log.
//!
//! # Kernel requirements
//!
//! Linux 5.x or later with BTF-style maps, `BPF_MAP_TYPE_SOCKHASH` and the
//! `BPF_SK_MSG_VERDICT` attach type; CAP_BPF and CAP_NET_ADMIN (or
//! CAP_SYS_ADMIN). Nothing is pinned: every object disappears with the process.

use std::ffi::{c_char, c_int, CStr};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::ptr::NonNull;

use bytemuck::Pod;

/// The compiled `bpf-c/sk_msg_route.c`, aligned for libbpf's ELF parser.
static SK_MSG_OBJECT: &AlignedObject<[u8]> = &AlignedObject(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/sk_msg_route.bpf.o"
)));

#[repr(C, align(8))]
struct AlignedObject<T: ?Sized>(T);

/// Bytes kept for the verifier's log of a rejected program.
const VERIFIER_LOG_BYTES: usize = 1 << 20;

/// A libbpf or bpf(2) call that failed.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}{}", log_suffix(.verifier_log))]
pub struct BpfError {
    /// The failing call.
    pub call: &'static str,
    /// The errno it reported.
    pub source: std::io::Error,
    /// The kernel verifier's log, when the failure was a program load.
    pub verifier_log: Option<String>,
}

fn log_suffix(log: &Option<String>) -> String {
    match log {
        Some(log) if !log.is_empty() => format!("\nverifier log:\n{log}"),
        _ => String::new(),
    }
}

impl BpfError {
    /// Whether the call failed for want of privileges, not a defect.
    pub fn is_permission(&self) -> bool {
        matches!(self.source.raw_os_error(), Some(libc::EPERM | libc::EACCES))
    }
}

/// Converts a libbpf return code (negative errno) into a result naming `call`.
fn check(call: &'static str, rc: c_int) -> Result<c_int, BpfError> {
    if rc >= 0 {
        return Ok(rc);
    }
    // libbpf 1.x returns -errno and also sets errno; trust the return code.
    let source = std::io::Error::from_raw_os_error(-rc);
    Err(BpfError {
        call,
        source,
        verifier_log: None,
    })
}

/// A pointer-returning libbpf call: NULL means failure, with errno set.
fn check_ptr<T>(call: &'static str, ptr: *mut T) -> Result<NonNull<T>, BpfError> {
    NonNull::new(ptr).ok_or_else(|| BpfError {
        call,
        source: std::io::Error::last_os_error(),
        verifier_log: None,
    })
}

/// The owning handle of one `struct bpf_object`.
struct Object {
    ptr: NonNull<libbpf_sys::bpf_object>,
    // libbpf writes a rejected program's log here; it must outlive `ptr`.
    log: Box<[u8]>,
}

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from bpf_object__open_mem and is closed only
        // here; closing also frees its maps, programs and attachments.
        unsafe { libbpf_sys::bpf_object__close(self.ptr.as_ptr()) };
    }
}

// SAFETY: a bpf_object has no thread affinity; all access goes through
// `&mut self` (setup) or plain bpf(2) syscalls on fds (runtime), which the
// kernel serialises per map.
unsafe impl Send for Object {}
// SAFETY: after attach only fds are used, through syscalls that are safe to
// issue concurrently.
unsafe impl Sync for Object {}

impl Object {
    fn map(&self, name: &CStr) -> Result<NonNull<libbpf_sys::bpf_map>, BpfError> {
        // SAFETY: the object is alive and `name` is NUL-terminated.
        let map =
            unsafe { libbpf_sys::bpf_object__find_map_by_name(self.ptr.as_ptr(), name.as_ptr()) };
        NonNull::new(map).ok_or_else(|| missing("bpf_object__find_map_by_name"))
    }

    fn verifier_log(&self) -> String {
        let end = self
            .log
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.log.len());
        String::from_utf8_lossy(&self.log[..end])
            .trim_end()
            .to_owned()
    }
}

fn missing(call: &'static str) -> BpfError {
    BpfError {
        call,
        source: std::io::Error::from_raw_os_error(libc::ENOENT),
        verifier_log: None,
    }
}

/// The SK_MSG object parsed from memory, not yet in the kernel.
pub struct OpenedObject(Object);

impl std::fmt::Debug for OpenedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OpenedObject")
    }
}

impl OpenedObject {
    /// Parses the embedded `sk_msg_route` object.
    pub fn open() -> Result<Self, BpfError> {
        Self::open_mem(SK_MSG_OBJECT)
    }

    fn open_mem(object: &'static AlignedObject<[u8]>) -> Result<Self, BpfError> {
        // libbpf's own warnings would go to stderr unstructured; every
        // failure is reported through `BpfError` instead.
        // SAFETY: passing None installs no callback.
        unsafe { libbpf_sys::libbpf_set_print(None) };

        let mut log = vec![0u8; VERIFIER_LOG_BYTES].into_boxed_slice();
        let opts = libbpf_sys::bpf_object_open_opts {
            sz: std::mem::size_of::<libbpf_sys::bpf_object_open_opts>() as libbpf_sys::size_t,
            object_name: c"lifl_sk_msg".as_ptr(),
            kernel_log_buf: log.as_mut_ptr().cast::<c_char>(),
            kernel_log_size: log.len() as libbpf_sys::size_t,
            ..Default::default()
        };
        let bytes = &object.0;
        // SAFETY: `bytes` is a static, 8-byte aligned ELF image; libbpf copies
        // what it needs. `opts` and the log buffer it points to outlive the
        // call, and the log buffer is kept alive with the object.
        let ptr = unsafe {
            libbpf_sys::bpf_object__open_mem(bytes.as_ptr().cast(), bytes.len() as _, &opts)
        };
        let ptr = check_ptr("bpf_object__open_mem", ptr)?;
        Ok(Self(Object { ptr, log }))
    }

    /// Sizes the `refs` map: the most buffer references alive at once.
    pub fn set_max_refs(&mut self, max_refs: u32) -> Result<(), BpfError> {
        let map = self.0.map(c"refs")?;
        // SAFETY: the map belongs to this opened, not yet loaded, object.
        check("bpf_map__set_max_entries", unsafe {
            libbpf_sys::bpf_map__set_max_entries(map.as_ptr(), max_refs)
        })?;
        Ok(())
    }

    /// Creates the maps and loads the program through the verifier.
    pub fn load(self) -> Result<LoadedObject, BpfError> {
        // SAFETY: the object is open and owned by `self`.
        let rc = unsafe { libbpf_sys::bpf_object__load(self.0.ptr.as_ptr()) };
        match check("bpf_object__load", rc) {
            Ok(_) => Ok(LoadedObject(self.0)),
            Err(mut err) => {
                let log = self.0.verifier_log();
                err.verifier_log = (!log.is_empty()).then_some(log);
                Err(err)
            }
        }
    }
}

/// The object with its maps created and its program verified.
pub struct LoadedObject(Object);

impl std::fmt::Debug for LoadedObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadedObject")
    }
}

impl LoadedObject {
    /// Attaches `sk_msg_route` to the `endpoint_socks` map as its SK_MSG
    /// verdict program.
    pub fn attach(self) -> Result<SkMsgRouter, BpfError> {
        let obj = self.0;
        // SAFETY: the object is loaded; the name is NUL-terminated.
        let prog = unsafe {
            libbpf_sys::bpf_object__find_program_by_name(obj.ptr.as_ptr(), c"sk_msg_route".as_ptr())
        };
        let prog = NonNull::new(prog).ok_or_else(|| missing("bpf_object__find_program_by_name"))?;
        // SAFETY: `prog` belongs to the loaded object.
        let prog_fd = check("bpf_program__fd", unsafe {
            libbpf_sys::bpf_program__fd(prog.as_ptr())
        })?;

        let maps = Maps {
            socks: map_fd(&obj, c"endpoint_socks")?,
            endpoints: map_fd(&obj, c"endpoints")?,
            sender_ports: map_fd(&obj, c"sender_ports")?,
            refs: map_fd(&obj, c"refs")?,
            route_stats: map_fd(&obj, c"route_stats")?,
        };
        // SAFETY: both fds are live and owned by `obj`.
        check("bpf_prog_attach", unsafe {
            libbpf_sys::bpf_prog_attach(prog_fd, maps.socks.fd, libbpf_sys::BPF_SK_MSG_VERDICT, 0)
        })?;

        // SAFETY: a plain query with no arguments.
        let cpus = check("libbpf_num_possible_cpus", unsafe {
            libbpf_sys::libbpf_num_possible_cpus()
        })?;
        Ok(SkMsgRouter {
            maps,
            cpus: cpus as usize,
            _obj: obj,
        })
    }
}

fn map_fd(obj: &Object, name: &CStr) -> Result<MapFd, BpfError> {
    let map = obj.map(name)?;
    // SAFETY: `map` belongs to the loaded object, which outlives the fd's use.
    let (fd, key, value) = unsafe {
        (
            libbpf_sys::bpf_map__fd(map.as_ptr()),
            libbpf_sys::bpf_map__key_size(map.as_ptr()),
            libbpf_sys::bpf_map__value_size(map.as_ptr()),
        )
    };
    Ok(MapFd {
        fd: check("bpf_map__fd", fd)?,
        key_size: key as usize,
        value_size: value as usize,
    })
}

/// One map's fd and the sizes every access is checked against.
#[derive(Debug, Clone, Copy)]
struct MapFd {
    fd: RawFd,
    key_size: usize,
    value_size: usize,
}

#[derive(Debug)]
struct Maps {
    socks: MapFd,
    endpoints: MapFd,
    sender_ports: MapFd,
    refs: MapFd,
    route_stats: MapFd,
}

/// The maps of the attached router that the sidecar reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Map {
    /// Endpoint id to `struct lifl_endpoint`.
    Endpoints,
    /// Client socket local port to `struct lifl_sender`.
    SenderPorts,
    /// Ref slot to `struct lifl_ref`.
    Refs,
    /// Endpoint id to per-CPU `struct lifl_route_stats`.
    RouteStats,
}

/// The SK_MSG router, loaded and attached; detached and freed on drop.
pub struct SkMsgRouter {
    maps: Maps,
    cpus: usize,
    _obj: Object,
}

impl std::fmt::Debug for SkMsgRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkMsgRouter")
            .field("maps", &self.maps)
            .finish_non_exhaustive()
    }
}

impl SkMsgRouter {
    /// Opens, loads and attaches the embedded router in one step.
    pub fn load(max_refs: u32) -> Result<Self, BpfError> {
        let mut opened = OpenedObject::open()?;
        opened.set_max_refs(max_refs)?;
        opened.load()?.attach()
    }

    fn fd(&self, map: Map) -> MapFd {
        match map {
            Map::Endpoints => self.maps.endpoints,
            Map::SenderPorts => self.maps.sender_ports,
            Map::Refs => self.maps.refs,
            Map::RouteStats => self.maps.route_stats,
        }
    }

    /// Puts an endpoint's connected TCP socket into `endpoint_socks`.
    pub fn insert_socket(&self, endpoint: u32, socket: BorrowedFd<'_>) -> Result<(), BpfError> {
        let value = socket.as_raw_fd() as u64;
        self.update_raw(
            self.maps.socks,
            &endpoint,
            bytemuck::bytes_of(&value),
            Values::One,
        )
    }

    /// Takes an endpoint's socket out of `endpoint_socks`; absent is fine.
    pub fn remove_socket(&self, endpoint: u32) -> Result<(), BpfError> {
        self.delete_raw(self.maps.socks, &endpoint)
    }

    /// Endpoint ids whose sockets are in `endpoint_socks` right now.
    pub fn socket_endpoints(&self) -> Result<Vec<u32>, BpfError> {
        self.keys(self.maps.socks)
    }

    /// Writes `value` under `key` (create or replace).
    pub fn update<K: Pod, V: Pod>(&self, map: Map, key: &K, value: &V) -> Result<(), BpfError> {
        self.update_raw(self.fd(map), key, bytemuck::bytes_of(value), Values::One)
    }

    /// Deletes `key`; absent is fine.
    pub fn delete<K: Pod>(&self, map: Map, key: &K) -> Result<(), BpfError> {
        self.delete_raw(self.fd(map), key)
    }

    /// Reads the value under `key`, `None` when absent.
    pub fn lookup<K: Pod, V: Pod>(&self, map: Map, key: &K) -> Result<Option<V>, BpfError> {
        let map = self.fd(map);
        let mut value = V::zeroed();
        assert_sizes(map, std::mem::size_of::<K>(), std::mem::size_of::<V>());
        // SAFETY: key and value buffers have exactly the map's sizes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(
                map.fd,
                (key as *const K).cast(),
                (&mut value as *mut V).cast(),
            )
        };
        match check("bpf_map_lookup_elem", rc) {
            Ok(_) => Ok(Some(value)),
            Err(err) if err.source.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Reads a per-CPU value and folds the CPUs' copies with `+=`.
    pub fn lookup_percpu_sum<K: Pod, V: Pod + std::ops::AddAssign>(
        &self,
        map: Map,
        key: &K,
    ) -> Result<Option<V>, BpfError> {
        let map = self.fd(map);
        let stride = map.value_size.next_multiple_of(8);
        assert_sizes(map, std::mem::size_of::<K>(), std::mem::size_of::<V>());
        let mut buf = vec![0u8; self.percpu_bytes(map)];
        // SAFETY: the key has the map's key size; `buf` holds one value
        // stride for each possible CPU, as the kernel writes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(
                map.fd,
                (key as *const K).cast(),
                buf.as_mut_ptr().cast(),
            )
        };
        match check("bpf_map_lookup_elem", rc) {
            Ok(_) => {}
            Err(err) if err.source.raw_os_error() == Some(libc::ENOENT) => return Ok(None),
            Err(err) => return Err(err),
        }
        let mut sum = V::zeroed();
        for cpu in buf.chunks_exact(stride) {
            sum += bytemuck::pod_read_unaligned::<V>(&cpu[..map.value_size]);
        }
        Ok(Some(sum))
    }

    /// Writes the zero value under `key` of a per-CPU map, on every CPU.
    pub fn zero_percpu<K: Pod>(&self, map: Map, key: &K) -> Result<(), BpfError> {
        let map = self.fd(map);
        let zeros = vec![0u8; self.percpu_bytes(map)];
        self.update_raw(map, key, &zeros, Values::PerCpu)
    }

    /// Bytes the kernel reads or writes for one key of a per-CPU map: one
    /// value per possible CPU, at 8-byte strides.
    fn percpu_bytes(&self, map: MapFd) -> usize {
        map.value_size.next_multiple_of(8) * self.cpus
    }

    fn update_raw<K: Pod>(
        &self,
        map: MapFd,
        key: &K,
        value: &[u8],
        values: Values,
    ) -> Result<(), BpfError> {
        let expected = match values {
            Values::One => map.value_size,
            Values::PerCpu => self.percpu_bytes(map),
        };
        assert_sizes(map, std::mem::size_of::<K>(), map.value_size);
        assert_eq!(
            value.len(),
            expected,
            "BPF map value buffer has the wrong size"
        );
        // SAFETY: the key has the map's key size and the value buffer holds
        // exactly what the kernel reads for this map.
        check("bpf_map_update_elem", unsafe {
            libbpf_sys::bpf_map_update_elem(
                map.fd,
                (key as *const K).cast(),
                value.as_ptr().cast(),
                libbpf_sys::BPF_ANY as u64,
            )
        })?;
        Ok(())
    }

    fn delete_raw<K: Pod>(&self, map: MapFd, key: &K) -> Result<(), BpfError> {
        assert_sizes(map, std::mem::size_of::<K>(), map.value_size);
        // SAFETY: the key has exactly the map's key size.
        let rc = unsafe { libbpf_sys::bpf_map_delete_elem(map.fd, (key as *const K).cast()) };
        match check("bpf_map_delete_elem", rc) {
            Err(err) if err.source.raw_os_error() != Some(libc::ENOENT) => Err(err),
            _ => Ok(()),
        }
    }

    fn keys(&self, map: MapFd) -> Result<Vec<u32>, BpfError> {
        assert_sizes(map, std::mem::size_of::<u32>(), map.value_size);
        let mut keys = Vec::new();
        let mut next = 0u32;
        let mut prev: Option<u32> = None;
        loop {
            let prev_ptr = prev
                .as_ref()
                .map_or(std::ptr::null(), |k| (k as *const u32).cast());
            // SAFETY: both keys are u32, the map's key size; a null previous
            // key asks for the first key.
            let rc = unsafe {
                libbpf_sys::bpf_map_get_next_key(map.fd, prev_ptr, (&mut next as *mut u32).cast())
            };
            match check("bpf_map_get_next_key", rc) {
                Ok(_) => {
                    keys.push(next);
                    prev = Some(next);
                }
                Err(err) if err.source.raw_os_error() == Some(libc::ENOENT) => return Ok(keys),
                Err(err) => return Err(err),
            }
        }
    }
}

/// How many values one key of a map holds.
#[derive(Debug, Clone, Copy)]
enum Values {
    One,
    PerCpu,
}

/// Every caller passes the `#[repr(C)]` mirror of the map's C type, so a
/// mismatch is a build defect, never input: fail loudly before the syscall
/// could read or write past a buffer.
fn assert_sizes(map: MapFd, key: usize, value: usize) {
    assert_eq!(
        map.key_size, key,
        "BPF map key size differs from its Rust mirror"
    );
    assert_eq!(
        map.value_size, value,
        "BPF map value size differs from its Rust mirror"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A program that reads a message without a bounds check.
    static UNCHECKED_OBJECT: &AlignedObject<[u8]> = &AlignedObject(*include_bytes!(concat!(
        env!("OUT_DIR"),
        "/sk_msg_unchecked.bpf.o"
    )));

    #[test]
    fn a_verifier_rejection_carries_the_verifier_log() {
        let privileged = nix::unistd::geteuid().is_root();
        if !privileged && std::env::var("LIFL_REQUIRE_BPF").as_deref() != Ok("1") {
            eprintln!("skipping: loading BPF programs needs root");
            return;
        }
        let err = OpenedObject::open_mem(UNCHECKED_OBJECT)
            .unwrap()
            .load()
            .unwrap_err();
        assert_eq!(err.call, "bpf_object__load");
        let log = err.verifier_log.as_deref().unwrap_or_default();
        assert!(
            log.contains("invalid access to packet"),
            "verifier log: {log:?}"
        );
        assert!(err.to_string().contains("verifier log:"), "{err}");
    }

    #[test]
    fn the_router_loads_and_its_maps_have_the_mirrored_sizes() {
        let privileged = nix::unistd::geteuid().is_root();
        if !privileged && std::env::var("LIFL_REQUIRE_BPF").as_deref() != Ok("1") {
            eprintln!("skipping: loading BPF programs needs root");
            return;
        }
        let router = SkMsgRouter::load(128).unwrap();
        let slot = 7u32;
        let entry = lifl_proto::descriptor::RefEntry {
            holder: 3,
            gen: 1,
            job: 2,
            flags: 0,
            offset: 4096,
            len: 64,
        };
        router.update(Map::Refs, &slot, &entry).unwrap();
        assert_eq!(router.lookup(Map::Refs, &slot).unwrap(), Some(entry));
        assert!(
            router.update(Map::Refs, &128u32, &entry).is_err(),
            "the refs map was sized to 128"
        );

        router.zero_percpu(Map::RouteStats, &3u32).unwrap();
        let stats: Option<lifl_proto::descriptor::RouteStats> =
            router.lookup_percpu_sum(Map::RouteStats, &3u32).unwrap();
        assert_eq!(stats, Some(Default::default()));
        assert!(router.socket_endpoints().unwrap().is_empty());
    }
}

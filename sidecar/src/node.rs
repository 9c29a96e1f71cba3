//! The sidecar's bookkeeping for one node: registered endpoints, each job's
//! arena, the ref table with its credits, and the judgment of every
//! descriptor that reaches the sidecar instead of its destination.
//!
//! No socket I/O happens here, so the rules are testable without processes:
//! the server feeds requests in and carries the answers out. The routing
//! state the kernel shares lives behind [`Routes`]; everything else is under
//! one mutex, held for microseconds and never across an await.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use lifl_proto::control::{
    EndpointStats, ErrorCode, Grant, JobStats, RefuseReason, Reply, SidecarStats,
};
use lifl_proto::descriptor::{DescError, Descriptor, RefEntry, RouteStats, DESC_SIZE};
use tokio::sync::mpsc;

use crate::arena::{usable_hugepage_bytes, Arena, ArenaError};
use crate::routes::Routes;

/// Limits that keep a node's memory bounded.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Size of each job's arena, header included.
    pub arena_bytes: u64,
    /// Most live references one endpoint may have allocated or shared.
    pub endpoint_credit: u64,
    /// Slots in the ref table: the most references alive at once.
    pub max_refs: u32,
    /// Back arenas with hugepages when enough are free.
    pub hugepages: bool,
    /// Most endpoints registered at once.
    pub max_endpoints: usize,
    /// Most jobs with an arena at once.
    pub max_jobs: usize,
}

/// A request the node refused, with the code the endpoint sees.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct NodeError {
    /// What went wrong, for programs.
    pub code: ErrorCode,
    /// What went wrong, for people.
    pub message: String,
}

impl NodeError {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

impl From<ArenaError> for NodeError {
    fn from(err: ArenaError) -> Self {
        let code = match err {
            ArenaError::Full { .. } => ErrorCode::ArenaFull,
            ArenaError::BadSize { .. } => ErrorCode::InvalidRequest,
            ArenaError::Create { .. } | ArenaError::Map(_) => ErrorCode::Internal,
        };
        Self::new(code, err.to_string())
    }
}

fn internal(err: impl std::fmt::Display) -> NodeError {
    tracing::error!(%err, "routing state update failed");
    NodeError::new(
        ErrorCode::Internal,
        "the sidecar failed to update its routing state",
    )
}

/// How the sidecar reaches a registered endpoint.
#[derive(Debug, Clone)]
pub struct EndpointLink {
    /// Descriptors the sidecar routes to the endpoint's socket. Unbounded,
    /// yet bounded in practice: each queued descriptor moves one reference,
    /// and references are limited by the ref table.
    pub descriptors: mpsc::UnboundedSender<Descriptor>,
    /// Unasked replies (refusal notices) for the endpoint's control socket;
    /// a full queue drops notices, the refusal is still counted.
    pub notices: mpsc::Sender<Reply>,
}

/// Who is registering, as the server learned it.
#[derive(Debug)]
pub struct Registration<'a> {
    /// Job the endpoint works for.
    pub job: u32,
    /// Its role, for logs and stats.
    pub role: String,
    /// The endpoint id asked for, if any.
    pub endpoint: Option<u32>,
    /// The peer's process id (`SO_PEERCRED`).
    pub pid: i32,
    /// The peer's user id (`SO_PEERCRED`).
    pub uid: u32,
    /// Local port of the endpoint's client socket, which the kernel sees.
    pub client_port: u16,
    /// The endpoint's client socket, to put in the kernel's map.
    pub client: BorrowedFd<'a>,
    /// How to reach the endpoint.
    pub link: EndpointLink,
}

/// What registration hands back to the server.
#[derive(Debug)]
pub struct Registered {
    /// The endpoint id now bound.
    pub endpoint: u32,
    /// Distinguishes this registration from earlier ones of the same id.
    pub incarnation: u64,
    /// A duplicate of the job's arena fd, to pass to the endpoint.
    pub arena_fd: OwnedFd,
    /// Size of that arena.
    pub arena_bytes: u64,
}

/// What to do with a descriptor that reached the sidecar.
#[derive(Debug)]
pub enum Verdict {
    /// Write it to this endpoint's socket; the reference already moved.
    Forward(Descriptor, EndpointLink),
    /// Refused and counted; the sender has been sent a notice.
    Refused(RefuseReason),
}

#[derive(Debug)]
struct EndpointRecord {
    incarnation: u64,
    job: u32,
    role: String,
    pid: i32,
    client_port: u16,
    credit_used: u64,
    link: EndpointLink,
    /// Refusal reasons already logged at `warn` for this endpoint.
    warned: HashSet<RefuseReason>,
}

#[derive(Debug, Clone, Copy)]
struct RefRecord {
    gen: u32,
    job: u32,
    offset: u64,
    len: u64,
    /// Endpoint whose credit the reference uses, and its incarnation.
    origin: (u32, u64),
}

#[derive(Debug, Default)]
struct State {
    endpoints: HashMap<u32, EndpointRecord>,
    next_incarnation: u64,
    arenas: HashMap<u32, Arena>,
    refs: HashMap<u32, RefRecord>,
    free_slots: Vec<u32>,
    gens: Vec<u32>,
    refused: BTreeMap<RefuseReason, u64>,
    routed_by_sidecar: u64,
    /// Kernel counters of endpoints that have left, by job: a job's totals
    /// outlive its short-lived aggregators.
    departed: HashMap<u32, RouteStats>,
    /// An endpoint left since the last sweep, so references may be stranded.
    needs_sweep: bool,
}

/// One node's endpoints, arenas and references.
pub struct Node {
    config: NodeConfig,
    routes: Box<dyn Routes>,
    state: Mutex<State>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node with no endpoints, routing through `routes`.
    pub fn new(config: NodeConfig, routes: Box<dyn Routes>) -> Self {
        let state = State {
            // Pop from the end: slot 0 is issued first.
            free_slots: (0..config.max_refs).rev().collect(),
            gens: vec![0; config.max_refs as usize],
            ..State::default()
        };
        Self {
            config,
            routes,
            state: Mutex::new(state),
        }
    }

    /// The routing state this node writes.
    pub fn routes(&self) -> &dyn Routes {
        self.routes.as_ref()
    }

    /// Whether endpoint `id` is registered now.
    pub fn has_endpoint(&self, id: u32) -> bool {
        self.lock().endpoints.contains_key(&id)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug elsewhere; the state is
        // still the best record of what processes hold.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers an endpoint, creating its job's arena on first use.
    pub fn register(&self, reg: Registration<'_>) -> Result<Registered, NodeError> {
        if reg.job == 0 {
            return Err(NodeError::new(
                ErrorCode::InvalidRequest,
                "job id 0 is reserved",
            ));
        }
        let mut state = self.lock();
        if state.endpoints.len() >= self.config.max_endpoints {
            return Err(NodeError::new(
                ErrorCode::NodeFull,
                format!(
                    "this node serves its limit of {} endpoints",
                    self.config.max_endpoints
                ),
            ));
        }
        if !state.arenas.contains_key(&reg.job) && state.arenas.len() >= self.config.max_jobs {
            return Err(NodeError::new(
                ErrorCode::NodeFull,
                format!(
                    "this node holds arenas for its limit of {} jobs",
                    self.config.max_jobs
                ),
            ));
        }
        let endpoint = match reg.endpoint {
            Some(0) => {
                return Err(NodeError::new(
                    ErrorCode::InvalidRequest,
                    "endpoint id 0 is reserved",
                ))
            }
            Some(id) if state.endpoints.contains_key(&id) => {
                return Err(NodeError::new(
                    ErrorCode::EndpointTaken,
                    format!("endpoint {id} is registered by a live process"),
                ))
            }
            Some(id) => id,
            // The control plane hands out ids counting up from 1; ids the
            // node picks count down from the top, so the two never meet.
            None => (1..=u32::MAX)
                .rev()
                .find(|id| !state.endpoints.contains_key(id))
                .ok_or_else(|| {
                    NodeError::new(ErrorCode::EndpointTaken, "no endpoint id is free")
                })?,
        };

        let arena = match state.arenas.entry(reg.job) {
            Entry::Occupied(arena) => arena.into_mut(),
            Entry::Vacant(slot) => slot.insert(self.create_arena(reg.job)?),
        };
        let arena_fd = arena.fd().try_clone_to_owned().map_err(internal)?;
        let arena_bytes = arena.len();

        self.routes
            .add_endpoint(endpoint, reg.job, reg.client_port, reg.client)
            .map_err(internal)?;
        state.next_incarnation += 1;
        let incarnation = state.next_incarnation;
        state.endpoints.insert(
            endpoint,
            EndpointRecord {
                incarnation,
                job: reg.job,
                role: reg.role.clone(),
                pid: reg.pid,
                client_port: reg.client_port,
                credit_used: 0,
                link: reg.link,
                warned: HashSet::new(),
            },
        );
        let (job, pid, uid) = (reg.job, reg.pid, reg.uid);
        tracing::info!(endpoint, job, role = %reg.role, pid, uid, "endpoint registered");
        Ok(Registered {
            endpoint,
            incarnation,
            arena_fd,
            arena_bytes,
        })
    }

    fn create_arena(&self, job: u32) -> Result<Arena, NodeError> {
        let bytes = self.config.arena_bytes;
        let huge = if self.config.hugepages {
            usable_hugepage_bytes(bytes)
        } else {
            None
        };
        let arena = Arena::create(job, bytes, huge)?;
        tracing::info!(
            job,
            bytes = arena.len(),
            page = arena.page_bytes(),
            "arena created"
        );
        Ok(arena)
    }

    /// Forgets an endpoint whose process went away, and releases every
    /// reference it held. A later registration of the same id is left alone.
    pub fn unregister(&self, endpoint: u32, incarnation: u64) {
        let mut state = self.lock();
        match state.endpoints.get(&endpoint) {
            Some(record) if record.incarnation == incarnation => {}
            _ => return,
        }
        let record = state.endpoints.remove(&endpoint).expect("checked above");
        match self.routes.route_stats(endpoint) {
            Ok(counts) => *state.departed.entry(record.job).or_default() += counts,
            Err(err) => {
                tracing::warn!(endpoint, %err, "kernel counters of a departing endpoint lost")
            }
        }
        if let Err(err) = self.routes.remove_endpoint(endpoint, record.client_port) {
            tracing::error!(endpoint, %err, "could not remove endpoint from the routing maps");
        }
        let released = self.release_where(&mut state, |holder| holder == endpoint);
        state.needs_sweep = true;

        let job = record.job;
        let job_idle = !state.endpoints.values().any(|e| e.job == job)
            && state.arenas.get(&job).is_some_and(|a| a.buffers() == 0);
        if job_idle {
            state.arenas.remove(&job);
            state.departed.remove(&job);
        }
        tracing::info!(endpoint, job, released, "endpoint left");
    }

    /// Releases references whose holder is no longer registered: references
    /// in flight to an endpoint when it died. Returns how many.
    /// Runs only after an endpoint has left; arenas of jobs left with no
    /// endpoint and no buffer are dropped too.
    pub fn sweep_orphans(&self) -> usize {
        let mut state = self.lock();
        if !std::mem::take(&mut state.needs_sweep) {
            return 0;
        }
        let live: HashSet<u32> = state.endpoints.keys().copied().collect();
        let swept = self.release_where(&mut state, |holder| !live.contains(&holder));
        if swept > 0 {
            tracing::warn!(swept, "released references held by departed endpoints");
        }
        let State {
            arenas,
            endpoints,
            departed,
            ..
        } = &mut *state;
        arenas.retain(|job, arena| {
            let idle = arena.buffers() == 0 && !endpoints.values().any(|e| e.job == *job);
            if idle {
                departed.remove(job);
            }
            !idle
        });
        swept
    }

    fn release_where(&self, state: &mut State, mut dead: impl FnMut(u32) -> bool) -> usize {
        let slots: Vec<u32> = state.refs.keys().copied().collect();
        let mut released = 0;
        for slot in slots {
            match self.routes.get_ref(slot) {
                Ok(entry) if dead(entry.holder) => {
                    self.free_slot(state, slot);
                    released += 1;
                }
                Ok(_) => {}
                Err(err) => tracing::error!(slot, %err, "could not read a reference's holder"),
            }
        }
        released
    }

    /// Allocates a buffer of `len` bytes held by `endpoint`.
    pub fn alloc(&self, endpoint: u32, len: u64) -> Result<Grant, NodeError> {
        let mut state = self.lock();
        let (job, origin) = self.charge_credit(&state, endpoint)?;
        let arena = state
            .arenas
            .get_mut(&job)
            .ok_or_else(|| internal("job without arena"))?;
        let offset = arena.alloc(len)?;
        self.issue(
            &mut state,
            RefRecord {
                gen: 0,
                job,
                offset,
                len,
                origin,
            },
            endpoint,
        )
    }

    /// Issues a second reference to a buffer `endpoint` holds.
    pub fn share(&self, endpoint: u32, slot: u32, gen: u32) -> Result<Grant, NodeError> {
        let mut state = self.lock();
        let (job, origin) = self.charge_credit(&state, endpoint)?;
        let held = self.held_ref(&state, endpoint, slot, gen)?;
        let arena = state
            .arenas
            .get_mut(&job)
            .ok_or_else(|| internal("job without arena"))?;
        if !arena.retain(held.offset) {
            return Err(internal("reference to a freed buffer"));
        }
        self.issue(&mut state, RefRecord { origin, ..held }, endpoint)
    }

    /// Gives back references `endpoint` holds; returns how many were not its
    /// to give (stale, or never held), which are left untouched.
    pub fn release(&self, endpoint: u32, refs: &[(u32, u32)]) -> usize {
        let mut state = self.lock();
        let mut refused = 0;
        for &(slot, gen) in refs {
            match self.held_ref(&state, endpoint, slot, gen) {
                Ok(_) => self.free_slot(&mut state, slot),
                Err(err) => {
                    tracing::debug!(endpoint, slot, gen, %err, "release refused");
                    refused += 1;
                }
            }
        }
        refused
    }

    fn charge_credit(&self, state: &State, endpoint: u32) -> Result<(u32, (u32, u64)), NodeError> {
        let record = state
            .endpoints
            .get(&endpoint)
            .ok_or_else(|| internal("unregistered"))?;
        if record.credit_used >= self.config.endpoint_credit {
            return Err(NodeError::new(
                ErrorCode::CreditExhausted,
                format!(
                    "endpoint {endpoint} already has {} live references, its whole credit",
                    record.credit_used
                ),
            ));
        }
        Ok((record.job, (endpoint, record.incarnation)))
    }

    fn held_ref(
        &self,
        state: &State,
        endpoint: u32,
        slot: u32,
        gen: u32,
    ) -> Result<RefRecord, NodeError> {
        let not_held = || {
            NodeError::new(
                ErrorCode::NotHolder,
                format!("reference {slot}/{gen} is not held by endpoint {endpoint}"),
            )
        };
        let record = state
            .refs
            .get(&slot)
            .filter(|r| r.gen == gen)
            .ok_or_else(not_held)?;
        let entry = self.routes.get_ref(slot).map_err(internal)?;
        if entry.holder != endpoint || entry.gen != gen {
            return Err(not_held());
        }
        Ok(*record)
    }

    fn issue(
        &self,
        state: &mut State,
        mut record: RefRecord,
        holder: u32,
    ) -> Result<Grant, NodeError> {
        let Some(slot) = state.free_slots.pop() else {
            if let Some(arena) = state.arenas.get_mut(&record.job) {
                arena.release(record.offset);
            }
            return Err(NodeError::new(
                ErrorCode::RefsExhausted,
                format!("all {} reference slots are in use", self.config.max_refs),
            ));
        };
        let gen = &mut state.gens[slot as usize];
        *gen = gen.wrapping_add(1).max(1);
        record.gen = *gen;

        let entry = RefEntry {
            holder,
            gen: record.gen,
            job: record.job,
            flags: 0,
            offset: record.offset,
            len: record.len,
        };
        if let Err(err) = self.routes.set_ref(slot, entry) {
            state.free_slots.push(slot);
            if let Some(arena) = state.arenas.get_mut(&record.job) {
                arena.release(record.offset);
            }
            return Err(internal(err));
        }
        state.refs.insert(slot, record);
        if let Some(origin) = state.endpoints.get_mut(&record.origin.0) {
            origin.credit_used += 1;
        }
        Ok(Grant {
            slot,
            gen: record.gen,
            offset: record.offset,
            len: record.len,
        })
    }

    fn free_slot(&self, state: &mut State, slot: u32) {
        let Some(record) = state.refs.remove(&slot) else {
            return;
        };
        let cleared = RefEntry {
            gen: record.gen,
            ..RefEntry::default()
        };
        if let Err(err) = self.routes.set_ref(slot, cleared) {
            tracing::error!(slot, %err, "could not clear a released reference");
        }
        state.free_slots.push(slot);
        if let Some(arena) = state.arenas.get_mut(&record.job) {
            arena.release(record.offset);
        }
        let (origin, incarnation) = record.origin;
        if let Some(origin) = state.endpoints.get_mut(&origin) {
            if origin.incarnation == incarnation {
                origin.credit_used -= 1;
            }
        }
    }

    /// Judges a descriptor that `from` wrote and that reached the sidecar:
    /// forwards it when it is valid (user-space routing, or a kernel miss),
    /// otherwise refuses it, counts and logs the reason, frees the reference
    /// if the sender held it, and tells the sender.
    pub fn judge(&self, from: u32, bytes: &[u8]) -> Verdict {
        let mut state = self.lock();
        // Even a malformed descriptor's fields say where it was going, for
        // the notice; none of them is trusted.
        let raw: Option<Descriptor> = bytes.get(..DESC_SIZE).map(bytemuck::pod_read_unaligned);
        let parsed = Descriptor::parse(bytes);
        let outcome = parsed
            .map_err(refuse_reason)
            .and_then(|desc| self.check(&state, from, &desc));
        match outcome {
            Ok(forward) => {
                let desc = forward.desc;
                let entry = RefEntry {
                    holder: desc.dst,
                    ..forward.entry
                };
                match self.routes.set_ref(desc.ref_slot, entry) {
                    Ok(()) => {
                        state.routed_by_sidecar += 1;
                        Verdict::Forward(desc, forward.link)
                    }
                    Err(err) => {
                        tracing::error!(%err, "could not move a reference; descriptor refused");
                        self.refuse(&mut state, from, parsed.ok(), raw, RefuseReason::NotHolder)
                    }
                }
            }
            Err(reason) => self.refuse(&mut state, from, parsed.ok(), raw, reason),
        }
    }

    /// Refuses the partial descriptor `from` left on its socket.
    pub fn refuse_short(&self, from: u32) {
        let mut state = self.lock();
        self.refuse(&mut state, from, None, None, RefuseReason::Short);
    }

    fn check(&self, state: &State, from: u32, desc: &Descriptor) -> Result<Forward, RefuseReason> {
        let sender = state
            .endpoints
            .get(&from)
            .ok_or(RefuseReason::UnknownEndpoint)?;
        if desc.src != from {
            return Err(RefuseReason::SpoofedSource);
        }
        let dst = state
            .endpoints
            .get(&desc.dst)
            .ok_or(RefuseReason::UnknownEndpoint)?;
        if dst.job != sender.job || desc.job != sender.job {
            return Err(RefuseReason::CrossJob);
        }
        let arena = state
            .arenas
            .get(&sender.job)
            .ok_or(RefuseReason::OutOfBounds)?;
        if arena.map().check_range(desc.offset, desc.len).is_err() {
            return Err(RefuseReason::OutOfBounds);
        }
        let entry = self
            .routes
            .get_ref(desc.ref_slot)
            .map_err(|_| RefuseReason::NotHolder)?;
        let matches = entry.holder == from
            && entry.gen == desc.ref_gen
            && entry.job == sender.job
            && entry.offset == desc.offset
            && entry.len == desc.len;
        if !matches || !state.refs.contains_key(&desc.ref_slot) {
            return Err(RefuseReason::NotHolder);
        }
        Ok(Forward {
            desc: *desc,
            entry,
            link: dst.link.clone(),
        })
    }

    fn refuse(
        &self,
        state: &mut State,
        from: u32,
        desc: Option<Descriptor>,
        raw: Option<Descriptor>,
        reason: RefuseReason,
    ) -> Verdict {
        *state.refused.entry(reason).or_default() += 1;

        // A reference the sender really held is freed: the sender gave it up
        // when it sent the descriptor, and no one else can ever release it.
        if let Some(desc) = desc.or(raw) {
            if self
                .held_ref(state, from, desc.ref_slot, desc.ref_gen)
                .is_ok()
            {
                self.free_slot(state, desc.ref_slot);
            }
        }

        let count = state.refused[&reason];
        if let Some(sender) = state.endpoints.get_mut(&from) {
            let (seq, dst) = raw.map_or((0, 0), |d| (d.seq, d.dst));
            if sender.warned.insert(reason) {
                tracing::warn!(
                    endpoint = from,
                    reason = reason.as_str(),
                    seq,
                    dst,
                    "descriptor refused"
                );
            } else {
                tracing::debug!(
                    endpoint = from,
                    reason = reason.as_str(),
                    seq,
                    dst,
                    count,
                    "descriptor refused"
                );
            }
            // A sender that does not read its notices loses them, not memory.
            let _ = sender
                .link
                .notices
                .try_send(Reply::Refused { seq, dst, reason });
        }
        Verdict::Refused(reason)
    }

    /// The node's state, for `stats`.
    pub fn stats(&self) -> SidecarStats {
        let state = self.lock();
        let refs_by_job = |job: u32| state.refs.values().filter(|r| r.job == job).count() as u64;
        let mut jobs: Vec<JobStats> = state
            .arenas
            .values()
            .map(|a| JobStats {
                job: a.job(),
                arena_bytes: a.len(),
                used_bytes: a.used_bytes(),
                buffers: a.buffers() as u64,
                refs: refs_by_job(a.job()),
                page_bytes: a.page_bytes(),
                ..JobStats::default()
            })
            .collect();
        jobs.sort_by_key(|j| j.job);

        let mut kernel: HashMap<u32, RouteStats> = state.departed.clone();
        for (&id, e) in &state.endpoints {
            *kernel.entry(e.job).or_default() += self.routes.route_stats(id).unwrap_or_default();
        }
        for job in &mut jobs {
            let counts = kernel.get(&job.job).copied().unwrap_or_default();
            job.kernel_routed = counts.routed;
            job.kernel_refused = counts.refused;
            job.kernel_passed = counts.passed;
        }

        let mut endpoints: Vec<EndpointStats> = state
            .endpoints
            .iter()
            .map(|(&id, e)| {
                let kernel = self.routes.route_stats(id).unwrap_or_default();
                EndpointStats {
                    endpoint: id,
                    job: e.job,
                    role: e.role.clone(),
                    pid: e.pid,
                    credit_used: e.credit_used,
                    kernel_routed: kernel.routed,
                    kernel_refused: kernel.refused,
                    kernel_passed: kernel.passed,
                }
            })
            .collect();
        endpoints.sort_by_key(|e| e.endpoint);

        let mut sockmap_endpoints = self.routes.socket_endpoints().unwrap_or_default();
        sockmap_endpoints.sort_unstable();
        SidecarStats {
            dataplane: self.routes.dataplane().as_str().to_owned(),
            jobs,
            endpoints,
            sockmap_endpoints,
            refused: state.refused.clone(),
            routed_by_sidecar: state.routed_by_sidecar,
        }
    }
}

struct Forward {
    desc: Descriptor,
    entry: RefEntry,
    link: EndpointLink,
}

fn refuse_reason(err: DescError) -> RefuseReason {
    match err {
        DescError::Short { .. } => RefuseReason::Short,
        DescError::BadMagic { .. } => RefuseReason::BadMagic,
        DescError::BadVersion { .. } => RefuseReason::BadVersion,
        DescError::UnknownKind(_) => RefuseReason::BadKind,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes::UserRoutes;
    use lifl_proto::descriptor::{DescKind, DESC_MAGIC, DESC_VERSION};
    use std::os::fd::AsFd;

    struct Harness {
        node: Node,
        // Stand-in client socket: user-space routes never look at it.
        socket: std::os::unix::net::UnixStream,
        notices: Vec<mpsc::Receiver<Reply>>,
        inboxes: Vec<mpsc::UnboundedReceiver<Descriptor>>,
    }

    impl Harness {
        fn new(credit: u64) -> Self {
            let config = NodeConfig {
                arena_bytes: 1 << 20,
                endpoint_credit: credit,
                max_refs: 64,
                hugepages: false,
                max_endpoints: 4,
                max_jobs: 2,
            };
            let (socket, _) = std::os::unix::net::UnixStream::pair().unwrap();
            let node = Node::new(config, Box::new(UserRoutes::default()));
            Self {
                node,
                socket,
                notices: vec![],
                inboxes: vec![],
            }
        }

        fn register(&mut self, job: u32) -> (u32, u64) {
            let registered = self.try_register(job).unwrap();
            (registered.endpoint, registered.incarnation)
        }

        fn try_register(&mut self, job: u32) -> Result<Registered, NodeError> {
            let (descriptors, inbox) = mpsc::unbounded_channel();
            let (notices, notice_rx) = mpsc::channel(16);
            let registered = self.node.register(Registration {
                job,
                role: "test".into(),
                endpoint: None,
                pid: 1,
                uid: 0,
                client_port: 1000 + self.inboxes.len() as u16,
                client: self.socket.as_fd(),
                link: EndpointLink {
                    descriptors,
                    notices,
                },
            })?;
            self.inboxes.push(inbox);
            self.notices.push(notice_rx);
            Ok(registered)
        }

        fn used(&self, job: u32) -> u64 {
            let stats = self.node.stats();
            stats
                .jobs
                .iter()
                .find(|j| j.job == job)
                .map_or(0, |j| j.used_bytes)
        }
    }

    fn descriptor(src: u32, dst: u32, job: u32, grant: Grant) -> Descriptor {
        Descriptor {
            dst,
            src,
            magic: DESC_MAGIC,
            version: DESC_VERSION,
            kind: DescKind::Update as u16,
            job,
            round: 1,
            ref_slot: grant.slot,
            ref_gen: grant.gen,
            offset: grant.offset,
            len: grant.len,
            samples: 10,
            seq: 5,
            updates: 1,
        }
    }

    #[test]
    fn credit_runs_out_with_a_clear_code_and_comes_back_on_release() {
        let mut h = Harness::new(2);
        let (a, _) = h.register(1);
        let first = h.node.alloc(a, 10).unwrap();
        h.node.alloc(a, 10).unwrap();
        let err = h.node.alloc(a, 10).unwrap_err();
        assert_eq!(err.code, ErrorCode::CreditExhausted);
        assert!(err.message.contains("whole credit"), "{}", err.message);

        assert_eq!(h.node.release(a, &[(first.slot, first.gen)]), 0);
        assert!(h.node.alloc(a, 10).is_ok());
    }

    #[test]
    fn a_shared_buffer_lives_until_its_last_reference_is_released() {
        let mut h = Harness::new(8);
        let (a, _) = h.register(1);
        let grant = h.node.alloc(a, 100).unwrap();
        let second = h.node.share(a, grant.slot, grant.gen).unwrap();
        assert_eq!((second.offset, second.len), (grant.offset, grant.len));
        assert_ne!(second.slot, grant.slot);

        h.node.release(a, &[(grant.slot, grant.gen)]);
        assert_eq!(h.used(1), 4096, "one reference still holds the buffer");
        h.node.release(a, &[(second.slot, second.gen)]);
        assert_eq!(h.used(1), 0);
    }

    #[test]
    fn only_the_holder_can_release_and_a_stale_generation_is_refused() {
        let mut h = Harness::new(8);
        let (a, _) = h.register(1);
        let (b, _) = h.register(1);
        let grant = h.node.alloc(a, 100).unwrap();
        assert_eq!(h.node.release(b, &[(grant.slot, grant.gen)]), 1);
        assert_eq!(h.node.release(a, &[(grant.slot, grant.gen + 1)]), 1);
        assert_eq!(h.used(1), 4096);
        assert_eq!(h.node.release(a, &[(grant.slot, grant.gen)]), 0);
        assert_eq!(h.used(1), 0);
    }

    #[test]
    fn forwarding_moves_the_reference_to_the_destination() {
        let mut h = Harness::new(8);
        let (a, _) = h.register(1);
        let (b, _) = h.register(1);
        let grant = h.node.alloc(a, 100).unwrap();
        let desc = descriptor(a, b, 1, grant);

        assert!(matches!(h.node.judge(a, desc.as_bytes()), Verdict::Forward(d, _) if d == desc));
        assert_eq!(
            h.node.release(a, &[(grant.slot, grant.gen)]),
            1,
            "a gave it away"
        );
        assert_eq!(
            h.node.release(b, &[(grant.slot, grant.gen)]),
            0,
            "b holds it now"
        );
        assert_eq!(h.node.stats().routed_by_sidecar, 1);
    }

    #[test]
    fn a_cross_job_descriptor_is_refused_counted_and_its_buffer_freed() {
        let mut h = Harness::new(8);
        let (a, _) = h.register(1);
        let (c, _) = h.register(2);
        let grant = h.node.alloc(a, 100).unwrap();
        let desc = descriptor(a, c, 1, grant);

        assert!(matches!(
            h.node.judge(a, desc.as_bytes()),
            Verdict::Refused(RefuseReason::CrossJob)
        ));
        assert_eq!(
            h.node.stats().refused.get(&RefuseReason::CrossJob),
            Some(&1)
        );
        assert_eq!(h.used(1), 0, "the refused reference is freed, not leaked");
        let notice = h.notices[0].try_recv().unwrap();
        assert_eq!(
            notice,
            Reply::Refused {
                seq: 5,
                dst: c,
                reason: RefuseReason::CrossJob
            }
        );
        assert!(
            h.inboxes[1].try_recv().is_err(),
            "nothing reaches the other job"
        );
    }

    #[test]
    fn a_departed_endpoint_has_everything_it_held_released() {
        let mut h = Harness::new(8);
        let (a, a_inc) = h.register(1);
        let (b, b_inc) = h.register(1);
        let kept = h.node.alloc(a, 100).unwrap();
        let moved = h.node.alloc(a, 100).unwrap();
        let Verdict::Forward(..) = h.node.judge(a, descriptor(a, b, 1, moved).as_bytes()) else {
            panic!("a valid descriptor is forwarded");
        };
        assert_eq!(h.used(1), 8192);

        h.node.unregister(a, a_inc);
        assert_eq!(
            h.used(1),
            4096,
            "a's own buffer is freed; the one it sent is b's"
        );
        h.node.unregister(b, b_inc + 100);
        assert_eq!(
            h.used(1),
            4096,
            "a stale incarnation leaves the live endpoint alone"
        );
        h.node.unregister(b, b_inc);
        assert!(
            h.node.stats().jobs.is_empty(),
            "an idle job's arena is dropped"
        );
        let _ = kept;
    }

    #[test]
    fn references_held_by_unknown_endpoints_are_swept() {
        let mut h = Harness::new(8);
        let (a, _) = h.register(1);
        let grant = h.node.alloc(a, 100).unwrap();
        // As if the kernel had moved it to an endpoint that then vanished.
        let entry = RefEntry {
            holder: 77,
            ..h.node.routes.get_ref(grant.slot).unwrap()
        };
        h.node.routes.set_ref(grant.slot, entry).unwrap();
        assert_eq!(
            h.node.sweep_orphans(),
            0,
            "no endpoint has left: nothing to look for"
        );
        let (b, b_inc) = h.register(1);
        h.node.unregister(b, b_inc);
        assert_eq!(h.node.sweep_orphans(), 1);
        assert_eq!(h.used(1), 0);
    }

    #[test]
    fn endpoints_and_jobs_beyond_the_limits_are_refused_as_node_full() {
        let mut h = Harness::new(8);
        h.register(1);
        h.register(2);
        let err = h.try_register(3).unwrap_err();
        assert_eq!(err.code, ErrorCode::NodeFull);
        assert!(err.message.contains("2 jobs"), "{}", err.message);

        h.register(1);
        h.register(2);
        let err = h.try_register(1).unwrap_err();
        assert_eq!(err.code, ErrorCode::NodeFull);
        assert!(err.message.contains("4 endpoints"), "{}", err.message);
    }
}

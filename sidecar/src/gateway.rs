//! The gateway: trainers' door into a node (`lifl.v1.GatewayService`).
//!
//! A pushed update is written once, chunk by chunk, into a buffer of the
//! job's arena; only when every byte has arrived and passed the checks does
//! a descriptor for it go to the trainer's leaf aggregator. The gateway is an
//! endpoint of the node like any aggregator, so on the kernel path that hop
//! is redirected by the SK_MSG program too.
//!
//! The same endpoint receives each round's global model from the top
//! aggregator, by descriptor. Every trainer fetching the model is served from
//! that one arena buffer until the next round replaces it.
//!
//! What a push must satisfy is decided here, from what the control plane
//! streamed to this node: the round each job is in, and the trainers it
//! admitted with a leaf on this node ([`Gateway::begin_round`],
//! [`Gateway::admit`]).
//!
//! LIMITATION: the gateway does not check trainer tokens: any client that
//! can reach it and names an admitted trainer id can push in its place.
//! The control plane knows only token hashes and does not share them with
//! nodes; until it does (or mints per-round push tickets), keep the gateway
//! on a network only trainers reach.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::Stream;
use lifl_proto::v1::gateway_service_server::GatewayService;
use lifl_proto::v1::{
    fetch_model_response, push_update_request, FetchModelRequest, FetchModelResponse, ModelHeader,
    PushUpdateRequest, PushUpdateResponse, TrainerSeat, UpdateHeader,
};
use lifl_sdk::checksum::sha256_hex;
use lifl_sdk::fedavg::MAX_UPDATE_SAMPLES;
use lifl_sdk::{BufferMut, DescKind, Endpoint, Registration, SdkError, Update, UpdateMeta};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::node::Node;

/// Bytes per chunk of a model download.
const FETCH_CHUNK_BYTES: usize = 1 << 20;

/// Timing of the gateway's waits.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// How long a push waits for its trainer's admission (or its round) to
    /// reach this node before it is refused; the control plane streams
    /// admissions right after it answers the trainer's join.
    pub admission_wait: Duration,
    /// How long an accepted update waits for its leaf aggregator to register.
    pub leaf_wait: Duration,
    /// Default (and longest) wait of a fetch for a model version.
    pub fetch_wait: Duration,
    /// How long an ended job's last model stays available for fetching.
    pub model_linger: Duration,
    /// How long an ended job's last model may take to arrive.
    pub end_grace: Duration,
    /// Longest silence between two messages of a push before it is dropped
    /// (and its buffer given back).
    pub chunk_idle: Duration,
    /// Longest a model download may take, header to last byte. A reader
    /// slower than that is cut off: it cannot keep an old model's buffer in
    /// the arena by not reading.
    pub fetch_transfer: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            admission_wait: Duration::from_secs(5),
            leaf_wait: Duration::from_secs(10),
            fetch_wait: Duration::from_secs(30),
            model_linger: Duration::from_secs(600),
            end_grace: Duration::from_secs(5),
            chunk_idle: Duration::from_secs(30),
            fetch_transfer: Duration::from_secs(300),
        }
    }
}

/// The node's gateway: one gate per job with work on this node.
#[derive(Debug)]
pub struct Gateway {
    socket: PathBuf,
    node: Arc<Node>,
    config: GatewayConfig,
    jobs: Mutex<HashMap<u32, Arc<JobGate>>>,
    /// Woken whenever a job opens.
    opened: Notify,
}

/// One job's side of the gateway.
#[derive(Debug)]
struct JobGate {
    job: u32,
    /// f32 parameters in the job's model layout.
    params: usize,
    endpoint: Endpoint,
    round: Mutex<RoundGate>,
    /// Woken whenever `round` changes.
    changed: Notify,
    model: watch::Sender<ModelSlot>,
    /// Stops the task that receives models.
    stop: CancellationToken,
}

/// The round a job is in on this node, and its trainers.
#[derive(Debug, Default)]
struct RoundGate {
    round: u32,
    /// Updates of the round are taken until then; `None` before any round.
    deadline: Option<tokio::time::Instant>,
    /// Leaves seen registered this round: one missing now has finished.
    leaves_seen: HashSet<u32>,
    /// Admitted trainers, to the leaf each was dealt.
    seats: HashMap<String, u32>,
    /// Trainers whose push is under way or was accepted.
    uploads: HashMap<String, Upload>,
    ended: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upload {
    InFlight,
    Accepted,
}

/// What fetchers see: the newest model, and whether a newer one can still
/// come (set a little after the job ends; see [`Gateway::end_job`]).
#[derive(Debug, Clone, Default)]
struct ModelSlot {
    model: Option<Arc<GlobalModel>>,
    ended: bool,
}

/// A global model held in the arena for every reader.
#[derive(Debug)]
struct GlobalModel {
    version: u32,
    sha256: String,
    buffer: ModelBuffer,
}

#[derive(Debug)]
enum ModelBuffer {
    /// Version 0, written by the gateway.
    Initial(BufferMut),
    /// A version the top aggregator published.
    Published(Update),
}

impl ModelBuffer {
    fn bytes(&self) -> &[u8] {
        match self {
            Self::Initial(buffer) => buffer.as_bytes(),
            Self::Published(update) => update.as_bytes(),
        }
    }
}

impl GlobalModel {
    /// `buffer` as model `version`, its checksum taken off the async
    /// runtime: a model may be tens of megabytes.
    async fn hashed(version: u32, buffer: ModelBuffer) -> std::io::Result<Self> {
        tokio::task::spawn_blocking(move || Self {
            version,
            sha256: sha256_hex(buffer.bytes()),
            buffer,
        })
        .await
        .map_err(std::io::Error::other)
    }
}

impl Gateway {
    /// A gateway that registers its endpoints on the sidecar at `socket`.
    pub fn new(socket: PathBuf, node: Arc<Node>, config: GatewayConfig) -> Arc<Self> {
        Arc::new(Self {
            socket,
            node,
            config,
            jobs: Mutex::new(HashMap::new()),
            opened: Notify::new(),
        })
    }

    fn jobs(&self) -> MutexGuard<'_, HashMap<u32, Arc<JobGate>>> {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn gate(&self, job: u32) -> Option<Arc<JobGate>> {
        self.jobs().get(&job).cloned()
    }

    /// The job's gate, waiting until `deadline` for it to open: a trainer
    /// may call as soon as its join started a round, before this node heard
    /// of the round.
    async fn gate_by(
        &self,
        job: u32,
        deadline: tokio::time::Instant,
    ) -> Result<Arc<JobGate>, Status> {
        loop {
            let opened = self.opened.notified();
            if let Some(gate) = self.gate(job) {
                return Ok(gate);
            }
            if tokio::time::timeout_at(deadline, opened).await.is_err() {
                return Err(Status::not_found(format!(
                    "job {job} has no work on this node"
                )));
            }
        }
    }

    /// The gateway's endpoint id for `job`, registering it (and writing the
    /// initial model, all zeros) the first time the job is seen.
    pub async fn open_job(self: &Arc<Self>, job: u32, params: usize) -> Result<u32, SdkError> {
        if let Some(gate) = self.gate(job) {
            return Ok(gate.endpoint.id());
        }
        let endpoint = Endpoint::register(Registration::new(&self.socket, job, "gateway")).await?;
        let mut initial = endpoint.alloc(model_bytes(params)).await?;
        initial.as_mut_bytes().fill(0);
        let model = GlobalModel::hashed(0, ModelBuffer::Initial(initial)).await?;
        let (model, _) = watch::channel(ModelSlot {
            model: Some(Arc::new(model)),
            ended: false,
        });
        let gate = Arc::new(JobGate {
            job,
            params,
            endpoint,
            round: Mutex::new(RoundGate::default()),
            changed: Notify::new(),
            model,
            stop: CancellationToken::new(),
        });
        let id = gate.endpoint.id();
        let raced = {
            let mut jobs = self.jobs();
            match jobs.get(&job) {
                Some(existing) => Some(existing.endpoint.id()),
                None => {
                    jobs.insert(job, Arc::clone(&gate));
                    None
                }
            }
        };
        if let Some(existing) = raced {
            return Ok(existing);
        }
        tokio::spawn(receive_models(Arc::downgrade(self), gate));
        self.opened.notify_waiters();
        tracing::info!(job, endpoint = id, params, "gateway open for job");
        Ok(id)
    }

    /// The job moved to `round` on this node, whose updates are taken for
    /// `time_left` more: pushes for earlier rounds are stale from now on.
    pub fn begin_round(&self, job: u32, round: u32, time_left: Duration) {
        let Some(gate) = self.gate(job) else { return };
        {
            let mut state = gate.state();
            if round <= state.round {
                return;
            }
            state.round = round;
            state.deadline = Some(tokio::time::Instant::now() + time_left);
            state.seats.clear();
            state.uploads.clear();
            state.leaves_seen.clear();
        }
        gate.changed.notify_waiters();
    }

    /// Trainers admitted to `round` of `job` with a leaf on this node.
    /// Admitting the same trainer again changes nothing.
    pub fn admit(&self, job: u32, round: u32, seats: &[TrainerSeat]) {
        let Some(gate) = self.gate(job) else { return };
        {
            let mut state = gate.state();
            if round != state.round {
                return;
            }
            for seat in seats {
                state
                    .seats
                    .insert(seat.trainer_id.clone(), seat.leaf_endpoint_id);
            }
        }
        gate.changed.notify_waiters();
    }

    /// The job ended: refuse pushes now, keep serving its last model for a
    /// while, then give everything back to the arena.
    ///
    /// The top aggregator hands the last model over before it reports the
    /// round, but the news of the job's end can overtake that descriptor:
    /// the gateway keeps receiving until the last round's model is in (or
    /// [`GatewayConfig::end_grace`] passed, for a job cancelled mid-round),
    /// and only then tells waiting fetchers that no newer model will come.
    pub fn end_job(self: &Arc<Self>, job: u32) {
        let Some(gate) = self.gate(job) else { return };
        let last_round = {
            let mut state = gate.state();
            state.ended = true;
            state.round
        };
        gate.changed.notify_waiters();
        let gateway = Arc::clone(self);
        let (grace, linger) = (self.config.end_grace, self.config.model_linger);
        tokio::spawn(async move {
            let mut slot = gate.model.subscribe();
            let last_in =
                slot.wait_for(|s| s.model.as_ref().is_some_and(|m| m.version >= last_round));
            let _ = tokio::time::timeout(grace, last_in).await;
            gate.model.send_modify(|slot| slot.ended = true);
            gate.stop.cancel();

            tokio::time::sleep(linger).await;
            let mut jobs = gateway.jobs();
            if jobs.get(&job).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                jobs.remove(&job);
                tracing::info!(job, "gateway closed for job");
            }
        });
    }

    /// Closes every job at once (shutdown).
    pub fn close(&self) {
        for (_, gate) in self.jobs().drain() {
            gate.stop.cancel();
        }
    }

    /// Checks the header, waiting briefly for the trainer's admission, and
    /// claims the trainer's one upload of the round.
    async fn claim(&self, header: &UpdateHeader) -> Result<(Arc<JobGate>, Claim), Status> {
        if !(1..=MAX_UPDATE_SAMPLES).contains(&header.samples) {
            return Err(Status::invalid_argument(format!(
                "samples is {}; must be 1 to {MAX_UPDATE_SAMPLES}",
                header.samples
            )));
        }
        let deadline = tokio::time::Instant::now() + self.config.admission_wait;
        let gate = self.gate_by(header.job_id, deadline).await?;
        loop {
            // Register for a wake-up before looking, so none is missed.
            let changed = gate.changed.notified();
            let leaf = {
                let mut state = gate.state();
                match seat_for(&state, header) {
                    Seat::Leaf(leaf) => {
                        let trainer = header.trainer_id.clone();
                        match state.uploads.get(&trainer) {
                            Some(Upload::Accepted) => {
                                return Err(Status::already_exists(format!(
                                    "trainer {trainer} already pushed its update for round {}",
                                    header.round
                                )))
                            }
                            // Retryable: the other upload may yet fail (a
                            // trainer retrying after a dropped connection
                            // races the gateway noticing the drop).
                            Some(Upload::InFlight) => {
                                return Err(Status::aborted(format!(
                                    "trainer {trainer} is already pushing its update for round \
                                     {}; retry once that upload ends",
                                    header.round
                                )))
                            }
                            None => {}
                        }
                        state.uploads.insert(trainer, Upload::InFlight);
                        Some(leaf)
                    }
                    Seat::Refused(status) => return Err(status),
                    Seat::NotYet(_) => None,
                }
            };
            if let Some(leaf) = leaf {
                let claim = Claim {
                    gate: Arc::clone(&gate),
                    trainer: header.trainer_id.clone(),
                    round: header.round,
                    leaf,
                    accepted: false,
                };
                drop(changed);
                return Ok((gate, claim));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                let state = gate.state();
                return Err(match seat_for(&state, header) {
                    Seat::NotYet(status) | Seat::Refused(status) => status,
                    Seat::Leaf(_) => Status::unavailable("admission raced; push again"),
                });
            }
        }
    }

    /// Waits until the leaf aggregator has registered with the node; a leaf
    /// that was up this round and is gone has finished its round.
    async fn leaf_ready(&self, gate: &JobGate, claim: &Claim) -> Result<(), Status> {
        let leaf = claim.leaf;
        let deadline = tokio::time::Instant::now() + self.config.leaf_wait;
        loop {
            let up = self.node.has_endpoint(leaf);
            {
                let mut state = gate.state();
                if up {
                    state.leaves_seen.insert(leaf);
                    return Ok(());
                }
                if state.leaves_seen.contains(&leaf) {
                    return Err(Status::failed_precondition(format!(
                        "leaf aggregator {leaf} already finished round {}",
                        claim.round
                    )));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::unavailable(format!(
                    "leaf aggregator {leaf} did not come up within {:?}",
                    self.config.leaf_wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Receives the update's chunks into an arena buffer, taken when the
    /// first chunk arrives. Stops at the round's deadline, after
    /// [`GatewayConfig::chunk_idle`] without a message, and as soon as the
    /// round moves on or the job ends; dropping the buffer gives it back.
    async fn receive_update(
        &self,
        gate: &JobGate,
        claim: &Claim,
        parts: &mut Streaming<PushUpdateRequest>,
    ) -> Result<BufferMut, Status> {
        let round_deadline = gate.state().deadline;
        let mut buffer: Option<BufferMut> = None;
        let mut written = 0usize;
        loop {
            let idle = tokio::time::Instant::now() + self.config.chunk_idle;
            let until = round_deadline.map_or(idle, |d| d.min(idle));
            let message = match tokio::time::timeout_at(until, parts.message()).await {
                Ok(message) => message?,
                Err(_) if until < idle => {
                    return Err(Status::failed_precondition(format!(
                        "round {} reached its deadline during the upload",
                        claim.round
                    )))
                }
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "no part of the update arrived for {:?}",
                        self.config.chunk_idle
                    )))
                }
            };
            let Some(message) = message else { break };
            let chunk = match message.part {
                Some(push_update_request::Part::Chunk(chunk)) => chunk,
                Some(push_update_request::Part::Header(_)) => {
                    return Err(Status::invalid_argument("a push has exactly one header"))
                }
                None => continue,
            };
            still_current(gate, claim)?;
            let buffer = match &mut buffer {
                Some(buffer) => buffer,
                None => buffer.insert(
                    gate.endpoint
                        .alloc(model_bytes(gate.params))
                        .await
                        .map_err(|err| alloc_status(&err))?,
                ),
            };
            let values = buffer
                .as_mut_f32()
                .map_err(|err| Status::internal(err.to_string()))?;
            written = write_chunk(values, written, &chunk)?;
        }
        match buffer {
            Some(buffer) if written == gate.params => Ok(buffer),
            _ => Err(Status::invalid_argument(format!(
                "the update has {written} values; the model has {}",
                gate.params
            ))),
        }
    }
}

/// Refuses to go on with a push whose round has moved on, ended, or passed
/// its deadline.
fn still_current(gate: &JobGate, claim: &Claim) -> Result<(), Status> {
    let state = gate.state();
    if state.ended {
        return Err(Status::failed_precondition(format!(
            "job {} ended during the upload",
            gate.job
        )));
    }
    if state.round != claim.round {
        return Err(Status::failed_precondition(format!(
            "round {} ended during the upload",
            claim.round
        )));
    }
    if state
        .deadline
        .is_some_and(|d| tokio::time::Instant::now() >= d)
    {
        return Err(Status::failed_precondition(format!(
            "round {} reached its deadline during the upload",
            claim.round
        )));
    }
    Ok(())
}

impl JobGate {
    fn state(&self) -> MutexGuard<'_, RoundGate> {
        self.round.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the gateway knows of a pushing trainer's seat.
enum Seat {
    Leaf(u32),
    /// Refused for good.
    Refused(Status),
    /// Refused unless an admission arrives soon.
    NotYet(Status),
}

fn seat_for(state: &RoundGate, header: &UpdateHeader) -> Seat {
    let (round, trainer) = (header.round, &header.trainer_id);
    if state.ended {
        return Seat::Refused(Status::failed_precondition(format!(
            "job {} has ended",
            header.job_id
        )));
    }
    if round < state.round {
        return Seat::Refused(Status::failed_precondition(format!(
            "round {round} is stale: the job is in round {}",
            state.round
        )));
    }
    if round > state.round {
        return Seat::NotYet(Status::failed_precondition(format!(
            "round {round} has not started on this node (it is in round {})",
            state.round
        )));
    }
    if state
        .deadline
        .is_some_and(|d| tokio::time::Instant::now() >= d)
    {
        return Seat::Refused(Status::failed_precondition(format!(
            "round {round} stopped taking updates at its deadline"
        )));
    }
    match state.seats.get(trainer) {
        Some(&leaf) => Seat::Leaf(leaf),
        None => Seat::NotYet(Status::not_found(format!(
            "trainer {trainer} was not admitted to round {round} with a leaf on this node"
        ))),
    }
}

/// A trainer's claim on its round's one upload; given up on drop unless
/// the update was accepted.
struct Claim {
    gate: Arc<JobGate>,
    trainer: String,
    round: u32,
    leaf: u32,
    accepted: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut state = self.gate.state();
        if state.round != self.round {
            return;
        }
        if self.accepted {
            state.uploads.insert(self.trainer.clone(), Upload::Accepted);
        } else {
            state.uploads.remove(&self.trainer);
        }
    }
}

/// Receives the global models the job's top aggregators publish. If the
/// endpoint fails, the job's gate is dropped, so that the job's next round
/// opens a fresh one instead of pushing into a dead socket.
async fn receive_models(gateway: std::sync::Weak<Gateway>, gate: Arc<JobGate>) {
    loop {
        let received = tokio::select! {
            () = gate.stop.cancelled() => return,
            received = gate.endpoint.recv() => received,
        };
        match received {
            Ok(update) => install_model(&gate, update).await,
            Err(SdkError::Refused { seq, dst, reason }) => tracing::warn!(
                job = gate.job,
                seq,
                leaf = dst,
                reason = reason.as_str(),
                "an accepted update was refused on its way to the leaf"
            ),
            Err(err @ SdkError::Protocol(_)) => {
                tracing::warn!(
                    job = gate.job,
                    %err,
                    "dropped a descriptor that could not be read"
                );
            }
            Err(err) => {
                tracing::warn!(
                    job = gate.job,
                    %err,
                    "gateway endpoint failed; closing the job's gate"
                );
                gate.stop.cancel();
                if let Some(gateway) = gateway.upgrade() {
                    let mut jobs = gateway.jobs();
                    if jobs.get(&gate.job).is_some_and(|g| Arc::ptr_eq(g, &gate)) {
                        jobs.remove(&gate.job);
                    }
                }
                return;
            }
        }
    }
}

async fn install_model(gate: &JobGate, update: Update) {
    let meta = update.meta();
    if meta.kind != DescKind::Model || update.len() != model_bytes(gate.params) {
        tracing::warn!(
            job = gate.job,
            src = update.src(),
            kind = ?meta.kind,
            len = update.len(),
            "dropped a descriptor that is not this job's model"
        );
        return;
    }
    let current = gate.model.borrow().model.as_ref().map_or(0, |m| m.version);
    if meta.round <= current {
        tracing::warn!(
            job = gate.job,
            version = meta.round,
            current,
            "dropped an older model"
        );
        return;
    }
    let Ok(model) = GlobalModel::hashed(meta.round, ModelBuffer::Published(update)).await else {
        return;
    };
    let model = Arc::new(model);
    tracing::info!(
        job = gate.job,
        version = model.version,
        updates = meta.updates,
        sha256 = %model.sha256,
        "serving a new global model"
    );
    gate.model.send_modify(|slot| slot.model = Some(model));
}

fn model_bytes(params: usize) -> u64 {
    (params as u64).saturating_mul(4)
}

/// Serves [`GatewayService`] for a [`Gateway`].
#[derive(Debug, Clone)]
pub struct GatewayServer {
    gateway: Arc<Gateway>,
}

impl GatewayServer {
    /// The gRPC service of `gateway`.
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

type ModelStream = Pin<Box<dyn Stream<Item = Result<FetchModelResponse, Status>> + Send>>;

#[tonic::async_trait]
impl GatewayService for GatewayServer {
    async fn push_update(
        &self,
        request: Request<Streaming<PushUpdateRequest>>,
    ) -> Result<Response<PushUpdateResponse>, Status> {
        let mut parts = request.into_inner();
        let header = match parts.message().await?.and_then(|m| m.part) {
            Some(push_update_request::Part::Header(header)) => header,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a push must be its header",
                ))
            }
        };
        let (gate, claim) = self.gateway.claim(&header).await?;
        let buffer = self
            .gateway
            .receive_update(&gate, &claim, &mut parts)
            .await?;
        self.gateway.leaf_ready(&gate, &claim).await?;
        let leaf = claim.leaf;
        // In a task of its own, so that a trainer hanging up now cannot
        // part the hand-over from the claim's acceptance: a descriptor that
        // left is always recorded as this trainer's one update.
        tokio::spawn(hand_over(claim, buffer, header.samples))
            .await
            .map_err(|err| Status::internal(format!("hand the update to its leaf: {err}")))??;
        tracing::debug!(
            job = gate.job,
            round = header.round,
            trainer = %header.trainer_id,
            leaf,
            "update accepted"
        );
        Ok(Response::new(PushUpdateResponse {
            bytes: model_bytes(gate.params),
            leaf_endpoint_id: leaf,
        }))
    }

    type FetchModelStream = ModelStream;

    async fn fetch_model(
        &self,
        request: Request<FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        let request = request.into_inner();
        let longest = self.gateway.config.fetch_wait;
        let wait = match request.wait_ms {
            0 => longest,
            ms => Duration::from_millis(ms).min(longest),
        };
        let started = tokio::time::Instant::now();
        let gate = self.gateway.gate_by(request.job_id, started + wait).await?;
        let wanted = request.min_version;
        let mut slot = gate.model.subscribe();
        let ready = tokio::time::timeout_at(
            started + wait,
            slot.wait_for(|s| s.ended || s.model.as_ref().is_some_and(|m| m.version >= wanted)),
        )
        .await;
        let model = match ready {
            Ok(Ok(slot)) => slot.model.clone(),
            Ok(Err(_)) => None,
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "model version {wanted} of job {} did not appear within {wait:?}",
                    request.job_id
                )))
            }
        };
        let model = model.filter(|m| m.version >= wanted).ok_or_else(|| {
            Status::failed_precondition(format!(
                "job {} ended before model version {wanted}",
                request.job_id
            ))
        })?;
        let transfer = self.gateway.config.fetch_transfer;
        Ok(Response::new(model_stream(gate.job, model, transfer)))
    }
}

/// Sends a received update to its leaf and marks the trainer's upload
/// accepted, if its round is still the current one: it may have moved on
/// while the bytes arrived or the leaf came up.
async fn hand_over(mut claim: Claim, buffer: BufferMut, samples: u64) -> Result<(), Status> {
    still_current(&claim.gate, &claim)?;
    let meta = UpdateMeta::update(claim.round, samples);
    claim
        .gate
        .endpoint
        .send(claim.leaf, buffer, meta)
        .await
        .map_err(|err| Status::unavailable(format!("hand the update to its leaf: {err}")))?;
    claim.accepted = true;
    Ok(())
}

/// Copies one chunk of little-endian f32 values into `values` at `at`,
/// checking that each is finite; returns the new fill level.
fn write_chunk(values: &mut [f32], at: usize, chunk: &[u8]) -> Result<usize, Status> {
    if chunk.len() % 4 != 0 {
        return Err(Status::invalid_argument(format!(
            "a chunk of {} bytes is not a whole number of f32 values",
            chunk.len()
        )));
    }
    let count = chunk.len() / 4;
    let end = at
        .checked_add(count)
        .filter(|&end| end <= values.len())
        .ok_or_else(|| {
            Status::invalid_argument(format!(
                "the update is longer than the model's {} values",
                values.len()
            ))
        })?;
    let mut finite = true;
    for (value, bytes) in values[at..end].iter_mut().zip(chunk.chunks_exact(4)) {
        *value = f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        finite &= value.is_finite();
    }
    if !finite {
        let index = values[at..end]
            .iter()
            .position(|v| !v.is_finite())
            .map_or(at, |i| at + i);
        return Err(Status::invalid_argument(format!(
            "value {index} of the update is {}; every value must be finite",
            values[index]
        )));
    }
    Ok(end)
}

fn alloc_status(err: &SdkError) -> Status {
    let message = format!("no room for the update in the arena: {err}");
    if err.is_retryable() {
        Status::resource_exhausted(message)
    } else {
        Status::internal(message)
    }
}

/// A header, then the model's bytes in chunks, read from the shared buffer
/// by a task that holds it for at most `transfer`: a reader that stops
/// reading holds a copy of two chunks, not the arena buffer.
fn model_stream(job: u32, model: Arc<GlobalModel>, transfer: Duration) -> ModelStream {
    let (tx, rx) = tokio::sync::mpsc::channel(3);
    tokio::spawn(async move {
        let cut_off = tokio::time::Instant::now() + transfer;
        // One place in the queue is kept for the status that ends a
        // download cut off, so that the reader learns why.
        let Ok(last_word) = tx.clone().reserve_owned().await else {
            return;
        };
        let header = FetchModelResponse {
            part: Some(fetch_model_response::Part::Header(ModelHeader {
                job_id: job,
                version: model.version,
                bytes: model.buffer.bytes().len() as u64,
                sha256: model.sha256.clone(),
            })),
        };
        let chunks =
            model
                .buffer
                .bytes()
                .chunks(FETCH_CHUNK_BYTES)
                .map(|chunk| FetchModelResponse {
                    part: Some(fetch_model_response::Part::Chunk(chunk.to_vec())),
                });
        for message in std::iter::once(header).chain(chunks) {
            match tokio::time::timeout_at(cut_off, tx.send(Ok(message))).await {
                Ok(Ok(())) => {}
                // The reader hung up.
                Ok(Err(_)) => return,
                Err(_) => {
                    last_word.send(Err(Status::deadline_exceeded(format!(
                        "the download took longer than {transfer:?}; fetch again"
                    ))));
                    return;
                }
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn chunks_fill_the_buffer_in_order() {
        let mut values = [0.0f32; 5];
        let at = write_chunk(&mut values, 0, &le(&[1.0, 2.0])).unwrap();
        let at = write_chunk(&mut values, at, &le(&[3.0, 4.0, 5.0])).unwrap();
        assert_eq!(at, 5);
        assert_eq!(values, [1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn a_chunk_past_the_model_or_of_partial_values_is_refused() {
        let mut values = [0.0f32; 2];
        let err = write_chunk(&mut values, 1, &le(&[1.0, 2.0])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("longer than the model's 2"));

        let err = write_chunk(&mut values, 0, &[0, 0, 128]).unwrap_err();
        assert!(err.message().contains("not a whole number of f32"));
    }

    #[test]
    fn a_value_that_is_not_finite_is_named() {
        let mut values = [0.0f32; 4];
        let at = write_chunk(&mut values, 0, &le(&[1.0])).unwrap();
        let err = write_chunk(&mut values, at, &le(&[2.0, f32::NAN, f32::INFINITY])).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(
            err.message().starts_with("value 2 of the update is NaN"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn seats_say_stale_not_started_unknown_and_ended() {
        let mut state = RoundGate {
            round: 3,
            ..RoundGate::default()
        };
        state.seats.insert("t1".into(), 40);
        let header = |round: u32, trainer: &str| UpdateHeader {
            job_id: 1,
            round,
            trainer_id: trainer.into(),
            samples: 10,
        };
        let refused = |state: &RoundGate, round, trainer: &str| match seat_for(
            state,
            &header(round, trainer),
        ) {
            Seat::Leaf(leaf) => panic!("seated at leaf {leaf}"),
            Seat::Refused(status) => ("refused", status),
            Seat::NotYet(status) => ("not yet", status),
        };
        assert!(matches!(seat_for(&state, &header(3, "t1")), Seat::Leaf(40)));
        let (kind, status) = refused(&state, 2, "t1");
        assert!(kind == "refused" && status.message().contains("stale"));
        let (kind, status) = refused(&state, 4, "t1");
        assert!(kind == "not yet" && status.message().contains("not started"));
        let (kind, status) = refused(&state, 3, "t9");
        assert!(kind == "not yet" && status.code() == tonic::Code::NotFound);
        state.ended = true;
        let (kind, status) = refused(&state, 3, "t1");
        assert!(kind == "refused" && status.message().contains("ended"));
    }
}

//! The trainers' side of a round over the network: join the round at the
//! control plane, fetch the global model from a node's gateway, and push the
//! locally trained update back to that gateway.
//!
//! A [`TrainerClient`] talks to the control plane (`RoundService` to join,
//! `JobService` to follow the job) and hands out a [`Gateway`] per node
//! address, sharing one lazily connected channel per address. Updates and
//! models travel as little-endian `f32` bytes, an update in chunks of about
//! [`CHUNK_BYTES`] that each hold whole values; a downloaded model is checked
//! against its header's length and SHA-256 before it is returned.
//!
//! ```no_run
//! use std::time::Duration;
//! use lifl_sdk::trainer::TrainerClient;
//!
//! # async fn demo(update: Vec<f32>) -> Result<(), lifl_sdk::trainer::TrainerError> {
//! let client = TrainerClient::connect("http://127.0.0.1:7400", Some("lifl_...".into())).await?;
//! let assignment = client.join(7, "hospital-3").await?;
//!
//! let gateway = client.gateway(&assignment.gateway_address)?;
//! let global = gateway
//!     .fetch_model(7, assignment.model_version, Duration::from_secs(30))
//!     .await?;
//! // ... train from `global.params` into `update` ...
//! gateway.push_update(&assignment, "hospital-3", 600, &update).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Nothing a server sends can panic this module: every malformed answer
//! becomes a [`TrainerError`] that keeps the gRPC [`Status`] where there is
//! one, so callers can branch on its code.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lifl_proto::bearer::Bearer;
use lifl_proto::v1 as pb;
use lifl_proto::v1::fetch_model_response::Part as ModelPart;
use lifl_proto::v1::gateway_service_client::GatewayServiceClient;
use lifl_proto::v1::job_service_client::JobServiceClient;
use lifl_proto::v1::push_update_request::Part as UpdatePart;
use lifl_proto::v1::round_service_client::RoundServiceClient;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::codec::Streaming;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::checksum::to_hex;
use crate::error::Fault;

pub use lifl_proto::v1::{Job, JobState, ModelLayout, PushUpdateResponse, TrainerAssignment};

/// The control plane's address when none is given.
pub const DEFAULT_CONTROL_PLANE: &str = "http://127.0.0.1:7400";

/// Bytes of update per upload chunk: 1 MiB, a whole number of `f32` values
/// as the gateway requires.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Longest wait for a TCP connection to the control plane.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the gateway waits for a model version when asked with
/// `wait_ms = 0`, per `gateway.proto`.
const GATEWAY_DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Longest silence tolerated from a gateway while a model download is
/// underway, and the slack on top of the asked-for wait before its header.
const FETCH_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Least time worth asking a gateway again for a model version after it
/// gave up waiting early.
const FETCH_RETRY_MIN: Duration = Duration::from_millis(100);

/// Time after an assignment's deadline that an upload may still be
/// finishing before the client gives up on it; the gateway decides whether
/// a late update counts.
const PUSH_GRACE: Duration = Duration::from_secs(10);

/// Upload chunks encoded ahead of the network: enough to keep the stream
/// busy, few enough that an upload holds at most a few MiB beyond the model.
const PUSH_QUEUE_CHUNKS: usize = 2;

/// Largest gRPC message accepted from a gateway; its chunks are meant to be
/// about 1 MiB, so this only stops a broken server from exhausting memory.
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Most bytes reserved up front for a download on the header's word; a
/// larger model grows as its bytes actually arrive.
const MAX_RESERVE_BYTES: u64 = 256 << 20;

/// Pause before watching a job again after the server ended a watch while
/// the job was still running.
const REWATCH_PAUSE: Duration = Duration::from_millis(200);

/// Why a trainer call failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainerError {
    /// An address could not be made into a gRPC endpoint.
    #[error("bad address {address:?}: {reason}")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// Why it is unusable.
        reason: String,
    },
    /// A token holds characters an HTTP header cannot carry.
    #[error("the token must be printable ASCII")]
    InvalidToken,
    /// The control plane could not be reached.
    #[error("cannot reach {address}")]
    Connect {
        /// The address tried.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// A call ended with a gRPC error status: the server refused it, or the
    /// connection failed (`UNAVAILABLE`).
    #[error("{call} failed: {:?}: {}", .status.code(), .status.message())]
    Rejected {
        /// The call, such as `join round`.
        call: &'static str,
        /// The status, with its code and message as the server sent them.
        status: Status,
    },
    /// The job ended in a state from which the awaited version cannot come.
    #[error("job {job_id} ended {} at model version {model_version}{}",
        state_name(*.state),
        if .failure.is_empty() { String::new() } else { format!(": {}", .failure) })]
    JobEnded {
        /// The job.
        job_id: u32,
        /// Its final state: failed, cancelled, or completed short of the
        /// version asked for.
        state: JobState,
        /// Rounds it finished.
        model_version: u32,
        /// Why it failed, if it did.
        failure: String,
    },
    /// Something took longer than allowed.
    #[error("{what} took longer than {after:?}")]
    Timeout {
        /// What was being waited for.
        what: &'static str,
        /// The time allowed.
        after: Duration,
    },
    /// A downloaded model's length differs from its header's.
    #[error("the model has {found} bytes, its header announced {expected}")]
    LengthMismatch {
        /// Bytes the header announced.
        expected: u64,
        /// Bytes received (so far, when more arrived than announced).
        found: u64,
    },
    /// A downloaded model's bytes do not hash to its header's SHA-256.
    #[error("the model hashes to {found}, its header announced {expected}")]
    ChecksumMismatch {
        /// SHA-256 the header announced, lowercase hex.
        expected: String,
        /// SHA-256 of the bytes received, lowercase hex.
        found: String,
    },
    /// A job's model layout cannot be trained by this client.
    #[error("unsupported model layout: {0}")]
    UnsupportedLayout(String),
    /// A server answered out of protocol.
    #[error("protocol error from the {peer}: {reason}")]
    Protocol {
        /// `control plane` or `gateway`.
        peer: &'static str,
        /// What was wrong.
        reason: String,
    },
}

impl TrainerError {
    /// The gRPC status code, if the error carries a status.
    pub fn code(&self) -> Option<Code> {
        self.status().map(Status::code)
    }

    /// The gRPC status, if the error carries one.
    pub fn status(&self) -> Option<&Status> {
        match self {
            Self::Rejected { status, .. } => Some(status),
            _ => None,
        }
    }

    /// Whose action the error calls for.
    pub fn fault(&self) -> Fault {
        match self {
            Self::InvalidAddress { .. }
            | Self::InvalidToken
            | Self::JobEnded { .. }
            | Self::UnsupportedLayout(_) => Fault::Caller,
            Self::Connect { .. } | Self::Timeout { .. } => Fault::Environment,
            Self::Rejected { status, .. } => code_fault(status.code()),
            Self::LengthMismatch { .. } | Self::ChecksumMismatch { .. } | Self::Protocol { .. } => {
                Fault::Platform
            }
        }
    }

    /// Whether the same call may succeed later, unchanged. A full round
    /// (`RESOURCE_EXHAUSTED` from `join`) counts: the next round has room.
    pub fn is_retryable(&self) -> bool {
        matches!(self.fault(), Fault::Capacity | Fault::Environment)
    }
}

/// Whose fault a gRPC status code is, from the codes lifl's services send.
fn code_fault(code: Code) -> Fault {
    match code {
        Code::ResourceExhausted => Fault::Capacity,
        Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled => {
            Fault::Environment
        }
        Code::Internal | Code::Unknown | Code::DataLoss | Code::Unimplemented => Fault::Platform,
        _ => Fault::Caller,
    }
}

/// `failed`, `cancelled`, ... for messages.
fn state_name(state: JobState) -> String {
    let name = state.as_str_name();
    name.strip_prefix("JOB_STATE_")
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// Turns a status into [`TrainerError::Rejected`] for `call`.
fn rejected(call: &'static str) -> impl FnOnce(Status) -> TrainerError {
    move |status| TrainerError::Rejected { call, status }
}

type Authed = InterceptedService<Channel, Bearer>;

/// A trainer's connection to the control plane, and to the gateways its
/// assignments name. Cheap to clone; clones share connections.
#[derive(Debug, Clone)]
pub struct TrainerClient {
    /// `JoinRound`, with the trainer token.
    rounds: RoundServiceClient<Authed>,
    /// `GetJob` and `WatchJob`, with the admin token if one was given.
    jobs: JobServiceClient<Authed>,
    /// One channel per gateway address, shared by every clone.
    gateways: GatewayPool,
    /// Kept to rebuild `jobs` with another token.
    channel: Channel,
}

impl TrainerClient {
    /// Connects to the control plane at `control_plane` (`http://host:port`
    /// or `host:port`), presenting `token` (a job's trainer token, or the
    /// admin token) on every call; `None` sends no token, which a control
    /// plane without an admin token accepts.
    pub async fn connect(control_plane: &str, token: Option<String>) -> Result<Self, TrainerError> {
        let channel = endpoint(control_plane)?
            .connect_timeout(CONNECT_TIMEOUT)
            .connect()
            .await
            .map_err(|source| TrainerError::Connect {
                address: control_plane.to_owned(),
                source,
            })?;
        Self::from_channel(channel, token)
    }

    /// A client over an existing channel to the control plane, as
    /// [`connect`](Self::connect) presenting `token`.
    pub fn from_channel(channel: Channel, token: Option<String>) -> Result<Self, TrainerError> {
        let bearer = Bearer::new(token.as_deref()).map_err(|_| TrainerError::InvalidToken)?;
        Ok(Self {
            rounds: RoundServiceClient::with_interceptor(channel.clone(), bearer.clone()),
            jobs: JobServiceClient::with_interceptor(channel.clone(), bearer),
            gateways: GatewayPool::default(),
            channel,
        })
    }

    /// Presents `token` instead on job reads ([`job`](Self::job),
    /// [`wait_for_version`](Self::wait_for_version)). The job's trainer
    /// token already reads its own job; an operator's tool following
    /// several jobs can read them all with the admin token.
    pub fn with_admin_token(mut self, token: Option<String>) -> Result<Self, TrainerError> {
        let bearer = Bearer::new(token.as_deref()).map_err(|_| TrainerError::InvalidToken)?;
        self.jobs = JobServiceClient::with_interceptor(self.channel.clone(), bearer);
        Ok(self)
    }

    /// Joins the current round of `job_id` as `trainer_id`, starting the
    /// next round if none is open. Joining again returns the same
    /// assignment. `RESOURCE_EXHAUSTED` means the round is full;
    /// `FAILED_PRECONDITION` that the job ended or no node can take the
    /// update.
    pub async fn join(
        &self,
        job_id: u32,
        trainer_id: &str,
    ) -> Result<TrainerAssignment, TrainerError> {
        let request = pb::JoinRoundRequest {
            job_id,
            trainer_id: trainer_id.to_owned(),
        };
        let assignment = self
            .rounds
            .clone()
            .join_round(request)
            .await
            .map_err(rejected("join round"))?
            .into_inner();
        if assignment.job_id != job_id || assignment.gateway_address.is_empty() {
            return Err(TrainerError::Protocol {
                peer: "control plane",
                reason: format!(
                    "joining job {job_id} returned job {} at gateway {:?}",
                    assignment.job_id, assignment.gateway_address
                ),
            });
        }
        Ok(assignment)
    }

    /// Reads the job `job_id`: its spec, state, model version and rounds.
    pub async fn job(&self, job_id: u32) -> Result<Job, TrainerError> {
        let job = self
            .jobs
            .clone()
            .get_job(pb::GetJobRequest { job_id })
            .await
            .map_err(rejected("get job"))?
            .into_inner();
        Ok(job)
    }

    /// Waits until job `job_id` has finished `version` rounds and returns
    /// the job as it then stands. Fails with [`TrainerError::JobEnded`] as
    /// soon as the job fails or is cancelled (or completes short of
    /// `version`), and with [`TrainerError::Timeout`] after `timeout`.
    pub async fn wait_for_version(
        &self,
        job_id: u32,
        version: u32,
        timeout: Duration,
    ) -> Result<Job, TrainerError> {
        tokio::time::timeout(timeout, self.watch_until(job_id, version))
            .await
            .map_err(|_| TrainerError::Timeout {
                what: "waiting for the job's model version",
                after: timeout,
            })?
    }

    /// Follows the job's events until [`progress`] decides.
    async fn watch_until(&self, job_id: u32, version: u32) -> Result<Job, TrainerError> {
        loop {
            let request = pb::WatchJobRequest { job_id };
            let mut events = self
                .jobs
                .clone()
                .watch_job(request)
                .await
                .map_err(rejected("watch job"))?
                .into_inner();
            while let Some(event) = events.message().await.map_err(rejected("watch job"))? {
                // `round_progress` events carry no job; the others do.
                if let Some(job) = event.job {
                    if let Some(job) = progress(job, version)? {
                        return Ok(job);
                    }
                }
            }

            // The server ended the watch (shutting down, or the job ended
            // between events): decide from a fresh read, else watch again.
            if let Some(job) = progress(self.job(job_id).await?, version)? {
                return Ok(job);
            }
            tokio::time::sleep(REWATCH_PAUSE).await;
        }
    }

    /// The gateway at `address` (`host:port`, as in an assignment), over
    /// this client's shared channel for that address.
    ///
    /// # Panics
    /// Outside a Tokio runtime, where tonic cannot start the channel.
    pub fn gateway(&self, address: &str) -> Result<Gateway, TrainerError> {
        self.gateways.get(address)
    }
}

/// Whether `job` has reached `version`: `Some(job)` if it has, `None` if it
/// may still, and an error if it never will.
fn progress(job: Job, version: u32) -> Result<Option<Job>, TrainerError> {
    if job.model_version >= version {
        return Ok(Some(job));
    }
    match job.state() {
        JobState::Failed | JobState::Cancelled | JobState::Completed => {
            Err(TrainerError::JobEnded {
                job_id: job.id,
                state: job.state(),
                model_version: job.model_version,
                failure: job.failure,
            })
        }
        JobState::Unspecified | JobState::Pending | JobState::Running => Ok(None),
    }
}

/// Number of `f32` values in a model with `layout`: the length of every
/// update and global model of its job. Fails for a tensor that is not
/// `f32` or a layout too large to count.
pub fn layout_f32_values(layout: &ModelLayout) -> Result<u64, TrainerError> {
    let mut total: u64 = 0;
    for tensor in &layout.tensors {
        if tensor.dtype != "f32" {
            return Err(TrainerError::UnsupportedLayout(format!(
                "tensor {:?} has dtype {:?}, only f32 is supported",
                tensor.name, tensor.dtype
            )));
        }
        let values = tensor
            .shape
            .iter()
            .try_fold(1u64, |n, &dim| n.checked_mul(dim))
            .and_then(|n| total.checked_add(n));
        total = values.ok_or_else(|| {
            TrainerError::UnsupportedLayout("more values than a u64 counts".to_owned())
        })?;
    }
    Ok(total)
}

/// Time left until `deadline_unix_ms` (milliseconds since the Unix epoch),
/// zero if it has passed.
pub fn time_until(deadline_unix_ms: u64) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_millis(deadline_unix_ms).saturating_sub(now)
}

/// A gRPC endpoint for `address`, `http://` assumed when no scheme is given.
fn endpoint(address: &str) -> Result<Endpoint, TrainerError> {
    let url = if address.contains("://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    };
    Endpoint::from_shared(url).map_err(|e| TrainerError::InvalidAddress {
        address: address.to_owned(),
        reason: e.to_string(),
    })
}

/// Gateway channels by address, shared by every trainer of a process so a
/// node's many trainers multiplex one HTTP/2 connection.
#[derive(Debug, Clone, Default)]
pub struct GatewayPool {
    /// Lazily connecting channels by `host:port`. tonic reconnects a channel
    /// whose connection dropped, so an entry never goes stale.
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl GatewayPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// The gateway at `address`, opening its channel on first use. The
    /// connection is made by the first call, so an unreachable gateway shows
    /// up there as `UNAVAILABLE`.
    ///
    /// # Panics
    /// Outside a Tokio runtime, where tonic cannot start the channel.
    pub fn get(&self, address: &str) -> Result<Gateway, TrainerError> {
        // Nothing under the lock can leave the map half-updated, so a
        // poisoned lock still holds a usable map.
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        let channel = match channels.get(address) {
            Some(channel) => channel.clone(),
            None => {
                let channel = endpoint(address)?
                    .connect_timeout(CONNECT_TIMEOUT)
                    .connect_lazy();
                channels.insert(address.to_owned(), channel.clone());
                channel
            }
        };
        Ok(Gateway::new(address, channel))
    }
}

/// One node's gateway: where trainers fetch the global model and push
/// their updates. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    /// `host:port`, for messages.
    address: String,
    client: GatewayServiceClient<Channel>,
}

/// A global model as a gateway served it, length and checksum verified.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalModel {
    /// Rounds finished to produce it; 0 is the initial model.
    pub version: u32,
    /// The parameters.
    pub params: Vec<f32>,
    /// SHA-256 of the parameters' little-endian bytes, lowercase hex.
    pub sha256: String,
}

impl Gateway {
    /// A gateway client over `channel`, for tests or callers that manage
    /// their own channels; [`GatewayPool::get`] is the usual way.
    pub fn new(address: &str, channel: Channel) -> Self {
        Self {
            address: address.to_owned(),
            client: GatewayServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
        }
    }

    /// The gateway's `host:port`.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Downloads the global model of `job_id`, at least version
    /// `min_version`, waiting up to `wait` for it to appear (zero lets the
    /// gateway pick, 30 seconds). A gateway caps how long one call waits, so
    /// a `DEADLINE_EXCEEDED` that comes before `wait` is up is asked again.
    /// The model is returned only if its length and SHA-256 match the
    /// header.
    pub async fn fetch_model(
        &self,
        job_id: u32,
        min_version: u32,
        wait: Duration,
    ) -> Result<GlobalModel, TrainerError> {
        let until = tokio::time::Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            match self.fetch_once(job_id, min_version, left).await {
                Err(err)
                    if err.code() == Some(Code::DeadlineExceeded)
                        && !wait.is_zero()
                        && tokio::time::Instant::now() + FETCH_RETRY_MIN < until => {}
                done => return done,
            }
        }
    }

    /// One `FetchModel` call: the header within `wait` (plus slack), then
    /// every chunk with no long silence.
    async fn fetch_once(
        &self,
        job_id: u32,
        min_version: u32,
        wait: Duration,
    ) -> Result<GlobalModel, TrainerError> {
        let request = pb::FetchModelRequest {
            job_id,
            min_version,
            wait_ms: u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
        };
        let header_wait = if wait.is_zero() {
            GATEWAY_DEFAULT_WAIT
        } else {
            wait
        };
        let header_wait = header_wait.saturating_add(FETCH_STALL_TIMEOUT);

        let mut client = self.client.clone();
        let opened = async {
            let mut stream = client
                .fetch_model(request)
                .await
                .map_err(rejected("fetch model"))?
                .into_inner();
            let first = stream.message().await.map_err(rejected("fetch model"))?;
            Ok::<_, TrainerError>((stream, first))
        };
        let (stream, first) = tokio::time::timeout(header_wait, opened)
            .await
            .map_err(|_| TrainerError::Timeout {
                what: "fetching the model's header",
                after: header_wait,
            })??;

        let header = match first.and_then(|m| m.part) {
            Some(ModelPart::Header(header)) => header,
            _ => {
                return Err(gateway_protocol(
                    "the download does not start with a header",
                ))
            }
        };
        let download = ModelDownload::start(job_id, min_version, header)?;
        receive_model(stream, download).await
    }

    /// Uploads `params`, trained for `assignment` from `samples` samples,
    /// as `trainer_id`: a header, then chunks of at most [`CHUNK_BYTES`],
    /// each encoded from the slice as it is sent. Gives up once the
    /// assignment's deadline is well past. The gateway is not checked
    /// against `assignment.gateway_address`: pushing elsewhere is allowed,
    /// and the gateway decides.
    pub async fn push_update(
        &self,
        assignment: &TrainerAssignment,
        trainer_id: &str,
        samples: u64,
        params: &[f32],
    ) -> Result<PushUpdateResponse, TrainerError> {
        let header = pb::UpdateHeader {
            job_id: assignment.job_id,
            round: assignment.round,
            trainer_id: trainer_id.to_owned(),
            samples,
        };
        let upload = self.upload(header, params);
        if assignment.deadline_unix_ms == 0 {
            return upload.await;
        }
        let limit = time_until(assignment.deadline_unix_ms).saturating_add(PUSH_GRACE);
        tokio::time::timeout(limit, upload)
            .await
            .map_err(|_| TrainerError::Timeout {
                what: "pushing the update",
                after: limit,
            })?
    }

    /// Streams `header` then `params` in chunks: the call and the encoder
    /// run side by side, joined by a small queue, so the model is copied
    /// once, a chunk at a time, into the request and never whole.
    async fn upload(
        &self,
        header: pb::UpdateHeader,
        params: &[f32],
    ) -> Result<PushUpdateResponse, TrainerError> {
        let (tx, rx) = mpsc::channel(PUSH_QUEUE_CHUNKS);
        let requests = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        });
        let mut client = self.client.clone();
        let call = client.push_update(requests);

        let feed = async move {
            let first = pb::PushUpdateRequest {
                part: Some(UpdatePart::Header(header)),
            };
            if tx.send(first).await.is_err() {
                return;
            }
            for chunk in encode_chunks(params, CHUNK_BYTES) {
                let message = pb::PushUpdateRequest {
                    part: Some(UpdatePart::Chunk(chunk)),
                };
                // A closed queue means the call already ended; its status
                // says why.
                if tx.send(message).await.is_err() {
                    return;
                }
            }
        };

        // If the gateway answers before the upload is done (a refusal),
        // stop encoding: dropping the feed closes the queue.
        tokio::pin!(call);
        let response = tokio::select! {
            response = &mut call => response,
            () = feed => call.await,
        };
        Ok(response.map_err(rejected("push update"))?.into_inner())
    }
}

/// Reads the rest of a download into `download` and verifies it.
async fn receive_model(
    mut stream: Streaming<pb::FetchModelResponse>,
    mut download: ModelDownload,
) -> Result<GlobalModel, TrainerError> {
    loop {
        let next = tokio::time::timeout(FETCH_STALL_TIMEOUT, stream.message())
            .await
            .map_err(|_| TrainerError::Timeout {
                what: "the gateway's next model chunk",
                after: FETCH_STALL_TIMEOUT,
            })?
            .map_err(rejected("fetch model"))?;
        match next.map(|m| m.part) {
            None => return download.finish(),
            Some(Some(ModelPart::Chunk(bytes))) => download.push(&bytes)?,
            Some(Some(ModelPart::Header(_))) => {
                return Err(gateway_protocol("a second header in one download"));
            }
            Some(None) => return Err(gateway_protocol("a download message with no part")),
        }
    }
}

fn gateway_protocol(reason: &str) -> TrainerError {
    TrainerError::Protocol {
        peer: "gateway",
        reason: reason.to_owned(),
    }
}

/// `params` as little-endian bytes in chunks of at most `chunk_bytes`
/// (rounded down to whole `f32` values, at least one), encoded lazily.
fn encode_chunks(params: &[f32], chunk_bytes: usize) -> impl Iterator<Item = Vec<u8>> + '_ {
    let per_chunk = (chunk_bytes / 4).max(1);
    params.chunks(per_chunk).map(|values| {
        let mut bytes = Vec::with_capacity(values.len() * 4);
        for value in values {
            bytes.extend_from_slice(&value.to_le_bytes());
        }
        bytes
    })
}

/// A model download in progress: decodes and hashes chunks as they arrive
/// and checks the whole against the header. Chunks may split a value; the
/// split bytes wait for the next chunk.
#[derive(Debug)]
struct ModelDownload {
    version: u32,
    /// Bytes the header announced.
    expected_bytes: u64,
    /// SHA-256 the header announced, lowercase hex.
    expected_sha256: String,
    received_bytes: u64,
    hasher: Sha256,
    params: Vec<f32>,
    /// The first bytes of a value split across chunks.
    partial: Vec<u8>,
}

impl ModelDownload {
    /// Checks `header` against the request before any bytes are read.
    fn start(job_id: u32, min_version: u32, header: pb::ModelHeader) -> Result<Self, TrainerError> {
        if header.job_id != job_id {
            return Err(gateway_protocol(&format!(
                "asked for job {job_id}, got job {}",
                header.job_id
            )));
        }
        if header.version < min_version {
            return Err(gateway_protocol(&format!(
                "asked for version {min_version} or later, got {}",
                header.version
            )));
        }
        if header.bytes % 4 != 0 {
            return Err(gateway_protocol(&format!(
                "a model of {} bytes is not a whole number of f32 values",
                header.bytes
            )));
        }
        let sha256 = header.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(gateway_protocol("the header's sha256 is not 64 hex digits"));
        }

        // The header is only a claim: reserve for it within reason.
        let reserve = header.bytes.min(MAX_RESERVE_BYTES) / 4;
        Ok(Self {
            version: header.version,
            expected_bytes: header.bytes,
            expected_sha256: sha256,
            received_bytes: 0,
            hasher: Sha256::new(),
            params: Vec::with_capacity(usize::try_from(reserve).unwrap_or(0)),
            partial: Vec::with_capacity(4),
        })
    }

    /// Takes the next chunk of bytes.
    fn push(&mut self, mut chunk: &[u8]) -> Result<(), TrainerError> {
        self.received_bytes = self.received_bytes.saturating_add(chunk.len() as u64);
        if self.received_bytes > self.expected_bytes {
            return Err(TrainerError::LengthMismatch {
                expected: self.expected_bytes,
                found: self.received_bytes,
            });
        }
        self.hasher.update(chunk);

        // Complete a value the previous chunk split.
        if !self.partial.is_empty() {
            let take = (4 - self.partial.len()).min(chunk.len());
            self.partial.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
            if let Ok(bytes) = <[u8; 4]>::try_from(self.partial.as_slice()) {
                self.params.push(f32::from_le_bytes(bytes));
                self.partial.clear();
            }
        }

        let mut values = chunk.chunks_exact(4);
        for bytes in values.by_ref() {
            let mut word = [0u8; 4];
            word.copy_from_slice(bytes);
            self.params.push(f32::from_le_bytes(word));
        }
        self.partial.extend_from_slice(values.remainder());
        Ok(())
    }

    /// Checks the length and checksum, and returns the model.
    fn finish(self) -> Result<GlobalModel, TrainerError> {
        // `expected_bytes` is a multiple of 4, so a full length leaves no
        // split value behind.
        if self.received_bytes != self.expected_bytes {
            return Err(TrainerError::LengthMismatch {
                expected: self.expected_bytes,
                found: self.received_bytes,
            });
        }
        let found = to_hex(&self.hasher.finalize());
        if found != self.expected_sha256 {
            return Err(TrainerError::ChecksumMismatch {
                expected: self.expected_sha256,
                found,
            });
        }
        Ok(GlobalModel {
            version: self.version,
            params: self.params,
            sha256: found,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;

    use futures_util::Stream;
    use lifl_proto::v1::gateway_service_server::{GatewayService, GatewayServiceServer};
    use lifl_proto::v1::round_service_server::{RoundService, RoundServiceServer};
    use tokio::net::TcpListener;
    use tokio_stream::wrappers::TcpListenerStream;
    use tonic::{Request, Response, Streaming};

    use super::*;
    use crate::checksum::sha256_hex;

    fn le_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn header(version: u32, bytes: &[u8]) -> pb::ModelHeader {
        pb::ModelHeader {
            job_id: 7,
            version,
            bytes: bytes.len() as u64,
            sha256: sha256_hex(bytes),
        }
    }

    fn job(state: JobState, model_version: u32) -> Job {
        Job {
            id: 7,
            state: state as i32,
            model_version,
            failure: "leaf died".to_owned(),
            ..Job::default()
        }
    }

    #[test]
    fn chunks_hold_whole_f32_values_and_rebuild_the_model() {
        let params: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.25).collect();
        let chunks: Vec<Vec<u8>> = encode_chunks(&params, 1022).collect();

        // 1022 bytes round down to 255 values: 3 full chunks and 235 values.
        let sizes: Vec<usize> = chunks.iter().map(Vec::len).collect();
        assert_eq!(sizes, [1020, 1020, 1020, 940]);
        assert_eq!(chunks.concat(), le_bytes(&params));
    }

    #[test]
    fn a_model_of_several_mib_goes_in_1_mib_chunks() {
        let params = vec![1.5f32; 600_000];
        let sizes: Vec<usize> = encode_chunks(&params, CHUNK_BYTES)
            .map(|c| c.len())
            .collect();
        assert_eq!(
            sizes,
            [CHUNK_BYTES, CHUNK_BYTES, 2_400_000 - 2 * CHUNK_BYTES]
        );
        assert_eq!(encode_chunks(&[], CHUNK_BYTES).count(), 0);
    }

    #[test]
    fn download_decodes_values_split_across_chunks() {
        let params = [1.0f32, -2.5, f32::MAX, 3.25e-9];
        let bytes = le_bytes(&params);
        let mut download = ModelDownload::start(7, 2, header(3, &bytes)).unwrap();
        for piece in [&bytes[..3], &bytes[3..4], &bytes[4..11], &bytes[11..]] {
            download.push(piece).unwrap();
        }

        let model = download.finish().unwrap();
        assert_eq!(model.params, params);
        assert_eq!(model.version, 3);
        assert_eq!(model.sha256, sha256_hex(&bytes));
    }

    #[test]
    fn download_refuses_a_wrong_checksum_or_length() {
        let bytes = le_bytes(&[1.0, 2.0]);
        let mut tampered = bytes.clone();
        tampered[0] ^= 1;
        let mut download = ModelDownload::start(7, 0, header(1, &bytes)).unwrap();
        download.push(&tampered).unwrap();
        match download.finish() {
            Err(TrainerError::ChecksumMismatch { expected, found }) => {
                assert_eq!(expected, sha256_hex(&bytes));
                assert_eq!(found, sha256_hex(&tampered));
            }
            other => panic!("{other:?}"),
        }

        let mut short = ModelDownload::start(7, 0, header(1, &bytes)).unwrap();
        short.push(&bytes[..4]).unwrap();
        assert!(matches!(
            short.finish(),
            Err(TrainerError::LengthMismatch {
                expected: 8,
                found: 4
            })
        ));

        let mut long = ModelDownload::start(7, 0, header(1, &bytes)).unwrap();
        long.push(&bytes).unwrap();
        assert!(matches!(
            long.push(&[0]),
            Err(TrainerError::LengthMismatch {
                expected: 8,
                found: 9
            })
        ));
    }

    #[test]
    fn download_refuses_headers_that_do_not_fit_the_request() {
        let bytes = le_bytes(&[1.0]);
        let reasons: Vec<String> = [
            (8, 0, header(1, &bytes)),
            (7, 2, header(1, &bytes)),
            (
                7,
                0,
                pb::ModelHeader {
                    bytes: 6,
                    ..header(1, &bytes)
                },
            ),
            (
                7,
                0,
                pb::ModelHeader {
                    sha256: "abc".into(),
                    ..header(1, &bytes)
                },
            ),
        ]
        .into_iter()
        .map(
            |(job_id, min, h)| match ModelDownload::start(job_id, min, h) {
                Err(TrainerError::Protocol {
                    peer: "gateway",
                    reason,
                }) => reason,
                other => panic!("{other:?}"),
            },
        )
        .collect();
        assert_eq!(
            reasons,
            [
                "asked for job 8, got job 7",
                "asked for version 2 or later, got 1",
                "a model of 6 bytes is not a whole number of f32 values",
                "the header's sha256 is not 64 hex digits",
            ]
        );

        // Uppercase hex is the same checksum.
        let upper = pb::ModelHeader {
            sha256: sha256_hex(&bytes).to_uppercase(),
            ..header(1, &bytes)
        };
        let mut download = ModelDownload::start(7, 0, upper).unwrap();
        download.push(&bytes).unwrap();
        assert_eq!(download.finish().unwrap().params, [1.0]);
    }

    #[test]
    fn waiting_ends_at_the_version_or_when_the_job_cannot_reach_it() {
        assert!(progress(job(JobState::Running, 2), 3).unwrap().is_none());
        assert!(progress(job(JobState::Pending, 0), 1).unwrap().is_none());
        assert_eq!(
            progress(job(JobState::Running, 3), 3)
                .unwrap()
                .map(|j| j.model_version),
            Some(3)
        );
        assert!(progress(job(JobState::Completed, 5), 3).unwrap().is_some());

        for (state, name) in [
            (JobState::Failed, "failed"),
            (JobState::Cancelled, "cancelled"),
            (JobState::Completed, "completed"),
        ] {
            let err = progress(job(state, 2), 3).unwrap_err();
            assert!(matches!(
                err,
                TrainerError::JobEnded {
                    job_id: 7,
                    model_version: 2,
                    ..
                }
            ));
            assert_eq!(
                err.to_string(),
                format!("job 7 ended {name} at model version 2: leaf died")
            );
            assert!(!err.is_retryable());
        }
    }

    #[test]
    fn layout_counts_f32_values_and_refuses_other_dtypes() {
        let tensor = |name: &str, shape: &[u64], dtype: &str| pb::Tensor {
            name: name.to_owned(),
            shape: shape.to_vec(),
            dtype: dtype.to_owned(),
        };
        let layout = ModelLayout {
            tensors: vec![tensor("w", &[10, 32], "f32"), tensor("b", &[10], "f32")],
        };
        assert_eq!(layout_f32_values(&layout).unwrap(), 330);

        let half = ModelLayout {
            tensors: vec![tensor("w", &[4], "f16")],
        };
        assert!(matches!(
            layout_f32_values(&half),
            Err(TrainerError::UnsupportedLayout(_))
        ));
        let huge = ModelLayout {
            tensors: vec![tensor("w", &[u64::MAX, 2], "f32")],
        };
        assert!(matches!(
            layout_f32_values(&huge),
            Err(TrainerError::UnsupportedLayout(_))
        ));
    }

    #[test]
    fn status_codes_decide_fault_and_retry() {
        let err = |code| TrainerError::Rejected {
            call: "push update",
            status: Status::new(code, "arena full"),
        };
        assert!(err(Code::ResourceExhausted).is_retryable());
        assert!(err(Code::Unavailable).is_retryable());
        assert!(!err(Code::InvalidArgument).is_retryable());
        assert_eq!(err(Code::AlreadyExists).fault(), Fault::Caller);
        assert_eq!(err(Code::Internal).fault(), Fault::Platform);
        assert_eq!(err(Code::NotFound).code(), Some(Code::NotFound));
        assert_eq!(
            err(Code::ResourceExhausted).to_string(),
            "push update failed: ResourceExhausted: arena full"
        );
    }

    #[tokio::test]
    async fn a_token_a_header_cannot_carry_is_refused_up_front() {
        let channel = Endpoint::from_static("http://127.0.0.1:9").connect_lazy();
        let refused = TrainerClient::from_channel(channel, Some("bad\ntoken".into()));
        assert!(matches!(refused, Err(TrainerError::InvalidToken)));
    }

    /// What a fake gateway answers, and what it was sent.
    #[derive(Default)]
    struct FakeGateway {
        /// Messages `FetchModel` streams.
        download: Vec<pb::FetchModelResponse>,
        /// Status `PushUpdate` ends with after reading the whole upload.
        refuse_push: Option<Status>,
        /// Status `PushUpdate` ends with right after the header, unread
        /// chunks and all.
        refuse_after_header: Option<Status>,
        /// Every upload, message by message.
        uploads: Arc<Mutex<Vec<Vec<pb::PushUpdateRequest>>>>,
        /// `FetchModel` calls to answer `DEADLINE_EXCEEDED` before serving,
        /// as a gateway does when its own wait cap runs out first.
        early_deadlines: std::sync::atomic::AtomicUsize,
    }

    type ModelStream = Pin<Box<dyn Stream<Item = Result<pb::FetchModelResponse, Status>> + Send>>;

    #[tonic::async_trait]
    impl GatewayService for FakeGateway {
        async fn push_update(
            &self,
            request: Request<Streaming<pb::PushUpdateRequest>>,
        ) -> Result<Response<PushUpdateResponse>, Status> {
            let mut stream = request.into_inner();
            let mut messages = Vec::new();
            let mut bytes = 0;
            while let Some(message) = stream.message().await? {
                if let Some(status) = &self.refuse_after_header {
                    return Err(status.clone());
                }
                if let Some(UpdatePart::Chunk(chunk)) = &message.part {
                    bytes += chunk.len() as u64;
                }
                messages.push(message);
            }
            self.uploads.lock().unwrap().push(messages);
            match &self.refuse_push {
                Some(status) => Err(status.clone()),
                None => Ok(Response::new(PushUpdateResponse {
                    bytes,
                    leaf_endpoint_id: 41,
                })),
            }
        }

        type FetchModelStream = ModelStream;

        async fn fetch_model(
            &self,
            _: Request<pb::FetchModelRequest>,
        ) -> Result<Response<ModelStream>, Status> {
            use std::sync::atomic::Ordering;
            let early = self.early_deadlines.load(Ordering::SeqCst);
            if early > 0 {
                self.early_deadlines.store(early - 1, Ordering::SeqCst);
                return Err(Status::deadline_exceeded(
                    "version 3 did not appear within 30s",
                ));
            }
            let messages = self.download.clone().into_iter().map(Ok);
            Ok(Response::new(Box::pin(futures_util::stream::iter(
                messages,
            ))))
        }
    }

    /// Serves `gateway` on 127.0.0.1:0 and returns a client for it.
    async fn serve_gateway(gateway: FakeGateway) -> Gateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(GatewayServiceServer::new(gateway))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        GatewayPool::new().get(&address).unwrap()
    }

    fn model_messages(header: pb::ModelHeader, chunks: &[&[u8]]) -> Vec<pb::FetchModelResponse> {
        let mut messages = vec![pb::FetchModelResponse {
            part: Some(ModelPart::Header(header)),
        }];
        messages.extend(chunks.iter().map(|c| pb::FetchModelResponse {
            part: Some(ModelPart::Chunk(c.to_vec())),
        }));
        messages
    }

    fn assignment() -> TrainerAssignment {
        TrainerAssignment {
            job_id: 7,
            round: 4,
            model_version: 3,
            gateway_address: "unused".to_owned(),
            leaf_endpoint_id: 41,
            node_id: "node-a".to_owned(),
            deadline_unix_ms: 0,
        }
    }

    #[tokio::test]
    async fn push_streams_a_header_then_whole_f32_chunks() {
        let uploads = Arc::default();
        let gateway = serve_gateway(FakeGateway {
            uploads: Arc::clone(&uploads),
            ..FakeGateway::default()
        })
        .await;
        // Just over 2 MiB: two full chunks and a short one.
        let params: Vec<f32> = (0..600_000).map(|i| (i % 977) as f32 - 0.125).collect();

        let response = gateway
            .push_update(&assignment(), "t-1", 120, &params)
            .await
            .unwrap();
        assert_eq!(
            response,
            PushUpdateResponse {
                bytes: 2_400_000,
                leaf_endpoint_id: 41
            }
        );

        let uploads = uploads.lock().unwrap();
        let messages = &uploads[0];
        let expected_header = pb::UpdateHeader {
            job_id: 7,
            round: 4,
            trainer_id: "t-1".to_owned(),
            samples: 120,
        };
        assert_eq!(messages[0].part, Some(UpdatePart::Header(expected_header)));
        let chunks: Vec<&Vec<u8>> = messages[1..]
            .iter()
            .map(|m| match &m.part {
                Some(UpdatePart::Chunk(chunk)) => chunk,
                other => panic!("expected a chunk, got {other:?}"),
            })
            .collect();
        let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(
            sizes,
            [CHUNK_BYTES, CHUNK_BYTES, 2_400_000 - 2 * CHUNK_BYTES]
        );
        let sent: Vec<u8> = chunks.into_iter().flatten().copied().collect();
        assert_eq!(sent, le_bytes(&params));
    }

    #[tokio::test]
    async fn a_refused_push_keeps_the_gateways_status() {
        let refusal = Status::already_exists("trainer t-1 already pushed round 4");
        let gateway = serve_gateway(FakeGateway {
            refuse_push: Some(refusal),
            ..FakeGateway::default()
        })
        .await;

        let err = gateway
            .push_update(&assignment(), "t-1", 1, &[1.0; 8])
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::AlreadyExists));
        assert_eq!(
            err.status().map(Status::message),
            Some("trainer t-1 already pushed round 4")
        );
    }

    #[tokio::test]
    async fn a_push_refused_midway_stops_encoding_and_returns() {
        let refusal = Status::not_found("trainer t-1 was not admitted to round 4");
        let gateway = serve_gateway(FakeGateway {
            refuse_after_header: Some(refusal),
            ..FakeGateway::default()
        })
        .await;

        // 32 MiB: far more than the queue and the transport's windows hold,
        // so the upload is still being encoded when the refusal comes.
        let params = vec![0.25f32; 8 << 20];
        let assignment = assignment();
        let pushed = gateway.push_update(&assignment, "t-1", 1, &params);
        let err = tokio::time::timeout(Duration::from_secs(20), pushed)
            .await
            .expect("a refused upload returns")
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::NotFound));
    }

    #[tokio::test]
    async fn fetch_returns_a_verified_model_and_refuses_a_corrupt_one() {
        let params = [0.5f32, -1.0, 2.0, 4.5, 8.0];
        let bytes = le_bytes(&params);
        // Chunks that split values, as a gateway is allowed to send.
        let good = model_messages(header(3, &bytes), &[&bytes[..6], &bytes[6..]]);
        let gateway = serve_gateway(FakeGateway {
            download: good,
            ..FakeGateway::default()
        })
        .await;
        let model = gateway
            .fetch_model(7, 3, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            model,
            GlobalModel {
                version: 3,
                params: params.to_vec(),
                sha256: sha256_hex(&bytes)
            }
        );

        let mut corrupt = bytes.clone();
        corrupt[19] ^= 0x80;
        let bad = model_messages(header(3, &bytes), &[&corrupt]);
        let gateway = serve_gateway(FakeGateway {
            download: bad,
            ..FakeGateway::default()
        })
        .await;
        let err = gateway
            .fetch_model(7, 3, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TrainerError::ChecksumMismatch { .. }),
            "{err:?}"
        );

        let headless = model_messages(header(3, &bytes), &[&bytes])[1..].to_vec();
        let gateway = serve_gateway(FakeGateway {
            download: headless,
            ..FakeGateway::default()
        })
        .await;
        let err = gateway
            .fetch_model(7, 3, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "protocol error from the gateway: the download does not start with a header"
        );
    }

    #[tokio::test]
    async fn fetch_asks_again_when_the_gateway_stops_waiting_early() {
        let bytes = le_bytes(&[4.0, 2.0]);
        let gateway = serve_gateway(FakeGateway {
            download: model_messages(header(3, &bytes), &[&bytes]),
            early_deadlines: 2.into(),
            ..FakeGateway::default()
        })
        .await;
        let model = gateway
            .fetch_model(7, 3, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(model.params, [4.0, 2.0]);

        // Asked to leave the wait to the gateway, the client takes its answer.
        let gateway = serve_gateway(FakeGateway {
            download: model_messages(header(3, &bytes), &[&bytes]),
            early_deadlines: 1.into(),
            ..FakeGateway::default()
        })
        .await;
        let err = gateway.fetch_model(7, 3, Duration::ZERO).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::DeadlineExceeded));
    }

    /// A control plane's `JobService` whose watch sends `events`, then ends;
    /// `GetJob` answers `after_watch`.
    struct FakeJobs {
        events: Vec<pb::JobEvent>,
        after_watch: Job,
    }

    type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

    #[tonic::async_trait]
    impl pb::job_service_server::JobService for FakeJobs {
        async fn create_job(
            &self,
            _: Request<pb::CreateJobRequest>,
        ) -> Result<Response<pb::CreateJobResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn get_job(&self, _: Request<pb::GetJobRequest>) -> Result<Response<Job>, Status> {
            Ok(Response::new(self.after_watch.clone()))
        }

        async fn list_jobs(
            &self,
            _: Request<pb::ListJobsRequest>,
        ) -> Result<Response<pb::ListJobsResponse>, Status> {
            Err(Status::unimplemented("fake"))
        }

        async fn cancel_job(
            &self,
            _: Request<pb::CancelJobRequest>,
        ) -> Result<Response<Job>, Status> {
            Err(Status::unimplemented("fake"))
        }

        type WatchJobStream = EventStream;

        async fn watch_job(
            &self,
            _: Request<pb::WatchJobRequest>,
        ) -> Result<Response<EventStream>, Status> {
            let events = self.events.clone().into_iter().map(Ok);
            Ok(Response::new(Box::pin(futures_util::stream::iter(events))))
        }

        async fn get_topology(
            &self,
            _: Request<pb::GetTopologyRequest>,
        ) -> Result<Response<pb::Topology>, Status> {
            Err(Status::unimplemented("fake"))
        }
    }

    async fn serve_jobs(jobs: FakeJobs) -> TrainerClient {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(pb::job_service_server::JobServiceServer::new(jobs))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        TrainerClient::connect(&address, None).await.unwrap()
    }

    fn event(job: Option<Job>) -> pb::JobEvent {
        pb::JobEvent { job, kind: None }
    }

    #[tokio::test]
    async fn waiting_follows_the_watch_past_events_without_a_job() {
        let client = serve_jobs(FakeJobs {
            events: vec![
                event(Some(job(JobState::Running, 1))),
                event(None),
                event(Some(job(JobState::Running, 2))),
                event(Some(job(JobState::Running, 3))),
            ],
            after_watch: job(JobState::Running, 0),
        })
        .await;
        let reached = client
            .wait_for_version(7, 2, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(reached.model_version, 2);
    }

    #[tokio::test]
    async fn waiting_fails_when_the_job_fails_after_the_watch_ends() {
        let client = serve_jobs(FakeJobs {
            events: vec![event(Some(job(JobState::Running, 1)))],
            after_watch: job(JobState::Failed, 1),
        })
        .await;
        let err = client
            .wait_for_version(7, 2, Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                TrainerError::JobEnded {
                    state: JobState::Failed,
                    model_version: 1,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn waiting_gives_up_after_the_timeout() {
        let client = serve_jobs(FakeJobs {
            events: vec![event(Some(job(JobState::Running, 1)))],
            after_watch: job(JobState::Running, 1),
        })
        .await;
        // Every watch ends short of the version, so the client watches
        // again and again until its time is up.
        let err = client
            .wait_for_version(7, 2, Duration::from_millis(600))
            .await
            .unwrap_err();
        assert!(matches!(err, TrainerError::Timeout { .. }), "{err:?}");
        assert!(err.is_retryable());
    }

    /// A control plane's `RoundService` that admits only `Bearer s3cret`.
    struct FakeRounds;

    #[tonic::async_trait]
    impl RoundService for FakeRounds {
        async fn join_round(
            &self,
            request: Request<pb::JoinRoundRequest>,
        ) -> Result<Response<TrainerAssignment>, Status> {
            let authorized = request
                .metadata()
                .get("authorization")
                .is_some_and(|v| v.as_bytes() == b"Bearer s3cret");
            if !authorized {
                return Err(Status::unauthenticated("invalid bearer token"));
            }
            let request = request.into_inner();
            Ok(Response::new(TrainerAssignment {
                job_id: request.job_id,
                gateway_address: format!("10.0.0.1:7500/{}", request.trainer_id),
                ..assignment()
            }))
        }
    }

    #[tokio::test]
    async fn join_presents_the_bearer_token() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RoundServiceServer::new(FakeRounds))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );

        let client = TrainerClient::connect(&address, Some("s3cret".into()))
            .await
            .unwrap();
        let assignment = client.join(7, "t-9").await.unwrap();
        assert_eq!((assignment.job_id, assignment.round), (7, 4));
        assert_eq!(assignment.gateway_address, "10.0.0.1:7500/t-9");

        let anonymous = TrainerClient::connect(&address, None).await.unwrap();
        let err = anonymous.join(7, "t-9").await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated));
        assert_eq!(err.fault(), Fault::Caller);
    }
}

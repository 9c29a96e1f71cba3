//! The round coordinator: the one owner of jobs, nodes and open rounds. It
//! validates and applies every change, writes it to the store before
//! acknowledging it, and publishes it as an [`Event`] to watchers.
//!
//! All state sits behind one async mutex. A change is made on a copy of the
//! job, written to the store while the lock is held, and only then swapped
//! in, so memory never runs ahead of the store and two changes to a job never
//! interleave. Joins of an open round touch only memory, which keeps them
//! cheap: the round's record learns its join count when the round finishes.
//!
//! A round ends when the top aggregator's node reports it (`CompleteRound`)
//! with at least the job's minimum of updates. A round still open past its
//! deadline plus a grace period fails the whole job: the data plane is the one
//! that aggregates k of n at the deadline, so silence means it could not.
//!
//! Every new admission is also published with the trainer's leaf and its node
//! ([`Event::TrainerAdmitted`]), so that the node's gateway learns whom to
//! accept updates from; [`Coordinator::current_work`] lists the admissions so
//! far for a node that connects, or falls behind, mid-round.
//!
//! LIMITATION: which trainers joined the open round lives only in memory. After
//! a restart the round stays open with its tree, but trainers that joined
//! before are unknown: a trainer that joins again gets a fresh assignment
//! (possibly another leaf) and counts again towards `trainers_per_round`, and
//! a node's catch-up lists only the trainers admitted since the restart. A
//! leaf may wait for an update that goes elsewhere until the round's deadline,
//! and a gateway that rebuilds its admitted set from the new stream refuses a
//! trainer that uploads without joining again. Writing joins in batches (one
//! commit per few milliseconds of joins) would close the gap.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, Mutex};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::auth::{mint_token, Auth, AuthError, TokenHash};
use crate::job::{unix_ms_now, Job, JobState, RoundRecord};
use crate::node::{Node, NodeStatus};
use crate::planner::{self, Aggregator, NodeCandidate, PlanError, Topology};
use crate::spec::{is_valid_name, AggregationMode, JobSpecDraft, SpecError, Tensor};
use crate::store::{Store, StoreError};

/// Default time between a node's heartbeats.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// Default heartbeats a node may miss before it is offline.
pub const DEFAULT_MISSED_HEARTBEATS: u32 = 3;
/// Default time past a round's deadline before the job fails for lack of a
/// result.
pub const DEFAULT_ROUND_GRACE: Duration = Duration::from_secs(30);
/// Events a watcher may fall behind by before it is sent a fresh snapshot. A
/// join publishes two (its progress and its admission), so this is about 4096
/// joins.
const EVENT_BACKLOG: usize = 8192;

/// How the coordinator judges liveness and deadlines, and who may call it.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How often nodes must send heartbeats.
    pub heartbeat_interval: Duration,
    /// Heartbeats a node may miss before it is offline.
    pub missed_heartbeats: u32,
    /// Time past a round's deadline before the job fails.
    pub round_grace: Duration,
    /// The admin token, if auth is on.
    pub auth: Auth,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            missed_heartbeats: DEFAULT_MISSED_HEARTBEATS,
            round_grace: DEFAULT_ROUND_GRACE,
            auth: Auth::default(),
        }
    }
}

/// Something that happened to a job, as watchers see it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The job changed state; `job` is the job after the change.
    StateChanged {
        /// The job after the change.
        job: Arc<Job>,
        /// The state before.
        from: JobState,
    },
    /// A round started.
    RoundStarted {
        /// The job after the round started.
        job: Arc<Job>,
        /// The round's tree.
        topology: Arc<Topology>,
    },
    /// Trainers joined the open round.
    RoundProgress {
        /// Job id.
        job_id: u32,
        /// Round number.
        round: u32,
        /// Trainers joined so far.
        trainers_joined: u32,
        /// Trainers the round admits.
        trainers_per_round: u32,
    },
    /// A round finished.
    RoundFinished {
        /// The job after the round finished.
        job: Arc<Job>,
        /// The round's record.
        record: RoundRecord,
    },
    /// A trainer joined the open round for the first time (a repeat join
    /// publishes nothing). Published after the round's `RoundStarted` and
    /// its own `RoundProgress`.
    TrainerAdmitted {
        /// Job id.
        job_id: u32,
        /// Round number.
        round: u32,
        /// The node its leaf runs on.
        node_id: String,
        /// The trainer and its leaf.
        seat: TrainerSeat,
    },
}

impl Event {
    /// The job the event is about.
    pub fn job_id(&self) -> u32 {
        match self {
            Self::StateChanged { job, .. }
            | Self::RoundStarted { job, .. }
            | Self::RoundFinished { job, .. } => job.id,
            Self::RoundProgress { job_id, .. } | Self::TrainerAdmitted { job_id, .. } => *job_id,
        }
    }
}

/// Where one trainer sends its update for one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainerAssignment {
    /// Job id.
    pub job_id: u32,
    /// Round number.
    pub round: u32,
    /// Version of the model to train from.
    pub model_version: u32,
    /// Gateway of the leaf's node.
    pub gateway_address: String,
    /// The leaf aggregator.
    pub leaf_endpoint_id: u32,
    /// The leaf's node.
    pub node_id: String,
    /// Upload deadline, in milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
}

/// A trainer admitted to a round, and the leaf it sends its update to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainerSeat {
    /// The trainer's id, as it joined.
    pub trainer_id: String,
    /// Endpoint id of its leaf aggregator.
    pub leaf_endpoint_id: u32,
}

/// Where a parent aggregator on another node lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocation {
    /// The parent's endpoint id.
    pub endpoint_id: u32,
    /// Its node.
    pub node_id: String,
    /// That node's peer address.
    pub peer_address: String,
}

/// The aggregators one node runs for one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeWork {
    /// Job id.
    pub job_id: u32,
    /// Round number.
    pub round: u32,
    /// The model's tensors.
    pub tensors: Vec<Tensor>,
    /// Eager or lazy.
    pub mode: AggregationMode,
    /// Round deadline, in milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
    /// Aggregators placed on the node.
    pub aggregators: Vec<Aggregator>,
    /// Parents of those aggregators that live on other nodes.
    pub remote_parents: Vec<ParentLocation>,
}

/// A node's part in an open round, as of one moment: what a node that
/// connects, or fell behind, needs to catch up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenWork {
    /// The aggregators it runs.
    pub work: NodeWork,
    /// Trainers admitted so far whose leaf is on the node, by leaf and then
    /// trainer id.
    pub seats: Vec<TrainerSeat>,
}

/// Why a coordinator operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// The job spec is not acceptable.
    #[error("invalid job spec: {0}")]
    InvalidSpec(#[from] SpecError),
    /// One request field is not acceptable.
    #[error("{field}: {reason}")]
    InvalidField {
        /// The field's path in the request.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// No job has this id.
    #[error("job {0} not found")]
    JobNotFound(u32),
    /// No node has this id.
    #[error("node {0:?} not found; register it first")]
    NodeNotFound(String),
    /// The job has not started a round.
    #[error("job {0} has not started a round yet")]
    NoRound(u32),
    /// The job already ended.
    #[error("job {job_id} already ended ({})", state.as_str())]
    JobEnded {
        /// Job id.
        job_id: u32,
        /// The state it ended in.
        state: JobState,
    },
    /// A report named a round that is not open.
    #[error("job {job_id}: round {round} is not open (open round: {})",
        open.map_or_else(|| "none".to_owned(), |r| r.to_string()))]
    WrongRound {
        /// Job id.
        job_id: u32,
        /// The round named.
        round: u32,
        /// The open round, if any.
        open: Option<u32>,
    },
    /// The open round admitted all its trainers.
    #[error("job {job_id}: round {round} already admitted all {trainers_per_round} trainers")]
    RoundFull {
        /// Job id.
        job_id: u32,
        /// Round number.
        round: u32,
        /// Trainers the round admits.
        trainers_per_round: u32,
    },
    /// Every leaf of the open round is on a node that is offline.
    #[error("job {job_id}: every leaf of round {round} is on an offline node; retry later")]
    NoOnlineLeaf {
        /// Job id.
        job_id: u32,
        /// Round number.
        round: u32,
    },
    /// The next round could not be planned.
    #[error("job {job_id}: cannot plan round {round}")]
    Plan {
        /// Job id.
        job_id: u32,
        /// Round number.
        round: u32,
        /// Why.
        #[source]
        source: PlanError,
    },
    /// Every job id is taken.
    #[error("job ids are exhausted")]
    JobIdsExhausted,
    /// The operating system gave no randomness for a token.
    #[error("mint a trainer token")]
    Token(#[source] getrandom::Error),
    /// The store failed; the change was not made.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A job and its open round's joins.
#[derive(Debug)]
struct JobEntry {
    job: Job,
    /// Assignments of the open round, by trainer id.
    joined: HashMap<String, TrainerAssignment>,
}

/// A node and its liveness.
#[derive(Debug)]
struct NodeEntry {
    node: Node,
    /// `None` until the first heartbeat since start-up.
    last_heartbeat: Option<Instant>,
    last_heartbeat_unix_ms: u64,
    online: bool,
}

#[derive(Debug, Default)]
struct State {
    jobs: BTreeMap<u32, JobEntry>,
    nodes: BTreeMap<String, NodeEntry>,
    /// The next endpoint id to hand out, from 1; never reused. Wider than
    /// an id so that the one after `u32::MAX` is representable: reaching it
    /// means ids are exhausted, and planning refuses it instead of wrapping.
    next_endpoint_id: u64,
    /// Trainer token hashes, to the job each belongs to.
    trainer_tokens: HashMap<TokenHash, u32>,
}

/// Owns jobs, nodes and rounds; see the module docs.
#[derive(Debug)]
pub struct Coordinator {
    store: Arc<dyn Store>,
    config: CoordinatorConfig,
    state: Mutex<State>,
    /// Every event; watchers subscribe and filter by job or node.
    events: broadcast::Sender<Event>,
}

impl Coordinator {
    /// Loads every job and node from `store` and starts coordinating them.
    pub async fn open(
        store: Arc<dyn Store>,
        config: CoordinatorConfig,
    ) -> Result<Arc<Self>, StoreError> {
        let snapshot = store.load().await?;
        let mut state = State {
            next_endpoint_id: 1,
            ..State::default()
        };
        for job in snapshot.jobs {
            // A spec that no longer validates (edited, or from a laxer
            // version) would break the planner's assumptions: refuse it.
            if let Err(e) = JobSpecDraft::from(&job.spec).validate() {
                return Err(StoreError::Corrupt {
                    key: format!("jobs/{}", job.id),
                    source: Box::new(e),
                });
            }
            if let Some(hash) = TokenHash::from_hex(&job.trainer_token_sha256) {
                state.trainer_tokens.insert(hash, job.id);
            }
            // Ids grow with every round, so each job's latest tree holds its
            // highest; the next id follows the highest of them all.
            if let Some(last) = job.topology.as_ref().and_then(|t| t.last_endpoint_id()) {
                state.next_endpoint_id = state.next_endpoint_id.max(u64::from(last) + 1);
            }
            let joined = HashMap::new();
            state.jobs.insert(job.id, JobEntry { job, joined });
        }
        for node in snapshot.nodes {
            let entry = NodeEntry {
                node,
                last_heartbeat: None,
                last_heartbeat_unix_ms: 0,
                online: false,
            };
            state.nodes.insert(entry.node.id.clone(), entry);
        }
        info!(
            jobs = state.jobs.len(),
            nodes = state.nodes.len(),
            "loaded state"
        );

        let (events, _) = broadcast::channel(EVENT_BACKLOG);
        Ok(Arc::new(Self {
            store,
            config,
            state: Mutex::new(state),
            events,
        }))
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &CoordinatorConfig {
        &self.config
    }

    /// Every event from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    fn publish(&self, event: Event) {
        // No watcher is not an error.
        let _ = self.events.send(event);
    }

    /// Allows admin calls: the admin token, or any call when auth is off.
    /// A trainer token is valid but out of scope here.
    pub async fn authorize_admin(&self, token: Option<&str>) -> Result<(), AuthError> {
        if self.config.auth.is_admin(token) {
            return Ok(());
        }
        let token = token.ok_or(AuthError::Missing)?;
        let state = self.state.lock().await;
        if state.trainer_tokens.contains_key(&TokenHash::of(token)) {
            return Err(AuthError::OutOfScope {
                scope: "admin calls".to_owned(),
            });
        }
        Err(AuthError::Invalid)
    }

    /// Allows round calls on `job_id`: the admin token or that job's trainer
    /// token.
    pub async fn authorize_trainer(
        &self,
        token: Option<&str>,
        job_id: u32,
    ) -> Result<(), AuthError> {
        if self.config.auth.is_admin(token) {
            return Ok(());
        }
        let token = token.ok_or(AuthError::Missing)?;
        let state = self.state.lock().await;
        match state.trainer_tokens.get(&TokenHash::of(token)) {
            Some(&owner) if owner == job_id => Ok(()),
            Some(_) => Err(AuthError::OutOfScope {
                scope: format!("job {job_id}"),
            }),
            None => Err(AuthError::Invalid),
        }
    }

    /// Validates `draft` and stores a new PENDING job; returns it with its
    /// trainer token, which is not kept.
    pub async fn create_job(
        &self,
        draft: &JobSpecDraft,
    ) -> Result<(Job, String), CoordinatorError> {
        let spec = draft.validate()?;
        let token = mint_token().map_err(CoordinatorError::Token)?;
        let hash = TokenHash::of(&token);

        let mut state = self.state.lock().await;
        let id = match state.jobs.keys().next_back() {
            None => 1,
            Some(last) => last
                .checked_add(1)
                .ok_or(CoordinatorError::JobIdsExhausted)?,
        };
        let job = Job {
            id,
            spec,
            state: JobState::Pending,
            created_unix_ms: unix_ms_now(),
            model_version: 0,
            rounds: Vec::new(),
            failure: String::new(),
            trainer_token_sha256: hash.to_hex(),
            topology: None,
        };
        self.store.put_job(&job).await?;
        state.trainer_tokens.insert(hash, id);
        let joined = HashMap::new();
        state.jobs.insert(
            id,
            JobEntry {
                job: job.clone(),
                joined,
            },
        );
        drop(state);

        info!(job = id, name = %job.spec.name, "job created");
        Ok((job, token))
    }

    /// One job.
    pub async fn job(&self, job_id: u32) -> Result<Job, CoordinatorError> {
        let state = self.state.lock().await;
        let entry = state
            .jobs
            .get(&job_id)
            .ok_or(CoordinatorError::JobNotFound(job_id))?;
        Ok(entry.job.clone())
    }

    /// Every job, by ascending id.
    pub async fn jobs(&self) -> Vec<Job> {
        let state = self.state.lock().await;
        state.jobs.values().map(|e| e.job.clone()).collect()
    }

    /// The tree of the job's current (or last) round.
    pub async fn topology(&self, job_id: u32) -> Result<Arc<Topology>, CoordinatorError> {
        let job = self.job(job_id).await?;
        job.topology.ok_or(CoordinatorError::NoRound(job_id))
    }

    /// Cancels a job that has not ended.
    pub async fn cancel_job(&self, job_id: u32) -> Result<Job, CoordinatorError> {
        let mut state = self.state.lock().await;
        let job = live_job(&state, job_id)?.clone();
        let job = self
            .end_job(&mut state, job, JobState::Cancelled, String::new())
            .await?;
        Ok(job)
    }

    /// Ends `job` in `to`, writes it and tells watchers and nodes.
    async fn end_job(
        &self,
        state: &mut State,
        mut job: Job,
        to: JobState,
        failure: String,
    ) -> Result<Job, CoordinatorError> {
        let from = job.state;
        job.state = to;
        job.failure = failure;
        self.store.put_job(&job).await?;
        let entry = state
            .jobs
            .get_mut(&job.id)
            .ok_or(CoordinatorError::JobNotFound(job.id))?;
        entry.job = job.clone();
        entry.joined.clear();

        info!(job = job.id, state = to.as_str(), "job ended");
        self.publish(Event::StateChanged {
            job: Arc::new(job.clone()),
            from,
        });
        Ok(job)
    }

    /// Registers `node`, or updates it if its id is known; it is online
    /// from now.
    pub async fn register_node(&self, node: Node) -> Result<NodeStatus, CoordinatorError> {
        validate_node(&node)?;
        let mut state = self.state.lock().await;
        let known = state.nodes.get(&node.id).map(|e| &e.node);
        if known != Some(&node) {
            self.store.put_node(&node).await?;
        }
        let entry = NodeEntry {
            node: node.clone(),
            last_heartbeat: Some(Instant::now()),
            last_heartbeat_unix_ms: unix_ms_now(),
            online: true,
        };
        let status = node_status(&entry);
        state.nodes.insert(node.id.clone(), entry);
        drop(state);

        let (cores, gateway) = (node.cores, &node.gateway_address);
        info!(node = %node.id, cores, %gateway, "node registered");
        Ok(status)
    }

    /// Records a heartbeat; a node that was offline is online again.
    pub async fn heartbeat(&self, node_id: &str) -> Result<(), CoordinatorError> {
        let mut state = self.state.lock().await;
        let entry = state
            .nodes
            .get_mut(node_id)
            .ok_or_else(|| CoordinatorError::NodeNotFound(node_id.to_owned()))?;
        entry.last_heartbeat = Some(Instant::now());
        entry.last_heartbeat_unix_ms = unix_ms_now();
        if !entry.online {
            entry.online = true;
            info!(node = %node_id, "node online");
        }
        Ok(())
    }

    /// Every node, by id.
    pub async fn nodes(&self) -> Vec<NodeStatus> {
        let state = self.state.lock().await;
        state.nodes.values().map(node_status).collect()
    }

    /// Whether a node with this id is registered.
    pub async fn has_node(&self, node_id: &str) -> bool {
        self.state.lock().await.nodes.contains_key(node_id)
    }

    /// Joins the open round of a job, opening the next round if none is
    /// open. The same trainer joining twice gets the same assignment.
    pub async fn join_round(
        &self,
        job_id: u32,
        trainer_id: &str,
    ) -> Result<TrainerAssignment, CoordinatorError> {
        check_printable("trainer_id", trainer_id)?;

        let mut state = self.state.lock().await;
        let job = live_job(&state, job_id)?;
        if job.open_round().is_none() {
            let job = job.clone();
            self.start_round(&mut state, job).await?;
        }
        self.admit(&mut state, job_id, trainer_id)
    }

    /// Plans the job's next round on the online nodes, writes it and tells
    /// watchers and nodes.
    async fn start_round(&self, state: &mut State, mut job: Job) -> Result<(), CoordinatorError> {
        let round = u32::try_from(job.rounds.len() + 1).unwrap_or(u32::MAX);
        let model_bytes = job.spec.model_bytes()?;
        let candidates: Vec<NodeCandidate> = state
            .nodes
            .values()
            .filter(|e| e.online && e.node.arena_bytes >= model_bytes)
            .map(|e| NodeCandidate {
                id: e.node.id.clone(),
                cores: e.node.cores,
            })
            .collect();
        let spec = &job.spec;
        let topology = planner::plan(
            job.id,
            round,
            spec.trainers_per_round,
            spec.max_fan_in,
            spec.levels,
            &candidates,
            state.next_endpoint_id,
        )
        .map_err(|source| CoordinatorError::Plan {
            job_id: job.id,
            round,
            source,
        })?;

        let now = unix_ms_now();
        let from = job.state;
        job.state = JobState::Running;
        job.rounds.push(RoundRecord {
            round,
            started_unix_ms: now,
            deadline_unix_ms: now.saturating_add(spec.round_deadline_ms),
            trainers_joined: 0,
            updates_aggregated: 0,
            duration_ms: 0,
            model_checksum: String::new(),
            finished: false,
        });
        let topology = Arc::new(topology);
        job.topology = Some(Arc::clone(&topology));
        self.store.put_job(&job).await?;

        if let Some(last) = topology.last_endpoint_id() {
            state.next_endpoint_id = u64::from(last) + 1;
        }
        let entry = state
            .jobs
            .get_mut(&job.id)
            .ok_or(CoordinatorError::JobNotFound(job.id))?;
        entry.job = job.clone();
        entry.joined.clear();

        info!(
            job = job.id,
            round,
            aggregators = topology.aggregators.len(),
            "round started"
        );
        let job = Arc::new(job);
        if from != JobState::Running {
            self.publish(Event::StateChanged {
                job: Arc::clone(&job),
                from,
            });
        }
        self.publish(Event::RoundStarted { job, topology });
        Ok(())
    }

    /// Gives a trainer its leaf in the open round: the leaf it is dealt, or
    /// if that leaf's node went offline, the next leaf on an online node.
    ///
    /// LIMITATION: skipping a leaf does not rewrite the round's tree, so the
    /// skipped leaf still expects the trainers it was dealt and waits for
    /// them until the deadline, and the leaf that took them gets more inputs
    /// than its `expected_inputs`. The node is offline anyway, so its leaf
    /// would not have delivered them; the round still ends once the top
    /// aggregator reports at least `min_trainers` updates. Replanning the
    /// subtree onto an online node would close the gap.
    fn admit(
        &self,
        state: &mut State,
        job_id: u32,
        trainer_id: &str,
    ) -> Result<TrainerAssignment, CoordinatorError> {
        let State { jobs, nodes, .. } = state;
        let entry = jobs
            .get_mut(&job_id)
            .ok_or(CoordinatorError::JobNotFound(job_id))?;
        if let Some(assignment) = entry.joined.get(trainer_id) {
            return Ok(assignment.clone());
        }

        let job = &entry.job;
        let (Some(record), Some(topology)) = (job.open_round(), job.topology.as_ref()) else {
            return Err(CoordinatorError::NoRound(job_id));
        };
        let per_round = job.spec.trainers_per_round;
        let joined = u32::try_from(entry.joined.len()).unwrap_or(u32::MAX);
        if joined >= per_round {
            return Err(CoordinatorError::RoundFull {
                job_id,
                round: record.round,
                trainers_per_round: per_round,
            });
        }
        let is_online = |leaf: &&Aggregator| nodes.get(&leaf.node_id).is_some_and(|n| n.online);
        let leaf = topology.leaves_for_trainer(joined).find(is_online).ok_or(
            CoordinatorError::NoOnlineLeaf {
                job_id,
                round: record.round,
            },
        )?;
        let gateway_address = nodes
            .get(&leaf.node_id)
            .map(|n| n.node.gateway_address.clone())
            .unwrap_or_default();
        let assignment = TrainerAssignment {
            job_id,
            round: record.round,
            model_version: job.model_version,
            gateway_address,
            leaf_endpoint_id: leaf.endpoint_id,
            node_id: leaf.node_id.clone(),
            deadline_unix_ms: record.deadline_unix_ms,
        };
        entry
            .joined
            .insert(trainer_id.to_owned(), assignment.clone());

        self.publish(Event::RoundProgress {
            job_id,
            round: assignment.round,
            trainers_joined: joined + 1,
            trainers_per_round: per_round,
        });
        self.publish(Event::TrainerAdmitted {
            job_id,
            round: assignment.round,
            node_id: assignment.node_id.clone(),
            seat: TrainerSeat {
                trainer_id: trainer_id.to_owned(),
                leaf_endpoint_id: assignment.leaf_endpoint_id,
            },
        });
        Ok(assignment)
    }

    /// Records that the open round produced its global model; the last
    /// round completes the job. The same report again (a top that retried
    /// after its answer was lost) gets the job back and changes nothing; a
    /// different one for a finished round is refused.
    pub async fn complete_round(
        &self,
        job_id: u32,
        round: u32,
        updates_aggregated: u32,
        model_checksum: &str,
    ) -> Result<Job, CoordinatorError> {
        check_printable("model_checksum", model_checksum)?;

        let mut state = self.state.lock().await;
        let entry = state
            .jobs
            .get(&job_id)
            .ok_or(CoordinatorError::JobNotFound(job_id))?;
        let repeated = entry.job.rounds.iter().any(|r| {
            r.round == round
                && r.finished
                && r.updates_aggregated == updates_aggregated
                && r.model_checksum == model_checksum
        });
        if repeated {
            return Ok(entry.job.clone());
        }
        let mut job = live_job(&state, job_id)?.clone();
        let open = job.open_round().map(|r| r.round);
        if open != Some(round) {
            return Err(CoordinatorError::WrongRound {
                job_id,
                round,
                open,
            });
        }
        let spec = &job.spec;
        if updates_aggregated < spec.min_trainers || updates_aggregated > spec.trainers_per_round {
            return Err(CoordinatorError::InvalidField {
                field: "updates_aggregated",
                reason: format!(
                    "is {updates_aggregated}; the job needs {} to {}",
                    spec.min_trainers, spec.trainers_per_round
                ),
            });
        }

        let joined = u32::try_from(entry.joined.len()).unwrap_or(u32::MAX);
        let done = round >= job.spec.rounds;
        let now = unix_ms_now();
        let Some(record) = job.rounds.last_mut() else {
            return Err(CoordinatorError::NoRound(job_id));
        };
        record.trainers_joined = joined.max(updates_aggregated);
        record.updates_aggregated = updates_aggregated;
        record.duration_ms = now.saturating_sub(record.started_unix_ms);
        record.model_checksum = model_checksum.to_owned();
        record.finished = true;
        let record = record.clone();
        job.model_version = round;
        let from = job.state;
        if done {
            job.state = JobState::Completed;
        }
        self.store.put_job(&job).await?;

        let entry = state
            .jobs
            .get_mut(&job_id)
            .ok_or(CoordinatorError::JobNotFound(job_id))?;
        entry.job = job.clone();
        entry.joined.clear();
        drop(state);

        info!(
            job = job_id,
            round,
            updates = updates_aggregated,
            duration_ms = record.duration_ms,
            "round finished"
        );
        let shared = Arc::new(job.clone());
        self.publish(Event::RoundFinished {
            job: Arc::clone(&shared),
            record,
        });
        if done {
            info!(job = job_id, "job completed");
            self.publish(Event::StateChanged { job: shared, from });
        }
        Ok(job)
    }

    /// The aggregators `node_id` runs in every open round, each with the
    /// trainers admitted so far to its leaves there.
    pub async fn current_work(&self, node_id: &str) -> Vec<OpenWork> {
        let state = self.state.lock().await;
        let mut open: Vec<OpenWork> = state
            .jobs
            .values()
            .filter(|e| !e.job.state.is_terminal() && e.job.open_round().is_some())
            .filter_map(|e| {
                let topology = e.job.topology.as_ref()?;
                let work = node_work(&state, node_id, &e.job, topology)?;
                let seats = seats_on(node_id, topology.round, &e.joined);
                Some(OpenWork { work, seats })
            })
            .collect();
        drop(state);

        // Sorted outside the lock: a round may hold a million trainers.
        for o in &mut open {
            o.seats.sort_unstable_by(|a, b| {
                (a.leaf_endpoint_id, &a.trainer_id).cmp(&(b.leaf_endpoint_id, &b.trainer_id))
            });
        }
        open
    }

    /// The aggregators `node_id` runs in the round `topology` describes, if
    /// any.
    pub async fn work_in(&self, node_id: &str, job: &Job, topology: &Topology) -> Option<NodeWork> {
        let state = self.state.lock().await;
        node_work(&state, node_id, job, topology)
    }

    /// Marks nodes offline that missed their heartbeats, and fails jobs
    /// whose open round is past its deadline and grace.
    pub async fn check_liveness(&self) {
        let now = Instant::now();
        // An allowance too long for a `Duration` never runs out.
        let allowed = self
            .config
            .heartbeat_interval
            .checked_mul(self.config.missed_heartbeats.max(1))
            .unwrap_or(Duration::MAX);
        let mut state = self.state.lock().await;
        for entry in state.nodes.values_mut() {
            let late = entry
                .last_heartbeat
                .is_none_or(|t| now.duration_since(t) > allowed);
            if entry.online && late {
                entry.online = false;
                warn!(node = %entry.node.id, "node missed its heartbeats; marked offline");
            }
        }

        let wall = unix_ms_now();
        let grace_ms = u64::try_from(self.config.round_grace.as_millis()).unwrap_or(u64::MAX);
        let overdue: Vec<(Job, String)> = state
            .jobs
            .values()
            .filter(|e| !e.job.state.is_terminal())
            .filter_map(|e| {
                let record = e.job.open_round()?;
                (wall > record.deadline_unix_ms.saturating_add(grace_ms)).then(|| {
                    let reason = format!(
                        "round {} passed its deadline without a result \
                         ({} trainers joined, {} needed)",
                        record.round,
                        e.joined.len(),
                        e.job.spec.min_trainers
                    );
                    (e.job.clone(), reason)
                })
            })
            .collect();
        for (job, reason) in overdue {
            let id = job.id;
            if let Err(e) = self
                .end_job(&mut state, job, JobState::Failed, reason)
                .await
            {
                // The next tick tries again.
                error!(job = id, error = %error_chain(&e), "could not fail an overdue job");
            }
        }
    }

    /// Runs [`Self::check_liveness`] periodically until `shutdown`.
    pub async fn run_housekeeping(self: Arc<Self>, shutdown: CancellationToken) {
        let period = (self.config.heartbeat_interval / 2)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = ticker.tick() => self.check_liveness().await,
            }
        }
    }
}

/// The job, if it exists and has not ended.
fn live_job(state: &State, job_id: u32) -> Result<&Job, CoordinatorError> {
    let job = &state
        .jobs
        .get(&job_id)
        .ok_or(CoordinatorError::JobNotFound(job_id))?
        .job;
    if job.state.is_terminal() {
        return Err(CoordinatorError::JobEnded {
            job_id,
            state: job.state,
        });
    }
    Ok(job)
}

fn node_status(entry: &NodeEntry) -> NodeStatus {
    NodeStatus {
        node: entry.node.clone(),
        online: entry.online,
        last_heartbeat_unix_ms: entry.last_heartbeat_unix_ms,
    }
}

fn node_work(state: &State, node_id: &str, job: &Job, topology: &Topology) -> Option<NodeWork> {
    let aggregators: Vec<Aggregator> = topology
        .aggregators
        .iter()
        .filter(|a| a.node_id == node_id)
        .cloned()
        .collect();
    if aggregators.is_empty() {
        return None;
    }

    let by_id: HashMap<u32, &Aggregator> = topology
        .aggregators
        .iter()
        .map(|a| (a.endpoint_id, a))
        .collect();
    let mut seen = HashSet::new();
    let remote_parents = aggregators
        .iter()
        .filter_map(|a| by_id.get(&a.parent?))
        .filter(|p| p.node_id != node_id && seen.insert(p.endpoint_id))
        .map(|p| ParentLocation {
            endpoint_id: p.endpoint_id,
            node_id: p.node_id.clone(),
            peer_address: state
                .nodes
                .get(&p.node_id)
                .map(|n| n.node.peer_address.clone())
                .unwrap_or_default(),
        })
        .collect();
    let deadline_unix_ms = job
        .rounds
        .iter()
        .find(|r| r.round == topology.round)
        .map_or(0, |r| r.deadline_unix_ms);
    Some(NodeWork {
        job_id: job.id,
        round: topology.round,
        tensors: job.spec.tensors.clone(),
        mode: job.spec.mode,
        deadline_unix_ms,
        aggregators,
        remote_parents,
    })
}

/// The trainers in `joined` admitted to `round` with a leaf on `node_id`,
/// in no particular order.
fn seats_on(
    node_id: &str,
    round: u32,
    joined: &HashMap<String, TrainerAssignment>,
) -> Vec<TrainerSeat> {
    joined
        .iter()
        .filter(|(_, a)| a.round == round && a.node_id == node_id)
        .map(|(trainer_id, a)| TrainerSeat {
            trainer_id: trainer_id.clone(),
            leaf_endpoint_id: a.leaf_endpoint_id,
        })
        .collect()
}

fn validate_node(node: &Node) -> Result<(), CoordinatorError> {
    let invalid = |field, reason: &str| {
        Err(CoordinatorError::InvalidField {
            field,
            reason: reason.to_owned(),
        })
    };
    if !is_valid_name(&node.id, 64) {
        return invalid(
            "node_id",
            "must be 1 to 64 characters of letters, digits, '.', '_' or '-'",
        );
    }
    if node.cores == 0 {
        return invalid("capacity.cores", "must be at least 1");
    }
    if node.arena_bytes == 0 {
        return invalid("capacity.arena_bytes", "must be at least 1");
    }
    if !is_host_port(&node.gateway_address) {
        return invalid("gateway_address", "must be host:port");
    }
    if !is_host_port(&node.peer_address) {
        return invalid("peer_address", "must be host:port");
    }
    Ok(())
}

/// Accepts 1 to 128 printable ASCII characters (ids and checksums that
/// callers choose), or names `field` in the refusal.
fn check_printable(field: &'static str, value: &str) -> Result<(), CoordinatorError> {
    let printable = (1..=128).contains(&value.len()) && value.bytes().all(|b| b.is_ascii_graphic());
    if printable {
        return Ok(());
    }
    Err(CoordinatorError::InvalidField {
        field,
        reason: "must be 1 to 128 printable ASCII characters".to_owned(),
    })
}

/// Whether `s` looks like `host:port` with a non-zero port.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    !host.is_empty()
        && host.len() <= 255
        && host.bytes().all(|b| b.is_ascii_graphic())
        && port.parse::<u16>().is_ok_and(|p| p != 0)
}

/// An error and its sources, joined by ": ", for logs.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::tests::good_draft;
    use crate::store::MemoryStore;

    async fn coordinator(config: CoordinatorConfig) -> (Arc<Coordinator>, Arc<MemoryStore>) {
        let store = Arc::new(MemoryStore::new());
        let coordinator = Coordinator::open(Arc::clone(&store) as Arc<dyn Store>, config)
            .await
            .unwrap();
        (coordinator, store)
    }

    fn node(id: &str) -> Node {
        Node {
            id: id.to_owned(),
            cores: 8,
            arena_bytes: 1 << 30,
            gateway_address: format!("{id}:7500"),
            peer_address: format!("{id}:7501"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_is_offline_after_missing_its_heartbeats_and_back_on_the_next() {
        let config = CoordinatorConfig {
            heartbeat_interval: Duration::from_secs(1),
            missed_heartbeats: 3,
            ..CoordinatorConfig::default()
        };
        let (coordinator, _) = coordinator(config).await;
        coordinator.register_node(node("n1")).await.unwrap();

        tokio::time::advance(Duration::from_millis(2900)).await;
        coordinator.check_liveness().await;
        assert!(coordinator.nodes().await[0].online);

        tokio::time::advance(Duration::from_millis(200)).await;
        coordinator.check_liveness().await;
        assert!(!coordinator.nodes().await[0].online);

        // Offline nodes get no work.
        let (job, _) = coordinator.create_job(&good_draft()).await.unwrap();
        let err = coordinator.join_round(job.id, "t").await.unwrap_err();
        assert!(
            matches!(
                err,
                CoordinatorError::Plan {
                    source: PlanError::NoNode,
                    ..
                }
            ),
            "{err}"
        );

        coordinator.heartbeat("n1").await.unwrap();
        assert!(coordinator.nodes().await[0].online);
        coordinator.join_round(job.id, "t").await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_trainer_dealt_a_leaf_on_an_offline_node_goes_to_the_next_online_leaf() {
        let config = CoordinatorConfig {
            heartbeat_interval: Duration::from_secs(1),
            missed_heartbeats: 1,
            ..CoordinatorConfig::default()
        };
        let (coordinator, _) = coordinator(config).await;
        // One core each: the top and the two leaves land on three nodes.
        for id in ["a", "b", "c"] {
            coordinator
                .register_node(Node {
                    cores: 1,
                    ..node(id)
                })
                .await
                .unwrap();
        }
        let mut draft = good_draft();
        draft.trainers_per_round = 4;
        draft.min_trainers = 1;
        draft.hierarchy.max_fan_in = 2;
        let (job, _) = coordinator.create_job(&draft).await.unwrap();
        let first = coordinator.join_round(job.id, "t0").await.unwrap();
        let topology = coordinator.topology(job.id).await.unwrap();
        let leaves = topology.leaves().to_vec();
        assert_eq!(leaves.len(), 2);
        assert_eq!(first.leaf_endpoint_id, leaves[0].endpoint_id);
        let top_node = topology.aggregators[2].node_id.clone();
        assert!(leaves.iter().all(|l| l.node_id != top_node));
        assert_ne!(leaves[0].node_id, leaves[1].node_id);

        // The first leaf's node stops heartbeating.
        tokio::time::advance(Duration::from_millis(1500)).await;
        coordinator.heartbeat(&leaves[1].node_id).await.unwrap();
        coordinator.heartbeat(&top_node).await.unwrap();
        coordinator.check_liveness().await;

        // t1 is dealt the second leaf; t2 the first, which is skipped.
        for trainer in ["t1", "t2"] {
            let joined = coordinator.join_round(job.id, trainer).await.unwrap();
            assert_eq!(joined.leaf_endpoint_id, leaves[1].endpoint_id, "{trainer}");
            assert_eq!(joined.node_id, leaves[1].node_id, "{trainer}");
            assert_eq!(
                joined.gateway_address,
                format!("{}:7500", leaves[1].node_id)
            );
        }

        // With both leaves' nodes offline, a new trainer is told to retry.
        tokio::time::advance(Duration::from_millis(1500)).await;
        coordinator.heartbeat(&top_node).await.unwrap();
        coordinator.check_liveness().await;
        let err = coordinator.join_round(job.id, "t3").await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "job 1: every leaf of round 1 is on an offline node; retry later"
        );
        // A trainer that already joined keeps its assignment.
        assert_eq!(coordinator.join_round(job.id, "t0").await.unwrap(), first);
    }

    #[tokio::test]
    async fn a_new_trainer_is_published_with_its_leaf_and_a_repeat_join_is_not() {
        let (coordinator, _) = coordinator(CoordinatorConfig::default()).await;
        coordinator.register_node(node("n1")).await.unwrap();
        let (job, _) = coordinator.create_job(&good_draft()).await.unwrap();
        let mut events = coordinator.subscribe();

        let mut expected = Vec::new();
        for trainer in ["t0", "t1", "t0", "t2"] {
            let joined = coordinator.join_round(job.id, trainer).await.unwrap();
            let seat = (trainer.to_owned(), joined.leaf_endpoint_id);
            if !expected.contains(&seat) {
                expected.push(seat);
            }
        }
        let mut admitted = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Event::TrainerAdmitted {
                job_id,
                round,
                node_id,
                seat,
            } = event
            {
                assert_eq!((job_id, round, node_id.as_str()), (job.id, 1, "n1"));
                admitted.push((seat.trainer_id, seat.leaf_endpoint_id));
            }
        }
        assert_eq!(admitted, expected);
        // t0 and t1 were dealt different leaves, so the seats say which.
        assert_ne!(expected[0].1, expected[1].1);
    }

    #[tokio::test]
    async fn a_round_without_a_result_past_its_deadline_fails_the_job() {
        let config = CoordinatorConfig {
            round_grace: Duration::ZERO,
            ..CoordinatorConfig::default()
        };
        let (coordinator, store) = coordinator(config).await;
        coordinator.register_node(node("n1")).await.unwrap();
        let mut draft = good_draft();
        draft.round_deadline_ms = 1;
        let (job, _) = coordinator.create_job(&draft).await.unwrap();
        coordinator.join_round(job.id, "t").await.unwrap();
        let mut events = coordinator.subscribe();

        // The deadline is 1 ms of wall clock: poll until the check sees it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while coordinator.job(job.id).await.unwrap().state != JobState::Failed {
            assert!(Instant::now() < deadline, "the job never failed");
            coordinator.check_liveness().await;
            tokio::task::yield_now().await;
        }
        let failed = coordinator.job(job.id).await.unwrap();
        assert_eq!(
            failed.failure,
            "round 1 passed its deadline without a result (1 trainers joined, 80 needed)"
        );
        assert_eq!(store.load().await.unwrap().jobs[0], failed);
        let Ok(Event::StateChanged { job, from }) = events.recv().await else {
            panic!("expected a state change");
        };
        assert_eq!((from, job.state), (JobState::Running, JobState::Failed));
    }

    #[tokio::test]
    async fn a_failed_store_write_changes_nothing() {
        #[derive(Debug)]
        struct BrokenStore;
        impl Store for BrokenStore {
            fn load(&self) -> crate::store::StoreFuture<'_, crate::store::Snapshot> {
                Box::pin(async { Ok(crate::store::Snapshot::default()) })
            }
            fn put_job(&self, _: &Job) -> crate::store::StoreFuture<'_, ()> {
                Box::pin(async {
                    Err(StoreError::Transaction {
                        operation: "write job".to_owned(),
                        source: "disk full".into(),
                    })
                })
            }
            fn put_node(&self, _: &Node) -> crate::store::StoreFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
        }

        let coordinator = Coordinator::open(Arc::new(BrokenStore), CoordinatorConfig::default())
            .await
            .unwrap();
        let err = coordinator.create_job(&good_draft()).await.unwrap_err();
        assert_eq!(error_chain(&err), "store write job failed: disk full");
        assert!(coordinator.jobs().await.is_empty());
    }

    #[tokio::test]
    async fn a_stored_spec_that_fails_validation_stops_start_up_naming_its_key() {
        let (coordinator, store) = coordinator(CoordinatorConfig::default()).await;
        coordinator.create_job(&good_draft()).await.unwrap();
        let (job, _) = coordinator.create_job(&good_draft()).await.unwrap();
        drop(coordinator);
        let mut broken = job.clone();
        broken.spec.max_fan_in = 1;
        store.put_job(&broken).await.unwrap();

        let store_dyn = Arc::clone(&store) as Arc<dyn Store>;
        let err = Coordinator::open(store_dyn, CoordinatorConfig::default())
            .await
            .unwrap_err();
        assert_eq!(
            error_chain(&err),
            "stored record jobs/2 is corrupt: hierarchy.max_fan_in: is 1; must be 2 to 65536"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_allowance_too_long_to_represent_never_runs_out() {
        let config = CoordinatorConfig {
            heartbeat_interval: Duration::MAX,
            missed_heartbeats: 3,
            ..CoordinatorConfig::default()
        };
        let (coordinator, _) = coordinator(config).await;
        coordinator.register_node(node("n1")).await.unwrap();
        tokio::time::advance(Duration::from_secs(365 * 24 * 3600)).await;
        coordinator.check_liveness().await;
        assert!(coordinator.nodes().await[0].online);
    }

    #[tokio::test]
    async fn exhausted_endpoint_ids_refuse_a_round_even_after_a_restart() {
        let (coordinator, store) = coordinator(CoordinatorConfig::default()).await;
        coordinator.register_node(node("n1")).await.unwrap();
        let mut draft = good_draft();
        draft.trainers_per_round = 10;
        draft.min_trainers = 1;
        let (first, _) = coordinator.create_job(&draft).await.unwrap();
        let joined = coordinator.join_round(first.id, "t").await.unwrap();
        assert_eq!(joined.leaf_endpoint_id, 1);

        // As if every id had been handed out: the stored tree ends on the
        // last id. A restart must not start again from a low id.
        let mut job = store.load().await.unwrap().jobs[0].clone();
        let mut topology = Topology::clone(job.topology.as_deref().unwrap());
        topology.aggregators[0].endpoint_id = u32::MAX;
        job.topology = Some(Arc::new(topology));
        store.put_job(&job).await.unwrap();
        drop(coordinator);
        let store_dyn = Arc::clone(&store) as Arc<dyn Store>;
        let coordinator = Coordinator::open(store_dyn, CoordinatorConfig::default())
            .await
            .unwrap();
        coordinator.register_node(node("n1")).await.unwrap();

        let (second, _) = coordinator.create_job(&draft).await.unwrap();
        let err = coordinator.join_round(second.id, "t").await.unwrap_err();
        assert_eq!(
            error_chain(&err),
            "job 2: cannot plan round 1: endpoint ids are exhausted: the round needs 1 \
             from id 4294967296, but the last endpoint id is 4294967295"
        );
        assert!(coordinator.job(second.id).await.unwrap().topology.is_none());
    }

    #[test]
    fn host_port_needs_a_host_and_a_non_zero_port() {
        assert!(is_host_port("10.0.0.1:7500"));
        assert!(is_host_port("[::1]:80"));
        assert!(is_host_port("node-a.local:1"));
        for bad in ["", ":80", "host", "host:0", "host:70000", "a b:80"] {
            assert!(!is_host_port(bad), "{bad:?}");
        }
    }
}

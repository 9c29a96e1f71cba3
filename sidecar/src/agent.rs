//! The node agent: the sidecar's life as a node of the control plane.
//!
//! It registers the node, keeps it alive with heartbeats, and follows the
//! node's assignment stream: for each round it opens the job's gateway,
//! moves the gateway to the round, and starts the round's aggregators
//! through a [`Launcher`]; for each admission it tells the gateway which
//! trainers may push; for each ended job it stops the job's aggregators.
//! When the control plane goes away it registers again and resumes; the
//! stream starts with whatever is open, so nothing is lost but time.
//!
//! LIMITATION: a round whose tree spans nodes is refused here: forwarding a
//! partial result to a parent on another node (`remote_parents`) is not
//! built yet. Such a round fails at its deadline. The control plane places
//! whole trees on one node unless one node cannot hold them.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lifl_proto::bearer::Bearer;
use lifl_proto::v1::job_service_client::JobServiceClient;
use lifl_proto::v1::node_assignment::Kind;
use lifl_proto::v1::node_service_client::NodeServiceClient;
use lifl_proto::v1::{
    GetJobRequest, HeartbeatRequest, JobState, NodeCapacity, RegisterNodeRequest, RoundAssignment,
    WatchAssignmentsRequest,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::gateway::Gateway;
use crate::launcher::{AggregatorSpec, Launcher, Role};

/// Wait before reconnecting to the control plane.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);
/// Time each level of the tree is given past its children's deadline, so
/// a child that reports at its deadline still reaches a waiting parent.
/// Leaves stop at the round's deadline, as trainers are told (plus
/// [`LEAF_GRACE`]); the top, at most two margins later, well inside the
/// control plane's grace (30 s by default).
const LEVEL_MARGIN: Duration = Duration::from_secs(1);
/// Longest a call to the control plane, or its silence, may last.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Most levels the control plane plans.
const MAX_LEVELS: u32 = 3;
/// How often an idle connection to the control plane is checked.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(20);
/// How often the node asks whether the jobs it holds have ended.
const HELD_JOBS_CHECK_EVERY: Duration = Duration::from_secs(30);
/// Time a leaf keeps taking updates past the moment the gateway stops
/// handing them over (the round's deadline), so that an update handed over
/// at the deadline still finds its leaf.
const LEAF_GRACE: Duration = Duration::from_millis(250);

/// Who the node is and where it reports.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The control plane, e.g. `http://127.0.0.1:7400`.
    pub control_plane: String,
    /// Admin token, when the control plane has one.
    pub token: Option<String>,
    /// The node's stable id.
    pub node_id: String,
    /// What the node offers.
    pub capacity: NodeCapacity,
    /// `host:port` trainers reach the gateway at.
    pub gateway_address: String,
    /// `host:port` other sidecars would forward to.
    pub peer_address: String,
    /// Where top aggregators write checkpoints.
    pub checkpoint_dir: PathBuf,
}

/// Follows the control plane until `shutdown`.
pub async fn run(
    config: AgentConfig,
    gateway: Arc<Gateway>,
    launcher: Arc<dyn Launcher>,
    shutdown: CancellationToken,
) {
    let bearer = match Bearer::new(config.token.as_deref()) {
        Ok(bearer) => bearer,
        Err(err) => {
            tracing::error!(%err, "the admin token cannot be sent; not joining the control plane");
            return;
        }
    };
    let mut agent = Agent {
        config,
        bearer,
        gateway,
        launcher,
        jobs: HashMap::new(),
        launched: HashSet::new(),
        shutdown: shutdown.clone(),
    };
    // Each kind of failure is said once, not every second.
    let mut last_failure = None;
    loop {
        match agent.session().await {
            Ok(()) => last_failure = None,
            Err(status) if last_failure == Some(status.code()) => {}
            Err(status) => {
                last_failure = Some(status.code());
                tracing::warn!(
                    control_plane = %agent.config.control_plane,
                    code = ?status.code(),
                    message = status.message(),
                    "lost the control plane; registering again"
                );
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(RECONNECT_EVERY) => {}
        }
    }
    for (_, stop) in agent.jobs.drain() {
        stop.cancel();
    }
}

#[derive(Debug)]
struct Agent {
    config: AgentConfig,
    bearer: Bearer,
    gateway: Arc<Gateway>,
    launcher: Arc<dyn Launcher>,
    /// Stops each job's aggregators.
    jobs: HashMap<u32, CancellationToken>,
    /// Rounds whose aggregators were started: a stream that starts over
    /// repeats the open round, which must not start them twice.
    launched: HashSet<(u32, u32)>,
    shutdown: CancellationToken,
}

impl Agent {
    /// Registers, then follows the assignment stream until it ends.
    async fn session(&mut self) -> Result<(), Status> {
        let channel = Channel::from_shared(self.config.control_plane.clone())
            .map_err(|e| Status::invalid_argument(format!("control plane address: {e}")))?
            .connect_timeout(CALL_TIMEOUT)
            .http2_keep_alive_interval(KEEPALIVE_EVERY)
            .keep_alive_timeout(CALL_TIMEOUT)
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("connect: {e}")))?;
        let mut client = NodeServiceClient::new(channel.clone());
        let registered = client
            .register_node(self.request(RegisterNodeRequest {
                node_id: self.config.node_id.clone(),
                capacity: Some(self.config.capacity),
                gateway_address: self.config.gateway_address.clone(),
                peer_address: self.config.peer_address.clone(),
            }))
            .await?
            .into_inner();
        let every = Duration::from_millis(registered.heartbeat_interval_ms.max(100));
        tracing::info!(
            node = %self.config.node_id,
            control_plane = %self.config.control_plane,
            gateway = %self.config.gateway_address,
            "registered with the control plane"
        );

        let session = self.shutdown.child_token();
        let heartbeats = tokio::spawn(heartbeat(
            client.clone(),
            self.request(HeartbeatRequest {
                node_id: self.config.node_id.clone(),
            }),
            every,
            session.clone(),
        ));
        let _stop_heartbeats = session.clone().drop_guard();

        // Jobs that ended while the node was away get no JobEnded on the new
        // stream: ask.
        self.end_finished_jobs(&channel).await;

        let mut stream = client
            .watch_assignments(self.request(WatchAssignmentsRequest {
                node_id: self.config.node_id.clone(),
            }))
            .await?
            .into_inner();
        // The stream tells of a job's end only if it gave this node work in
        // the job; a job held from an earlier session may end unheard.
        let mut recheck = tokio::time::interval(HELD_JOBS_CHECK_EVERY);
        recheck.reset();
        loop {
            let next = tokio::select! {
                () = session.cancelled() => break,
                _ = recheck.tick() => {
                    self.end_finished_jobs(&channel).await;
                    continue;
                }
                next = stream.message() => next?,
            };
            let Some(assignment) = next else { break };
            match assignment.kind {
                Some(Kind::Round(round)) => self.start_round(round).await,
                Some(Kind::TrainersAdmitted(admitted)) => {
                    self.gateway
                        .admit(admitted.job_id, admitted.round, &admitted.trainers);
                }
                Some(Kind::JobEnded(ended)) => self.end_job(ended.job_id),
                None => {}
            }
        }
        session.cancel();
        match heartbeats.await {
            Ok(Err(status)) => Err(status),
            _ => Ok(()),
        }
    }

    /// Releases a job's gateway and stops its aggregators.
    fn end_job(&mut self, job: u32) {
        tracing::info!(job, "job ended");
        self.gateway.end_job(job);
        if let Some(stop) = self.jobs.remove(&job) {
            stop.cancel();
        }
        self.launched.retain(|&(j, _)| j != job);
    }

    /// Ends every job this node holds that the control plane says has
    /// ended (or no longer knows).
    async fn end_finished_jobs(&mut self, channel: &Channel) {
        let mut jobs = JobServiceClient::new(channel.clone());
        let held: Vec<u32> = self.jobs.keys().copied().collect();
        for job in held {
            let read = jobs.get_job(self.request(GetJobRequest { job_id: job }));
            let ended = match tokio::time::timeout(CALL_TIMEOUT, read).await {
                Ok(Ok(found)) => JobState::try_from(found.into_inner().state).is_ok_and(|s| {
                    matches!(
                        s,
                        JobState::Completed | JobState::Failed | JobState::Cancelled
                    )
                }),
                Ok(Err(status)) => status.code() == Code::NotFound,
                Err(_) => false,
            };
            if ended {
                self.end_job(job);
            }
        }
    }

    fn request<T>(&self, message: T) -> Request<T> {
        self.bearer.request(message)
    }

    /// Opens the round on the gateway and starts its aggregators.
    async fn start_round(&mut self, assignment: RoundAssignment) {
        let (job, round) = (assignment.job_id, assignment.round);
        let plan = match plan_round(
            &assignment,
            unix_ms_now(),
            &self.config.control_plane,
            &self.config.checkpoint_dir,
        ) {
            Ok(plan) => plan,
            Err(reason) => {
                tracing::error!(job, round, %reason, "cannot run this round");
                return;
            }
        };
        let gateway_endpoint = match self.gateway.open_job(job, plan.params).await {
            Ok(id) => id,
            Err(err) => {
                tracing::error!(job, round, %err, "cannot open the gateway for this job");
                return;
            }
        };
        let time_left = assignment.deadline_unix_ms.saturating_sub(unix_ms_now());
        self.gateway
            .begin_round(job, round, Duration::from_millis(time_left));
        // Earlier rounds of the job are done with; only a repeat of this
        // one can still arrive.
        self.launched.retain(|&(j, r)| j != job || r >= round);
        if !self.launched.insert((job, round)) {
            tracing::debug!(job, round, "round already started on this node");
            return;
        }
        let stop = self
            .jobs
            .entry(job)
            .or_insert_with(|| self.shutdown.child_token())
            .clone();
        for mut spec in plan.aggregators {
            if spec.role == Role::Top {
                spec.send_to = gateway_endpoint;
            }
            if let Err(err) = self.launcher.launch(&spec, stop.clone()) {
                tracing::error!(
                    job,
                    round,
                    endpoint = spec.endpoint,
                    source = %err.source,
                    "aggregator did not start"
                );
            }
        }
        tracing::info!(
            job,
            round,
            aggregators = assignment.aggregators.len(),
            "round started on this node"
        );
    }
}

/// Beats until `session` ends; a control plane that forgot the node ends
/// the session, so the node registers again.
async fn heartbeat(
    mut client: NodeServiceClient<Channel>,
    request: Request<HeartbeatRequest>,
    every: Duration,
    session: CancellationToken,
) -> Result<(), Status> {
    let (message, metadata) = (request.get_ref().clone(), request.metadata().clone());
    loop {
        tokio::select! {
            () = session.cancelled() => return Ok(()),
            () = tokio::time::sleep(every) => {}
        }
        let mut beat = Request::new(message.clone());
        *beat.metadata_mut() = metadata.clone();
        let beat = tokio::time::timeout(CALL_TIMEOUT, client.heartbeat(beat)).await;
        if let Err(status) =
            beat.unwrap_or_else(|_| Err(Status::unavailable("heartbeat timed out")))
        {
            session.cancel();
            return Err(status);
        }
    }
}

/// The aggregators of one round on this node, ready to launch.
#[derive(Debug)]
struct RoundPlan {
    params: usize,
    aggregators: Vec<AggregatorSpec>,
}

/// Turns a round assignment into launchable aggregators, or says why it
/// cannot run here. The top's `send_to` is filled in by the caller.
fn plan_round(
    assignment: &RoundAssignment,
    now_unix_ms: u64,
    control_plane: &str,
    checkpoint_dir: &std::path::Path,
) -> Result<RoundPlan, String> {
    if !assignment.remote_parents.is_empty() {
        return Err("its tree spans nodes, and forwarding between nodes is not built".into());
    }
    let params = model_params(assignment)?;
    let mode = match assignment.mode.as_str() {
        "eager" | "lazy" => assignment.mode.clone(),
        other => return Err(format!("unknown aggregation mode `{other}`")),
    };
    let left = Duration::from_millis(assignment.deadline_unix_ms.saturating_sub(now_unix_ms));
    let levels = assignment
        .aggregators
        .iter()
        .map(|a| a.level)
        .max()
        .unwrap_or(1);
    if levels > MAX_LEVELS {
        return Err(format!(
            "a tree of {levels} levels; at most {MAX_LEVELS} are planned"
        ));
    }
    let aggregators = assignment
        .aggregators
        .iter()
        .map(|a| {
            let role = if a.parent_endpoint_id == 0 {
                Role::Top
            } else if a.level <= 1 {
                Role::Leaf
            } else {
                Role::Middle
            };
            let above_leaves = a.level.clamp(1, levels.max(1)) - 1;
            AggregatorSpec {
                job: assignment.job_id,
                round: assignment.round,
                endpoint: a.endpoint_id,
                role,
                mode: mode.clone(),
                params,
                expected: a.expected_inputs,
                // LIMITATION: any child that reported makes a result after
                // the deadline; the control plane checks the round's total
                // against `min_trainers` when the top reports.
                minimum: 1,
                deadline: left + LEAF_GRACE + LEVEL_MARGIN * above_leaves,
                send_to: a.parent_endpoint_id,
                report_to: (role == Role::Top).then(|| control_plane.to_owned()),
                checkpoint_dir: (role == Role::Top).then(|| checkpoint_dir.to_owned()),
            }
        })
        .collect();
    Ok(RoundPlan {
        params,
        aggregators,
    })
}

/// f32 parameters in the assignment's model layout.
fn model_params(assignment: &RoundAssignment) -> Result<usize, String> {
    let model = assignment
        .model
        .as_ref()
        .ok_or("the assignment has no model layout")?;
    let mut params = 0usize;
    for tensor in &model.tensors {
        if tensor.dtype != "f32" {
            return Err(format!(
                "tensor {} is {}; only f32 is supported",
                tensor.name, tensor.dtype
            ));
        }
        let elements = tensor
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
        params = elements
            .and_then(|e| params.checked_add(e))
            .ok_or_else(|| format!("tensor {} is too large", tensor.name))?;
    }
    if params == 0 {
        return Err("the model has no parameters".into());
    }
    Ok(params)
}

fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lifl_proto::v1::{Aggregator, ModelLayout, ParentLocation, Tensor};

    fn assignment() -> RoundAssignment {
        let agg = |endpoint_id, level, parent_endpoint_id, expected_inputs| Aggregator {
            endpoint_id,
            level,
            parent_endpoint_id,
            node_id: "n1".into(),
            expected_inputs,
        };
        RoundAssignment {
            job_id: 3,
            round: 2,
            model: Some(ModelLayout {
                tensors: vec![
                    Tensor {
                        name: "w".into(),
                        shape: vec![10, 4],
                        dtype: "f32".into(),
                    },
                    Tensor {
                        name: "b".into(),
                        shape: vec![10],
                        dtype: "f32".into(),
                    },
                ],
            }),
            mode: "lazy".into(),
            deadline_unix_ms: 61_000,
            aggregators: vec![
                agg(11, 1, 13, 4),
                agg(12, 1, 13, 3),
                agg(13, 2, 14, 2),
                agg(14, 3, 0, 1),
            ],
            remote_parents: vec![],
        }
    }

    #[test]
    fn a_three_level_round_becomes_leaves_a_middle_and_a_top() {
        let plan = plan_round(&assignment(), 1_000, "http://cp:7400", "/ck".as_ref()).unwrap();
        assert_eq!(plan.params, 50);
        let roles: Vec<_> = plan.aggregators.iter().map(|a| a.role).collect();
        assert_eq!(roles, [Role::Leaf, Role::Leaf, Role::Middle, Role::Top]);
        let top = &plan.aggregators[3];
        assert_eq!(top.report_to.as_deref(), Some("http://cp:7400"));
        // Leaves stop a moment after the gateway stops taking updates, when
        // trainers were told the round does; each level above gets a
        // margin more.
        assert_eq!(
            plan.aggregators[0].deadline,
            Duration::from_secs(60) + LEAF_GRACE
        );
        assert_eq!(top.deadline, Duration::from_secs(62) + LEAF_GRACE);
        let (leaf, middle) = (&plan.aggregators[0], &plan.aggregators[2]);
        assert_eq!(leaf.send_to, 13);
        assert_eq!(leaf.expected, 4);
        assert!(leaf.report_to.is_none() && leaf.checkpoint_dir.is_none());
        assert!(leaf.deadline < middle.deadline && middle.deadline < top.deadline);
        assert_eq!(leaf.mode, "lazy");
    }

    #[test]
    fn rounds_that_cannot_run_here_say_why() {
        let mut spans = assignment();
        spans.remote_parents.push(ParentLocation {
            endpoint_id: 99,
            node_id: "n2".into(),
            peer_address: "n2:7402".into(),
        });
        assert!(plan_round(&spans, 0, "", "/".as_ref())
            .unwrap_err()
            .contains("spans nodes"));

        let mut f16 = assignment();
        if let Some(model) = f16.model.as_mut() {
            model.tensors[1].dtype = "f16".into();
        }
        assert!(plan_round(&f16, 0, "", "/".as_ref())
            .unwrap_err()
            .contains("only f32"));

        let mut flat = assignment();
        for aggregator in &mut flat.aggregators {
            aggregator.level = 0;
        }
        assert!(plan_round(&flat, 0, "", "/".as_ref()).is_ok());

        let mut deep = assignment();
        deep.aggregators[3].level = u32::MAX;
        assert!(plan_round(&deep, 0, "", "/".as_ref())
            .unwrap_err()
            .contains("at most 3"));

        let mut huge = assignment();
        if let Some(model) = huge.model.as_mut() {
            model.tensors[0].shape = vec![u64::MAX, 2];
        }
        assert!(plan_round(&huge, 0, "", "/".as_ref())
            .unwrap_err()
            .contains("too large"));
    }
}

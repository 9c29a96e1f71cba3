//! The library half of `liflctl`: its command line, one function per
//! command, and how each answer is printed (a table for people, `--json` for
//! scripts).
//!
//! Exit codes: 0 success; 1 the server failed or refused for another reason;
//! 2 bad usage or input (including a spec the server calls invalid); 3 no
//! such job, node or round; 4 missing, invalid or out-of-scope token; 5 the
//! server cannot be reached.

use std::fmt::Write as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lifl_proto::bearer::Bearer;
use lifl_proto::v1 as pb;
use lifl_proto::v1::job_service_client::JobServiceClient;
use lifl_proto::v1::node_service_client::NodeServiceClient;
use serde_json::{json, Value};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::grpc::draft_to_pb;
use crate::spec::JobSpecDraft;

/// Default control-plane address.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:7400";

/// Operate a lifl control plane.
#[derive(Debug, Parser)]
#[command(
    name = "liflctl",
    version,
    after_help = "Exit codes: 0 ok; 1 server error; \
    2 bad usage or invalid input; 3 not found; 4 not authorized; 5 server unreachable."
)]
pub struct Cli {
    /// Control-plane address, `host:port` or `http://host:port`.
    #[arg(long, global = true, env = "LIFL_CTL_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// Bearer token: the admin token when the server has one.
    #[arg(long, global = true, env = "LIFL_CTL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of tables (one object per line for `job watch`).
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Top-level commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create, read, watch and cancel jobs.
    #[command(subcommand)]
    Job(JobCommand),
    /// Inspect nodes.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Show the aggregation tree of a job's current round.
    Topology {
        /// Job id.
        job: u32,
    },
}

/// `liflctl job ...`
#[derive(Debug, Subcommand)]
pub enum JobCommand {
    /// Create a job from a JSON spec file (`-` reads stdin).
    Create {
        /// The spec file.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Show one job and its rounds.
    Get {
        /// Job id.
        job: u32,
    },
    /// List every job.
    List,
    /// Follow a job live until it ends, with a progress bar per round.
    Watch {
        /// Job id.
        job: u32,
    },
    /// Cancel a job that has not ended.
    Cancel {
        /// Job id.
        job: u32,
    },
}

/// `liflctl node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List every node and whether it is online.
    List,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The command line or an input file is unusable.
    #[error("{0}")]
    Usage(String),
    /// The server could not be reached.
    #[error("cannot reach the control plane at {server}: {reason}")]
    Unreachable {
        /// The address tried.
        server: String,
        /// Why.
        reason: String,
    },
    /// The server answered with an error.
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Rpc(Status),
    /// Printing failed (for example, a closed pipe).
    #[error("write output: {0}")]
    Output(#[from] std::io::Error),
}

impl CtlError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Unreachable { .. } => 5,
            Self::Output(_) => 1,
            Self::Rpc(status) => match status.code() {
                Code::InvalidArgument => 2,
                Code::NotFound => 3,
                Code::Unauthenticated | Code::PermissionDenied => 4,
                Code::Unavailable => 5,
                _ => 1,
            },
        }
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .fold(String::new(), |mut s, (i, c)| {
            if c.is_uppercase() && i > 0 {
                s.push(' ');
            }
            s.push(c.to_ascii_lowercase());
            s
        })
}

type Intercepted = InterceptedService<Channel, Bearer>;

/// Runs one command against the server named in `cli`.
pub async fn run(cli: Cli) -> Result<(), CtlError> {
    let bearer = bearer(cli.token.as_deref())?;
    let channel = connect(&cli.server).await?;
    let mut jobs = JobServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let mut out = std::io::stdout().lock();
    let json = cli.json;
    match cli.command {
        Command::Job(JobCommand::Create { file }) => {
            create_job(&mut jobs, &file, json, &mut out).await
        }
        Command::Job(JobCommand::Get { job }) => {
            let job = jobs
                .get_job(pb::GetJobRequest { job_id: job })
                .await
                .map_err(CtlError::Rpc)?;
            print_job(&job.into_inner(), json, &mut out)
        }
        Command::Job(JobCommand::List) => {
            let list = jobs
                .list_jobs(pb::ListJobsRequest {})
                .await
                .map_err(CtlError::Rpc)?;
            print_jobs(&list.into_inner().jobs, json, &mut out)
        }
        Command::Job(JobCommand::Watch { job }) => watch_job(&mut jobs, job, json, &mut out).await,
        Command::Job(JobCommand::Cancel { job }) => {
            let job = jobs
                .cancel_job(pb::CancelJobRequest { job_id: job })
                .await
                .map_err(CtlError::Rpc)?
                .into_inner();
            print_job(&job, json, &mut out)
        }
        Command::Node(NodeCommand::List) => {
            let mut nodes = NodeServiceClient::with_interceptor(channel, bearer);
            let list = nodes
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map_err(CtlError::Rpc)?;
            print_nodes(&list.into_inner().nodes, json, &mut out)
        }
        Command::Topology { job } => {
            let topology = jobs
                .get_topology(pb::GetTopologyRequest { job_id: job })
                .await
                .map_err(CtlError::Rpc)?;
            print_topology(&topology.into_inner(), json, &mut out)
        }
    }
}

fn bearer(token: Option<&str>) -> Result<Bearer, CtlError> {
    Bearer::new(token).map_err(|e| CtlError::Usage(e.to_string()))
}

async fn connect(server: &str) -> Result<Channel, CtlError> {
    let url = if server.contains("://") {
        server.to_owned()
    } else {
        format!("http://{server}")
    };
    let unreachable = |reason: String| CtlError::Unreachable {
        server: server.to_owned(),
        reason,
    };
    Endpoint::from_shared(url)
        .map_err(|e| CtlError::Usage(format!("bad server address {server:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| unreachable(crate::coordinator::error_chain(&e)))
}

async fn create_job(
    jobs: &mut JobServiceClient<Intercepted>,
    file: &PathBuf,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), CtlError> {
    let text = if file.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(file)
    }
    .map_err(|e| CtlError::Usage(format!("read {}: {e}", file.display())))?;
    let draft: JobSpecDraft = serde_json::from_str(&text)
        .map_err(|e| CtlError::Usage(format!("{}: {e}", file.display())))?;
    // The server validates the rest; only what has no wire form fails here.
    let spec = draft_to_pb(&draft)
        .map_err(|e| CtlError::Usage(format!("{}: {}", file.display(), e.under("spec"))))?;

    let created = jobs
        .create_job(pb::CreateJobRequest { spec: Some(spec) })
        .await
        .map_err(CtlError::Rpc)?
        .into_inner();
    let job = created.job.unwrap_or_default();
    if json {
        let value = json!({"job": job_json(&job), "trainer_token": created.trainer_token});
        writeln!(out, "{value}")?;
    } else {
        writeln!(out, "created job {} ({})", job.id, spec_name(&job))?;
        writeln!(out, "trainer token (shown once): {}", created.trainer_token)?;
    }
    Ok(())
}

async fn watch_job(
    jobs: &mut JobServiceClient<Intercepted>,
    job_id: u32,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), CtlError> {
    let mut stream = jobs
        .watch_job(pb::WatchJobRequest { job_id })
        .await
        .map_err(CtlError::Rpc)?
        .into_inner();
    let live_bar = !json && std::io::stdout().is_terminal();
    let mut bar_open = false;
    while let Some(event) = stream.message().await.map_err(CtlError::Rpc)? {
        if json {
            writeln!(out, "{}", event_json(&event))?;
            continue;
        }
        let progress = matches!(event.kind, Some(pb::job_event::Kind::RoundProgress(_)));
        if progress && !live_bar {
            // Per-join lines would flood a log; the round's record says it all.
            continue;
        }
        if bar_open && !progress {
            writeln!(out)?;
        }
        let line = event_line(&event);
        if progress {
            write!(out, "\r{line}")?;
        } else {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
        bar_open = progress;
    }
    if bar_open {
        writeln!(out)?;
    }
    Ok(())
}

fn spec_name(job: &pb::Job) -> &str {
    job.spec.as_ref().map_or("", |s| s.name.as_str())
}

fn state_name(state: i32) -> &'static str {
    match pb::JobState::try_from(state) {
        Ok(pb::JobState::Pending) => "pending",
        Ok(pb::JobState::Running) => "running",
        Ok(pb::JobState::Completed) => "completed",
        Ok(pb::JobState::Failed) => "failed",
        Ok(pb::JobState::Cancelled) => "cancelled",
        Ok(pb::JobState::Unspecified) | Err(_) => "unknown",
    }
}

/// `[#####.....]` for `done` of `total`.
pub fn progress_bar(done: u32, total: u32, width: usize) -> String {
    let filled = if total == 0 {
        width
    } else {
        (u64::from(done.min(total)) * width as u64 / u64::from(total)) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(width - filled))
}

fn event_line(event: &pb::JobEvent) -> String {
    use pb::job_event::Kind;
    let job = event.job.as_ref();
    match &event.kind {
        Some(Kind::Snapshot(_)) => job.map_or_else(String::new, |j| {
            format!(
                "job {} ({}) is {}, {} of {} rounds done",
                j.id,
                spec_name(j),
                state_name(j.state),
                j.model_version,
                j.spec.as_ref().map_or(0, |s| s.rounds)
            )
        }),
        Some(Kind::StateChanged(c)) => {
            let mut line = format!("state {} -> {}", state_name(c.from), state_name(c.to));
            if let Some(j) = job.filter(|j| !j.failure.is_empty()) {
                let _ = write!(line, ": {}", j.failure);
            }
            line
        }
        Some(Kind::RoundStarted(r)) => {
            let aggregators = r.topology.as_ref().map_or(0, |t| t.aggregators.len());
            format!("round {} started: {aggregators} aggregators", r.round)
        }
        Some(Kind::RoundProgress(p)) => format!(
            "round {} {} {}/{} trainers joined",
            p.round,
            progress_bar(p.trainers_joined, p.trainers_per_round, 30),
            p.trainers_joined,
            p.trainers_per_round
        ),
        Some(Kind::RoundFinished(f)) => f.record.as_ref().map_or_else(String::new, |r| {
            format!(
                "round {} finished: {} updates from {} trainers in {} ms, model {}",
                r.round, r.updates_aggregated, r.trainers_joined, r.duration_ms, r.model_checksum
            )
        }),
        None => String::new(),
    }
}

fn print_job(job: &pb::Job, json: bool, out: &mut impl std::io::Write) -> Result<(), CtlError> {
    if json {
        writeln!(out, "{}", job_json(job))?;
        return Ok(());
    }
    let spec = job.spec.clone().unwrap_or_default();
    writeln!(out, "id:            {}", job.id)?;
    writeln!(out, "name:          {}", spec.name)?;
    writeln!(out, "state:         {}", state_name(job.state))?;
    if !job.failure.is_empty() {
        writeln!(out, "failure:       {}", job.failure)?;
    }
    writeln!(
        out,
        "rounds:        {} of {} done",
        job.model_version, spec.rounds
    )?;
    writeln!(
        out,
        "trainers:      {} per round, at least {}",
        spec.trainers_per_round, spec.min_trainers
    )?;
    if !job.rounds.is_empty() {
        writeln!(out, "ROUND  JOINED  AGGREGATED  DURATION_MS  CHECKSUM")?;
        for r in &job.rounds {
            let checksum = if r.finished {
                r.model_checksum.as_str()
            } else {
                "(open)"
            };
            writeln!(
                out,
                "{:<5}  {:<6}  {:<10}  {:<11}  {checksum}",
                r.round, r.trainers_joined, r.updates_aggregated, r.duration_ms
            )?;
        }
    }
    Ok(())
}

fn print_jobs(jobs: &[pb::Job], json: bool, out: &mut impl std::io::Write) -> Result<(), CtlError> {
    if json {
        let all: Vec<Value> = jobs.iter().map(job_json).collect();
        writeln!(out, "{}", Value::Array(all))?;
        return Ok(());
    }
    writeln!(out, "{:<6}  {:<24}  {:<10}  ROUNDS", "ID", "NAME", "STATE")?;
    for job in jobs {
        let rounds = job.spec.as_ref().map_or(0, |s| s.rounds);
        writeln!(
            out,
            "{:<6}  {:<24}  {:<10}  {}/{rounds}",
            job.id,
            spec_name(job),
            state_name(job.state),
            job.model_version
        )?;
    }
    Ok(())
}

fn print_nodes(
    nodes: &[pb::Node],
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), CtlError> {
    if json {
        let all: Vec<Value> = nodes.iter().map(node_json).collect();
        writeln!(out, "{}", Value::Array(all))?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<20}  {:<7}  {:<5}  {:<14}  {:<21}  PEER",
        "ID", "STATUS", "CORES", "ARENA_BYTES", "GATEWAY"
    )?;
    for n in nodes {
        let capacity = n.capacity.unwrap_or_default();
        writeln!(
            out,
            "{:<20}  {:<7}  {:<5}  {:<14}  {:<21}  {}",
            n.id,
            if n.online { "online" } else { "offline" },
            capacity.cores,
            capacity.arena_bytes,
            n.gateway_address,
            n.peer_address
        )?;
    }
    Ok(())
}

fn print_topology(
    t: &pb::Topology,
    json: bool,
    out: &mut impl std::io::Write,
) -> Result<(), CtlError> {
    if json {
        writeln!(out, "{}", topology_json(t))?;
        return Ok(());
    }
    writeln!(
        out,
        "job {} round {}: {} levels, fan-in {}, {} aggregators",
        t.job_id,
        t.round,
        t.levels,
        t.fan_in,
        t.aggregators.len()
    )?;
    writeln!(
        out,
        "{:<10}  {:<5}  {:<10}  {:<8}  NODE",
        "ENDPOINT", "LEVEL", "PARENT", "INPUTS"
    )?;
    for a in t.aggregators.iter().rev() {
        let parent = match a.parent_endpoint_id {
            0 => "-".to_owned(),
            p => p.to_string(),
        };
        writeln!(
            out,
            "{:<10}  {:<5}  {:<10}  {:<8}  {}",
            a.endpoint_id, a.level, parent, a.expected_inputs, a.node_id
        )?;
    }
    Ok(())
}

/// A job as `--json` prints it: the spec in the same shape as a spec file.
pub fn job_json(job: &pb::Job) -> Value {
    let spec = job.spec.clone().unwrap_or_default();
    let model = spec.model.unwrap_or_default();
    let aggregation = spec.aggregation.unwrap_or_default();
    let hierarchy = spec.hierarchy.unwrap_or_default();
    let rounds: Vec<Value> = job
        .rounds
        .iter()
        .map(|r| {
            json!({
                "round": r.round,
                "started_unix_ms": r.started_unix_ms,
                "deadline_unix_ms": r.deadline_unix_ms,
                "trainers_joined": r.trainers_joined,
                "updates_aggregated": r.updates_aggregated,
                "duration_ms": r.duration_ms,
                "model_checksum": r.model_checksum,
                "finished": r.finished,
            })
        })
        .collect();
    json!({
        "id": job.id,
        "state": state_name(job.state),
        "created_unix_ms": job.created_unix_ms,
        "model_version": job.model_version,
        "failure": job.failure,
        "spec": {
            "name": spec.name,
            "model": {"tensors": model.tensors.iter().map(|t| json!({
                "name": t.name, "shape": t.shape, "dtype": t.dtype,
            })).collect::<Vec<_>>()},
            "rounds": spec.rounds,
            "trainers_per_round": spec.trainers_per_round,
            "min_trainers": spec.min_trainers,
            "round_deadline_ms": spec.round_deadline_ms,
            "aggregation": {"rule": aggregation.rule, "mode": aggregation.mode},
            "hierarchy": {
                "levels": match hierarchy.levels {
                    0 => json!("auto"),
                    levels => json!(levels),
                },
                "max_fan_in": hierarchy.max_fan_in,
            },
        },
        "rounds": rounds,
    })
}

fn node_json(n: &pb::Node) -> Value {
    let capacity = n.capacity.unwrap_or_default();
    json!({
        "id": n.id,
        "online": n.online,
        "cores": capacity.cores,
        "arena_bytes": capacity.arena_bytes,
        "gateway_address": n.gateway_address,
        "peer_address": n.peer_address,
        "last_heartbeat_unix_ms": n.last_heartbeat_unix_ms,
    })
}

fn topology_json(t: &pb::Topology) -> Value {
    json!({
        "job_id": t.job_id,
        "round": t.round,
        "levels": t.levels,
        "fan_in": t.fan_in,
        "aggregators": t.aggregators.iter().map(|a| json!({
            "endpoint_id": a.endpoint_id,
            "level": a.level,
            "parent_endpoint_id": match a.parent_endpoint_id {
                0 => Value::Null,
                parent => json!(parent),
            },
            "node_id": a.node_id,
            "expected_inputs": a.expected_inputs,
        })).collect::<Vec<_>>(),
    })
}

fn event_json(event: &pb::JobEvent) -> Value {
    use pb::job_event::Kind;
    let (kind, detail) = match &event.kind {
        Some(Kind::Snapshot(_)) => ("snapshot", json!({})),
        Some(Kind::StateChanged(c)) => (
            "state_changed",
            json!({"from": state_name(c.from), "to": state_name(c.to)}),
        ),
        Some(Kind::RoundStarted(r)) => (
            "round_started",
            json!({"round": r.round, "topology": r.topology.as_ref().map(topology_json)}),
        ),
        Some(Kind::RoundProgress(p)) => (
            "round_progress",
            json!({"round": p.round, "trainers_joined": p.trainers_joined,
                   "trainers_per_round": p.trainers_per_round}),
        ),
        Some(Kind::RoundFinished(f)) => (
            "round_finished",
            json!({"round": f.record.as_ref().map_or(0, |r| r.round)}),
        ),
        None => ("unknown", json!({})),
    };
    json!({"event": kind, "detail": detail, "job": event.job.as_ref().map(job_json)})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_fills_in_proportion() {
        assert_eq!(progress_bar(0, 10, 10), "[..........]");
        assert_eq!(progress_bar(5, 10, 10), "[#####.....]");
        assert_eq!(progress_bar(12, 10, 4), "[####]");
        assert_eq!(progress_bar(0, 0, 2), "[##]");
    }

    #[test]
    fn statuses_map_to_the_documented_exit_codes() {
        let code = |c| CtlError::Rpc(Status::new(c, "x")).exit_code();
        assert_eq!(code(Code::InvalidArgument), 2);
        assert_eq!(code(Code::NotFound), 3);
        assert_eq!(code(Code::PermissionDenied), 4);
        assert_eq!(code(Code::Unauthenticated), 4);
        assert_eq!(code(Code::Internal), 1);
        assert_eq!(
            CtlError::Rpc(Status::not_found("job 9 not found")).to_string(),
            "not found: job 9 not found"
        );
    }

    #[test]
    fn job_json_prints_the_spec_in_spec_file_shape() {
        let draft = crate::spec::tests::good_draft();
        let job = pb::Job {
            id: 4,
            spec: Some(draft_to_pb(&draft).unwrap()),
            state: pb::JobState::Running.into(),
            ..pb::Job::default()
        };
        let value = job_json(&job);
        assert_eq!(value["state"], "running");
        let back: JobSpecDraft = serde_json::from_value(value["spec"].clone()).unwrap();
        assert_eq!(back, draft);
    }
}

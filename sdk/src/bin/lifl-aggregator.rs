//! `lifl-aggregator`: one aggregator function for one round. It registers
//! its endpoint with the node's sidecar, folds what its children send, passes
//! the result on, prints what it did as one JSON line, and exits. The top of
//! a tree also reports the round to the control plane (`--report-to`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use lifl_proto::bearer::Bearer;
use lifl_proto::v1::node_service_client::NodeServiceClient;
use lifl_proto::v1::CompleteRoundRequest;
use lifl_sdk::aggregator::{run_round, Mode, Role, RoundPlan};
use lifl_sdk::{Endpoint, Registration};

#[derive(Debug, Clone, Copy, ValueEnum)]
enum RoleArg {
    Leaf,
    Middle,
    Top,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ModeArg {
    Eager,
    Lazy,
}

/// One aggregator of a lifl round.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// The node sidecar's registration socket.
    #[arg(
        long,
        env = "LIFL_SIDECAR_SOCKET",
        default_value = "/run/lifl/sidecar.sock"
    )]
    socket: PathBuf,
    /// Job id.
    #[arg(long)]
    job: u32,
    /// This aggregator's endpoint id, as the control plane assigned it.
    #[arg(long)]
    endpoint: u32,
    /// Place in the tree.
    #[arg(long, value_enum)]
    role: RoleArg,
    /// Fold as updates arrive (eager) or once all are in (lazy).
    #[arg(long, value_enum, default_value = "eager")]
    mode: ModeArg,
    /// Round number.
    #[arg(long)]
    round: u32,
    /// Parameters (f32) in the model.
    #[arg(long)]
    params: usize,
    /// Children expected to report.
    #[arg(long)]
    expected: u32,
    /// Fewest children that make a result after the deadline (default: all).
    #[arg(long)]
    minimum: Option<u32>,
    /// Milliseconds from start until the round's deadline.
    #[arg(long, default_value_t = 60_000)]
    deadline_ms: u64,
    /// Endpoint the result goes to: the parent, or the model's publisher.
    #[arg(long)]
    send_to: Option<u32>,
    /// Directory for the top's checkpoints.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// The control plane the top reports the finished round to, e.g.
    /// `http://127.0.0.1:7400`.
    #[arg(long)]
    report_to: Option<String>,
    /// A file to append the done line to as well (one JSON object a line),
    /// for benchmarks and operators collecting every aggregator's figures.
    #[arg(long, env = "LIFL_AGGREGATOR_REPORT_FILE")]
    report_file: Option<PathBuf>,
    /// The control plane's admin token, if it has one.
    #[arg(long, env = "LIFL_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
}

/// What the process holds in memory, from `/proc/self/status`.
#[derive(Debug, Default)]
struct Memory {
    /// Peak resident set (`VmHWM`), bytes.
    peak: u64,
    /// Resident pages of shared memory (`RssShmem`): arena pages read in
    /// place, which the sidecar owns; not extra memory.
    shared: u64,
}

impl Memory {
    fn read() -> Self {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
                .map_or(0, |kib| kib * 1024)
        };
        Self {
            peak: field("VmHWM:"),
            shared: field("RssShmem:"),
        }
    }
}

/// Appends one line; lines of several aggregators never interleave (one
/// `write` in append mode).
fn append_line(path: &std::path::Path, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    file.write_all(format!("{line}\n").as_bytes())
}

/// Attempts at reporting a round while the control plane is unreachable.
const REPORT_ATTEMPTS: u32 = 10;
/// Longest one attempt may take, connecting or waiting for the answer: a
/// control plane that accepts and then stalls must not keep the top alive.
const REPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Tells the control plane the round produced its model; retried while the
/// control plane is unreachable.
async fn report_round(
    url: &str,
    token: Option<&str>,
    request: CompleteRoundRequest,
) -> anyhow::Result<()> {
    let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("control plane address {url}"))?
        .connect_timeout(REPORT_TIMEOUT)
        .timeout(REPORT_TIMEOUT);
    let bearer = Bearer::new(token)?;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let outcome = async {
            let mut client = NodeServiceClient::new(
                endpoint
                    .connect()
                    .await
                    .map_err(|e| tonic::Status::unavailable(format!("connect: {e}")))?,
            );
            client.complete_round(bearer.request(request.clone())).await
        }
        .await;
        match outcome {
            Ok(_) => return Ok(()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                ) && attempt < REPORT_ATTEMPTS =>
            {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            Err(status) => bail!(
                "the control plane refused round {} of job {}: {:?}: {}",
                request.round,
                request.job_id,
                status.code(),
                status.message()
            ),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let deadline = Instant::now() + Duration::from_millis(args.deadline_ms);
    let role = match args.role {
        RoleArg::Leaf => Role::Leaf,
        RoleArg::Middle => Role::Middle,
        RoleArg::Top => Role::Top,
    };
    let plan = RoundPlan {
        role,
        mode: match args.mode {
            ModeArg::Eager => Mode::Eager,
            ModeArg::Lazy => Mode::Lazy,
        },
        round: args.round,
        params: args.params,
        expected: args.expected,
        minimum: args.minimum.unwrap_or(args.expected),
        deadline,
        send_to: args.send_to,
        checkpoint_dir: args.checkpoint_dir,
    };

    let registration =
        Registration::new(&args.socket, args.job, format!("{role:?}").to_lowercase())
            .with_endpoint(args.endpoint);
    let endpoint = Endpoint::register(registration)
        .await
        .context("register with the sidecar")?;
    println!(
        "{}",
        serde_json::json!({"event": "ready", "endpoint": endpoint.id()})
    );
    let outcome = run_round(&endpoint, &plan)
        .await
        .context("aggregate the round")?;
    let memory = Memory::read();
    let done = serde_json::json!({
        "event": "done",
        "job": args.job,
        "round": args.round,
        "role": format!("{role:?}").to_lowercase(),
        "endpoint": endpoint.id(),
        "children": outcome.children,
        "refused": outcome.refused,
        "samples": outcome.samples,
        "updates": outcome.updates,
        "sha256": outcome.sha256,
        "checkpoint": outcome.checkpoint,
        "fold_bytes": outcome.fold.bytes,
        "fold_seconds": outcome.fold.busy.as_secs_f64(),
        "fold_cpu_seconds": outcome.fold.cpu.as_secs_f64(),
        "fold_passes": outcome.fold.passes,
        "peak_rss_bytes": memory.peak,
        "arena_rss_bytes": memory.shared,
        "private_peak_bytes": memory.peak.saturating_sub(memory.shared),
    });
    println!("{done}");
    if let Some(path) = &args.report_file {
        append_line(path, &done.to_string())
            .with_context(|| format!("append the report to {}", path.display()))?;
    }
    if let (Role::Top, Some(url)) = (role, &args.report_to) {
        let request = CompleteRoundRequest {
            job_id: args.job,
            round: args.round,
            updates_aggregated: outcome.updates,
            model_checksum: outcome.sha256.clone(),
        };
        let token = args.admin_token.as_deref().filter(|t| !t.is_empty());
        report_round(url, token, request).await?;
    }
    Ok(())
}

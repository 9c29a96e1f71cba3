//! `lifl-aggregator`: one aggregator function for one round. It registers
//! its endpoint with the node's sidecar, folds what its children send, passes
//! the result on, prints what it did as one JSON line, and exits.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, ValueEnum};
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
    println!(
        "{}",
        serde_json::json!({
            "event": "done",
            "endpoint": endpoint.id(),
            "children": outcome.children,
            "refused": outcome.refused,
            "samples": outcome.samples,
            "updates": outcome.updates,
            "sha256": outcome.sha256,
            "checkpoint": outcome.checkpoint,
        })
    );
    Ok(())
}

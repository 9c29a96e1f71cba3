//! `lifl-control-plane`: parses flags, starts tracing, and runs the control
//! plane until SIGTERM or SIGINT. Everything else lives in the library.
//!
//! On start it prints the address it listens on, alone on one line of
//! stdout, so scripts and tests that pass port 0 learn the real port.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use lifl_control_plane::server::{self, ServerConfig, StoreLocation};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

/// The lifl control plane: jobs, nodes and round topology over gRPC.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to serve gRPC on; port 0 picks a free port.
    #[arg(
        long,
        env = "LIFL_CONTROL_PLANE_LISTEN",
        default_value = "127.0.0.1:7400"
    )]
    listen: SocketAddr,
    /// The redb file that holds state, created if missing; `:memory:` keeps
    /// state in memory only.
    #[arg(
        long,
        env = "LIFL_CONTROL_PLANE_STORE",
        default_value = "lifl-control-plane.redb"
    )]
    store: PathBuf,
    /// Admin bearer token; when set, every call needs it or a job's trainer
    /// token. Prefer the environment variable to keep it out of `ps`.
    #[arg(long, env = "LIFL_CONTROL_PLANE_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// How often nodes must send heartbeats, in milliseconds (10 to one
    /// hour).
    #[arg(long, env = "LIFL_CONTROL_PLANE_HEARTBEAT_INTERVAL_MS", default_value_t = 5000,
          value_parser = clap::value_parser!(u64).range(10..=MAX_HEARTBEAT_INTERVAL_MS))]
    heartbeat_interval_ms: u64,
    /// Heartbeats a node may miss before it is marked offline (1 to 1000).
    #[arg(long, env = "LIFL_CONTROL_PLANE_MISSED_HEARTBEATS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=MAX_MISSED_HEARTBEATS))]
    missed_heartbeats: u32,
    /// Time past a round's deadline before its job fails, in milliseconds (up
    /// to one week).
    #[arg(long, env = "LIFL_CONTROL_PLANE_ROUND_GRACE_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(0..=MAX_ROUND_GRACE_MS))]
    round_grace_ms: u64,
}

/// Longest heartbeat interval: one hour.
const MAX_HEARTBEAT_INTERVAL_MS: u64 = 3600 * 1000;
/// Most heartbeats a node may miss; with the interval, at most 1000 hours.
const MAX_MISSED_HEARTBEATS: i64 = 1000;
/// Longest round grace: one week.
const MAX_ROUND_GRACE_MS: u64 = 7 * 24 * 3600 * 1000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LIFL_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let store = if args.store.as_os_str() == ":memory:" {
        StoreLocation::Memory
    } else {
        StoreLocation::File(args.store.clone())
    };
    let mut config = ServerConfig::new(args.listen, store);
    config.admin_token = args.admin_token.filter(|t| !t.is_empty());
    config.heartbeat_interval = Duration::from_millis(args.heartbeat_interval_ms);
    config.missed_heartbeats = args.missed_heartbeats;
    config.round_grace = Duration::from_millis(args.round_grace_ms);

    let running = server::start(config)
        .await
        .context("start the control plane")?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", running.local_addr()).context("print the listen address")?;
    stdout.flush().context("print the listen address")?;

    let mut terminate = signal(SignalKind::terminate()).context("install the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("install the SIGINT handler")?;
    let shutdown = running.shutdown_token();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM received"),
            _ = interrupt.recv() => info!("SIGINT received"),
        }
        shutdown.cancel();
    });

    running.wait().await.context("serve the control plane")
}

#[cfg(test)]
mod tests {
    use clap::error::ErrorKind;

    use super::*;

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("lifl-control-plane").chain(flags.iter().copied()))
    }

    #[test]
    fn timing_flags_are_bounded() {
        let args = parse(&[
            "--heartbeat-interval-ms=3600000",
            "--missed-heartbeats=1000",
            "--round-grace-ms=604800000",
        ])
        .unwrap();
        assert_eq!(
            (
                args.heartbeat_interval_ms,
                args.missed_heartbeats,
                args.round_grace_ms
            ),
            (3_600_000, 1000, 604_800_000)
        );

        for (flag, range) in [
            ("--heartbeat-interval-ms=9", "10..=3600000"),
            ("--heartbeat-interval-ms=3600001", "10..=3600000"),
            ("--missed-heartbeats=0", "1..=1000"),
            ("--missed-heartbeats=1001", "1..=1000"),
            ("--round-grace-ms=604800001", "0..=604800000"),
        ] {
            let err = parse(&[flag]).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{flag}");
            assert!(
                err.to_string().contains(&format!("not in {range}")),
                "{flag}: {err}"
            );
        }
    }
}

//! `lifl-sidecar`: parses its settings, starts logging, and runs the node.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = lifl_sidecar::config::Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("LIFL_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    lifl_sidecar::run(config).await
}

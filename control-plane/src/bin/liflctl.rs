//! `liflctl`: the operator's CLI for the lifl control plane. Parses the
//! command line and hands it to the library; the exit code says what kind of
//! failure happened (see `liflctl --help`).

use std::process::ExitCode;

use clap::Parser;
use lifl_control_plane::ctl::{self, Cli};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match ctl::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("liflctl: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

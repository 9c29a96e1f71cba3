//! Starting the aggregators a round needs.
//!
//! [`Launcher`] is the seam between deciding which aggregators run (the node
//! agent, from the control plane's round assignments) and how they come to
//! run. [`ProcessLauncher`] starts one short-lived `lifl-aggregator` process
//! per aggregator and round, as LIFL's serverless model has it; a launcher
//! that hands rounds to warm processes, or scales them, fits the same trait.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// Where an aggregator sits in its round's tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Takes trainers' updates.
    Leaf,
    /// Takes partial results.
    Middle,
    /// Publishes the global model.
    Top,
}

impl Role {
    /// The name `lifl-aggregator --role` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leaf => "leaf",
            Self::Middle => "middle",
            Self::Top => "top",
        }
    }
}

/// One aggregator of one round, ready to start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AggregatorSpec {
    /// Job id.
    pub job: u32,
    /// Round number.
    pub round: u32,
    /// Its endpoint id, as the control plane planned it.
    pub endpoint: u32,
    /// Its place in the tree.
    pub role: Role,
    /// `eager` or `lazy`.
    pub mode: String,
    /// f32 parameters in the model.
    pub params: usize,
    /// Children it waits for.
    pub expected: u32,
    /// Fewest children that make a result once the deadline passed.
    pub minimum: u32,
    /// Time left until its deadline.
    pub deadline: Duration,
    /// Where its result goes: the parent's endpoint, or for the top the
    /// gateway's, which serves the model to trainers.
    pub send_to: u32,
    /// For the top: the control plane to report the round to.
    pub report_to: Option<String>,
    /// For the top: where to write the checkpoint.
    pub checkpoint_dir: Option<PathBuf>,
}

/// Why an aggregator could not be started.
#[derive(Debug, thiserror::Error)]
#[error("start aggregator {endpoint} of job {job}")]
pub struct LaunchError {
    /// Job id.
    pub job: u32,
    /// Endpoint id.
    pub endpoint: u32,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Makes aggregators run.
pub trait Launcher: Send + Sync + std::fmt::Debug {
    /// Starts `spec`. It runs until its round is done, or until `stop` is
    /// cancelled (the job ended or the node is shutting down).
    fn launch(&self, spec: &AggregatorSpec, stop: CancellationToken) -> Result<(), LaunchError>;
}

/// Starts each aggregator as its own `lifl-aggregator` process.
#[derive(Debug, Clone)]
pub struct ProcessLauncher {
    /// The `lifl-aggregator` executable.
    pub program: PathBuf,
    /// The sidecar's registration socket, for the aggregators to register.
    pub socket: PathBuf,
    /// Token for reporting to the control plane, passed in the environment.
    pub admin_token: Option<String>,
}

impl ProcessLauncher {
    /// The arguments that run `spec`.
    pub fn args(spec: &AggregatorSpec) -> Vec<String> {
        let mut args = vec![
            format!("--job={}", spec.job),
            format!("--round={}", spec.round),
            format!("--endpoint={}", spec.endpoint),
            format!("--role={}", spec.role.as_str()),
            format!("--mode={}", spec.mode),
            format!("--params={}", spec.params),
            format!("--expected={}", spec.expected),
            format!("--minimum={}", spec.minimum),
            format!("--deadline-ms={}", spec.deadline.as_millis()),
            format!("--send-to={}", spec.send_to),
        ];
        if let Some(url) = &spec.report_to {
            args.push(format!("--report-to={url}"));
        }
        if let Some(dir) = &spec.checkpoint_dir {
            args.push(format!("--checkpoint-dir={}", dir.display()));
        }
        args
    }
}

impl Launcher for ProcessLauncher {
    fn launch(&self, spec: &AggregatorSpec, stop: CancellationToken) -> Result<(), LaunchError> {
        let mut command = Command::new(&self.program);
        command
            .args(Self::args(spec))
            .env("LIFL_SIDECAR_SOCKET", &self.socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match &self.admin_token {
            Some(token) => command.env("LIFL_ADMIN_TOKEN", token),
            None => command.env_remove("LIFL_ADMIN_TOKEN"),
        };
        let mut child = command.spawn().map_err(|source| LaunchError {
            job: spec.job,
            endpoint: spec.endpoint,
            source,
        })?;
        let (job, round, endpoint, role) = (spec.job, spec.round, spec.endpoint, spec.role);
        tracing::debug!(
            job,
            round,
            endpoint,
            role = role.as_str(),
            "aggregator started"
        );
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        tokio::spawn(async move {
            // Its last line says what it did; the end of its error output,
            // why it failed.
            let report = async {
                let (last, errors) = tokio::join!(last_lines(stdout, 1), last_lines(stderr, 6));
                (last.into_iter().next(), errors)
            };
            tokio::select! {
                () = stop.cancelled() => {
                    let _ = child.kill().await;
                    tracing::debug!(job, round, endpoint, "aggregator stopped");
                }
                ((last, errors), status) = async { (report.await, child.wait().await) } => {
                    match status {
                        Ok(status) if status.success() => tracing::info!(
                            job, round, endpoint, role = role.as_str(),
                            report = last.as_deref().unwrap_or(""),
                            "aggregator finished"
                        ),
                        Ok(status) => tracing::warn!(
                            job, round, endpoint, role = role.as_str(), %status,
                            stderr = errors.join(" | "),
                            "aggregator failed"
                        ),
                        Err(err) => tracing::warn!(job, endpoint, %err, "wait for aggregator"),
                    }
                }
            }
        });
        Ok(())
    }
}

/// The last `keep` lines `output` writes before it closes (none if absent).
async fn last_lines<R>(output: Option<R>, keep: usize) -> Vec<String>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut last = std::collections::VecDeque::with_capacity(keep);
    if let Some(output) = output {
        let mut lines = BufReader::new(output).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if last.len() == keep {
                last.pop_front();
            }
            last.push_back(line);
        }
    }
    last.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_last_lines_are_kept() {
        let output: &[u8] = b"one\ntwo\nthree\nfour\n";
        assert_eq!(last_lines(Some(output), 2).await, ["three", "four"]);
        assert_eq!(last_lines(Some(output), 9).await.len(), 4);
        assert!(last_lines(None::<&[u8]>, 3).await.is_empty());
    }

    #[test]
    fn a_top_is_told_where_to_report_and_checkpoint() {
        let spec = AggregatorSpec {
            job: 3,
            round: 2,
            endpoint: 14,
            role: Role::Top,
            mode: "lazy".into(),
            params: 50,
            expected: 2,
            minimum: 1,
            deadline: Duration::from_millis(61_500),
            send_to: 4_294_967_295,
            report_to: Some("http://cp:7400".into()),
            checkpoint_dir: Some("/var/lib/lifl/checkpoints".into()),
        };
        let args = ProcessLauncher::args(&spec);
        for expected in [
            "--role=top",
            "--mode=lazy",
            "--deadline-ms=61500",
            "--send-to=4294967295",
            "--report-to=http://cp:7400",
            "--checkpoint-dir=/var/lib/lifl/checkpoints",
        ] {
            assert!(args.iter().any(|a| a == expected), "{expected} in {args:?}");
        }
    }
}

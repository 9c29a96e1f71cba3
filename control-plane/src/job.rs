//! Jobs as the control plane records them: the spec, the lifecycle state, one
//! record per round, and the current round's tree.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::planner::Topology;
use crate::spec::JobSpec;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Accepted; no round started yet.
    Pending,
    /// A round started and rounds remain.
    Running,
    /// Every round finished.
    Completed,
    /// A round could not finish.
    Failed,
    /// An operator cancelled the job.
    Cancelled,
}

impl JobState {
    /// Whether the job has ended and will never change again.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// Lowercase name, as `liflctl` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundRecord {
    /// Round number, from 1.
    pub round: u32,
    /// Start, in milliseconds since the Unix epoch.
    pub started_unix_ms: u64,
    /// Deadline, in milliseconds since the Unix epoch.
    pub deadline_unix_ms: u64,
    /// Trainers given an assignment (known once the round finishes).
    pub trainers_joined: u32,
    /// Updates in the new global model.
    pub updates_aggregated: u32,
    /// Start to finish, in milliseconds.
    pub duration_ms: u64,
    /// Checksum of the new global model, as the top aggregator reported it.
    pub model_checksum: String,
    /// Whether the round finished.
    pub finished: bool,
}

/// A job and everything recorded about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Id, never 0; also the job id in data-plane descriptors.
    pub id: u32,
    /// The validated spec.
    pub spec: JobSpec,
    /// Lifecycle state.
    pub state: JobState,
    /// Creation, in milliseconds since the Unix epoch.
    pub created_unix_ms: u64,
    /// Rounds finished: the version of the current global model.
    pub model_version: u32,
    /// One record per started round, in order.
    pub rounds: Vec<RoundRecord>,
    /// Why the job failed; empty otherwise.
    pub failure: String,
    /// SHA-256 of the job's trainer token, in hex.
    pub trainer_token_sha256: String,
    /// Tree of the current (or last) round.
    pub topology: Option<Arc<Topology>>,
}

impl Job {
    /// The round that started and has not finished, if any.
    pub fn open_round(&self) -> Option<&RoundRecord> {
        self.rounds.last().filter(|r| !r.finished)
    }
}

/// Milliseconds since the Unix epoch, by the wall clock.
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

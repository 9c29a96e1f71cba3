//! One aggregator's round: receive the expected updates (or partial results)
//! from its children, fold them with [`fedavg`](crate::fedavg), and pass the
//! result on: to its parent as a partial, or, at the top, as the new global
//! model with a checkpoint on disk.
//!
//! The same code serves leaves, middles and the top; only where the result
//! goes differs. Eager mode folds every batch of arrived updates at once and
//! releases them; lazy mode holds the references (in the arena, not in this
//! process) until every child has reported, or the deadline has passed with
//! the minimum in, then folds them all. Either way the process keeps one
//! model-sized sum, whatever its number of children.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::checksum::sha256_hex;
use crate::fedavg::{Accumulator, FoldError, MAX_BATCH, MAX_UPDATE_SAMPLES};
use crate::{DescKind, Endpoint, SdkError, Update, UpdateMeta};

/// Where an aggregator sits in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Receives trainers' updates; sends a partial to its parent.
    Leaf,
    /// Receives partials; sends a partial to its parent.
    Middle,
    /// Receives partials (or updates, in a one-level tree); publishes the
    /// global model.
    Top,
}

/// When updates are folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As they arrive.
    Eager,
    /// Once all have arrived, or the deadline has passed with the minimum.
    Lazy,
}

/// What one aggregator does in one round.
#[derive(Debug, Clone)]
pub struct RoundPlan {
    /// Its place in the tree.
    pub role: Role,
    /// Eager or lazy.
    pub mode: Mode,
    /// The round it aggregates; other rounds' updates are refused.
    pub round: u32,
    /// Parameters (f32) in the model layout.
    pub params: usize,
    /// Children expected to report.
    pub expected: u32,
    /// Fewest children that make a result once the deadline has passed.
    pub minimum: u32,
    /// When to stop waiting for the rest.
    pub deadline: Instant,
    /// Endpoint the result goes to: the parent, or for the top the endpoint
    /// that serves the global model (if any).
    pub send_to: Option<u32>,
    /// Where the top writes `job-J-round-R.f32` and its `.sha256`.
    pub checkpoint_dir: Option<PathBuf>,
}

/// What an aggregator did in a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundOutcome {
    /// Children whose results were folded.
    pub children: u32,
    /// Children's results refused (wrong round, kind or length, or more
    /// samples than their updates may claim).
    pub refused: u32,
    /// Samples behind the result.
    pub samples: u64,
    /// Trainers' updates behind the result, summed over the children.
    pub updates: u32,
    /// Time spent folding, and the bytes of the children's results it read.
    pub fold: FoldTime,
    /// SHA-256 of the result's bytes, hex.
    pub sha256: String,
    /// The checkpoint written, at the top.
    pub checkpoint: Option<PathBuf>,
}

/// How long folding took, to set beside memory bandwidth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FoldTime {
    /// Bytes of children's results read by the fold.
    pub bytes: u64,
    /// Time inside the fold.
    pub busy: Duration,
    /// CPU time of the folding thread inside the fold: `busy` less the
    /// time other processes had the core (the node's trainers, gateway and
    /// other aggregators share it).
    pub cpu: Duration,
    /// Passes over the sum (each folds up to 8 results).
    pub passes: u32,
}

impl FoldTime {
    /// Bytes folded per second of fold time, in GB/s; 0 before any fold.
    pub fn gbps(&self) -> f64 {
        match self.busy.as_secs_f64() {
            secs if secs > 0.0 => self.bytes as f64 / secs / 1e9,
            _ => 0.0,
        }
    }

    /// Bytes folded per second of the core's time, in GB/s; 0 before any
    /// fold.
    pub fn cpu_gbps(&self) -> f64 {
        match self.cpu.as_secs_f64() {
            secs if secs > 0.0 => self.bytes as f64 / secs / 1e9,
            _ => 0.0,
        }
    }
}

/// Why a round could not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum AggregatorError {
    /// The deadline passed before the minimum of children reported.
    #[error("deadline passed with {received} of at least {minimum} children reported")]
    Incomplete {
        /// Children that reported.
        received: u32,
        /// Children required.
        minimum: u32,
    },
    /// Folding failed (a length slipped past the checks, or sample overflow).
    #[error("fold: {0}")]
    Fold(#[from] FoldError),
    /// The data path failed.
    #[error("data path: {0}")]
    Sdk(#[from] SdkError),
    /// Writing the checkpoint failed.
    #[error("write checkpoint {path}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// Runs one round of `plan` on `endpoint`.
pub async fn run_round(
    endpoint: &Endpoint,
    plan: &RoundPlan,
) -> Result<RoundOutcome, AggregatorError> {
    let mut acc = Accumulator::new(plan.params);
    let mut fold = FoldTime::default();
    let mut held: Vec<Update> = Vec::new();
    let (mut children, mut refused, mut updates) = (0u32, 0u32, 0u32);
    // Samples behind every result taken so far, folded or held.
    let mut taken = 0u64;

    while children < plan.expected {
        // Past the deadline, what has already arrived still counts: take
        // it without waiting, and stop once nothing more is there.
        let first = if Instant::now() < plan.deadline {
            tokio::select! {
                biased;
                update = endpoint.recv() => update,
                _ = tokio::time::sleep_until(plan.deadline.into()) => continue,
            }
        } else {
            match endpoint.recv().now_or_never() {
                Some(update) => update,
                None => break,
            }
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut next = Some(first);
        while let Some(received) = next.take() {
            match sort_received(plan, received, &mut taken)? {
                Received::Take(update) => batch.push(update),
                Received::Refuse => refused += 1,
                Received::Ignore => {}
            }
            if batch.len() < MAX_BATCH && children + (batch.len() as u32) < plan.expected {
                next = endpoint.recv().now_or_never();
            }
        }
        children += batch.len() as u32;
        updates = batch
            .iter()
            .fold(updates, |sum, u| sum.saturating_add(u.meta().updates));
        match plan.mode {
            Mode::Eager => fold_all(&mut acc, &batch, &mut fold)?,
            Mode::Lazy => held.extend(batch),
        }
    }
    if children < plan.minimum || children == 0 {
        return Err(AggregatorError::Incomplete {
            received: children,
            minimum: plan.minimum,
        });
    }
    for chunk in held.chunks(balanced_batch(held.len())) {
        fold_all(&mut acc, chunk, &mut fold)?;
    }
    drop(held);

    let counts = Counts {
        children,
        refused,
        updates,
    };
    publish(endpoint, plan, &acc, counts, fold).await
}

/// What a round took in.
#[derive(Debug, Clone, Copy)]
struct Counts {
    children: u32,
    refused: u32,
    updates: u32,
}

/// Batch size that folds `held` results in as few passes as [`MAX_BATCH`]
/// allows, with passes of equal size: ten results fold as 5 + 5, not
/// 8 + 2, since a pass of two reads the sum for little.
fn balanced_batch(held: usize) -> usize {
    let passes = held.div_ceil(MAX_BATCH).max(1);
    held.div_ceil(passes).max(1)
}

/// What one `recv` brought an aggregator.
enum Received {
    /// A child's result for this round's fold.
    Take(Update),
    /// Something a child sent that does not belong in the fold: another
    /// round or kind, a wrong length, more samples than its updates may
    /// claim or than the round's total can hold, or a descriptor that
    /// could not be read.
    Refuse,
    /// Word of a descriptor this aggregator sent; it sends only once its
    /// fold is done, so nothing here depends on it.
    Ignore,
}

/// Sorts what `recv` returned; only a data path that stopped working ends
/// the round. `taken` is the sample total of every result taken so far.
fn sort_received(
    plan: &RoundPlan,
    received: Result<Update, SdkError>,
    taken: &mut u64,
) -> Result<Received, SdkError> {
    let update = match received {
        Ok(update) => update,
        Err(SdkError::Protocol(_)) => return Ok(Received::Refuse),
        Err(SdkError::Refused { .. }) => return Ok(Received::Ignore),
        Err(err) => return Err(err),
    };
    let total = taken.checked_add(update.meta().samples);
    match total {
        Some(total) if accepts(plan, &update) => {
            *taken = total;
            Ok(Received::Take(update))
        }
        _ => Ok(Received::Refuse),
    }
}

/// Whether a child's result belongs in this round's fold.
fn accepts(plan: &RoundPlan, update: &Update) -> bool {
    let meta = update.meta();
    let kind_ok = match plan.role {
        Role::Leaf => meta.kind == DescKind::Update,
        Role::Middle => meta.kind == DescKind::Partial,
        Role::Top => matches!(meta.kind, DescKind::Update | DescKind::Partial),
    };
    kind_ok
        && meta.round == plan.round
        && meta.samples > 0
        && meta.updates > 0
        && meta.samples <= u64::from(meta.updates) * MAX_UPDATE_SAMPLES
        && (meta.kind != DescKind::Update || meta.updates == 1)
        && update.len() == (plan.params * 4) as u64
}

fn fold_all(
    acc: &mut Accumulator,
    updates: &[Update],
    time: &mut FoldTime,
) -> Result<(), AggregatorError> {
    if updates.is_empty() {
        return Ok(());
    }
    let mut batch = Vec::with_capacity(updates.len());
    for update in updates {
        batch.push((update.as_f32()?, update.meta().samples));
    }
    let (started, cpu_started) = (Instant::now(), thread_cpu_time());
    acc.fold(&batch)?;
    time.busy += started.elapsed();
    time.cpu += thread_cpu_time().saturating_sub(cpu_started);
    time.bytes += updates.iter().map(Update::len).sum::<u64>();
    time.passes += 1;
    Ok(())
}

/// Writes the mean once into the arena and sends it on; the top also
/// checkpoints it.
async fn publish(
    endpoint: &Endpoint,
    plan: &RoundPlan,
    acc: &Accumulator,
    counts: Counts,
    fold: FoldTime,
) -> Result<RoundOutcome, AggregatorError> {
    let mut result = endpoint.alloc((plan.params * 4) as u64).await?;
    let samples = acc.write_mean(result.as_mut_f32()?)?;
    let sha256 = sha256_hex(result.as_bytes());

    let checkpoint = match (&plan.checkpoint_dir, plan.role) {
        (Some(dir), Role::Top) => Some(write_checkpoint(
            dir,
            endpoint.job(),
            plan.round,
            &result,
            &sha256,
        )?),
        _ => None,
    };
    let kind = if plan.role == Role::Top {
        DescKind::Model
    } else {
        DescKind::Partial
    };
    if let Some(to) = plan.send_to {
        let meta = UpdateMeta {
            round: plan.round,
            kind,
            samples,
            updates: counts.updates,
        };
        endpoint.send(to, result, meta).await?;
    }
    Ok(RoundOutcome {
        children: counts.children,
        refused: counts.refused,
        samples,
        updates: counts.updates,
        fold,
        sha256,
        checkpoint,
    })
}

fn write_checkpoint(
    dir: &std::path::Path,
    job: u32,
    round: u32,
    model: &crate::BufferMut,
    sha256: &str,
) -> Result<PathBuf, AggregatorError> {
    let path = dir.join(format!("job-{job}-round-{round}.f32"));
    let failed = |source| AggregatorError::Checkpoint {
        path: path.clone(),
        source,
    };
    // Written aside, then renamed: a reader never sees half a model.
    let partial = path.with_extension("f32.partial");
    std::fs::create_dir_all(dir).map_err(failed)?;
    std::fs::write(&partial, model.as_bytes()).map_err(failed)?;
    std::fs::rename(&partial, &path).map_err(failed)?;
    let digest = format!(
        "{sha256}  {}\n",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    std::fs::write(path.with_extension("f32.sha256"), digest).map_err(failed)?;
    Ok(path)
}

/// CPU time this thread has used; zero if the clock cannot be read.
fn thread_cpu_time() -> Duration {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_THREAD_CPUTIME_ID).map_or(Duration::ZERO, Duration::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_results_fold_in_equal_passes_of_at_most_eight() {
        let passes = |n: usize| {
            let batch = balanced_batch(n);
            assert!(batch <= MAX_BATCH);
            (n.div_ceil(batch), batch)
        };
        assert_eq!(passes(10), (2, 5));
        assert_eq!(passes(8), (1, 8));
        assert_eq!(passes(17), (3, 6));
        assert_eq!(passes(3), (1, 3));
        assert_eq!(balanced_batch(0), 1);
    }
}

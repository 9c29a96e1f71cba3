//! `lifl-trainer`: simulates a job's trainers in one process. Every round,
//! each simulated trainer joins at the control plane, fetches the global
//! model from its gateway, trains softmax regression on its own shard of a
//! seeded synthetic dataset, and pushes the update; then the new global
//! model is fetched and scored on the held-out set.
//!
//! Stdout carries one JSON object per line, for scripts and tests:
//! `{"event":"round",...}` after each round and `{"event":"done",...}` at the
//! end. Progress for people goes to stderr. The exit status is non-zero if
//! the job fails or is cancelled, an update is refused, or a round does not
//! finish in time. The job's trainer token is all it needs: it joins rounds
//! and reads the job (its layout at start-up, its progress after each round).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args as ClapArgs, Parser};
use lifl_sdk::trainer::{
    layout_f32_values, time_until, Gateway, Job, JobState, TrainerAssignment, TrainerClient,
    TrainerError, DEFAULT_CONTROL_PLANE,
};
use lifl_sdk::training::{
    accuracy, loss, train_local, FederatedDataset, SyntheticSpec, TrainConfig,
};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tonic::Code;
use tracing::{info, warn};

/// Time allowed past a round's deadline for the control plane to close it
/// and the top aggregator to publish the new model.
const ROUND_GRACE: Duration = Duration::from_secs(60);

/// First pause before retrying an upload the gateway had no room for.
const PUSH_RETRY_START: Duration = Duration::from_millis(100);

/// Longest pause between upload retries.
const PUSH_RETRY_MAX: Duration = Duration::from_secs(2);

/// Simulated federated-learning trainers for one lifl job.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Control-plane address.
    #[arg(long, env = "LIFL_TRAINER_CONTROL_PLANE", default_value = DEFAULT_CONTROL_PLANE)]
    control_plane: String,
    /// Bearer token: the job's trainer token (or the admin token), when the
    /// control plane has an admin token configured.
    #[arg(long, env = "LIFL_TRAINER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Job id.
    #[arg(long)]
    job: u32,
    /// Simulated trainers, each with its own shard.
    #[arg(long, default_value_t = SyntheticSpec::new(0).trainers)]
    trainers: usize,
    /// Trainer ids are `<prefix>-<index>`.
    #[arg(long, default_value = "trainer")]
    id_prefix: String,
    /// Stop after this many rounds even if the job has more.
    #[arg(long)]
    rounds: Option<u32>,
    /// Trainers working at once (joining, training, uploading); bounds the
    /// models held in memory.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    train: TrainArgs,
}

/// The synthetic dataset; defaults are `SyntheticSpec::new`'s.
#[derive(Debug, ClapArgs)]
struct DataArgs {
    /// Seed of the dataset, and of every trainer's shuffles.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Classes, at least 2.
    #[arg(long, default_value_t = SyntheticSpec::new(0).classes)]
    classes: usize,
    /// Features per sample.
    #[arg(long, default_value_t = SyntheticSpec::new(0).features)]
    features: usize,
    /// Training samples per trainer, on average (shard sizes vary up to 3x).
    #[arg(long, default_value_t = demo_samples_per_trainer())]
    samples_per_trainer: usize,
    /// Held-out samples the global model is scored on.
    #[arg(long, default_value_t = SyntheticSpec::new(0).test_samples)]
    test_samples: usize,
    /// Spread of the class means.
    #[arg(long, default_value_t = SyntheticSpec::new(0).separation)]
    separation: f32,
    /// Typical per-feature noise around a class mean.
    #[arg(long, default_value_t = SyntheticSpec::new(0).noise)]
    noise: f32,
    /// Spread of the noise across features, at least 1.
    #[arg(long, default_value_t = SyntheticSpec::new(0).noise_spread)]
    noise_spread: f32,
    /// Non-IID skew: fraction of a shard drawn from its two dominant
    /// classes; 0 gives IID shards.
    #[arg(long, default_value_t = SyntheticSpec::new(0).dominant_fraction)]
    dominant_fraction: f32,
}

/// Local training; defaults are `TrainConfig::new`'s.
#[derive(Debug, ClapArgs)]
struct TrainArgs {
    /// Passes over the shard per round.
    #[arg(long, default_value_t = TrainConfig::new(0).epochs)]
    epochs: usize,
    /// SGD step size.
    #[arg(long, default_value_t = TrainConfig::new(0).learning_rate)]
    learning_rate: f32,
    /// Samples per SGD step.
    #[arg(long, default_value_t = TrainConfig::new(0).batch_size)]
    batch_size: usize,
    /// Largest gradient norm per step.
    #[arg(long, default_value_t = TrainConfig::new(0).max_grad_norm)]
    max_grad_norm: f32,
}

fn demo_samples_per_trainer() -> usize {
    let demo = SyntheticSpec::new(0);
    demo.train_samples / demo.trainers
}

impl Args {
    fn spec(&self) -> anyhow::Result<SyntheticSpec> {
        let d = &self.data;
        let train_samples = self
            .trainers
            .checked_mul(d.samples_per_trainer)
            .context("--trainers times --samples-per-trainer overflows")?;
        Ok(SyntheticSpec {
            seed: d.seed,
            classes: d.classes,
            features: d.features,
            trainers: self.trainers,
            train_samples,
            test_samples: d.test_samples,
            separation: d.separation,
            noise: d.noise,
            noise_spread: d.noise_spread,
            dominant_fraction: d.dominant_fraction,
        })
    }

    fn train_config(&self) -> TrainConfig {
        TrainConfig {
            epochs: self.train.epochs,
            batch_size: self.train.batch_size,
            learning_rate: self.train.learning_rate,
            max_grad_norm: self.train.max_grad_norm,
            seed: self.data.seed,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();

    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("lifl-trainer: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    ensure!(args.trainers > 0, "--trainers must be at least 1");
    ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let spec = args.spec()?;
    let data = FederatedDataset::generate(&spec).context("generate the dataset")?;

    let client = TrainerClient::connect(&args.control_plane, args.token.clone())
        .await
        .context("connect to the control plane")?;
    let job = read_job(&client, args.job).await?;
    check_job(&job, &spec, args.trainers)?;

    let mut sim = Simulation {
        client,
        job_id: args.job,
        ids: (0..args.trainers)
            .map(|i| format!("{}-{i}", args.id_prefix))
            .collect(),
        pushed: vec![0; args.trainers],
        data: Arc::new(data),
        train: args.train_config(),
        permits: Arc::new(Semaphore::new(args.concurrency)),
    };
    info!(job = args.job, trainers = args.trainers, "training");

    let mut accuracies = Vec::new();
    loop {
        if args.rounds.is_some_and(|k| accuracies.len() >= k as usize) {
            break;
        }
        let report = sim.run_round().await?;
        println!(
            "{}",
            json!({
                "event": "round",
                "round": report.round,
                "accuracy": report.accuracy,
                "loss": report.loss,
                "trainers": report.trainers,
                "seconds": report.seconds,
            })
        );
        accuracies.push(report.accuracy);
        if report.job_state == JobState::Completed {
            break;
        }
    }

    println!(
        "{}",
        json!({
            "event": "done",
            "rounds": accuracies.len(),
            "first_accuracy": accuracies.first(),
            "final_accuracy": accuracies.last(),
        })
    );
    Ok(())
}

/// Reads the job, saying what to do when the token is not allowed to.
async fn read_job(client: &TrainerClient, job_id: u32) -> anyhow::Result<Job> {
    match client.job(job_id).await {
        Ok(job) => Ok(job),
        Err(err @ TrainerError::Rejected { .. })
            if matches!(
                err.code(),
                Some(Code::PermissionDenied | Code::Unauthenticated)
            ) =>
        {
            Err(err).context(format!(
                "read job {job_id}: pass the job's trainer token \
                 (--token or LIFL_TRAINER_TOKEN)"
            ))
        }
        Err(err) => Err(err).context(format!("read job {job_id}")),
    }
}

/// Refuses a job this simulation cannot train: one that ended, or whose
/// model is not the dataset's softmax regression.
fn check_job(job: &Job, spec: &SyntheticSpec, trainers: usize) -> anyhow::Result<()> {
    let state = job.state();
    if matches!(
        state,
        JobState::Completed | JobState::Failed | JobState::Cancelled
    ) {
        return Err(ended(job)).context("nothing to train");
    }

    let job_spec = job.spec.as_ref().context("the job has no spec")?;
    let layout = job_spec
        .model
        .as_ref()
        .context("the job has no model layout")?;
    let found = layout_f32_values(layout).with_context(|| format!("job {}", job.id))?;
    let shape = spec.shape();
    let expected = shape.params() as u64;
    ensure!(
        found == expected,
        "job {} has {found} f32 parameters, but softmax regression over {} classes and {} \
         features has {expected} ({}x{} weights then {} biases): set --classes and --features \
         to match the job",
        job.id,
        shape.classes,
        shape.features,
        shape.classes,
        shape.features,
        shape.classes,
    );

    if job_spec.trainers_per_round as usize != trainers {
        warn!(
            trainers,
            trainers_per_round = job_spec.trainers_per_round,
            "trainer count differs from the job's trainers per round"
        );
    }
    Ok(())
}

/// A job that ended, as an error that says how.
fn ended(job: &Job) -> TrainerError {
    TrainerError::JobEnded {
        job_id: job.id,
        state: job.state(),
        model_version: job.model_version,
        failure: job.failure.clone(),
    }
}

/// The simulated trainers of one job and their data.
struct Simulation {
    client: TrainerClient,
    job_id: u32,
    /// Trainer ids, by shard index.
    ids: Vec<String>,
    /// Last round each trainer pushed an update for, by shard index.
    pushed: Vec<u32>,
    data: Arc<FederatedDataset>,
    train: TrainConfig,
    /// Bounds the trainers working at once.
    permits: Arc<Semaphore>,
}

/// What one round came to.
struct RoundReport {
    round: u32,
    accuracy: f64,
    loss: f64,
    /// Updates this process pushed for the round.
    trainers: usize,
    seconds: f64,
    job_state: JobState,
}

/// What one trainer did in a round.
enum Turn {
    /// Trained and pushed an update for this assignment.
    Pushed(usize, TrainerAssignment),
    /// Had already pushed for the round it was dealt.
    AlreadyPushed(TrainerAssignment),
    /// The round was full.
    SatOut,
}

impl Simulation {
    /// Runs every trainer once, waits for the round to finish, and scores
    /// the new global model.
    async fn run_round(&mut self) -> anyhow::Result<RoundReport> {
        let started = Instant::now();
        let turns = match self.run_trainers().await {
            Ok(turns) => turns,
            Err(err) => return Err(self.explain(err).await),
        };

        // Trainers should all be dealt the same round; one that joined just
        // after a round closed lands in the next, and is waited for too.
        let dealt = turns.iter().filter_map(|turn| match turn {
            Turn::Pushed(_, a) | Turn::AlreadyPushed(a) => Some(a),
            Turn::SatOut => None,
        });
        let Some(last) = dealt.max_by_key(|a| a.round).cloned() else {
            bail!("every trainer was refused: each round of the job is full");
        };
        let round = last.round;
        let mut trainers = 0;
        for turn in &turns {
            if let Turn::Pushed(index, a) = turn {
                self.pushed[*index] = a.round;
                trainers += usize::from(a.round == round);
            }
        }
        let sat_out = turns.iter().filter(|t| matches!(t, Turn::SatOut)).count();
        if sat_out > 0 {
            warn!(round, sat_out, "trainers sat out a full round");
        }

        let (job, model) = self.finish_round(&last).await?;
        let params = model.params;
        let data = Arc::clone(&self.data);
        let (accuracy, loss) = tokio::task::spawn_blocking(move || {
            Ok::<_, anyhow::Error>((accuracy(&params, &data.test)?, loss(&params, &data.test)?))
        })
        .await
        .context("score the global model")??;

        let seconds = started.elapsed().as_secs_f64();
        info!(round, accuracy, loss, trainers, seconds, "round finished");
        Ok(RoundReport {
            round,
            accuracy,
            loss,
            trainers,
            seconds,
            job_state: job.state(),
        })
    }

    /// Adds why to a trainer's failure when the job itself failed or was
    /// cancelled, which is then the cause worth reporting.
    async fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        let Ok(job) = self.client.job(self.job_id).await else {
            return err;
        };
        match job.state() {
            JobState::Failed | JobState::Cancelled => err.context(ended(&job).to_string()),
            _ => err,
        }
    }

    /// Runs one turn of every trainer, at most `permits` at a time; the
    /// first failure stops the rest.
    async fn run_trainers(&self) -> anyhow::Result<Vec<Turn>> {
        let mut tasks = JoinSet::new();
        for (index, id) in self.ids.iter().enumerate() {
            let trainer = TrainerTurn {
                client: self.client.clone(),
                job_id: self.job_id,
                id: id.clone(),
                index,
                last_pushed: self.pushed[index],
                data: Arc::clone(&self.data),
                train: self.train.clone(),
            };
            let permits = Arc::clone(&self.permits);
            tasks.spawn(async move {
                // The semaphore is never closed.
                let _permit = permits.acquire_owned().await?;
                trainer.run().await
            });
        }

        let mut turns = Vec::with_capacity(self.ids.len());
        while let Some(joined) = tasks.join_next().await {
            // Returning early drops `tasks`, which aborts the others.
            turns.push(joined.context("a trainer task panicked")??);
        }
        Ok(turns)
    }

    /// Waits for the job to finish `assignment`'s round, and fetches the
    /// model it produced from that assignment's gateway meanwhile: the
    /// gateway may refuse downloads once the job has ended.
    async fn finish_round(
        &self,
        assignment: &TrainerAssignment,
    ) -> anyhow::Result<(Job, lifl_sdk::trainer::GlobalModel)> {
        let round = assignment.round;
        let limit = time_until(assignment.deadline_unix_ms) + ROUND_GRACE;
        let gateway = self.client.gateway(&assignment.gateway_address)?;
        let waited = self.client.wait_for_version(self.job_id, round, limit);
        let fetched = gateway.fetch_model(self.job_id, round, limit);
        let (job, model) = tokio::try_join!(waited, fetched)
            .with_context(|| format!("finish round {round} of job {}", self.job_id))?;
        Ok((job, model))
    }
}

/// One trainer's part in one round.
struct TrainerTurn {
    client: TrainerClient,
    job_id: u32,
    id: String,
    /// Shard index.
    index: usize,
    /// Last round this trainer pushed for.
    last_pushed: u32,
    data: Arc<FederatedDataset>,
    train: TrainConfig,
}

impl TrainerTurn {
    async fn run(self) -> anyhow::Result<Turn> {
        let assignment = match self.client.join(self.job_id, &self.id).await {
            Ok(assignment) => assignment,
            Err(err) if err.code() == Some(Code::ResourceExhausted) => return Ok(Turn::SatOut),
            Err(err) => return Err(err).context(format!("{}: join a round", self.id)),
        };
        if assignment.round <= self.last_pushed {
            return Ok(Turn::AlreadyPushed(assignment));
        }

        let gateway = self.client.gateway(&assignment.gateway_address)?;
        let wait = time_until(assignment.deadline_unix_ms);
        let global = gateway
            .fetch_model(self.job_id, assignment.model_version, wait)
            .await
            .with_context(|| {
                format!(
                    "{}: fetch model version {} from {}",
                    self.id,
                    assignment.model_version,
                    gateway.address()
                )
            })?;

        let (update, samples) = self.train(global.params, assignment.round).await?;
        push_with_retry(&gateway, &assignment, &self.id, samples, &update)
            .await
            .with_context(|| {
                format!(
                    "{}: push the update for round {} to {}",
                    self.id,
                    assignment.round,
                    gateway.address()
                )
            })?;
        Ok(Turn::Pushed(self.index, assignment))
    }

    /// Trains on this trainer's shard off the async threads, with a shuffle
    /// seed distinct per trainer and round.
    async fn train(&self, global: Vec<f32>, round: u32) -> anyhow::Result<(Vec<f32>, u64)> {
        let config = TrainConfig {
            seed: self.train.seed ^ (u64::from(round) << 32) ^ self.index as u64,
            ..self.train.clone()
        };
        let data = Arc::clone(&self.data);
        let index = self.index;
        let trained =
            tokio::task::spawn_blocking(move || train_local(&global, &data.shards[index], &config))
                .await
                .context("training task panicked")?;
        trained.with_context(|| format!("{}: train on shard {index}", self.id))
    }
}

/// Pushes an update, retrying while the gateway has no room for it (or
/// cannot be reached) and the round's deadline has not passed.
async fn push_with_retry(
    gateway: &Gateway,
    assignment: &TrainerAssignment,
    trainer_id: &str,
    samples: u64,
    update: &[f32],
) -> Result<(), TrainerError> {
    let mut pause = PUSH_RETRY_START;
    let mut retried = false;
    loop {
        let err = match gateway
            .push_update(assignment, trainer_id, samples, update)
            .await
        {
            Ok(_) => return Ok(()),
            Err(err) => err,
        };
        // An attempt that failed on the way back may have been taken: a
        // retry told the update is in has nothing left to do.
        if retried && err.code() == Some(Code::AlreadyExists) {
            return Ok(());
        }
        let transient = matches!(
            err.code(),
            Some(Code::ResourceExhausted | Code::Unavailable | Code::Aborted)
        );
        if !transient || time_until(assignment.deadline_unix_ms) <= pause {
            return Err(err);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PUSH_RETRY_MAX);
        retried = true;
    }
}

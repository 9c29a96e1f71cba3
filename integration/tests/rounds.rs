//! End-to-end federated rounds over the whole platform: a control plane, a
//! sidecar serving as its node (trainer gateway, the aggregators it launches
//! for each round and, as root, the SK_MSG program), and trainers that join,
//! push and fetch through the SDK's trainer client or the `lifl-trainer`
//! simulation. Published models are checked against the weighted average
//! computed here from the same updates; refusals against the status code and
//! message `gateway.proto` documents.

// Scenario helpers are test code too: a failed step should fail loudly.
#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use lifl_integration::{
    le_bytes, relative_error, run_trainers, update_samples, update_values, weighted_average,
    ControlPlaneProcess, Mode, SidecarProcess,
};
use lifl_proto::control::JobStats;
use lifl_proto::v1::{PushUpdateRequest, RoundRecord};
use lifl_sdk::trainer::{
    Gateway, GlobalModel, JobState, PushUpdateResponse, TrainerAssignment, TrainerClient,
    TrainerError,
};
use lifl_sdk::SidecarStats;
use serde_json::{json, Value};

/// f32 values in the test jobs' model.
const PARAMS: usize = 1000;
/// Trainers in a round of the numerical scenarios.
const TRAINERS: u64 = 12;
/// Generous: a debug build on two shared cores, beside other tests. Only a
/// failing test waits this long; nothing here waits for a round deadline.
const PATIENCE: Duration = Duration::from_secs(30);
/// Round deadline of the test jobs; rounds finish as soon as every
/// admitted trainer pushed, long before it.
const ROUND_DEADLINE_MS: u64 = 30_000;

/// A control plane and one sidecar serving as its node, with a runtime for
/// the SDK's async trainer client. The harness's own calls (stats, liflctl)
/// block, so they are made outside [`Platform::run`].
struct Platform {
    /// Drives every trainer client; dropped first, before the processes.
    runtime: tokio::runtime::Runtime,
    sidecar: SidecarProcess,
    control_plane: ControlPlaneProcess,
}

/// A job and a trainer's connection to the control plane, with its token.
struct JobTrainers {
    id: u32,
    client: TrainerClient,
}

impl Platform {
    /// The platform on the data path of `mode`, or `None` where that path
    /// cannot run (and need not: see [`Mode::available`]). Arenas are small:
    /// an ended job's arena lingers on the node, and many tests run side by
    /// side.
    fn start(mode: Mode) -> Option<Self> {
        Self::start_with(mode, "16MiB", &[])
    }

    /// The same with arenas of `arena_bytes` per job, and the sidecar given
    /// `sidecar_args` too.
    fn start_with(mode: Mode, arena_bytes: &str, sidecar_args: &[&str]) -> Option<Self> {
        if !mode.available() {
            return None;
        }
        let control_plane = ControlPlaneProcess::start().unwrap();
        let sidecar = sidecar_args
            .iter()
            .fold(SidecarProcess::builder(mode), |builder, arg| {
                builder.arg(arg)
            })
            .arena_bytes(arena_bytes)
            .node(&control_plane)
            .start()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        Some(Self {
            runtime,
            sidecar,
            control_plane,
        })
    }

    fn run<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Creates a job with `liflctl` and connects a trainer client with its
    /// token.
    fn create_job(&self, spec: &Value) -> JobTrainers {
        let created = self.control_plane.create_job(spec).unwrap();
        let client = self
            .run(TrainerClient::connect(
                &self.control_plane.url(),
                Some(created.trainer_token),
            ))
            .unwrap();
        JobTrainers {
            id: created.id,
            client,
        }
    }

    /// Path of the checkpoint the top of `round` wrote.
    fn checkpoint(&self, job: u32, round: u32) -> PathBuf {
        self.sidecar
            .checkpoint_dir()
            .unwrap()
            .join(format!("job-{job}-round-{round}.f32"))
    }
}

fn arena_of(stats: &SidecarStats, job: u32) -> Option<JobStats> {
    stats.jobs.iter().find(|j| j.job == job).cloned()
}

/// A job of `trainers` trainers a round with a `PARAMS`-value model.
fn job_spec(name: &str, levels: u32, mode: &str, rounds: u32, trainers: u64) -> Value {
    json!({
        "name": name,
        "model": {"tensors": [{"name": "w", "shape": [PARAMS], "dtype": "f32"}]},
        "rounds": rounds,
        "trainers_per_round": trainers,
        "min_trainers": trainers,
        "round_deadline_ms": ROUND_DEADLINE_MS,
        "aggregation": {"rule": "fedavg", "mode": mode},
        "hierarchy": {"levels": levels, "max_fan_in": 4},
    })
}

fn trainer_id(k: u64) -> String {
    format!("trainer-{k}")
}

/// The update trainer `k` pushes, with its sample count.
fn update_of(k: u64) -> (Vec<f32>, u64) {
    (update_values(k, PARAMS), update_samples(k))
}

async fn join_all(job: &JobTrainers, count: u64) -> Vec<TrainerAssignment> {
    let mut seats = Vec::new();
    for k in 0..count {
        seats.push(job.client.join(job.id, &trainer_id(k)).await.unwrap());
    }
    seats
}

/// The status code's name and the message of a refused push.
fn refusal(pushed: Result<PushUpdateResponse, TrainerError>) -> (String, String) {
    let err = pushed.expect_err("the gateway should refuse this push");
    let code = err.code().map(|c| format!("{c:?}"));
    let message = err.status().map(|s| s.message().to_owned());
    match (code, message) {
        (Some(code), Some(message)) => (code, message),
        _ => panic!("refused without a gRPC status: {err}"),
    }
}

/// SHA-256 of a file, hex, by `sha256sum`: independent of the code under test.
fn sha256sum(path: &Path) -> String {
    let output = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(output.status.success(), "sha256sum {}", path.display());
    let text = String::from_utf8(output.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_owned()
}

/// What one round came to: the model the gateway serves, and the control
/// plane's record of the round.
struct Published {
    model: GlobalModel,
    record: RoundRecord,
}

/// Joins `TRAINERS` trainers to the job's first round, pushes each one's
/// update through the gateway it was dealt, and fetches the model the round
/// produced. The jobs of these scenarios have a second round that never
/// starts, so the fetch does not race the end of the job (which
/// [`the_last_rounds_model_is_served_after_the_job_completes`] is about).
fn push_a_round(platform: &Platform, job: &JobTrainers) -> Published {
    platform.run(async {
        let seats = join_all(job, TRAINERS).await;
        for (k, seat) in (0..TRAINERS).zip(&seats) {
            assert_eq!(seat.round, 1);
            let (values, samples) = update_of(k);
            let gateway = job.client.gateway(&seat.gateway_address).unwrap();
            let accepted = gateway
                .push_update(seat, &trainer_id(k), samples, &values)
                .await
                .unwrap();
            assert_eq!(accepted.bytes, 4 * PARAMS as u64);
            assert_eq!(accepted.leaf_endpoint_id, seat.leaf_endpoint_id);
        }
        fetch_round(job, &seats[0], 1).await
    })
}

/// The model of `round` from the gateway `seat` names, once the control
/// plane also recorded the round.
async fn fetch_round(job: &JobTrainers, seat: &TrainerAssignment, round: u32) -> Published {
    let gateway = job.client.gateway(&seat.gateway_address).unwrap();
    let model = gateway.fetch_model(job.id, round, PATIENCE).await.unwrap();
    assert_eq!(model.version, round);
    let recorded = job
        .client
        .wait_for_version(job.id, round, PATIENCE)
        .await
        .unwrap();
    let record = recorded
        .rounds
        .iter()
        .find(|r| r.round == round)
        .cloned()
        .unwrap();
    Published { model, record }
}

/// The flat weighted average of trainers `0..count`'s updates.
fn flat_average(count: u64) -> Vec<f64> {
    weighted_average(&(0..count).map(update_of).collect::<Vec<_>>())
}

/// The scenarios' sample counts are uneven enough that the bound the
/// rounds are held to tells the weighted average from the plain mean.
#[test]
fn the_weighted_average_is_far_from_the_plain_mean() {
    let plain = weighted_average(
        &(0..TRAINERS)
            .map(|k| (update_values(k, PARAMS), 1))
            .collect::<Vec<_>>(),
    );
    let plain: Vec<f32> = plain.iter().map(|&v| v as f32).collect();
    let error = relative_error(&plain, &flat_average(TRAINERS));
    assert!(error > 1e-3, "only {error:e} apart");
}

/// Checks a published round against the flat average of what was pushed,
/// the control plane's record and the checkpoint on disk.
fn assert_round_is_exact(platform: &Platform, job: u32, published: &Published, updates: u64) {
    let (model, record) = (&published.model, &published.record);
    let error = relative_error(&model.params, &flat_average(updates));
    assert!(
        error < 1e-6,
        "the model is {error:e} from the flat weighted average"
    );

    assert!(record.finished, "{record:?}");
    assert_eq!(u64::from(record.updates_aggregated), updates, "{record:?}");
    // The checkpoint holds exactly the bytes the gateway served, and the
    // control plane recorded their SHA-256.
    let checkpoint = platform.checkpoint(job, record.round);
    let served = le_bytes(&model.params);
    assert!(
        std::fs::read(&checkpoint).unwrap() == served,
        "{} differs from the served model",
        checkpoint.display()
    );
    assert_eq!(record.model_checksum, sha256sum(&checkpoint));
    assert_eq!(record.model_checksum, model.sha256);
    let beside = checkpoint.with_extension("f32.sha256");
    let written = std::fs::read_to_string(&beside).unwrap();
    assert!(
        written.starts_with(&record.model_checksum),
        "{}: {written}",
        beside.display()
    );
}

fn round_publishes_the_flat_weighted_average(mode: Mode, levels: u32) {
    let Some(platform) = Platform::start(mode) else {
        return;
    };
    let job = platform.create_job(&job_spec("flat-average", levels, "eager", 2, TRAINERS));

    let published = push_a_round(&platform, &job);

    assert_round_is_exact(&platform, job.id, &published, TRAINERS);
    let topology = platform
        .control_plane
        .liflctl(&["topology", &job.id.to_string()])
        .unwrap();
    assert_eq!(topology["levels"], levels, "{topology}");
}

#[test]
fn two_level_round_publishes_the_flat_weighted_average_on_the_kernel_path() {
    round_publishes_the_flat_weighted_average(Mode::Kernel, 2);
}

#[test]
fn two_level_round_publishes_the_flat_weighted_average_on_the_userspace_path() {
    round_publishes_the_flat_weighted_average(Mode::Userspace, 2);
}

#[test]
fn three_level_round_publishes_the_flat_weighted_average_on_the_kernel_path() {
    round_publishes_the_flat_weighted_average(Mode::Kernel, 3);
}

#[test]
fn three_level_round_publishes_the_flat_weighted_average_on_the_userspace_path() {
    round_publishes_the_flat_weighted_average(Mode::Userspace, 3);
}

/// Two jobs side by side on one node, one folding eagerly and one lazily,
/// given the same pushes.
#[test]
fn eager_and_lazy_jobs_publish_the_same_model() {
    let platform = Platform::start(Mode::preferred()).unwrap();
    let eager = platform.create_job(&job_spec("eager", 3, "eager", 2, TRAINERS));
    let lazy = platform.create_job(&job_spec("lazy", 3, "lazy", 2, TRAINERS));

    let eager_round = push_a_round(&platform, &eager);
    let lazy_round = push_a_round(&platform, &lazy);

    let reference: Vec<f64> = eager_round
        .model
        .params
        .iter()
        .map(|&v| f64::from(v))
        .collect();
    let error = relative_error(&lazy_round.model.params, &reference);
    assert!(error < 1e-6, "eager and lazy differ by {error:e}");
    assert_round_is_exact(&platform, eager.id, &eager_round, TRAINERS);
    assert_round_is_exact(&platform, lazy.id, &lazy_round, TRAINERS);
}

/// Buffers, references and bytes of a job's arena.
fn arena_use(arena: &JobStats) -> (u64, u64, u64) {
    (arena.buffers, arena.refs, arena.used_bytes)
}

/// Live references the job's gateway endpoint holds.
fn gateway_credit(stats: &SidecarStats, job: u32) -> u64 {
    stats
        .endpoints
        .iter()
        .find(|e| e.job == job && e.role == "gateway")
        .map(|e| e.credit_used)
        .unwrap()
}

/// Starts `trainer`'s push through a raw gRPC client: the header and one
/// value, then nothing more until the returned sender is dropped, which
/// ends the upload unfinished. The task yields the gateway's answer.
fn start_unfinished_push(
    platform: &Platform,
    seat: &TrainerAssignment,
    trainer: &str,
) -> (
    tokio::task::JoinHandle<Result<tonic::Response<PushUpdateResponse>, tonic::Status>>,
    tokio::sync::mpsc::Sender<PushUpdateRequest>,
) {
    use lifl_proto::v1::gateway_service_client::GatewayServiceClient;
    use lifl_proto::v1::{push_update_request::Part, UpdateHeader};

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let header = UpdateHeader {
        job_id: seat.job_id,
        round: seat.round,
        trainer_id: trainer.to_owned(),
        samples: 10,
    };
    for part in [Part::Header(header), Part::Chunk(le_bytes(&[0.5]))] {
        let message = PushUpdateRequest { part: Some(part) };
        tx.try_send(message).unwrap();
    }
    let address = format!("http://{}", seat.gateway_address);
    let call = platform.runtime.spawn(async move {
        let mut gateway = GatewayServiceClient::connect(address).await.unwrap();
        gateway
            .push_update(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    (call, tx)
}

fn refused_pushes_get_their_status_and_leave_nothing_behind(mode: Mode) {
    let Some(platform) = Platform::start(mode) else {
        return;
    };
    const ADMITTED: u64 = 6;
    let job = platform.create_job(&job_spec("refusals", 2, "eager", 2, ADMITTED));
    let seats = platform.run(join_all(&job, ADMITTED));
    let gateway: Gateway = platform
        .run(async { job.client.gateway(&seats[0].gateway_address) })
        .unwrap();
    let push = |k: usize, trainer: &str, samples: u64, values: &[f32]| {
        platform.run(gateway.push_update(&seats[k], trainer, samples, values))
    };

    // Before any push the job's arena holds the initial model (all zeros)
    // and nothing else.
    let initial = platform
        .run(gateway.fetch_model(job.id, 0, PATIENCE))
        .unwrap();
    assert_eq!(initial.version, 0);
    assert!(initial.params.iter().all(|&v| v == 0.0));
    let stats = platform.sidecar.stats().unwrap();
    let baseline = arena_use(&arena_of(&stats, job.id).unwrap());
    assert_eq!(baseline.0, 1, "the initial model is the only buffer");
    let baseline_credit = gateway_credit(&stats, job.id);

    // (a) wrong length, short and long.
    let (values, samples) = update_of(0);
    let (code, message) = refusal(push(0, "trainer-0", samples, &values[..PARAMS - 1]));
    assert_eq!(code, "InvalidArgument", "{message}");
    assert_eq!(
        message,
        format!(
            "the update has {} values; the model has {PARAMS}",
            PARAMS - 1
        )
    );
    let long: Vec<f32> = values.iter().copied().chain([0.5]).collect();
    let (code, message) = refusal(push(0, "trainer-0", samples, &long));
    assert_eq!(code, "InvalidArgument", "{message}");
    assert_eq!(
        message,
        format!("the update is longer than the model's {PARAMS} values")
    );

    // (b) a value that is not a number, and samples out of range.
    let (mut poisoned, samples) = update_of(1);
    poisoned[7] = f32::NAN;
    let (code, message) = refusal(push(1, "trainer-1", samples, &poisoned));
    assert_eq!(code, "InvalidArgument", "{message}");
    assert!(
        message.starts_with("value 7 of the update is NaN"),
        "{message}"
    );
    let (code, message) = refusal(push(1, "trainer-1", 0, &update_of(1).0));
    assert_eq!(code, "InvalidArgument", "{message}");
    assert_eq!(message, "samples is 0; must be 1 to 4294967295");
    // A weight past 2^32 would let one trainer overflow its leaf's total.
    let (code, message) = refusal(push(1, "trainer-1", 1 << 32, &update_of(1).0));
    assert_eq!(code, "InvalidArgument", "{message}");
    assert_eq!(message, "samples is 4294967296; must be 1 to 4294967295");

    // (c) a trainer that never joined, using another's assignment.
    let (code, message) = refusal(push(2, "ghost", 50, &update_of(2).0));
    assert_eq!(code, "NotFound", "{message}");
    assert_eq!(
        message,
        "trainer ghost was not admitted to round 1 with a leaf on this node"
    );

    // (d) while trainer-3's push is under way, a second one is told to
    // retry; once the first ends unfinished, nothing of it is left.
    let (first_push, unfinished) = start_unfinished_push(&platform, &seats[3], "trainer-3");
    // The gateway takes the update's buffer with its first chunk.
    let one_more = |s: &SidecarStats| {
        arena_of(s, job.id).is_some_and(|a| {
            let (buffers, refs, bytes) = arena_use(&a);
            (buffers, refs) == (baseline.0 + 1, baseline.1 + 1) && bytes > baseline.2
        })
    };
    let pushing = platform.sidecar.wait_for_stats(PATIENCE, one_more).unwrap();
    assert!(one_more(&pushing), "{:?}", arena_of(&pushing, job.id));
    let (code, message) = refusal(push(3, "trainer-3", 50, &update_of(3).0));
    assert_eq!(code, "Aborted", "{message}");
    assert_eq!(
        message,
        "trainer trainer-3 is already pushing its update for round 1; retry once that upload ends"
    );
    drop(unfinished);
    let status = platform.run(first_push).unwrap().unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert_eq!(
        status.message(),
        format!("the update has 1 values; the model has {PARAMS}")
    );

    // Nothing the refused pushes wrote stays in the arena.
    let after = platform
        .sidecar
        .wait_for_stats(PATIENCE, |s| {
            arena_of(s, job.id).map(|a| arena_use(&a)) == Some(baseline)
        })
        .unwrap();
    assert_eq!(
        arena_use(&arena_of(&after, job.id).unwrap()),
        baseline,
        "buffers, refs, bytes"
    );
    assert_eq!(gateway_credit(&after, job.id), baseline_credit);

    // Every admitted trainer pushes once (the refused ones too, now with
    // their real update); (e) a second push of trainer-2 is a duplicate.
    for k in 0..ADMITTED - 1 {
        let (values, samples) = update_of(k);
        push(k as usize, &trainer_id(k), samples, &values).unwrap();
    }
    let (code, message) = refusal(push(2, "trainer-2", 70, &update_values(1002, PARAMS)));
    assert_eq!(code, "AlreadyExists", "{message}");
    assert_eq!(
        message,
        "trainer trainer-2 already pushed its update for round 1"
    );
    let last = ADMITTED - 1;
    let (values, samples) = update_of(last);
    push(last as usize, &trainer_id(last), samples, &values).unwrap();

    // Only the accepted updates are in the model and in the count.
    let published = platform.run(fetch_round(&job, &seats[0], 1));
    assert_round_is_exact(&platform, job.id, &published, ADMITTED);

    // (f) round 2 is open (trainer-0 joined and pushed for it); a push for
    // round 1 is stale.
    let (second, stale) = platform.run(async {
        let second = job.client.join(job.id, "trainer-0").await.unwrap();
        let late = job.client.join(job.id, "trainer-1").await.unwrap();
        (second, late)
    });
    assert_eq!((second.round, stale.round), (2, 2));
    let (values, samples) = (update_values(200, PARAMS), 40);
    platform
        .run(gateway.push_update(&second, "trainer-0", samples, &values))
        .unwrap();
    let stale = TrainerAssignment { round: 1, ..stale };
    let (code, message) =
        refusal(platform.run(gateway.push_update(&stale, "trainer-1", samples, &update_of(1).0)));
    assert_eq!(code, "FailedPrecondition", "{message}");
    assert_eq!(message, "round 1 is stale: the job is in round 2");

    // The arena is back to one model's buffer: round 1's model replaced the
    // initial one, and round 2's one update was folded and let go.
    let after = platform
        .sidecar
        .wait_for_stats(PATIENCE, |s| {
            arena_of(s, job.id).map(|a| arena_use(&a)) == Some(baseline)
        })
        .unwrap();
    assert_eq!(arena_use(&arena_of(&after, job.id).unwrap()), baseline);

    // Cancelling the job stops round 2's aggregators.
    let job_arg = job.id.to_string();
    let cancelled = platform
        .control_plane
        .liflctl(&["job", "cancel", &job_arg])
        .unwrap();
    assert_eq!(cancelled["state"], "cancelled", "{cancelled}");
    let only_gateway = |s: &SidecarStats| {
        s.endpoints
            .iter()
            .all(|e| e.job != job.id || e.role == "gateway")
    };
    let idle = platform
        .sidecar
        .wait_for_stats(PATIENCE, only_gateway)
        .unwrap();
    assert!(only_gateway(&idle), "{:#?}", idle.endpoints);
}

#[test]
fn refused_pushes_get_their_status_and_leave_nothing_behind_on_the_kernel_path() {
    refused_pushes_get_their_status_and_leave_nothing_behind(Mode::Kernel);
}

#[test]
fn refused_pushes_get_their_status_and_leave_nothing_behind_on_the_userspace_path() {
    refused_pushes_get_their_status_and_leave_nothing_behind(Mode::Userspace);
}

/// Every descriptor of a three-level round (gateway to leaves, leaves to
/// middles, middles to the top, top back to the gateway) is redirected by
/// the kernel; none falls through to the sidecar.
#[test]
fn every_hop_of_a_three_level_round_goes_through_the_kernel() {
    let Some(platform) = Platform::start(Mode::Kernel) else {
        return;
    };
    let job = platform.create_job(&job_spec("kernel-hops", 3, "eager", 2, TRAINERS));

    push_a_round(&platform, &job);

    let topology = platform
        .control_plane
        .liflctl(&["topology", &job.id.to_string()])
        .unwrap();
    let aggregators = topology["aggregators"].as_array().unwrap().len() as u64;
    assert_eq!(topology["levels"], 3, "{topology}");
    // One hop per push, one per aggregator's result (the top's goes to the
    // gateway).
    let hops = TRAINERS + aggregators;
    let stats = platform.sidecar.stats().unwrap();
    let arena = arena_of(&stats, job.id).unwrap();
    assert_eq!(arena.kernel_routed, hops, "{topology}\n{stats:#?}");
    assert_eq!(arena.kernel_passed, 0, "{stats:#?}");
    assert_eq!(stats.routed_by_sidecar, 0, "{stats:#?}");
    assert!(stats.refused.is_empty(), "{:?}", stats.refused);
}

/// A job's last model stays fetchable once the job completed: for a
/// trainer already waiting for it, and for one that asks afterwards (what
/// `lifl-trainer` does at the end of its last round). A model of a few MiB
/// takes the gateway a while to take in (it hashes it), which is when the
/// node hears that the job ended.
#[test]
fn the_last_rounds_model_is_served_after_the_job_completes() {
    let platform = Platform::start_with(Mode::preferred(), "64MiB", &[]).unwrap();
    const COUNT: u64 = 2;
    const BIG: usize = 1 << 20;
    let mut spec = job_spec("last-model", 2, "eager", 1, COUNT);
    spec["model"]["tensors"][0]["shape"] = json!([BIG]);
    let job = platform.create_job(&spec);
    let updates: Vec<(Vec<f32>, u64)> = (0..COUNT)
        .map(|k| (update_values(k, BIG), update_samples(k)))
        .collect();

    let (waited, after) = platform.run(async {
        let seats = join_all(&job, COUNT).await;
        let gateway = job.client.gateway(&seats[0].gateway_address).unwrap();
        let pushes = async {
            for ((k, seat), (values, samples)) in (0..COUNT).zip(&seats).zip(&updates) {
                let trainer = trainer_id(k);
                let pushed = gateway.push_update(seat, &trainer, *samples, values);
                pushed.await.unwrap();
            }
        };
        let (waited, ()) = tokio::join!(gateway.fetch_model(job.id, 1, PATIENCE), pushes);
        let completed = job.client.wait_for_version(job.id, 1, PATIENCE).await;
        assert_eq!(completed.unwrap().state(), JobState::Completed);
        (waited, gateway.fetch_model(job.id, 1, PATIENCE).await)
    });

    let waited = waited.unwrap_or_else(|e| panic!("a trainer waiting for the model: {e}"));
    let after = after.unwrap_or_else(|e| panic!("a trainer asking after the end: {e}"));
    assert_eq!((waited.version, after.version), (1, 1));
    assert!(waited == after, "both are the same model");
    let error = relative_error(&after.params, &weighted_average(&updates));
    assert!(error < 1e-6, "{error:e} from the average");
}

/// Updates are taken until the round's deadline, the one trainers are
/// told; a late push is refused and the round closes with what arrived in
/// time.
#[test]
fn a_push_after_the_rounds_deadline_is_refused_and_the_round_closes_without_it() {
    let platform = Platform::start(Mode::preferred()).unwrap();
    // A second round that never starts keeps the job from ending, which
    // would refuse the late push for that reason instead.
    let mut spec = job_spec("deadline", 1, "eager", 2, 2);
    spec["min_trainers"] = json!(1);
    spec["round_deadline_ms"] = json!(2_000);
    let job = platform.create_job(&spec);

    let (late, published) = platform.run(async {
        let seats = join_all(&job, 2).await;
        let gateway = job.client.gateway(&seats[0].gateway_address).unwrap();
        let (values, samples) = update_of(0);
        gateway
            .push_update(&seats[0], &trainer_id(0), samples, &values)
            .await
            .unwrap();
        let past = seats[1].deadline_unix_ms + 100;
        tokio::time::sleep(lifl_sdk::trainer::time_until(past)).await;
        let (values, samples) = update_of(1);
        let late = gateway
            .push_update(&seats[1], &trainer_id(1), samples, &values)
            .await;
        (late, fetch_round(&job, &seats[0], 1).await)
    });

    let (code, message) = refusal(late);
    assert_eq!(code, "FailedPrecondition");
    assert!(message.contains("deadline"), "{message}");
    assert_eq!(published.record.updates_aggregated, 1);
    let error = relative_error(&published.model.params, &flat_average(1));
    assert!(
        error < 1e-6,
        "the model is trainer 0's update alone: {error:e}"
    );
}

/// A reader that stops reading a model download is cut off once the
/// gateway's transfer time is up, and told so, instead of holding the
/// model's arena buffer for as long as it likes.
#[test]
fn a_download_that_stops_being_read_is_cut_off_with_deadline_exceeded() {
    use lifl_proto::v1::gateway_service_client::GatewayServiceClient;
    use lifl_proto::v1::{fetch_model_response::Part, FetchModelRequest};

    let platform =
        Platform::start_with(Mode::preferred(), "64MiB", &["--fetch-transfer-secs", "1"]).unwrap();
    // 16 MiB of model: more than HTTP/2's windows and the gateway's queue
    // hold, so the download cannot finish unread.
    const BIG: u64 = 4 << 20;
    let mut spec = job_spec("stalled-reader", 1, "eager", 1, 1);
    spec["model"] = json!({"tensors": [{"name": "w", "shape": [BIG], "dtype": "f32"}]});
    let job = platform.create_job(&spec);

    let (received, ended) = platform.run(async {
        let seat = job.client.join(job.id, &trainer_id(0)).await.unwrap();
        let address = format!("http://{}", seat.gateway_address);
        let mut gateway = GatewayServiceClient::connect(address).await.unwrap();
        let request = FetchModelRequest {
            job_id: job.id,
            min_version: 0,
            wait_ms: PATIENCE.as_millis() as u64,
        };
        let mut download = gateway.fetch_model(request).await.unwrap().into_inner();
        let header = download.message().await.unwrap().unwrap();
        assert!(matches!(header.part, Some(Part::Header(h)) if h.bytes == 4 * BIG));

        // The reader stalls past the transfer time: this wait is the
        // scenario, not a guess at how long something takes.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut received = 0u64;
        loop {
            match download.message().await {
                Ok(Some(message)) => match message.part {
                    Some(Part::Chunk(chunk)) => received += chunk.len() as u64,
                    other => panic!("unexpected part {other:?}"),
                },
                Ok(None) => return (received, None),
                Err(status) => return (received, Some(status)),
            }
        }
    });

    let status = ended.expect("the download should end with a status, not complete");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert_eq!(
        status.message(),
        "the download took longer than 1s; fetch again"
    );
    assert!(
        received < 4 * BIG,
        "received {received} bytes of {}",
        4 * BIG
    );
}

fn demo_job_trains_to_completion(mode: Mode) {
    let Some(platform) = Platform::start(mode) else {
        return;
    };
    let spec = Path::new(env!("CARGO_MANIFEST_DIR")).join("../demo/job.json");
    let job = platform.control_plane.create_job_from(&spec).unwrap();

    let events = run_trainers(
        mode,
        &platform.control_plane,
        &job,
        &["--trainers", "32"],
        Duration::from_secs(180),
    )
    .unwrap();

    let rounds: Vec<&Value> = events.iter().filter(|e| e["event"] == "round").collect();
    let numbers: Vec<u64> = rounds
        .iter()
        .map(|r| r["round"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, [1, 2, 3, 4, 5], "{events:?}");
    let done = events.iter().find(|e| e["event"] == "done").unwrap();
    let first = done["first_accuracy"].as_f64().unwrap();
    let last = done["final_accuracy"].as_f64().unwrap();
    // The demo goes from about 0.80 to 0.95 (seeded, so every run alike).
    assert!(
        last > first + 0.1 && last > 0.9,
        "training did not help enough: {first} -> {last}"
    );

    let record = platform.control_plane.job(job.id).unwrap();
    assert_eq!(record["state"], "completed", "{record}");
    assert_eq!(record["model_version"], 5, "{record}");
    let rounds = record["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 5, "{record}");
    for (r, round) in (1..).zip(rounds) {
        assert_eq!(round["round"], r, "{round}");
        assert_eq!(round["finished"], true, "{round}");
        assert_eq!(round["updates_aggregated"], 32, "{round}");
        let checkpoint = platform.checkpoint(job.id, r);
        assert_eq!(round["model_checksum"], sha256sum(&checkpoint), "{round}");
    }
}

#[test]
fn demo_job_trains_to_completion_on_the_kernel_path() {
    demo_job_trains_to_completion(Mode::Kernel);
}

#[test]
fn demo_job_trains_to_completion_on_the_userspace_path() {
    demo_job_trains_to_completion(Mode::Userspace);
}

/// The gateway speaks plain gRPC: `grpcurl` with the `.proto` file gets a
/// clear NOT_FOUND for a job the node has no work for.
#[test]
fn grpcurl_fetching_an_unknown_job_gets_not_found() {
    let platform = Platform::start(Mode::Userspace).unwrap();
    let gateway = platform.sidecar.gateway_address().unwrap();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");

    let output = match Command::new("grpcurl")
        .current_dir(&workspace)
        .args(["-plaintext", "-import-path", "proto"])
        .args(["-proto", "lifl/v1/gateway.proto"])
        // A short wait: the gateway may wait that long for the job to open.
        .args(["-d", r#"{"job_id": 999, "wait_ms": 500}"#, gateway])
        .arg("lifl.v1.GatewayService/FetchModel")
        .output()
    {
        Ok(output) => output,
        Err(e) => panic!("grpcurl must be on PATH (`just deps` installs it): {e}"),
    };

    let said = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{said}");
    assert!(said.contains("Code: NotFound"), "{said}");
    assert!(
        said.contains("Message: job 999 has no work on this node"),
        "{said}"
    );
}

//! `lifl-bench-round`: whole federated rounds on one node, as JSON.
//!
//! It starts a control plane and a sidecar serving as its node, then for
//! each model size M and trainer count K runs a job whose K trainers are
//! separate `lifl-bench-pusher` processes on loopback. Per configuration it
//! reports the round time (the control plane's record, first round apart:
//! it includes starting the trainer processes), the update bytes aggregated
//! per second, the peak memory of the sidecar and of the aggregators, and how
//! fast the aggregators folded inside those rounds, beside a memcpy of one
//! core measured in the same run.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use lifl_proto::v1::job_service_client::JobServiceClient;
use lifl_proto::v1::node_service_client::NodeServiceClient;
use lifl_proto::v1::{
    Aggregation, CreateJobRequest, GetJobRequest, Hierarchy, JobSpec, JobState, ListNodesRequest,
    ModelLayout, Tensor,
};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Benchmark whole rounds: K trainer processes, M parameters; prints JSON")]
struct Args {
    /// Where the release binaries are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Model sizes, in f32 parameters (11,689,512 is ResNet-18).
    #[arg(long, value_delimiter = ',', default_value = "1000000,11689512")]
    params: Vec<usize>,
    /// Trainer counts.
    #[arg(long, value_delimiter = ',', default_value = "10,50,100")]
    trainers: Vec<u32>,
    /// Rounds per job; the first is reported apart.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Most children per aggregator.
    #[arg(long, default_value_t = 10)]
    fan_in: u32,
    /// Aggregation modes to run: `eager`, `lazy`.
    #[arg(long, value_delimiter = ',', default_value = "eager,lazy")]
    modes: Vec<String>,
    /// Arena per job on the sidecar, in GiB. Lazy rounds hold every update
    /// of the round in the arena until the fold: 100 trainers of 11.7M
    /// parameters need about 5.3 GiB.
    #[arg(long, default_value_t = 6)]
    arena_gib: u64,
    /// Back the arena with 2 MiB hugepages, reserving them for the run and
    /// giving them back after (needs root); 4 KiB pages fault in at every
    /// first touch of every aggregator process.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    hugepages: bool,
}

/// `vm.nr_hugepages`, restored when dropped.
struct HugepageReservation {
    before: String,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugepageReservation {
    /// Reserves `count` more 2 MiB pages; `None` if the kernel would not
    /// give them all.
    fn reserve(count: u64) -> anyhow::Result<Option<Self>> {
        let before = std::fs::read_to_string(NR_HUGEPAGES)?.trim().to_owned();
        let wanted = before.parse::<u64>()? + count;
        std::fs::write(NR_HUGEPAGES, wanted.to_string())
            .context("reserve hugepages (run as root, or pass --hugepages false)")?;
        let reservation = Self { before };
        let got: u64 = std::fs::read_to_string(NR_HUGEPAGES)?.trim().parse()?;
        Ok((got >= wanted).then_some(reservation))
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, &self.before);
    }
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("lifl-bench-round-")
        .tempdir()?;
    let arena_bytes = args.arena_gib << 30;
    let hugepages = match args.hugepages {
        true => HugepageReservation::reserve(arena_bytes >> 21)?,
        false => None,
    };
    if args.hugepages && hugepages.is_none() {
        eprintln!("the kernel would not reserve enough hugepages; arenas use 4 KiB pages");
    }
    let reports = dir.path().join("aggregators.jsonl");

    let mut control = Command::new(args.bin_dir.join("lifl-control-plane"));
    control
        .args(["--store", ":memory:", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut control = Process(control.spawn().context("start lifl-control-plane")?);
    let mut first = String::new();
    BufReader::new(control.0.stdout.take().context("control-plane stdout")?)
        .read_line(&mut first)?;
    let url = format!("http://{}", first.trim());

    let sidecar_log = std::fs::File::create(dir.path().join("sidecar.log"))?;
    let mut sidecar = Command::new(args.bin_dir.join("lifl-sidecar"));
    sidecar
        .arg("--socket")
        .arg(dir.path().join("sidecar.sock"))
        .args(["--control-plane", &url, "--gateway-listen", "127.0.0.1:0"])
        .args(["--node-id", "bench", "--model-linger-secs", "1"])
        .args(["--arena-bytes", &format!("{}GiB", args.arena_gib)])
        .arg("--checkpoint-dir")
        .arg(dir.path().join("checkpoints"))
        .env("LIFL_AGGREGATOR_REPORT_FILE", &reports)
        .stdout(Stdio::null())
        .stderr(sidecar_log);
    if hugepages.is_none() {
        sidecar.arg("--no-hugepages");
    }
    let socket = dir.path().join("sidecar.sock");
    let sidecar = Process(sidecar.spawn().context("start lifl-sidecar")?);
    let sidecar_pid = sidecar.0.id();

    let channel = tonic::transport::Channel::from_shared(url.clone())?
        .connect()
        .await?;
    let mut nodes = NodeServiceClient::new(channel.clone());
    let mut jobs = JobServiceClient::new(channel);
    let waited = Instant::now();
    loop {
        let listed = nodes.list_nodes(ListNodesRequest {}).await?.into_inner();
        if listed.nodes.iter().any(|n| n.id == "bench" && n.online) {
            break;
        }
        if waited.elapsed() > Duration::from_secs(20) {
            bail!(
                "the sidecar did not register; see its log in {}",
                dir.path().display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dataplane = std::fs::read_to_string(dir.path().join("sidecar.log"))?
        .split_whitespace()
        .find_map(|w| w.strip_prefix("dataplane="))
        .unwrap_or("unknown")
        .to_owned();

    // The fold alone, on this core, beside a memcpy of the same bytes: the
    // rate the aggregators' fold runs at when nothing else wants the core
    // or the memory bus.
    let folds: Vec<(usize, Value)> = args
        .params
        .iter()
        .map(|&params| (params, lifl_integration::measure_fold(params, 16, 3)))
        .collect();
    let mut results = Vec::new();
    for mode in &args.modes {
        for &params in &args.params {
            let memcpy_gbps = folds
                .iter()
                .find(|(p, _)| *p == params)
                .and_then(|(_, f)| f["memcpy_gbps"].as_f64())
                .unwrap_or(f64::NAN);
            for &trainers in &args.trainers {
                let config = RunConfig {
                    params,
                    trainers,
                    mode,
                    url: &url,
                    bin_dir: &args.bin_dir,
                    reports: &reports,
                    sidecar_pid,
                    socket: &socket,
                    args: &args,
                };
                let mut result = run_job(&mut jobs, &config).await?;
                let fold = result["fold_cpu_gbps_in_rounds"].as_f64().unwrap_or(0.0);
                result["memcpy_gbps"] = json!(memcpy_gbps);
                result["fold_cpu_in_rounds_vs_memcpy"] = json!(fold / memcpy_gbps);
                eprintln!("{result}");
                results.push(result);
            }
        }
    }

    // The aim is the fold's own rate with several arrived updates a pass
    // (lazy rounds fold 5 to 8 at a time): 4 a pass, beside memcpy.
    let fold_ok = folds.iter().all(|(_, fold)| {
        fold["fold"].as_array().into_iter().flatten().any(|r| {
            r["updates_per_pass"] == json!(4) && r["vs_memcpy"].as_f64().unwrap_or(0.0) >= 0.8
        })
    });
    let rss_flat = args.modes.iter().all(|mode| {
        args.params.iter().all(|&m| {
            let private: Vec<f64> = results
                .iter()
                .filter(|r| r["params"] == json!(m) && r["mode"] == json!(mode))
                .filter_map(|r| r["aggregator"]["max_private_peak_bytes"].as_f64())
                .collect();
            let (low, high) = private
                .iter()
                .fold((f64::INFINITY, 0.0f64), |(lo, hi), &x| {
                    (lo.min(x), hi.max(x))
                });
            private.is_empty() || high <= low * 1.25
        })
    });
    let report = json!({
        "bench": "round",
        "dataplane": dataplane,
        "modes": args.modes,
        "fan_in": args.fan_in,
        "rounds_per_job": args.rounds,
        "fold_alone": folds
            .iter()
            .map(|(params, fold)| {
                json!({"params": params, "memcpy_gbps": fold["memcpy_gbps"], "fold": fold["fold"]})
            })
            .collect::<Vec<_>>(),
        "results": results,
        "aims": {
            "fold_at_least_0_8x_memcpy": fold_ok,
            "aggregator_private_rss_flat_in_k": rss_flat,
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    drop(sidecar);
    drop(control);
    drop(hugepages);
    Ok(())
}

struct RunConfig<'a> {
    params: usize,
    trainers: u32,
    mode: &'a str,
    url: &'a str,
    bin_dir: &'a Path,
    reports: &'a Path,
    sidecar_pid: u32,
    socket: &'a Path,
    args: &'a Args,
}

async fn run_job(
    jobs: &mut JobServiceClient<tonic::transport::Channel>,
    config: &RunConfig<'_>,
) -> anyhow::Result<Value> {
    let (params, trainers, rounds) = (config.params, config.trainers, config.args.rounds);
    let spec = JobSpec {
        name: format!("bench-{}-m{params}-k{trainers}", config.mode),
        model: Some(ModelLayout {
            tensors: vec![Tensor {
                name: "weights".into(),
                shape: vec![params as u64],
                dtype: "f32".into(),
            }],
        }),
        rounds,
        trainers_per_round: trainers,
        min_trainers: trainers,
        round_deadline_ms: 300_000,
        aggregation: Some(Aggregation {
            rule: "fedavg".into(),
            mode: config.mode.to_owned(),
        }),
        hierarchy: Some(Hierarchy {
            levels: 0,
            max_fan_in: config.args.fan_in,
        }),
    };
    let created = jobs
        .create_job(CreateJobRequest { spec: Some(spec) })
        .await?
        .into_inner();
    let job = created.job.context("created job")?.id;
    // One arena at a time: wait until the last job's is given back.
    let waited = Instant::now();
    while !lifl_sdk::stats(config.socket).await?.jobs.is_empty() {
        if waited.elapsed() > Duration::from_secs(30) {
            bail!("the previous job's arena was not released");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sampler = Sampler::start(config.sidecar_pid);

    let started = Instant::now();
    let mut pushers = Vec::new();
    for k in 0..trainers {
        let child = Command::new(config.bin_dir.join("lifl-bench-pusher"))
            .args(["--control-plane", config.url, "--job", &job.to_string()])
            .args([
                "--trainer",
                &format!("t{k}"),
                "--params",
                &params.to_string(),
            ])
            .args(["--rounds", &rounds.to_string()])
            .env("LIFL_TRAINER_TOKEN", &created.trainer_token)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start lifl-bench-pusher")?;
        pushers.push(Process(child));
    }
    let mut retries = 0u64;
    for mut pusher in pushers {
        let mut out = String::new();
        if let Some(stdout) = pusher.0.stdout.take() {
            for line in BufReader::new(stdout).lines() {
                let line = line?;
                let event: Value = serde_json::from_str(&line)?;
                retries += event["push_retries"].as_u64().unwrap_or(0);
                out.push_str(&line);
            }
        }
        let status = pusher.0.wait()?;
        if !status.success() {
            bail!("a pusher failed ({status}); its last words: {out}");
        }
    }

    // The top reports after publishing; the pushers may finish first.
    let finished = loop {
        let job = jobs
            .get_job(GetJobRequest { job_id: job })
            .await?
            .into_inner();
        if job.state == JobState::Completed as i32 {
            break job;
        }
        if job.state != JobState::Running as i32 || started.elapsed() > Duration::from_secs(600) {
            bail!("job {} ended as {:?}: {}", job.id, job.state, job.failure);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let wall = started.elapsed().as_secs_f64();
    let sidecar = sampler.stop();
    let page_bytes = lifl_sdk::stats(config.socket)
        .await?
        .jobs
        .iter()
        .find(|j| j.job == job)
        .map_or(0, |j| j.page_bytes);

    let durations: Vec<f64> = finished
        .rounds
        .iter()
        .map(|r| r.duration_ms as f64 / 1e3)
        .collect();
    let steady: Vec<f64> = durations.iter().skip(1).copied().collect();
    let steady_mean = if steady.is_empty() {
        durations.first().copied().unwrap_or(0.0)
    } else {
        steady.iter().sum::<f64>() / steady.len() as f64
    };
    let round_bytes = params as f64 * 4.0 * f64::from(trainers);

    let mut aggregators = Vec::new();
    let text = std::fs::read_to_string(config.reports).unwrap_or_default();
    for line in text.lines() {
        let report: Value = serde_json::from_str(line)?;
        if report["job"] == json!(job) {
            aggregators.push(report);
        }
    }
    let sum = |key: &str| -> f64 { aggregators.iter().filter_map(|a| a[key].as_f64()).sum() };
    let max = |key: &str| -> f64 {
        aggregators
            .iter()
            .filter_map(|a| a[key].as_f64())
            .fold(0.0, f64::max)
    };
    let per_second = |seconds: f64| {
        if seconds > 0.0 {
            sum("fold_bytes") / seconds / 1e9
        } else {
            0.0
        }
    };
    let updates_folded: f64 = sum("children");
    Ok(json!({
        "mode": config.mode,
        "params": params,
        "trainers": trainers,
        "update_bytes": params * 4,
        "arena_page_bytes": page_bytes,
        "round_seconds": durations,
        "steady_round_seconds": steady_mean,
        "update_bytes_aggregated_per_sec": round_bytes / steady_mean,
        "wall_seconds": wall,
        "push_retries_arena_full": retries,
        "sidecar": {
            "peak_private_bytes": sidecar.anon,
            "peak_arena_bytes": sidecar.shmem,
        },
        "aggregator": {
            "processes": aggregators.len(),
            "max_peak_rss_bytes": max("peak_rss_bytes"),
            "max_private_peak_bytes": max("private_peak_bytes"),
            "max_arena_rss_bytes": max("arena_rss_bytes"),
        },
        "fold_gbps_in_rounds": per_second(sum("fold_seconds")),
        "fold_cpu_gbps_in_rounds": per_second(sum("fold_cpu_seconds")),
        "results_per_fold_pass": updates_folded / sum("fold_passes").max(1.0),
    }))
}

/// Peaks of a process's private (`RssAnon`) and shared-memory (`RssShmem`)
/// resident bytes, sampled every 10 ms while a job runs.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Peaks>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Peaks {
    anon: u64,
    shmem: u64,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peaks = Peaks::default();
            while !stopped.load(Ordering::Relaxed) {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                peaks.anon = peaks.anon.max(status_field(&status, "RssAnon:"));
                peaks.shmem = peaks.shmem.max(status_field(&status, "RssShmem:"));
                std::thread::sleep(Duration::from_millis(10));
            }
            peaks
        });
        Self { stop, thread }
    }

    fn stop(self) -> Peaks {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A `kB` field of `/proc/<pid>/status`, in bytes; 0 if absent.
fn status_field(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

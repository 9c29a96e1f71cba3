//! `lifl-bench-control-plane`: measures the control plane over real gRPC on
//! loopback and prints one JSON object: how many round assignments per second
//! it hands out while 10,000 trainers join one round, and how long creating a
//! job takes with the durable (redb, fsync per commit) store.
//!
//! The server runs in this process on `127.0.0.1:0`; clients share a few
//! HTTP/2 connections, as trainers behind a few gateways would.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lifl_control_plane::server::{self, ServerConfig, StoreLocation};
use lifl_proto::v1 as pb;
use lifl_proto::v1::job_service_client::JobServiceClient;
use lifl_proto::v1::node_service_client::NodeServiceClient;
use lifl_proto::v1::round_service_client::RoundServiceClient;
use serde_json::json;
use tonic::transport::Channel;

/// Benchmark the lifl control plane.
#[derive(Debug, Parser)]
struct Args {
    /// Trainers that join one round.
    #[arg(long, default_value_t = 10_000)]
    trainers: u32,
    /// Joins in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: u32,
    /// HTTP/2 connections the joins share.
    #[arg(long, default_value_t = 4)]
    connections: u32,
    /// Jobs created one after another to time creation.
    #[arg(long, default_value_t = 50)]
    jobs: u32,
}

fn spec(name: &str, trainers: u32) -> pb::JobSpec {
    pb::JobSpec {
        name: name.to_owned(),
        model: Some(pb::ModelLayout {
            tensors: vec![pb::Tensor {
                name: "w".to_owned(),
                shape: vec![1000, 1000],
                dtype: "f32".to_owned(),
            }],
        }),
        rounds: 1,
        trainers_per_round: trainers,
        min_trainers: trainers,
        round_deadline_ms: 600_000,
        aggregation: Some(pb::Aggregation {
            rule: "fedavg".to_owned(),
            mode: "eager".to_owned(),
        }),
        hierarchy: Some(pb::Hierarchy {
            levels: 0,
            max_fan_in: 32,
        }),
    }
}

/// The `q`-quantile of sorted samples, in milliseconds.
fn quantile_ms(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn mean_ms(samples: &[Duration]) -> f64 {
    let total: f64 = samples.iter().map(Duration::as_secs_f64).sum();
    total * 1e3 / samples.len().max(1) as f64
}

async fn connect(addr: std::net::SocketAddr) -> anyhow::Result<Channel> {
    Channel::from_shared(format!("http://{addr}"))?
        .connect()
        .await
        .context("connect to the control plane")
}

/// Times `count` sequential CreateJob calls.
async fn time_creates(channel: Channel, count: u32) -> anyhow::Result<Vec<Duration>> {
    let mut jobs = JobServiceClient::new(channel);
    let mut samples = Vec::new();
    for i in 0..count {
        let started = Instant::now();
        let request = pb::CreateJobRequest {
            spec: Some(spec(&format!("bench-create-{i}"), 100)),
        };
        jobs.create_job(request).await.context("create a job")?;
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples)
}

/// Joins `trainers` trainers to one job, `concurrency` at a time; returns the
/// wall time and each join's latency.
async fn time_joins(
    channels: &[Channel],
    job_id: u32,
    trainers: u32,
    concurrency: u32,
) -> anyhow::Result<(Duration, Vec<Duration>)> {
    let next = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..concurrency.max(1) {
        let channel = channels[w as usize % channels.len()].clone();
        let next = Arc::clone(&next);
        workers.push(tokio::spawn(async move {
            let mut rounds = RoundServiceClient::new(channel);
            let mut samples = Vec::new();
            loop {
                let t = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if t >= trainers {
                    return Ok::<_, tonic::Status>(samples);
                }
                let began = Instant::now();
                let request = pb::JoinRoundRequest {
                    job_id,
                    trainer_id: format!("trainer-{t}"),
                };
                rounds.join_round(request).await?;
                samples.push(began.elapsed());
            }
        }));
    }
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(
            worker
                .await
                .context("join worker")?
                .context("join a round")?,
        );
    }
    let elapsed = started.elapsed();
    samples.sort();
    Ok((elapsed, samples))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let path = std::env::temp_dir().join(format!("lifl-bench-{}.redb", std::process::id()));
    let config = ServerConfig::new("127.0.0.1:0".parse()?, StoreLocation::File(path.clone()));
    let running = server::start(config)
        .await
        .context("start the control plane")?;
    let addr = running.local_addr();

    let mut channels = Vec::new();
    for _ in 0..args.connections.max(1) {
        channels.push(connect(addr).await?);
    }
    let mut nodes = NodeServiceClient::new(channels[0].clone());
    for n in 0..4 {
        nodes
            .register_node(pb::RegisterNodeRequest {
                node_id: format!("bench-node-{n}"),
                capacity: Some(pb::NodeCapacity {
                    cores: 64,
                    arena_bytes: 64 << 30,
                }),
                gateway_address: format!("10.0.0.{n}:7500"),
                peer_address: format!("10.0.0.{n}:7501"),
            })
            .await
            .context("register a node")?;
    }

    let creates = time_creates(channels[0].clone(), args.jobs).await?;
    let mut jobs = JobServiceClient::new(channels[0].clone());
    let created = jobs
        .create_job(pb::CreateJobRequest {
            spec: Some(spec("bench-join", args.trainers)),
        })
        .await
        .context("create the join job")?
        .into_inner();
    let job_id = created.job.map_or(0, |j| j.id);
    let (elapsed, joins) = time_joins(&channels, job_id, args.trainers, args.concurrency).await?;
    let topology = jobs
        .get_topology(pb::GetTopologyRequest { job_id })
        .await
        .context("read the topology")?
        .into_inner();

    let report = json!({
        "trainers": args.trainers,
        "concurrency": args.concurrency,
        "connections": args.connections,
        "round_assignments_per_s": (f64::from(args.trainers) / elapsed.as_secs_f64()).round(),
        "join_wall_ms": (elapsed.as_secs_f64() * 1e3 * 10.0).round() / 10.0,
        "join_latency_ms": {
            "p50": quantile_ms(&joins, 0.5),
            "p99": quantile_ms(&joins, 0.99),
        },
        "tree": {"levels": topology.levels, "fan_in": topology.fan_in,
                 "aggregators": topology.aggregators.len()},
        "create_job_latency_ms": {
            "jobs": args.jobs,
            "store": "redb",
            "mean": mean_ms(&creates),
            "p50": quantile_ms(&creates, 0.5),
            "p99": quantile_ms(&creates, 0.99),
        },
    });
    println!("{report}");

    drop((nodes, jobs, channels));
    running
        .shutdown()
        .await
        .context("shut the control plane down")?;
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    Ok(())
}

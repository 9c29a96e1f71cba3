//! `lifl-bench-dataplane`: measures the node data path in one run and prints
//! JSON: one-way descriptor latency and descriptors per second over the
//! SK_MSG path, the user-space path and plain loopback TCP, and how fast an
//! update is written into and read from the arena beside an in-run memcpy.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use lifl_integration::{block_on, is_root, Mode, Peer, SidecarProcess};
use lifl_sdk::{Endpoint, Registration, UpdateMeta};
use serde_json::{json, Value};

#[derive(Debug, Parser)]
#[command(about = "Benchmark lifl's node data path; prints JSON")]
struct Args {
    /// Where lifl-sidecar and lifl-dp-peer are (default: beside this binary).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Round trips per latency measurement, and per throughput measurement.
    #[arg(long, default_value_t = 20_000)]
    count: u64,
    /// Descriptors in flight for the throughput measurement.
    #[arg(long, default_value_t = 64)]
    window: u64,
    /// Bytes of the update written and read (ResNet-18 in f32: 46.8 MB).
    #[arg(long, default_value_t = 46_800_000)]
    update_bytes: u64,
    /// Repetitions of each bandwidth measurement; the median is reported.
    #[arg(long, default_value_t = 9)]
    reps: usize,
}

const PATIENCE: Duration = Duration::from_secs(600);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.bin_dir {
        // Read by the harness when it starts binaries; set before any thread.
        std::env::set_var("LIFL_BIN_DIR", dir);
    }

    let kernel = is_root();
    let sk_msg = if kernel {
        descriptors(Mode::Kernel, &args)?
    } else {
        Value::Null
    };
    let userspace = descriptors(Mode::Userspace, &args)?;
    let tcp = tcp_loopback(&args)?;
    let arena = arena_bandwidth(
        if kernel {
            Mode::Kernel
        } else {
            Mode::Userspace
        },
        &args,
    )?;

    let p50 = |v: &Value| v["latency"]["p50_us"].as_f64();
    let aims = json!({
        "sk_msg_p50_below_tcp": match (p50(&sk_msg), p50(&tcp)) {
            (Some(s), Some(t)) => json!(s < t),
            _ => Value::Null,
        },
        "arena_write_within_1_5x_memcpy": arena["write_time_vs_memcpy"].as_f64().map(|r| r <= 1.5),
    });
    let report = json!({
        "bench": "dataplane",
        "descriptor_bytes": 64,
        "round_trips": args.count,
        "window": args.window,
        "sk_msg": sk_msg,
        "userspace": userspace,
        "tcp_loopback": tcp,
        "arena": arena,
        "aims": aims,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Ping-pong between two peer processes through a sidecar in `mode`.
fn descriptors(mode: Mode, args: &Args) -> anyhow::Result<Value> {
    let sidecar = SidecarProcess::builder(mode)
        .start()
        .context("start the sidecar")?;
    let mut pong = Peer::start(&sidecar, &["pong", "--endpoint", "2"])?;
    pong.expect("ready", PATIENCE)?;
    let (count, window) = (args.count.to_string(), args.window.to_string());
    let ping_args = [
        "ping",
        "--endpoint",
        "1",
        "--to",
        "2",
        "--count",
        &count,
        "--window",
        &window,
    ];
    let mut ping = Peer::start(&sidecar, &ping_args)?;
    let mut done = ping.expect("done", PATIENCE)?;

    // Say who moved the descriptors, from the sidecar's own counters.
    let stats = sidecar.stats()?;
    let pinger = stats.endpoints.iter().find(|e| e.endpoint == 1);
    done["kernel_routed_by_ping"] = json!(pinger.map(|e| e.kernel_routed));
    done["routed_by_sidecar"] = json!(stats.routed_by_sidecar);
    strip_event(&mut done);
    ping.finish()?;
    drop(pong);
    Ok(done)
}

/// The same ping-pong over a plain loopback TCP connection.
fn tcp_loopback(args: &Args) -> anyhow::Result<Value> {
    // The peer needs no sidecar for this; one gives it the same launch path.
    let sidecar = SidecarProcess::builder(Mode::Userspace).start()?;
    let (count, window) = (args.count.to_string(), args.window.to_string());
    let mut ping = Peer::start(
        &sidecar,
        &["tcp-ping", "--count", &count, "--window", &window],
    )?;
    let mut done = ping.expect("done", PATIENCE)?;
    strip_event(&mut done);
    ping.finish()?;
    Ok(done)
}

fn strip_event(report: &mut Value) {
    if let Some(fields) = report.as_object_mut() {
        fields.remove("event");
    }
}

/// Median seconds of `reps` runs of `f`.
fn median_secs(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn checksum(bytes: &[u8]) -> u64 {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("chunks of 8")))
        .fold(0u64, u64::wrapping_add)
}

/// Writes an update into the arena and reads it in place through another
/// endpoint's mapping, beside a memcpy and a read of private memory.
fn arena_bandwidth(mode: Mode, args: &Args) -> anyhow::Result<Value> {
    let sidecar = SidecarProcess::builder(mode)
        .arena_bytes("256MiB")
        .start()?;
    let bytes = args.update_bytes as usize;
    let gbps = |secs: f64| bytes as f64 / secs / 1e9;

    let mut source = vec![0u8; bytes];
    lifl_integration::fill_payload(1, &mut source);
    let mut private = vec![1u8; bytes];
    let memcpy = median_secs(args.reps, || private.copy_from_slice(black_box(&source)));
    let private_read = median_secs(args.reps, || {
        black_box(checksum(black_box(&private)));
    });

    block_on(async {
        let socket = sidecar.socket();
        let writer = Endpoint::register(Registration::new(socket, 9, "writer")).await?;
        let reader = Endpoint::register(Registration::new(socket, 9, "reader")).await?;

        let mut buffer = writer.alloc(args.update_bytes).await?;
        let write = median_secs(args.reps, || {
            buffer.as_mut_bytes().copy_from_slice(black_box(&source));
        });
        let meta = UpdateMeta::update(1, 1);
        writer.send(reader.id(), buffer, meta).await?;
        let update = reader.recv().await?;
        anyhow::ensure!(update.as_bytes() == source, "the update arrived intact");
        let read = median_secs(args.reps, || {
            black_box(checksum(black_box(update.as_bytes())));
        });

        Ok(json!({
            "update_bytes": bytes,
            "page_bytes": lifl_sdk::stats(socket).await?.jobs.first().map(|j| j.page_bytes),
            "memcpy_gbps": gbps(memcpy),
            "arena_write_gbps": gbps(write),
            "write_time_vs_memcpy": write / memcpy,
            "arena_read_gbps": gbps(read),
            "private_read_gbps": gbps(private_read),
        }))
    })
}

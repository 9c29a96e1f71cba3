//! `lifl-dp-peer`: one side of a data-plane scenario, run as its own process
//! by the tests and benchmarks. It reports what it saw as JSON lines on
//! stdout, then waits for its stdin to close so the test can inspect the
//! sidecar while its endpoints are still registered.

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use lifl_integration::{
    emit, fill_payload, payload_matches, update_samples, update_values, LatencySummary,
};
use lifl_proto::descriptor::{DescKind, Descriptor, DESC_MAGIC, DESC_VERSION};
use lifl_sdk::{BufferMut, Endpoint, Fault, Registration, SdkError, UpdateMeta};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    /// The sidecar's registration socket.
    #[arg(long, default_value = "/run/lifl/sidecar.sock")]
    socket: PathBuf,
    /// Job to register for.
    #[arg(long, default_value_t = 1)]
    job: u32,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// Receive `count` updates and check every payload byte.
    Recv {
        #[arg(long)]
        endpoint: u32,
        #[arg(long)]
        count: u64,
    },
    /// Send `count` updates of `len` bytes to endpoint `to`.
    Send {
        #[arg(long)]
        endpoint: u32,
        #[arg(long)]
        to: u32,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        len: u64,
        /// Exit the moment the last send returns, without waiting for stdin.
        #[arg(long)]
        exit_at_once: bool,
    },
    /// Hold `buffers` buffers across two endpoints, half of them received,
    /// until killed.
    Hold {
        #[arg(long)]
        buffers: u64,
    },
    /// Send a valid update to an endpoint of `other_job`, then one to a
    /// third endpoint of this job.
    CrossJob {
        #[arg(long)]
        other_job: u32,
    },
    /// Send every kind of malformed descriptor and report each refusal.
    Malformed,
    /// Allocate `len`-byte buffers until refused, then release one, and
    /// send and receive again.
    Exhaust {
        #[arg(long)]
        len: u64,
    },
    /// Act as the trainers' gateway: send `count` updates of `params` f32
    /// values, update k to leaf `leaves[k % len]`.
    Push {
        #[arg(long)]
        count: u64,
        #[arg(long)]
        params: usize,
        #[arg(long, value_delimiter = ',')]
        leaves: Vec<u32>,
        #[arg(long, default_value_t = 1)]
        round: u32,
        /// First send this leaf one more update that claims nearly 2^64
        /// samples: a gateway gone wrong, which the leaf must refuse
        /// rather than let it crowd out the honest updates.
        #[arg(long)]
        poison: Option<u32>,
    },
    /// Receive one model and print its values.
    Collect {
        #[arg(long)]
        endpoint: u32,
    },
    /// Send every update received straight back to its sender.
    Pong {
        #[arg(long)]
        endpoint: u32,
    },
    /// Measure round trips to a `pong` endpoint: `count` one at a time, then
    /// `count` more with `window` in flight.
    Ping {
        #[arg(long)]
        endpoint: u32,
        #[arg(long)]
        to: u32,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        window: u64,
    },
    /// Echo 64-byte messages on a TCP connection to `connect`.
    TcpEcho {
        #[arg(long)]
        connect: std::net::SocketAddr,
    },
    /// The same two measurements as `ping` over a plain loopback TCP
    /// connection to a `tcp-echo` process.
    TcpPing {
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        window: u64,
    },
}

const QUIET: Duration = Duration::from_millis(300);

fn main() {
    let args = Args::parse();
    // One thread: every process of a scenario gets the same, simplest
    // scheduler, and latency figures carry no cross-thread wake-ups.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime builds");
    if let Err(err) = runtime.block_on(run(args)) {
        emit(json!({"event": "error", "message": format!("{err:#}")}));
        std::process::exit(1);
    }
}

async fn register(args: &Args, job: u32, role: &str, id: Option<u32>) -> anyhow::Result<Endpoint> {
    let mut registration = Registration::new(&args.socket, job, role);
    registration.endpoint = id;
    Endpoint::register(registration)
        .await
        .with_context(|| format!("register {role}"))
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The endpoints live until stdin closes, so the test can read stats.
    let _endpoints = match args.scenario {
        Scenario::Recv { endpoint, count } => vec![recv(&args, endpoint, count).await?],
        Scenario::Send {
            endpoint,
            to,
            count,
            len,
            exit_at_once,
        } => {
            let ep = send(&args, endpoint, to, count, len).await?;
            if exit_at_once {
                // Like a process that finishes its work and ends: the kernel
                // closes both sockets, with nothing flushed or said.
                std::process::exit(0);
            }
            vec![ep]
        }
        Scenario::Hold { buffers } => hold(&args, buffers).await?,
        Scenario::CrossJob { other_job } => cross_job(&args, other_job).await?,
        Scenario::Malformed => malformed(&args).await?,
        Scenario::Exhaust { len } => vec![exhaust(&args, len).await?],
        Scenario::Push {
            count,
            params,
            ref leaves,
            round,
            poison,
        } => {
            let pushes = Pushes {
                count,
                params,
                leaves,
                round,
                poison,
            };
            vec![push(&args, &pushes).await?]
        }
        Scenario::Collect { endpoint } => vec![collect(&args, endpoint).await?],
        Scenario::Pong { endpoint } => vec![pong(&args, endpoint).await?],
        Scenario::Ping {
            endpoint,
            to,
            count,
            window,
        } => {
            vec![ping(&args, endpoint, to, count, window).await?]
        }
        Scenario::TcpEcho { connect } => {
            tcp_echo(connect).await?;
            return Ok(());
        }
        Scenario::TcpPing { count, window } => {
            tcp_ping(count, window).await?;
            vec![]
        }
    };
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
    Ok(())
}

fn update_meta(samples: u64) -> UpdateMeta {
    UpdateMeta::update(1, samples)
}

async fn recv(args: &Args, id: u32, count: u64) -> anyhow::Result<Endpoint> {
    let ep = register(args, args.job, "receiver", Some(id)).await?;
    emit(json!({"event": "ready", "endpoint": ep.id(), "dataplane": ep.dataplane()}));
    let (mut bad_payloads, mut out_of_order) = (0u64, 0u64);
    for i in 0..count {
        let update = ep.recv().await.context("receive")?;
        // The sender puts the update's index in its sample count.
        let index = update.meta().samples;
        if index != i {
            out_of_order += 1;
        }
        if !payload_matches(index, update.as_bytes()) || update.src() == ep.id() {
            bad_payloads += 1;
        }
    }
    emit(
        json!({"event": "done", "received": count, "bad_payloads": bad_payloads,
                "out_of_order": out_of_order}),
    );
    Ok(ep)
}

async fn send(args: &Args, id: u32, to: u32, count: u64, len: u64) -> anyhow::Result<Endpoint> {
    let ep = register(args, args.job, "sender", Some(id)).await?;
    emit(json!({"event": "ready", "endpoint": ep.id(), "dataplane": ep.dataplane()}));
    let started = Instant::now();
    let mut capacity_waits = 0u64;
    for i in 0..count {
        let mut buffer = loop {
            match ep.alloc(len).await {
                Ok(buffer) => break buffer,
                // The receiver has not released enough yet: back-pressure.
                Err(err) if err.fault() == Fault::Capacity => {
                    capacity_waits += 1;
                    tokio::time::sleep(Duration::from_micros(200)).await;
                }
                Err(err) => return Err(err).context("alloc"),
            }
        };
        fill_payload(i, buffer.as_mut_bytes());
        ep.send(to, buffer, update_meta(i)).await.context("send")?;
    }
    emit(
        json!({"event": "done", "sent": count, "capacity_waits": capacity_waits,
                "elapsed_ms": started.elapsed().as_millis() as u64}),
    );
    Ok(ep)
}

async fn hold(args: &Args, buffers: u64) -> anyhow::Result<Vec<Endpoint>> {
    let a = register(args, args.job, "holder", None).await?;
    let b = register(args, args.job, "holder", None).await?;
    let mut kept = Vec::new();
    let mut received = Vec::new();
    for i in 0..buffers {
        let mut buffer = a.alloc(4096).await?;
        fill_payload(i, buffer.as_mut_bytes());
        if i % 2 == 0 {
            kept.push(buffer);
        } else {
            a.send(b.id(), buffer, update_meta(i)).await?;
            received.push(b.recv().await?);
        }
    }
    emit(json!({"event": "holding", "endpoints": [a.id(), b.id()],
                "kept": kept.len(), "received": received.len()}));
    // Killed here, with every buffer still held.
    std::future::pending::<()>().await;
    unreachable!("pending never completes")
}

async fn cross_job(args: &Args, other_job: u32) -> anyhow::Result<Vec<Endpoint>> {
    let a = register(args, args.job, "sender", None).await?;
    let other = register(args, other_job, "other-job", None).await?;
    let peer = register(args, args.job, "same-job", None).await?;

    let mut buffer = a.alloc(256).await?;
    fill_payload(7, buffer.as_mut_bytes());
    let seq = a.send(other.id(), buffer, update_meta(7)).await?;
    let refusal = match a.recv().await {
        Err(SdkError::Refused {
            seq: s,
            dst,
            reason,
        }) if s == seq && dst == other.id() => reason.as_str().to_owned(),
        other => bail!("expected a refusal of descriptor {seq}, got {other:?}"),
    };
    let delivered = tokio::time::timeout(QUIET, other.recv()).await.is_ok();

    // The sender's socket still works: nothing was dropped in the kernel.
    let mut buffer = a.alloc(256).await?;
    fill_payload(8, buffer.as_mut_bytes());
    a.send(peer.id(), buffer, update_meta(8)).await?;
    let update = tokio::time::timeout(Duration::from_secs(5), peer.recv()).await??;
    let same_job_ok = payload_matches(8, update.as_bytes());
    drop(update);

    emit(
        json!({"event": "result", "refusal": refusal, "delivered_across_jobs": delivered,
                "same_job_after_refusal": same_job_ok,
                "endpoints": {"sender": a.id(), "other": other.id(), "peer": peer.id()}}),
    );
    Ok(vec![a, other, peer])
}

/// Spoils one field of a valid descriptor: `(desc, other endpoint, arena bytes)`.
type Forge = fn(&mut Descriptor, u32, u64);

async fn malformed(args: &Args) -> anyhow::Result<Vec<Endpoint>> {
    let a = register(args, args.job, "forger", None).await?;
    let b = register(args, args.job, "target", None).await?;
    let arena = a.arena_bytes();

    let mut observed = serde_json::Map::new();
    let cases: [(&str, Forge); 8] = [
        ("bad_magic", |d, _, _| d.magic = 0x1234_5678),
        ("bad_version", |d, _, _| d.version = DESC_VERSION + 1),
        ("bad_kind", |d, _, _| d.kind = 99),
        ("spoofed_source", |d, b, _| d.src = b),
        ("unknown_endpoint", |d, _, _| d.dst = 999_999),
        ("out_of_bounds_offset", |d, _, arena| d.offset = arena),
        ("out_of_bounds_len", |d, _, arena| d.len = arena * 2),
        ("not_holder", |d, _, _| {
            d.ref_gen = d.ref_gen.wrapping_add(1000)
        }),
    ];
    for (name, forge) in cases {
        let buffer = a.alloc(4096).await?;
        let (ref_slot, ref_gen, offset, len) = Endpoint::reference_of(&buffer);
        let mut desc = Descriptor {
            dst: b.id(),
            src: a.id(),
            magic: DESC_MAGIC,
            version: DESC_VERSION,
            kind: DescKind::Update as u16,
            job: a.job(),
            round: 1,
            ref_slot,
            ref_gen,
            offset,
            len,
            samples: 1,
            seq: 0,
            updates: 1,
        };
        forge(&mut desc, b.id(), arena);
        a.write_raw_descriptor_bytes(desc.as_bytes()).await?;
        observed.insert(name.into(), json!(refusal_of(&a).await?));
        drop(buffer);
    }

    // Fewer than 64 bytes, and nothing after them.
    a.write_raw_descriptor_bytes(&[0xab; 10]).await?;
    observed.insert("short".into(), json!(refusal_of(&a).await?));

    let delivered = tokio::time::timeout(QUIET, b.recv()).await.is_ok();
    emit(json!({"event": "result", "observed": observed, "delivered": delivered}));
    Ok(vec![a, b])
}

async fn refusal_of(ep: &Endpoint) -> anyhow::Result<String> {
    match tokio::time::timeout(Duration::from_secs(5), ep.recv()).await {
        Ok(Err(SdkError::Refused { reason, .. })) => Ok(reason.as_str().to_owned()),
        Ok(other) => bail!("expected a refusal, got {other:?}"),
        Err(_) => Ok("none".to_owned()),
    }
}

async fn exhaust(args: &Args, len: u64) -> anyhow::Result<Endpoint> {
    let ep = register(args, args.job, "exhauster", None).await?;
    let mut held = Vec::new();
    let error = loop {
        match ep.alloc(len).await {
            Ok(buffer) => held.push(buffer),
            Err(err) => break err,
        }
        if held.len() > 100_000 {
            bail!("no limit reached after 100000 buffers");
        }
    };
    let code = match &error {
        SdkError::Rejected { code, .. } => json!(code),
        other => json!(format!("{other:?}")),
    };
    let allocated = held.len();

    // Give one back; the next allocation and a send then succeed.
    held.pop();
    let mut buffer = ep.alloc(len).await.context("alloc after release")?;
    fill_payload(42, buffer.as_mut_bytes());
    ep.send(ep.id(), buffer, update_meta(42)).await?;
    let update = tokio::time::timeout(Duration::from_secs(5), ep.recv()).await??;
    let round_trip = payload_matches(42, update.as_bytes());

    emit(
        json!({"event": "result", "allocated": allocated, "code": code,
                "message": error.to_string(), "retryable": error.is_retryable(),
                "fault": format!("{:?}", error.fault()), "round_trip_after_release": round_trip}),
    );
    Ok(ep)
}

async fn pong(args: &Args, id: u32) -> anyhow::Result<Endpoint> {
    let ep = register(args, args.job, "pong", Some(id)).await?;
    emit(json!({"event": "ready", "endpoint": ep.id(), "dataplane": ep.dataplane()}));
    // Serve until the descriptor socket closes (the sidecar stops).
    while let Ok(update) = ep.recv().await {
        let (to, meta) = (update.src(), update.meta());
        ep.send(to, update, meta).await?;
    }
    Ok(ep)
}

async fn ping(args: &Args, id: u32, to: u32, count: u64, window: u64) -> anyhow::Result<Endpoint> {
    let ep = register(args, args.job, "ping", Some(id)).await?;
    let meta = update_meta(0);

    // One in flight: each round trip timed alone.
    let mut rtts = Vec::with_capacity(count as usize);
    let mut buffer = ep.alloc(64).await?;
    fill_payload(0, buffer.as_mut_bytes());
    ep.send(to, buffer, meta).await?;
    let mut update = ep.recv().await?;
    for _ in 0..count {
        let started = Instant::now();
        ep.send(to, update, meta).await?;
        update = ep.recv().await?;
        rtts.push(started.elapsed());
    }
    drop(update);

    // `window` in flight: descriptors moved per second, both directions.
    for _ in 0..window {
        ep.send(to, ep.alloc(64).await?, meta).await?;
    }
    let started = Instant::now();
    for _ in 0..count {
        let update = ep.recv().await?;
        ep.send(to, update, meta).await?;
    }
    let elapsed = started.elapsed();
    emit(json!({"event": "done", "dataplane": ep.dataplane(),
                "latency": LatencySummary::one_way(&mut rtts),
                "msgs_per_sec": (2 * count) as f64 / elapsed.as_secs_f64()}));
    Ok(ep)
}

async fn tcp_ping(count: u64, window: u64) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // The echo side runs in its own process, like `pong`.
    let mut echo = std::process::Command::new(std::env::current_exe()?)
        .args(["tcp-echo", "--connect", &addr.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let (mut stream, _) = listener.accept().await?;
    stream.set_nodelay(true)?;
    let mut msg = [0u8; 64];

    let mut rtts = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let started = Instant::now();
        stream.write_all(&msg).await?;
        stream.read_exact(&mut msg).await?;
        rtts.push(started.elapsed());
    }

    for _ in 0..window {
        stream.write_all(&msg).await?;
    }
    let started = Instant::now();
    for _ in 0..count {
        stream.read_exact(&mut msg).await?;
        stream.write_all(&msg).await?;
    }
    let elapsed = started.elapsed();
    for _ in 0..window {
        stream.read_exact(&mut msg).await?;
    }
    drop(stream);
    echo.wait()?;
    emit(json!({"event": "done", "dataplane": "tcp_loopback",
                "latency": LatencySummary::one_way(&mut rtts),
                "msgs_per_sec": (2 * count) as f64 / elapsed.as_secs_f64()}));
    Ok(())
}

async fn tcp_echo(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut msg = [0u8; 64];
    while stream.read_exact(&mut msg).await.is_ok() {
        stream.write_all(&msg).await?;
    }
    Ok(())
}

/// What the stand-in gateway sends.
struct Pushes<'a> {
    count: u64,
    params: usize,
    leaves: &'a [u32],
    round: u32,
    poison: Option<u32>,
}

async fn push(args: &Args, pushes: &Pushes<'_>) -> anyhow::Result<Endpoint> {
    let Pushes {
        count,
        params,
        leaves,
        round,
        poison,
    } = *pushes;
    anyhow::ensure!(!leaves.is_empty(), "no leaves to push to");
    let ep = register(args, args.job, "gateway", None).await?;
    if let Some(leaf) = poison {
        let meta = UpdateMeta::update(round, u64::MAX - 1);
        ep.send(leaf, filled(&ep, 0, params).await?, meta).await?;
    }
    for k in 0..count {
        let meta = UpdateMeta::update(round, update_samples(k));
        let leaf = leaves[(k % leaves.len() as u64) as usize];
        ep.send(leaf, filled(&ep, k, params).await?, meta).await?;
    }
    emit(json!({"event": "done", "pushed": count, "poisoned": poison.is_some()}));
    Ok(ep)
}

/// A buffer holding update `k`'s values.
async fn filled(ep: &Endpoint, k: u64, params: usize) -> anyhow::Result<BufferMut> {
    let mut buffer = ep.alloc((params * 4) as u64).await?;
    buffer
        .as_mut_f32()?
        .copy_from_slice(&update_values(k, params));
    Ok(buffer)
}

async fn collect(args: &Args, id: u32) -> anyhow::Result<Endpoint> {
    let ep = register(args, args.job, "collector", Some(id)).await?;
    emit(json!({"event": "ready", "endpoint": ep.id()}));
    let model = ep.recv().await?;
    let meta = model.meta();
    emit(
        json!({"event": "model", "src": model.src(), "round": meta.round,
                "kind": format!("{:?}", meta.kind), "samples": meta.samples,
                "updates": meta.updates, "values": model.as_f32()?}),
    );
    Ok(ep)
}

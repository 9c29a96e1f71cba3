//! `lifl-bench-pusher`: one benchmark trainer, as its own process. Each
//! round it fetches the global model, joins, and pushes a synthetic update,
//! generated chunk by chunk so that the process stays small whatever the
//! model's size: what is measured is the platform, not the trainer. Prints
//! one JSON line per round with its timings.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use lifl_proto::bearer::Bearer;
use lifl_proto::v1::gateway_service_client::GatewayServiceClient;
use lifl_proto::v1::round_service_client::RoundServiceClient;
use lifl_proto::v1::{
    fetch_model_response, push_update_request, FetchModelRequest, JoinRoundRequest,
    PushUpdateRequest, TrainerAssignment, UpdateHeader,
};
use serde_json::json;
use tonic::transport::Channel;
use tonic::Code;

/// Bytes per pushed chunk.
const CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug, Parser)]
#[command(about = "One benchmark trainer: fetch, join, push a synthetic update, each round")]
struct Args {
    /// The control plane.
    #[arg(long)]
    control_plane: String,
    /// The job's trainer token.
    #[arg(long, env = "LIFL_TRAINER_TOKEN")]
    token: Option<String>,
    /// Job id.
    #[arg(long)]
    job: u32,
    /// This trainer's id.
    #[arg(long)]
    trainer: String,
    /// f32 parameters of the model.
    #[arg(long)]
    params: usize,
    /// Rounds to take part in.
    #[arg(long)]
    rounds: u32,
    /// Samples behind each update.
    #[arg(long, default_value_t = 100)]
    samples: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let control = Channel::from_shared(args.control_plane.clone())?
        .connect()
        .await
        .context("connect to the control plane")?;
    let mut rounds = RoundServiceClient::new(control);
    let mut gateway: Option<GatewayServiceClient<Channel>> = None;

    for round in 1..=args.rounds {
        let started = Instant::now();
        // From round 2 on, the previous round's model marks the next round:
        // fetch it (the gateway holds the call until it exists), then join.
        let mut fetched = None;
        if round > 1 {
            let client = gateway.as_mut().context("a gateway from round 1")?;
            fetched = Some(fetch(client, args.job, round - 1, args.params).await?);
        }
        let assignment = join(&mut rounds, &args).await?;
        if assignment.round != round {
            bail!("joined round {} while expecting {round}", assignment.round);
        }
        if gateway.is_none() {
            let channel = Channel::from_shared(format!("http://{}", assignment.gateway_address))?
                .connect()
                .await
                .context("connect to the gateway")?;
            gateway = Some(
                GatewayServiceClient::new(channel)
                    .max_decoding_message_size(16 << 20)
                    .max_encoding_message_size(16 << 20),
            );
        }
        let client = gateway.as_mut().context("a gateway")?;
        if fetched.is_none() {
            fetched = Some(fetch(client, args.job, assignment.model_version, args.params).await?);
        }
        let fetch_secs = fetched.map_or(0.0, |d| d.as_secs_f64());
        let pushing = Instant::now();
        let retries = push(client, &args, &assignment).await?;
        println!(
            "{}",
            json!({
                "event": "round",
                "trainer": args.trainer,
                "round": round,
                "fetch_seconds": fetch_secs,
                "push_seconds": pushing.elapsed().as_secs_f64(),
                "push_retries": retries,
                "seconds": started.elapsed().as_secs_f64(),
            })
        );
    }
    Ok(())
}

async fn join(
    rounds: &mut RoundServiceClient<Channel>,
    args: &Args,
) -> anyhow::Result<TrainerAssignment> {
    let request = JoinRoundRequest {
        job_id: args.job,
        trainer_id: args.trainer.clone(),
    };
    let reply = rounds
        .join_round(Bearer::new(args.token.as_deref())?.request(request))
        .await
        .context("join the round")?;
    Ok(reply.into_inner())
}

/// Downloads model `version` (or newer) and checks its length; returns how
/// long it took.
async fn fetch(
    client: &mut GatewayServiceClient<Channel>,
    job: u32,
    version: u32,
    params: usize,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let request = FetchModelRequest {
        job_id: job,
        min_version: version,
        wait_ms: 0,
    };
    let mut stream = client
        .fetch_model(request)
        .await
        .context("fetch the model")?
        .into_inner();
    let mut bytes = 0usize;
    while let Some(message) = stream.message().await.context("fetch the model")? {
        if let Some(fetch_model_response::Part::Chunk(chunk)) = message.part {
            bytes += chunk.len();
        }
    }
    if bytes != params * 4 {
        bail!("fetched {bytes} bytes; the model has {}", params * 4);
    }
    Ok(started.elapsed())
}

/// Pushes the synthetic update, retrying while the arena is full; returns
/// the retries it took.
async fn push(
    client: &mut GatewayServiceClient<Channel>,
    args: &Args,
    assignment: &TrainerAssignment,
) -> anyhow::Result<u32> {
    let seed = args
        .trainer
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31) ^ u32::from(b));
    let chunk: Vec<u8> = (0..CHUNK_BYTES / 4)
        .flat_map(|i| (((seed as usize + i) % 1000) as f32 * 1e-3).to_le_bytes())
        .collect();
    let total = args.params * 4;
    let mut retries = 0;
    loop {
        let header = PushUpdateRequest {
            part: Some(push_update_request::Part::Header(UpdateHeader {
                job_id: assignment.job_id,
                round: assignment.round,
                trainer_id: args.trainer.clone(),
                samples: args.samples,
            })),
        };
        let chunks = (0..total.div_ceil(CHUNK_BYTES)).map({
            let chunk = chunk.clone();
            move |i| {
                let len = CHUNK_BYTES.min(total - i * CHUNK_BYTES);
                PushUpdateRequest {
                    part: Some(push_update_request::Part::Chunk(chunk[..len].to_vec())),
                }
            }
        });
        let messages = futures_util::stream::iter(std::iter::once(header).chain(chunks));
        match client.push_update(messages).await {
            Ok(_) => return Ok(retries),
            Err(status)
                if matches!(status.code(), Code::ResourceExhausted | Code::Unavailable)
                    && retries < 10_000 =>
            {
                retries += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(status) => bail!("push refused: {:?}: {}", status.code(), status.message()),
        }
    }
}

//! Moves one model update between two endpoints by reference, through a
//! running sidecar:
//!
//! ```sh
//! cargo run -p lifl-sdk --example round_trip -- /run/lifl/sidecar.sock
//! ```
//!
//! It prints the data path the node uses and the update as it was read in
//! place on the receiving side.

use lifl_sdk::{Endpoint, Registration, SdkError, UpdateMeta};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), SdkError> {
    let socket = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/run/lifl/sidecar.sock".into());
    let job = 7;
    let leaf = Endpoint::register(Registration::new(&socket, job, "leaf")).await?;
    let top = Endpoint::register(Registration::new(&socket, job, "top")).await?;

    // Write the update once, in place in the job's arena.
    let weights = [0.5f32, -1.0, 2.0, 4.25];
    let mut update = leaf.alloc(std::mem::size_of_val(&weights) as u64).await?;
    update.as_mut_f32()?.copy_from_slice(&weights);

    // Move it by reference: only a 64-byte descriptor travels.
    let meta = UpdateMeta::update(1, 600);
    leaf.send(top.id(), update, meta).await?;

    // Read it in place; dropping it gives the buffer back.
    let received = top.recv().await?;
    println!(
        "dataplane={} from={} samples={} values={:?}",
        top.dataplane(),
        received.src(),
        received.meta().samples,
        received.as_f32()?
    );
    Ok(())
}

//! The gRPC face of the control plane: each method validates its request,
//! calls the [`Coordinator`](crate::coordinator::Coordinator), and converts
//! the answer. Errors become a `Status` in one place (`status`); message
//! conversion lives in `convert`.

mod convert;
mod jobs;
mod nodes;
mod rounds;
mod status;

use tonic::metadata::MetadataMap;
use tonic::Status;

pub use self::convert::draft_to_pb;
pub use self::jobs::JobsGrpc;
pub use self::nodes::NodesGrpc;
pub use self::rounds::RoundsGrpc;

/// The token from `authorization: Bearer <token>`, if the call carries one.
fn bearer_token(metadata: &MetadataMap) -> Result<Option<&str>, Status> {
    let Some(value) = metadata.get("authorization") else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty());
    match token {
        Some(token) => Ok(Some(token)),
        None => Err(Status::unauthenticated(
            "authorization must be \"Bearer <token>\"",
        )),
    }
}

/// Items a server stream may queue for a slow client before its feeder
/// waits (and, if it waits long, falls behind and resends a snapshot).
const STREAM_BUFFER: usize = 64;

/// Sends `item` on a server stream unless the client left or the server is
/// shutting down; `false` means stop feeding the stream.
async fn send_or_stop<T>(
    tx: &tokio::sync::mpsc::Sender<Result<T, Status>>,
    item: T,
    shutdown: &tokio_util::sync::CancellationToken,
) -> bool {
    tokio::select! {
        sent = tx.send(Ok(item)) => sent.is_ok(),
        () = shutdown.cancelled() => false,
    }
}

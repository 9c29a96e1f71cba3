//! The registration socket: where endpoints join the node, ask for buffers
//! and give them back, and where the sidecar keeps its end of each
//! endpoint's descriptor socket.
//!
//! One task per connection reads control lines and answers them; one task per
//! endpoint reads its descriptor socket (everything the kernel passed, or
//! everything at all in user space) and one writes descriptors the sidecar
//! routes to it. When the control connection closes, for any reason, the
//! endpoint is unregistered and its references released.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lifl_proto::control::{ErrorCode, Grant, Reply, Request, MAX_LINE_BYTES, MAX_RELEASE_BATCH};
use lifl_proto::descriptor::{Descriptor, DESC_SIZE};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, LinesCodec};
use tokio_util::sync::CancellationToken;

use crate::node::{EndpointLink, Node, NodeError, Registration, Verdict};

/// How long a partial descriptor may wait for the rest of its bytes before it
/// is refused as short. Senders write whole descriptors in one call, so the
/// rest of a real one arrives within microseconds.
const SHORT_GRACE: Duration = Duration::from_millis(100);

/// How long descriptors an endpoint wrote before its control connection
/// closed are still read and routed.
const DRAIN_GRACE: Duration = Duration::from_secs(1);

/// Unasked notices and answers queued for one control connection.
const REPLY_QUEUE: usize = 1024;

/// Accepts connections until `shutdown` is cancelled.
pub async fn serve(node: Arc<Node>, listener: UnixListener, shutdown: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(%err, "accept on the registration socket failed");
                    continue;
                }
            },
        };
        let node = node.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(err) = Connection::run(node, stream, shutdown).await {
                tracing::debug!(%err, "control connection ended");
            }
        });
    }
}

/// One control connection, before and after it registers an endpoint.
struct Connection {
    node: Arc<Node>,
    lines: FramedRead<tokio::net::unix::OwnedReadHalf, LinesCodec>,
    replies: mpsc::Sender<Reply>,
    pid: i32,
    uid: u32,
}

/// Why a connection ended early.
#[derive(Debug, thiserror::Error)]
enum ConnectionError {
    #[error("read control line: {0}")]
    Read(#[from] tokio_util::codec::LinesCodecError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("peer closed the connection")]
    Closed,
}

impl Connection {
    async fn run(
        node: Arc<Node>,
        stream: UnixStream,
        shutdown: CancellationToken,
    ) -> Result<(), ConnectionError> {
        let cred = stream.peer_cred()?;
        let (pid, uid) = (cred.pid().unwrap_or(0), cred.uid());
        tracing::debug!(pid, uid, "control connection");
        let (read, mut write) = stream.into_split();
        let lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
        let (replies, replies_rx) = mpsc::channel(REPLY_QUEUE);
        let mut conn = Connection {
            node,
            lines,
            replies,
            pid,
            uid,
        };

        // The first request decides what the connection is.
        let first = conn.next_request().await?;
        match first {
            Ok(Request::Register {
                id,
                job,
                role,
                endpoint,
            }) => {
                let registered = conn.register(&mut write, id, job, role, endpoint).await?;
                let Some((endpoint, incarnation, desc_socket, desc_rx)) = registered else {
                    return Ok(());
                };
                let ep_shutdown = shutdown.child_token();
                tokio::spawn(write_replies(write, replies_rx));
                let mut descriptors = tokio::spawn(serve_descriptors(
                    conn.node.clone(),
                    endpoint,
                    desc_socket,
                    desc_rx,
                    ep_shutdown.clone(),
                ));
                let result = conn.serve_endpoint(endpoint, &ep_shutdown).await;
                // A process that sends and exits closes both sockets at once:
                // judge what it wrote before forgetting it, within reason.
                if tokio::time::timeout(DRAIN_GRACE, &mut descriptors)
                    .await
                    .is_err()
                {
                    ep_shutdown.cancel();
                    let _ = descriptors.await;
                }
                ep_shutdown.cancel();
                conn.node.unregister(endpoint, incarnation);
                result
            }
            other => {
                tokio::spawn(write_replies(write, replies_rx));
                conn.answer_unregistered(other).await;
                while !shutdown.is_cancelled() {
                    let request = tokio::select! {
                        _ = shutdown.cancelled() => break,
                        request = conn.next_request() => request?,
                    };
                    conn.answer_unregistered(request).await;
                }
                Ok(())
            }
        }
    }

    /// Reads one request; `Err` inside means a line that is not one.
    async fn next_request(&mut self) -> Result<Result<Request, String>, ConnectionError> {
        let line = self.lines.next().await.ok_or(ConnectionError::Closed)??;
        Ok(serde_json::from_str(&line).map_err(|e| e.to_string()))
    }

    async fn reply(&self, reply: Reply) {
        // The writer only stops when the peer is gone; nothing to tell then.
        let _ = self.replies.send(reply).await;
    }

    async fn reply_error(&self, id: u64, code: ErrorCode, message: String) {
        self.reply(Reply::Error { id, code, message }).await;
    }

    async fn answer_unregistered(&self, request: Result<Request, String>) {
        match request {
            Ok(Request::Stats { id }) => {
                self.reply(Reply::Stats {
                    id,
                    stats: self.node.stats(),
                })
                .await
            }
            Ok(other) => {
                let message = "register an endpoint first, or ask for stats".to_owned();
                self.reply_error(request_id(&other), ErrorCode::InvalidRequest, message)
                    .await
            }
            Err(why) => self.reply_error(0, ErrorCode::InvalidRequest, why).await,
        }
    }

    /// Registers the endpoint and passes it its socket and arena. `None` when
    /// the node refused (the peer has been told why).
    async fn register(
        &mut self,
        write: &mut OwnedWriteHalf,
        id: u64,
        job: u32,
        role: String,
        endpoint: Option<u32>,
    ) -> Result<Option<Registered>, ConnectionError> {
        let (client, sidecar_end) = socket_pair()?;
        let client_port = client.local_addr()?.port();
        let (descriptors, desc_rx) = mpsc::unbounded_channel();
        let link = EndpointLink {
            descriptors,
            notices: self.replies.clone(),
        };
        let registration = Registration {
            job,
            role,
            endpoint,
            pid: self.pid,
            uid: self.uid,
            client_port,
            client: client.as_fd(),
            link,
        };
        let registered = match self.node.register(registration) {
            Ok(registered) => registered,
            Err(err) => {
                let line = reply_line(&Reply::Error {
                    id,
                    code: err.code,
                    message: err.message,
                });
                write.write_all(line.as_bytes()).await?;
                return Ok(None);
            }
        };

        let reply = Reply::Registered {
            id,
            endpoint: registered.endpoint,
            job,
            arena_bytes: registered.arena_bytes,
            dataplane: self.node.routes().dataplane().as_str().to_owned(),
        };
        let fds = [client.as_raw_fd(), registered.arena_fd.as_raw_fd()];
        let sent = send_with_fds(write, reply_line(&reply).as_bytes(), &fds).await;
        // Our copies close here: the endpoint's process now owns its socket,
        // so the kernel closes it, and the sidecar sees EOF, when it dies.
        drop(client);
        drop(registered.arena_fd);
        if let Err(err) = sent {
            self.node
                .unregister(registered.endpoint, registered.incarnation);
            return Err(err.into());
        }
        let sidecar_end = tokio::net::TcpStream::from_std(sidecar_end)?;
        Ok(Some((
            registered.endpoint,
            registered.incarnation,
            sidecar_end,
            desc_rx,
        )))
    }

    async fn serve_endpoint(
        &mut self,
        endpoint: u32,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnectionError> {
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                request = self.next_request() => request?,
            };
            match request {
                Ok(Request::Alloc { id, len }) => {
                    self.reply(granted(id, self.node.alloc(endpoint, len)))
                        .await
                }
                Ok(Request::Share { id, slot, gen }) => {
                    self.reply(granted(id, self.node.share(endpoint, slot, gen)))
                        .await
                }
                Ok(Request::Release { refs }) => {
                    let refs = &refs[..refs.len().min(MAX_RELEASE_BATCH)];
                    self.node.release(endpoint, refs);
                }
                Ok(Request::Stats { id }) => {
                    self.reply(Reply::Stats {
                        id,
                        stats: self.node.stats(),
                    })
                    .await
                }
                Ok(Request::Register { id, .. }) => {
                    let message = "this connection already registered an endpoint".to_owned();
                    self.reply_error(id, ErrorCode::InvalidRequest, message)
                        .await;
                }
                Err(why) => self.reply_error(0, ErrorCode::InvalidRequest, why).await,
            }
        }
    }
}

type Registered = (
    u32,
    u64,
    tokio::net::TcpStream,
    mpsc::UnboundedReceiver<Descriptor>,
);

/// The answer to a request for a buffer reference.
fn granted(id: u64, result: Result<Grant, NodeError>) -> Reply {
    match result {
        Ok(grant) => Reply::Granted { id, grant },
        Err(err) => Reply::Error {
            id,
            code: err.code,
            message: err.message,
        },
    }
}

fn request_id(request: &Request) -> u64 {
    match request {
        Request::Register { id, .. }
        | Request::Alloc { id, .. }
        | Request::Share { id, .. }
        | Request::Stats { id } => *id,
        Request::Release { .. } => 0,
    }
}

fn reply_line(reply: &Reply) -> String {
    let mut line = serde_json::to_string(reply).expect("replies always serialise");
    line.push('\n');
    line
}

async fn write_replies(mut write: OwnedWriteHalf, mut replies: mpsc::Receiver<Reply>) {
    while let Some(reply) = replies.recv().await {
        if write
            .write_all(reply_line(&reply).as_bytes())
            .await
            .is_err()
        {
            return;
        }
    }
}

/// A connected loopback TCP pair: (client end, sidecar end).
fn socket_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let expected: SocketAddr = client.local_addr()?;
    // The ephemeral listener is reachable by any local process for a moment:
    // accept only the connection we made.
    loop {
        let (sidecar_end, peer) = listener.accept()?;
        if peer == expected {
            for socket in [&client, &sidecar_end] {
                socket.set_nodelay(true)?;
            }
            client.set_nonblocking(false)?;
            sidecar_end.set_nonblocking(true)?;
            return Ok((client, sidecar_end));
        }
        tracing::warn!(%peer, "unexpected connection to a pairing listener dropped");
    }
}

/// Writes `bytes` with `fds` attached by `SCM_RIGHTS`.
async fn send_with_fds(write: &OwnedWriteHalf, bytes: &[u8], fds: &[i32]) -> std::io::Result<()> {
    let stream: &UnixStream = write.as_ref();
    let mut sent = 0;
    while sent < bytes.len() {
        stream.writable().await?;
        let rights = [ControlMessage::ScmRights(fds)];
        // The descriptors ride with the first byte only.
        let cmsgs: &[ControlMessage<'_>] = if sent == 0 { &rights } else { &[] };
        let iov = [std::io::IoSlice::new(&bytes[sent..])];
        match stream.try_io(tokio::io::Interest::WRITABLE, || {
            sendmsg::<()>(
                stream.as_raw_fd(),
                &iov,
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            )
            .map_err(std::io::Error::from)
        }) {
            Ok(n) => sent += n,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Serves the sidecar's end of one endpoint's descriptor socket.
async fn serve_descriptors(
    node: Arc<Node>,
    endpoint: u32,
    socket: tokio::net::TcpStream,
    outbound: mpsc::UnboundedReceiver<Descriptor>,
    shutdown: CancellationToken,
) {
    let (read, write) = socket.into_split();
    let writer = tokio::spawn(write_descriptors(write, outbound, shutdown.clone()));
    tokio::select! {
        _ = shutdown.cancelled() => {}
        result = read_descriptors(&node, endpoint, read) => {
            if let Err(err) = result {
                tracing::debug!(endpoint, %err, "descriptor socket read failed");
            }
        }
    }
    // Closing our end tells the endpoint the sidecar is done with it.
    shutdown.cancel();
    let _ = writer.await;
}

/// Judges everything that arrives on the sidecar's end, one descriptor at a
/// time, until the endpoint closes its end.
async fn read_descriptors(
    node: &Node,
    endpoint: u32,
    mut read: tokio::net::tcp::OwnedReadHalf,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; DESC_SIZE * 256];
    let mut filled = 0;
    loop {
        let n = if filled == 0 {
            read.read(&mut buf[filled..]).await?
        } else {
            match tokio::time::timeout(SHORT_GRACE, read.read(&mut buf[filled..])).await {
                Ok(n) => n?,
                Err(_) => {
                    // The stream is out of step: nothing after this can be
                    // framed, so the endpoint is closed rather than misread.
                    node.refuse_short(endpoint);
                    tracing::warn!(
                        endpoint,
                        "partial descriptor; closing the endpoint's socket"
                    );
                    return Ok(());
                }
            }
        };
        if n == 0 {
            if filled > 0 {
                node.refuse_short(endpoint);
            }
            return Ok(());
        }
        filled += n;

        let whole = filled - filled % DESC_SIZE;
        for raw in buf[..whole].chunks_exact(DESC_SIZE) {
            if let Verdict::Forward(desc, link) = node.judge(endpoint, raw) {
                // A destination that has just gone drops it with its
                // receiver; the orphan sweep frees the reference.
                let _ = link.descriptors.send(desc);
            }
        }
        buf.copy_within(whole..filled, 0);
        filled -= whole;
    }
}

/// Writes descriptors the sidecar routed to this endpoint, batching what is
/// queued.
///
/// LIMITATION: on the kernel path an endpoint's socket receives both the
/// kernel's redirects and, rarely, descriptors the sidecar forwards itself (a
/// destination that registered between the kernel's miss and the sidecar's
/// look). If a forwarded batch were split by TCP and a redirect landed
/// between its halves, the receiver would read one descriptor out of step
/// and report a protocol error. Batches are at most 4 KiB on loopback, so no
/// split has been seen; forwarding through the kernel (re-sending on the
/// destination's behalf) or a second socket per endpoint would rule it out.
async fn write_descriptors(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    mut outbound: mpsc::UnboundedReceiver<Descriptor>,
    shutdown: CancellationToken,
) {
    let mut batch = Vec::with_capacity(DESC_SIZE * 64);
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = outbound.recv() => match next {
                Some(desc) => desc,
                None => return,
            },
        };
        batch.clear();
        batch.extend_from_slice(first.as_bytes());
        while batch.len() < batch.capacity() {
            match outbound.try_recv() {
                Ok(desc) => batch.extend_from_slice(desc.as_bytes()),
                Err(_) => break,
            }
        }
        // An endpoint that stops reading must not hold this task past the
        // endpoint's end.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            written = write.write_all(&batch) => if written.is_err() { return },
        }
    }
}

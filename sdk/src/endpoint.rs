//! An endpoint registered with its node's sidecar: the control connection
//! that allocates and releases buffers, and the descriptor socket that sends
//! and receives them by reference.
//!
//! One background task owns the control socket: it writes requests
//! (batching releases, so dropping a buffer never waits), routes answers back
//! to their callers, and queues the sidecar's refusal notices. The descriptor
//! socket has no task of its own: [`Endpoint::recv`] reads whole 64-byte
//! descriptors from it directly, so a delivery costs no extra hand-off.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::StreamExt;
use lifl_proto::arena::ArenaMap;
use lifl_proto::control::{Grant, Reply, Request, MAX_LINE_BYTES, MAX_RELEASE_BATCH};
use lifl_proto::descriptor::{Descriptor, DESC_MAGIC, DESC_SIZE, DESC_VERSION};
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::buffer::{BufferMut, HeldRef, Sendable, Update, UpdateMeta};
use crate::error::SdkError;

/// Refusal notices kept for [`Endpoint::recv`]; once this many wait unread,
/// newer ones are dropped rather than kept in memory (the sidecar counts
/// every refusal).
const MAX_QUEUED_NOTICES: usize = 1024;

/// What to register as.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The sidecar's registration socket.
    pub socket: PathBuf,
    /// Job the endpoint works for (not 0).
    pub job: u32,
    /// Role, for the sidecar's logs (`leaf`, `middle`, `top`, ...).
    pub role: String,
    /// Endpoint id to take, as the control plane assigned it; `None` lets
    /// the sidecar pick one.
    pub endpoint: Option<u32>,
}

impl Registration {
    /// A registration for `job` as `role` with a sidecar-chosen id.
    pub fn new(socket: impl Into<PathBuf>, job: u32, role: impl Into<String>) -> Self {
        Self {
            socket: socket.into(),
            job,
            role: role.into(),
            endpoint: None,
        }
    }

    /// Asks for a specific endpoint id.
    pub fn with_endpoint(mut self, endpoint: u32) -> Self {
        self.endpoint = Some(endpoint);
        self
    }
}

/// State the endpoint's handles and background tasks share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) arena: ArenaMap,
    /// Requests to the control task; `None` for the answer means no answer
    /// is expected.
    control: mpsc::UnboundedSender<Outgoing>,
}

#[derive(Debug)]
enum Outgoing {
    Ask(Request, u64, oneshot::Sender<Reply>),
    Release(u32, u32),
}

impl Shared {
    /// Gives a reference back without waiting; the control task batches.
    pub(crate) fn release(&self, slot: u32, gen: u32) {
        // After the control task ends the sidecar has released everything
        // this endpoint held, so a lost release loses nothing.
        let _ = self.control.send(Outgoing::Release(slot, gen));
    }
}

/// An endpoint of a job on this node, registered with the sidecar.
///
/// Every method takes `&self`: one task may receive while others send.
/// Dropping the endpoint unregisters it, and the sidecar then reclaims every
/// buffer it held: keep the endpoint alive as long as its buffers and
/// updates are in use.
#[derive(Debug)]
pub struct Endpoint {
    id: u32,
    job: u32,
    dataplane: String,
    shared: Arc<Shared>,
    next_request: AtomicU64,
    next_seq: AtomicU32,
    writer: tokio::sync::Mutex<Outbox>,
    inbox: tokio::sync::Mutex<Inbox>,
}

/// The sending side: the descriptor socket and whatever bytes of committed
/// descriptors it has not taken yet.
#[derive(Debug)]
struct Outbox {
    socket: tokio::net::tcp::OwnedWriteHalf,
    /// Bytes of descriptors already committed but not yet written: a send
    /// cancelled mid-write leaves its tail here, and the next send writes it
    /// first, so the stream never carries part of a descriptor.
    unwritten: Vec<u8>,
}

impl Outbox {
    async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.unwritten.extend_from_slice(bytes);
        while !self.unwritten.is_empty() {
            // `write` is cancel-safe: what it took is gone from the buffer.
            let n = self.socket.write(&self.unwritten).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            self.unwritten.drain(..n);
        }
        Ok(())
    }
}

/// The receiving side: the descriptor socket and the refusal notices.
#[derive(Debug)]
struct Inbox {
    socket: tokio::net::tcp::OwnedReadHalf,
    /// Bytes read but not yet taken; whole descriptors are taken first.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Refusals and protocol errors from the control task.
    notices: mpsc::Receiver<SdkError>,
    /// The sidecar closed the descriptor socket; only notices remain.
    drained: bool,
}

impl Endpoint {
    /// Registers with the sidecar at `registration.socket` and maps the job's
    /// arena.
    pub async fn register(registration: Registration) -> Result<Self, SdkError> {
        let path = registration.socket.clone();
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(|source| SdkError::Connect {
                path: path.clone(),
                source,
            })?;

        let request = Request::Register {
            id: 1,
            job: registration.job,
            role: registration.role,
            endpoint: registration.endpoint,
        };
        stream.write_all(request_line(&request).as_bytes()).await?;
        let (line, fds) = read_line_with_fds(&stream).await?;
        let (id, job, dataplane) = match parse_reply(&line)? {
            Reply::Registered {
                endpoint,
                job,
                dataplane,
                ..
            } => (endpoint, job, dataplane),
            Reply::Error { code, message, .. } => return Err(SdkError::Rejected { code, message }),
            other => return Err(SdkError::Protocol(format!("unexpected reply {other:?}"))),
        };
        let [socket_fd, arena_fd]: [OwnedFd; 2] = fds.try_into().map_err(|fds: Vec<OwnedFd>| {
            SdkError::Protocol(format!(
                "registration carried {} fds, expected 2",
                fds.len()
            ))
        })?;

        let arena = ArenaMap::open(arena_fd.as_fd(), Some(job))
            .map_err(|err| SdkError::Protocol(format!("arena: {err}")))?;
        drop(arena_fd);
        let socket = std::net::TcpStream::from(socket_fd);
        socket.set_nonblocking(true)?;
        let (read, write) = TcpStream::from_std(socket)?.into_split();

        let (control, control_rx) = mpsc::unbounded_channel();
        let give_back = control.downgrade();
        let shared = Arc::new(Shared { arena, control });
        let (notices_tx, notices) = mpsc::channel(MAX_QUEUED_NOTICES);
        tokio::spawn(run_control(stream, control_rx, give_back, notices_tx));
        let inbox = Inbox {
            socket: read,
            buf: vec![0u8; DESC_SIZE * 256].into_boxed_slice(),
            start: 0,
            end: 0,
            notices,
            drained: false,
        };

        Ok(Self {
            id,
            job,
            dataplane,
            shared,
            next_request: AtomicU64::new(2),
            next_seq: AtomicU32::new(1),
            writer: tokio::sync::Mutex::new(Outbox {
                socket: write,
                unwritten: Vec::new(),
            }),
            inbox: tokio::sync::Mutex::new(inbox),
        })
    }

    /// This endpoint's id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The job it works for.
    pub fn job(&self) -> u32 {
        self.job
    }

    /// Size of the job's arena in bytes, header included.
    pub fn arena_bytes(&self) -> u64 {
        self.shared.arena.len()
    }

    /// The node's data path: `sk_msg` or `userspace`. Nothing else differs.
    pub fn dataplane(&self) -> &str {
        &self.dataplane
    }

    /// Allocates a buffer of `len` bytes in the job's arena, to be written in
    /// place and sent.
    ///
    /// Fails with a [`crate::Fault::Capacity`] error when the arena, the
    /// node's reference slots, or this endpoint's credit is used up; the same
    /// call succeeds once enough references are released.
    pub async fn alloc(&self, len: u64) -> Result<BufferMut, SdkError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let grant = self.ask_grant(Request::Alloc { id, len }, id).await?;
        // Its pages are about to be written: map them in one call.
        let _ = self
            .shared
            .arena
            .populate_for_write(grant.offset, grant.len);
        Ok(BufferMut {
            held: HeldRef::new(grant, self.shared.clone()),
        })
    }

    /// Takes one more reference to the buffer of a received update, so it can
    /// be kept or passed on while the original is forwarded elsewhere.
    pub async fn share(&self, update: &Update) -> Result<Update, SdkError> {
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let grant = update.held.grant;
        let request = Request::Share {
            id,
            slot: grant.slot,
            gen: grant.gen,
        };
        let grant = self.ask_grant(request, id).await?;
        let mut desc = update.desc;
        (desc.ref_slot, desc.ref_gen) = (grant.slot, grant.gen);
        Ok(Update {
            held: HeldRef::new(grant, self.shared.clone()),
            desc,
        })
    }

    async fn ask_grant(&self, request: Request, id: u64) -> Result<Grant, SdkError> {
        match self.ask(request, id).await? {
            Reply::Granted { grant, .. } => {
                // A grant must name bytes of the arena: checked once here so
                // every later view of it is in bounds.
                self.shared
                    .arena
                    .check_range(grant.offset, grant.len)
                    .map_err(|err| SdkError::Protocol(format!("grant: {err}")))?;
                Ok(grant)
            }
            Reply::Error { code, message, .. } => Err(SdkError::Rejected { code, message }),
            other => Err(SdkError::Protocol(format!("unexpected reply {other:?}"))),
        }
    }

    async fn ask(&self, request: Request, id: u64) -> Result<Reply, SdkError> {
        let (tx, rx) = oneshot::channel();
        self.shared
            .control
            .send(Outgoing::Ask(request, id, tx))
            .map_err(|_| SdkError::Closed)?;
        rx.await.map_err(|_| SdkError::Closed)
    }

    /// Sends a buffer by reference to endpoint `dst` of the same job, and
    /// returns the descriptor's sequence number. The reference moves with it:
    /// `dst` now holds the buffer. A refusal arrives later through
    /// [`Endpoint::recv`] as [`SdkError::Refused`] with this number.
    pub async fn send(
        &self,
        dst: u32,
        buffer: impl Sendable,
        meta: UpdateMeta,
    ) -> Result<u32, SdkError> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let held = buffer.into_held().0;
        let grant = held.grant;
        let desc = Descriptor {
            dst,
            src: self.id,
            magic: DESC_MAGIC,
            version: DESC_VERSION,
            kind: meta.kind as u16,
            job: self.job,
            round: meta.round,
            ref_slot: grant.slot,
            ref_gen: grant.gen,
            offset: grant.offset,
            len: grant.len,
            samples: meta.samples,
            seq,
            updates: meta.updates,
        };
        let mut outbox = self.writer.lock().await;
        // Committed: the descriptor will be written whole, even if this
        // future is dropped, so the reference leaves this endpoint now.
        held.into_sent();
        outbox.write(desc.as_bytes()).await?;
        Ok(seq)
    }

    /// Writes raw bytes on the descriptor socket, bypassing every check of
    /// this SDK. Only for tests of how the kernel and the sidecar treat
    /// malformed input; real code uses [`Endpoint::send`].
    #[doc(hidden)]
    pub async fn write_raw_descriptor_bytes(&self, bytes: &[u8]) -> Result<(), SdkError> {
        self.writer.lock().await.write(bytes).await?;
        Ok(())
    }

    /// The reference a buffer carries, as `(slot, generation, offset, len)`;
    /// for tests that forge descriptors.
    #[doc(hidden)]
    pub fn reference_of(buffer: &BufferMut) -> (u32, u32, u64, u64) {
        let g = buffer.held.grant;
        (g.slot, g.gen, g.offset, g.len)
    }

    /// Waits for the next update sent to this endpoint, or for the next
    /// refusal of a descriptor it sent.
    pub async fn recv(&self) -> Result<Update, SdkError> {
        let mut inbox = self.inbox.lock().await;
        let Inbox {
            socket,
            buf,
            start,
            end,
            notices,
            drained,
        } = &mut *inbox;
        loop {
            if *end - *start >= DESC_SIZE {
                let raw = &buf[*start..*start + DESC_SIZE];
                *start += DESC_SIZE;
                return admit(raw, &self.shared);
            }
            if *drained {
                // Notices the sidecar sent before closing come first; the
                // control connection's end then reads as `Closed`.
                return Err(notices.recv().await.unwrap_or(SdkError::Closed));
            }
            // Keep a partial descriptor at the front, with room behind it.
            buf.copy_within(*start..*end, 0);
            (*start, *end) = (0, *end - *start);

            // Both futures are cancel-safe: nothing is lost to the loser.
            tokio::select! {
                biased;
                notice = notices.recv() => return Err(notice.unwrap_or(SdkError::Closed)),
                read = socket.read(&mut buf[*end..]) => match read? {
                    0 => *drained = true,
                    n => *end += n,
                },
            }
        }
    }
}

/// Reads the registration answer and the fds that ride with it.
async fn read_line_with_fds(stream: &UnixStream) -> Result<(String, Vec<OwnedFd>), SdkError> {
    let mut line = Vec::new();
    let mut fds = Vec::new();
    let mut buf = [0u8; 4096];
    while !line.contains(&b'\n') {
        if line.len() > MAX_LINE_BYTES {
            return Err(SdkError::Protocol("registration answer too long".into()));
        }
        stream.readable().await?;
        let read = stream.try_io(tokio::io::Interest::READABLE, || {
            recv_with_fds(stream.as_raw_fd(), &mut buf, &mut fds)
        });
        match read {
            Ok(0) => return Err(SdkError::Closed),
            Ok(n) => line.extend_from_slice(&buf[..n]),
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(err) => return Err(err.into()),
        }
    }
    let line = String::from_utf8(line).map_err(|_| SdkError::Protocol("non-UTF-8 reply".into()))?;
    Ok((line, fds))
}

fn recv_with_fds(fd: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> std::io::Result<usize> {
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these fds in this process
            // for this message; nothing else owns them.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok(msg.bytes)
}

fn request_line(request: &Request) -> String {
    let mut line = serde_json::to_string(request).expect("requests always serialise");
    line.push('\n');
    line
}

fn parse_reply(line: &str) -> Result<Reply, SdkError> {
    serde_json::from_str(line.trim_end()).map_err(|err| SdkError::Protocol(format!("reply: {err}")))
}

/// Owns the control socket: writes requests and releases, routes replies.
async fn run_control(
    stream: UnixStream,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    give_back: mpsc::WeakUnboundedSender<Outgoing>,
    notices: mpsc::Sender<SdkError>,
) {
    let (read, mut write) = stream.into_split();
    let pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>> = Arc::default();
    let reader = tokio::spawn(route_replies(read, pending.clone(), give_back, notices));

    let mut out = String::new();
    let mut releases = Vec::new();
    while let Some(first) = outgoing.recv().await {
        // Drain what is queued: many drops become one release line.
        let mut next = Some(first);
        while let Some(item) = next.take().or_else(|| outgoing.try_recv().ok()) {
            match item {
                Outgoing::Ask(request, id, answer) => {
                    // Releases queued before a request reach the sidecar
                    // before it: an allocation may need their room.
                    if !releases.is_empty() {
                        let refs = std::mem::take(&mut releases);
                        out.push_str(&request_line(&Request::Release { refs }));
                    }
                    pending
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, answer);
                    out.push_str(&request_line(&request));
                }
                Outgoing::Release(slot, gen) => releases.push((slot, gen)),
            }
            if releases.len() == MAX_RELEASE_BATCH || out.len() > 64 * 1024 {
                break;
            }
        }
        if !releases.is_empty() {
            let refs = std::mem::take(&mut releases);
            out.push_str(&request_line(&Request::Release { refs }));
        }
        if write.write_all(out.as_bytes()).await.is_err() {
            break;
        }
        out.clear();
    }
    // Dropping the write half tells the sidecar this endpoint is gone.
    drop(write);
    reader.abort();
}

/// Routes each reply to its caller. A grant whose caller has gone (its
/// future was dropped while it waited) is released at once, or it would stay
/// allocated until the endpoint leaves.
async fn route_replies(
    read: tokio::net::unix::OwnedReadHalf,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    give_back: mpsc::WeakUnboundedSender<Outgoing>,
    notices: mpsc::Sender<SdkError>,
) {
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(MAX_LINE_BYTES));
    while let Some(Ok(line)) = lines.next().await {
        let reply = match parse_reply(&line) {
            Ok(reply) => reply,
            Err(err) => {
                let _ = notices.try_send(err);
                continue;
            }
        };
        let id = match &reply {
            Reply::Refused { seq, dst, reason } => {
                let refused = SdkError::Refused {
                    seq: *seq,
                    dst: *dst,
                    reason: *reason,
                };
                let _ = notices.try_send(refused);
                continue;
            }
            Reply::Registered { id, .. }
            | Reply::Granted { id, .. }
            | Reply::Stats { id, .. }
            | Reply::Error { id, .. } => *id,
        };
        let answer = pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        match answer {
            Some(answer) => {
                if let Err(Reply::Granted { grant, .. }) = answer.send(reply) {
                    if let Some(control) = give_back.upgrade() {
                        let _ = control.send(Outgoing::Release(grant.slot, grant.gen));
                    }
                }
            }
            None => {
                let _ = notices.try_send(SdkError::Protocol(format!("unasked reply {reply:?}")));
            }
        }
    }
    // Pending callers see their answer channel close: `SdkError::Closed`.
    pending.lock().unwrap_or_else(|e| e.into_inner()).clear();
    // Waits for room: the end of the connection must not be lost.
    let _ = notices.send(SdkError::Closed).await;
}

/// Turns 64 received bytes into an update, or says why they are not one.
fn admit(raw: &[u8], shared: &Arc<Shared>) -> Result<Update, SdkError> {
    let desc = Descriptor::parse(raw).map_err(|err| SdkError::Protocol(err.to_string()))?;
    let grant = Grant {
        slot: desc.ref_slot,
        gen: desc.ref_gen,
        offset: desc.offset,
        len: desc.len,
    };
    let held = HeldRef::new(grant, shared.clone());
    // The kernel and the sidecar both check ranges; a mapping is never read
    // out of bounds even if they did not.
    if let Err(err) = shared.arena.check_range(desc.offset, desc.len) {
        return Err(SdkError::Protocol(format!(
            "descriptor {}: {err}",
            desc.seq
        )));
    }
    Ok(Update { held, desc })
}

/// Asks a sidecar for its state without registering an endpoint.
pub async fn stats(socket: &Path) -> Result<lifl_proto::control::SidecarStats, SdkError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| SdkError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    write
        .write_all(request_line(&Request::Stats { id: 1 }).as_bytes())
        .await?;
    let mut lines = FramedRead::new(read, LinesCodec::new_with_max_length(16 << 20));
    let line = lines
        .next()
        .await
        .ok_or(SdkError::Closed)?
        .map_err(|err| SdkError::Protocol(err.to_string()))?;
    match parse_reply(&line)? {
        Reply::Stats { stats, .. } => Ok(stats),
        Reply::Error { code, message, .. } => Err(SdkError::Rejected { code, message }),
        other => Err(SdkError::Protocol(format!("unexpected reply {other:?}"))),
    }
}

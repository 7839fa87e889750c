//! The task protocol: requests and their answers as length-prefixed CBOR
//! frames on streams that are kept open and reused.
//!
//! A requester holds a small pool of idle streams to each host. A request
//! takes one (or opens one), writes one frame, reads one frame back, and
//! returns the stream to the pool; concurrent requests use separate streams,
//! so a long task or a large answer holds up no other. Compared with a
//! fresh stream per request (libp2p's request-response), a task costs no
//! stream set-up, protocol negotiation or close: one write each way on the
//! connection instead of four.
//!
//! A host accepts a stream by writing one byte ([`ACCEPTED`]), then serves
//! it in a loop: read a request frame, hand it to the daemon, write the
//! answer frame. Bounds: a frame's length is
//! checked against the message type's `MAX_BYTES` before anything is read
//! (an oversized one closes the stream); a request's body holds the
//! node-wide read budget while it arrives and must arrive within
//! [`REQUEST_READ_TIMEOUT`](crate::codec::REQUEST_READ_TIMEOUT), at most
//! [`MAX_WAITING_PER_PEER`](crate::codec::MAX_WAITING_PER_PEER) of a
//! peer's requests, and [`MAX_WAITING`](crate::codec::MAX_WAITING) of all
//! peers', waiting for their turn; a peer may hold at most
//! [`MAX_STREAMS_PER_PEER`] task streams open on this node; a stream is
//! read while its task runs and while its answer is written, and a byte
//! then closes it; an answer must be
//! taken within its deadline ([`ANSWER_GRACE`], [`ANSWER_MIN_RATE`]), and
//! holds the room the daemon reserved for it in the node's answer budget
//! ([`crate::answers`]) until it is written.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::{PeerId, Stream, StreamProtocol};
use libp2p_stream::{Control, IncomingStreams, OpenStreamError};
use spare_core::Limits;
use spare_core::wire::{self, Message, Refusal, TaskRequest, TaskResponse, WireError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::answers::{AnswerBudget, AnswerRoom};
use crate::codec::{PEER_READ_BYTES, PeerBudget, REQUEST_READ_TIMEOUT, ReadBudget};
use crate::{NetEvent, RequestError, TaskResponder};

/// Bytes of the length prefix of every frame (big-endian `u32`).
const HEADER_BYTES: usize = 4;
/// The byte a host writes first on every task stream it accepts. libp2p
/// drops an inbound stream that arrives while its queue of streams not yet
/// taken is full (`libp2p_stream::ACCEPT_BUFFER`), and the host drops one
/// beyond `MAX_STREAMS`; a requester that sees its new stream end before
/// this byte knows the host never read its request, and opens another.
const ACCEPTED: u8 = 0x01;
/// How many times a requester opens a new stream that the host dropped
/// before accepting it, pausing up to twice as long each time (4 ms, up
/// to [`OPEN_PAUSE_MAX`]): at most about 0.85 s in all, for a host too
/// busy to take its streams at once. Streams dropped in a burst would
/// come back together, so each pause is drawn at random up to its bound,
/// which spreads their next tries apart.
const OPEN_ATTEMPTS: u32 = 10;
const OPEN_PAUSE_MAX: Duration = Duration::from_millis(200);
/// An outbound task request may take this long: the longest wall time any
/// host grants, plus compile time. Requesters apply their own, tighter,
/// per-task deadline on top.
const TASK_REQUEST_TIMEOUT: Duration = Duration::from_millis(Limits::MAX.wall_ms + 10 * 60 * 1000);
/// A request's body is read through a buffer of this size, so a stream
/// whose header announced a large request holds no more until bytes come;
/// its first read, before the request is admitted, goes to a buffer of
/// [`FIRST_READ`] bytes on the stack (all of a typical request).
const READ_SCRATCH: usize = 16 << 10;
const FIRST_READ: usize = 512;
/// A requester must take an answer within [`ANSWER_GRACE`] and a second
/// for each [`ANSWER_MIN_RATE`] bytes of it (64 KiB/s: half the lowest
/// bandwidth limit, as for blob fetches), or the host drops the stream
/// and the answer with it.
const ANSWER_GRACE: Duration = Duration::from_secs(30);
const ANSWER_MIN_RATE: usize = 64 << 10;
/// Idle streams a requester keeps per host, and over all hosts; more are
/// closed when done. An idle stream is not read, so a host could fill its
/// window (256 KiB to start): the second bound keeps that node-wide.
const MAX_IDLE_PER_PEER: usize = 64;
const MAX_IDLE: usize = 256;
/// Inbound task streams one peer may hold open on this node; more are
/// dropped as they arrive. It bounds the tasks a peer can have in flight
/// here (a task whose stream closes before its answer is cancelled), as
/// the host's queue does again.
pub(crate) const MAX_STREAMS_PER_PEER: usize = 256;
/// Inbound task streams of all peers open at once. Each is a task of its
/// own with a little state. At the bound a new stream takes the place of a
/// stream of the peer that holds the most, if that peer holds more than the
/// newcomer's would; else it is dropped. The stream that goes is that
/// peer's oldest idle one (waiting for its next request) or, if none is
/// idle, the one whose request has been arriving longest: a header alone
/// would otherwise shield a stream for as long as its body may take. So
/// peers that open streams only to hold them (a few identities could hold
/// all of them) cannot keep out another requester.
pub(crate) const MAX_STREAMS: usize = 4096;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {len} bytes exceeds the bound of {max}")]
    TooLarge { len: usize, max: usize },
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("cannot open a stream: {0}")]
    Open(RequestError),
    #[error("closed before its request had come, to make room for another peer's stream")]
    Evicted,
}

/// The length a frame header announces, if it is within `max`.
pub(crate) fn frame_len(header: [u8; HEADER_BYTES], max: usize) -> Result<usize, FrameError> {
    let len = usize::try_from(u32::from_be_bytes(header)).unwrap_or(usize::MAX);
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(len)
}

/// Encodes `msg` as one frame: length prefix, then CBOR.
pub(crate) fn encode_frame<M: Message>(msg: &M) -> Result<Vec<u8>, WireError> {
    let body = wire::encode(msg)?;
    let len = u32::try_from(body.len()).map_err(|_| WireError::TooLarge {
        size: body.len(),
        max: M::MAX_BYTES,
    })?;
    let mut frame = Vec::with_capacity(HEADER_BYTES + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    Ok(frame)
}

/// Reads a frame header; `None` if the stream ended cleanly before one.
async fn read_header<T: AsyncRead + Unpin>(io: &mut T) -> io::Result<Option<[u8; HEADER_BYTES]>> {
    let mut header = [0u8; HEADER_BYTES];
    let mut filled = 0;
    while filled < HEADER_BYTES {
        match io.read(&mut header[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => filled += n,
        }
    }
    Ok(Some(header))
}

/// Reads one whole frame body of at most `max` bytes. Used for answers,
/// which are bounded by our own requests in flight.
async fn read_frame<T: AsyncRead + Unpin>(io: &mut T, max: usize) -> Result<Vec<u8>, FrameError> {
    let header = read_header(io)
        .await?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    let len = frame_len(header, max)?;
    let mut body = vec![0u8; len];
    io.read_exact(&mut body).await?;
    Ok(body)
}

/// The largest answer `request` can honestly get: what its task can
/// produce, or a cancel's acknowledgement. A host cannot make us read more
/// than we asked for.
fn answer_bound(request: &TaskRequest) -> usize {
    match request {
        TaskRequest::Run(spec) => TaskResponse::bound_for(&spec.limits),
        TaskRequest::Cancel(_) => TaskResponse::SMALL_BYTES,
    }
}

/// A request's body as it came; or, where the node could not take it in
/// (the peer's turns to wait, or the node's budget, were all taken), why
/// not. Its bytes were then read and dropped, holding nothing, so the
/// stream stays in step and the requester is told to come back later
/// rather than finding its stream cut off.
enum Body {
    Read(Vec<u8>),
    NoRoom(io::Error),
}

/// Reads the body of an inbound request of `len` bytes (already checked
/// against its bound), within [`REQUEST_READ_TIMEOUT`].
///
/// Once its first byte has come, the request takes its whole length from
/// the peer's share, waiting its turn behind the peer's other requests;
/// the memory its body then takes, as bytes arrive, comes from the node's
/// budget. A header alone, or a trickle, holds next to nothing of the
/// node's (and, once admitted, the [`READ_SCRATCH`] buffer), so a peer must really send
/// what it would have the node hold. The body's first piece may wait for
/// the node's budget; a body that holds some and needs more than is free
/// is refused at once, so requests holding parts of the budget never wait
/// on one another. A body the node has no room for (see [`Body`]) is read
/// and dropped.
async fn read_request_body<T: AsyncRead + Unpin>(
    io: &mut T,
    len: usize,
    budget: &PeerBudget,
) -> io::Result<Body> {
    let read = async {
        // The first bytes land in a small buffer of the stream's own: one
        // that announced a request and sent nothing more holds no other.
        let mut first = [0u8; FIRST_READ];
        let mut scratch = Vec::new();
        let mut body: Vec<u8> = Vec::new();
        let mut admitted: Option<OwnedSemaphorePermit> = None;
        // One permit for the memory the request takes (its body, and the
        // buffer it is read through), grown with it: a trickle of single
        // bytes costs no more to track than one large read.
        let mut held: Option<OwnedSemaphorePermit> = None;
        while body.len() < len {
            let unbuffered = scratch.is_empty();
            let into: &mut [u8] = if unbuffered { &mut first } else { &mut scratch };
            let want = into.len().min(len - body.len());
            let n = io.read(&mut into[..want]).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if admitted.is_none() {
                match budget.admit(len).await {
                    Ok(admitted_now) => admitted = Some(admitted_now),
                    Err(why) => return skip(io, len - body.len() - n, why).await,
                }
            }
            // The body's memory, and (while more is to come) the buffer it
            // is read through, charged together: the first charge, which
            // may wait, covers both.
            let filled = body.len() + n;
            let grown = if filled > body.capacity() {
                (body.capacity() * 2).max(filled).max(READ_SCRATCH).min(len)
            } else {
                body.capacity()
            };
            let buffer = if unbuffered && filled < len {
                READ_SCRATCH.min(len - filled)
            } else {
                0
            };
            let more = grown - body.capacity() + buffer;
            if more > 0
                && let Err(why) = hold_more(budget, &mut held, more).await
            {
                let rest = len - body.len() - n;
                drop((body, scratch, held, admitted));
                return skip(io, rest, why).await;
            }
            body.reserve_exact(grown - body.len());
            body.extend_from_slice(&into[..n]);
            if buffer > 0 {
                scratch = vec![0u8; buffer];
            }
        }
        Ok(Body::Read(body))
    };
    tokio::time::timeout(REQUEST_READ_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request not received in time"))?
}

/// Reads and drops the `rest` of a body the node has no room for, through
/// a buffer on the stack; then says why it had none.
async fn skip<T: AsyncRead + Unpin>(
    io: &mut T,
    mut rest: usize,
    why: io::Error,
) -> io::Result<Body> {
    let mut sink = [0u8; FIRST_READ];
    while rest > 0 {
        let want = rest.min(sink.len());
        match io.read(&mut sink[..want]).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => rest -= n,
        }
    }
    Ok(Body::NoRoom(why))
}

/// Adds `bytes` of the node's read budget to what a request holds: its
/// first piece may wait; more is taken only if free now, so requests that
/// hold parts of the budget never wait on one another.
async fn hold_more(
    budget: &PeerBudget,
    held: &mut Option<OwnedSemaphorePermit>,
    bytes: usize,
) -> io::Result<()> {
    match held {
        Some(held) => held.merge(budget.node().try_acquire(bytes)?),
        None => *held = Some(budget.node().acquire(bytes).await?),
    }
    Ok(())
}

async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, frame: &[u8]) -> io::Result<()> {
    io.write_all(frame).await?;
    io.flush().await
}

/// The requester's side: pooled streams to each host.
pub(crate) struct TaskStreams {
    control: Control,
    protocol: StreamProtocol,
    idle: Mutex<Idle>,
    /// Per host, the bytes of requests this node may be sending to it at
    /// once: the host's share for one peer ([`PEER_READ_BYTES`]). A host
    /// reads that much of a peer's requests at a time, lets a few more
    /// wait and refuses the rest as overloaded; a burst of large requests
    /// waits here instead. An entry lives while requests to its host are
    /// being sent ([`Sending`]).
    sending: Mutex<HashMap<PeerId, Arc<Semaphore>>>,
}

/// Idle streams per host, and how many in all (kept, not summed on the
/// hot path where every request gives its stream back).
#[derive(Default)]
struct Idle {
    streams: HashMap<PeerId, Vec<Stream>>,
    total: usize,
}

impl std::fmt::Debug for TaskStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskStreams")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

impl TaskStreams {
    pub(crate) fn new(control: Control) -> Self {
        Self {
            control,
            protocol: StreamProtocol::new(wire::TASK_PROTOCOL),
            idle: Mutex::new(Idle::default()),
            sending: Mutex::new(HashMap::new()),
        }
    }

    /// Sends `request` to `peer` and waits for its answer. Cancel-safe:
    /// dropping the future drops the stream it was using, which the host
    /// sees closed when it answers.
    ///
    /// `connection` gives the token that is cancelled when the peer's last
    /// connection closes: a stream is not always told that its connection
    /// went away, so the request watches the connection too.
    pub(crate) async fn request(
        &self,
        peer: PeerId,
        request: &TaskRequest,
        connection: impl Fn() -> Option<CancellationToken>,
    ) -> Result<TaskResponse, RequestError> {
        let frame = encode_frame(request).map_err(|e| RequestError::Io(e.to_string()))?;
        let exchange = async {
            // Connected already, or connected by opening the stream.
            let mut stream = watch(connection(), self.send(peer, request, &frame)).await?;
            let max = answer_bound(request);
            let body = watch(connection(), read_frame(&mut stream, max)).await?;
            Ok::<_, FrameError>((stream, body))
        };
        let (stream, body) = match tokio::time::timeout(TASK_REQUEST_TIMEOUT, exchange).await {
            Err(_) => return Err(RequestError::Timeout),
            Ok(Err(FrameError::TooLarge { len, max })) => {
                return Err(RequestError::Io(format!(
                    "the peer's answer of {len} bytes exceeds the bound of {max}"
                )));
            }
            Ok(Err(FrameError::Io(e))) => return Err(stream_error(&e)),
            Ok(Err(FrameError::Open(e))) => return Err(e),
            // Only a host evicts streams.
            Ok(Err(e @ FrameError::Evicted)) => return Err(RequestError::Io(e.to_string())),
            Ok(Ok(done)) => done,
        };
        let response = wire::decode::<TaskResponse>(&body)
            .map_err(|e| RequestError::Io(format!("invalid answer: {e}")))?;
        self.give_back(peer, stream);
        Ok(response)
    }

    /// [`Self::stream_with`], once the request's body fits in what this
    /// node may be sending to `peer` at once. A cancel, a few bytes, does
    /// not wait behind the runs it may be cancelling.
    async fn send(
        &self,
        peer: PeerId,
        request: &TaskRequest,
        frame: &[u8],
    ) -> Result<Stream, FrameError> {
        if matches!(request, TaskRequest::Cancel(_)) {
            return self.stream_with(peer, frame).await;
        }
        let sending = Sending::to(self, peer);
        // As the host counts it: the body, which encoding bounded.
        let body = frame
            .len()
            .saturating_sub(HEADER_BYTES)
            .min(PEER_READ_BYTES);
        let units = u32::try_from(body).unwrap_or(u32::MAX);
        // Borrowed from `sending`, and dropped before it.
        let _permit = sending
            .share()
            .acquire_many(units)
            .await
            .map_err(|_| io::Error::other("the share of requests being sent was closed"))?;
        self.stream_with(peer, frame).await
    }

    /// A stream to `peer` on which `frame` has been sent: an idle one, or a
    /// new one that the host has accepted.
    async fn stream_with(&self, peer: PeerId, frame: &[u8]) -> Result<Stream, FrameError> {
        while let Some(mut stream) = self.take_idle(&peer) {
            // The host may have closed it while it was idle (to make room
            // for another peer's, see `MAX_STREAMS`): one that has ended,
            // or sent something out of turn, is dropped, not used.
            let mut probe = [0u8; 1];
            if futures::FutureExt::now_or_never(stream.read(&mut probe)).is_some() {
                continue;
            }
            // A stream that failed before the whole request was handed to
            // it cannot have carried it to the host, so another may.
            match stream.write_all(frame).await {
                Ok(()) => {
                    stream.flush().await?;
                    return Ok(stream);
                }
                Err(e) => tracing::debug!(%peer, "idle task stream failed: {e}"),
            }
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut stream = self.open(peer).await.map_err(FrameError::Open)?;
            // The request goes out at once; the host's first byte says
            // whether it took the stream. Until that byte, a failure means
            // the host never read the request, so another stream may carry
            // it.
            let mut first = [0u8; 1];
            let accepted = async {
                write_frame(&mut stream, frame).await?;
                stream.read(&mut first).await
            };
            match accepted.await {
                Ok(1) if first[0] == ACCEPTED => return Ok(stream),
                Ok(1) => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the peer does not speak this task protocol",
                    )
                    .into());
                }
                Ok(_) | Err(_) if attempt < OPEN_ATTEMPTS => {
                    tracing::debug!(%peer, attempt, "task stream dropped before it was accepted");
                    tokio::time::sleep(open_pause(attempt)).await;
                }
                Ok(_) | Err(_) => {
                    return Err(FrameError::Open(RequestError::NotAccepted(OPEN_ATTEMPTS)));
                }
            }
        }
    }

    /// Drops the idle streams to a peer, one of whose connections closed.
    pub(crate) fn forget(&self, peer: &PeerId) {
        let mut idle = self.lock();
        let gone = idle.streams.remove(peer).map_or(0, |streams| streams.len());
        idle.total -= gone;
    }

    async fn open(&self, peer: PeerId) -> Result<Stream, RequestError> {
        let mut control = self.control.clone();
        control
            .open_stream(peer, self.protocol.clone())
            .await
            .map_err(|e| match e {
                OpenStreamError::UnsupportedProtocol(_) => RequestError::Unsupported,
                OpenStreamError::Io(e) => stream_error(&e),
                other => RequestError::Io(other.to_string()),
            })
    }

    fn take_idle(&self, peer: &PeerId) -> Option<Stream> {
        let mut idle = self.lock();
        let stream = idle.streams.get_mut(peer).and_then(Vec::pop);
        idle.total -= usize::from(stream.is_some());
        stream
    }

    fn give_back(&self, peer: PeerId, stream: Stream) {
        let mut idle = self.lock();
        if idle.total >= MAX_IDLE {
            return;
        }
        let streams = idle.streams.entry(peer).or_default();
        if streams.len() < MAX_IDLE_PER_PEER {
            streams.push(stream);
            idle.total += 1;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_sending(&self) -> std::sync::MutexGuard<'_, HashMap<PeerId, Arc<Semaphore>>> {
        self.sending.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The pause before the next try to open a stream after `attempt` tries
/// were dropped: at random, up to twice as long as the last bound.
fn open_pause(attempt: u32) -> Duration {
    let bound = Duration::from_millis(2 << attempt.min(16)).min(OPEN_PAUSE_MAX);
    bound.mul_f64(rand::random::<f64>())
}

/// One request's hold on its host's entry in [`TaskStreams::sending`]: the
/// entry is made by the first request to a host and goes with the last
/// that holds it, so the map holds only hosts being sent to, however the
/// requests end (a dropped future included).
struct Sending<'a> {
    streams: &'a TaskStreams,
    peer: PeerId,
    /// The map's entry, cloned; `None` only while it is dropped.
    share: Option<Arc<Semaphore>>,
}

impl<'a> Sending<'a> {
    fn to(streams: &'a TaskStreams, peer: PeerId) -> Self {
        let share = Arc::clone(
            streams
                .lock_sending()
                .entry(peer)
                .or_insert_with(|| Arc::new(Semaphore::new(PEER_READ_BYTES))),
        );
        Self {
            streams,
            peer,
            share: Some(share),
        }
    }

    /// The host's share. Its permits are borrowed from this hold, so none
    /// outlives it.
    fn share(&self) -> &Semaphore {
        self.share.as_deref().unwrap_or(&NO_SHARE)
    }
}

/// What [`Sending::share`] would lend while its hold is being dropped,
/// which cannot happen: nothing.
static NO_SHARE: Semaphore = Semaphore::const_new(0);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        // Clones are made and dropped only under this lock (permits borrow
        // them), so the map's clone alone left means no request holds it.
        let mut sending = self.streams.lock_sending();
        drop(self.share.take());
        if sending
            .get(&self.peer)
            .is_some_and(|share| Arc::strong_count(share) == 1)
        {
            sending.remove(&self.peer);
        }
    }
}

/// Runs `work` until it ends or the connection it uses closes.
async fn watch<T>(
    connection: Option<CancellationToken>,
    work: impl Future<Output = Result<T, FrameError>>,
) -> Result<T, FrameError> {
    let closed = FrameError::Open(RequestError::ConnectionClosed);
    match connection {
        Some(token) => tokio::select! {
            result = work => result,
            () = token.cancelled() => Err(closed),
        },
        None => work.await,
    }
}

fn stream_error(e: &io::Error) -> RequestError {
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::WriteZero => RequestError::ConnectionClosed,
        io::ErrorKind::TimedOut => RequestError::Timeout,
        _ => RequestError::Io(e.to_string()),
    }
}

/// The host's side: serves every inbound task stream until `incoming` ends.
pub(crate) async fn serve(
    mut incoming: IncomingStreams,
    events: mpsc::Sender<NetEvent>,
    budget: ReadBudget,
    answers: AnswerBudget,
) {
    let open: Arc<Mutex<HashMap<PeerId, PeerStreams>>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        let Some(slot) = StreamSlot::take(&open, peer, &budget, &answers) else {
            tracing::debug!(%peer, "no room for another task stream from this peer; dropping it");
            continue;
        };
        tokio::spawn(serve_stream(peer, stream, events.clone(), slot));
    }
}

/// A peer's inbound task streams: how many are open, which of them wait
/// for a request, and the shares of the read budget and of the answer
/// budget they draw on together.
struct PeerStreams {
    open: usize,
    /// Its idle streams, oldest first, each with the token that closes it.
    idle: VecDeque<(u64, CancellationToken)>,
    /// Its streams whose request is arriving (its header came, not yet all
    /// its body), likewise, in the order their headers came.
    arriving: VecDeque<(u64, CancellationToken)>,
    budget: PeerBudget,
    answers: AnswerRoom,
}

/// Numbers streams' waits for a request, so that each can be found again.
static IDLE_IDS: AtomicU64 = AtomicU64::new(0);

/// One of a peer's [`MAX_STREAMS_PER_PEER`], given back on drop.
struct StreamSlot {
    open: Arc<Mutex<HashMap<PeerId, PeerStreams>>>,
    peer: PeerId,
    budget: PeerBudget,
    answers: AnswerRoom,
}

impl StreamSlot {
    fn take(
        open: &Arc<Mutex<HashMap<PeerId, PeerStreams>>>,
        peer: PeerId,
        budget: &ReadBudget,
        answers: &AnswerBudget,
    ) -> Option<Self> {
        let mut peers = open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = peers.get(&peer).map_or(0, |s| s.open);
        if mine >= MAX_STREAMS_PER_PEER {
            return None;
        }
        if peers.values().map(|s| s.open).sum::<usize>() >= MAX_STREAMS && !evict(&mut peers, mine)
        {
            return None;
        }
        let streams = peers.entry(peer).or_insert_with(|| PeerStreams {
            open: 0,
            idle: VecDeque::new(),
            arriving: VecDeque::new(),
            budget: budget.for_peer(),
            answers: answers.for_peer(peer),
        });
        streams.open += 1;
        Some(Self {
            open: Arc::clone(open),
            peer,
            budget: streams.budget.clone(),
            answers: streams.answers.clone(),
        })
    }
}

impl StreamSlot {
    /// Marks the stream idle until its request begins to come
    /// ([`Waiting::arriving`]), and evictable until the guard drops; the
    /// guard's token fires if the stream is evicted meanwhile.
    fn waiting(&self) -> Waiting<'_> {
        let (id, evicted) = (
            IDLE_IDS.fetch_add(1, Ordering::Relaxed),
            CancellationToken::new(),
        );
        let mut peers = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(streams) = peers.get_mut(&self.peer) {
            streams.idle.push_back((id, evicted.clone()));
        }
        Waiting {
            slot: self,
            id,
            evicted,
        }
    }
}

/// Closes a stream of the peer holding the most streams (of the peers with
/// one that may be closed), if it holds more than a newcomer holding `mine`
/// would: whether room was made. (The stream's count drops when it has
/// closed, a moment later.)
///
/// Its oldest idle stream goes first. Only if it has none does the stream
/// whose request has been arriving longest go: an honest requester then
/// sees its request fail as if its connection had closed (the host never
/// took it, so nothing ran), and places it again. That is rare: it happens
/// only while the node holds all the streams it takes, and only to the
/// peer holding the most.
fn evict(peers: &mut HashMap<PeerId, PeerStreams>, mine: usize) -> bool {
    let most = peers
        .values_mut()
        .filter(|s| !s.idle.is_empty() || !s.arriving.is_empty())
        .max_by_key(|s| s.open);
    match most {
        Some(streams) if streams.open > mine + 1 => {
            let oldest = streams.idle.pop_front();
            if let Some((_, evicted)) = oldest.or_else(|| streams.arriving.pop_front()) {
                evicted.cancel();
            }
            true
        }
        _ => false,
    }
}

/// A stream waiting for its next request, until all of it has come (see
/// [`StreamSlot::waiting`]).
struct Waiting<'a> {
    slot: &'a StreamSlot,
    id: u64,
    evicted: CancellationToken,
}

impl Waiting<'_> {
    /// Moves the stream from the idle to those whose request is arriving,
    /// which are evicted only after idle ones. One evicted already is in
    /// neither, and stays out: it made room once.
    fn arriving(&self) {
        let mut peers = self.slot.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(streams) = peers.get_mut(&self.slot.peer)
            && let Some(at) = streams.idle.iter().position(|(id, _)| *id == self.id)
            && let Some(entry) = streams.idle.remove(at)
        {
            streams.arriving.push_back(entry);
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut peers = self.slot.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(streams) = peers.get_mut(&self.slot.peer) {
            streams.idle.retain(|(id, _)| *id != self.id);
            streams.arriving.retain(|(id, _)| *id != self.id);
        }
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut peers = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(streams) = peers.get_mut(&self.peer) {
            streams.open = streams.open.saturating_sub(1);
            if streams.open == 0 {
                peers.remove(&self.peer);
            }
        }
    }
}

/// Serves one stream: request, answer, and again, until the peer closes it
/// or breaks the protocol.
async fn serve_stream<T: AsyncRead + AsyncWrite + Unpin>(
    peer: PeerId,
    stream: T,
    events: mpsc::Sender<NetEvent>,
    slot: StreamSlot,
) {
    // The stream is read even while an answer is written (see
    // `write_answer`), so it is served as two halves.
    let (mut reader, mut writer) = stream.split();
    if let Err(e) = write_frame(&mut writer, &[ACCEPTED]).await {
        tracing::debug!(%peer, "task stream closed at once: {e}");
        return;
    }
    loop {
        // The room reserved for the answer, if any, is held until it has
        // been written or given up.
        let (response, _reserved) = match next_request_on(&mut reader, &slot).await {
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(%peer, "task stream closed: {e}");
                return;
            }
            Ok(Some(Err(refusal))) => {
                tracing::debug!(%peer, "refused a task request as it came: {refusal}");
                (TaskResponse::Refused(refusal), None)
            }
            Ok(Some(Ok(request))) => {
                let (tx, rx) = oneshot::channel();
                let event = NetEvent::TaskRequest {
                    peer,
                    request,
                    reply: TaskResponder {
                        answer: tx,
                        room: slot.answers.clone(),
                    },
                };
                match events.try_send(event) {
                    // Dropped without an answer: close the stream, which
                    // the requester sees as a failed request.
                    Ok(()) => match answer_or_break(&mut reader, rx).await {
                        Some(response) => response,
                        None => {
                            tracing::debug!(%peer, "task stream closed before its answer");
                            return;
                        }
                    },
                    // The daemon is saturated: refuse now rather than queue
                    // without bound.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        (TaskResponse::Refused(Refusal::Overloaded), None)
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                }
            }
        };
        let frame = match encode_frame(&response) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::error!(%peer, "cannot encode our own answer: {e}");
                return;
            }
        };
        // Only the frame is held while the requester takes it.
        drop(response);
        if let Err(why) = write_answer(&mut reader, &mut writer, &frame).await {
            tracing::debug!(%peer, "task stream closed: {why}");
            return;
        }
    }
}

/// Writes an answer `frame`, which the requester must take within its
/// deadline. A requester sends nothing until it has the whole answer, so
/// the stream is read meanwhile, as while the task ran: bytes it pushes
/// (or its close) end the stream rather than wait in yamux's buffer.
async fn write_answer<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut R,
    writer: &mut W,
    frame: &[u8],
) -> Result<(), String> {
    let deadline = answer_deadline(frame.len());
    let mut byte = [0u8; 1];
    tokio::select! {
        // The write first: once the requester has the whole answer it may
        // send its next request at once, and that must not count as
        // writing early.
        biased;
        written = tokio::time::timeout(deadline, write_frame(writer, frame)) => match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("cannot write the answer: {e}")),
            Err(_) => Err(format!("the requester did not take its answer in {deadline:?}")),
        },
        _ = reader.read(&mut byte) => Err("the requester wrote before it had its answer".into()),
    }
}

/// How long a requester has to take an answer of `len` bytes: a requester
/// that does not read cannot make the host hold it (up to twice a task's
/// output limit) for longer than this.
fn answer_deadline(len: usize) -> Duration {
    ANSWER_GRACE + Duration::from_secs((len / ANSWER_MIN_RATE) as u64)
}

/// The daemon's answer, or `None` if it dropped the request or the peer
/// sent anything, or closed the stream, before it came. A requester writes
/// nothing while it waits, so the stream is read meanwhile: bytes a peer
/// pushes then are not left in yamux's buffer (up to a stream's window)
/// while the task runs, they close the stream.
async fn answer_or_break<T: AsyncRead + Unpin, A>(
    stream: &mut T,
    answer: oneshot::Receiver<A>,
) -> Option<A> {
    let mut byte = [0u8; 1];
    tokio::select! {
        answer = answer => answer.ok(),
        _ = stream.read(&mut byte) => None,
    }
}

/// The next request on a served stream: `None` when the peer closed it
/// between requests; a decoding error to answer; an I/O or bound error, or
/// an eviction, to close on.
async fn next_request_on<T: AsyncRead + Unpin>(
    stream: &mut T,
    slot: &StreamSlot,
) -> Result<Option<Result<TaskRequest, Refusal>>, FrameError> {
    // An idle stream may wait for its next request as long as the
    // connection lives, unless another peer's stream needs its place
    // (see `MAX_STREAMS`). It stays evictable until the whole request has
    // come: a header alone holds nothing, and would keep the stream from
    // eviction for as long as its body may take.
    let waiting = slot.waiting();
    let read = async {
        let Some(header) = read_header(stream).await? else {
            return Ok(None);
        };
        waiting.arriving();
        request_after(stream, header, &slot.budget).await.map(Some)
    };
    let request = tokio::select! {
        biased;
        () = waiting.evicted.cancelled() => return Err(FrameError::Evicted),
        request = read => request?,
    };
    // Evicted as its request came: the newcomer it made room for is in,
    // so it goes all the same. (Once out of the lists, under the same lock
    // that eviction takes, it can no longer be chosen.)
    let evicted = waiting.evicted.clone();
    drop(waiting);
    if evicted.is_cancelled() {
        return Err(FrameError::Evicted);
    }
    Ok(request)
}

/// [`next_request_on`] for a stream that no one evicts.
#[cfg(test)]
async fn next_request<T: AsyncRead + Unpin>(
    stream: &mut T,
    budget: &PeerBudget,
) -> Result<Option<Result<TaskRequest, Refusal>>, FrameError> {
    match read_header(stream).await? {
        Some(header) => request_after(stream, header, budget).await.map(Some),
        None => Ok(None),
    }
}

/// The request whose length prefix was `header`, or the refusal to answer
/// it with: it is malformed, or the node had no room to read it.
async fn request_after<T: AsyncRead + Unpin>(
    stream: &mut T,
    header: [u8; HEADER_BYTES],
    budget: &PeerBudget,
) -> Result<Result<TaskRequest, Refusal>, FrameError> {
    let len = frame_len(header, TaskRequest::MAX_BYTES)?;
    Ok(match read_request_body(stream, len, budget).await? {
        Body::Read(body) => wire::decode::<TaskRequest>(&body).map_err(|why| {
            tracing::debug!("malformed task request: {why}");
            Refusal::Invalid(spare_core::outcome::clip_detail(why.to_string()))
        }),
        Body::NoRoom(why) => {
            tracing::debug!("no room to read a task request: {why}");
            Err(Refusal::Overloaded)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::READ_BUDGET_BYTES;
    use spare_core::TaskId;

    #[tokio::test]
    async fn a_hosts_share_of_requests_being_sent_goes_with_its_last_request() {
        let streams = TaskStreams::new(libp2p_stream::Behaviour::new().new_control());
        let (host, other) = (PeerId::random(), PeerId::random());
        let first = Sending::to(&streams, host);
        let second = Sending::to(&streams, host);
        let elsewhere = Sending::to(&streams, other);
        assert!(std::ptr::eq(first.share(), second.share()));
        let permit = second.share().acquire().await.unwrap();
        drop(first);
        assert_eq!(streams.lock_sending().len(), 2);
        drop(permit);
        drop(second);
        assert_eq!(streams.lock_sending().len(), 1);
        drop(elsewhere);
        assert!(streams.lock_sending().is_empty());
    }

    #[test]
    fn pauses_before_reopening_a_stream_are_spread_within_their_bounds() {
        let mut most = Duration::ZERO;
        for attempt in 1..OPEN_ATTEMPTS {
            let bound = Duration::from_millis(2 << attempt).min(OPEN_PAUSE_MAX);
            let pauses: Vec<_> = (0..64).map(|_| open_pause(attempt)).collect();
            assert!(pauses.iter().all(|pause| *pause <= bound), "{pauses:?}");
            assert!(pauses.iter().any(|pause| *pause != pauses[0]), "{pauses:?}");
            most += bound;
        }
        assert!(most < Duration::from_millis(900), "{most:?}");
    }

    #[test]
    fn a_frame_header_beyond_the_bound_is_refused() {
        assert_eq!(frame_len(10u32.to_be_bytes(), 10).unwrap(), 10);
        assert!(matches!(
            frame_len(11u32.to_be_bytes(), 10),
            Err(FrameError::TooLarge { len: 11, max: 10 })
        ));
        assert!(frame_len([0xff; 4], TaskRequest::MAX_BYTES).is_err());
    }

    #[tokio::test]
    async fn frames_round_trip_and_a_clean_end_is_not_an_error() {
        let request = TaskRequest::Cancel(TaskId::random());
        let mut bytes = encode_frame(&request).unwrap();
        bytes.extend(encode_frame(&request).unwrap());
        let mut io = futures::io::Cursor::new(bytes);
        let budget = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        for _ in 0..2 {
            let read = next_request(&mut io, &budget).await.unwrap().unwrap();
            assert_eq!(read.unwrap(), request);
        }
        assert!(next_request(&mut io, &budget).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_its_body_is_read() {
        let len = u32::try_from(TaskRequest::MAX_BYTES + 1).unwrap();
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(vec![0u8; 1024]);
        let mut io = futures::io::Cursor::new(bytes);
        let budget = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        let err = next_request(&mut io, &budget).await.unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { .. }), "{err}");
        assert_eq!(io.position(), HEADER_BYTES as u64);
    }

    #[tokio::test]
    async fn garbage_within_the_bound_is_answered_not_fatal() {
        let body = b"\xff\x00garbage";
        let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        bytes.extend_from_slice(body);
        let mut io = futures::io::Cursor::new(bytes);
        let budget = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        let read = next_request(&mut io, &budget).await.unwrap().unwrap();
        assert!(read.is_err());
    }

    #[tokio::test]
    async fn a_truncated_frame_is_an_error() {
        let mut bytes = 100u32.to_be_bytes().to_vec();
        bytes.extend(vec![0u8; 10]);
        let mut io = futures::io::Cursor::new(bytes);
        let budget = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        assert!(next_request(&mut io, &budget).await.is_err());
        let mut io = futures::io::Cursor::new(vec![0u8, 0]);
        assert!(next_request(&mut io, &budget).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_body_that_never_arrives_times_out() {
        let (mut writer, mut reader) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut writer, &100u32.to_be_bytes())
            .await
            .unwrap();
        let mut io = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut reader);
        let budget = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        let err = next_request(&mut io, &budget).await.unwrap_err();
        assert!(
            matches!(&err, FrameError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        drop(writer);
    }

    /// Runs `reads` on a paused clock, as a peer's bytes are read.
    fn block_on<F: Future>(reads: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
            .block_on(reads)
    }

    /// Reads requests until the stream ends or breaks; how many were read.
    async fn read_all(bytes: Vec<u8>) -> usize {
        let mut io = futures::io::Cursor::new(bytes);
        let budget = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        let mut read = 0;
        while let Ok(Some(_)) = next_request(&mut io, &budget).await {
            read += 1;
        }
        read
    }

    #[test]
    fn an_answer_is_bounded_by_the_tasks_own_output_limit() {
        let mut spec = spare_core::TaskSpec {
            id: TaskId::random(),
            name: "t".into(),
            module: spare_core::BlobRef {
                id: spare_core::BlobId::of(b"m"),
                size: 1,
            },
            args: Vec::new(),
            env: Vec::new(),
            stdin: spare_core::Stdin::for_bytes(b""),
            limits: Limits::default(),
        };
        spec.limits.output = 1 << 20;
        let run = TaskRequest::Run(spec.clone());
        assert_eq!(answer_bound(&run), (2 << 20) + (64 << 10));
        spec.limits.output = u64::MAX;
        let run = TaskRequest::Run(spec);
        assert_eq!(answer_bound(&run), TaskResponse::MAX_BYTES);
        assert_eq!(
            answer_bound(&TaskRequest::Cancel(TaskId::random())),
            64 << 10
        );
    }

    proptest::proptest! {
        /// The requester's reader of a host's answers: whatever a host
        /// sends, it reads at most one header and the bound, and never
        /// panics.
        #[test]
        fn arbitrary_answers_never_panic_the_answer_reader(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096),
            max in 0usize..2048,
        ) {
            let mut io = futures::io::Cursor::new(bytes.clone());
            let read = block_on(read_frame(&mut io, max));
            proptest::prop_assert!(io.position() as usize <= HEADER_BYTES + max);
            if let Ok(body) = read {
                proptest::prop_assert!(body.len() <= max);
                let _ = wire::decode::<TaskResponse>(&body);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_request_reader(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..4096)
        ) {
            // Each request read takes at least a header's worth of bytes.
            proptest::prop_assert!(block_on(read_all(bytes.clone())) <= bytes.len() / HEADER_BYTES);
        }

        #[test]
        fn framing_survives_garbage_inside_a_frame(
            valid in 0usize..6,
            garbage in proptest::collection::vec(proptest::num::u8::ANY, 0..512),
            at in 0usize..6,
        ) {
            let request = encode_frame(&TaskRequest::Cancel(TaskId::random())).unwrap();
            let mut bytes = Vec::new();
            for i in 0..valid {
                if i == at {
                    bytes.extend(u32::try_from(garbage.len()).unwrap().to_be_bytes());
                    bytes.extend(&garbage);
                }
                bytes.extend(&request);
            }
            // A frame of garbage is one (refused) request; the ones after it
            // are still read.
            let expected = valid + usize::from(at < valid);
            proptest::prop_assert_eq!(block_on(read_all(bytes)), expected);
        }
    }

    /// A stream being served, as its requester sees it, with a request in
    /// flight: the host's task serving it, the requester's end, the
    /// daemon's way to answer, and the host's open-stream table.
    struct Served {
        task: tokio::task::JoinHandle<()>,
        theirs: tokio_util::compat::Compat<tokio::io::DuplexStream>,
        reply: TaskResponder,
        open: Arc<Mutex<HashMap<PeerId, PeerStreams>>>,
        answers: AnswerBudget,
    }

    /// Serves one stream of `buffer` bytes each way, and sends a request
    /// on it that reaches the daemon.
    async fn serving_a_request(buffer: usize) -> Served {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let (events, mut requests) = mpsc::channel(4);
        let (ours, theirs) = tokio::io::duplex(buffer);
        let open: Arc<Mutex<HashMap<PeerId, PeerStreams>>> = Arc::default();
        let peer = PeerId::random();
        let answers = AnswerBudget::new(crate::answer_budget(1, TaskResponse::MAX_BYTES));
        let budget = ReadBudget::new(READ_BUDGET_BYTES);
        let slot = StreamSlot::take(&open, peer, &budget, &answers).unwrap();
        let task = tokio::spawn(serve_stream(peer, ours.compat(), events, slot));
        let mut theirs = theirs.compat();
        let mut accepted = [0u8; 1];
        theirs.read_exact(&mut accepted).await.unwrap();
        let request = encode_frame(&TaskRequest::Cancel(TaskId::random())).unwrap();
        write_frame(&mut theirs, &request).await.unwrap();
        let Some(NetEvent::TaskRequest { reply, .. }) = requests.recv().await else {
            panic!("the request reaches the daemon");
        };
        Served {
            task,
            theirs,
            reply,
            open,
            answers,
        }
    }

    #[tokio::test]
    async fn a_peer_that_writes_while_its_task_runs_loses_the_stream() {
        let Served {
            task,
            mut theirs,
            reply,
            open,
            ..
        } = serving_a_request(64 << 10).await;
        // Bytes that are not a request in turn, while the answer is due.
        write_frame(&mut theirs, &[0xee; 1024]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the stream is given up at once")
            .unwrap();
        assert!(open.lock().unwrap().is_empty(), "its slot is given back");
        reply.send(TaskResponse::Cancelled(true)).await;
        let mut rest = Vec::new();
        theirs.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "no answer follows: {rest:?}");
    }

    /// A requester that never reads its answer holds it, and the room
    /// reserved for it, on the host only until the answer's deadline.
    #[tokio::test(start_paused = true)]
    async fn an_answer_nobody_reads_is_given_up() {
        // Room for the request, not for the answer.
        let served = serving_a_request(1024).await;
        let total = served.answers.available();
        let reserved = served.reply.room().reserve(100_000).await;
        // Larger than the pipe, within the bound on a refusal's detail.
        let big = spare_core::wire::Refusal::Invalid("x".repeat(4_000));
        served
            .reply
            .send_reserved(TaskResponse::Refused(big), Some(reserved))
            .await;
        let started = tokio::time::Instant::now();
        tokio::time::sleep(ANSWER_GRACE / 2).await;
        assert_eq!(served.answers.available(), total - 100_000, "held");
        served.task.await.unwrap();
        let waited = started.elapsed();
        assert!(
            waited >= ANSWER_GRACE && waited <= answer_deadline(64 << 10),
            "{waited:?}"
        );
        assert!(
            served.open.lock().unwrap().is_empty(),
            "its slot is given back"
        );
        assert_eq!(served.answers.available(), total, "and the room");
    }

    /// Bytes a requester pushes while its answer is being written end the
    /// stream at once: they are not left in yamux's buffer for the
    /// answer's deadline.
    #[tokio::test(start_paused = true)]
    async fn a_peer_that_writes_while_its_answer_is_written_loses_the_stream() {
        // Room for the request, not for the answer.
        let mut served = serving_a_request(1024).await;
        let answer = TaskResponse::Refused(Refusal::Invalid("z".repeat(4000)));
        served.reply.send(answer).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!served.task.is_finished(), "the answer waits to be read");
        served.theirs.write_all(&[0xee; 64]).await.unwrap();
        served.theirs.flush().await.unwrap();
        let started = tokio::time::Instant::now();
        served.task.await.unwrap();
        assert!(started.elapsed() < Duration::from_secs(1), "at once");
        assert!(
            served.open.lock().unwrap().is_empty(),
            "its slot is given back"
        );
    }

    /// The room reserved for an answer is given back once it is read.
    #[tokio::test]
    async fn a_read_answer_gives_back_its_room() {
        let mut served = serving_a_request(1024).await;
        let total = served.answers.available();
        let reserved = served.reply.room().reserve(200_000).await;
        let answer = TaskResponse::Refused(Refusal::Invalid("y".repeat(4000)));
        served
            .reply
            .send_reserved(answer.clone(), Some(reserved))
            .await;
        tokio::task::yield_now().await;
        assert_eq!(served.answers.available(), total - 200_000, "held");
        let frame = read_frame(&mut served.theirs, TaskResponse::MAX_BYTES)
            .await
            .unwrap();
        assert_eq!(wire::decode::<TaskResponse>(&frame).unwrap(), answer);
        // The host goes back to reading the stream: the room is free.
        for _ in 0..100 {
            if served.answers.available() == total {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("the room is still held");
    }

    #[test]
    fn a_peer_holds_at_most_its_share_of_streams() {
        let open: Arc<Mutex<HashMap<PeerId, PeerStreams>>> = Arc::default();
        let budget = ReadBudget::new(READ_BUDGET_BYTES);
        let answers = AnswerBudget::new(crate::answer_budget(1, TaskResponse::MAX_BYTES));
        let take = |peer| StreamSlot::take(&open, peer, &budget, &answers);
        let peer = PeerId::random();
        let slots: Vec<_> = (0..MAX_STREAMS_PER_PEER)
            .map(|_| take(peer).unwrap())
            .collect();
        assert!(take(peer).is_none());
        assert!(take(PeerId::random()).is_some());
        drop(slots);
        assert!(take(peer).is_some());
        // And all peers together at most so many.
        let many: Vec<_> = (0..MAX_STREAMS)
            .map(|_| take(PeerId::random()).unwrap())
            .collect();
        assert!(take(PeerId::random()).is_none());
        drop(many);
        assert!(take(peer).is_some());
    }

    /// Every stream the node takes, held by as few peers as can hold them.
    fn every_stream_held(take: &impl Fn(PeerId) -> Option<StreamSlot>) -> Vec<StreamSlot> {
        (0..MAX_STREAMS / MAX_STREAMS_PER_PEER)
            .flat_map(|_| {
                let peer = PeerId::random();
                (0..MAX_STREAMS_PER_PEER).map(move |_| take(peer).expect("room for it"))
            })
            .collect()
    }

    /// Peers that open streams only to hold them, as many as the node
    /// takes: a newcomer's stream takes the place of an idle one of the
    /// peer that holds the most, and peers holding as many as the newcomer
    /// would lose none.
    #[test]
    fn streams_held_idle_make_room_for_another_peers() {
        let open: Arc<Mutex<HashMap<PeerId, PeerStreams>>> = Arc::default();
        let budget = ReadBudget::new(READ_BUDGET_BYTES);
        let answers = AnswerBudget::new(crate::answer_budget(1, TaskResponse::MAX_BYTES));
        let take = |peer| StreamSlot::take(&open, peer, &budget, &answers);
        let held = every_stream_held(&take);
        // Busy streams (a request being served) are never evicted.
        assert!(take(PeerId::random()).is_none(), "none idle");
        let idle: Vec<Waiting<'_>> = held.iter().map(StreamSlot::waiting).collect();
        let newcomer = PeerId::random();
        let first = take(newcomer).expect("room made");
        let evicted: Vec<&Waiting<'_>> = idle.iter().filter(|i| i.evicted.is_cancelled()).collect();
        assert_eq!(evicted.len(), 1);
        let of_its_peer = idle.iter().filter(|i| i.slot.peer == evicted[0].slot.peer);
        assert_eq!(
            evicted[0].id,
            of_its_peer.map(|i| i.id).min().unwrap(),
            "its peer's oldest"
        );
        // Until it closes, the evicted stream still counts; the next
        // newcomer evicts another.
        let second = take(PeerId::random()).expect("room made again");
        assert_eq!(idle.iter().filter(|i| i.evicted.is_cancelled()).count(), 2);
        // A newcomer takes streams' places until it would hold as many as
        // the peers it takes them from (whose evicted streams, held here,
        // still count): 255 with its first, as many as a hoarder less one.
        let level: Vec<StreamSlot> = (0..MAX_STREAMS_PER_PEER)
            .map_while(|_| take(newcomer))
            .collect();
        assert_eq!(level.len(), MAX_STREAMS_PER_PEER - 2);
        assert!(take(newcomer).is_none());
        drop(idle);
        drop((first, second, level, held));
        assert!(open.lock().unwrap().is_empty());
    }

    /// Peers that hold all the node's streams with a request's header and
    /// none of its body (sending the body just before it is due, and the
    /// next header with it, would keep them so): a newcomer's stream takes
    /// the place of one at once, as of an idle one.
    #[tokio::test(start_paused = true)]
    async fn streams_holding_a_header_without_its_body_make_room_for_another_peers() {
        use tokio_util::compat::TokioAsyncReadCompatExt;
        let open: Arc<Mutex<HashMap<PeerId, PeerStreams>>> = Arc::default();
        let budget = ReadBudget::new(READ_BUDGET_BYTES);
        let answers = AnswerBudget::new(crate::answer_budget(1, TaskResponse::MAX_BYTES));
        let take = |peer| StreamSlot::take(&open, peer, &budget, &answers);
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..MAX_STREAMS / MAX_STREAMS_PER_PEER {
            let hoarder = PeerId::random();
            for _ in 0..MAX_STREAMS_PER_PEER {
                let slot = take(hoarder).unwrap();
                let (mut writer, reader) = tokio::io::duplex(64);
                tokio::io::AsyncWriteExt::write_all(&mut writer, &100u32.to_be_bytes())
                    .await
                    .unwrap();
                writers.push(writer);
                readers.push(tokio::spawn(async move {
                    next_request_on(&mut reader.compat(), &slot).await
                }));
            }
        }
        // Every header is read, and every body is awaited.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(readers.iter().all(|reader| !reader.is_finished()));

        let newcomer = take(PeerId::random()).expect("room made");
        tokio::time::sleep(Duration::from_millis(10)).await;
        let (evicted, waiting): (Vec<_>, Vec<_>) =
            readers.into_iter().partition(|reader| reader.is_finished());
        assert_eq!(
            evicted.len(),
            1,
            "one stream made room, well before its body was due"
        );
        for reader in evicted {
            let ended = reader.await.unwrap();
            assert!(matches!(ended, Err(FrameError::Evicted)), "{ended:?}");
        }
        drop((newcomer, writers));
        for reader in waiting {
            assert!(reader.await.unwrap().is_err(), "their bodies never came");
        }
        assert!(open.lock().unwrap().is_empty());
    }

    /// The peer holding the most loses its idle streams first, however
    /// young; then, one by one, those whose request has been arriving
    /// longest. A stream evicted while idle whose header then comes does
    /// not count as room a second time.
    #[test]
    fn idle_streams_are_evicted_before_ones_whose_request_is_arriving() {
        let open: Arc<Mutex<HashMap<PeerId, PeerStreams>>> = Arc::default();
        let budget = ReadBudget::new(READ_BUDGET_BYTES);
        let answers = AnswerBudget::new(crate::answer_budget(1, TaskResponse::MAX_BYTES));
        let take = |peer| StreamSlot::take(&open, peer, &budget, &answers);
        let held = every_stream_held(&take);
        // Only the first hoarder's streams wait for requests: all but its
        // youngest have headers, which came youngest first.
        let waits: Vec<Waiting<'_>> = held[..MAX_STREAMS_PER_PEER]
            .iter()
            .map(StreamSlot::waiting)
            .collect();
        let (idle, arriving) = waits.split_last().unwrap();
        for wait in arriving.iter().rev() {
            wait.arriving();
        }
        let evicted = || -> Vec<u64> {
            waits
                .iter()
                .filter(|w| w.evicted.is_cancelled())
                .map(|w| w.id)
                .collect()
        };

        let first = take(PeerId::random()).expect("room made");
        assert_eq!(evicted(), [idle.id], "the idle one");
        idle.arriving();
        let second = take(PeerId::random()).expect("room made again");
        let third = take(PeerId::random()).expect("and again");
        let mut expected = vec![
            arriving[arriving.len() - 2].id,
            arriving[arriving.len() - 1].id,
            idle.id,
        ];
        expected.sort_unstable();
        assert_eq!(evicted(), expected, "then those whose headers came first");
        drop(waits);
        assert!(take(PeerId::random()).is_none(), "none left to evict");
        drop((first, second, third, held));
        assert!(open.lock().unwrap().is_empty());
    }

    /// Headers announcing the largest request, then silence, on many
    /// streams: they hold none of the node's read budget, so another
    /// peer's request is read at once.
    #[tokio::test(start_paused = true)]
    async fn announced_but_unsent_requests_hold_no_budget() {
        let node = ReadBudget::new(READ_BUDGET_BYTES);
        let hostile = node.for_peer();
        let len = u32::try_from(TaskRequest::MAX_BYTES).unwrap();
        let mut writers = Vec::new();
        let mut readers = Vec::new();
        for _ in 0..64 {
            let (mut writer, reader) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut writer, &len.to_be_bytes())
                .await
                .unwrap();
            writers.push(writer);
            let budget = hostile.clone();
            readers.push(tokio::spawn(async move {
                let mut io = tokio_util::compat::TokioAsyncReadCompatExt::compat(reader);
                next_request(&mut io, &budget).await.is_err()
            }));
        }
        tokio::task::yield_now().await;
        assert_eq!(node.available(), READ_BUDGET_BYTES);

        let request = TaskRequest::Cancel(TaskId::random());
        let mut io = futures::io::Cursor::new(encode_frame(&request).unwrap());
        let read = next_request(&mut io, &node.for_peer()).await.unwrap();
        assert_eq!(read.unwrap().unwrap(), request);
        // The silent ones time out, and nothing stays held.
        for reader in readers {
            assert!(reader.await.unwrap());
        }
        assert_eq!(node.available(), READ_BUDGET_BYTES);
        drop(writers);
    }

    /// A peer that sends the bodies of many large requests and stalls
    /// them holds only its own share; another peer's request still fits.
    #[tokio::test(start_paused = true)]
    async fn one_peer_holds_at_most_its_share_of_the_read_budget() {
        let node = ReadBudget::new(READ_BUDGET_BYTES);
        let hostile = node.for_peer();
        let len = TaskRequest::MAX_BYTES;
        let mut writers = Vec::new();
        for _ in 0..8 {
            // All but the last byte of the largest request.
            let (mut writer, reader) = tokio::io::duplex(len + 64);
            let mut bytes = u32::try_from(len).unwrap().to_be_bytes().to_vec();
            bytes.resize(HEADER_BYTES + len - 1, 0);
            tokio::io::AsyncWriteExt::write_all(&mut writer, &bytes)
                .await
                .unwrap();
            writers.push(writer);
            let budget = hostile.clone();
            tokio::spawn(async move {
                let mut io = tokio_util::compat::TokioAsyncReadCompatExt::compat(reader);
                let _ = next_request(&mut io, &budget).await;
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Their bodies, and the buffer each is read through.
        let held = READ_BUDGET_BYTES - node.available();
        let share = PEER_READ_BYTES + PEER_READ_BYTES / len * READ_SCRATCH;
        assert!(held <= share, "one peer holds {held} bytes");
        assert!(held > 0, "the stalled requests hold what they were sent");

        let request = TaskRequest::Cancel(TaskId::random());
        let mut io = futures::io::Cursor::new(encode_frame(&request).unwrap());
        let read = next_request(&mut io, &node.for_peer()).await.unwrap();
        assert_eq!(read.unwrap().unwrap(), request);
        drop(writers);
    }

    /// Many large requests of one honest peer arriving together, more than
    /// its share holds at once: they are read in turn, none waiting for the
    /// others to its deadline (the paused clock would jump to it).
    #[tokio::test(start_paused = true)]
    async fn requests_that_each_hold_part_of_the_budget_never_wait_on_each_other() {
        let peer = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        let body = vec![0u8; TaskRequest::MAX_BYTES * 3 / 4];
        let mut readers = Vec::new();
        for _ in 0..8 {
            let (writer, reader) = tokio::io::duplex(64 << 10);
            let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
            frame.extend_from_slice(&body);
            // The bytes come in pieces, interleaved with the other streams'.
            tokio::spawn(async move {
                let mut writer = writer;
                for piece in frame.chunks(32 << 10) {
                    if tokio::io::AsyncWriteExt::write_all(&mut writer, piece)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::task::yield_now().await;
                }
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut writer).await;
            });
            let budget = peer.clone();
            readers.push(tokio::spawn(async move {
                let mut io = tokio_util::compat::TokioAsyncReadCompatExt::compat(reader);
                next_request(&mut io, &budget).await.map(drop)
            }));
        }
        for reader in readers {
            reader.await.unwrap().unwrap();
        }
    }

    /// A body that holds part of the node's budget and needs more than is
    /// free is refused at once rather than waiting with what it holds: the
    /// rest of it is read and dropped, the requester told the node is
    /// overloaded, and the stream serves the next request.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_grow_is_refused_at_once() {
        let node = ReadBudget::new(64 << 10);
        let peer = node.for_peer();
        let body = vec![0u8; 1 << 20];
        let mut frame = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        let request = TaskRequest::Cancel(TaskId::random());
        frame.extend(encode_frame(&request).unwrap());
        let mut io = futures::io::Cursor::new(frame);
        let read = next_request(&mut io, &peer).await.unwrap().unwrap();
        assert_eq!(read, Err(Refusal::Overloaded));
        assert_eq!(node.available(), 64 << 10);
        let read = next_request(&mut io, &peer).await.unwrap().unwrap();
        assert_eq!(read, Ok(request));
    }

    /// A peer's requests beyond those its share of the read budget takes
    /// and those that may wait for it are refused as overloaded, each read
    /// to its end, not cut off.
    #[tokio::test(start_paused = true)]
    async fn requests_beyond_a_peers_turns_to_wait_are_refused_not_cut_off() {
        let node = ReadBudget::new(READ_BUDGET_BYTES);
        let peer = node.for_peer();
        let len = TaskRequest::MAX_BYTES;
        // Its share, held by requests whose last byte never comes.
        let mut writers = Vec::new();
        for _ in 0..PEER_READ_BYTES / len + crate::codec::MAX_WAITING_PER_PEER {
            let (mut writer, reader) = tokio::io::duplex(64);
            let mut bytes = u32::try_from(len).unwrap().to_be_bytes().to_vec();
            bytes.push(0);
            tokio::io::AsyncWriteExt::write_all(&mut writer, &bytes)
                .await
                .unwrap();
            writers.push(writer);
            let budget = peer.clone();
            tokio::spawn(async move {
                let mut io = tokio_util::compat::TokioAsyncReadCompatExt::compat(reader);
                let _ = next_request(&mut io, &budget).await;
            });
        }
        tokio::task::yield_now().await;
        let mut frame = u32::try_from(len).unwrap().to_be_bytes().to_vec();
        frame.resize(HEADER_BYTES + len, 0);
        let mut io = futures::io::Cursor::new(frame);
        let read = next_request(&mut io, &peer).await.unwrap().unwrap();
        assert_eq!(read, Err(Refusal::Overloaded));
        assert!(next_request(&mut io, &peer).await.unwrap().is_none());
        drop(writers);
    }
}

//! The request-response codec: one CBOR message per stream, bounded.
//!
//! Reading stops one byte past the message type's bound, so a peer can never
//! make us buffer more than [`Message::MAX_BYTES`] + 1 bytes for one
//! message; decoding and validation are [`spare_core::wire::decode`], which
//! is property-tested.
//!
//! Inbound requests are also bounded together: every byte being read holds
//! a permit of one node-wide [`ReadBudget`], and a request must arrive
//! within [`REQUEST_READ_TIMEOUT`]. A peer that opens many streams and
//! trickles bytes into them can hold at most the budget, briefly, not one
//! buffer per stream for as long as it likes.

use std::io;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use spare_core::wire::{self, Message, TaskRequest, WireError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes of inbound requests being read at once, over all peers.
pub(crate) const READ_BUDGET_BYTES: usize = 64 << 20;
/// Bytes of inbound task requests one peer may have being read at once:
/// four of the largest. A peer that holds its share holds up only itself.
pub(crate) const PEER_READ_BYTES: usize = 4 * TaskRequest::MAX_BYTES;
/// A peer's task requests that may wait at once for their turn at its
/// share; the next one is answered "overloaded" once its body has been
/// read and dropped, and its stream stays usable. A waiting stream
/// is not read, so the muxer may hold up to a stream's window of it (256
/// KiB to start with yamux, 512 KiB with QUIC): this keeps that to 4 MiB
/// (8 MiB) per peer.
pub(crate) const MAX_WAITING_PER_PEER: usize = 16;
/// Requests of all peers that may wait at once, unread, for their turn at
/// a peer's share or for the node's budget; the next one is refused. It
/// keeps what the muxers may hold for streams the node does not read to
/// 256 windows: 64 MiB at yamux's first window (more where yamux has grown
/// a stream's window for a fast reader), 128 MiB with QUIC.
pub(crate) const MAX_WAITING: usize = 256;
/// How long a peer may take to send one whole request.
pub(crate) const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Inbound requests are read in pieces of this size, each holding a permit.
const READ_PIECE: usize = 64 << 10;

const _: () = assert!(PEER_READ_BYTES <= READ_BUDGET_BYTES / 8);

/// The node-wide budget of bytes of inbound requests being read: one permit
/// per byte; and the turns to wait for it, or for a peer's share of it.
#[derive(Clone, Debug)]
pub(crate) struct ReadBudget {
    bytes: Arc<Semaphore>,
    waiting: Arc<Semaphore>,
}

impl ReadBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        Self {
            bytes: Arc::new(Semaphore::new(bytes)),
            waiting: Arc::new(Semaphore::new(MAX_WAITING)),
        }
    }

    /// The permits for `bytes` (a piece of a message, far less than the
    /// whole budget), waiting for them if they are not free, and held until
    /// dropped. At most [`MAX_WAITING`] requests wait; one more is refused.
    pub(crate) async fn acquire(&self, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
        if let Ok(permit) = self.try_acquire(bytes) {
            return Ok(permit);
        }
        let _turn = self.turn_to_wait()?;
        acquire(&self.bytes, bytes).await
    }

    /// One of the node's [`MAX_WAITING`] turns to wait, or an error saying
    /// they are all taken.
    fn turn_to_wait(&self) -> io::Result<OwnedSemaphorePermit> {
        Arc::clone(&self.waiting).try_acquire_owned().map_err(|_| {
            io::Error::other(format!(
                "{MAX_WAITING} requests already wait for the node's read budget"
            ))
        })
    }

    /// Bytes not held now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// The permits for `bytes` if they are free now; an error saying the
    /// budget is spent otherwise.
    pub(crate) fn try_acquire(&self, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
        let units = units(bytes)?;
        Arc::clone(&self.bytes)
            .try_acquire_many_owned(units)
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "the node's budget for requests being read is spent",
                )
            })
    }

    /// A share of this budget for one peer's task streams.
    pub(crate) fn for_peer(&self) -> PeerBudget {
        PeerBudget {
            all: self.clone(),
            own: Arc::new(Semaphore::new(PEER_READ_BYTES)),
            waiting: Arc::new(Semaphore::new(MAX_WAITING_PER_PEER)),
        }
    }
}

/// One peer's share of the [`ReadBudget`]: the requests it has being read
/// count against its share by their whole length, and against the node's
/// budget by the memory they take.
#[derive(Clone, Debug)]
pub(crate) struct PeerBudget {
    all: ReadBudget,
    own: Arc<Semaphore>,
    /// Turns to wait for `own`.
    waiting: Arc<Semaphore>,
}

impl PeerBudget {
    /// Waits until the peer's share has room for a whole request of
    /// `bytes`, and holds it until dropped: a peer's requests are admitted
    /// in turn, each with all the room it can need, so they never wait on
    /// one another half read. At most [`MAX_WAITING_PER_PEER`] wait, and
    /// [`MAX_WAITING`] of all peers; one more is refused at once.
    pub(crate) async fn admit(&self, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
        let units = units(bytes)?;
        if let Ok(admitted) = Arc::clone(&self.own).try_acquire_many_owned(units) {
            return Ok(admitted);
        }
        let _turn = Arc::clone(&self.waiting).try_acquire_owned().map_err(|_| {
            io::Error::other(format!(
                "{MAX_WAITING_PER_PEER} of this peer's requests already wait for their turn"
            ))
        })?;
        let _node_turn = self.all.turn_to_wait()?;
        acquire(&self.own, bytes).await
    }

    /// The node-wide budget the memory of admitted requests comes from.
    pub(crate) fn node(&self) -> &ReadBudget {
        &self.all
    }
}

/// Semaphore units for `bytes`.
fn units(bytes: usize) -> io::Result<u32> {
    u32::try_from(bytes)
        .map_err(|_| io::Error::other(format!("{bytes} bytes exceed any read budget")))
}

async fn acquire(semaphore: &Arc<Semaphore>, bytes: usize) -> io::Result<OwnedSemaphorePermit> {
    let units = units(bytes)?;
    Arc::clone(semaphore)
        .acquire_many_owned(units)
        .await
        .map_err(|_| io::Error::other("read budget closed"))
}

/// A request as it arrives from a peer: decoded and valid, or the reason it
/// is not. A malformed request within the size bound gets an error reply
/// (the event loop answers it without bothering the daemon); one beyond the
/// bound is cut off, because answering would mean reading it all.
#[derive(Debug)]
pub(crate) enum Incoming<R> {
    Valid(R),
    Malformed(String),
}

/// A codec for requests `Req` and responses `Resp`.
pub(crate) struct CborCodec<Req, Resp> {
    budget: ReadBudget,
    types: PhantomData<fn() -> (Req, Resp)>,
}

impl<Req, Resp> CborCodec<Req, Resp> {
    pub(crate) fn new(budget: ReadBudget) -> Self {
        Self {
            budget,
            types: PhantomData,
        }
    }
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::new(self.budget.clone())
    }
}

/// Reads an inbound request's bytes within the budget and the deadline.
async fn read_request_bytes<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
    budget: &ReadBudget,
) -> io::Result<Vec<u8>> {
    let read = async {
        let limit = M::MAX_BYTES + 1;
        let mut buf = Vec::new();
        let mut permits = Vec::new();
        loop {
            let piece = READ_PIECE.min(limit - buf.len());
            permits.push(budget.acquire(piece).await?);
            let start = buf.len();
            buf.resize(start + piece, 0);
            let n = read_up_to(io, &mut buf[start..]).await?;
            buf.truncate(start + n);
            if n < piece || buf.len() >= limit {
                // End of stream, or one byte past the bound: decode decides.
                return Ok(buf);
            }
        }
    };
    tokio::time::timeout(REQUEST_READ_TIMEOUT, read)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request not received in time"))?
}

/// Fills `buf` from `io` until it is full or the stream ends; returns how
/// much was read.
async fn read_up_to<T: AsyncRead + Unpin + Send>(io: &mut T, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match io.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Decodes a message read within its bound. An oversized message is an I/O
/// error (the stream is abandoned); a malformed one is decoded into its
/// error so the caller can answer it.
fn decode_bounded<M: Message>(buf: &[u8]) -> io::Result<Result<M, WireError>> {
    match wire::decode(buf) {
        Err(e @ WireError::TooLarge { .. }) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        decoded => Ok(decoded),
    }
}

/// Reads one response of at most `M::MAX_BYTES`: the answer to a request
/// we chose to send, so bounded by our own requests in flight.
async fn read_bounded<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<Result<M, WireError>> {
    let mut buf = Vec::new();
    io.take(M::MAX_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await?;
    decode_bounded(&buf)
}

async fn write_message<M: Message, T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    msg: &M,
) -> io::Result<()> {
    let bytes = wire::encode(msg).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl<Req, Resp> libp2p::request_response::Codec for CborCodec<Req, Resp>
where
    Req: Message + Send + Sync + 'static,
    Resp: Message + Send + Sync + 'static,
{
    type Protocol = StreamProtocol;
    type Request = Incoming<Req>;
    type Response = Resp;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Incoming<Req>>
    where
        T: AsyncRead + Unpin + Send,
    {
        let buf = read_request_bytes::<Req, T>(io, &self.budget).await?;
        Ok(match decode_bounded(&buf)? {
            Ok(req) => Incoming::Valid(req),
            Err(e) => Incoming::Malformed(e.to_string()),
        })
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Resp>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_bounded(io)
            .await?
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Incoming<Req>,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            Incoming::Valid(req) => write_message(io, &req).await,
            Incoming::Malformed(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "refusing to send a malformed request",
            )),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        resp: Resp,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &resp).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::request_response::Codec;
    use spare_core::wire::{BlobRequest, BlobResponse};

    fn protocol() -> StreamProtocol {
        StreamProtocol::new(spare_core::wire::BLOB_PROTOCOL)
    }

    /// Waits until every turn of `waiting` is taken.
    async fn all_turns_taken(waiting: &Semaphore) {
        while waiting.available_permits() > 0 {
            tokio::task::yield_now().await;
        }
    }

    /// Checks that one more request is refused at once, saying `why`.
    async fn refused_at_once<T: std::fmt::Debug>(
        asked: impl std::future::Future<Output = io::Result<T>>,
        why: &str,
    ) {
        let refused = tokio::time::timeout(Duration::from_secs(5), asked)
            .await
            .expect("refused at once, not made to wait");
        let error = refused.expect_err("one too many").to_string();
        assert!(error.contains(why), "{error}");
    }

    /// Requests of all peers wait for the node's budget, or a peer's
    /// share, unread, but only so many: one more is refused at once.
    #[tokio::test]
    async fn only_so_many_requests_wait_on_the_node() {
        let node = ReadBudget::new(READ_BUDGET_BYTES);
        let all = node.acquire(READ_BUDGET_BYTES).await.unwrap();
        let (mut waiting, mut shares) = (Vec::new(), Vec::new());
        for i in 0..MAX_WAITING {
            let node = node.clone();
            // Half wait for the node's bytes, half for their peer's turn.
            if i % 2 == 0 {
                waiting.push(tokio::spawn(async move { node.acquire(1).await.is_ok() }));
            } else {
                let peer = node.for_peer();
                shares.push(peer.admit(PEER_READ_BYTES).await.unwrap());
                waiting.push(tokio::spawn(async move { peer.admit(1).await.is_ok() }));
            }
        }
        all_turns_taken(&node.waiting).await;
        refused_at_once(
            node.acquire(1),
            "requests already wait for the node's read budget",
        )
        .await;
        let other = node.for_peer();
        let _share = other.admit(PEER_READ_BYTES).await.unwrap();
        assert!(other.admit(1).await.is_err(), "a peer's turn too");
        drop((all, shares));
        for waited in waiting {
            assert!(waited.await.unwrap(), "the waiting ones get their turn");
        }
        assert_eq!(node.waiting.available_permits(), MAX_WAITING);
    }

    /// Requests beyond the peer's share wait their turn unread, but only
    /// so many: one more is refused at once, and turns come back.
    #[tokio::test]
    async fn only_so_many_of_a_peers_requests_wait_their_turn() {
        let peer = ReadBudget::new(READ_BUDGET_BYTES).for_peer();
        let held = peer.admit(PEER_READ_BYTES).await.unwrap();
        let mut waiting = Vec::new();
        for _ in 0..MAX_WAITING_PER_PEER {
            let peer = peer.clone();
            waiting.push(tokio::spawn(async move { peer.admit(1).await.is_ok() }));
        }
        all_turns_taken(&peer.waiting).await;
        refused_at_once(peer.admit(1), "wait for their turn").await;
        drop(held);
        for admitted in waiting {
            assert!(admitted.await.unwrap(), "the waiting ones get their turn");
        }
        assert_eq!(peer.waiting.available_permits(), MAX_WAITING_PER_PEER);
    }

    #[tokio::test]
    async fn an_endless_stream_is_cut_at_the_bound() {
        let mut codec =
            CborCodec::<BlobRequest, BlobResponse>::new(ReadBudget::new(READ_BUDGET_BYTES));
        // A peer that sends far more than a blob response may hold.
        let flood = vec![0x5au8; BlobResponse::MAX_BYTES * 2];
        let mut io = futures::io::Cursor::new(flood);
        let err = codec.read_response(&protocol(), &mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(io.position() <= BlobResponse::MAX_BYTES as u64 + 1);
    }

    #[tokio::test]
    async fn messages_round_trip_through_a_stream() {
        let mut codec =
            CborCodec::<BlobRequest, BlobResponse>::new(ReadBudget::new(READ_BUDGET_BYTES));
        let req = BlobRequest {
            id: spare_core::BlobId::of(b"x"),
            offset: 0,
            len: 10,
        };
        let mut io = futures::io::Cursor::new(Vec::new());
        codec
            .write_request(&protocol(), &mut io, Incoming::Valid(req.clone()))
            .await
            .unwrap();
        io.set_position(0);
        let read = codec.read_request(&protocol(), &mut io).await.unwrap();
        assert!(matches!(read, Incoming::Valid(r) if r == req));
    }

    #[tokio::test]
    async fn an_oversized_request_is_cut_and_its_budget_returned() {
        let budget = ReadBudget::new(4 << 20);
        let mut codec = CborCodec::<BlobRequest, BlobResponse>::new(budget.clone());
        let mut io = futures::io::Cursor::new(vec![0u8; 10 << 20]);
        let err = codec.read_request(&protocol(), &mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(io.position() <= BlobRequest::MAX_BYTES as u64 + 1);
        assert_eq!(budget.available(), 4 << 20);
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_never_ends_times_out() {
        let mut codec =
            CborCodec::<BlobRequest, BlobResponse>::new(ReadBudget::new(READ_BUDGET_BYTES));
        // A stream that never delivers a byte and never closes.
        let (_writer, mut reader) = tokio::io::duplex(64);
        let mut io = tokio_util::compat::TokioAsyncReadCompatExt::compat(&mut reader);
        let err = codec.read_request(&protocol(), &mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    proptest::proptest! {
        /// Whatever a peer sends as a request or an answer, the codec reads
        /// at most one byte past the bound, never panics, and gives all of
        /// the budget back.
        #[test]
        fn arbitrary_bytes_never_panic_the_codec(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..1024),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .start_paused(true)
                .build()
                .unwrap();
            let budget = ReadBudget::new(1 << 20);
            let mut codec = CborCodec::<BlobRequest, BlobResponse>::new(budget.clone());
            let mut io = futures::io::Cursor::new(bytes.clone());
            let _ = runtime.block_on(codec.read_request(&protocol(), &mut io));
            proptest::prop_assert!(io.position() <= BlobRequest::MAX_BYTES as u64 + 1);
            proptest::prop_assert_eq!(budget.available(), 1 << 20);
            let mut io = futures::io::Cursor::new(bytes);
            let _ = runtime.block_on(codec.read_response(&protocol(), &mut io));
            proptest::prop_assert!(io.position() <= BlobResponse::MAX_BYTES as u64 + 1);
        }
    }

    #[tokio::test]
    async fn garbage_within_the_bound_is_reported_not_fatal() {
        let mut codec =
            CborCodec::<BlobRequest, BlobResponse>::new(ReadBudget::new(READ_BUDGET_BYTES));
        let mut io = futures::io::Cursor::new(b"\xff\x00garbage".to_vec());
        let read = codec.read_request(&protocol(), &mut io).await.unwrap();
        assert!(matches!(read, Incoming::Malformed(why) if why.starts_with("malformed message")));
    }
}

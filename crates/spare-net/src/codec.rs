//! The request-response codec: one CBOR message per stream, bounded.
//!
//! Reading stops one byte past the message type's bound, so a peer can never
//! make us buffer more than [`Message::MAX_BYTES`] + 1 bytes; decoding and
//! validation are [`spare_core::wire::decode`], which is property-tested.

use std::io;
use std::marker::PhantomData;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use spare_core::wire::{self, Message, WireError};

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
pub(crate) struct CborCodec<Req, Resp>(PhantomData<fn() -> (Req, Resp)>);

impl<Req, Resp> Default for CborCodec<Req, Resp> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<Req, Resp> Clone for CborCodec<Req, Resp> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

/// Reads one message of at most `M::MAX_BYTES`. An oversized message is an
/// I/O error (the stream is abandoned); a malformed one is decoded into its
/// error so the caller can answer it.
async fn read_bounded<M: Message, T: AsyncRead + Unpin + Send>(
    io: &mut T,
) -> io::Result<Result<M, WireError>> {
    let mut buf = Vec::new();
    io.take(M::MAX_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .await?;
    match wire::decode(&buf) {
        Err(e @ WireError::TooLarge { .. }) => Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        decoded => Ok(decoded),
    }
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
        Ok(match read_bounded(io).await? {
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

    #[tokio::test]
    async fn an_endless_stream_is_cut_at_the_bound() {
        let mut codec = CborCodec::<BlobRequest, BlobResponse>::default();
        // A peer that sends far more than a blob response may hold.
        let flood = vec![0x5au8; BlobResponse::MAX_BYTES * 2];
        let mut io = futures::io::Cursor::new(flood);
        let err = codec.read_response(&protocol(), &mut io).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(io.position() <= BlobResponse::MAX_BYTES as u64 + 1);
    }

    #[tokio::test]
    async fn messages_round_trip_through_a_stream() {
        let mut codec = CborCodec::<BlobRequest, BlobResponse>::default();
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
    async fn garbage_within_the_bound_is_reported_not_fatal() {
        let mut codec = CborCodec::<BlobRequest, BlobResponse>::default();
        let mut io = futures::io::Cursor::new(b"\xff\x00garbage".to_vec());
        let read = codec.read_request(&protocol(), &mut io).await.unwrap();
        assert!(matches!(read, Incoming::Malformed(why) if why.starts_with("malformed message")));
    }
}

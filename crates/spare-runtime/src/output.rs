//! Captured guest output with a hard byte limit.
//!
//! wasmtime-wasi's `MemoryOutputPipe` reports a full pipe as a closed stream,
//! which a guest may ignore and keep writing. This stream instead traps the
//! guest the moment it writes past its limit, and remembers why, so the task
//! ends at once with an error that names the stream and the limit.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// A byte buffer shared by every handle the guest opens on one stream.
#[derive(Clone, Debug)]
pub(crate) struct CappedOutput {
    state: Arc<Mutex<State>>,
}

#[derive(Debug)]
struct State {
    buffer: Vec<u8>,
    limit: usize,
    /// Set once a write went past `limit`.
    overflowed: bool,
}

/// Writes are accepted in chunks of at most this many bytes.
const WRITE_PERMIT: usize = 64 << 10;

impl CappedOutput {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                buffer: Vec::new(),
                limit: usize::try_from(limit).unwrap_or(usize::MAX),
                overflowed: false,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means another handle panicked mid-append; the
        // bytes are still a valid prefix of the output.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends `bytes`; if they would pass the limit, appends what fits (so
    /// the output holds its first `limit` bytes, as a truncated local run
    /// would) and fails.
    fn append(&self, bytes: &[u8]) -> Result<(), ()> {
        let mut state = self.lock();
        let room = state.limit.saturating_sub(state.buffer.len());
        if bytes.len() > room {
            let fits = &bytes[..room];
            state.buffer.extend_from_slice(fits);
            state.overflowed = true;
            return Err(());
        }
        state.buffer.extend_from_slice(bytes);
        Ok(())
    }

    pub(crate) fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    pub(crate) fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.lock().buffer)
    }
}

impl IsTerminal for CappedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for CappedOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes)
            .map_err(|()| StreamError::trap("output limit exceeded"))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always grant a permit, even past the limit: the write that follows
        // is what traps, so the guest cannot mistake a full stream for a
        // closed one and carry on.
        Ok(WRITE_PERMIT)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(
            self.append(buf)
                .map(|()| buf.len())
                .map_err(|()| std::io::Error::other("output limit exceeded")),
        )
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_past_the_limit_trap_and_are_remembered() {
        let out = CappedOutput::new(10);
        let mut stream = out.p2_stream();
        stream.write(Bytes::from_static(b"hello")).unwrap();
        assert!(stream.write(Bytes::from_static(b"world!")).is_err());
        assert!(out.overflowed());
        assert!(stream.write(Bytes::from_static(b"!")).is_err());
        // The output keeps its first ten bytes.
        assert_eq!(out.take(), b"helloworld");
    }
}

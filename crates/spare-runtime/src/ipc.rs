//! Framing between the daemon and its workers: a little-endian `u32` length,
//! then CBOR.
//!
//! A worker runs hostile code; if a guest ever escaped wasmtime it would
//! control the worker's side of the pipe. So the daemon treats frames from a
//! worker like messages from a peer: bounded, and decoded without panics.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use spare_core::{Limits, Outcome};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Job;
use crate::confine::ConfineReport;
use crate::priority::PriorityReport;

/// Largest frame the daemon sends: a job with up to 1 MiB of args and env
/// and 64 KiB of inline stdin.
pub(crate) const MAX_JOB_FRAME: usize = 4 << 20;
/// Largest frame a worker may send: an outcome with both output streams full.
pub(crate) const MAX_RESULT_FRAME: usize = 2 * Limits::MAX.output as usize + (64 << 10);

/// Largest frame a worker may send when it starts (what it could take
/// from itself, and notes on what it could not).
pub(crate) const MAX_READY_FRAME: usize = 64 << 10;

/// Largest frame a worker may send for a job under `limits`: its outcome
/// with both output streams at the job's own limit.
pub(crate) fn result_bound(limits: &Limits) -> usize {
    usize::try_from(limits.output)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .saturating_add(64 << 10)
        .min(MAX_RESULT_FRAME)
}

/// Daemon → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    Run(Box<Job>),
}

/// Worker → daemon.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum FromWorker {
    /// Sent once at start, after the worker lowered its priority and
    /// confined itself.
    Ready {
        priority: PriorityReport,
        #[serde(default)]
        confinement: ConfineReport,
    },
    /// The job's outcome.
    Done(Box<Outcome>),
    /// The job's outcome; its module was compiled for it and is not in the
    /// compiled-module cache, which the worker only reads.
    Uncached(Box<Outcome>),
}

fn encode<T: Serialize>(msg: &T) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 4];
    ciborium::into_writer(msg, &mut buf).map_err(io::Error::other)?;
    let len = u32::try_from(buf.len() - 4).map_err(|_| io::Error::other("frame too large"))?;
    buf[..4].copy_from_slice(&len.to_le_bytes());
    Ok(buf)
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> io::Result<T> {
    ciborium::from_reader(bytes)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))
}

fn check_len(len: u32, max: usize) -> io::Result<usize> {
    let len = len as usize;
    if len > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {max}-byte bound"),
        ));
    }
    Ok(len)
}

/// Blocking write, used by the worker.
pub(crate) fn write_frame<T: Serialize>(out: &mut impl Write, msg: &T) -> io::Result<()> {
    out.write_all(&encode(msg)?)?;
    out.flush()
}

/// Blocking read, used by the worker. `Ok(None)` at a clean end of stream.
pub(crate) fn read_frame<T: DeserializeOwned>(
    input: &mut impl Read,
    max: usize,
) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match input.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = check_len(u32::from_le_bytes(len), max)?;
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf)?;
    decode(&buf).map(Some)
}

/// Async write, used by the pool.
pub(crate) async fn write_frame_async<T: Serialize>(
    out: &mut (impl AsyncWrite + Unpin),
    msg: &T,
) -> io::Result<()> {
    out.write_all(&encode(msg)?).await?;
    out.flush().await
}

/// Async read, used by the pool. Errors at end of stream: a worker that
/// closes its pipe has died.
pub(crate) async fn read_frame_async<T: DeserializeOwned>(
    input: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> io::Result<T> {
    let len = check_len(input.read_u32_le().await?, max)?;
    let mut buf = vec![0u8; len];
    input.read_exact(&mut buf).await?;
    decode(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_result_is_bounded_by_its_jobs_output_limit() {
        let mut limits = Limits::DEFAULT;
        limits.output = 1000;
        assert_eq!(result_bound(&limits), 2000 + (64 << 10));
        assert_eq!(result_bound(&Limits::MAX), MAX_RESULT_FRAME);
        limits.output = u64::MAX;
        assert_eq!(result_bound(&limits), MAX_RESULT_FRAME);
    }

    #[test]
    fn frames_round_trip() {
        let msg = FromWorker::Done(Box::new(Outcome::failed(spare_core::Failure::Cancelled)));
        let mut buf = Vec::new();
        write_frame(&mut buf, &msg).unwrap();
        let back: FromWorker = read_frame(&mut buf.as_slice(), MAX_RESULT_FRAME)
            .unwrap()
            .unwrap();
        assert!(
            matches!(back, FromWorker::Done(o) if *o == Outcome::failed(spare_core::Failure::Cancelled))
        );
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"junk");
        let err = read_frame::<FromWorker>(&mut bytes.as_slice(), MAX_RESULT_FRAME).unwrap_err();
        assert!(err.to_string().contains("exceeds"));
    }

    /// Runs the async decoder to completion on `bytes`.
    fn read_async<T: DeserializeOwned>(bytes: &[u8], max: usize) -> io::Result<T> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(read_frame_async(&mut &*bytes, max))
    }

    /// A valid frame of each kind, for the decoders to see mutated.
    fn valid_frames(output: Vec<u8>, fuel: u64, arg: String) -> [Vec<u8>; 2] {
        let outcome = Outcome {
            status: spare_core::Status::Exited(3),
            stdout: output.clone(),
            stderr: output,
            fuel,
            wall_ms: fuel >> 20,
        };
        let job = crate::Job {
            task: spare_core::TaskId::random(),
            module: spare_core::BlobId::of(arg.as_bytes()),
            module_path: "/blobs/module".into(),
            name: "guest.wasm".into(),
            args: vec![arg.clone()],
            env: vec![(arg, "value".into())],
            stdin: crate::JobStdin::Bytes(b"stdin".to_vec()),
            limits: Limits::DEFAULT,
        };
        let mut frames = [Vec::new(), Vec::new()];
        write_frame(&mut frames[0], &FromWorker::Done(Box::new(outcome))).unwrap();
        write_frame(&mut frames[1], &ToWorker::Run(Box::new(job))).unwrap();
        frames
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating_async() {
        let mut bytes = u32::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"junk");
        let err = read_async::<FromWorker>(&bytes, MAX_RESULT_FRAME).unwrap_err();
        assert!(err.to_string().contains("exceeds"));
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_frame::<FromWorker>(&mut bytes.as_slice(), MAX_RESULT_FRAME);
            let _ = read_frame::<ToWorker>(&mut bytes.as_slice(), MAX_JOB_FRAME);
        }

        #[test]
        fn arbitrary_frames_never_panic_async(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = read_async::<FromWorker>(&bytes, MAX_RESULT_FRAME);
            let _ = read_async::<ToWorker>(&bytes, MAX_JOB_FRAME);
        }

        /// Valid frames with bytes changed, or cut short, or run on, are
        /// refused or decoded, by either decoder, never a panic.
        #[test]
        fn mutated_frames_never_panic(
            output in prop::collection::vec(any::<u8>(), 0..64),
            fuel in any::<u64>(),
            arg in ".{0,16}",
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            tail in prop::collection::vec(any::<u8>(), 0..16),
        ) {
            for mut frame in valid_frames(output, fuel, arg) {
                for (at, byte) in &edits {
                    let at = at.index(frame.len());
                    frame[at] = *byte;
                }
                let whole = frame.clone();
                frame.truncate(cut.index(frame.len() + 1));
                for bytes in [&whole, &frame, &[whole.as_slice(), &tail].concat()] {
                    let _ = read_frame::<FromWorker>(&mut bytes.as_slice(), MAX_RESULT_FRAME);
                    let _ = read_frame::<ToWorker>(&mut bytes.as_slice(), MAX_JOB_FRAME);
                    let _ = read_async::<FromWorker>(bytes, MAX_RESULT_FRAME);
                    let _ = read_async::<ToWorker>(bytes, MAX_JOB_FRAME);
                }
            }
        }

        /// A length above the bound is refused as such, from the header
        /// alone: nothing after it is read, nor allocated for.
        #[test]
        fn oversized_lengths_are_refused_from_the_header(extra in 1..=u32::MAX) {
            for max in [MAX_RESULT_FRAME, MAX_JOB_FRAME] {
                let header = (max as u32).saturating_add(extra).to_le_bytes();
                let err = read_async::<FromWorker>(&header, max).unwrap_err();
                prop_assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                prop_assert!(err.to_string().contains("exceeds"), "{}", err);
                let err = read_frame::<FromWorker>(&mut header.as_slice(), max).unwrap_err();
                prop_assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            }
        }
    }
}

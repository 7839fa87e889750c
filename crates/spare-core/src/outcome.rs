//! How a task ended.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::Limits;
use crate::units::{format_bytes, format_duration};

/// Longest free-text detail (a trap message, an invalid-module reason) a host
/// may send, in bytes. Longer text is cut by the sender and refused by the
/// receiver.
pub const MAX_DETAIL_BYTES: usize = 4096;

/// The result of running a task: exit status, captured output, and what it
/// cost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub status: Status,
    #[serde(with = "serde_bytes")]
    pub stdout: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub stderr: Vec<u8>,
    /// Fuel consumed (metered WebAssembly instructions).
    pub fuel: u64,
    /// Wall-clock time of execution on the host, in milliseconds.
    pub wall_ms: u64,
}

/// Whether the guest exited by itself or was stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    /// The guest returned from its entry point (code 0) or called `exit`.
    Exited(i32),
    /// The guest did not finish; the sandbox or the host stopped it.
    Failed(Failure),
}

impl Outcome {
    /// An outcome for a task that never ran.
    /// Its detail text is cut to [`MAX_DETAIL_BYTES`], which may quote what
    /// a worker or a peer sent.
    pub fn failed(failure: Failure) -> Self {
        Self {
            status: Status::Failed(failure.clipped()),
            stdout: Vec::new(),
            stderr: Vec::new(),
            fuel: 0,
            wall_ms: 0,
        }
    }

    /// The guest's exit code, if it exited.
    pub fn exit_code(&self) -> Option<i32> {
        match self.status {
            Status::Exited(code) => Some(code),
            Status::Failed(_) => None,
        }
    }

    pub fn failure(&self) -> Option<&Failure> {
        match &self.status {
            Status::Exited(_) => None,
            Status::Failed(failure) => Some(failure),
        }
    }

    /// Checks the bounds a receiver relies on: output within the largest
    /// limit any host grants, detail text within [`MAX_DETAIL_BYTES`].
    pub fn validate(&self) -> Result<(), String> {
        let max = Limits::MAX.output;
        for (name, bytes) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if bytes.len() as u64 > max {
                return Err(format!(
                    "{name} is {} bytes, above the maximum {max}",
                    bytes.len()
                ));
            }
        }
        if let Status::Failed(failure) = &self.status {
            failure.validate()?;
        }
        Ok(())
    }
}

/// Which output stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

impl fmt::Display for OutputStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        })
    }
}

/// Why a guest did not finish. The `Display` form is a predicate that
/// completes "the program …": the one-line message a user sees.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Failure {
    #[error("is not a WebAssembly module or component ({0})")]
    NotWasm(String),
    #[error("is not valid WebAssembly: {0}")]
    Invalid(String),
    #[error("imports `{module}::{name}`, which the sandbox does not provide")]
    MissingImport { module: String, name: String },
    #[error("has no entry point (a WASI command exports `_start`)")]
    NoEntryPoint,
    #[error("ran out of fuel (limit {limit})")]
    OutOfFuel { limit: u64 },
    #[error("exceeded its memory limit of {}", format_bytes(*.limit))]
    MemoryLimit { limit: u64 },
    #[error("overflowed its stack (limit {})", format_bytes(*.limit))]
    StackOverflow { limit: u64 },
    #[error("exceeded its wall-time limit of {}", format_duration(std::time::Duration::from_millis(*.limit_ms)))]
    Timeout { limit_ms: u64 },
    #[error("wrote more than {} to {stream}", format_bytes(*.limit))]
    OutputLimit { stream: OutputStream, limit: u64 },
    #[error("trapped: {0}")]
    Trap(String),
    #[error("lost its worker process: {0}")]
    WorkerCrashed(String),
    #[error("was cancelled")]
    Cancelled,
    #[error("failed on its host: {0}")]
    Host(String),
}

impl Failure {
    /// The limit this failure hit, if it is a limit's.
    pub fn limit(&self) -> Option<crate::limits::Limit> {
        use crate::limits::Limit;
        match self {
            Failure::OutOfFuel { .. } => Some(Limit::Fuel),
            Failure::MemoryLimit { .. } => Some(Limit::Memory),
            Failure::StackOverflow { .. } => Some(Limit::Stack),
            Failure::Timeout { .. } => Some(Limit::WallTime),
            Failure::OutputLimit { .. } => Some(Limit::Output),
            _ => None,
        }
    }

    /// Whether another host could plausibly succeed where this one failed.
    ///
    /// Guest faults (fuel, memory, traps, bad modules) would fail anywhere
    /// under the same limits; a crashed worker or host error might not. (A
    /// requester that lowered a default limit to fit a host may still try a
    /// host that grants more: `spare-node`'s requester.)
    pub fn is_retryable(&self) -> bool {
        matches!(self, Failure::WorkerCrashed(_) | Failure::Host(_))
    }

    /// The same failure with each detail text cut to [`MAX_DETAIL_BYTES`].
    pub fn clipped(self) -> Self {
        match self {
            Failure::NotWasm(t) => Failure::NotWasm(clip_detail(t)),
            Failure::Invalid(t) => Failure::Invalid(clip_detail(t)),
            Failure::Trap(t) => Failure::Trap(clip_detail(t)),
            Failure::WorkerCrashed(t) => Failure::WorkerCrashed(clip_detail(t)),
            Failure::Host(t) => Failure::Host(clip_detail(t)),
            Failure::MissingImport { module, name } => Failure::MissingImport {
                module: clip_detail(module),
                name: clip_detail(name),
            },
            other => other,
        }
    }

    fn validate(&self) -> Result<(), String> {
        let texts: &[&str] = match self {
            Failure::NotWasm(t)
            | Failure::Invalid(t)
            | Failure::Trap(t)
            | Failure::WorkerCrashed(t)
            | Failure::Host(t) => &[t.as_str()],
            Failure::MissingImport { module, name } => &[module.as_str(), name.as_str()],
            _ => &[],
        };
        if texts.iter().any(|t| t.len() > MAX_DETAIL_BYTES) {
            return Err(format!(
                "failure detail longer than {MAX_DETAIL_BYTES} bytes"
            ));
        }
        Ok(())
    }
}

/// Cuts `text` to at most [`MAX_DETAIL_BYTES`] on a character boundary.
pub fn clip_detail(mut text: String) -> String {
    if text.len() > MAX_DETAIL_BYTES {
        let mut end = MAX_DETAIL_BYTES - 3;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's or a peer's words quoted in a failure (a decoder's error
    /// may quote kilobytes of them) never make an outcome its receiver
    /// refuses.
    #[test]
    fn a_failures_detail_is_cut_to_its_bound() {
        let long = "é".repeat(MAX_DETAIL_BYTES);
        for failure in [
            Failure::NotWasm(long.clone()),
            Failure::Invalid(long.clone()),
            Failure::Trap(long.clone()),
            Failure::WorkerCrashed(long.clone()),
            Failure::Host(long.clone()),
            Failure::MissingImport {
                module: long.clone(),
                name: long.clone(),
            },
        ] {
            let outcome = Outcome::failed(failure.clone());
            assert!(failure.validate().is_err(), "{failure:?}");
            assert_eq!(outcome.validate(), Ok(()), "{failure:?}");
        }
        let short = Failure::Host("no room".into());
        assert_eq!(short.clone().clipped(), short);
    }

    #[test]
    fn failures_read_as_one_line() {
        let cases = [
            Failure::OutOfFuel { limit: 1000 },
            Failure::MemoryLimit { limit: 64 << 20 },
            Failure::Timeout { limit_ms: 5000 },
            Failure::OutputLimit {
                stream: OutputStream::Stdout,
                limit: 1 << 20,
            },
            Failure::MissingImport {
                module: "env".into(),
                name: "launch".into(),
            },
        ];
        let texts: Vec<String> = cases.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            [
                "ran out of fuel (limit 1000)",
                "exceeded its memory limit of 64 MiB",
                "exceeded its wall-time limit of 5 s",
                "wrote more than 1 MiB to stdout",
                "imports `env::launch`, which the sandbox does not provide",
            ]
        );
        assert!(texts.iter().all(|t| !t.contains('\n')));
    }

    #[test]
    fn clip_detail_respects_char_boundaries() {
        let long = "é".repeat(MAX_DETAIL_BYTES);
        let clipped = clip_detail(long);
        assert!(clipped.len() <= MAX_DETAIL_BYTES);
        assert!(clipped.ends_with("..."));
    }

    #[test]
    fn oversized_outcomes_are_refused() {
        // As a peer may send it: `Outcome::failed` would clip it.
        let mut outcome = Outcome {
            status: Status::Failed(Failure::Trap("x".repeat(MAX_DETAIL_BYTES + 1))),
            ..Outcome::failed(Failure::Cancelled)
        };
        assert!(outcome.validate().is_err());
        outcome.status = Status::Exited(0);
        assert!(outcome.validate().is_ok());
        outcome.stdout = vec![0; Limits::MAX.output as usize + 1];
        assert!(outcome.validate().is_err());
    }
}

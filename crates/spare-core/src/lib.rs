//! Core types of spare, shared by every other crate.
//!
//! This crate holds what two peers, or the daemon and its CLI, must agree on:
//! identifiers ([`BlobId`], [`TaskId`]), human units ([`units`]), the limits a
//! guest runs under ([`Limits`]), the description of a task ([`TaskSpec`]) and
//! how it ended ([`Outcome`]), the wire protocol between peers ([`wire`]) and
//! the signed receipts a host issues for work done ([`receipt`]).
//!
//! It does no I/O. Everything that crosses a trust boundary is validated here,
//! once, by the type that describes it.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod id;
pub mod limits;
pub mod outcome;
pub mod receipt;
pub mod task;
pub mod units;
pub mod wasm;
pub mod wire;

pub use id::{BlobId, ParseIdError, TaskId};
pub use libp2p::{PeerId, identity};
pub use limits::Limits;
pub use outcome::{Failure, Outcome, OutputStream, Status};
pub use receipt::{Receipt, SignedReceipt};
pub use task::{BlobRef, Stdin, TaskSpec};

/// Milliseconds since the Unix epoch, the one timestamp format spare stores
/// and sends.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

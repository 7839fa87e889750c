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
mod log_budget;
pub mod outcome;
pub mod receipt;
pub mod task;
pub mod text;
pub mod units;
pub mod wasm;
pub mod wire;

pub use id::{BlobId, ParseIdError, TaskId};
pub use libp2p::{PeerId, identity};
pub use limits::{Limit, LimitRequest, Limits};
pub use log_budget::LogBudget;
pub use outcome::{Failure, Outcome, OutputStream, Status};
pub use receipt::{Receipt, SignedReceipt};
pub use task::{BlobRef, Stdin, TaskSpec};

/// Peers whose text form one thread keeps; beyond this the cache starts
/// over. A node talks to a handful of peers at a time.
const PEER_TEXT_CACHE: usize = 256;

/// The text (base58) form of `peer`, as `to_string` gives it, but cached
/// per thread: base58 costs microseconds, and the daemon writes the same
/// few peer ids into several records of every task.
pub fn peer_text(peer: &PeerId) -> String {
    use std::cell::RefCell;
    use std::collections::HashMap;
    thread_local! {
        static TEXT: RefCell<HashMap<PeerId, String>> = RefCell::new(HashMap::new());
    }
    TEXT.with_borrow_mut(|cache| {
        if let Some(text) = cache.get(peer) {
            return text.clone();
        }
        if cache.len() >= PEER_TEXT_CACHE {
            cache.clear();
        }
        let text = peer.to_string();
        cache.insert(*peer, text.clone());
        text
    })
}

/// Milliseconds since the Unix epoch, the one timestamp format spare stores
/// and sends.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_cached_text_is_its_base58_form() {
        let peers: Vec<PeerId> = (0..PEER_TEXT_CACHE + 10)
            .map(|_| PeerId::random())
            .collect();
        // Twice round, past the cache's size, so it starts over on the way.
        for peer in peers.iter().chain(&peers) {
            assert_eq!(peer_text(peer), peer.to_string());
        }
    }
}

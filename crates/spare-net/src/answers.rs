//! The node-wide budget of task answers a host holds for its requesters.
//!
//! A finished task's answer (up to twice its output limit) stays in the
//! host's memory until the requester has read it, which a requester that
//! does not read makes last until the answer's deadline. So a host reserves
//! room for a task's largest answer ([`TaskResponse::bound_for`]) before
//! it runs the task, keeps what the answer takes once the task has ended,
//! and holds that until the answer has been written or given up: the
//! answers a node holds, and the outputs of the tasks it runs, never exceed
//! the budget. The budget is room for two of the largest answers the host
//! grants per slot ([`answer_budget`]), and one requester may hold at most
//! half of it: enough to run a task in every slot, however large its
//! output limit, and the other half still does as much for everyone else.
//! A requester that does not read its answers holds up its own next tasks.
//!
//! Answers with no output (refusals, a cancel's acknowledgement, at most
//! [`TaskResponse::SMALL_BYTES`]) reserve nothing: they fit in the stream's
//! send window and leave the node as they are written.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use spare_core::wire::TaskResponse;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The slots a budget is made for, at least: a one-slot host still lets
/// one requester's answers wait to be read while its next task runs.
const MIN_BUDGET_SLOTS: usize = 2;
/// The share of the budget one requester may hold: a half.
const PEER_SHARE: usize = 2;

/// The answer budget of a host with `slots` slots that grants answers of
/// up to `largest` bytes (`TaskResponse::bound_for` its maximum limits):
/// two of them per slot, for at least two slots.
pub fn answer_budget(slots: usize, largest: usize) -> usize {
    slots
        .max(MIN_BUDGET_SLOTS)
        .saturating_mul(largest)
        .saturating_mul(PEER_SHARE)
}

/// The node-wide budget: one permit per byte of answers held; and each
/// requester's share of it, kept while anything holds it, so that a
/// requester cannot get a fresh share by closing its streams while its
/// answers are still held.
#[derive(Clone, Debug)]
pub(crate) struct AnswerBudget {
    all: Arc<Semaphore>,
    share: usize,
    shares: Arc<Mutex<HashMap<PeerId, Arc<Semaphore>>>>,
}

impl AnswerBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        let bytes = bytes.clamp(
            PEER_SHARE * TaskResponse::SMALL_BYTES,
            Semaphore::MAX_PERMITS,
        );
        Self {
            all: Arc::new(Semaphore::new(bytes)),
            share: bytes / PEER_SHARE,
            shares: Arc::default(),
        }
    }

    /// `peer`'s share, for the answers to its task streams.
    pub(crate) fn for_peer(&self, peer: PeerId) -> AnswerRoom {
        let mut shares = self.shares.lock().unwrap_or_else(|p| p.into_inner());
        // Shares nothing holds any more (no stream, no reservation) go:
        // the table is as large as the peers being served.
        shares.retain(|_, own| Arc::strong_count(own) > 1);
        let own = shares
            .entry(peer)
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)));
        AnswerRoom {
            all: Arc::clone(&self.all),
            own: Arc::clone(own),
            share: self.share,
        }
    }

    /// Bytes not held now.
    #[cfg(test)]
    pub(crate) fn available(&self) -> usize {
        self.all.available_permits()
    }
}

/// A requester's share of the host's answer budget, where a task's answer
/// is reserved before it runs.
#[derive(Clone, Debug)]
pub struct AnswerRoom {
    all: Arc<Semaphore>,
    own: Arc<Semaphore>,
    share: usize,
}

impl AnswerRoom {
    /// Waits until there is room for an answer of up to `bytes` in this
    /// peer's share and in the node's budget, and holds it until the
    /// returned reservation is dropped (sent with the answer, it is held
    /// until the answer has been written). Requests wait their turn, first
    /// come first served. Cancel-safe.
    pub async fn reserve(&self, bytes: usize) -> Reserved {
        // A host runs only tasks within the limits it grants, whose answers
        // fit a share; were one larger, it is held to the share, so that it
        // comes at all.
        let units = u32::try_from(bytes.min(self.share)).unwrap_or(u32::MAX);
        // Neither semaphore is ever closed, so neither wait fails.
        let own = Arc::clone(&self.own).acquire_many_owned(units).await;
        let all = Arc::clone(&self.all).acquire_many_owned(units).await;
        Reserved {
            own: own.ok(),
            all: all.ok(),
        }
    }
}

/// Room reserved for one answer; given back when dropped.
#[derive(Debug)]
pub struct Reserved {
    own: Option<OwnedSemaphorePermit>,
    all: Option<OwnedSemaphorePermit>,
}

impl Reserved {
    /// Gives back all of the room but `bytes`: once a task has ended, its
    /// answer needs only what its output and the rest take, and the room
    /// it does not need serves the requester's next task at once.
    pub fn keep(&mut self, bytes: usize) {
        for permit in [&mut self.own, &mut self.all].into_iter().flatten() {
            let extra = permit.num_permits().saturating_sub(bytes);
            drop(permit.split(extra));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use spare_core::Limits;

    use super::*;

    fn pending<F: std::future::Future>(future: F) -> bool {
        futures::FutureExt::now_or_never(future).is_none()
    }

    #[tokio::test]
    async fn a_peer_holds_at_most_its_share_and_the_node_at_most_its_budget() {
        let largest = TaskResponse::bound_for(&Limits::MAX);
        let budget = AnswerBudget::new(answer_budget(2, largest));
        let total = budget.available();
        assert_eq!(total, 4 * largest);
        let [greedy, other, third] = [(); 3].map(|()| budget.for_peer(PeerId::random()));

        // A share holds the largest answer for each slot: one requester
        // may run a task in every slot; one more waits.
        let first = greedy.reserve(largest).await;
        let _second = greedy.reserve(largest).await;
        assert!(pending(greedy.reserve(1)), "past its share");
        // The other half does as much for the others...
        let _theirs = [other.reserve(largest).await, other.reserve(largest).await];
        assert_eq!(budget.available(), 0);
        // ...and with all of it held, everyone waits.
        assert!(pending(third.reserve(1)), "past the node's budget");

        // Given back, the room serves the waiting one.
        let waiting = tokio::spawn(async move { third.reserve(largest).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room given back is taken")
            .unwrap();
    }

    #[tokio::test]
    async fn room_an_answer_does_not_need_is_given_back_at_once() {
        let budget = AnswerBudget::new(answer_budget(1, 16 << 20));
        let total = budget.available();
        let room = budget.for_peer(PeerId::random());
        let mut reserved = room.reserve(10 << 20).await;
        reserved.keep(1 << 20);
        assert_eq!(budget.available(), total - (1 << 20));
        // Keeping more than was reserved keeps what was.
        reserved.keep(20 << 20);
        assert_eq!(budget.available(), total - (1 << 20));
        // The peer's share is given back too.
        assert_eq!(room.own.available_permits(), total / 2 - (1 << 20));
        drop(reserved);
        assert_eq!(room.own.available_permits(), total / 2);
        assert_eq!(budget.available(), total);
    }

    /// A requester that closes its streams while its answers are held
    /// finds its share as it left it: it cannot get a fresh one that way.
    #[tokio::test]
    async fn a_share_lasts_while_anything_holds_it() {
        let budget = AnswerBudget::new(answer_budget(1, 16 << 20));
        let peer = PeerId::random();
        let room = budget.for_peer(peer);
        let held = room.reserve(room.share).await;
        drop(room);
        let again = budget.for_peer(peer);
        assert!(pending(again.reserve(1)), "the same share, still held");
        drop((held, again));
        // Once nothing holds it, it goes from the table.
        let _other = budget.for_peer(PeerId::random());
        assert_eq!(budget.shares.lock().unwrap().len(), 1);
    }

    #[test]
    fn the_budget_grows_with_the_slots_and_what_the_host_grants() {
        assert_eq!(answer_budget(1, 10), 40);
        assert_eq!(answer_budget(16, 10), 320);
        // Even a budget set too small lets a peer have an answer without
        // output, and a reservation is never larger than a share.
        let budget = AnswerBudget::new(0);
        assert_eq!(budget.share, TaskResponse::SMALL_BYTES);
        let room = budget.for_peer(PeerId::random());
        assert!(!pending(room.reserve(usize::MAX)));
    }
}

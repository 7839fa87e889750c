//! The node-wide budget of task answers a host holds for its requesters.
//!
//! A finished task's answer (up to twice its output limit) stays in the
//! host's memory until the requester has read it, which a requester that
//! does not read makes last until the answer's deadline. So a host reserves
//! room for a task's largest answer ([`TaskResponse::bound_for`]) before
//! it runs the task, and holds the room until the answer has been written
//! or given up: the answers a node holds, and the outputs of the tasks it
//! runs, never exceed the budget. One requester may hold at most half of
//! it (`PEER_SHARE`); a requester that does not read its answers holds up
//! its own next tasks, and once all of it is held, everyone's wait.
//!
//! Answers with no output (refusals, a cancel's acknowledgement, at most
//! [`TaskResponse::SMALL_BYTES`]) reserve nothing: they fit in the stream's
//! send window and leave the node as they are written.

use std::sync::Arc;

use spare_core::wire::{Message, TaskResponse};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The budget for each of a host's slots (running tasks), at least
/// [`MIN_BUDGET_SLOTS`] of them: room for every slot to hold the answers
/// of about four tasks at the default output limit, so that it takes the
/// next task while the last answers are read.
const BYTES_PER_SLOT: usize = 64 << 20;
const MIN_BUDGET_SLOTS: usize = 4;
/// The share of the budget one requester may hold: a half.
const PEER_SHARE: usize = 2;

const _: () = assert!(
    TaskResponse::MAX_BYTES <= MIN_BUDGET_SLOTS * BYTES_PER_SLOT / PEER_SHARE,
    "a requester's share holds the largest answer"
);

/// The answer budget of a host with `slots` slots: 64 MiB per slot and at
/// least 256 MiB.
pub fn answer_budget(slots: usize) -> usize {
    slots.max(MIN_BUDGET_SLOTS).saturating_mul(BYTES_PER_SLOT)
}

/// The node-wide budget: one permit per byte of answers held.
#[derive(Clone, Debug)]
pub(crate) struct AnswerBudget {
    all: Arc<Semaphore>,
    share: usize,
}

impl AnswerBudget {
    pub(crate) fn new(bytes: usize) -> Self {
        let bytes = bytes.clamp(TaskResponse::MAX_BYTES * PEER_SHARE, Semaphore::MAX_PERMITS);
        Self {
            all: Arc::new(Semaphore::new(bytes)),
            share: bytes / PEER_SHARE,
        }
    }

    /// One peer's share, for the answers to its task streams.
    pub(crate) fn for_peer(&self) -> AnswerRoom {
        AnswerRoom {
            all: Arc::clone(&self.all),
            own: Arc::new(Semaphore::new(self.share)),
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
}

impl AnswerRoom {
    /// Waits until there is room for an answer of up to `bytes` in this
    /// peer's share and in the node's budget, and holds it until the
    /// returned reservation is dropped (sent with the answer, it is held
    /// until the answer has been written). Requests wait their turn, first
    /// come first served. Cancel-safe.
    pub async fn reserve(&self, bytes: usize) -> Reserved {
        let units = u32::try_from(bytes.min(TaskResponse::MAX_BYTES)).unwrap_or(u32::MAX);
        // Neither semaphore is ever closed, so neither wait fails; a
        // reservation is never larger than a share, so it always comes.
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
        let budget = AnswerBudget::new(answer_budget(2));
        let total = budget.available();
        assert_eq!(total, 256 << 20);
        let largest = TaskResponse::bound_for(&Limits::MAX);
        let (greedy, other, third) = (budget.for_peer(), budget.for_peer(), budget.for_peer());

        // A share holds two of the largest answers minus a little: the
        // second waits for the first to be given back.
        let first = greedy.reserve(largest).await;
        assert!(pending(greedy.reserve(largest)), "past its share");
        // Others are not held up by it...
        let theirs = other.reserve(largest).await;
        assert_eq!(budget.available(), total - 2 * largest);
        // ...until the node's budget is held.
        let mut rest = vec![other.reserve(total / 2 - largest).await];
        assert!(pending(other.reserve(1)), "its share is held");
        rest.push(third.reserve(budget.available() - 1).await);
        assert_eq!(budget.available(), 1);
        assert!(pending(third.reserve(2)), "past the node's budget");
        let small = third.reserve(1).await;
        drop((rest, small));

        // Given back, the room serves the waiting one.
        let waiting = tokio::spawn({
            let greedy = greedy.clone();
            async move { greedy.reserve(largest).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(first);
        let second = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("room given back is taken")
            .unwrap();
        drop((second, theirs));
        assert_eq!(budget.available(), total);
    }

    #[tokio::test]
    async fn room_an_answer_does_not_need_is_given_back_at_once() {
        let budget = AnswerBudget::new(answer_budget(1));
        let total = budget.available();
        let room = budget.for_peer();
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

    #[test]
    fn the_budget_grows_with_the_slots_and_holds_the_largest_answers() {
        assert_eq!(answer_budget(1), 256 << 20);
        assert_eq!(answer_budget(16), 1 << 30);
        // Even a budget set too small lets a peer have the largest answer.
        let budget = AnswerBudget::new(0);
        assert_eq!(budget.share, TaskResponse::MAX_BYTES);
        // A reservation is never larger than that.
        let room = budget.for_peer();
        assert!(!pending(room.reserve(usize::MAX)));
    }
}

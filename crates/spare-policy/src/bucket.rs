//! Token buckets that pace the bytes a node moves for the swarm.
//!
//! A bucket fills at `rate` bytes per second up to one second's worth (the
//! burst). Taking more than is there waits for the difference, so the
//! long-run rate never exceeds `rate`, and a transfer that starts after a
//! quiet spell gets at most one second's burst ahead. An unlimited bucket
//! only counts.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One direction's limit, shared by every transfer in that direction.
#[derive(Debug)]
pub struct TokenBucket {
    rate: Option<u64>,
    state: Mutex<State>,
    moved: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// Bytes that may be moved now; negative when transfers have reserved
    /// ahead and are waiting.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A bucket of `rate` bytes per second; `None` never waits.
    pub fn new(rate: Option<u64>) -> Self {
        Self {
            rate,
            state: Mutex::new(State {
                tokens: rate.unwrap_or(0) as f64,
                at: Instant::now(),
            }),
            moved: AtomicU64::new(0),
        }
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Bytes moved through this bucket so far.
    pub fn moved(&self) -> u64 {
        self.moved.load(Ordering::Relaxed)
    }

    /// Reserves `bytes` and says how long to wait before moving them.
    pub fn reserve(&self, bytes: u64) -> Duration {
        self.moved.fetch_add(bytes, Ordering::Relaxed);
        let Some(rate) = self.rate else {
            return Duration::ZERO;
        };
        let rate = rate.max(1) as f64;
        let mut state = self.refilled(rate);
        state.tokens -= bytes as f64;
        if state.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-state.tokens / rate)
        }
    }

    /// Waits until `bytes` may be moved.
    pub async fn take(&self, bytes: u64) {
        let wait = self.reserve(bytes);
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Like [`TokenBucket::take`], but gives up if `stop` resolves first,
    /// and gives the bytes back, since they were not moved: a transfer
    /// abandoned while it waited leaves no debt for the next. Whether the
    /// bytes may be moved.
    pub async fn take_until(
        &self,
        bytes: u64,
        stop: impl std::future::Future<Output = ()>,
    ) -> bool {
        let wait = self.reserve(bytes);
        if wait.is_zero() {
            return true;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = stop => {
                self.moved.fetch_sub(bytes, Ordering::Relaxed);
                if self.rate.is_some() {
                    self.lock().tokens += bytes as f64;
                }
                false
            }
        }
    }

    /// Counts `bytes` that have already arrived unasked (a peer sent them
    /// with its request): they take from the bucket, so this node's own
    /// transfers make up for them, but never put it more than one
    /// second's worth in debt ([`MAX_DEBT`]), since nothing this node does
    /// can slow a peer that pushes faster. Nor do they ever lift it: a
    /// bucket deeper in debt (transfers reserved ahead) stays there, else
    /// any peer could forgive this node's own transfers their waits by
    /// sending a byte of stdin.
    pub fn arrived(&self, bytes: u64) {
        self.moved.fetch_add(bytes, Ordering::Relaxed);
        let Some(rate) = self.rate else {
            return;
        };
        let rate = rate.max(1) as f64;
        let mut state = self.refilled(rate);
        let floor = -rate * MAX_DEBT.as_secs_f64();
        state.tokens = state.tokens.min((state.tokens - bytes as f64).max(floor));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, with the tokens the time since it was last seen brings
    /// at `rate`, up to the burst.
    fn refilled(&self, rate: f64) -> std::sync::MutexGuard<'_, State> {
        let mut state = self.lock();
        let now = Instant::now();
        let refill = now.duration_since(state.at).as_secs_f64() * rate;
        state.tokens = (state.tokens + refill).min(rate);
        state.at = now;
        state
    }
}

/// The most that bytes which arrived unasked can put a bucket in debt.
pub const MAX_DEBT: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn unlimited_only_counts() {
        let bucket = TokenBucket::new(None);
        assert_eq!(bucket.reserve(1 << 30), Duration::ZERO);
        assert_eq!(bucket.moved(), 1 << 30);
    }

    #[test]
    fn a_burst_then_the_rate() {
        let bucket = TokenBucket::new(Some(1000));
        // One second's worth is there at once.
        assert_eq!(bucket.reserve(1000), Duration::ZERO);
        // The next 500 bytes wait half a second (less the microseconds
        // that passed).
        let wait = bucket.reserve(500);
        assert!(
            wait > Duration::from_millis(490) && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        // And the next 1000 a further second.
        let wait = bucket.reserve(1000);
        assert!(
            wait > Duration::from_millis(1490) && wait <= Duration::from_millis(1500),
            "{wait:?}"
        );
    }

    #[test]
    fn bytes_that_arrived_unasked_leave_at_most_a_seconds_debt() {
        let bucket = TokenBucket::new(Some(1000));
        bucket.arrived(1_000_000);
        assert_eq!(bucket.moved(), 1_000_000);
        // The burst is gone and a second's debt is left, not a thousand.
        let wait = bucket.reserve(1000);
        assert!(
            wait > Duration::from_millis(1990) && wait <= Duration::from_millis(2000),
            "{wait:?}"
        );
    }

    #[test]
    fn bytes_that_arrived_unasked_never_lift_a_deeper_debt() {
        let bucket = TokenBucket::new(Some(1000));
        // Transfers reserved ten seconds ahead.
        bucket.reserve(11_000);
        bucket.arrived(1);
        let wait = bucket.reserve(1000);
        assert!(
            wait > Duration::from_millis(10_990) && wait <= Duration::from_millis(11_001),
            "{wait:?}"
        );
    }

    #[tokio::test]
    async fn a_transfer_given_up_while_it_waits_leaves_no_debt() {
        let bucket = TokenBucket::new(Some(1000));
        assert!(bucket.take_until(1000, std::future::pending()).await);
        // Ten seconds' worth, given up at once: given back.
        assert!(!bucket.take_until(10_000, std::future::ready(())).await);
        assert_eq!(bucket.moved(), 1000);
        let wait = bucket.reserve(500);
        assert!(wait <= Duration::from_millis(500), "{wait:?}");
    }

    proptest! {
        /// However transfers are cut into pieces, the waits add up to what
        /// the rate demands beyond the burst.
        #[test]
        fn waits_follow_the_rate(rate in 1_000u64..10_000_000, pieces in proptest::collection::vec(1u64..2_000_000, 1..50)) {
            let bucket = TokenBucket::new(Some(rate));
            let total: u64 = pieces.iter().sum();
            let mut last = Duration::ZERO;
            for piece in &pieces {
                last = bucket.reserve(*piece);
            }
            let expected = (total.saturating_sub(rate)) as f64 / rate as f64;
            // Reservations are back to back, so only microseconds of refill
            // separate the last wait from the ideal.
            prop_assert!((last.as_secs_f64() - expected).abs() < 0.01 + expected * 0.001,
                "last wait {last:?}, expected {expected}");
        }
    }
}

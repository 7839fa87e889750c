//! Placement decisions: which peer runs a task, and where to go when a host
//! fails. Pure functions over snapshots, no I/O, so every rule here is
//! property-tested.
//!
//! The daemon gathers [`Candidate`]s from what it knows (offers heard on
//! gossipsub, ping round-trip times, its own in-flight tasks), asks
//! [`place`] for a peer and the limits to run with there (by [`rank`]'s
//! order), and [`grants_more`] whether a limit lowered to fit one host is
//! worth another, and consults [`RetryPolicy`] after each failed attempt.
//! [`Standing`] remembers, across tasks, the hosts that failed this node's
//! tasks lately, so that a host whose offer attracts tasks it then fails
//! is tried after the others.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::cmp::Ordering;
use std::collections::HashMap;
use std::time::{Duration, Instant};

use spare_core::{Limit, LimitRequest, Limits, PeerId};

/// What the requester knows about one connected peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub peer: PeerId,
    /// Cores the peer contributes.
    pub cores: u16,
    /// Idle cores in the peer's latest offer.
    pub idle: u16,
    /// Tasks queued on the peer, per its latest offer.
    pub queued: u32,
    /// Tasks this node sent there since that offer and not yet answered;
    /// corrects the offer between publications.
    pub in_flight: u32,
    /// Latest ping round-trip time, if any.
    pub rtt: Option<Duration>,
    /// The largest limits the peer grants.
    pub max_limits: Limits,
    /// Recent failures of this node's tasks there, per [`Standing`].
    pub strikes: u32,
}

impl Candidate {
    /// Idle cores left after the tasks we already sent; negative means the
    /// peer will queue our next task.
    fn spare_cores(&self) -> i64 {
        i64::from(self.idle) - i64::from(self.in_flight)
    }

    /// Work waiting ahead of a new task, per core.
    fn backlog_per_core(&self) -> u64 {
        let waiting =
            u64::from(self.queued) + u64::from(self.in_flight.saturating_sub(u32::from(self.idle)));
        waiting * 1000 / u64::from(self.cores.max(1))
    }

    fn grants(&self, limits: &Limits) -> bool {
        limits.check_within(&self.max_limits).is_ok()
    }
}

/// Orders candidates best first for a task with `limits`, leaving out peers
/// in `exclude` (already tried) and peers that would refuse the limits.
///
/// Best means: fewer recent failures (see [`Standing`]) beat an offer, as
/// an offer is only a claim; then a free core now beats a queue; then the
/// shorter queue per core; then the lower round-trip time; then more free
/// cores; ties broken by peer id so the order is deterministic.
pub fn rank(candidates: &[Candidate], limits: &Limits, exclude: &[PeerId]) -> Vec<PeerId> {
    let mut eligible: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.cores > 0 && !exclude.contains(&c.peer) && c.grants(limits))
        .collect();
    eligible.sort_by(|a, b| compare(a, b));
    eligible.into_iter().map(|c| c.peer).collect()
}

/// Where a task that asks for `request` goes, and the limits it runs with
/// there: the best peer by [`rank`] that grants the limits wanted (the
/// defaults where the user set none); failing any, a peer that grants
/// what the user set, with the defaults lowered to what it grants. Of
/// those, a peer with a free core goes first, then the one that lowers the
/// defaults least, then [`rank`]'s order.
pub fn place(
    candidates: &[Candidate],
    request: &LimitRequest,
    exclude: &[PeerId],
) -> Option<(PeerId, Limits)> {
    let wanted = request.wanted();
    if let Some(best) = rank(candidates, &wanted, exclude).first() {
        return Some((*best, wanted));
    }
    let fitting: Vec<(&Candidate, Limits)> = rank(candidates, &request.least(), exclude)
        .iter()
        .filter_map(|peer| candidates.iter().find(|c| c.peer == *peer))
        .map(|c| (c, request.fitted(&c.max_limits)))
        .collect();
    let free = fitting.iter().any(|(c, _)| c.spare_cores() > 0);
    fitting
        .iter()
        .filter(|(c, _)| !free || c.spare_cores() > 0)
        // The first of equals in rank order wins: `max_by` keeps the last.
        .rev()
        .max_by(|(_, a), (_, b)| request.kept(a).total_cmp(&request.kept(b)))
        .map(|(c, limits)| (c.peer, *limits))
}

/// Whether a peer not in `exclude` would run a task that asks for
/// `request` with more of `limit` than `than`: worth a retry after the task
/// hit that limit where it had been lowered.
pub fn grants_more(
    candidates: &[Candidate],
    request: &LimitRequest,
    exclude: &[PeerId],
    limit: Limit,
    than: u64,
) -> bool {
    rank(candidates, &request.least(), exclude)
        .iter()
        .filter_map(|peer| candidates.iter().find(|c| c.peer == *peer))
        .any(|c| limit.of(&request.fitted(&c.max_limits)) > than)
}

fn compare(a: &Candidate, b: &Candidate) -> Ordering {
    let free = |c: &Candidate| c.spare_cores() > 0;
    a.strikes
        .cmp(&b.strikes)
        .then_with(|| free(b).cmp(&free(a)))
        .then_with(|| a.backlog_per_core().cmp(&b.backlog_per_core()))
        .then_with(|| rtt_key(a).cmp(&rtt_key(b)))
        .then_with(|| b.spare_cores().cmp(&a.spare_cores()))
        .then_with(|| a.peer.cmp(&b.peer))
}

/// Unknown latency sorts after any measured one.
fn rtt_key(c: &Candidate) -> Duration {
    c.rtt.unwrap_or(Duration::MAX)
}

/// Why an attempt on a host failed, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptError {
    /// The connection broke or the host stopped answering.
    HostLost,
    /// The host refused for a reason another host may not have (shutting
    /// down, could not fetch the module, disagreed with the spec).
    Refused,
    /// The host has no room for the task now (its queue, or this
    /// requester's share of it, is full, or it is overloaded). It may soon:
    /// the host stays a candidate, and the wait uses up no attempt (the
    /// requester bounds it in time).
    Busy,
    /// The host's owner needed the machine for long enough that the host
    /// handed the task back. It may give again later, so it stays a
    /// candidate.
    HandedBack,
    /// The host ran the task and its worker crashed, or it answered
    /// something impossible.
    HostFault,
}

impl AttemptError {
    /// Whether the host may be tried again for the same task.
    pub fn host_stays_candidate(self) -> bool {
        matches!(self, AttemptError::Busy | AttemptError::HandedBack)
    }
}

/// How many hosts a task may try before the requester gives up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_attempts: 3 }
    }
}

impl RetryPolicy {
    /// Whether to try again after attempt number `attempt` (1-based) failed
    /// with `error`: always when the host was busy (that attempt does not
    /// count), else while attempts are left.
    pub fn should_retry(&self, attempt: u32, error: AttemptError) -> bool {
        error == AttemptError::Busy || attempt < self.max_attempts
    }
}

/// How long a host's first failure of a task ranks it after the hosts
/// without one; each further failure while one is remembered doubles it,
/// up to [`STRIKE_MEMORY_MAX`].
pub const STRIKE_MEMORY: Duration = Duration::from_secs(120);
/// The longest a failure is remembered.
pub const STRIKE_MEMORY_MAX: Duration = Duration::from_secs(3600);
/// Failures counted against one host at most: more rank it no lower.
pub const MAX_STRIKES: u32 = 8;
/// Hosts whose failures are remembered at most: beyond, the one whose
/// memory ends first is forgotten, so a swarm of identities that fail
/// cannot grow the record without end.
pub const MAX_STANDINGS: usize = 1024;

/// The hosts that failed this node's tasks lately, across tasks: a host
/// that attracts tasks with an offer and then fails them (a lie, a broken
/// machine, a worker that keeps crashing) is ranked after every host with
/// fewer failures until its failures are forgotten. A failure is what
/// [`AttemptError::host_stays_candidate`] does not excuse, or a run the
/// host's own fault ended; a clean run forgives one. Busy hosts and hosts
/// whose owners took the machine back are honest, and never struck.
#[derive(Debug, Default)]
pub struct Standing {
    records: HashMap<PeerId, Strikes>,
}

#[derive(Clone, Copy, Debug)]
struct Strikes {
    count: u32,
    /// When the failures are forgotten.
    until: Instant,
}

impl Standing {
    /// Counts a failure of `peer` at `now`; returns its failures now
    /// remembered.
    pub fn failed(&mut self, peer: PeerId, now: Instant) -> u32 {
        let count = self
            .current(&peer, now)
            .map_or(1, |s| (s.count + 1).min(MAX_STRIKES));
        if !self.records.contains_key(&peer) && self.records.len() >= MAX_STANDINGS {
            self.make_room(now);
        }
        let memory = STRIKE_MEMORY
            .saturating_mul(1 << (count - 1).min(16))
            .min(STRIKE_MEMORY_MAX);
        self.records.insert(
            peer,
            Strikes {
                count,
                until: now + memory,
            },
        );
        count
    }

    /// Counts a clean run on `peer`: it forgives one failure.
    pub fn served(&mut self, peer: &PeerId, now: Instant) {
        match self.current(peer, now) {
            Some(s) if s.count > 1 => {
                if let Some(record) = self.records.get_mut(peer) {
                    record.count -= 1;
                }
            }
            _ => {
                self.records.remove(peer);
            }
        }
    }

    /// The failures of `peer` remembered at `now`, and until when.
    pub fn of(&self, peer: &PeerId, now: Instant) -> Option<(u32, Instant)> {
        self.current(peer, now).map(|s| (s.count, s.until))
    }

    /// The failures of `peer` remembered at `now`.
    pub fn strikes(&self, peer: &PeerId, now: Instant) -> u32 {
        self.current(peer, now).map_or(0, |s| s.count)
    }

    fn current(&self, peer: &PeerId, now: Instant) -> Option<Strikes> {
        self.records.get(peer).copied().filter(|s| s.until > now)
    }

    /// Forgets what has expired, or else the record whose memory ends
    /// first.
    fn make_room(&mut self, now: Instant) {
        self.records.retain(|_, s| s.until > now);
        if self.records.len() >= MAX_STANDINGS
            && let Some(first) = self
                .records
                .iter()
                .min_by_key(|(_, s)| s.until)
                .map(|(peer, _)| *peer)
        {
            self.records.remove(&first);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(idle: u16, queued: u32, rtt_ms: u64) -> Candidate {
        Candidate {
            peer: PeerId::random(),
            cores: 2,
            idle,
            queued,
            in_flight: 0,
            rtt: Some(Duration::from_millis(rtt_ms)),
            max_limits: Limits::MAX,
            strikes: 0,
        }
    }

    #[test]
    fn idle_beats_fast() {
        let busy_fast = Candidate {
            idle: 0,
            ..cand(0, 3, 1)
        };
        let idle_slow = cand(2, 0, 50);
        let order = rank(
            &[busy_fast.clone(), idle_slow.clone()],
            &Limits::DEFAULT,
            &[],
        );
        assert_eq!(order, vec![idle_slow.peer, busy_fast.peer]);
    }

    #[test]
    fn among_idle_peers_the_nearest_wins() {
        let far = cand(2, 0, 40);
        let near = cand(1, 0, 2);
        assert_eq!(
            rank(&[far.clone(), near.clone()], &Limits::DEFAULT, &[]),
            vec![near.peer, far.peer]
        );
    }

    #[test]
    fn in_flight_tasks_use_up_idle_cores() {
        let mut a = cand(1, 0, 1);
        a.in_flight = 1;
        let b = cand(1, 0, 9);
        assert_eq!(
            rank(&[a.clone(), b.clone()], &Limits::DEFAULT, &[]),
            vec![b.peer, a.peer]
        );
    }

    #[test]
    fn excluded_and_stingy_peers_are_left_out() {
        let tried = cand(2, 0, 1);
        let mut stingy = cand(2, 0, 1);
        stingy.max_limits.memory = 1 << 20;
        let ok = cand(1, 5, 100);
        let order = rank(
            &[tried.clone(), stingy, ok.clone()],
            &Limits::DEFAULT,
            &[tried.peer],
        );
        assert_eq!(order, vec![ok.peer]);
    }

    #[test]
    fn a_host_that_failed_lately_goes_after_busier_ones() {
        let mut failed = cand(2, 0, 1);
        failed.strikes = 1;
        let busy = cand(0, 4, 30);
        assert_eq!(
            rank(&[failed.clone(), busy.clone()], &Limits::DEFAULT, &[]),
            vec![busy.peer, failed.peer],
            "an offer of free cores does not outweigh a failure"
        );
        let mut failed_twice = cand(2, 0, 1);
        failed_twice.strikes = 2;
        assert_eq!(
            rank(
                &[failed_twice.clone(), failed.clone()],
                &Limits::DEFAULT,
                &[]
            ),
            vec![failed.peer, failed_twice.peer]
        );
        // Still a candidate: when it is the only one, it is tried.
        assert_eq!(
            place(&[failed_twice.clone()], &LimitRequest::default(), &[]),
            Some((failed_twice.peer, Limits::DEFAULT))
        );
    }

    #[test]
    fn failures_are_remembered_for_a_while_and_a_clean_run_forgives_one() {
        let mut standing = Standing::default();
        let (peer, other) = (PeerId::random(), PeerId::random());
        let t0 = Instant::now();
        assert_eq!(standing.failed(peer, t0), 1);
        assert_eq!(standing.strikes(&peer, t0 + STRIKE_MEMORY / 2), 1);
        assert_eq!(standing.strikes(&peer, t0 + STRIKE_MEMORY), 0, "forgotten");
        assert_eq!(standing.strikes(&other, t0), 0);
        // Failures while one is remembered add up, and are remembered
        // longer each time.
        let t1 = t0 + STRIKE_MEMORY;
        assert_eq!(standing.failed(peer, t1), 1);
        assert_eq!(standing.failed(peer, t1), 2);
        assert_eq!(standing.failed(peer, t1), 3);
        assert_eq!(standing.strikes(&peer, t1 + STRIKE_MEMORY * 3), 3);
        assert_eq!(standing.strikes(&peer, t1 + STRIKE_MEMORY * 4), 0);
        for _ in 0..20 {
            standing.failed(peer, t1);
        }
        let (count, until) = standing.of(&peer, t1).unwrap();
        assert_eq!((count, until), (MAX_STRIKES, t1 + STRIKE_MEMORY_MAX));
        standing.served(&peer, t1);
        assert_eq!(standing.strikes(&peer, t1), MAX_STRIKES - 1);
        for _ in 0..MAX_STRIKES {
            standing.served(&peer, t1);
        }
        assert_eq!(standing.of(&peer, t1), None);
    }

    #[test]
    fn the_record_of_failures_is_bounded() {
        let mut standing = Standing::default();
        let t0 = Instant::now();
        let first = PeerId::random();
        standing.failed(first, t0);
        let later = t0 + Duration::from_secs(1);
        for _ in 0..MAX_STANDINGS + 10 {
            standing.failed(PeerId::random(), later);
        }
        assert_eq!(standing.records.len(), MAX_STANDINGS);
        assert_eq!(
            standing.strikes(&first, later),
            0,
            "the first to end goes first"
        );
    }

    #[test]
    fn retries_are_bounded_except_for_busy_hosts() {
        let policy = RetryPolicy::default();
        assert!(policy.should_retry(1, AttemptError::HostLost));
        assert!(policy.should_retry(2, AttemptError::Refused));
        assert!(!policy.should_retry(3, AttemptError::HostLost));
        assert!(!policy.should_retry(3, AttemptError::HandedBack));
        assert!(policy.should_retry(3, AttemptError::Busy));
        assert!(AttemptError::Busy.host_stays_candidate());
        assert!(!AttemptError::HostFault.host_stays_candidate());
    }

    #[test]
    fn unset_limits_are_lowered_only_when_no_peer_grants_them() {
        let mut small = cand(2, 0, 1);
        small.max_limits.memory = 32 << 20;
        let mut smaller = cand(2, 0, 1);
        smaller.max_limits.memory = 16 << 20;
        let busy_but_generous = cand(0, 3, 1);
        let nothing_set = LimitRequest::default();
        assert_eq!(
            place(
                &[small.clone(), busy_but_generous.clone()],
                &nothing_set,
                &[]
            ),
            Some((busy_but_generous.peer, Limits::DEFAULT)),
            "a peer that grants the defaults is worth a wait in its queue"
        );
        let (peer, limits) = place(&[smaller.clone(), small.clone()], &nothing_set, &[]).unwrap();
        assert_eq!(
            (peer, limits.memory),
            (small.peer, 32 << 20),
            "lowered least"
        );
        let set = LimitRequest {
            memory: Some(64 << 20),
            ..LimitRequest::default()
        };
        assert_eq!(place(&[small.clone(), smaller.clone()], &set, &[]), None);
        assert!(grants_more(
            &[small.clone(), smaller.clone()],
            &nothing_set,
            &[small.peer],
            Limit::Memory,
            8 << 20
        ));
        assert!(!grants_more(
            &[small.clone(), smaller],
            &nothing_set,
            &[small.peer],
            Limit::Memory,
            16 << 20
        ));
    }

    fn arb_candidate() -> impl Strategy<Value = Candidate> {
        (
            0u16..8,
            0u16..8,
            0u32..20,
            0u32..10,
            proptest::option::of(0u64..500),
            any::<bool>(),
            0u32..3,
        )
            .prop_map(|(cores, idle, queued, in_flight, rtt, generous, strikes)| {
                Candidate {
                    peer: PeerId::random(),
                    cores,
                    idle: idle.min(cores),
                    queued,
                    in_flight,
                    rtt: rtt.map(Duration::from_millis),
                    max_limits: if generous { Limits::MAX } else { Limits::MIN },
                    strikes,
                }
            })
    }

    fn arb_request() -> impl Strategy<Value = LimitRequest> {
        (
            proptest::option::of(1u64..Limits::MAX.fuel),
            proptest::option::of(0u64..Limits::MAX.memory),
        )
            .prop_map(|(fuel, memory)| LimitRequest {
                fuel,
                memory,
                ..LimitRequest::default()
            })
    }

    proptest! {
        #[test]
        fn a_placement_is_granted_and_keeps_what_the_user_set(
            cands in prop::collection::vec(arb_candidate(), 0..12),
            request in arb_request(),
        ) {
            if let Some((peer, limits)) = place(&cands, &request, &[]) {
                let c = cands.iter().find(|c| c.peer == peer).unwrap();
                prop_assert!(c.cores > 0);
                prop_assert_eq!(limits.check_within(&c.max_limits), Ok(()));
                for limit in Limit::ALL {
                    if request.is_set(limit) {
                        prop_assert_eq!(limit.of(&limits), limit.of(&request.wanted()));
                    }
                    prop_assert!(limit.of(&limits) <= limit.of(&request.wanted()));
                }
            } else {
                // Nobody grants even what the user set.
                prop_assert!(rank(&cands, &request.least(), &[]).is_empty());
            }
        }

        #[test]
        fn rank_is_a_filtered_permutation(cands in prop::collection::vec(arb_candidate(), 0..12), n_excluded in 0usize..4) {
            let exclude: Vec<PeerId> = cands.iter().take(n_excluded).map(|c| c.peer).collect();
            let order = rank(&cands, &Limits::DEFAULT, &exclude);
            // Every ranked peer is eligible, appears once, and none is excluded.
            let mut seen = std::collections::HashSet::new();
            for peer in &order {
                prop_assert!(seen.insert(*peer));
                prop_assert!(!exclude.contains(peer));
                let c = cands.iter().find(|c| c.peer == *peer).unwrap();
                prop_assert!(c.cores > 0 && c.grants(&Limits::DEFAULT));
            }
            // Every eligible peer is ranked.
            let eligible = cands.iter().filter(|c| c.cores > 0 && !exclude.contains(&c.peer) && c.grants(&Limits::DEFAULT)).count();
            prop_assert_eq!(order.len(), eligible);
        }

        #[test]
        fn fewer_failures_then_a_free_core_go_first(cands in prop::collection::vec(arb_candidate(), 0..12)) {
            let order = rank(&cands, &Limits::DEFAULT, &[]);
            let keys: Vec<(u32, bool)> = order.iter().map(|p| {
                let c = cands.iter().find(|c| c.peer == *p).unwrap();
                (c.strikes, c.spare_cores() <= 0)
            }).collect();
            // Failures never decrease along the order; among equal
            // failures, once a busy peer appears, no free peer follows.
            prop_assert!(keys.windows(2).all(|w| w[0] <= w[1]));
        }

        #[test]
        fn attempts_never_exceed_the_policy(max in 1u32..6, errors in prop::collection::vec(0u8..3, 0..10)) {
            let policy = RetryPolicy { max_attempts: max };
            let mut attempt = 1;
            for e in errors {
                let err = [AttemptError::HostLost, AttemptError::Refused, AttemptError::HostFault][e as usize];
                if !policy.should_retry(attempt, err) { break; }
                attempt += 1;
            }
            prop_assert!(attempt <= max);
        }
    }
}

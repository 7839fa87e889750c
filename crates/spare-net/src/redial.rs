//! Peers we lost, dialled again with exponential backoff.
//!
//! A connection can drop while both peers live on: one of them stalled for
//! longer than the ping timeout (a laptop lid, `SIGSTOP`), or a network
//! blipped. Kademlia's periodic bootstrap would find such a peer again only
//! minutes later, and a requester would meanwhile see a smaller swarm than
//! there is (and fail a retry that needed the lost peer). So a spare peer
//! whose last connection closed is dialled again after [`FIRST_DELAY`],
//! doubling up to [`MAX_DELAY`], for at most [`GIVE_UP_AFTER`]; the table
//! holds at most [`MAX_LOST`] peers, forgetting the longest lost first.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};

/// The first redial comes this long after the loss.
pub(crate) const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Redials come at most this far apart.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(60);
/// A peer lost for this long is left to discovery (Kademlia, mDNS).
pub(crate) const GIVE_UP_AFTER: Duration = Duration::from_secs(30 * 60);
/// Lost peers remembered at once.
pub(crate) const MAX_LOST: usize = 64;
/// Addresses remembered per lost peer.
const MAX_ADDRS: usize = 8;

#[derive(Debug)]
struct Lost {
    addrs: Vec<Multiaddr>,
    since: Instant,
    delay: Duration,
    next: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct Redial {
    lost: HashMap<PeerId, Lost>,
}

impl Redial {
    /// `peer`'s last connection closed at `now`; `addrs` are where it
    /// listened.
    pub(crate) fn lost(&mut self, peer: PeerId, mut addrs: Vec<Multiaddr>, now: Instant) {
        addrs.truncate(MAX_ADDRS);
        if !self.lost.contains_key(&peer) && self.lost.len() >= MAX_LOST {
            let oldest = self
                .lost
                .iter()
                .min_by_key(|(_, lost)| lost.since)
                .map(|(peer, _)| *peer);
            if let Some(oldest) = oldest {
                self.lost.remove(&oldest);
            }
        }
        self.lost.insert(
            peer,
            Lost {
                addrs,
                since: now,
                delay: FIRST_DELAY,
                next: now + FIRST_DELAY,
            },
        );
    }

    /// `peer` is connected again.
    pub(crate) fn found(&mut self, peer: &PeerId) {
        self.lost.remove(peer);
    }

    /// The peers to dial now, each with the addresses it was known at.
    /// Forgets peers lost for longer than [`GIVE_UP_AFTER`].
    pub(crate) fn due(&mut self, now: Instant) -> Vec<(PeerId, Vec<Multiaddr>)> {
        self.lost
            .retain(|_, lost| now.saturating_duration_since(lost.since) < GIVE_UP_AFTER);
        let mut due = Vec::new();
        for (peer, lost) in &mut self.lost {
            if lost.next <= now {
                due.push((*peer, lost.addrs.clone()));
                lost.delay = (lost.delay * 2).min(MAX_DELAY);
                lost.next = now + lost.delay;
            }
        }
        due
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lost.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dials(redial: &mut Redial, start: Instant, until: Duration) -> Vec<Duration> {
        let mut at = Vec::new();
        let mut t = Duration::ZERO;
        while t <= until {
            if !redial.due(start + t).is_empty() {
                at.push(t);
            }
            t += Duration::from_millis(500);
        }
        at
    }

    #[test]
    fn redials_back_off_to_a_minute_and_stop_after_half_an_hour() {
        let start = Instant::now();
        let mut redial = Redial::default();
        redial.lost(PeerId::random(), vec![], start);
        let at = dials(&mut redial, start, GIVE_UP_AFTER + MAX_DELAY);
        let secs: Vec<u64> = at.iter().take(8).map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 3, 7, 15, 31, 63, 123, 183]);
        assert!(at.last().unwrap() < &GIVE_UP_AFTER);
        // About one a minute for the rest of the half hour.
        assert!((30..40).contains(&at.len()), "{}", at.len());
        assert_eq!(redial.len(), 0);
    }

    #[test]
    fn a_peer_found_again_is_not_dialled() {
        let start = Instant::now();
        let mut redial = Redial::default();
        let peer = PeerId::random();
        redial.lost(peer, vec!["/memory/7".parse().unwrap()], start);
        assert!(redial.due(start).is_empty());
        let due = redial.due(start + FIRST_DELAY);
        assert_eq!(due, [(peer, vec!["/memory/7".parse().unwrap()])]);
        redial.found(&peer);
        assert!(dials(&mut redial, start, MAX_DELAY * 2).is_empty());
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_longest_lost() {
        let start = Instant::now();
        let mut redial = Redial::default();
        let first = PeerId::random();
        redial.lost(first, vec![], start);
        for i in 1..=MAX_LOST as u64 {
            redial.lost(PeerId::random(), vec![], start + Duration::from_millis(i));
        }
        assert_eq!(redial.len(), MAX_LOST);
        let due = redial.due(start + Duration::from_secs(2));
        assert!(due.iter().all(|(peer, _)| *peer != first));
    }
}

//! What this node knows about the peers it is connected to.
//!
//! The event loop is the only writer; the daemon reads snapshots through
//! [`NetHandle::peers`](crate::NetHandle::peers) without a round trip to the
//! loop, which keeps task placement off the swarm's critical path.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use spare_core::wire::Offer;

/// Addresses remembered per peer.
const MAX_ADDRS_PER_PEER: usize = 8;

/// A connected peer, as seen from here.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub peer: PeerId,
    /// Addresses the peer listens on (from identify) or we reached it at.
    pub addrs: Vec<Multiaddr>,
    /// The peer's software, from identify.
    pub agent: Option<String>,
    /// Latest ping round-trip time.
    pub rtt: Option<Duration>,
    /// The peer's latest offer, and when it arrived.
    pub offer: Option<(Offer, Instant)>,
    pub connected_since: Instant,
}

#[derive(Debug, Default)]
pub(crate) struct PeerTable {
    peers: HashMap<PeerId, PeerInfo>,
}

impl PeerTable {
    pub(crate) fn connected(&mut self, peer: PeerId, addr: Multiaddr) {
        let info = self.peers.entry(peer).or_insert_with(|| PeerInfo {
            peer,
            addrs: Vec::new(),
            agent: None,
            rtt: None,
            offer: None,
            connected_since: Instant::now(),
        });
        push_addr(&mut info.addrs, addr);
    }

    pub(crate) fn disconnected(&mut self, peer: &PeerId) {
        self.peers.remove(peer);
    }

    pub(crate) fn identified(&mut self, peer: &PeerId, agent: String, addrs: &[Multiaddr]) {
        if let Some(info) = self.peers.get_mut(peer) {
            info.agent = Some(agent);
            for addr in addrs.iter().take(MAX_ADDRS_PER_PEER) {
                push_addr(&mut info.addrs, addr.clone());
            }
        }
    }

    pub(crate) fn rtt(&mut self, peer: &PeerId, rtt: Duration) {
        if let Some(info) = self.peers.get_mut(peer) {
            info.rtt = Some(rtt);
        }
    }

    /// Records `offer` unless an offer with a higher sequence number is
    /// already known (gossip may deliver out of order).
    pub(crate) fn offer(&mut self, peer: &PeerId, offer: Offer) {
        if let Some(info) = self.peers.get_mut(peer) {
            let newer = info
                .offer
                .as_ref()
                .is_none_or(|(old, _)| offer.seq >= old.seq);
            if newer {
                info.offer = Some((offer, Instant::now()));
            }
        }
    }

    pub(crate) fn snapshot(&self) -> Vec<PeerInfo> {
        let mut peers: Vec<PeerInfo> = self.peers.values().cloned().collect();
        peers.sort_by_key(|p| p.peer);
        peers
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }
}

fn push_addr(addrs: &mut Vec<Multiaddr>, addr: Multiaddr) {
    if !addrs.contains(&addr) {
        if addrs.len() >= MAX_ADDRS_PER_PEER {
            addrs.remove(0);
        }
        addrs.push(addr);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spare_core::Limits;

    fn offer(seq: u64) -> Offer {
        Offer {
            cores: 2,
            idle: 1,
            queued: 0,
            memory: 0,
            runtimes: vec![],
            max_limits: Limits::MAX,
            seq,
        }
    }

    #[test]
    fn stale_offers_do_not_replace_newer_ones() {
        let mut table = PeerTable::default();
        let peer = PeerId::random();
        table.connected(peer, "/memory/1".parse().unwrap());
        table.offer(&peer, offer(5));
        table.offer(&peer, offer(3));
        assert_eq!(table.snapshot()[0].offer.as_ref().unwrap().0.seq, 5);
    }

    #[test]
    fn offers_from_unconnected_peers_are_ignored_and_addresses_bounded() {
        let mut table = PeerTable::default();
        table.offer(&PeerId::random(), offer(1));
        assert_eq!(table.len(), 0);
        let peer = PeerId::random();
        for i in 0..20 {
            table.connected(peer, format!("/memory/{i}").parse().unwrap());
        }
        assert_eq!(table.snapshot()[0].addrs.len(), MAX_ADDRS_PER_PEER);
    }
}

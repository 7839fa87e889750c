//! What this node knows about the peers it is connected to.
//!
//! The event loop is the only writer; the daemon reads snapshots through
//! [`NetHandle::peers`](crate::NetHandle::peers) without a round trip to the
//! loop, which keeps task placement off the swarm's critical path.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::{Multiaddr, PeerId};
use spare_core::wire::Offer;

/// Addresses remembered per peer, and given to Kademlia per connection.
pub(crate) const MAX_ADDRS_PER_PEER: usize = 8;

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
    /// How far away each peer is: the widest scope of the addresses we are
    /// connected to it on.
    reach: HashMap<PeerId, Scope>,
}

/// How far an address reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Scope {
    /// This machine only.
    Loopback,
    /// A private or link-local network.
    Private,
    /// The internet.
    Global,
}

impl Scope {
    pub(crate) fn of(addr: &Multiaddr) -> Self {
        use libp2p::multiaddr::Protocol;
        use std::net::Ipv4Addr;
        fn of_v4(ip: Ipv4Addr) -> Scope {
            // Dialling 0.0.0.0 reaches this machine.
            if ip.is_loopback() || ip.is_unspecified() {
                Scope::Loopback
            } else if ip.is_private()
                || ip.is_link_local()
                || (ip.octets()[0] == 100 && ip.octets()[1] & 0xc0 == 64)
            {
                Scope::Private
            } else {
                Scope::Global
            }
        }
        match addr.iter().next() {
            Some(Protocol::Ip4(ip)) => of_v4(ip),
            Some(Protocol::Ip6(ip)) => match ip.to_ipv4_mapped() {
                Some(v4) => of_v4(v4),
                None if ip.is_loopback() || ip.is_unspecified() => Scope::Loopback,
                None if ip.is_unique_local() || ip.is_unicast_link_local() => Scope::Private,
                None => Scope::Global,
            },
            Some(Protocol::Memory(_)) => Scope::Loopback,
            _ => Scope::Global,
        }
    }
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
        let scope = Scope::of(&addr);
        let reach = self.reach.entry(peer).or_insert(scope);
        *reach = (*reach).max(scope);
        push_addr(&mut info.addrs, addr);
    }

    /// Forgets `peer`, returning what was known of it.
    pub(crate) fn disconnected(&mut self, peer: &PeerId) -> Option<PeerInfo> {
        self.reach.remove(peer);
        self.peers.remove(peer)
    }

    /// Whether an address `peer` claims for itself may be believed: it must
    /// reach at least as far as the connection we have to the peer. A peer
    /// on the internet claiming `127.0.0.1` or `10.0.0.5` would make us dial
    /// into our own machine or network.
    pub(crate) fn believable(&self, peer: &PeerId, addr: &Multiaddr) -> bool {
        self.reach
            .get(peer)
            .is_some_and(|reach| Scope::of(addr) >= *reach)
    }

    /// The narrowest reach among connected peers: how near an address a
    /// peer may name and still be dialled (`dial_scope.rs`).
    pub(crate) fn narrowest_reach(&self) -> Option<Scope> {
        self.reach.values().min().copied()
    }

    /// Whether `peer` has identified itself on its current connections.
    pub(crate) fn identified_before(&self, peer: &PeerId) -> bool {
        self.peers
            .get(peer)
            .is_some_and(|info| info.agent.is_some())
    }

    pub(crate) fn identified(&mut self, peer: &PeerId, agent: String, addrs: &[Multiaddr]) {
        if let Some(info) = self.peers.get_mut(peer) {
            info.agent = Some(agent);
            for addr in addrs.iter().take(MAX_ADDRS_PER_PEER) {
                if self
                    .reach
                    .get(peer)
                    .is_some_and(|reach| Scope::of(addr) >= *reach)
                {
                    push_addr(&mut info.addrs, addr.clone());
                }
            }
        }
    }

    pub(crate) fn rtt(&mut self, peer: &PeerId, rtt: Duration) {
        if let Some(info) = self.peers.get_mut(peer) {
            info.rtt = Some(rtt);
        }
    }

    /// Records `offer` of a connected `peer` unless an offer with a higher
    /// sequence number is already known (gossip may deliver out of order);
    /// whether it was recorded.
    pub(crate) fn offer(&mut self, peer: &PeerId, offer: Offer) -> bool {
        let Some(info) = self.peers.get_mut(peer) else {
            return false;
        };
        let newer = info
            .offer
            .as_ref()
            .is_none_or(|(old, _)| offer.seq >= old.seq);
        if newer {
            info.offer = Some((offer, Instant::now()));
        }
        newer
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
            paused: None,
        }
    }

    #[test]
    fn a_peer_is_believed_only_about_addresses_as_wide_as_its_connection() {
        let mut table = PeerTable::default();
        let (lan, local, remote) = (PeerId::random(), PeerId::random(), PeerId::random());
        table.connected(lan, "/ip4/192.168.1.7/tcp/4117".parse().unwrap());
        table.connected(local, "/ip4/127.0.0.1/tcp/4117".parse().unwrap());
        table.connected(remote, "/ip4/203.0.113.9/tcp/4117".parse().unwrap());
        let loopback: Multiaddr = "/ip4/127.0.0.1/tcp/1".parse().unwrap();
        let private: Multiaddr = "/ip4/10.1.2.3/tcp/1".parse().unwrap();
        let global: Multiaddr = "/ip4/198.51.100.1/tcp/1".parse().unwrap();
        assert!(table.believable(&local, &loopback) && table.believable(&local, &private));
        assert!(!table.believable(&lan, &loopback) && table.believable(&lan, &private));
        assert!(!table.believable(&remote, &private) && table.believable(&remote, &global));
        assert!(!table.believable(&PeerId::random(), &global));
        assert_eq!(table.narrowest_reach(), Some(Scope::Loopback));
        table.disconnected(&local);
        assert_eq!(table.narrowest_reach(), Some(Scope::Private));
    }

    #[test]
    fn stale_offers_do_not_replace_newer_ones() {
        let mut table = PeerTable::default();
        let peer = PeerId::random();
        table.connected(peer, "/memory/1".parse().unwrap());
        assert!(table.offer(&peer, offer(5)));
        assert!(
            !table.offer(&peer, offer(3)),
            "a stale offer is not passed on"
        );
        assert_eq!(table.snapshot()[0].offer.as_ref().unwrap().0.seq, 5);
    }

    #[test]
    fn offers_from_unconnected_peers_are_ignored_and_addresses_bounded() {
        let mut table = PeerTable::default();
        assert!(!table.offer(&PeerId::random(), offer(1)));
        assert_eq!(table.len(), 0);
        let peer = PeerId::random();
        for i in 0..20 {
            table.connected(peer, format!("/memory/{i}").parse().unwrap());
        }
        assert_eq!(table.snapshot()[0].addrs.len(), MAX_ADDRS_PER_PEER);
        assert!(!table.identified_before(&peer));
        table.identified(&peer, "spare/0".into(), &[]);
        assert!(table.identified_before(&peer));
    }
}

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
/// Bytes of a peer's agent string (its software and version, from
/// identify) that are kept and shown; libp2p bounds the whole identify
/// message at 4 KiB.
pub(crate) const MAX_AGENT_BYTES: usize = 128;

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
    /// Offers used from each peer in its current window of
    /// [`OFFER_WINDOW`]: when the window began, and how many.
    offers: HashMap<PeerId, (Instant, u32)>,
}

/// A peer's offers are used, and passed on, at most [`MAX_OFFERS`] times
/// in each [`OFFER_WINDOW`]: an honest node publishes at most four a second
/// (when its load changes, checked every 250 ms), so this leaves room for
/// gossip's jitter, and a peer that publishes more costs its neighbours
/// no more than that.
pub(crate) const OFFER_WINDOW: Duration = Duration::from_secs(2);
pub(crate) const MAX_OFFERS: u32 = 10;

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
    /// How far `addr` reaches: the narrowest of its IP addresses (TCP dials
    /// the last one, and a hostile peer may stack several), and
    /// [`Scope::Loopback`] for an address without one (DNS names, which
    /// this node does not resolve, and the memory transport).
    pub(crate) fn of(addr: &Multiaddr) -> Self {
        use libp2p::multiaddr::Protocol;
        addr.iter()
            .filter_map(|part| match part {
                Protocol::Ip4(ip) => Some(of_v4(ip)),
                Protocol::Ip6(ip) => Some(of_v6(ip)),
                _ => None,
            })
            .min()
            .unwrap_or(Scope::Loopback)
    }
}

fn of_v4(ip: std::net::Ipv4Addr) -> Scope {
    let [a, b, ..] = ip.octets();
    // 0.0.0.0/8 ("this network"): dialling it reaches this machine.
    if ip.is_loopback() || a == 0 {
        Scope::Loopback
    } else if ip.is_private()
        || ip.is_link_local()
        || (a == 100 && b & 0xc0 == 64) // shared address space (CGNAT)
        || (a == 198 && b & 0xfe == 18) // benchmarking
        || ip.is_multicast()
        || a >= 240
    // reserved, and broadcast
    {
        Scope::Private
    } else {
        Scope::Global
    }
}

fn of_v6(ip: std::net::Ipv6Addr) -> Scope {
    let segments = ip.segments();
    if ip.is_loopback() || ip.is_unspecified() {
        return Scope::Loopback;
    }
    // IPv4-mapped (::ffff:a.b.c.d), IPv4-compatible (::a.b.c.d) and NAT64
    // (64:ff9b::a.b.c.d) addresses reach the IPv4 address they carry.
    let embedded = segments[..5] == [0; 5] && (segments[5] == 0 || segments[5] == 0xffff)
        || segments[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    if embedded {
        let [.., hi, lo] = segments;
        return of_v4(std::net::Ipv4Addr::from(
            (u32::from(hi) << 16) | u32::from(lo),
        ));
    }
    if ip.is_unique_local()
        || ip.is_unicast_link_local()
        || segments[0] & 0xffc0 == 0xfec0 // site-local, deprecated
        || ip.is_multicast()
    {
        Scope::Private
    } else {
        Scope::Global
    }
}

impl PeerTable {
    /// Notes a connection to `peer` at `addr`, its address where this node
    /// `dialed` it; an inbound connection's is the port the peer dialled
    /// from, which nothing can dial, and its own addresses come with
    /// identify.
    pub(crate) fn connected(&mut self, peer: PeerId, addr: Multiaddr, dialed: bool) {
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
        if dialed {
            push_addr(&mut info.addrs, addr);
        }
    }

    /// Forgets `peer`, returning what was known of it.
    pub(crate) fn disconnected(&mut self, peer: &PeerId) -> Option<PeerInfo> {
        self.reach.remove(peer);
        self.offers.remove(peer);
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
            info.agent = Some(clip(agent, MAX_AGENT_BYTES));
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

    /// Records `offer` of a connected `peer` if it is newer than the one
    /// known (gossip may deliver out of order, and replay) and the peer
    /// has not used up its [`MAX_OFFERS`] in this [`OFFER_WINDOW`]; whether
    /// it was recorded.
    pub(crate) fn offer(&mut self, peer: &PeerId, offer: Offer) -> bool {
        let Some(info) = self.peers.get_mut(peer) else {
            return false;
        };
        let newer = info
            .offer
            .as_ref()
            .is_none_or(|(old, _)| offer.seq > old.seq);
        if !newer {
            return false;
        }
        let now = Instant::now();
        let window = self.offers.entry(*peer).or_insert((now, 0));
        if now.duration_since(window.0) >= OFFER_WINDOW {
            *window = (now, 0);
        }
        if window.1 >= MAX_OFFERS {
            return false;
        }
        window.1 += 1;
        info.offer = Some((offer, now));
        true
    }

    pub(crate) fn get(&self, peer: &PeerId) -> Option<&PeerInfo> {
        self.peers.get(peer)
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

/// `text` cut to at most `max` bytes, on a character boundary.
fn clip(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
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

    /// A peer that dialled us is known at the addresses it listens on, as
    /// identify tells them, not at the port it dialled from.
    #[test]
    fn a_peer_that_dialled_in_is_known_at_its_listen_addresses() {
        let mut table = PeerTable::default();
        let peer = PeerId::random();
        table.connected(peer, "/ip4/127.0.0.1/tcp/53122".parse().unwrap(), false);
        let addrs = |table: &PeerTable| table.get(&peer).unwrap().addrs.clone();
        assert!(addrs(&table).is_empty());
        let listen: Multiaddr = "/ip4/127.0.0.1/tcp/4117".parse().unwrap();
        table.identified(&peer, "spare/0.1.0".into(), std::slice::from_ref(&listen));
        assert_eq!(addrs(&table), vec![listen]);
    }

    #[test]
    fn a_peer_is_believed_only_about_addresses_as_wide_as_its_connection() {
        let mut table = PeerTable::default();
        let (lan, local, remote) = (PeerId::random(), PeerId::random(), PeerId::random());
        table.connected(lan, "/ip4/192.168.1.7/tcp/4117".parse().unwrap(), true);
        table.connected(local, "/ip4/127.0.0.1/tcp/4117".parse().unwrap(), true);
        table.connected(remote, "/ip4/203.0.113.9/tcp/4117".parse().unwrap(), true);
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
    fn a_peers_agent_string_is_kept_to_its_bound() {
        let mut table = PeerTable::default();
        let peer = PeerId::random();
        table.connected(peer, "/ip4/127.0.0.1/tcp/4117".parse().unwrap(), true);
        // Two-byte characters, the bound falling inside one.
        table.identified(&peer, "é".repeat(MAX_AGENT_BYTES), &[]);
        let agent = table.peers[&peer].agent.clone().unwrap();
        assert_eq!(agent.len(), MAX_AGENT_BYTES);
        table.identified(&peer, format!("x{}", "é".repeat(MAX_AGENT_BYTES)), &[]);
        let agent = table.peers[&peer].agent.clone().unwrap();
        assert_eq!(agent.len(), MAX_AGENT_BYTES - 1);
        table.identified(&peer, "spare/0.1.0".into(), &[]);
        assert_eq!(table.peers[&peer].agent.as_deref(), Some("spare/0.1.0"));
    }

    #[test]
    fn an_address_reaches_as_far_as_its_narrowest_ip() {
        let scope = |s: &str| Scope::of(&s.parse().unwrap());
        for loopback in [
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip4/0.1.2.3/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/::/tcp/1",
            "/ip6/::ffff:127.0.0.1/tcp/1",
            "/ip6/::127.0.0.1/tcp/1",
            "/ip6/64:ff9b::7f00:1/tcp/1",
            // TCP dials the last IP of a stacked address.
            "/ip4/198.51.100.7/ip4/127.0.0.1/tcp/22",
            "/dns4/localhost/tcp/1",
            "/memory/1",
        ] {
            assert_eq!(scope(loopback), Scope::Loopback, "{loopback}");
        }
        for private in [
            "/ip4/10.0.0.5/tcp/1",
            "/ip4/192.168.1.1/udp/1/quic-v1",
            "/ip4/169.254.1.1/tcp/1",
            "/ip4/100.64.0.1/tcp/1",
            "/ip4/198.18.0.1/tcp/1",
            "/ip4/255.255.255.255/tcp/1",
            "/ip4/224.0.0.1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip6/fec0::1/tcp/1",
            "/ip6/::ffff:10.0.0.1/tcp/1",
            "/ip4/198.51.100.7/ip4/10.0.0.5/tcp/80",
        ] {
            assert_eq!(scope(private), Scope::Private, "{private}");
        }
        for global in [
            "/ip4/198.51.100.7/tcp/1",
            "/ip4/8.8.8.8/udp/1/quic-v1",
            "/ip6/2001:db8::1/tcp/1",
            "/ip6/::ffff:8.8.8.8/tcp/1",
        ] {
            assert_eq!(scope(global), Scope::Global, "{global}");
        }
    }

    #[test]
    fn stale_offers_do_not_replace_newer_ones() {
        let mut table = PeerTable::default();
        let peer = PeerId::random();
        table.connected(peer, "/memory/1".parse().unwrap(), true);
        assert!(table.offer(&peer, offer(5)));
        assert!(
            !table.offer(&peer, offer(3)),
            "a stale offer is not passed on"
        );
        assert!(!table.offer(&peer, offer(5)), "nor a replay");
        assert_eq!(table.snapshot()[0].offer.as_ref().unwrap().0.seq, 5);
    }

    #[test]
    fn a_peer_offers_at_most_so_often() {
        let mut table = PeerTable::default();
        let (peer, other) = (PeerId::random(), PeerId::random());
        table.connected(peer, "/memory/1".parse().unwrap(), true);
        table.connected(other, "/memory/2".parse().unwrap(), true);
        for seq in 1..=u64::from(MAX_OFFERS) {
            assert!(table.offer(&peer, offer(seq)));
        }
        let next = u64::from(MAX_OFFERS) + 1;
        assert!(!table.offer(&peer, offer(next)), "one too many this window");
        assert!(table.offer(&other, offer(1)), "others are not held to it");
        // A new window begins once this one has passed.
        table.offers.get_mut(&peer).unwrap().0 -= OFFER_WINDOW;
        assert!(table.offer(&peer, offer(next)));
        // Forgotten with the peer.
        table.disconnected(&peer);
        assert!(!table.offers.contains_key(&peer));
    }

    #[test]
    fn offers_from_unconnected_peers_are_ignored_and_addresses_bounded() {
        let mut table = PeerTable::default();
        assert!(!table.offer(&PeerId::random(), offer(1)));
        assert_eq!(table.len(), 0);
        let peer = PeerId::random();
        for i in 0..20 {
            table.connected(peer, format!("/memory/{i}").parse().unwrap(), true);
        }
        assert_eq!(table.snapshot()[0].addrs.len(), MAX_ADDRS_PER_PEER);
        assert!(!table.identified_before(&peer));
        table.identified(&peer, "spare/0".into(), &[]);
        assert!(table.identified_before(&peer));
    }
}

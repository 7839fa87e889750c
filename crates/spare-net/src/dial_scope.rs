//! Which addresses this node will dial.
//!
//! Peers tell a node where other peers are: Kademlia answers carry
//! addresses for third parties, and identify's cache keeps whatever a peer
//! claims for itself. Dialled as given, a peer on the internet could make
//! a node open connections into its own machine (`127.0.0.1`) or its
//! owner's network (`10.0.0.5`). Every dial of every protocol goes through
//! [`ScopedTransport`], which asks [`DialScope`] first:
//!
//! - an address must have the shape of one this node can dial (an IP
//!   address, then TCP or QUIC, then perhaps the peer id): a stacked
//!   address such as `/ip4/198.51.100.7/ip4/127.0.0.1/tcp/22`, which TCP
//!   would dial at its last IP, is refused;
//! - an address of the internet's scope is dialled;
//! - so is one of the owner's bootstrap addresses, whichever peer answers
//!   there, and an address this node has first-hand for a peer: one that
//!   the peer was found at (by mDNS, on a LAN), that it claimed for itself
//!   and was believed, or that this node dialled it at. These are
//!   [vouched](DialScope::vouch) for that peer only (at most
//!   [`MAX_VOUCHED`]): another peer naming them is not believed;
//! - any other address only if it reaches at least as far as the
//!   narrowest of the connected peers' reaches (each peer's widest
//!   connection): a node on a LAN hears of LAN
//!   peers from LAN peers, a swarm on one machine of loopback peers from
//!   loopback peers, and a node whose peers are all on the internet dials
//!   nothing nearer than the internet on anyone's word.
//!
//! What remains is in `docs/threat-model.md`: a node with both LAN and
//! internet peers can be told of LAN addresses by an internet peer, and a
//! port forward that makes internet peers arrive from loopback makes them
//! count as near.

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::peers::Scope;

/// First-hand addresses remembered; the oldest is forgotten first.
pub(crate) const MAX_VOUCHED: usize = 1024;

/// The dial policy, shared by the event loop (which learns addresses and
/// connections) and the transport (which dials).
#[derive(Clone, Debug, Default)]
pub(crate) struct DialScope(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    /// The owner's bootstrap addresses, without peer ids: never forgotten.
    bootstrap: HashSet<Multiaddr>,
    /// Addresses known first-hand, each for one peer.
    vouched: HashSet<(PeerId, Multiaddr)>,
    order: VecDeque<(PeerId, Multiaddr)>,
    /// The narrowest scope among connected peers; `None` with no peer.
    floor: Option<Scope>,
}

impl DialScope {
    /// A policy that always allows the owner's `bootstrap` addresses.
    pub(crate) fn new(bootstrap: &[Multiaddr]) -> Self {
        let state = State {
            bootstrap: bootstrap.iter().map(|a| split_peer(a).1).collect(),
            ..State::default()
        };
        Self(Arc::new(Mutex::new(state)))
    }

    /// Remembers that `peer` is, first-hand, at `addr`.
    pub(crate) fn vouch(&self, peer: PeerId, addr: &Multiaddr) {
        let addr = split_peer(addr).1;
        if Scope::of(&addr) == Scope::Global {
            return;
        }
        let entry = (peer, addr);
        let mut state = self.lock();
        if state.vouched.insert(entry.clone()) {
            state.order.push_back(entry);
            if state.order.len() > MAX_VOUCHED
                && let Some(oldest) = state.order.pop_front()
            {
                state.vouched.remove(&oldest);
            }
        }
    }

    /// Sets the narrowest scope among connected peers.
    pub(crate) fn set_floor(&self, floor: Option<Scope>) {
        self.lock().floor = floor;
    }

    /// Whether `addr` may be dialled now.
    pub(crate) fn allows(&self, addr: &Multiaddr) -> bool {
        if !dialable(addr) {
            return false;
        }
        let scope = Scope::of(addr);
        if scope == Scope::Global {
            return true;
        }
        let (peer, bare) = split_peer(addr);
        let state = self.lock();
        state.floor.is_some_and(|floor| scope >= floor)
            || state.bootstrap.contains(&bare)
            || peer.is_some_and(|peer| state.vouched.contains(&(peer, bare)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `addr` has the shape of an address this node dials: an IP
/// address, then TCP or QUIC (or libp2p's memory transport), then perhaps
/// `/p2p/<peer id>`.
fn dialable(addr: &Multiaddr) -> bool {
    let parts: Vec<Protocol<'_>> = addr.iter().collect();
    let parts = match parts.split_last() {
        Some((Protocol::P2p(_), rest)) => rest,
        _ => &parts[..],
    };
    matches!(
        parts,
        [Protocol::Ip4(_) | Protocol::Ip6(_), Protocol::Tcp(_)]
            | [
                Protocol::Ip4(_) | Protocol::Ip6(_),
                Protocol::Udp(_),
                Protocol::QuicV1
            ]
            | [Protocol::Memory(_)]
    )
}

/// The peer id at the end of `addr`, which libp2p adds to the addresses it
/// dials, and the address without it.
fn split_peer(addr: &Multiaddr) -> (Option<PeerId>, Multiaddr) {
    let mut bare = addr.clone();
    match bare.pop() {
        Some(Protocol::P2p(peer)) => (Some(peer), bare),
        _ => (None, addr.clone()),
    }
}

/// A transport that dials only what [`DialScope`] allows; listening and
/// everything else is the inner transport's.
pub(crate) struct ScopedTransport<T> {
    inner: T,
    scope: DialScope,
}

impl<T> ScopedTransport<T> {
    pub(crate) fn new(inner: T, scope: DialScope) -> Self {
        Self { inner, scope }
    }
}

impl<T: libp2p::Transport + Unpin> libp2p::Transport for ScopedTransport<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        if !self.scope.allows(&addr) {
            tracing::debug!(
                %addr,
                "not dialling: not an address this node dials, or one nearer than any \
                 connection here and not known first-hand"
            );
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn at(peer: PeerId, s: &str) -> Multiaddr {
        addr(&format!("{s}/p2p/{peer}"))
    }

    #[test]
    fn with_no_peer_only_the_internet_and_first_hand_addresses_are_dialled() {
        let scope = DialScope::new(&[addr("/ip4/127.0.0.1/tcp/7")]);
        let peer = PeerId::random();
        assert!(scope.allows(&addr("/ip4/198.51.100.7/tcp/1")));
        assert!(scope.allows(&at(peer, "/ip4/198.51.100.7/udp/1/quic-v1")));
        assert!(!scope.allows(&addr("/ip4/127.0.0.1/tcp/1")));
        assert!(!scope.allows(&addr("/ip4/10.0.0.5/udp/1/quic-v1")));
        assert!(!scope.allows(&addr("/ip4/0.0.0.0/tcp/1")));
        assert!(!scope.allows(&addr("/ip6/::ffff:127.0.0.1/tcp/1")));
        // The owner's bootstrap address, whoever answers there.
        assert!(scope.allows(&addr("/ip4/127.0.0.1/tcp/7")));
        assert!(scope.allows(&at(peer, "/ip4/127.0.0.1/tcp/7")));
        // A vouched address, for its peer only.
        scope.vouch(peer, &addr("/ip4/192.168.1.9/tcp/1"));
        assert!(
            scope.allows(&at(peer, "/ip4/192.168.1.9/tcp/1")),
            "libp2p adds the peer id to what it dials"
        );
        assert!(!scope.allows(&at(PeerId::random(), "/ip4/192.168.1.9/tcp/1")));
        assert!(!scope.allows(&addr("/ip4/192.168.1.9/tcp/1")));
        assert!(!scope.allows(&at(peer, "/ip4/192.168.1.9/tcp/2")));
    }

    #[test]
    fn only_addresses_of_a_dialable_shape_are_dialled() {
        let scope = DialScope::default();
        scope.set_floor(Some(Scope::Loopback));
        assert!(scope.allows(&addr("/ip4/127.0.0.1/tcp/1")));
        assert!(scope.allows(&addr("/memory/5")));
        for stacked in [
            "/ip4/198.51.100.7/ip4/127.0.0.1/tcp/22",
            "/dns4/localhost/tcp/22",
            "/ip4/198.51.100.7/tcp/1/ip4/127.0.0.1/tcp/2",
            "/ip4/198.51.100.7/udp/1/quic",
            "/ip4/198.51.100.7",
        ] {
            assert!(!scope.allows(&addr(stacked)), "{stacked}");
        }
        let peer = PeerId::random();
        assert!(!scope.allows(&addr(&format!("/p2p/{peer}/ip4/198.51.100.7/tcp/22"))));
    }

    #[test]
    fn hearsay_must_reach_as_far_as_the_narrowest_connection() {
        let scope = DialScope::default();
        let (loopback, lan) = (addr("/ip4/127.0.0.1/tcp/9"), addr("/ip4/192.168.1.9/tcp/9"));
        scope.set_floor(Some(Scope::Global));
        assert!(!scope.allows(&loopback) && !scope.allows(&lan));
        scope.set_floor(Some(Scope::Private));
        assert!(!scope.allows(&loopback) && scope.allows(&lan));
        scope.set_floor(Some(Scope::Loopback));
        assert!(scope.allows(&loopback) && scope.allows(&lan));
        scope.set_floor(None);
        assert!(!scope.allows(&loopback) && !scope.allows(&lan));
    }

    #[test]
    fn first_hand_addresses_are_bounded_and_bootstrap_ones_kept() {
        let scope = DialScope::new(&[addr("/ip4/127.0.0.1/tcp/65535")]);
        let peer = PeerId::random();
        for port in 0..=MAX_VOUCHED as u16 {
            scope.vouch(peer, &addr(&format!("/ip4/127.0.0.1/tcp/{port}")));
        }
        assert!(
            !scope.allows(&at(peer, "/ip4/127.0.0.1/tcp/0")),
            "the oldest went"
        );
        assert!(scope.allows(&at(peer, &format!("/ip4/127.0.0.1/tcp/{MAX_VOUCHED}"))));
        assert_eq!(scope.lock().vouched.len(), MAX_VOUCHED);
        assert!(scope.allows(&addr("/ip4/127.0.0.1/tcp/65535")));
    }
}

//! Which addresses this node will dial.
//!
//! Peers tell a node where other peers are: Kademlia answers carry
//! addresses for third parties, and identify's cache keeps whatever a peer
//! claims for itself. Dialled as given, a peer on the internet could make
//! a node open connections into its own machine (`127.0.0.1`) or its
//! owner's network (`10.0.0.5`). Every dial of every protocol goes through
//! [`ScopedTransport`], which asks [`DialScope`] first:
//!
//! - an address of the internet's scope is always dialled;
//! - an address this node has first-hand (a bootstrap address from its
//!   owner, one found by mDNS, one a connected peer claimed for itself and
//!   was believed, one a connection ran on) is dialled: these are
//!   [vouched](DialScope::vouch) for;
//! - any other address only if it reaches at least as far as the
//!   narrowest connection this node has: a node on a LAN hears of LAN
//!   peers from LAN peers, a swarm on one machine of loopback peers from
//!   loopback peers, and a node whose peers are all on the internet dials
//!   nothing nearer than the internet on anyone's word.
//!
//! What remains: a node with both LAN and internet peers can be told of
//! LAN addresses by an internet peer (`docs/threat-model.md`).

use std::collections::{HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use libp2p::Multiaddr;
use libp2p::core::transport::{DialOpts, ListenerId, TransportError, TransportEvent};
use libp2p::multiaddr::Protocol;

use crate::peers::Scope;

/// First-hand addresses remembered; the oldest is forgotten first.
pub(crate) const MAX_VOUCHED: usize = 1024;

/// The dial policy, shared by the event loop (which learns addresses and
/// connections) and the transport (which dials).
#[derive(Clone, Debug, Default)]
pub(crate) struct DialScope(Arc<Mutex<State>>);

#[derive(Debug, Default)]
struct State {
    vouched: HashSet<Multiaddr>,
    order: VecDeque<Multiaddr>,
    /// The narrowest scope among connected peers; `None` with no peer.
    floor: Option<Scope>,
}

impl DialScope {
    /// Remembers `addr` as one this node has first-hand.
    pub(crate) fn vouch(&self, addr: &Multiaddr) {
        let addr = without_peer(addr);
        if Scope::of(&addr) == Scope::Global {
            return;
        }
        let mut state = self.lock();
        if state.vouched.insert(addr.clone()) {
            state.order.push_back(addr);
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
        let scope = Scope::of(addr);
        if scope == Scope::Global {
            return true;
        }
        let state = self.lock();
        state.floor.is_some_and(|floor| scope >= floor)
            || state.vouched.contains(&without_peer(addr))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `addr` without a trailing `/p2p/<peer id>`, which libp2p adds to the
/// addresses it dials.
fn without_peer(addr: &Multiaddr) -> Multiaddr {
    let mut addr = addr.clone();
    if let Some(Protocol::P2p(_)) = addr.iter().last() {
        addr.pop();
    }
    addr
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
                "not dialling an address a peer gave, nearer than any connection here"
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

    #[test]
    fn with_no_peer_only_the_internet_and_first_hand_addresses_are_dialled() {
        let scope = DialScope::default();
        assert!(scope.allows(&addr("/ip4/198.51.100.7/tcp/1")));
        assert!(!scope.allows(&addr("/ip4/127.0.0.1/tcp/1")));
        assert!(!scope.allows(&addr("/ip4/10.0.0.5/udp/1/quic-v1")));
        assert!(!scope.allows(&addr("/ip4/0.0.0.0/tcp/1")));
        assert!(!scope.allows(&addr("/ip6/::ffff:127.0.0.1/tcp/1")));
        scope.vouch(&addr("/ip4/127.0.0.1/tcp/1"));
        let peer = libp2p::PeerId::random();
        assert!(
            scope.allows(&addr(&format!("/ip4/127.0.0.1/tcp/1/p2p/{peer}"))),
            "libp2p adds the peer id to what it dials"
        );
        assert!(!scope.allows(&addr("/ip4/127.0.0.1/tcp/2")));
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
    fn first_hand_addresses_are_bounded() {
        let scope = DialScope::default();
        for port in 0..=MAX_VOUCHED as u16 {
            scope.vouch(&addr(&format!("/ip4/127.0.0.1/tcp/{port}")));
        }
        assert!(
            !scope.allows(&addr("/ip4/127.0.0.1/tcp/0")),
            "the oldest went"
        );
        assert!(scope.allows(&addr(&format!("/ip4/127.0.0.1/tcp/{MAX_VOUCHED}"))));
        assert_eq!(scope.lock().vouched.len(), MAX_VOUCHED);
    }
}

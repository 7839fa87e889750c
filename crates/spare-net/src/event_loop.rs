//! The one task that owns the [`Swarm`].
//!
//! It `select!`s, biased in this order, over: shutdown; commands from
//! [`NetHandle`](crate::NetHandle)s (local work first, as libp2p's coding
//! guidelines ask); swarm events; a redial tick for peers we lost
//! (`redial.rs`); and a maintenance tick. Replies to commands
//! travel back on oneshot channels kept in maps keyed by request id.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::request_response::{
    self, InboundRequestId, OutboundFailure, OutboundRequestId, ResponseChannel,
};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, core::transport::ListenerId, identify, kad, mdns, ping};
use spare_core::wire::{self, BlobRequest, BlobResponse, Offer};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::behaviour::{Behaviour, BehaviourEvent, IDENTIFY_PROTOCOL};
use crate::codec::Incoming;
use crate::peers::{MAX_ADDRS_PER_PEER, Scope};
use crate::redial::Redial;
use crate::{BlobResponder, Held, NetError, NetEvent, RequestError, Shared};

/// How often the loop checks its connections and tidies its maps.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(10);
/// How often lost peers are checked for a redial that is due.
const REDIAL_INTERVAL: Duration = Duration::from_secs(1);
/// Kademlia bootstrap runs every this many maintenance ticks.
const KAD_BOOTSTRAP_EVERY: u32 = 30;
/// Above this many connected peers, peers learned from the DHT are not
/// dialled proactively.
const TARGET_PEERS: usize = 32;
/// The most often the offer is re-published for peers that subscribe.
const WELCOME_INTERVAL: Duration = Duration::from_secs(1);
/// How long listeners may take to come up at start.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

type Reply<T> = oneshot::Sender<Result<T, RequestError>>;

/// What a [`NetHandle`](crate::NetHandle) asks of the loop.
#[derive(Debug)]
pub(crate) enum Command {
    FetchBlob {
        peer: PeerId,
        request: BlobRequest,
        reply: Reply<BlobResponse>,
    },
    /// A blob answer, and what to hold until it has been sent (or failed).
    RespondBlob {
        channel: ResponseChannel<BlobResponse>,
        request: InboundRequestId,
        response: BlobResponse,
        hold: Option<Held>,
    },
    PublishOffer(Offer),
}

/// Lines a minute about peers that stopped answering pings: any peer can
/// connect and not answer, as often as it likes.
static PING_FAILURES_LOGGED: spare_core::LogBudget = spare_core::LogBudget::new(20);
/// Warnings a minute that mDNS's list is full: a LAN host can fill it
/// again each time its finds expire.
static MDNS_FULL_LOGGED: spare_core::LogBudget = spare_core::LogBudget::new(1);

pub(crate) struct EventLoop {
    swarm: Swarm<Behaviour>,
    topic: IdentTopic,
    bootstrap: Vec<Multiaddr>,
    commands: mpsc::Receiver<Command>,
    /// Given to each [`BlobResponder`] so replies come back through `commands`.
    own_commands: mpsc::Sender<Command>,
    events: mpsc::Sender<NetEvent>,
    shared: Arc<Shared>,
    pending_blobs: HashMap<OutboundRequestId, Reply<BlobResponse>>,
    /// What blob answers on their way hold (the daemon's serving budget),
    /// released when libp2p reports each sent or failed. At most one entry
    /// per inbound request in flight.
    sending_blobs: HashMap<InboundRequestId, Held>,
    /// Our latest offer, encoded, re-published to each peer that subscribes.
    offer: Option<Vec<u8>>,
    /// When the offer was last re-published for a newcomer.
    welcomed: Option<std::time::Instant>,
    /// Spare peers whose connections closed, to be dialled again.
    redial: Redial,
    /// Our listeners, closed explicitly when the loop stops.
    listeners: Vec<ListenerId>,
    /// Dials to bootstrap addresses in flight, to say which one failed.
    bootstrap_dials: HashMap<ConnectionId, Multiaddr>,
    /// Bootstrap addresses already reported unreachable (they are dialled
    /// again every maintenance tick while we have no peer).
    bootstrap_warned: HashSet<Multiaddr>,
    /// Whether mDNS's list of finds was full when last heard from, so the
    /// owner is told once each time it fills.
    mdns_full: bool,
    ticks: u32,
}

impl EventLoop {
    pub(crate) fn new(
        swarm: Swarm<Behaviour>,
        topic: IdentTopic,
        bootstrap: Vec<Multiaddr>,
        commands: mpsc::Receiver<Command>,
        own_commands: mpsc::Sender<Command>,
        events: mpsc::Sender<NetEvent>,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            swarm,
            topic,
            bootstrap,
            commands,
            own_commands,
            events,
            shared,
            pending_blobs: HashMap::new(),
            sending_blobs: HashMap::new(),
            offer: None,
            welcomed: None,
            redial: Redial::default(),
            listeners: Vec::new(),
            bootstrap_dials: HashMap::new(),
            bootstrap_warned: HashSet::new(),
            mdns_full: false,
            ticks: 0,
        }
    }

    /// Drives the swarm until every listener in `listeners` has an address,
    /// so the caller can report where the node listens.
    pub(crate) async fn wait_for_listeners(
        &mut self,
        listeners: &[ListenerId],
    ) -> Result<(), NetError> {
        self.listeners = listeners.to_vec();
        let mut waiting: Vec<ListenerId> = listeners.to_vec();
        let deadline = tokio::time::sleep(LISTEN_TIMEOUT);
        tokio::pin!(deadline);
        while !waiting.is_empty() {
            tokio::select! {
                () = &mut deadline => {
                    return Err(NetError::Config(format!("{} listener(s) did not start within {LISTEN_TIMEOUT:?}", waiting.len())));
                }
                event = self.swarm.select_next_some() => match event {
                    SwarmEvent::NewListenAddr { listener_id, .. } => {
                        waiting.retain(|l| *l != listener_id);
                        self.handle_event(event);
                    }
                    SwarmEvent::ListenerError { error, .. } => {
                        return Err(NetError::Config(format!("listener failed: {error}")));
                    }
                    SwarmEvent::ListenerClosed { reason: Err(error), .. } => {
                        return Err(NetError::Config(format!("listener closed: {error}")));
                    }
                    other => self.handle_event(other),
                }
            }
        }
        Ok(())
    }

    pub(crate) fn dial_bootstrap(&mut self) {
        self.bootstrap_dials.clear();
        for addr in self.bootstrap.clone() {
            let opts = DialOpts::from(addr.clone());
            let id = opts.connection_id();
            match self.swarm.dial(opts) {
                Ok(()) => {
                    self.bootstrap_dials.insert(id, addr);
                }
                Err(e) => tracing::warn!("cannot dial bootstrap peer {addr}: {e}"),
            }
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut maintenance = tokio::time::interval(MAINTENANCE_INTERVAL);
        maintenance.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut redial = tokio::time::interval(REDIAL_INTERVAL);
        redial.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                command = self.commands.recv() => match command {
                    Some(command) => self.handle_command(command),
                    None => break,
                },
                event = self.swarm.select_next_some() => self.handle_event(event),
                _ = maintenance.tick() => self.maintain(),
                _ = redial.tick() => self.redial(),
            }
        }
        // Dropping the swarm closes TCP and QUIC sockets, but libp2p's
        // memory transport frees its port only when the listener is removed.
        for listener in std::mem::take(&mut self.listeners) {
            self.swarm.remove_listener(listener);
        }
        tracing::debug!("network event loop stopped");
    }

    fn handle_command(&mut self, command: Command) {
        let behaviour = self.swarm.behaviour_mut();
        match command {
            Command::FetchBlob {
                peer,
                request,
                reply,
            } => {
                let id = behaviour.blob.send_request(&peer, Incoming::Valid(request));
                self.pending_blobs.insert(id, reply);
            }
            Command::RespondBlob {
                channel,
                request,
                response,
                hold,
            } => {
                // Fails only if the peer went away; what it held goes then.
                if behaviour.blob.send_response(channel, response).is_ok()
                    && let Some(hold) = hold
                {
                    self.sending_blobs.insert(request, hold);
                }
            }
            Command::PublishOffer(offer) => match wire::encode(&offer) {
                Ok(bytes) => {
                    self.offer = Some(bytes);
                    self.publish_offer();
                }
                Err(e) => tracing::error!("cannot encode our own offer: {e}"),
            },
        }
    }

    fn publish_offer(&mut self) {
        let Some(bytes) = self.offer.clone() else {
            return;
        };
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(self.topic.clone(), bytes)
        {
            Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => {}
            Err(e) => tracing::debug!("cannot publish offer: {e}"),
        }
    }

    fn handle_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!("listening on {address}");
                let mut addrs = self
                    .shared
                    .listen_addrs
                    .write()
                    .unwrap_or_else(|p| p.into_inner());
                if !addrs.contains(&address) {
                    addrs.push(address);
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.shared
                    .listen_addrs
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                endpoint,
                num_established,
                connection_id,
                ..
            } => {
                if let Some(addr) = self.bootstrap_dials.remove(&connection_id) {
                    self.bootstrap_warned.remove(&addr);
                }
                let remote = endpoint.get_remote_address();
                // Where we reached the peer, not the port it came from.
                if endpoint.is_dialer() {
                    self.shared.dial_scope.vouch(peer_id, remote);
                }
                let floor = {
                    let mut peers = self.write_peers();
                    peers.connected(peer_id, remote.clone(), endpoint.is_dialer());
                    peers.narrowest_reach()
                };
                self.shared.dial_scope.set_floor(floor);
                self.redial.found(&peer_id);
                if num_established.get() == 1 {
                    tracing::debug!(%peer_id, "connected");
                    self.shared
                        .connections
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(peer_id, CancellationToken::new());
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                cause,
                ..
            } => {
                tracing::debug!(%peer_id, ?cause, "disconnected");
                let (known, floor) = {
                    let mut peers = self.write_peers();
                    (peers.disconnected(&peer_id), peers.narrowest_reach())
                };
                self.shared.dial_scope.set_floor(floor);
                // Only a peer that identified itself as a spare node is
                // worth getting back.
                if let Some(info) = known.filter(|info| info.agent.is_some()) {
                    self.redial
                        .lost(peer_id, info.addrs, std::time::Instant::now());
                }
                self.shared.tasks.forget(&peer_id);
                let token = self
                    .shared
                    .connections
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&peer_id);
                if let Some(token) = token {
                    token.cancel();
                }
            }
            // One of several connections to a peer closed. Its idle task
            // streams may have been on it; new ones cost little.
            SwarmEvent::ConnectionClosed { peer_id, .. } => self.shared.tasks.forget(&peer_id),
            SwarmEvent::OutgoingConnectionError {
                peer_id,
                error,
                connection_id,
            } => match self.bootstrap_dials.remove(&connection_id) {
                Some(addr) if self.bootstrap_warned.insert(addr.clone()) => {
                    tracing::warn!(
                        "cannot reach bootstrap peer {addr} (trying again every {}s while \
                         no peer is connected): {}",
                        MAINTENANCE_INTERVAL.as_secs(),
                        dial_failure(&error)
                    );
                }
                _ => tracing::debug!(?peer_id, "dial failed: {error}"),
            },
            SwarmEvent::Behaviour(event) => self.handle_behaviour(event),
            _ => {}
        }
    }

    /// Notes what mDNS keeps after it found or forgot some peers, and tells
    /// the owner once each time its list fills: from then on, until some
    /// expire, peers on the LAN are not found ([`mdns::MAX_DISCOVERED`]).
    fn mdns_kept(&mut self, found: usize, expired: usize) {
        let kept = self
            .swarm
            .behaviour()
            .mdns
            .as_ref()
            .map_or(0, |mdns| mdns.discovered_nodes().len());
        tracing::debug!(found, expired, kept, "mDNS");
        let full = kept >= mdns::MAX_DISCOVERED;
        if full && !self.mdns_full && MDNS_FULL_LOGGED.allow() {
            tracing::warn!(
                "hosts on the LAN have named {kept} peer addresses over mDNS, the most this node \
                 keeps: it ignores more until some expire ({} after they were last announced)",
                spare_core::units::format_duration(mdns::MAX_TTL)
            );
        }
        self.mdns_full = full;
    }

    fn handle_behaviour(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocol_version != IDENTIFY_PROTOCOL {
                    tracing::debug!(%peer_id, version = info.protocol_version, "not a spare node; disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                // Kademlia keeps every address it is given and hands them
                // out: only a peer's first identify while connected adds
                // any (a peer may push identify at will), and only a few.
                let believable: Vec<Multiaddr> = {
                    let peers = self.read_peers();
                    if peers.identified_before(&peer_id) {
                        Vec::new()
                    } else {
                        info.listen_addrs
                            .iter()
                            .filter(|addr| peers.believable(&peer_id, addr))
                            .take(MAX_ADDRS_PER_PEER)
                            .cloned()
                            .collect()
                    }
                };
                // What Kademlia had of it from an earlier connection goes,
                // so a peer that reconnects does not add 8 more each time.
                if !believable.is_empty() {
                    self.swarm.behaviour_mut().kad.remove_peer(&peer_id);
                }
                for addr in believable {
                    self.shared.dial_scope.vouch(peer_id, &addr);
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
                self.write_peers()
                    .identified(&peer_id, info.agent_version, &info.listen_addrs);
            }
            BehaviourEvent::Ping(ping::Event { peer, result, .. }) => match result {
                Ok(rtt) => self.write_peers().rtt(&peer, rtt),
                // A peer without ping cannot be watched, but is not gone.
                Err(ping::Failure::Unsupported) => {
                    tracing::debug!(%peer, "peer does not support ping")
                }
                Err(e) => {
                    // A peer that stops answering pings (a timeout, or a ping
                    // stream that cannot even be negotiated) is gone for our
                    // purposes: closing the connection fails its pending
                    // requests, so their tasks are retried elsewhere.
                    if PING_FAILURES_LOGGED.allow() {
                        tracing::info!(%peer, "peer stopped answering pings ({e}); disconnecting");
                    } else {
                        tracing::debug!(%peer, "peer stopped answering pings ({e}); disconnecting");
                    }
                    let _ = self.swarm.disconnect_peer_id(peer);
                }
            },
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                self.mdns_kept(found.len(), 0);
                for (peer, addr) in found {
                    // Heard on the LAN: believed as far as the LAN, not
                    // for this machine's own loopback.
                    if Scope::of(&addr) >= Scope::Private {
                        self.shared.dial_scope.vouch(peer, &addr);
                    }
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    // mDNS answers are not authenticated: dialled only while
                    // this node wants more peers, like Kademlia's finds.
                    let few = self.read_peer_count() < TARGET_PEERS;
                    if few && !self.swarm.is_connected(&peer) {
                        let opts = DialOpts::peer_id(peer).addresses(vec![addr]).build();
                        let _ = self.swarm.dial(opts);
                    }
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Expired(gone)) => self.mdns_kept(0, gone.len()),
            BehaviourEvent::Kad(kad::Event::RoutingUpdated { peer, .. }) => {
                let few = self.read_peer_count() < TARGET_PEERS;
                if few && !self.swarm.is_connected(&peer) {
                    let _ = self.swarm.dial(peer);
                }
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => {
                let acceptance = match (message.source, wire::decode::<Offer>(&message.data)) {
                    // Only offers of peers connected here are used, so only
                    // those are passed on: a flood from throwaway keys, or
                    // replays of old offers, goes no further than us.
                    (Some(source), Ok(offer)) => {
                        if self.write_peers().offer(&source, offer) {
                            MessageAcceptance::Accept
                        } else {
                            MessageAcceptance::Ignore
                        }
                    }
                    (_, Err(e)) => {
                        tracing::debug!(%propagation_source, "invalid offer: {e}");
                        MessageAcceptance::Reject
                    }
                    (None, Ok(_)) => MessageAcceptance::Reject,
                };
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .report_message_validation_result(&message_id, &propagation_source, acceptance);
            }
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { .. }) => {
                // A newcomer hears our offer at once, but a peer toggling its
                // subscription cannot make us sign and flood offers at will.
                let due = self
                    .welcomed
                    .is_none_or(|at| at.elapsed() >= WELCOME_INTERVAL);
                if due {
                    self.welcomed = Some(std::time::Instant::now());
                    self.publish_offer();
                }
            }
            BehaviourEvent::Blob(event) => self.handle_blob(event),
            _ => {}
        }
    }

    /// One event of the blob protocol (libp2p's request-response).
    fn handle_blob(&mut self, event: request_response::Event<Incoming<BlobRequest>, BlobResponse>) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request: Incoming::Malformed(why),
                    channel,
                    ..
                } => {
                    tracing::debug!(%peer, "malformed blob request: {why}");
                    let answer = BlobResponse::Invalid(spare_core::outcome::clip_detail(why));
                    let _ = self
                        .swarm
                        .behaviour_mut()
                        .blob
                        .send_response(channel, answer);
                }
                request_response::Message::Request {
                    request: Incoming::Valid(request),
                    channel,
                    request_id,
                } => {
                    let reply = BlobResponder {
                        channel,
                        request: request_id,
                        commands: self.own_commands.clone(),
                    };
                    let event = NetEvent::BlobRequest {
                        peer,
                        request,
                        reply,
                    };
                    // The daemon is saturated: refuse now rather than queue
                    // without bound.
                    if let Err(mpsc::error::TrySendError::Full(NetEvent::BlobRequest {
                        reply: BlobResponder { channel, .. },
                        ..
                    })) = self.events.try_send(event)
                    {
                        let _ = self
                            .swarm
                            .behaviour_mut()
                            .blob
                            .send_response(channel, BlobResponse::Busy);
                    }
                }
                request_response::Message::Response {
                    request_id,
                    response,
                } => {
                    if let Some(reply) = self.pending_blobs.remove(&request_id) {
                        let _ = reply.send(Ok(response));
                    }
                }
            },
            request_response::Event::OutboundFailure {
                request_id,
                error,
                peer,
                ..
            } => {
                tracing::debug!(%peer, "blob request failed: {error}");
                if let Some(reply) = self.pending_blobs.remove(&request_id) {
                    let _ = reply.send(Err(request_error(error)));
                }
            }
            request_response::Event::InboundFailure {
                peer,
                error,
                request_id,
                ..
            } => {
                tracing::debug!(%peer, "inbound blob request failed: {error}");
                self.sending_blobs.remove(&request_id);
            }
            request_response::Event::ResponseSent { request_id, .. } => {
                self.sending_blobs.remove(&request_id);
            }
        }
    }

    fn maintain(&mut self) {
        self.ticks = self.ticks.wrapping_add(1);
        // Requesters that gave up no longer need their reply slot.
        self.pending_blobs.retain(|_, reply| !reply.is_closed());
        if self.read_peer_count() == 0 {
            self.dial_bootstrap();
        }
        if self.ticks % KAD_BOOTSTRAP_EVERY == 1 {
            let _ = self.swarm.behaviour_mut().kad.bootstrap();
        }
    }

    /// Dials the lost peers whose redial is due, at the addresses they were
    /// known at and whatever Kademlia knows of them.
    fn redial(&mut self) {
        for (peer, addrs) in self.redial.due(std::time::Instant::now()) {
            if self.swarm.is_connected(&peer) {
                self.redial.found(&peer);
                continue;
            }
            tracing::debug!(%peer, "dialling a lost peer again");
            let opts = DialOpts::peer_id(peer)
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .addresses(addrs)
                .extend_addresses_through_behaviour()
                .build();
            if let Err(e) = self.swarm.dial(opts) {
                tracing::debug!(%peer, "cannot dial a lost peer: {e}");
            }
        }
    }

    fn write_peers(&self) -> std::sync::RwLockWriteGuard<'_, crate::peers::PeerTable> {
        self.shared.peers.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read_peers(&self) -> std::sync::RwLockReadGuard<'_, crate::peers::PeerTable> {
        self.shared.peers.read().unwrap_or_else(|p| p.into_inner())
    }

    fn read_peer_count(&self) -> usize {
        self.shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// Why a dial failed, in a few words: the deepest cause of each address's
/// failure (e.g. `Connection refused (os error 111)`).
fn dial_failure(error: &DialError) -> String {
    fn deepest(mut err: &dyn std::error::Error) -> String {
        while let Some(source) = err.source() {
            err = source;
        }
        err.to_string()
    }
    match error {
        DialError::Transport(failures) if !failures.is_empty() => failures
            .iter()
            .map(|(_, e)| deepest(e))
            .collect::<Vec<_>>()
            .join("; "),
        other => crate::describe(other),
    }
}

fn request_error(error: OutboundFailure) -> RequestError {
    match error {
        OutboundFailure::DialFailure => RequestError::Unreachable("dial failed".into()),
        OutboundFailure::Timeout => RequestError::Timeout,
        OutboundFailure::ConnectionClosed => RequestError::ConnectionClosed,
        OutboundFailure::UnsupportedProtocols => RequestError::Unsupported,
        OutboundFailure::Io(e) => RequestError::Io(e.to_string()),
    }
}

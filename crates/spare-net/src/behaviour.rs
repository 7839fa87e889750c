//! The composed libp2p behaviour and the swarm around it.

use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, MemoryTransport, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    PeerId, StreamProtocol, Swarm, SwarmBuilder, connection_limits, gossipsub, identify, kad, mdns,
    noise, ping, quic, request_response, tcp, yamux,
};
use spare_core::wire::{BLOB_PROTOCOL, BlobRequest, BlobResponse, Message, OFFER_TOPIC, Offer};

use crate::codec::{CborCodec, ReadBudget};
use crate::dial_scope::{DialScope, ScopedTransport};
use crate::{NetConfig, NetError, Transport};

/// Kademlia protocol name: spare nodes form their own DHT.
const KAD_PROTOCOL: &str = "/spare/kad/1.0.0";
/// Identify's protocol version string; peers with another one are ignored.
pub(crate) const IDENTIFY_PROTOCOL: &str = "/spare/id/1.0.0";
/// How often we ping each peer, and how long a ping may take before the peer
/// counts as gone (its connection is then closed, failing its requests).
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(5);
pub(crate) const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Established connections in all, and per peer.
const MAX_CONNECTIONS: u32 = 256;
const MAX_CONNECTIONS_PER_PEER: u32 = 2;
/// Connections being set up from outside at once.
const MAX_PENDING_INCOMING: u32 = 64;
const DUPLICATE_CACHE_TIME: Duration = Duration::from_secs(10);
/// What a peer may have gossipsub buffer on one connection before a frame
/// decodes (libp2p's default).
const GOSSIP_READ_BYTES: usize = 64 << 10;
/// A gossiped offer: the offer and the envelope that signs it.
const OFFER_GOSSIP_BYTES: usize = Offer::MAX_BYTES + 512;
/// Dials in progress at once: mDNS answers are not authenticated, and a
/// host on the LAN could otherwise name peers at addresses that never
/// answer, each dial holding a socket until it times out.
const MAX_PENDING_OUTGOING: u32 = 64;
/// Concurrent inbound blob requests per connection. Their bytes are bounded
/// together by the node's read budget (`codec::ReadBudget`).
const MAX_CONCURRENT_STREAMS: usize = 256;
const BLOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections with no traffic close after this long.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(3600);

pub(crate) type BlobBehaviour = request_response::Behaviour<CborCodec<BlobRequest, BlobResponse>>;
/// Gossipsub that keeps track of peers' subscriptions to the offer topic
/// only: libp2p's default filter remembers every topic a peer names, and
/// a peer could name topics without end.
pub(crate) type Gossip =
    gossipsub::Behaviour<gossipsub::IdentityTransform, gossipsub::WhitelistSubscriptionFilter>;

fn offer_topic() -> gossipsub::TopicHash {
    gossipsub::IdentTopic::new(OFFER_TOPIC).hash()
}

/// The only topic spare speaks on, as a subscription filter.
fn offer_topic_only() -> gossipsub::WhitelistSubscriptionFilter {
    gossipsub::WhitelistSubscriptionFilter(std::iter::once(offer_topic()).collect())
}

#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) gossipsub: Gossip,
    /// The task protocol's streams (`tasks.rs`), used outside the swarm.
    pub(crate) streams: libp2p_stream::Behaviour,
    pub(crate) blob: BlobBehaviour,
}

impl Behaviour {
    fn new(key: &Keypair, mdns_on: bool, budget: ReadBudget) -> Result<Self, NetError> {
        let peer_id = key.public().to_peer_id();
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(MAX_CONNECTIONS))
                .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                .with_max_pending_incoming(Some(MAX_PENDING_INCOMING))
                .with_max_pending_outgoing(Some(MAX_PENDING_OUTGOING)),
        );
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                .with_agent_version(format!("spare/{}", env!("CARGO_PKG_VERSION"))),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(PING_INTERVAL)
                .with_timeout(PING_TIMEOUT),
        );
        let mdns = if mdns_on {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(NetError::Mdns)?,
            )
        } else {
            None
        };
        // Kademlia finds peers; spare keeps no records in it. Records and
        // provider records that peers put are handed to the event loop,
        // which drops them, instead of being stored on anyone's behalf.
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_record_filtering(kad::StoreInserts::FilterBoth);
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        kad.set_mode(Some(kad::Mode::Server));
        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_secs(1))
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            // libp2p-gossipsub 0.50 holds the whole read buffer, not one
            // frame, to the global limit, and drops the stream when frames
            // that arrived together exceed it: a tight global limit would
            // lose bursts of offers. The global limit bounds the buffer;
            // each offer is held to its own.
            .max_transmit_size(GOSSIP_READ_BYTES)
            .max_transmit_size_for_topic(OFFER_GOSSIP_BYTES, offer_topic())
            // Message ids seen are remembered this long (libp2p's default is
            // a minute): long enough for gossip's five heartbeats of
            // history, short enough that a flood of signed messages from
            // connected peers is not kept for long.
            .duplicate_cache_time(DUPLICATE_CACHE_TIME)
            .build()
            .map_err(|e| NetError::Config(e.to_string()))?;
        let gossipsub = Gossip::new_with_subscription_filter(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
            offer_topic_only(),
        )
        .map_err(|e| NetError::Config(e.into()))?;
        let blob = request_response::Behaviour::with_codec(
            CborCodec::new(budget),
            [(
                StreamProtocol::new(BLOB_PROTOCOL),
                request_response::ProtocolSupport::Full,
            )],
            request_response::Config::default()
                .with_request_timeout(BLOB_REQUEST_TIMEOUT)
                .with_max_concurrent_streams(MAX_CONCURRENT_STREAMS),
        );
        Ok(Self {
            limits,
            identify,
            ping,
            mdns: Toggle::from(mdns),
            kad,
            gossipsub,
            streams: libp2p_stream::Behaviour::new(),
            blob,
        })
    }
}

/// Builds the swarm on the configured transport, dialling only what
/// `scope` allows.
pub(crate) fn build_swarm(
    config: &NetConfig,
    budget: &ReadBudget,
    scope: &DialScope,
) -> Result<Swarm<Behaviour>, NetError> {
    let key = config.keypair.clone();
    let mdns_on = config.mdns;
    // With one protocol proposed, V1Lazy sends the request together with the
    // protocol proposal instead of waiting a round trip for the echo: every
    // task request and blob chunk saves one round trip. All spare peers
    // speak it.
    let swarm_config = |c: libp2p::swarm::Config| {
        c.with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT)
            .with_substream_upgrade_protocol_override(Version::V1Lazy)
    };
    let kind = config.transport;
    let swarm = SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| transport(kind, key, scope.clone()))
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_behaviour(|key| Behaviour::new(key, mdns_on, budget.clone()).map_err(Box::from))
        .map_err(|e| NetError::Transport(e.to_string()))?
        .with_swarm_config(swarm_config)
        .build();
    Ok(swarm)
}

type BoxedError = Box<dyn std::error::Error + Send + Sync>;

/// What a QUIC peer may have this node buffer for one stream it does not
/// read, and for all of a connection's streams together. libp2p's
/// defaults (10 MB and 15 MB) would let each of the requests that wait
/// unread for their turn hold megabytes; these match what yamux gives a
/// stream to start (256 KiB), twice over, which still moves a blob chunk
/// in a few round trips.
const QUIC_STREAM_WINDOW: u32 = 512 << 10;
const QUIC_CONNECTION_WINDOW: u32 = 8 << 20;

fn quic_config(key: &Keypair) -> quic::Config {
    let mut config = quic::Config::new(key);
    config.max_stream_data = QUIC_STREAM_WINDOW;
    config.max_connection_data = QUIC_CONNECTION_WINDOW;
    config
}

/// The transports `SwarmBuilder::with_tcp` and `with_quic` would make (or,
/// in tests, a memory transport), wrapped in the dial policy.
fn transport(
    kind: Transport,
    key: &Keypair,
    scope: DialScope,
) -> Result<ScopedTransport<Boxed<(PeerId, StreamMuxerBox)>>, BoxedError> {
    let inner = match kind {
        Transport::TcpQuic => {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .upgrade(Version::V1Lazy)
                .authenticate(noise::Config::new(key)?)
                .multiplex(yamux::Config::default())
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            let quic = quic::tokio::Transport::new(quic_config(key))
                .map(|(peer, connection), _| (peer, StreamMuxerBox::new(connection)));
            tcp.or_transport(quic)
                .map(|either, _| either.into_inner())
                .boxed()
        }
        Transport::Memory => MemoryTransport::default()
            .upgrade(Version::V1)
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
    };
    Ok(ScopedTransport::new(inner, scope))
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use libp2p::Multiaddr;
    use libp2p::swarm::SwarmEvent;

    use super::*;

    /// A node's swarm as `build_swarm` makes it, on the offer topic and
    /// listening on a fresh memory address.
    fn node() -> (Swarm<Behaviour>, Multiaddr) {
        let config = NetConfig {
            keypair: Keypair::generate_ed25519(),
            listen: vec![],
            bootstrap: vec![],
            mdns: false,
            transport: Transport::Memory,
            answer_budget: crate::answer_budget(1, 1 << 20),
        };
        let budget = ReadBudget::new(1 << 20);
        let mut node = build_swarm(&config, &budget, &DialScope::default()).unwrap();
        let offers = gossipsub::IdentTopic::new(OFFER_TOPIC);
        node.behaviour_mut().gossipsub.subscribe(&offers).unwrap();
        let addr: Multiaddr = format!("/memory/{}", u64::from(rand::random::<u32>()) + 1)
            .parse()
            .unwrap();
        node.listen_on(addr.clone()).unwrap();
        (node, addr)
    }

    /// A peer with libp2p's gossipsub as it comes, connected to `node`.
    async fn rogue(node: &mut Swarm<Behaviour>, addr: Multiaddr) -> Swarm<gossipsub::Behaviour> {
        let scope = DialScope::new(std::slice::from_ref(&addr));
        let mut rogue = SwarmBuilder::with_new_identity()
            .with_tokio()
            .with_other_transport(|key| transport(Transport::Memory, key, scope))
            .unwrap()
            .with_behaviour(|key| {
                gossipsub::Behaviour::new(
                    gossipsub::MessageAuthenticity::Signed(key.clone()),
                    gossipsub::Config::default(),
                )
                .map_err(Box::from)
            })
            .unwrap()
            .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
            .build();
        rogue.dial(addr).unwrap();
        loop {
            tokio::select! {
                event = rogue.select_next_some() => {
                    if let SwarmEvent::ConnectionEstablished { .. } = event {
                        return rogue;
                    }
                }
                _ = node.select_next_some() => {}
            }
        }
    }

    /// Runs both swarms until `done` holds of the node and its event.
    async fn run_until(
        node: &mut Swarm<Behaviour>,
        rogue: &mut Swarm<gossipsub::Behaviour>,
        mut done: impl FnMut(&Swarm<Behaviour>, Option<BehaviourEvent>) -> bool,
    ) {
        let deadline = tokio::time::sleep(Duration::from_secs(20));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                event = node.select_next_some() => {
                    let event = match event {
                        SwarmEvent::Behaviour(event) => Some(event),
                        _ => None,
                    };
                    if done(node, event) {
                        return;
                    }
                }
                _ = rogue.select_next_some() => {}
                () = &mut deadline => panic!("timed out"),
            }
        }
    }

    /// A peer that subscribes to many topics besides the offers is
    /// remembered as subscribed to the offers only.
    #[tokio::test]
    async fn a_peer_is_remembered_on_the_offer_topic_only() {
        let (mut node, addr) = node();
        let mut rogue = rogue(&mut node, addr).await;
        let rogue_id = *rogue.local_peer_id();
        // Subscribed after connecting, each topic is announced in a
        // message of its own, in order: once the node knows the rogue is
        // on the offer topic it has seen all the others.
        for n in 0..500 {
            let topic = gossipsub::IdentTopic::new(format!("junk-{n}"));
            rogue.behaviour_mut().subscribe(&topic).unwrap();
        }
        let offers = gossipsub::IdentTopic::new(OFFER_TOPIC);
        rogue.behaviour_mut().subscribe(&offers).unwrap();
        let mut topics = vec![];
        run_until(&mut node, &mut rogue, |node, _| {
            topics = node
                .behaviour()
                .gossipsub
                .all_peers()
                .filter(|(peer, _)| **peer == rogue_id)
                .flat_map(|(_, topics)| topics.into_iter().cloned())
                .collect();
            !topics.is_empty()
        })
        .await;
        assert_eq!(topics, vec![offers.hash()]);
    }

    /// Offers that arrive together, more bytes than one offer may have,
    /// all reach the node.
    #[tokio::test]
    async fn a_burst_of_offers_arrives_whole() {
        const BURST: usize = 12;
        let (mut node, addr) = node();
        let mut rogue = rogue(&mut node, addr).await;
        let offers = gossipsub::IdentTopic::new(OFFER_TOPIC);
        rogue.behaviour_mut().subscribe(&offers).unwrap();
        // Published once the node is in the rogue's mesh (it has seen the
        // node's subscription and grafted it).
        let node_id = *node.local_peer_id();
        while !rogue
            .behaviour()
            .mesh_peers(&offers.hash())
            .any(|p| *p == node_id)
        {
            tokio::select! {
                _ = node.select_next_some() => {}
                _ = rogue.select_next_some() => {}
            }
        }
        for n in 0..BURST {
            let offer = vec![u8::try_from(n).unwrap(); Offer::MAX_BYTES - 16];
            rogue
                .behaviour_mut()
                .publish(offers.clone(), offer)
                .unwrap();
        }
        let mut heard = 0;
        run_until(&mut node, &mut rogue, |_, event| {
            if let Some(BehaviourEvent::Gossipsub(gossipsub::Event::Message { .. })) = event {
                heard += 1;
            }
            heard == BURST
        })
        .await;
    }
}

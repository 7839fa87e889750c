//! The peer-to-peer network of spare, on rust-libp2p.
//!
//! [`start`] builds the swarm (TCP + QUIC, or libp2p's memory transport in
//! tests), spawns the event loop that owns it, and returns a cloneable
//! [`NetHandle`] plus a stream of [`NetEvent`]s. Everything else talks to the
//! swarm through that handle, over bounded channels; each command carries a
//! oneshot for its reply (the shape of libp2p's file-sharing example).
//!
//! Protocols: identify, ping, mDNS (optional), Kademlia, gossipsub for
//! [`Offer`]s, [`TASK_PROTOCOL`](spare_core::wire::TASK_PROTOCOL) (requests
//! and answers framed on pooled streams, `tasks.rs`), and
//! [`BLOB_PROTOCOL`](spare_core::wire::BLOB_PROTOCOL) (libp2p's
//! request-response with a bounded CBOR codec).
//!
//! **Architecture invariant:** this crate knows nothing about wasmtime. It
//! moves [`spare_core::wire`] messages and never looks inside a task.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod answers;
mod behaviour;
mod codec;
mod dial_scope;
mod event_loop;
mod peers;
mod redial;
mod tasks;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use libp2p::request_response::{InboundRequestId, ResponseChannel};
use spare_core::wire::{BlobRequest, BlobResponse, Offer, TaskRequest, TaskResponse};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

pub use answers::{AnswerRoom, Reserved, answer_budget};
pub use libp2p::{Multiaddr, identity};
pub use peers::PeerInfo;

/// Commands queued to the event loop before senders wait.
const COMMAND_QUEUE: usize = 1024;
/// Events queued to the daemon; inbound requests beyond this are refused as
/// busy rather than buffered.
const EVENT_QUEUE: usize = 1024;

/// Which transport the swarm runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP and QUIC: what a real node uses.
    TcpQuic,
    /// libp2p's in-process memory transport, for protocol tests.
    Memory,
}

/// How to start the network.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The node key; its public key is the PeerId.
    pub keypair: Keypair,
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (and again whenever we have no peer at all).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    pub transport: Transport,
    /// Bytes of task answers this node may hold for its requesters at
    /// once ([`answer_budget`] for its slots and the largest answer it
    /// grants).
    pub answer_budget: usize,
}

/// Why the network could not start.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot set up the transport: {0}")]
    Transport(String),
    #[error("cannot start mDNS: {0}")]
    Mdns(std::io::Error),
    #[error("invalid network configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {reason}")]
    Listen { addr: Multiaddr, reason: String },
}

/// Why a request to a peer failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("cannot reach peer: {0}")]
    Unreachable(String),
    #[error("peer did not answer in time")]
    Timeout,
    #[error("connection to peer closed")]
    ConnectionClosed,
    #[error("peer does not speak the protocol")]
    Unsupported,
    /// The peer dropped every new stream before it read the request on it:
    /// it was taking streams more slowly than they came, or holds as many
    /// as it allows. The request was never seen.
    #[error("the peer took none of {0} new task streams (it is busy, or holds too many open)")]
    NotAccepted(u32),
    #[error("request failed: {0}")]
    Io(String),
    #[error("the network is shutting down")]
    Shutdown,
}

/// Something the daemon must act on.
#[derive(Debug)]
pub enum NetEvent {
    /// A peer asks us to run or cancel a task.
    TaskRequest {
        peer: PeerId,
        request: TaskRequest,
        reply: TaskResponder,
    },
    /// A peer asks for a chunk of a blob.
    BlobRequest {
        peer: PeerId,
        request: BlobRequest,
        reply: BlobResponder,
    },
}

/// The way back to a peer that asked us to run or cancel a task: straight
/// to the task stream the request came on (`tasks.rs`). Dropping it
/// without replying closes that stream, which the peer sees as a failed
/// request.
#[derive(Debug)]
pub struct TaskResponder {
    answer: oneshot::Sender<(TaskResponse, Option<Reserved>)>,
    room: AnswerRoom,
}

impl TaskResponder {
    pub async fn send(self, response: TaskResponse) {
        self.send_reserved(response, None).await;
    }

    /// Sends `response` with the room reserved for it, which is held
    /// until the answer has been written (or given up).
    pub async fn send_reserved(self, response: TaskResponse, reserved: Option<Reserved>) {
        let _ = self.answer.send((response, reserved));
    }

    /// The requester's share of the node's answer budget, where a task's
    /// answer is reserved before the task runs ([`answers`]).
    pub fn room(&self) -> AnswerRoom {
        self.room.clone()
    }

    /// Resolves when the peer no longer waits for the answer: it closed
    /// the stream, or broke the protocol on it, before the answer came.
    pub async fn abandoned(&mut self) {
        self.answer.closed().await
    }
}

/// The way back to a peer that asked for a blob chunk: through the event
/// loop, to libp2p's request-response. Dropping it without replying closes
/// the peer's stream, which it sees as a failed request.
#[derive(Debug)]
pub struct BlobResponder {
    channel: ResponseChannel<BlobResponse>,
    request: InboundRequestId,
    commands: mpsc::Sender<event_loop::Command>,
}

/// Something an answer holds until it has left (a share of a budget):
/// dropped when libp2p reports the answer sent, or failed.
pub type Held = Box<dyn std::any::Any + Send>;

impl BlobResponder {
    pub async fn send(self, response: BlobResponse) {
        self.send_holding(response, None).await;
    }

    /// Sends `response`, keeping `hold` until the peer has taken it (or the
    /// request failed): a peer that does not read its answers keeps only
    /// what it was given.
    pub async fn send_holding(self, response: BlobResponse, hold: Option<Held>) {
        let _ = self
            .commands
            .send(event_loop::Command::RespondBlob {
                channel: self.channel,
                request: self.request,
                response,
                hold,
            })
            .await;
    }
}

/// A cloneable handle to the running network.
#[derive(Clone, Debug)]
pub struct NetHandle {
    local_peer_id: PeerId,
    commands: mpsc::Sender<event_loop::Command>,
    shared: Arc<Shared>,
}

/// State the event loop publishes for cheap reads.
#[derive(Debug)]
struct Shared {
    peers: RwLock<peers::PeerTable>,
    listen_addrs: RwLock<Vec<Multiaddr>>,
    /// One token per connected peer, cancelled when its last connection
    /// closes.
    connections: RwLock<HashMap<PeerId, CancellationToken>>,
    /// The task protocol's pooled streams.
    tasks: tasks::TaskStreams,
    /// Which addresses the transport may dial; the event loop tells it of
    /// first-hand addresses and how near our peers are.
    dial_scope: dial_scope::DialScope,
}

/// Starts the network: binds the listen addresses, dials the bootstrap
/// peers, and spawns the event loop, which runs until `shutdown` fires.
pub async fn start(
    mut config: NetConfig,
    shutdown: CancellationToken,
) -> Result<(NetHandle, mpsc::Receiver<NetEvent>), NetError> {
    for addr in &config.listen {
        probe_tcp_port(addr)?;
    }
    // A list of bootstrap peers shared by every node of a swarm names each
    // node too: it has nothing to dial there.
    let own = config.keypair.public().to_peer_id();
    config.bootstrap.retain(|addr| {
        let itself = matches!(
            addr.iter().last(),
            Some(libp2p::multiaddr::Protocol::P2p(peer)) if peer == own
        );
        if itself {
            tracing::info!("bootstrap address {addr} is this node's own; not dialled");
        }
        !itself
    });
    let budget = codec::ReadBudget::new(codec::READ_BUDGET_BYTES);
    let scope = dial_scope::DialScope::new(&config.bootstrap);
    let mut swarm = behaviour::build_swarm(&config, &budget, &scope)?;
    let mut control = swarm.behaviour().streams.new_control();
    let incoming_tasks = control
        .accept(libp2p::StreamProtocol::new(spare_core::wire::TASK_PROTOCOL))
        .map_err(|e| NetError::Config(e.to_string()))?;

    let mut listeners = Vec::with_capacity(config.listen.len());
    for addr in &config.listen {
        let id = swarm
            .listen_on(addr.clone())
            .map_err(|e| NetError::Listen {
                addr: addr.clone(),
                reason: describe(&e),
            })?;
        listeners.push(id);
    }
    let topic = libp2p::gossipsub::IdentTopic::new(spare_core::wire::OFFER_TOPIC);
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&topic)
        .map_err(|e| NetError::Config(e.to_string()))?;

    let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
    let (event_tx, event_rx) = mpsc::channel(EVENT_QUEUE);
    let shared = Arc::new(Shared {
        peers: RwLock::default(),
        listen_addrs: RwLock::default(),
        connections: RwLock::default(),
        tasks: tasks::TaskStreams::new(control),
        dial_scope: scope,
    });
    let local_peer_id = *swarm.local_peer_id();
    // Boxed: it holds the swarm, which is large, across the awaits below.
    let mut event_loop = Box::new(event_loop::EventLoop::new(
        swarm,
        topic,
        config.bootstrap.clone(),
        cmd_rx,
        cmd_tx.clone(),
        event_tx.clone(),
        Arc::clone(&shared),
    ));
    event_loop.wait_for_listeners(&listeners).await?;
    event_loop.dial_bootstrap();
    let answers = answers::AnswerBudget::new(config.answer_budget);
    let serve_tasks = tasks::serve(incoming_tasks, event_tx, budget, answers);
    let stop_serving = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = serve_tasks => {}
            () = stop_serving.cancelled() => {}
        }
    });
    tokio::spawn(event_loop.run(shutdown));
    Ok((
        NetHandle {
            local_peer_id,
            commands: cmd_tx,
            shared,
        },
        event_rx,
    ))
}

/// libp2p's TCP listeners set `SO_REUSEPORT`, so a second node on a taken
/// port would silently share it. A plain bind first turns that into an error.
fn probe_tcp_port(addr: &Multiaddr) -> Result<(), NetError> {
    use libp2p::multiaddr::Protocol;
    let mut parts = addr.iter();
    let ip: std::net::IpAddr = match parts.next() {
        Some(Protocol::Ip4(ip)) => ip.into(),
        Some(Protocol::Ip6(ip)) => ip.into(),
        _ => return Ok(()),
    };
    let port = match parts.next() {
        Some(Protocol::Tcp(port)) if port != 0 => port,
        _ => return Ok(()),
    };
    match std::net::TcpListener::bind((ip, port)) {
        Ok(_) => Ok(()),
        Err(e) => Err(NetError::Listen {
            addr: addr.clone(),
            reason: if e.kind() == std::io::ErrorKind::AddrInUse {
                "the port is in use (by another spare node?); choose another with --listen, or port 0 for any free one".into()
            } else {
                e.to_string()
            },
        }),
    }
}

/// An error and its sources on one line.
pub(crate) fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !line.is_empty() && !text.contains(&line) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&line);
        }
        source = cause.source();
    }
    if text.is_empty() {
        format!("{err:?}")
    } else {
        text
    }
}

impl NetHandle {
    pub fn local_peer_id(&self) -> PeerId {
        self.local_peer_id
    }

    /// The addresses we listen on, each ending in `/p2p/<our peer id>` so it
    /// can be given to another node's `--bootstrap` as is.
    pub fn listen_addrs(&self) -> Vec<Multiaddr> {
        let addrs = self
            .shared
            .listen_addrs
            .read()
            .unwrap_or_else(|p| p.into_inner());
        addrs
            .iter()
            .map(|a| a.clone().with_p2p(self.local_peer_id).unwrap_or_else(|a| a))
            .collect()
    }

    /// A snapshot of the connected peers.
    pub fn peers(&self) -> Vec<PeerInfo> {
        self.shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .snapshot()
    }

    /// A token cancelled when `peer` disconnects, or `None` if it is not
    /// connected now. Work done for a peer hangs off it.
    pub fn connection_token(&self, peer: &PeerId) -> Option<CancellationToken> {
        self.shared
            .connections
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .map(CancellationToken::child_token)
    }

    pub fn is_connected(&self, peer: &PeerId) -> bool {
        self.peer(peer).is_some()
    }

    /// What is known of one connected `peer`, without copying the table.
    pub fn peer(&self, peer: &PeerId) -> Option<PeerInfo> {
        self.shared
            .peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(peer)
            .cloned()
    }

    /// Sends a task request and waits for the answer. Cancel-safe: dropping
    /// the future abandons the answer (the request itself stays on the wire).
    pub async fn send_task(
        &self,
        peer: PeerId,
        request: TaskRequest,
    ) -> Result<TaskResponse, RequestError> {
        if self.commands.is_closed() {
            return Err(RequestError::Shutdown);
        }
        self.shared
            .tasks
            .request(peer, &request, || self.connection_token(&peer))
            .await
    }

    /// Asks `peer` for a chunk of a blob.
    pub async fn fetch_blob(
        &self,
        peer: PeerId,
        request: BlobRequest,
    ) -> Result<BlobResponse, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.command(event_loop::Command::FetchBlob {
            peer,
            request,
            reply: tx,
        })
        .await?;
        rx.await.map_err(|_| RequestError::Shutdown)?
    }

    /// Publishes our offer to the swarm (and re-publishes it to peers that
    /// join later).
    pub async fn publish_offer(&self, offer: Offer) {
        let _ = self.command(event_loop::Command::PublishOffer(offer)).await;
    }

    async fn command(&self, command: event_loop::Command) -> Result<(), RequestError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| RequestError::Shutdown)
    }
}

//! A hostile peer for tests: a libp2p swarm on the memory transport that
//! claims to be a spare node and speaks the task protocol in raw frames,
//! so it can do what no honest requester does (send garbage, leave answers
//! unread). Shared by the net crate's tests and the node's in-process ones
//! (`#[path]`).

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::transport::{MemoryTransport, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, SwarmBuilder, identify, noise, yamux};
use spare_core::wire::{self, Message, TASK_PROTOCOL, TaskResponse};

#[derive(NetworkBehaviour)]
struct Rogue {
    identify: identify::Behaviour,
    streams: libp2p_stream::Behaviour,
}

/// A rogue connected to the node at `addr`, which must be `node`: a way
/// to open task streams to it. The swarm runs in a task of its own.
pub(crate) async fn connect(addr: Multiaddr, node: PeerId) -> libp2p_stream::Control {
    let mut swarm = memory_swarm(Keypair::generate_ed25519(), |key| Rogue {
        identify: claims_to_be_spare(key),
        streams: libp2p_stream::Behaviour::new(),
    });
    let control = swarm.behaviour().streams.new_control();
    swarm.dial(addr).unwrap();
    loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
            assert_eq!(peer_id, node);
            break;
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    control
}

/// A swarm with `key` on the memory transport with `behaviour`.
pub(crate) fn memory_swarm<B: NetworkBehaviour>(
    key: Keypair,
    behaviour: impl FnOnce(&Keypair) -> B,
) -> libp2p::Swarm<B> {
    SwarmBuilder::with_existing_identity(key)
        .with_tokio()
        .with_other_transport(|key| {
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(
                MemoryTransport::default()
                    .upgrade(Version::V1)
                    .authenticate(noise::Config::new(key)?)
                    .multiplex(yamux::Config::default()),
            )
        })
        .unwrap()
        .with_behaviour(|key| behaviour(key))
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Identify as a spare node says it: such a peer is not turned away.
pub(crate) fn claims_to_be_spare(key: &Keypair) -> identify::Behaviour {
    identify::Behaviour::new(identify::Config::new(
        "/spare/id/1.0.0".into(),
        key.public(),
    ))
}

/// A task stream to `node`, accepted: the node has written its first byte.
pub(crate) async fn task_stream(control: &mut libp2p_stream::Control, node: PeerId) -> Stream {
    let mut stream = control
        .open_stream(node, StreamProtocol::new(TASK_PROTOCOL))
        .await
        .unwrap();
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first, [0x01]);
    stream
}

/// A frame: the length as a big-endian `u32`, then the bytes.
pub(crate) fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// Writes `bytes` on `stream`.
pub(crate) async fn send(stream: &mut Stream, bytes: &[u8]) -> Result<(), String> {
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())
}

/// Reads one answer frame, or says why there is none.
pub(crate) async fn answer(stream: &mut Stream) -> Result<TaskResponse, String> {
    let mut header = [0u8; 4];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| e.to_string())?;
    let len = u32::from_be_bytes(header) as usize;
    assert!(len <= TaskResponse::MAX_BYTES, "an answer of {len} bytes");
    let mut body = vec![0u8; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| e.to_string())?;
    Ok(wire::decode::<TaskResponse>(&body).expect("the node answers with a valid message"))
}

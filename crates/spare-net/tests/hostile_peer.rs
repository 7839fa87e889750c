//! A hostile peer speaking the task protocol with raw bytes: garbage,
//! out-of-bounds values and oversized frames get an error reply or a
//! closed stream, never a panic, and the node keeps serving. And a peer
//! lying about its addresses cannot make the node hand out more of them.

#[path = "support/rogue.rs"]
mod rogue;

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{DialError, NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol, identify, kad};
use rogue::{frame, task_stream};
use spare_core::wire::{self, Message, TaskRequest, TaskResponse};
use spare_core::{Limits, TaskId};
use spare_net::{NetConfig, NetEvent, Transport};
use tokio_util::sync::CancellationToken;

/// Writes `bytes` and reads one answer frame, or says why there is none.
async fn ask(stream: &mut Stream, bytes: &[u8]) -> Result<TaskResponse, String> {
    rogue::send(stream, bytes).await?;
    rogue::answer(stream).await
}

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_and_the_node_keeps_serving() {
    let shutdown = CancellationToken::new();
    let addr = nowhere();
    let (node, mut events) = memory_node(&addr, &shutdown).await;
    // The daemon's part: answer every valid request.
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::TaskRequest { reply, .. } = event {
                reply.send(TaskResponse::Cancelled(false)).await;
            }
        }
    });
    let peer = node.local_peer_id();
    let mut control = rogue::connect(addr, peer).await;
    let mut stream = task_stream(&mut control, peer).await;

    // Garbage gets an error reply naming the problem.
    let reply = ask(&mut stream, &frame(b"\xa1\x63Run\xff garbage"))
        .await
        .unwrap();
    assert!(
        matches!(&reply, TaskResponse::Refused(r) if r.to_string().contains("malformed message")),
        "{reply:?}"
    );

    // A well-formed message with out-of-bounds values is refused by
    // validation, on the same stream: a bad request does not end it.
    let mut spec_bytes = Vec::new();
    let mut spec = spare_core::TaskSpec {
        id: TaskId::random(),
        name: "x".into(),
        module: spare_core::BlobRef::of(b"m"),
        args: vec![],
        env: vec![],
        stdin: spare_core::Stdin::Empty,
        limits: Limits::DEFAULT,
    };
    spec.limits.memory = u64::MAX;
    ciborium::into_writer(&TaskRequest::Run(spec), &mut spec_bytes).unwrap();
    let reply = ask(&mut stream, &frame(&spec_bytes)).await.unwrap();
    assert!(
        matches!(&reply, TaskResponse::Refused(r) if r.to_string().contains("memory limit")),
        "{reply:?}"
    );

    // A frame announcing more than a request may hold is cut off before its
    // body is read: the stream closes, nothing else does.
    let oversized = u32::try_from(TaskRequest::MAX_BYTES + 1).unwrap();
    let mut bytes = oversized.to_be_bytes().to_vec();
    bytes.extend(vec![0u8; 4096]);
    let cut = ask(&mut stream, &bytes).await;
    assert!(cut.is_err(), "an oversized request got an answer: {cut:?}");

    // And a valid request on a new stream still gets its answer, as do
    // several in a row on one stream.
    let mut stream = task_stream(&mut control, peer).await;
    let valid = frame(&wire::encode(&TaskRequest::Cancel(TaskId::random())).unwrap());
    for _ in 0..3 {
        assert_eq!(
            ask(&mut stream, &valid).await.unwrap(),
            TaskResponse::Cancelled(false)
        );
    }
    shutdown.cancel();
}

/// A node on the memory transport listening at `addr`.
async fn memory_node(
    addr: &Multiaddr,
    shutdown: &CancellationToken,
) -> (spare_net::NetHandle, tokio::sync::mpsc::Receiver<NetEvent>) {
    spare_net::start(
        NetConfig {
            keypair: Keypair::generate_ed25519(),
            listen: vec![addr.clone()],
            bootstrap: vec![],
            mdns: false,
            transport: Transport::Memory,
            answer_budget: spare_net::answer_budget(1, 64 << 20),
        },
        shutdown.clone(),
    )
    .await
    .unwrap()
}

/// A memory address nothing listens on (when it is new).
fn nowhere() -> Multiaddr {
    format!("/memory/{}", u64::from(rand::random::<u32>()) + 1)
        .parse()
        .unwrap()
}

/// A peer that claims `claims` as its addresses (its external addresses,
/// which identify sends; it listens on none) while connected to the node.
/// Dropping the handle drops its connection.
async fn claiming(
    key: &Keypair,
    claims: &[Multiaddr],
    node: &spare_net::NetHandle,
    addr: &Multiaddr,
) -> tokio::task::JoinHandle<()> {
    let mut swarm = rogue::memory_swarm(key.clone(), rogue::claims_to_be_spare);
    for claim in claims {
        swarm.add_external_address(claim.clone());
    }
    swarm.dial(addr.clone()).unwrap();
    let task = tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let peer = key.public().to_peer_id();
    wait_until(|| node.is_connected(&peer)).await;
    task
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[derive(NetworkBehaviour)]
struct Asker {
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// The addresses the node's Kademlia gives out for `target`, as a third
/// peer sees them: it asks the node for the peers closest to `target`,
/// then dials `target` at every address the node named, all of which fail
/// (`target` listens nowhere), and the failure lists them.
async fn handed_out(node: PeerId, addr: &Multiaddr, target: PeerId) -> BTreeSet<Multiaddr> {
    let mut swarm = rogue::memory_swarm(Keypair::generate_ed25519(), |key| {
        let peer = key.public().to_peer_id();
        let config = kad::Config::new(StreamProtocol::new("/spare/kad/1.0.0"));
        let mut kad = kad::Behaviour::with_config(peer, kad::store::MemoryStore::new(peer), config);
        kad.set_mode(Some(kad::Mode::Client));
        Asker {
            identify: rogue::claims_to_be_spare(key),
            kad,
        }
    });
    swarm.behaviour_mut().kad.add_address(&node, addr.clone());
    swarm.behaviour_mut().kad.get_closest_peers(target);
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            event = swarm.select_next_some() => {
                if let SwarmEvent::OutgoingConnectionError {
                    peer_id: Some(peer),
                    error: DialError::Transport(tried),
                    ..
                } = event
                    && peer == target
                {
                    return tried
                        .into_iter()
                        .map(|(addr, _)| {
                            addr.into_iter()
                                .filter(|part| !matches!(part, Protocol::P2p(_)))
                                .collect()
                        })
                        .collect();
                }
            }
            () = &mut deadline => return BTreeSet::new(),
        }
    }
}

/// A peer that reconnects claiming other addresses each time is known to
/// the node's Kademlia table (which hands addresses out to every peer
/// that asks) by its latest ones only: it cannot pile up addresses there
/// by reconnecting.
#[tokio::test]
async fn a_peer_that_reconnects_is_handed_out_at_its_latest_addresses_only() {
    let shutdown = CancellationToken::new();
    let addr = nowhere();
    let (node, _events) = memory_node(&addr, &shutdown).await;
    let id = node.local_peer_id();
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();

    let first: BTreeSet<Multiaddr> = (0..3).map(|_| nowhere()).collect();
    let claim = Vec::from_iter(first.iter().cloned());
    let connection = claiming(&key, &claim, &node, &addr).await;
    let mut seen = BTreeSet::new();
    for _ in 0..50 {
        seen = handed_out(id, &addr, peer).await;
        if seen == first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, first, "the node hands out what the peer claimed");

    // It goes, and comes back at once (before the node would dial it
    // again) claiming others.
    connection.abort();
    wait_until(|| !node.is_connected(&peer)).await;
    let second: BTreeSet<Multiaddr> = (0..3).map(|_| nowhere()).collect();
    let claim = Vec::from_iter(second.iter().cloned());
    let _connection = claiming(&key, &claim, &node, &addr).await;
    for _ in 0..50 {
        seen = handed_out(id, &addr, peer).await;
        if seen.is_superset(&second) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, second, "the first addresses were forgotten");
    shutdown.cancel();
}

//! A hostile peer speaking the task protocol with raw bytes: garbage,
//! out-of-bounds values and oversized frames get an error reply or a
//! closed stream, never a panic, and the node keeps serving.

use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt, StreamExt};
use libp2p::core::transport::{MemoryTransport, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, Stream, StreamProtocol, Swarm, SwarmBuilder, identify, noise, yamux};
use spare_core::wire::{self, Message, TASK_PROTOCOL, TaskRequest, TaskResponse};
use spare_core::{Limits, TaskId};
use spare_net::{NetConfig, NetEvent, Transport};
use tokio_util::sync::CancellationToken;

#[derive(NetworkBehaviour)]
struct Rogue {
    identify: identify::Behaviour,
    streams: libp2p_stream::Behaviour,
}

fn rogue() -> Swarm<Rogue> {
    SwarmBuilder::with_new_identity()
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
        .with_behaviour(|key| Rogue {
            // It claims to be a spare node, so it is not turned away.
            identify: identify::Behaviour::new(identify::Config::new(
                "/spare/id/1.0.0".into(),
                key.public(),
            )),
            streams: libp2p_stream::Behaviour::new(),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// A frame: the length as a big-endian `u32`, then the bytes.
fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

/// Reads the byte with which the node accepts a task stream.
async fn accepted(mut stream: Stream) -> Stream {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).await.unwrap();
    assert_eq!(first, [0x01]);
    stream
}

/// Writes `bytes` and reads one answer frame, or says why there is none.
async fn ask(stream: &mut Stream, bytes: &[u8]) -> Result<TaskResponse, String> {
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    stream.flush().await.map_err(|e| e.to_string())?;
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

#[tokio::test]
async fn malformed_and_oversized_requests_are_refused_and_the_node_keeps_serving() {
    let shutdown = CancellationToken::new();
    let addr: Multiaddr = format!("/memory/{}", rand::random::<u32>() as u64 + 1)
        .parse()
        .unwrap();
    let (node, mut events) = spare_net::start(
        NetConfig {
            keypair: Keypair::generate_ed25519(),
            listen: vec![addr.clone()],
            bootstrap: vec![],
            mdns: false,
            transport: Transport::Memory,
        },
        shutdown.clone(),
    )
    .await
    .unwrap();
    // The daemon's part: answer every valid request.
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::TaskRequest { reply, .. } = event {
                reply.send(TaskResponse::Cancelled(false)).await;
            }
        }
    });
    let mut swarm = rogue();
    let mut control = swarm.behaviour().streams.new_control();
    swarm.dial(addr).unwrap();
    let peer = node.local_peer_id();
    loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
            assert_eq!(peer_id, peer);
            break;
        }
    }
    tokio::spawn(async move {
        loop {
            swarm.select_next_some().await;
        }
    });
    let protocol = StreamProtocol::new(TASK_PROTOCOL);
    let mut stream = accepted(control.open_stream(peer, protocol.clone()).await.unwrap()).await;

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
    let mut stream = accepted(control.open_stream(peer, protocol).await.unwrap()).await;
    let valid = frame(&wire::encode(&TaskRequest::Cancel(TaskId::random())).unwrap());
    for _ in 0..3 {
        assert_eq!(
            ask(&mut stream, &valid).await.unwrap(),
            TaskResponse::Cancelled(false)
        );
    }
    shutdown.cancel();
}

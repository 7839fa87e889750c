//! A hostile peer speaking the task protocol with raw bytes: garbage,
//! out-of-bounds values and oversized messages get an error reply or a
//! closed stream, never a panic, and the node keeps serving.

use std::io;
use std::time::Duration;

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, StreamExt};
use libp2p::core::transport::{MemoryTransport, Transport as _};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, StreamProtocol, Swarm, SwarmBuilder, identify, noise, yamux};
use spare_core::wire::{self, Message, TASK_PROTOCOL, TaskRequest, TaskResponse};
use spare_core::{Limits, TaskId};
use spare_net::{NetConfig, NetEvent, Transport};
use tokio_util::sync::CancellationToken;

/// Sends whatever bytes it is given.
#[derive(Clone, Default)]
struct RawCodec;

impl request_response::Codec for RawCodec {
    type Protocol = StreamProtocol;
    type Request = Vec<u8>;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        let mut buf = Vec::new();
        io.take(64 << 20).read_to_end(&mut buf).await?;
        Ok(buf)
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&req).await?;
        io.close().await
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        io.write_all(&res).await?;
        io.close().await
    }
}

#[derive(NetworkBehaviour)]
struct Rogue {
    identify: identify::Behaviour,
    task: request_response::Behaviour<RawCodec>,
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
            task: request_response::Behaviour::new(
                [(
                    StreamProtocol::new(TASK_PROTOCOL),
                    ProtocolSupport::Outbound,
                )],
                request_response::Config::default().with_request_timeout(Duration::from_secs(10)),
            ),
        })
        .unwrap()
        .with_swarm_config(|c| c.with_idle_connection_timeout(Duration::from_secs(60)))
        .build()
}

/// Sends `bytes` and waits for the answer, or the failure.
async fn ask(
    swarm: &mut Swarm<Rogue>,
    peer: libp2p::PeerId,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let id = swarm.behaviour_mut().task.send_request(&peer, bytes);
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(RogueEvent::Task(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            })) if request_id == id => return Ok(response),
            SwarmEvent::Behaviour(RogueEvent::Task(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            })) if request_id == id => return Err(error.to_string()),
            _ => {}
        }
    }
}

fn answer(bytes: &[u8]) -> TaskResponse {
    wire::decode::<TaskResponse>(bytes).expect("the node answers with a valid message")
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
    swarm.dial(addr).unwrap();
    let peer = node.local_peer_id();
    loop {
        if let SwarmEvent::ConnectionEstablished { peer_id, .. } = swarm.select_next_some().await {
            assert_eq!(peer_id, peer);
            break;
        }
    }

    // Garbage gets an error reply naming the problem.
    let reply = answer(
        &ask(&mut swarm, peer, b"\xa1\x63Run\xff garbage".to_vec())
            .await
            .unwrap(),
    );
    assert!(
        matches!(&reply, TaskResponse::Refused(r) if r.to_string().contains("malformed message")),
        "{reply:?}"
    );

    // A well-formed message with out-of-bounds values is refused by validation.
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
    let reply = answer(&ask(&mut swarm, peer, spec_bytes).await.unwrap());
    assert!(
        matches!(&reply, TaskResponse::Refused(r) if r.to_string().contains("memory limit")),
        "{reply:?}"
    );

    // An oversized message is cut off: the stream fails, nothing else does.
    let oversized = vec![0u8; TaskRequest::MAX_BYTES + 4096];
    match ask(&mut swarm, peer, oversized).await {
        Err(_) => {}
        Ok(bytes) => assert!(
            bytes.is_empty(),
            "an oversized request got {} bytes of answer",
            bytes.len()
        ),
    }

    // And a valid request still gets its answer.
    let valid = wire::encode(&TaskRequest::Cancel(TaskId::random())).unwrap();
    assert_eq!(
        answer(&ask(&mut swarm, peer, valid).await.unwrap()),
        TaskResponse::Cancelled(false)
    );
    shutdown.cancel();
}

//! A hostile peer speaking the task protocol with raw bytes: garbage,
//! out-of-bounds values and oversized frames get an error reply or a
//! closed stream, never a panic, and the node keeps serving.

#[path = "support/rogue.rs"]
mod rogue;

use libp2p::Multiaddr;
use libp2p::Stream;
use libp2p::identity::Keypair;
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
            answer_budget: spare_net::answer_budget(1, 64 << 20),
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

//! In-process swarms on libp2p's memory transport (and one on real QUIC):
//! discovery, offers, the task protocol and blob transfer, end to end
//! between real `spare-net` event loops.

use std::time::Duration;

use libp2p::identity::Keypair;
use spare_core::wire::{
    BlobRequest, BlobResponse, Offer, Refusal, Runtime, TaskRequest, TaskResponse,
};
use spare_core::{BlobId, BlobRef, Limits, Stdin, TaskId, TaskSpec};
use spare_net::{Multiaddr, NetConfig, NetEvent, NetHandle, RequestError, Transport};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

struct Peer {
    handle: NetHandle,
    events: mpsc::Receiver<NetEvent>,
}

async fn start(
    transport: Transport,
    listen: &str,
    bootstrap: Vec<Multiaddr>,
    shutdown: &CancellationToken,
) -> Peer {
    try_start(
        Keypair::generate_ed25519(),
        transport,
        listen,
        bootstrap,
        shutdown,
    )
    .await
    .unwrap()
}

async fn try_start(
    keypair: Keypair,
    transport: Transport,
    listen: &str,
    bootstrap: Vec<Multiaddr>,
    shutdown: &CancellationToken,
) -> Result<Peer, spare_net::NetError> {
    let (handle, events) = spare_net::start(
        NetConfig {
            keypair,
            listen: vec![listen.parse().unwrap()],
            bootstrap,
            mdns: false,
            transport,
            answer_budget: spare_net::answer_budget(1, 64 << 20),
        },
        shutdown.child_token(),
    )
    .await?;
    Ok(Peer { handle, events })
}

/// Peer `a`, and `b` bootstrapped from it, on the memory transport; and
/// `a`'s addresses for more peers to bootstrap from.
async fn two_peers(shutdown: &CancellationToken) -> (Peer, Peer, Vec<Multiaddr>) {
    let a = start(Transport::Memory, &memory_addr(), vec![], shutdown).await;
    let bootstrap = a.handle.listen_addrs();
    let b = start(
        Transport::Memory,
        &memory_addr(),
        bootstrap.clone(),
        shutdown,
    )
    .await;
    (a, b, bootstrap)
}

fn memory_addr() -> String {
    format!("/memory/{}", rand::random::<u32>() as u64 + 1)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..200 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn offer(seq: u64) -> Offer {
    Offer {
        cores: 4,
        idle: 3,
        queued: 0,
        memory: 1 << 30,
        runtimes: vec![Runtime::Wasm],
        max_limits: Limits::MAX,
        seq,
        paused: None,
    }
}

fn spec() -> TaskSpec {
    TaskSpec {
        id: TaskId::random(),
        name: "t.wasm".into(),
        module: BlobRef::of(b"module"),
        args: vec![],
        env: vec![],
        stdin: Stdin::Empty,
        limits: Limits::DEFAULT,
    }
}

#[tokio::test]
async fn three_peers_find_each_other_through_one_and_hear_offers() {
    let shutdown = CancellationToken::new();
    let (a, b, bootstrap) = two_peers(&shutdown).await;
    let c = start(Transport::Memory, &memory_addr(), bootstrap, &shutdown).await;
    // c knows only a; Kademlia and identify introduce it to b.
    eventually("a full mesh", || {
        [&a, &b, &c].iter().all(|p| p.handle.peers().len() == 2)
    })
    .await;
    b.handle.publish_offer(offer(1)).await;
    let b_id = b.handle.local_peer_id();
    eventually("b's offer at a and c", || {
        [&a, &c].iter().all(|p| {
            p.handle
                .peers()
                .iter()
                .any(|i| i.peer == b_id && i.offer.as_ref().is_some_and(|(o, _)| o.seq == 1))
        })
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn a_peer_that_comes_back_is_dialled_again_by_those_that_lost_it() {
    let shutdown = CancellationToken::new();
    let (a, b, bootstrap) = two_peers(&shutdown).await;
    let (c_key, c_addr) = (Keypair::generate_ed25519(), memory_addr());
    let c_id = c_key.public().to_peer_id();
    let c_shutdown = CancellationToken::new();
    let c = try_start(
        c_key.clone(),
        Transport::Memory,
        &c_addr,
        bootstrap,
        &c_shutdown,
    )
    .await
    .unwrap();
    eventually("a full mesh", || {
        [&a, &b, &c].iter().all(|p| p.handle.peers().len() == 2)
    })
    .await;
    // c goes away: a and b lose it.
    c_shutdown.cancel();
    drop(c);
    eventually("a and b to lose c", || {
        [&a, &b].iter().all(|p| !p.handle.is_connected(&c_id))
    })
    .await;
    // c stays away long enough for dials to it to fail (as a stalled
    // laptop's would), then comes back at the same address knowing no one:
    // only a and b dialling it again can reconnect them.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut back = None;
    for _ in 0..100 {
        match try_start(c_key.clone(), Transport::Memory, &c_addr, vec![], &shutdown).await {
            Ok(peer) => {
                back = Some(peer);
                break;
            }
            // The old listener may not have closed yet.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let _c = back.expect("c restarts at its address");
    eventually("a and b to dial c again", || {
        [&a, &b].iter().all(|p| p.handle.is_connected(&c_id))
    })
    .await;
    shutdown.cancel();
}

#[tokio::test]
async fn task_requests_and_responses_travel_both_ways() {
    let shutdown = CancellationToken::new();
    let host = start(Transport::Memory, &memory_addr(), vec![], &shutdown).await;
    let requester = start(
        Transport::Memory,
        &memory_addr(),
        host.handle.listen_addrs(),
        &shutdown,
    )
    .await;
    let host_id = host.handle.local_peer_id();
    eventually("connection", || requester.handle.is_connected(&host_id)).await;

    let mut events = host.events;
    // What the blob answer holds (a serving budget, in the daemon) is let
    // go once the answer has been taken.
    let held = std::sync::Arc::new(());
    let hold = std::sync::Arc::clone(&held);
    let server = tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                NetEvent::TaskRequest {
                    request: TaskRequest::Run(spec),
                    reply,
                    ..
                } => {
                    reply
                        .send(TaskResponse::Refused(Refusal::Invalid(format!(
                            "no thanks: {}",
                            spec.name
                        ))))
                        .await;
                }
                NetEvent::BlobRequest { request, reply, .. } => {
                    let data = b"0123456789".to_vec();
                    let start = request.offset as usize;
                    let end = (start + request.len as usize).min(data.len());
                    let chunk = BlobResponse::Chunk {
                        total: 10,
                        data: data[start.min(end)..end].to_vec(),
                    };
                    let held: spare_net::Held = Box::new(std::sync::Arc::clone(&hold));
                    reply.send_holding(chunk, Some(held)).await;
                }
                _ => {}
            }
        }
    });
    let answer = requester
        .handle
        .send_task(host_id, TaskRequest::Run(spec()))
        .await;
    assert_eq!(
        answer,
        Ok(TaskResponse::Refused(Refusal::Invalid(
            "no thanks: t.wasm".into()
        )))
    );
    let chunk = requester
        .handle
        .fetch_blob(
            host_id,
            BlobRequest {
                id: BlobId::of(b"0123456789"),
                offset: 4,
                len: 3,
            },
        )
        .await;
    assert_eq!(
        chunk,
        Ok(BlobResponse::Chunk {
            total: 10,
            data: b"456".to_vec()
        })
    );
    eventually("the sent answer to let go of what it held", || {
        std::sync::Arc::strong_count(&held) == 2
    })
    .await;
    server.abort();
    shutdown.cancel();
}

#[tokio::test]
async fn a_request_whose_host_vanishes_fails_instead_of_hanging() {
    let host_shutdown = CancellationToken::new();
    let shutdown = CancellationToken::new();
    let host = start(Transport::Memory, &memory_addr(), vec![], &host_shutdown).await;
    let requester = start(
        Transport::Memory,
        &memory_addr(),
        host.handle.listen_addrs(),
        &shutdown,
    )
    .await;
    let host_id = host.handle.local_peer_id();
    eventually("connection", || requester.handle.is_connected(&host_id)).await;
    // The host accepts the request, then dies before answering.
    let mut events = host.events;
    let pending = tokio::spawn({
        let handle = requester.handle.clone();
        async move { handle.send_task(host_id, TaskRequest::Run(spec())).await }
    });
    let request = loop {
        match events.recv().await {
            Some(event @ NetEvent::TaskRequest { .. }) => break event,
            Some(_) => continue,
            None => panic!("no task request arrived"),
        }
    };
    host_shutdown.cancel();
    drop(request);
    let result = tokio::time::timeout(Duration::from_secs(20), pending)
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(
            result,
            Err(RequestError::ConnectionClosed | RequestError::Io(_))
        ),
        "{result:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn quic_on_loopback_carries_the_task_protocol() {
    let shutdown = CancellationToken::new();
    let host = start(
        Transport::TcpQuic,
        "/ip4/127.0.0.1/udp/0/quic-v1",
        vec![],
        &shutdown,
    )
    .await;
    let addr = host.handle.listen_addrs();
    assert!(addr[0].to_string().contains("/quic-v1/p2p/"), "{addr:?}");
    let requester = start(
        Transport::TcpQuic,
        "/ip4/127.0.0.1/udp/0/quic-v1",
        addr,
        &shutdown,
    )
    .await;
    let host_id = host.handle.local_peer_id();
    eventually("connection over QUIC", || {
        requester.handle.is_connected(&host_id)
    })
    .await;
    let mut events = host.events;
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            if let NetEvent::TaskRequest { reply, .. } = event {
                reply.send(TaskResponse::Cancelled(true)).await;
            }
        }
    });
    let answer = requester
        .handle
        .send_task(host_id, TaskRequest::Cancel(TaskId::random()))
        .await;
    assert_eq!(answer, Ok(TaskResponse::Cancelled(true)));
    shutdown.cancel();
}

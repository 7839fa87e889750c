//! In-process nodes: real `spare_node::Node`s on libp2p's memory transport
//! with real worker processes, driven through the API router in-process
//! (`oneshot`, no socket) and through the requester directly.

#[path = "../../spare-net/tests/support/rogue.rs"]
mod rogue;

use std::path::PathBuf;
use std::time::Duration;

use http_body_util::BodyExt;
use spare_core::outcome::Failure;
use spare_core::{BlobId, BlobRef, LimitRequest, Limits, TaskId};
use spare_net::Transport;
use spare_node::api::router;
use spare_node::api::types::{Placement, Submission, SubmitStdin, TaskEvent};
use spare_node::{Config, Node, NodeOptions, Paths};
use spare_runtime::{Job, JobStdin, PoolConfig, WorkerCommand, WorkerPool};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

fn example(name: &str) -> Vec<u8> {
    std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name),
    )
    .unwrap()
}

async fn node(
    dir: &std::path::Path,
    bootstrap: Vec<spare_net::Multiaddr>,
    shutdown: &CancellationToken,
) -> Node {
    node_with(dir, bootstrap, shutdown, |_| {}).await
}

/// A node whose config `tweak` changes first.
async fn node_with(
    dir: &std::path::Path,
    bootstrap: Vec<spare_net::Multiaddr>,
    shutdown: &CancellationToken,
    tweak: impl FnOnce(&mut Config),
) -> Node {
    start_node(dir, bootstrap, shutdown, tweak).await.unwrap()
}

/// Starts a node in `dir`, or says why it could not.
async fn start_node(
    dir: &std::path::Path,
    bootstrap: Vec<spare_net::Multiaddr>,
    shutdown: &CancellationToken,
    tweak: impl FnOnce(&mut Config),
) -> Result<Node, spare_node::NodeError> {
    let paths = Paths::in_dir(dir);
    paths.create_dirs().unwrap();
    let mut config = Config {
        listen: vec![format!("/memory/{}", rand_port()).parse().unwrap()],
        bootstrap,
        mdns: false,
        ..Config::default()
    };
    config.policy.cores = 1;
    // Several nodes share this machine: each would see the others' guests
    // as its owner's load.
    config.policy.when.idle_only = false;
    tweak(&mut config);
    Node::start(
        NodeOptions {
            paths,
            config,
            key: spare_net::identity::Keypair::generate_ed25519(),
            worker: WorkerCommand {
                program: env!("CARGO_BIN_EXE_spare").into(),
                args: vec!["worker".into()],
            },
            transport: Transport::Memory,
        },
        shutdown.child_token(),
    )
    .await
}

fn rand_port() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) * 1000 + NEXT.fetch_add(1, Ordering::Relaxed) + 1
}

async fn call(node: &Node, method: &str, uri: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    let request = axum::http::Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body))
        .unwrap();
    let response = router(node.clone()).oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
}

fn error_of(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body).unwrap()["error"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The owner's blob that `spare run` asks about before each run (and so
/// does not upload again) is the store's most recently used: room for a
/// newer blob is made from one not asked about since.
#[tokio::test]
async fn a_blob_the_owner_asks_about_is_kept_over_older_ones() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // Blobs get three quarters: room for two of these and the database.
    let node = node_with(dir.path(), vec![], &shutdown, |config| {
        config.policy.disk = 4 << 20;
    })
    .await;
    let blobs: Vec<Vec<u8>> = (0..3u8).map(|n| vec![n; MIB]).collect();
    let path = |blob: &[u8]| format!("/v1/blobs/{}", BlobRef::of(blob).id);
    for blob in &blobs[..2] {
        assert_eq!(call(&node, "PUT", &path(blob), blob.clone()).await.0, 201);
    }
    assert_eq!(call(&node, "HEAD", &path(&blobs[0]), vec![]).await.0, 200);
    assert_eq!(
        call(&node, "PUT", &path(&blobs[2]), blobs[2].clone())
            .await
            .0,
        201
    );
    let kept = [
        call(&node, "HEAD", &path(&blobs[0]), vec![]).await.0,
        call(&node, "HEAD", &path(&blobs[1]), vec![]).await.0,
    ];
    assert_eq!(
        kept,
        [200, 404],
        "the blob asked about stays, the other goes"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn the_api_refuses_bad_input_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let node = node(dir.path(), vec![], &shutdown).await;

    let (status, body) = call(&node, "GET", "/v1/node", vec![]).await;
    assert_eq!(status, 200);
    let info: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(info["peer_id"], node.peer_id().to_string());

    let hello = example("hello.wasm");
    let id = BlobRef::of(&hello).id;
    assert_eq!(
        call(&node, "HEAD", &format!("/v1/blobs/{id}"), vec![])
            .await
            .0,
        404
    );
    let (status, body) = call(
        &node,
        "PUT",
        &format!("/v1/blobs/{id}"),
        b"not the module".to_vec(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("does not match its hash"));
    let (status, body) = call(&node, "PUT", "/v1/blobs/xyz", hello.clone()).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("is not a blob hash"));
    assert_eq!(
        call(&node, "PUT", &format!("/v1/blobs/{id}"), hello.clone())
            .await
            .0,
        201
    );
    assert_eq!(
        call(&node, "HEAD", &format!("/v1/blobs/{id}"), vec![])
            .await
            .0,
        200
    );

    let (status, body) = call(&node, "POST", "/v1/tasks", b"{\"name\": 3}".to_vec()).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).starts_with("invalid task submission"));

    let missing = Submission {
        name: "x.wasm".into(),
        module: BlobRef::of(b"never uploaded"),
        args: vec![],
        env: vec![],
        stdin: SubmitStdin::None,
        limits: LimitRequest::default(),
        placement: Placement::Auto,
    };
    let (status, body) = call(
        &node,
        "POST",
        "/v1/tasks",
        serde_json::to_vec(&missing).unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("has not been uploaded"));

    let mut too_big = missing.clone();
    too_big.module = BlobRef::of(&hello);
    too_big.limits.memory = Some(u64::MAX);
    let (status, body) = call(
        &node,
        "POST",
        "/v1/tasks",
        serde_json::to_vec(&too_big).unwrap(),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        error_of(&body).contains("memory limit"),
        "{}",
        error_of(&body)
    );

    let (status, body) = call(&node, "POST", "/v1/tasks/nope/cancel", vec![]).await;
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("not a task id"));
    shutdown.cancel();
}

#[tokio::test]
async fn a_task_crosses_a_memory_swarm_with_its_receipt() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (host, requester) = host_and_requester(dir.path(), &shutdown).await;

    let echo = example("echo.wasm");
    let module = BlobRef::of(&echo);
    requester.blobs().put(&echo).unwrap();
    // Large stdin travels as a blob the host fetches in chunks.
    let stdin: Vec<u8> = (0..3_000_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let submission = Submission {
        name: "echo.wasm".into(),
        module,
        args: vec!["arg".into()],
        env: vec![],
        stdin: SubmitStdin::Inline(spare_node::api::types::encode_b64(&stdin)),
        limits: LimitRequest::default(),
        placement: Placement::Auto,
    };
    let task = spare_node::requester::prepare(&requester, &submission)
        .await
        .unwrap();
    let mut rx = spare_node::requester::start(&requester, task);
    let result = ending(&mut rx)
        .await
        .unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(result.host, host.peer_id().to_string());
    assert_eq!(result.exit_code, Some(0));
    let stdout = result.stdout_bytes();
    assert!(stdout.starts_with(b"arg[1]=arg\nstdin:\n"));
    assert!(stdout.ends_with(&stdin[stdin.len() - 100..]));
    assert!(result.receipt, "the host's receipt verified");
    let issued = host
        .ledger()
        .receipt_totals(spare_ledger::ReceiptRole::Issued)
        .unwrap();
    let received = requester
        .ledger()
        .receipt_totals(spare_ledger::ReceiptRole::Received)
        .unwrap();
    assert_eq!(issued.count, 1);
    assert_eq!(issued, received);
    assert_eq!(received.fuel, result.fuel);
    shutdown.cancel();
}

/// A host that stops while it runs a task tells its requester so, instead
/// of leaving it a broken connection.
#[tokio::test]
async fn a_stopping_host_tells_its_requesters() {
    let dir = tempfile::tempdir().unwrap();
    let (host_stop, stop) = (CancellationToken::new(), CancellationToken::new());
    let host = node(&dir.path().join("host"), vec![], &host_stop).await;
    let requester = node(&dir.path().join("req"), host.net().listen_addrs(), &stop).await;
    let on_host = Placement::On(host.peer_id().to_string());
    let mut rx = start_example(
        &requester,
        "hostile/loop.wasm",
        LimitRequest::default(),
        on_host,
    )
    .await;
    tokio::time::timeout(Duration::from_secs(30), async {
        while host.running_hosted().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the task starts on the host");
    host.shutdown().await;
    let error = ending(&mut rx)
        .await
        .expect_err("the task fails with the host");
    assert!(error.contains("the host is shutting down"), "{error}");
    host.release();
    stop.cancel();
}

/// A user who sets no limit gets a task that runs on a host granting less
/// than the defaults, under what that host grants, and is told; a limit
/// the user set is never lowered.
#[tokio::test]
async fn unset_limits_fit_a_host_that_grants_less() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let small = 32 << 20;
    let host = node_with(&dir.path().join("host"), vec![], &shutdown, |config| {
        config.max_limits.memory = small;
    })
    .await;
    let requester = node(
        &dir.path().join("req"),
        host.net().listen_addrs(),
        &shutdown,
    )
    .await;
    wait_for_offers(&requester, 1).await;
    // What was lowered on the (last) host the task was placed on.
    let submit = |name: &'static str, limits: LimitRequest| {
        let requester = requester.clone();
        async move {
            let mut events = start_example(&requester, name, limits, Placement::Auto).await;
            let (seen, ended) = events_to_the_end(&mut events).await;
            let lowered = seen.into_iter().rev().find_map(|event| match event {
                TaskEvent::Placed { lowered, .. } => Some(lowered),
                _ => None,
            });
            (lowered.flatten(), ended)
        }
    };

    let (lowered, ended) = submit("hello.wasm", LimitRequest::default()).await;
    let result = ended.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(result.exit_code, Some(0));
    assert_eq!(lowered.as_deref(), Some("memory 32 MiB"));

    // The host holds the guest to what it grants.
    let (_, ended) = submit("hostile/alloc.wasm", LimitRequest::default()).await;
    let result = ended.unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(
        result.failure.as_deref(),
        Some("exceeded its memory limit of 32 MiB")
    );

    // A limit the user set is theirs: no host here grants it.
    let insisted = LimitRequest {
        memory: Some(Limits::DEFAULT.memory),
        ..LimitRequest::default()
    };
    let (_, ended) = submit("hello.wasm", insisted).await;
    let error = ended.expect_err("no host grants 256 MiB");
    assert!(
        error.contains("no connected peer grants these limits")
            && error.contains("memory limit 256 MiB is above the maximum, 32 MiB"),
        "{error}"
    );
    shutdown.cancel();
}

/// A task that hits a limit lowered to fit its host is tried again on a
/// host that grants more of it, even one that must queue it.
#[tokio::test]
async fn a_task_that_hits_a_lowered_limit_tries_a_host_that_grants_more() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let grants = |memory: u64| move |config: &mut Config| config.max_limits.memory = memory;
    let small = node_with(
        &dir.path().join("small"),
        vec![],
        &shutdown,
        grants(16 << 20),
    )
    .await;
    let larger = node_with(
        &dir.path().join("larger"),
        small.net().listen_addrs(),
        &shutdown,
        grants(64 << 20),
    )
    .await;
    let requester = node(
        &dir.path().join("req"),
        small.net().listen_addrs(),
        &shutdown,
    )
    .await;
    wait_for_offers(&requester, 2).await;
    // The larger host's one core is taken: the small one has a free core,
    // and goes first.
    let briefly = LimitRequest {
        wall_ms: Some(3_000),
        ..LimitRequest::default()
    };
    let on_larger = Placement::On(larger.peer_id().to_string());
    let _busy = start_example(&requester, "hostile/loop.wasm", briefly, on_larger).await;
    while larger.running_hosted().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut events = start_example(
        &requester,
        "hostile/alloc.wasm",
        LimitRequest::default(),
        Placement::Auto,
    )
    .await;
    let (seen, ended) = events_to_the_end(&mut events).await;
    let result = ended.unwrap_or_else(|error| panic!("{error}"));
    let retried: Vec<(String, String)> = seen
        .into_iter()
        .filter_map(|event| match event {
            TaskEvent::Retrying { host, reason, .. } => Some((host, reason)),
            _ => None,
        })
        .collect();
    assert_eq!(
        retried,
        [(
            small.peer_id().to_string(),
            "the program exceeded its memory limit of 16 MiB, lowered to what that peer grants"
                .to_owned()
        )]
    );
    assert_eq!(result.attempts, 2);
    assert_eq!(result.host, larger.peer_id().to_string());
    assert_eq!(
        result.failure.as_deref(),
        Some("exceeded its memory limit of 64 MiB"),
        "alloc.wasm takes whatever it is given; no third try, no host grants more"
    );
    shutdown.cancel();
}

/// A host stops a task whose requester closed the task's stream before
/// the answer: nobody waits for it any more.
#[tokio::test]
async fn a_host_cancels_a_task_whose_stream_closes_early() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (host, requester) = host_and_requester(dir.path(), &shutdown).await;
    let spec = already_on(
        &host,
        "hostile/loop.wasm",
        Limits {
            wall_ms: 60_000,
            ..Limits::DEFAULT
        },
    );
    while !requester.net().is_connected(&host.peer_id()) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let request = requester
        .net()
        .send_task(host.peer_id(), spare_core::wire::TaskRequest::Run(spec));
    tokio::select! {
        answer = request => panic!("answered early: {answer:?}"),
        () = async {
            while host.running_hosted().is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        } => {}
    }
    // The request, and with it its stream, is gone; the peer is still
    // connected, so only the stream's end can tell the host.
    assert!(requester.net().is_connected(&host.peer_id()));
    tokio::time::timeout(Duration::from_secs(10), async {
        while !host.running_hosted().is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the host stops the task within seconds, not at its minute's end");
    shutdown.cancel();
}

/// A requester that leaves its answers unread holds up its own next tasks
/// on the host, not other requesters' ones: the host reserves room for a
/// task's largest answer in the requester's share of its answer budget
/// before it runs the task, keeps what the answer takes once the task has
/// ended, and gives that back only once the answer is read.
#[tokio::test]
async fn unread_answers_hold_up_their_requesters_tasks_only() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // One slot: a share of 128 MiB. A task at the largest output limit
    // reserves 64 MiB and its answer, of flood's 32 MiB, keeps 32 MiB.
    let (host, honest) = host_and_requester(dir.path(), &shutdown).await;
    let run = || {
        let limits = Limits {
            output: Limits::MAX.output,
            ..Limits::DEFAULT
        };
        let spec = already_on(&host, "hostile/flood.wasm", limits);
        let request = spare_core::wire::TaskRequest::Run(spec);
        rogue::frame(&spare_core::wire::encode(&request).unwrap())
    };
    let (addr, id) = (host.net().listen_addrs()[0].clone(), host.peer_id());
    let mut rogue = rogue::connect(addr, id).await;

    // Two answers are left unread after their length, which tells the
    // task is done and its answer is being written.
    let mut unread = Vec::new();
    for _ in 0..2 {
        let mut stream = rogue::task_stream(&mut rogue, id).await;
        rogue::send(&mut stream, &run()).await.unwrap();
        let mut header = [0u8; 4];
        let answered = futures::AsyncReadExt::read_exact(&mut stream, &mut header);
        tokio::time::timeout(Duration::from_secs(60), answered)
            .await
            .expect("room for two: an ended task keeps what its answer takes")
            .unwrap();
        let len = u32::from_be_bytes(header) as usize;
        assert!(len > 32 << 20, "a whole output limit of flood: {len} bytes");
        unread.push((stream, len));
    }

    // The third task waits for room...
    let mut next = rogue::task_stream(&mut rogue, id).await;
    rogue::send(&mut next, &run()).await.unwrap();
    // ...while an honest requester's task runs.
    wait_for_offers(&honest, 1).await;
    let mut events = start_example(
        &honest,
        "hello.wasm",
        LimitRequest::default(),
        Placement::On(id.to_string()),
    )
    .await;
    let result = ending(&mut events).await.unwrap();
    assert_eq!(result.exit_code, Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(host.running_hosted().len(), 1, "the third is registered");
    assert_eq!(host.pool().stats().running, 0, "and does not run");

    // Once one answer is read, the third task runs and is answered.
    let (mut stream, len) = unread.remove(0);
    let mut rest = vec![0u8; len];
    futures::AsyncReadExt::read_exact(&mut stream, &mut rest)
        .await
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(60), rogue::answer(&mut next))
        .await
        .expect("the third task is answered once an answer is read")
        .unwrap();
    let spare_core::wire::TaskResponse::Done(report) = answer else {
        panic!("the third task ran: {answer:?}");
    };
    assert_eq!(report.outcome.stdout.len() as u64, Limits::MAX.output);
    shutdown.cancel();
}

/// The specs of the tasks a host has taken (args, env, inline stdin) hold
/// at most `MAX_ADMITTED_BYTES` of its memory, and one requester's at most
/// half: past that, its tasks are refused as busy, though the queue has
/// room for them, and another requester's are still taken.
#[tokio::test]
async fn a_requesters_waiting_tasks_hold_at_most_their_share_of_memory() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (host, honest) = host_and_requester(dir.path(), &shutdown).await;
    let (addr, id) = (host.net().listen_addrs()[0].clone(), host.peer_id());
    let mut rogue = rogue::connect(addr, id).await;
    // Tasks that loop for a minute, each with 1 MiB of arguments: the
    // first takes the host's one slot, the rest wait.
    let big = || {
        let limits = Limits {
            wall_ms: 60_000,
            ..Limits::DEFAULT
        };
        let mut spec = already_on(&host, "hostile/loop.wasm", limits);
        spec.args = vec!["a".repeat((1 << 20) - 64)];
        spec
    };
    let held = big().held_bytes();
    let fits = spare_node::MAX_ADMITTED_BYTES / 2 / held;
    // One at a time, each either taken (registered) or answered.
    let (mut streams, mut busy) = (Vec::new(), 0);
    for sent in 0..fits + 4 {
        let mut stream = rogue::task_stream(&mut rogue, id).await;
        let request = spare_core::wire::TaskRequest::Run(big());
        let frame = rogue::frame(&spare_core::wire::encode(&request).unwrap());
        rogue::send(&mut stream, &frame).await.unwrap();
        let taken = async {
            while host.running_hosted().len() <= sent - busy {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let waited = tokio::time::timeout(Duration::from_secs(30), async {
            tokio::select! {
                () = taken => None,
                answer = rogue::answer(&mut stream) => Some(answer.unwrap()),
            }
        });
        match waited.await.expect("each task is taken or answered") {
            None => streams.push(stream),
            Some(answer) => {
                assert!(
                    matches!(
                        answer,
                        spare_core::wire::TaskResponse::Refused(
                            spare_core::wire::Refusal::Busy { .. }
                        )
                    ),
                    "{answer:?}"
                );
                busy += 1;
            }
        }
    }
    // Those past its share were refused.
    assert_eq!((streams.len(), busy), (fits, 4));

    // Another requester's task is still taken (it waits in the queue).
    wait_for_offers(&honest, 1).await;
    let _events = start_example(
        &honest,
        "hello.wasm",
        LimitRequest::default(),
        Placement::On(id.to_string()),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while host.running_hosted().len() < fits + 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the honest task was not taken"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(streams);
    shutdown.cancel();
}

/// Tasks a host has no room for (its queue of 4 holds 2 of one requester's
/// tasks at most) wait for room and all run: a busy host is asked again
/// later, not ruled out, and the waits use up no attempt. The user hears
/// once that a task waits, not at every ask.
#[tokio::test]
async fn tasks_a_busy_host_refuses_wait_for_room_and_all_run() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (_host, requester) = host_and_requester_with(dir.path(), &shutdown, |config| {
        config.queue = 4;
    })
    .await;
    wait_for_offers(&requester, 1).await;
    // Each runs for 300 ms on the host's one slot.
    let limits = LimitRequest {
        wall_ms: Some(300),
        ..LimitRequest::default()
    };
    let mut started = Vec::new();
    for _ in 0..8 {
        started.push(start_example(&requester, "hostile/loop.wasm", limits, Placement::Auto).await);
    }
    let mut busy = 0;
    for mut events in started {
        let (seen, ended) = events_to_the_end(&mut events).await;
        let result = ended.expect("it ran");
        let failure = result.failure.clone().unwrap_or_default();
        assert!(failure.contains("wall-time limit"), "{result:?}");
        assert_eq!(result.attempts, 1, "{seen:?}");
        let waits = seen
            .iter()
            .filter(|e| matches!(e, TaskEvent::Waiting { reason } if reason.contains("busy")))
            .count();
        assert!(waits <= 1, "{seen:?}");
        assert!(
            !seen.iter().any(|e| matches!(e, TaskEvent::Retrying { .. })),
            "{seen:?}"
        );
        busy += waits;
    }
    assert!(busy > 0, "the host was never busy");
    shutdown.cancel();
}

/// A burst of requests near the largest a spec may be, many more than
/// the host reads from one peer at once, all run at their first attempt:
/// the requester sends no more of them at a time than the host takes, so
/// the host cuts none off.
#[tokio::test]
async fn tasks_a_burst_of_large_requests_all_run_first_time() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (_host, requester) = host_and_requester_with(dir.path(), &shutdown, |config| {
        config.queue = 128;
    })
    .await;
    wait_for_offers(&requester, 1).await;
    // 48 of them: 19 MiB, more than twice what the host reads from one
    // peer at a time (`PEER_READ_BYTES`) and lets wait, and less than it
    // lets one peer's taken tasks hold (`MAX_ADMITTED_BYTES` / 2).
    let arg = "x".repeat(400 << 10);
    // The second burst finds the streams of the first idle, ready for use.
    for _ in 0..2 {
        let mut started = Vec::new();
        for _ in 0..48 {
            let args = vec![arg.clone()];
            let limits = LimitRequest::default();
            let placement = Placement::Auto;
            started
                .push(start_example_with(&requester, "hello.wasm", args, limits, placement).await);
        }
        for mut events in started {
            let (seen, ended) = events_to_the_end(&mut events).await;
            let result = ended.expect("it ran");
            assert_eq!(result.failure, None, "{result:?}");
            let retried: Vec<_> = seen
                .iter()
                .filter(|e| matches!(e, TaskEvent::Retrying { .. }))
                .collect();
            assert!(retried.is_empty(), "{retried:?}");
        }
    }
    shutdown.cancel();
}

/// A host whose database has outgrown its share of the disk budget
/// takes no more tasks: each would add a receipt to it.
#[tokio::test]
async fn a_host_whose_database_fills_its_disk_budget_takes_no_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let (host, requester) = host_and_requester(dir.path(), &shutdown).await;
    // After the node's first measurement, which would undo this one.
    while host.blobs().state_bytes() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    host.blobs().set_state_bytes(host.blobs().budget() / 2 + 1);
    wait_for_offers(&requester, 1).await;
    let spec = already_on(&host, "hello.wasm", Limits::DEFAULT);
    let answer = requester
        .net()
        .send_task(host.peer_id(), spare_core::wire::TaskRequest::Run(spec))
        .await
        .unwrap();
    assert!(
        matches!(&answer, spare_core::wire::TaskResponse::Refused(r)
            if r.to_string().contains("database fills its share of the owner's disk budget")),
        "{answer:?}"
    );
    assert!(host.ledger().recent_hosted(10).unwrap().is_empty());
    shutdown.cancel();
}

/// A host whose blob store is held by running tasks refuses a task whose
/// blob would fit once they end as busy (so its requester comes back
/// later and holds nothing against it), and one whose blob could never
/// fit (here, in a requester's share) as unable to fetch it.
#[tokio::test]
async fn a_host_whose_blob_store_is_held_refuses_as_busy() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    // 6 MiB for blobs, 5 of them held.
    let (host, requester) = host_and_requester_with(dir.path(), &shutdown, |config| {
        config.policy.disk = 8 << 20;
    })
    .await;
    let held = host.blobs().put(&vec![1; 5 * MIB]).unwrap();
    let _pin = host.blobs().pin(&held);
    wait_for_offers(&requester, 1).await;
    let refusal = |size: usize| {
        let module = vec![2; size];
        let spec = spare_core::TaskSpec {
            module: BlobRef::of(&module),
            ..already_on(&host, "hello.wasm", Limits::DEFAULT)
        };
        let net = requester.net().clone();
        let host = host.peer_id();
        async move {
            net.send_task(host, spare_core::wire::TaskRequest::Run(spec))
                .await
                .unwrap()
        }
    };
    let answer = refusal(2 * MIB).await;
    assert!(
        matches!(
            answer,
            spare_core::wire::TaskResponse::Refused(spare_core::wire::Refusal::Busy { .. })
        ),
        "{answer:?}"
    );
    let answer = refusal(7 * MIB).await;
    assert!(
        matches!(&answer,
            spare_core::wire::TaskResponse::Refused(spare_core::wire::Refusal::BlobUnavailable(why))
                if why.contains("more than one requester's share")),
        "{answer:?}"
    );
    shutdown.cancel();
}

/// A damaged database is refused with its path and what to do.
#[tokio::test]
async fn a_damaged_database_is_named_with_the_way_out() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let paths = Paths::in_dir(dir.path());
    paths.create_dirs().unwrap();
    std::fs::write(&paths.db, vec![0x5a; 8192]).unwrap();
    let Err(error) = start_node(dir.path(), vec![], &shutdown, |_| {}).await else {
        panic!("a node started on a damaged database");
    };
    let error = error.to_string();
    assert!(
        error.contains(&paths.db.display().to_string()) && error.contains("move it aside"),
        "{error}"
    );
    shutdown.cancel();
}

/// A host that failed a task is remembered across tasks: the next task
/// goes to a busy host before it, though it offers a free core; and
/// `spare peers` says why.
#[tokio::test]
async fn a_host_that_failed_a_task_is_tried_after_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    let flaky = node(&dir.path().join("flaky"), vec![], &shutdown).await;
    let steady = node(&dir.path().join("steady"), vec![], &shutdown).await;
    let mut bootstrap = flaky.net().listen_addrs();
    bootstrap.extend(steady.net().listen_addrs());
    let requester = node(&dir.path().join("req"), bootstrap, &shutdown).await;
    wait_for_offers(&requester, 2).await;

    // The flaky host's worker dies under the task: its fault.
    let on = |host: &Node| Placement::On(host.peer_id().to_string());
    let mut crashed = start_example(
        &requester,
        "hostile/loop.wasm",
        LimitRequest::default(),
        on(&flaky),
    )
    .await;
    assert!(eventually(|| !flaky.running_hosted().is_empty()).await);
    for pid in flaky.pool().worker_pids() {
        // SAFETY: kill has no memory effects; the pid is the host's worker.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let result = ending(&mut crashed).await.expect("a report of the crash");
    assert_eq!(
        result.failure_kind,
        Some(spare_node::api::types::FailureKind::Host),
        "{result:?}"
    );
    let (strikes, _) = requester.standing(&flaky.peer_id()).expect("remembered");
    assert_eq!(strikes, 1);

    // The steady host's one core is taken (for a second); the flaky host,
    // its worker replaced, offers a free one.
    let limits = LimitRequest {
        wall_ms: Some(1000),
        ..LimitRequest::default()
    };
    let mut occupying = start_example(&requester, "hostile/loop.wasm", limits, on(&steady)).await;
    assert!(eventually(|| !steady.running_hosted().is_empty()).await);
    let mut next = start_example(
        &requester,
        "hello.wasm",
        LimitRequest::default(),
        Placement::Auto,
    )
    .await;
    let (seen, ended) = events_to_the_end(&mut next).await;
    let first_host = seen.iter().find_map(|e| match e {
        TaskEvent::Placed { host, .. } => Some(host.clone()),
        _ => None,
    });
    assert_eq!(first_host, Some(steady.peer_id().to_string()), "{seen:?}");
    assert_eq!(ended.expect("it ran").exit_code, Some(0));
    ending(&mut occupying).await.expect("it ran");

    let (status, body) = call(&requester, "GET", "/v1/peers", vec![]).await;
    assert_eq!(status, 200);
    let peers: Vec<spare_node::api::types::PeerView> = serde_json::from_slice(&body).unwrap();
    let failures = |host: &Node| {
        let id = host.peer_id().to_string();
        let view = peers.iter().find(|p| p.peer_id == id).expect("listed");
        view.failures.as_ref().map(|f| f.count)
    };
    assert_eq!((failures(&flaky), failures(&steady)), (Some(1), None));
    shutdown.cancel();
}

/// A host, and a requester bootstrapped from it, in `dir`.
async fn host_and_requester(dir: &std::path::Path, shutdown: &CancellationToken) -> (Node, Node) {
    host_and_requester_with(dir, shutdown, |_| {}).await
}

/// [`host_and_requester`] with the host's config changed by `tweak`.
async fn host_and_requester_with(
    dir: &std::path::Path,
    shutdown: &CancellationToken,
    tweak: impl FnOnce(&mut Config),
) -> (Node, Node) {
    let host = node_with(&dir.join("host"), vec![], shutdown, tweak).await;
    let requester = node(&dir.join("req"), host.net().listen_addrs(), shutdown).await;
    (host, requester)
}

/// A task of `examples/<name>` with no input under `limits`, its module
/// put in `host`'s store already, so the host fetches nothing for it.
fn already_on(host: &Node, name: &str, limits: Limits) -> spare_core::TaskSpec {
    let module = example(name);
    host.blobs().put(&module).unwrap();
    spare_core::TaskSpec {
        id: TaskId::random(),
        name: name.into(),
        module: BlobRef::of(&module),
        args: vec![],
        env: vec![],
        stdin: spare_core::Stdin::for_bytes(b""),
        limits,
    }
}

/// Puts `examples/<name>` in `requester`'s store and starts it there, with
/// no input, under `limits`, at `placement`.
async fn start_example(
    requester: &Node,
    name: &str,
    limits: LimitRequest,
    placement: Placement,
) -> tokio::sync::mpsc::Receiver<TaskEvent> {
    start_example_with(requester, name, vec![], limits, placement).await
}

/// As [`start_example`], with `args`.
async fn start_example_with(
    requester: &Node,
    name: &str,
    args: Vec<String>,
    limits: LimitRequest,
    placement: Placement,
) -> tokio::sync::mpsc::Receiver<TaskEvent> {
    let bytes = example(name);
    requester.blobs().put(&bytes).unwrap();
    let submission = Submission {
        name: name.into(),
        module: BlobRef::of(&bytes),
        args,
        env: vec![],
        stdin: SubmitStdin::None,
        limits,
        placement,
    };
    let task = spare_node::requester::prepare(requester, &submission)
        .await
        .unwrap();
    assert_eq!(task.spec.limits, limits.wanted(), "defaults where unset");
    spare_node::requester::start(requester, task)
}

/// Waits until `node` has offers from `n` peers.
async fn wait_for_offers(node: &Node, n: usize) {
    while node
        .net()
        .peers()
        .iter()
        .filter(|p| p.offer.is_some())
        .count()
        < n
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// How a started task ends: its result, or the error it failed with.
async fn ending(
    events: &mut tokio::sync::mpsc::Receiver<TaskEvent>,
) -> Result<spare_node::api::types::TaskResult, String> {
    events_to_the_end(events).await.1
}

/// The events of a started task before its end, and how it ended.
async fn events_to_the_end(
    events: &mut tokio::sync::mpsc::Receiver<TaskEvent>,
) -> (
    Vec<TaskEvent>,
    Result<spare_node::api::types::TaskResult, String>,
) {
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match events.recv().await.expect("events until the end") {
                TaskEvent::Finished { result } => return (seen, Ok(result)),
                TaskEvent::Failed { error } => return (seen, Err(error)),
                event => seen.push(event),
            }
        }
    })
    .await
    .expect("the task ends within a minute")
}

/// A pool of `slots` real `spare worker` processes.
async fn worker_pool(slots: usize) -> WorkerPool {
    WorkerPool::start(PoolConfig {
        command: WorkerCommand {
            program: env!("CARGO_BIN_EXE_spare").into(),
            args: vec!["worker".into()],
        },
        slots,
        join: vec![],
    })
    .await
    .unwrap()
}

/// `examples/<path>` with `args`, within the default limits.
fn example_job(path: &str, args: &[&str]) -> Job {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(path);
    let bytes = std::fs::read(&path).unwrap();
    Job {
        task: TaskId::random(),
        module: BlobId::of(&bytes),
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        module_path: path,
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits: Limits::DEFAULT,
    }
}

/// `hostile/loop.wasm`, which spins until its wall time (a minute) ends.
fn endless_job() -> Job {
    Job {
        limits: Limits {
            wall_ms: 60_000,
            ..Limits::DEFAULT
        },
        ..example_job("hostile/loop.wasm", &[])
    }
}

/// A cancel that reaches the worker before it has read its job still
/// stops that job (it names it), and does not touch the next one.
#[tokio::test]
async fn a_cancel_before_the_job_is_read_still_stops_it_and_only_it() {
    let pool = worker_pool(1).await;
    let worker = pool.worker_pids();
    // Stopped, the worker gets its job in its pipe and the cancel pending,
    // and takes the cancel first when it resumes.
    pool.set_state(spare_runtime::WorkerState::Throttle);
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.run(endless_job(), "a", cancel).await }
    });
    while pool.stats().running == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    cancel.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    pool.set_state(spare_runtime::WorkerState::Run);
    let outcome = tokio::time::timeout(Duration::from_secs(30), running)
        .await
        .expect("a cancelled job ends")
        .unwrap();
    assert!(
        matches!(outcome.failure(), Some(Failure::Cancelled)),
        "{:?}",
        outcome.status
    );
    let live = pool.worker_pids();
    assert!(
        worker.iter().all(|pid| live.contains(pid)),
        "the worker stopped its guest itself instead of being killed: {worker:?} {live:?}"
    );
    let outcome = pool.run(hello_job(), "a", CancellationToken::new()).await;
    assert_eq!(outcome.exit_code(), Some(0), "{:?}", outcome.status);
    assert_eq!(outcome.stdout, b"hello from spare\n");
}

/// `hello.wasm`, which prints a line.
fn hello_job() -> Job {
    example_job("hello.wasm", &[])
}

/// `cpubound.wasm` for a tenth of a second or so: enough CPU time to tell
/// the worker that ran it from the others.
fn busy_job() -> Job {
    example_job("cpubound.wasm", &["10"])
}

/// Runs [`busy_job`] for `requester` (the owner's job, without one) and
/// returns the pid of the worker that ran it: the one whose CPU time grew
/// by far the most.
async fn ran_in(pool: &WorkerPool, requester: Option<&str>) -> u32 {
    use spare_policy::owner::process_cpu_ticks;
    let before: Vec<(u32, u64)> = (pool.worker_pids().into_iter())
        .map(|pid| (pid, process_cpu_ticks(pid).unwrap_or(0)))
        .collect();
    let outcome = match requester {
        Some(requester) => {
            pool.run(busy_job(), requester, CancellationToken::new())
                .await
        }
        None => {
            pool.run_for_owner(busy_job(), CancellationToken::new())
                .await
        }
    };
    assert_eq!(outcome.exit_code(), Some(0), "{:?}", outcome.status);
    // Among the workers there before: the test waits for the reserve, and
    // one started meanwhile would count its start-up.
    let mut grew: Vec<(u64, u32)> = (before.iter())
        .map(|&(pid, was)| {
            let now = process_cpu_ticks(pid).unwrap_or(0);
            (now.saturating_sub(was), pid)
        })
        .collect();
    grew.sort_unstable();
    let (most, pid) = grew.pop().expect("a worker");
    let next = grew.pop().map_or(0, |(ticks, _)| ticks);
    assert!(
        most >= 4 && most > 2 * next,
        "which worker ran it? {grew:?} {most} {pid}"
    );
    pid
}

/// Waits up to a minute for `done`: workers start at `SCHED_IDLE`, and
/// may wait long for a CPU while other tests load the machine.
async fn eventually(done: impl Fn() -> bool) -> bool {
    for _ in 0..6000 {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done()
}

/// A worker runs the jobs of one tenant only, so a guest that took over
/// its worker never sees another's: a requester's next job takes its
/// worker again; another requester's or the owner's gets a worker of its
/// own, the fresh one the pool keeps in reserve, and the first requester's
/// is killed to make room.
#[tokio::test]
async fn a_worker_runs_the_jobs_of_one_tenant_only() {
    let pool = worker_pool(1).await;
    let fresh = pool.worker_pids();
    let a = ran_in(&pool, Some("a")).await;
    assert_eq!([a], fresh[..], "the fresh worker was not used");
    // Its taking started a fresh worker in reserve.
    assert!(eventually(|| pool.worker_pids().len() == 2).await);
    let reserve: Vec<u32> = (pool.worker_pids().into_iter())
        .filter(|p| *p != a)
        .collect();
    assert_eq!(
        ran_in(&pool, Some("a")).await,
        a,
        "a requester's worker was not reused"
    );
    let b = ran_in(&pool, Some("b")).await;
    assert_eq!(
        [b],
        reserve[..],
        "another requester's job did not take the reserve"
    );
    // Killed once the next reserve is ready, and reaped: gone from /proc.
    let gone = |pid: u32| !std::path::Path::new(&format!("/proc/{pid}")).exists();
    assert!(
        eventually(|| gone(a)).await,
        "the first requester's worker {a} lives on"
    );
    assert!(eventually(|| pool.worker_pids().len() == 2).await);
    let owner = ran_in(&pool, None).await;
    assert!(![a, b].contains(&owner), "the owner's job shared a worker");
    let reserved = || pool.worker_pids().len() == 2 && !pool.worker_pids().contains(&b);
    assert!(eventually(reserved).await);
    let again = ran_in(&pool, Some("a")).await;
    assert!(![a, b, owner].contains(&again));

    // With two slots, two requesters in turn keep a worker each.
    let pool = worker_pool(2).await;
    let a = ran_in(&pool, Some("a")).await;
    let b = ran_in(&pool, Some("b")).await;
    assert_ne!(a, b);
    assert!(eventually(|| pool.worker_pids().len() == 3).await);
    for _ in 0..2 {
        assert_eq!(ran_in(&pool, Some("a")).await, a);
        assert_eq!(ran_in(&pool, Some("b")).await, b);
    }
}

/// A worker that dies mid-job is reported, and the pool starts a
/// replacement at once, so the next job finds a warm worker.
#[tokio::test]
async fn a_lost_worker_is_replaced_before_the_next_job() {
    let pool = worker_pool(1).await;
    let first = pool.worker_pids();
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.run(endless_job(), "a", cancel).await }
    });
    // The fresh worker in reserve, started as the job took the first, is
    // taken by an owner's job: no worker is left idle.
    assert!(eventually(|| pool.worker_pids().len() == 2).await);
    let owners = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.run_for_owner(endless_job(), cancel).await }
    });
    assert!(eventually(|| pool.stats().running == 2).await);
    let busy = pool.worker_pids();
    // SAFETY: kill has no memory effects; the pid is our own child's.
    assert_eq!(unsafe { libc::kill(first[0] as i32, libc::SIGKILL) }, 0);
    let outcome = running.await.unwrap();
    assert!(
        matches!(outcome.failure(), Some(Failure::WorkerCrashed(_))),
        "{:?}",
        outcome.status
    );
    // The replacement comes without another job asking for it.
    let replaced = || pool.worker_pids().iter().any(|pid| !busy.contains(pid));
    assert!(
        eventually(replaced).await,
        "{busy:?} {:?}",
        pool.worker_pids()
    );
    assert!(!pool.worker_pids().contains(&first[0]));
    cancel.cancel();
    let _ = owners.await;
}

/// The owner's own job is counted apart and its worker is left out of the
/// ones pauses and the duty cycle stop; the swarm's job beside it is not.
#[tokio::test]
async fn the_owners_job_is_counted_apart_and_never_governed() {
    let pool = worker_pool(1).await;
    let cancel = CancellationToken::new();
    let owners = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.run_for_owner(endless_job(), cancel).await }
    });
    // In its worker, exempt, and the fresh worker in reserve started.
    let exempt = || pool.worker_pids().len() - pool.governed_pids().len();
    assert!(eventually(|| exempt() == 1 && pool.worker_pids().len() == 2).await);
    let reserve = pool.governed_pids();
    let swarms = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.run(endless_job(), "a", cancel).await }
    });
    assert!(eventually(|| pool.stats().running == 2).await);
    // The swarm's job takes the reserve, which stays governed, and no
    // other worker is started (the owner's job holds the slot's worker).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(pool.governed_pids(), reserve);
    let stats = pool.stats();
    assert_eq!((stats.running, stats.owner_running), (2, 1), "{stats:?}");
    let (all, governed) = (pool.worker_pids(), pool.governed_pids());
    assert_eq!((all.len(), governed.len()), (2, 1), "{all:?} {governed:?}");
    assert!(all.contains(&governed[0]));
    cancel.cancel();
    for job in [owners, swarms] {
        let outcome = job.await.unwrap();
        assert!(
            matches!(outcome.failure(), Some(Failure::Cancelled)),
            "{:?}",
            outcome.status
        );
    }
    let stats = pool.stats();
    assert_eq!((stats.running, stats.owner_running), (0, 0), "{stats:?}");
    assert_eq!(pool.governed_pids().len(), pool.worker_pids().len());
}

/// A cancelled job stops at once, reports the fuel and time it used, and
/// leaves its worker warm for the next job.
#[tokio::test]
async fn a_cancelled_job_reports_what_it_used_and_keeps_its_worker() {
    let pool = worker_pool(1).await;
    let cancel = CancellationToken::new();
    let running = tokio::spawn({
        let (pool, cancel) = (pool.clone(), cancel.clone());
        async move { pool.run(endless_job(), "a", cancel).await }
    });
    while pool.stats().running == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let worker = pool.worker_pids();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = std::time::Instant::now();
    cancel.cancel();
    let outcome = running.await.unwrap();
    assert!(
        asked.elapsed() < Duration::from_millis(500),
        "{:?}",
        asked.elapsed()
    );
    assert!(
        matches!(outcome.failure(), Some(Failure::Cancelled)),
        "{:?}",
        outcome.status
    );
    assert!(outcome.fuel > 1_000_000, "fuel {}", outcome.fuel);
    assert!(outcome.wall_ms >= 250, "wall {} ms", outcome.wall_ms);
    let live = pool.worker_pids();
    assert!(
        worker.iter().all(|pid| live.contains(pid)),
        "the worker was replaced: {worker:?} {live:?}"
    );
}

/// Workers only read the compiled-module cache (a guest that broke out of
/// wasmtime could otherwise plant code there for later workers): a module
/// a worker compiled for a job is stored by the compiler, a `spare worker
/// --compile` process that runs no guest, and a fresh worker loads it.
#[tokio::test]
async fn a_module_compiled_for_a_job_is_cached_by_the_compiler() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let pool = |slots| {
        WorkerPool::start(PoolConfig {
            command: WorkerCommand {
                program: env!("CARGO_BIN_EXE_spare").into(),
                args: vec![
                    "worker".into(),
                    "--cache-dir".into(),
                    cache.clone().into(),
                    "--blobs-dir".into(),
                    examples.clone().into(),
                ],
            },
            slots,
            join: vec![],
        })
    };
    let path = examples.join("hello.wasm");
    let job = || Job {
        task: TaskId::random(),
        module: BlobId::of(&std::fs::read(&path).unwrap()),
        module_path: path.clone(),
        name: "hello.wasm".into(),
        args: vec![],
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits: Limits::DEFAULT,
    };
    let artifacts = || -> Vec<PathBuf> {
        let engines = std::fs::read_dir(&cache).into_iter().flatten().flatten();
        engines
            .filter_map(|engine| std::fs::read_dir(engine.path()).ok())
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect()
    };

    let first = pool(1).await.unwrap();
    let outcome = first.run(job(), "a", CancellationToken::new()).await;
    assert_eq!(outcome.status, spare_core::Status::Exited(0), "{outcome:?}");
    let stored = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if !artifacts().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(stored.is_ok(), "the compiler stored nothing");
    assert_eq!(artifacts().len(), 1);
    first.close();

    // A fresh worker loads it, and marks it used for the cache's sweep
    // (times are not its contents: a worker may set them).
    let stored = artifacts()[0].clone();
    let long_ago = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1 << 20);
    let file = std::fs::File::open(&stored).unwrap();
    file.set_modified(long_ago).unwrap();
    let second = pool(1).await.unwrap();
    let outcome = second.run(job(), "a", CancellationToken::new()).await;
    assert_eq!(outcome.status, spare_core::Status::Exited(0), "{outcome:?}");
    let used = std::fs::metadata(&stored).unwrap().modified().unwrap();
    assert!(used > long_ago, "the fresh worker did not load it");
    assert_eq!(artifacts(), vec![stored]);
}

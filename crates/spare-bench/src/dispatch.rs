//! Dispatch latency: a trivial task submitted to one daemon and run on a
//! remote peer over loopback, submit → result, against a raw TCP
//! request-response round trip with messages of the same sizes; and the
//! same task from two requesters in turn, each of which then needs a worker
//! of its own on the host's one slot (a worker runs one tenant's jobs).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, bail, ensure};
use bytes::Bytes;
use spare_core::{BlobRef, LimitRequest};
use spare_node::api::client::Client;
use spare_node::api::types::{Placement, Submission, SubmitStdin, TaskEvent, TaskResult};
use spare_testkit::Swarm;

use crate::Env;
use crate::stats::{Samples, header, percentile_rows};

pub(crate) async fn run(env: &Env) -> Result<()> {
    let spare = env.spare.clone();
    let swarm = tokio::task::spawn_blocking(move || Swarm::start(&spare, 3, 1)).await??;
    let (a, b, c) = (&swarm.nodes[0], &swarm.nodes[1], &swarm.nodes[2]);
    let client = Client::new(&a.socket(), "spare up".into());
    let submission = upload_hello(env, &client, Placement::On(b.peer_id().to_owned())).await?;
    let request_size = serde_json::to_vec(&submission)?.len();

    let n = env.iterations(2000);
    for _ in 0..n / 10 {
        run_once(&client, &submission).await?;
    }
    let mut samples = Vec::with_capacity(n);
    let mut reply_size = 0;
    for _ in 0..n {
        let start = Instant::now();
        let result = run_once(&client, &submission).await?;
        samples.push(start.elapsed());
        ensure!(
            result.host == b.peer_id(),
            "ran on {} instead of the remote peer",
            result.host
        );
        reply_size = serde_json::to_vec(&result)?.len();
    }
    let spare = Samples::new(samples);
    let tcp =
        tokio::task::spawn_blocking(move || tcp_round_trips(n, request_size, reply_size)).await??;
    // The same path without the network: the share of the figure that is
    // the API, the ledger and the worker.
    let mut local_submission = submission.clone();
    local_submission.placement = Placement::Local;
    let mut local = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        run_once(&client, &local_submission).await?;
        local.push(start.elapsed());
    }
    let local = Samples::new(local);
    // Two requesters in turn on the same host.
    let other = Client::new(&c.socket(), "spare up".into());
    let other_submission = upload_hello(env, &other, Placement::On(b.peer_id().to_owned())).await?;
    let turns = env.iterations(400);
    let mut alternating = Vec::with_capacity(turns);
    for i in 0..turns + turns / 10 {
        let (client, submission) = if i % 2 == 0 {
            (&client, &submission)
        } else {
            (&other, &other_submission)
        };
        let start = Instant::now();
        run_once(client, submission).await?;
        if i >= turns / 10 {
            alternating.push(start.elapsed());
        }
    }
    let alternating = Samples::new(alternating);

    header(&format!(
        "Dispatch: trivial task on a remote peer over loopback ({n} sequential tasks)"
    ));
    percentile_rows("", &spare, &tcp);
    percentile_rows(", same task with --local (no network)", &local, &tcp);
    percentile_rows(
        &format!(", two requesters in turn ({turns} tasks)"),
        &alternating,
        &tcp,
    );
    println!(
        "\nbaseline: raw TCP round trip on loopback with a {request_size}-byte request and a {reply_size}-byte reply"
    );

    // The whole command, process start-up included, against running the same
    // module locally with the standard tool.
    if let Some(wasmtime) = &env.wasmtime {
        let runs = env.iterations(50);
        let hello = env.example("hello.wasm");
        let spare_cli = time_command(runs, || {
            let mut c = a.cli();
            c.args(["run", "--on", b.peer_id()]).arg(&hello);
            c
        })?;
        let local = time_command(runs, || {
            let mut c = Command::new(wasmtime);
            c.arg("run").arg(&hello);
            c
        })?;
        header(&format!(
            "`spare run` on a remote peer vs `wasmtime run` here ({runs} runs of hello.wasm)"
        ));
        percentile_rows("", &spare_cli, &local);
    }
    Ok(())
}

/// Uploads hello.wasm and returns a submission that runs it.
pub(crate) async fn upload_hello(
    env: &Env,
    client: &Client,
    placement: Placement,
) -> Result<Submission> {
    let bytes = std::fs::read(env.example("hello.wasm"))?;
    let module = BlobRef::of(&bytes);
    client
        .put(&format!("/v1/blobs/{}", module.id), Bytes::from(bytes))
        .await?;
    Ok(Submission {
        name: "hello.wasm".into(),
        module,
        args: vec![],
        env: vec![],
        stdin: SubmitStdin::None,
        limits: LimitRequest::default(),
        placement,
    })
}

/// Submits one task and waits for its result.
pub(crate) async fn run_once(client: &Client, submission: &Submission) -> Result<TaskResult> {
    let mut events = client.post_stream("/v1/tasks", submission).await?;
    loop {
        match events.next::<TaskEvent>().await? {
            Some(TaskEvent::Finished { result }) => {
                ensure!(
                    result.exit_code == Some(0),
                    "task failed: {:?}",
                    result.failure
                );
                events.close().await?;
                return Ok(result);
            }
            Some(TaskEvent::Failed { error }) => bail!("task failed: {error}"),
            Some(_) => {}
            None => bail!("stream ended without a result"),
        }
    }
}

/// `n` request-response round trips over one loopback TCP connection.
fn tcp_round_trips(n: usize, request: usize, reply: usize) -> Result<Samples> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        let mut buf = vec![0u8; request];
        let answer = vec![7u8; reply];
        while conn.read_exact(&mut buf).is_ok() {
            conn.write_all(&answer)?;
        }
        Ok(())
    });
    let mut conn = TcpStream::connect(addr)?;
    conn.set_nodelay(true)?;
    let message = vec![1u8; request];
    let mut answer = vec![0u8; reply];
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let start = Instant::now();
        conn.write_all(&message)?;
        conn.read_exact(&mut answer)?;
        if i >= n / 10 {
            samples.push(start.elapsed());
        }
    }
    drop(conn);
    let _ = server.join();
    Ok(Samples::new(samples))
}

fn time_command(runs: usize, mut command: impl FnMut() -> Command) -> Result<Samples> {
    let mut samples: Vec<Duration> = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let out = command().output()?;
        samples.push(start.elapsed());
        ensure!(
            out.status.success(),
            "command failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Samples::new(samples))
}

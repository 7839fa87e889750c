//! Throughput: trivial tasks per second through a three-node swarm, many in
//! flight, against the same tasks run directly in spare's sandbox on every
//! core of this machine (no network, no daemon): the machine's ceiling.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use spare_core::{BlobId, Limits, Status, TaskId};
use spare_node::api::client::Client;
use spare_node::api::types::Placement;
use spare_runtime::{Job, JobStdin, Sandbox};
use spare_testkit::Swarm;
use tokio::task::JoinSet;

use crate::Env;
use crate::dispatch::{run_once, upload_hello};
use crate::stats::header;

/// Tasks in flight at once.
const CONCURRENCY: usize = 64;

pub(crate) async fn run(env: &Env) -> Result<()> {
    let spare = env.spare.clone();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let swarm = tokio::task::spawn_blocking(move || Swarm::start(&spare, 3, 1)).await??;
    let client = Client::new(&swarm.nodes[0].socket(), "spare up".into());
    let submission = Arc::new(upload_hello(env, &client, Placement::Auto).await?);
    let total = env.iterations(4000);

    // Warm up every host's worker.
    for _ in 0..20 {
        run_once(&client, &submission).await?;
    }
    let start = Instant::now();
    let mut set = JoinSet::new();
    let mut submitted = 0;
    let mut done = 0;
    while done < total {
        while submitted < total && set.len() < CONCURRENCY {
            let (client, submission) = (client.clone(), Arc::clone(&submission));
            set.spawn(async move { run_once(&client, &submission).await });
            submitted += 1;
        }
        if let Some(result) = set.join_next().await {
            result??;
            done += 1;
        }
    }
    let elapsed = start.elapsed();
    let spare_rate = total as f64 / elapsed.as_secs_f64();

    let direct_rate = tokio::task::spawn_blocking({
        let path = env.example("hello.wasm");
        move || direct_rate(&path, cores, total)
    })
    .await??;

    header(&format!(
        "Throughput: {total} trivial tasks through 3 daemons (1 worker each), {CONCURRENCY} in flight"
    ));
    crate::stats::row(
        "tasks per second",
        &format!("{spare_rate:.0}/s"),
        &format!("{direct_rate:.0}/s"),
        &format!("{:.2}×", spare_rate / direct_rate),
    );
    println!(
        "\nbaseline: the same task run directly in spare's sandbox on {cores} threads of this machine, no daemon, no network"
    );
    Ok(())
}

/// Runs `total` hello tasks directly in sandboxes, one thread per core.
fn direct_rate(path: &std::path::Path, threads: usize, total: usize) -> Result<f64> {
    let bytes = std::fs::read(path)?;
    let job = Job {
        task: TaskId::random(),
        module: BlobId::of(&bytes),
        module_path: path.to_path_buf(),
        name: "hello.wasm".into(),
        args: vec![],
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits: Limits::DEFAULT,
    };
    let per_thread = total.div_ceil(threads);
    let mut sandboxes: Vec<Sandbox> = (0..threads).map(|_| Sandbox::new(None)).collect();
    for sandbox in &mut sandboxes {
        sandbox.run(&job);
    }
    let start = Instant::now();
    std::thread::scope(|scope| {
        for sandbox in &mut sandboxes {
            let job = &job;
            scope.spawn(move || {
                for _ in 0..per_thread {
                    assert_eq!(sandbox.run(job).status, Status::Exited(0));
                }
            });
        }
    });
    Ok((per_thread * threads) as f64 / start.elapsed().as_secs_f64())
}

//! Throughput: trivial tasks per second through a three-node swarm, many in
//! flight, against the same tasks run directly in spare's sandbox on every
//! core of this machine (no network, no daemon): the machine's ceiling.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use spare_core::{BlobId, Limits, Status, TaskId};
use spare_node::api::client::Client;
use spare_node::api::types::{Placement, Submission};
use spare_policy::owner::{process_cpu_ticks, ticks_per_second};
use spare_runtime::{Job, JobStdin, Sandbox};
use spare_testkit::Swarm;
use tokio::task::JoinSet;

use crate::Env;
use crate::dispatch::{run_once, upload_hello};
use crate::stats::{fmt, header};

/// Tasks in flight at once.
const CONCURRENCY: usize = 64;
/// Measured rounds, each of the full task count.
const ROUNDS: usize = 5;

/// What one round measured.
struct Round {
    /// Tasks per second.
    rate: f64,
    /// CPU seconds per task: the daemons and their workers, and this
    /// process (the client).
    swarm_cpu: f64,
    client_cpu: f64,
}

/// Runs `total` tasks with [`CONCURRENCY`] in flight.
async fn round(
    client: &Client,
    submission: &Arc<Submission>,
    total: usize,
    swarm: &[u32],
) -> Result<Round> {
    let ticks_before = (ticks_of(swarm), own_ticks());
    let start = Instant::now();
    let mut set = JoinSet::new();
    let mut submitted = 0;
    let mut done = 0;
    while done < total {
        while submitted < total && set.len() < CONCURRENCY {
            let (client, submission) = (client.clone(), Arc::clone(submission));
            set.spawn(async move { run_once(&client, &submission).await });
            submitted += 1;
        }
        if let Some(result) = set.join_next().await {
            result??;
            done += 1;
        }
    }
    let elapsed = start.elapsed();
    let per_task = |ticks: u64| ticks as f64 / ticks_per_second() as f64 / total as f64;
    Ok(Round {
        rate: total as f64 / elapsed.as_secs_f64(),
        swarm_cpu: per_task(ticks_of(swarm).saturating_sub(ticks_before.0)),
        client_cpu: per_task(own_ticks().saturating_sub(ticks_before.1)),
    })
}

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
    // The daemons and their workers (which live as long as the swarm: no
    // task here fails).
    let mut pids: Vec<u32> = swarm.nodes.iter().filter_map(|node| node.pid()).collect();
    for node in &swarm.nodes {
        pids.extend(node.worker_pids()?);
    }
    // This machine's speed drifts from second to second: several rounds on
    // the same swarm, and their median.
    let mut rounds = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        rounds.push(round(&client, &submission, total, &pids).await?);
    }
    // The median round, the lowest and the highest.
    let spread = |pick: fn(&Round) -> f64| {
        let mut values: Vec<f64> = rounds.iter().map(pick).collect();
        values.sort_by(f64::total_cmp);
        (
            values[values.len() / 2],
            values[0],
            values[values.len() - 1],
        )
    };
    let (spare_rate, slowest, fastest) = spread(|r| r.rate);
    let swarm_cpu = Duration::from_secs_f64(spread(|r| r.swarm_cpu).0);
    let client_cpu = Duration::from_secs_f64(spread(|r| r.client_cpu).0);

    let direct_rate = tokio::task::spawn_blocking({
        let path = env.example("hello.wasm");
        move || direct_rate(&path, cores, total)
    })
    .await??;

    header(&format!(
        "Throughput: {ROUNDS} rounds of {total} trivial tasks through 3 daemons (1 worker each), {CONCURRENCY} in flight"
    ));
    crate::stats::row(
        "tasks per second, median round",
        &format!("{spare_rate:.0}/s"),
        &format!("{direct_rate:.0}/s"),
        &format!("{:.2}×", spare_rate / direct_rate),
    );
    crate::stats::row(
        "tasks per second, slowest and fastest round",
        &format!("{slowest:.0}/s, {fastest:.0}/s"),
        "",
        "",
    );
    crate::stats::row(
        "CPU per task, median round: daemons and their workers",
        &fmt(swarm_cpu),
        "",
        &format!(
            "at most {:.0}/s on {cores} cores",
            cores as f64 / swarm_cpu.as_secs_f64()
        ),
    );
    crate::stats::row(
        "CPU per task, median round: the client (this process)",
        &fmt(client_cpu),
        "",
        "",
    );
    println!(
        "\nbaseline: the same task run directly in spare's sandbox on {cores} threads of this machine, no daemon, no network"
    );
    Ok(())
}

/// CPU clock ticks used so far by the processes `pids`.
fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|&pid| process_cpu_ticks(pid)).sum()
}

fn own_ticks() -> u64 {
    process_cpu_ticks(std::process::id()).unwrap_or(0)
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

//! `spare demo`: a three-node swarm on this machine, and a task run on it.
//!
//! The nodes are real daemons (`spare up` child processes) talking real
//! libp2p over loopback TCP; the sample task is `examples/primes.wasm`,
//! built into the binary.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use spare_core::BlobRef;
use spare_node::api::types::{Placement, Submission, SubmitStdin, TaskEvent};
use spare_testkit::Swarm;

use spare_node::api::client::Client;

/// The sample guest: counts primes, greets, sums its stdin.
const PRIMES: &[u8] = include_bytes!("../../../../examples/primes.wasm");
const NODES: usize = 3;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Exit after the sample task instead of keeping the swarm up.
    #[arg(long)]
    once: bool,
}

pub(crate) async fn execute(args: Args) -> Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the spare executable")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "starting {NODES} spare daemons on 127.0.0.1 …")?;
    out.flush()?;
    let swarm = tokio::task::spawn_blocking(move || Swarm::start(&exe, NODES, 1)).await??;
    for (i, node) in swarm.nodes.iter().enumerate() {
        writeln!(
            out,
            "  node {} {}  {}",
            node_name(i),
            node.peer_id(),
            node.addr()
        )?;
    }
    let first = &swarm.nodes[0];
    let client = Client::new(&first.socket(), "spare demo".into());

    let module = BlobRef::of(PRIMES);
    client
        .put(
            &format!("/v1/blobs/{}", module.id),
            Bytes::from_static(PRIMES),
        )
        .await?;
    let submission = Submission {
        name: "primes.wasm".into(),
        module,
        args: vec!["1000000".into()],
        env: vec![("GREETING".into(), "hello from the demo".into())],
        stdin: SubmitStdin::Inline(spare_node::api::types::encode_b64(b"1 2 3 4\n")),
        limits: spare_core::Limits::DEFAULT,
        placement: Placement::Auto,
    };
    writeln!(
        out,
        "\nnode a runs primes.wasm -- 1000000 on the best remote peer:"
    )?;
    out.flush()?;
    let mut events = client.post_stream("/v1/tasks", &submission).await?;
    let result = loop {
        match events.next::<TaskEvent>().await? {
            Some(TaskEvent::Finished { result }) => break result,
            Some(TaskEvent::Failed { error }) => bail!("the demo task failed: {error}"),
            Some(TaskEvent::Retrying { host, reason, .. }) => {
                writeln!(out, "  {host} failed ({reason}); retrying")?
            }
            Some(TaskEvent::Waiting { reason }) => writeln!(out, "  waiting: {reason}")?,
            Some(_) => {}
            None => bail!("the daemon ended the task stream early"),
        }
    };
    let host = swarm
        .nodes
        .iter()
        .position(|n| n.peer_id() == result.host)
        .map(|i| format!("node {} ({})", node_name(i), result.host))
        .unwrap_or_else(|| result.host.clone());
    writeln!(out, "  ran on   {host}")?;
    writeln!(
        out,
        "  exit     {}",
        result
            .exit_code
            .map(|c| c.to_string())
            .unwrap_or_else(|| result.failure.clone().unwrap_or_default())
    )?;
    writeln!(out, "  fuel     {}", result.fuel)?;
    writeln!(out, "  wall     {} ms", result.wall_ms)?;
    writeln!(
        out,
        "  receipt  {}",
        if result.receipt {
            "signed by the host, verified"
        } else {
            "missing"
        }
    )?;
    writeln!(out, "  output:")?;
    for line in String::from_utf8_lossy(&result.stdout_bytes()).lines() {
        writeln!(out, "    {line}")?;
    }
    if result.exit_code != Some(0) {
        bail!("the demo task did not exit cleanly");
    }
    if args.once {
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(
        out,
        "\nthe swarm keeps running until Ctrl-C. Try, in another terminal:"
    )?;
    writeln!(out, "  spare --data-dir {} peers", first.dir.display())?;
    writeln!(
        out,
        "  spare --data-dir {} run examples/primes.wasm -- 2000000",
        first.dir.display()
    )?;
    writeln!(out, "  spare --data-dir {} tasks", first.dir.display())?;
    out.flush()?;
    drop(out);
    tokio::signal::ctrl_c().await?;
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(swarm);
    Ok(ExitCode::SUCCESS)
}

fn node_name(i: usize) -> char {
    char::from(b'a' + (i % 26) as u8)
}

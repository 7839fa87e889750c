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
use tokio::signal::unix::{Signal, SignalKind, signal};

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
    // Caught from the start: the daemons are this process's children and
    // must not outlive it, whichever way it is asked to stop.
    let mut stop = Stop::new()?;
    let exe = std::env::current_exe().context("cannot find the spare executable")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "starting {NODES} spare daemons on 127.0.0.1 …")?;
    out.flush()?;
    // The daemons are started from a thread of their own, which lives until
    // this function returns (`_keep` is dropped last) and takes them with
    // it even if this process is killed outright (`Swarm::start_tied`).
    let (started, mut start) = tokio::sync::oneshot::channel();
    let (_keep, kept) = std::sync::mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("demo daemons".into())
        .spawn(move || {
            let _ = started.send(Swarm::start_tied(&exe, NODES, 1));
            // Until `_keep` is dropped.
            let _ = kept.recv();
        })
        .context("cannot start the thread that starts the daemons")?;
    let swarm = tokio::select! {
        started = &mut start => started.context("the daemons' thread ended early")??,
        signal = stop.recv() => {
            // A start under way cannot be cut short: its daemons are
            // stopped as soon as they are up (or its failure stopped them).
            eprintln_quiet(&format!("spare: {}; stopping the daemons once they have started…", signal_name(signal)));
            if let Ok(Ok(swarm)) = start.await {
                drop(swarm);
            }
            return Ok(interrupted(signal));
        }
    };
    let shown = tokio::select! {
        shown = show(&swarm, &mut out) => shown,
        signal = stop.recv() => {
            eprintln_quiet(&format!("spare: {}; stopping the swarm", signal_name(signal)));
            return Ok(interrupted(signal));
        }
    };
    shown?;
    if args.once {
        return Ok(ExitCode::SUCCESS);
    }
    // The sample module, where the suggested command finds it from any
    // directory.
    let primes = swarm.root().join("primes.wasm");
    std::fs::write(&primes, PRIMES)
        .with_context(|| format!("cannot write {}", primes.display()))?;
    let first = &swarm.nodes[0];
    writeln!(
        out,
        "\nthe swarm keeps running until Ctrl-C. Try, in another terminal:"
    )?;
    writeln!(out, "  spare --data-dir {} peers", first.dir.display())?;
    writeln!(
        out,
        "  spare --data-dir {} run {} -- 2000000",
        first.dir.display(),
        primes.display()
    )?;
    writeln!(out, "  spare --data-dir {} tasks", first.dir.display())?;
    out.flush()?;
    drop(out);
    let signal = stop.recv().await;
    eprintln_quiet(&format!(
        "spare: {}; stopping the swarm",
        signal_name(signal)
    ));
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(swarm);
    Ok(ExitCode::SUCCESS)
}

/// Runs the sample task from the first node and prints how it went.
async fn show(swarm: &Swarm, out: &mut impl Write) -> Result<()> {
    let first = &swarm.nodes[0];
    let client = Client::new(&first.socket(), "spare demo".into());
    for (i, node) in swarm.nodes.iter().enumerate() {
        writeln!(
            out,
            "  node {} {}  {}",
            node_name(i),
            node.peer_id(),
            node.addr()
        )?;
    }

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
        limits: spare_core::LimitRequest::default(),
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
                let reason = crate::output::printable(&reason);
                writeln!(out, "  {host} failed ({reason}); retrying")?
            }
            Some(TaskEvent::Waiting { reason }) => {
                writeln!(out, "  waiting: {}", crate::output::printable(&reason))?
            }
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
    Ok(())
}

/// The signals that stop the demo: Ctrl-C, `kill` and a closed terminal.
/// Each stops the swarm before `spare` exits.
#[derive(Debug)]
struct Stop {
    interrupt: Signal,
    terminate: Signal,
    /// `None` when started ignoring it (`nohup spare demo`).
    hangup: Option<Signal>,
}

impl Stop {
    fn new() -> Result<Self> {
        let catch = |kind: SignalKind, name: &str| {
            signal(kind).with_context(|| format!("cannot catch {name}"))
        };
        Ok(Self {
            interrupt: catch(SignalKind::interrupt(), "SIGINT")?,
            terminate: catch(SignalKind::terminate(), "SIGTERM")?,
            hangup: if spare_node::daemon::ignored(libc::SIGHUP) {
                None
            } else {
                Some(catch(SignalKind::hangup(), "SIGHUP")?)
            },
        })
    }

    /// The next of them to arrive.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
            () = hang_up(&mut self.hangup) => libc::SIGHUP,
        }
    }
}

/// The next `SIGHUP`, or never when it is ignored.
async fn hang_up(signal: &mut Option<Signal>) {
    match signal {
        Some(signal) => {
            signal.recv().await;
        }
        None => std::future::pending().await,
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGINT => "interrupted",
        libc::SIGTERM => "terminated (SIGTERM)",
        _ => "hung up (SIGHUP)",
    }
}

/// The exit code of a demo stopped before it was done, as a shell reports
/// a program killed by `signal`.
fn interrupted(signal: i32) -> ExitCode {
    ExitCode::from(128 + u8::try_from(signal).unwrap_or(0))
}

fn eprintln_quiet(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn node_name(i: usize) -> char {
    char::from(b'a' + (i % 26) as u8)
}

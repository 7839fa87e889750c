//! `spare up`: the daemon, in the foreground.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use spare_node::Config;
use spare_node::config::Flags;
use spare_node::daemon::{DaemonOptions, run};
use spare_runtime::WorkerCommand;

use crate::Context;

/// Each flag overrides its setting in the config file (see `spare init`'s
/// template) and is checked the same way.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Address to listen on (repeatable), e.g. /ip4/127.0.0.1/tcp/0.
    /// Default: TCP and QUIC on port 4117 of every interface.
    #[arg(long, value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Peer to connect to at start (repeatable), as printed by `spare id`.
    #[arg(long, value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// Do not discover peers on the local network with mDNS.
    #[arg(long)]
    no_mdns: bool,
    /// Tasks to run at once for the swarm (default: every core).
    #[arg(long)]
    cores: Option<i64>,
    /// Share of the machine's CPU all guests together may use, e.g. 50%.
    #[arg(long, value_name = "PERCENT")]
    cpu: Option<String>,
    /// Memory all guests together may use, e.g. 4GiB.
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Disk for tasks' modules, inputs and compiled code, e.g. 10GiB.
    #[arg(long, value_name = "SIZE")]
    disk: Option<String>,
    /// Upload bandwidth for the swarm, e.g. 2MiB/s or unlimited.
    #[arg(long, value_name = "RATE")]
    upload: Option<String>,
    /// Download bandwidth for the swarm, e.g. 2MiB/s or unlimited.
    #[arg(long, value_name = "RATE")]
    download: Option<String>,
    /// How limits are enforced: auto, cgroup or fallback.
    #[arg(long, value_name = "HOW")]
    enforcement: Option<String>,
    /// Give only while the owner leaves the machine idle (the default).
    #[arg(long, conflicts_with = "always")]
    idle_only: bool,
    /// Give whatever the owner is doing (within the other limits).
    #[arg(long)]
    always: bool,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let idle_only = match (args.idle_only, args.always) {
        (true, _) => Some(true),
        (_, true) => Some(false),
        _ => None,
    };
    let flags = Flags {
        listen: args.listen,
        bootstrap: args.bootstrap,
        no_mdns: args.no_mdns,
        cores: args.cores,
        cpu: args.cpu,
        memory: args.memory,
        disk: args.disk,
        upload: args.upload,
        download: args.download,
        enforcement: args.enforcement,
        idle_only,
    };
    let config = Config::load(&context.paths.config, flags)?;
    let program = std::env::current_exe().context("cannot find the spare executable")?;
    let worker = WorkerCommand {
        program,
        args: vec![
            "worker".into(),
            "--cache-dir".into(),
            context.paths.cache.clone().into_os_string(),
        ],
    };
    run(DaemonOptions {
        paths: context.paths.clone(),
        config,
        worker,
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

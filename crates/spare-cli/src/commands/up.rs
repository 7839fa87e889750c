//! `spare up`: the daemon, in the foreground.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use spare_node::config::check_cores;
use spare_node::daemon::{DaemonOptions, run};
use spare_node::{Config, Paths};
use spare_runtime::WorkerCommand;

use crate::Context;

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
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let config = configure(&context.paths, &args)?;
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

/// The config file with the flags applied on top.
fn configure(paths: &Paths, args: &Args) -> Result<Config> {
    let mut config = Config::load(&paths.config)?;
    let addrs = |list: &[String], flag: &str| -> Result<Vec<_>> {
        list.iter()
            .map(|a| {
                a.parse()
                    .map_err(|e| anyhow::anyhow!("--{flag} `{a}` is not a multiaddress: {e}"))
            })
            .collect()
    };
    if !args.listen.is_empty() {
        config.listen = addrs(&args.listen, "listen")?;
    }
    config
        .bootstrap
        .extend(addrs(&args.bootstrap, "bootstrap")?);
    if args.no_mdns {
        config.mdns = false;
    }
    if let Some(cores) = args.cores {
        config.cores = check_cores(cores).map_err(|e| anyhow::anyhow!("--cores: {e}"))?;
    }
    Ok(config)
}

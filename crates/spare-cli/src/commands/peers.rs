//! `spare peers`

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use spare_node::api::types::PeerView;

use crate::{Context, output};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let peers: Vec<PeerView> = context.client().get("/v1/peers").await?;
    if args.json {
        output::json(&peers)?;
        return Ok(ExitCode::SUCCESS);
    }
    if peers.is_empty() {
        writeln!(
            std::io::stdout(),
            "no peers connected (join a swarm with `spare up --bootstrap <addr>`, or wait for mDNS)"
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![vec![
        "PEER".to_owned(),
        "RTT".to_owned(),
        "IDLE/CORES".to_owned(),
        "QUEUED".to_owned(),
        "ADDRESS".to_owned(),
    ]];
    for p in &peers {
        let (cores, queued) = match &p.offer {
            Some(o) => (format!("{}/{}", o.idle, o.cores), o.queued.to_string()),
            None => ("-".to_owned(), "-".to_owned()),
        };
        rows.push(vec![
            p.peer_id.clone(),
            p.rtt_ms
                .map(|ms| format!("{ms:.1} ms"))
                .unwrap_or_else(|| "-".into()),
            cores,
            queued,
            p.addrs.first().cloned().unwrap_or_default(),
        ]);
    }
    output::table(&rows);
    Ok(ExitCode::SUCCESS)
}

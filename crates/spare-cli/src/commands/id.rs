//! `spare id`

use std::io::Write;
use std::process::ExitCode;

use anyhow::{Context as _, Result};
use spare_node::api::types::NodeInfo;

use crate::{Context, output};

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) async fn execute(context: &Context, args: Args) -> Result<ExitCode> {
    let info: NodeInfo = context.client().get("/v1/node").await?;
    if args.json {
        output::json(&serde_json::json!({
            "peer_id": info.peer_id,
            "listen_addrs": info.listen_addrs,
        }))?;
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{}", info.peer_id).context(output::CANNOT_WRITE)?;
        for addr in &info.listen_addrs {
            writeln!(out, "{addr}").context(output::CANNOT_WRITE)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

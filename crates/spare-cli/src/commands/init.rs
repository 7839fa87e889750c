//! `spare init`

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;

use crate::Context;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {}

pub(crate) fn execute(context: &Context, _args: Args) -> Result<ExitCode> {
    let report = spare_node::daemon::init(&context.paths)?;
    let mut out = std::io::stdout().lock();
    if report.created_key {
        writeln!(
            out,
            "created node {} in {}",
            report.peer_id,
            context.paths.data_dir.display()
        )?;
    } else {
        writeln!(
            out,
            "node {} already exists in {}; kept its key",
            report.peer_id,
            context.paths.data_dir.display()
        )?;
    }
    if report.created_config {
        writeln!(out, "wrote {}", context.paths.config.display())?;
    }
    writeln!(out, "start it with `{}`", context.up_command())?;
    Ok(ExitCode::SUCCESS)
}

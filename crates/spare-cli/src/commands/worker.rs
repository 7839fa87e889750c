//! `spare worker` (hidden): a sandbox worker process, started by the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where compiled modules are cached.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
}

pub(crate) fn execute(args: &Args) -> ExitCode {
    let code = spare_runtime::worker::main(args.cache_dir.clone());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

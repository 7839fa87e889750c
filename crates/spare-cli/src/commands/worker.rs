//! `spare worker` (hidden): a sandbox worker process, started by the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where compiled modules are cached: the worker may read and write
    /// there.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Where modules and inputs are: the worker may read there. With it,
    /// or a cache directory, the worker may open no other file.
    #[arg(long)]
    blobs_dir: Option<PathBuf>,
}

pub(crate) fn execute(args: &Args) -> ExitCode {
    let confinement = spare_runtime::confine::Confinement {
        read: args.blobs_dir.iter().cloned().collect(),
        write: args.cache_dir.iter().cloned().collect(),
    };
    let code = spare_runtime::worker::main(args.cache_dir.clone(), &confinement);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

//! `spare worker` (hidden): a sandbox worker process, started by the daemon.

use std::path::PathBuf;
use std::process::ExitCode;

use spare_core::BlobId;
use spare_runtime::confine::Confinement;

#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Where compiled modules are cached: a worker may read there, and
    /// only a compiler (`--compile`) write.
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Where modules and inputs are: the worker may read there. With it,
    /// or a cache directory, the worker may open no other file.
    #[arg(long)]
    blobs_dir: Option<PathBuf>,
    /// Compile this module (its hash) into the cache and exit, running no
    /// guest.
    #[arg(long, requires_all = ["module", "stack", "cache_dir"])]
    compile: Option<BlobId>,
    /// The module's file, for `--compile`.
    #[arg(long)]
    module: Option<PathBuf>,
    /// The jobs' stack limit in bytes, for `--compile`.
    #[arg(long)]
    stack: Option<u64>,
}

pub(crate) fn execute(args: &Args) -> ExitCode {
    let confinement = confinement(args);
    let code = match (&args.compile, &args.module, args.stack, &args.cache_dir) {
        (Some(id), Some(module), Some(stack), Some(cache)) => {
            spare_runtime::worker::compile(cache.clone(), &confinement, id, module, stack)
        }
        _ => {
            // Landlock skips a directory it cannot open, and the worker
            // could then never read what the compiler stores: made if it
            // went missing, as `confine` makes those it may write.
            if let Some(cache) = &args.cache_dir {
                let _ = std::fs::create_dir_all(cache);
            }
            spare_runtime::worker::main(args.cache_dir.clone(), &confinement)
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Where the process may go: the blob store to read; the cache to read,
/// or to write for the compiler alone, which runs no guest.
fn confinement(args: &Args) -> Confinement {
    let mut confinement = Confinement {
        read: args.blobs_dir.iter().cloned().collect(),
        write: Vec::new(),
    };
    let cache = args.cache_dir.iter().cloned();
    if args.compile.is_some() {
        confinement.write.extend(cache);
    } else {
        confinement.read.extend(cache);
    }
    confinement
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Worker {
        #[command(flatten)]
        args: Args,
    }

    fn parse(line: &[&str]) -> Result<Args, clap::Error> {
        Worker::try_parse_from(std::iter::once("worker").chain(line.iter().copied()))
            .map(|w| w.args)
    }

    #[test]
    fn only_the_compiler_may_write_the_cache() {
        let worker = parse(&["--cache-dir", "/c", "--blobs-dir", "/b"]).unwrap();
        let c = confinement(&worker);
        assert_eq!(c.read, [PathBuf::from("/b"), PathBuf::from("/c")]);
        assert!(c.write.is_empty());

        let id = BlobId::of(b"module").to_string();
        let compiler = parse(&[
            "--cache-dir",
            "/c",
            "--blobs-dir",
            "/b",
            "--compile",
            &id,
            "--module",
            "/b/m",
            "--stack",
            "1024",
        ])
        .unwrap();
        let c = confinement(&compiler);
        assert_eq!(c.read, [PathBuf::from("/b")]);
        assert_eq!(c.write, [PathBuf::from("/c")]);

        // A compiler needs all it is told of, and a module hash.
        assert!(parse(&["--cache-dir", "/c", "--compile", &id]).is_err());
        let bad = [
            "--cache-dir",
            "/c",
            "--compile",
            "xyz",
            "--module",
            "/m",
            "--stack",
            "1",
        ];
        assert!(parse(&bad).is_err());
    }
}

//! `spare`: run the daemon, run tasks on the swarm, inspect it.
//!
//! One file per verb under `commands/`, each a clap `Args` struct with an
//! `execute` function. Every verb but `up`, `init`, `demo` and the hidden
//! `worker` talks to the daemon through its Unix-socket API only.

#![cfg_attr(not(test), deny(clippy::unwrap_used))]

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use spare_node::Paths;

/// The environment variable naming the data directory when `--data-dir`
/// is not given.
const DATA_DIR_VAR: &str = "SPARE_DATA_DIR";

/// A peer-to-peer cloud built from spare cycles.
#[derive(Debug, Parser)]
#[command(name = "spare", version, about, long_about = None, max_term_width = 100)]
struct Cli {
    /// Directory holding everything of one node (keys, config, database,
    /// blobs, API socket). Default: $SPARE_DATA_DIR if set and not empty,
    /// else the XDG directories.
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create this node's key and config file (never overwrites them).
    Init(commands::init::Args),
    /// Run the daemon in the foreground.
    Up(commands::up::Args),
    /// Show this node's peer id and addresses.
    Id(commands::id::Args),
    /// Show what this node gives the swarm right now, and why.
    Status(commands::status::Args),
    /// List connected peers and what each offers.
    Peers(commands::peers::Args),
    /// Run a WebAssembly program on the swarm, like running it here.
    Run(commands::run::Args),
    /// List recent tasks, where they ran and how they ended.
    Tasks(commands::tasks::Args),
    /// Start a three-node swarm on this machine and run a task on it.
    Demo(commands::demo::Args),
    /// Internal: a sandbox worker process, started by the daemon.
    #[command(hide = true)]
    Worker(commands::worker::Args),
}

/// What every command gets.
#[derive(Debug, Clone)]
pub(crate) struct Context {
    pub(crate) paths: Paths,
    /// `--data-dir` as given, to repeat it in hints.
    pub(crate) data_dir: Option<PathBuf>,
}

impl Context {
    /// The command that starts this node's daemon, for hints.
    pub(crate) fn up_command(&self) -> String {
        match &self.data_dir {
            Some(dir) => format!("spare --data-dir {} up", dir.display()),
            None => "spare up".to_owned(),
        }
    }

    pub(crate) fn client(&self) -> spare_node::api::client::Client {
        spare_node::api::client::Client::new(&self.paths.socket, self.up_command())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The worker must lower its priority before any thread exists, so it
    // runs before logging and the async runtime are set up.
    if let Command::Worker(args) = &cli.command {
        return commands::worker::execute(args);
    }
    init_logging(matches!(cli.command, Command::Up(_)));
    // The demo's nodes live in a directory of their own, made and removed
    // by it; a data directory given by hand is not used, and the user is
    // told so (one from SPARE_DATA_DIR is simply not used).
    let given = |arg: std::ffi::OsString| {
        let arg = arg.to_string_lossy();
        arg == "--data-dir" || arg.starts_with("--data-dir=")
    };
    if matches!(cli.command, Command::Demo(_)) && std::env::args_os().any(given) {
        eprintln!(
            "spare: note: the demo runs its own three nodes in a temporary directory; \
             --data-dir is not used"
        );
    }
    // Read here rather than by clap, which takes an empty variable for a
    // `--data-dir` given no value; empty, it is unset, as is the custom.
    let data_dir = cli.data_dir.clone().or_else(|| {
        std::env::var_os(DATA_DIR_VAR)
            .filter(|dir| !dir.is_empty())
            .map(PathBuf::from)
    });
    let paths = match Paths::resolve(data_dir.as_deref()) {
        Ok(paths) => paths,
        Err(e) => return output::fail(&anyhow::anyhow!(e)),
    };
    if let Err(e) = check_data_dir(&paths.data_dir) {
        return output::fail(&e);
    }
    let context = Context { paths, data_dir };
    // One thread for async work, the daemon included: its work is I/O bound,
    // and one thread saves the cross-thread wake-ups that would dominate its
    // latency (see ARCHITECTURE.md). Blocking work has threads of its own.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return output::fail(&anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Init(args) => commands::init::execute(&context, args),
            Command::Up(args) => commands::up::execute(&context, args).await,
            Command::Id(args) => commands::id::execute(&context, args).await,
            Command::Peers(args) => commands::peers::execute(&context, args).await,
            Command::Status(args) => commands::status::execute(&context, args).await,
            Command::Run(args) => commands::run::execute(&context, args).await,
            Command::Tasks(args) => commands::tasks::execute(&context, args).await,
            Command::Demo(args) => commands::demo::execute(args).await,
            Command::Worker(_) => unreachable!("handled above"),
        }
    });
    // Do not wait for stray blocking tasks (a stdin reader) at exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => output::fail(&e),
    }
}

/// Refuses a data directory that exists as something else (a file), which
/// every command would otherwise trip over with a less direct error.
fn check_data_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    match std::fs::metadata(dir) {
        Ok(meta) if !meta.is_dir() => anyhow::bail!(
            "cannot use {} as the data directory: it is not a directory",
            dir.display()
        ),
        _ => Ok(()),
    }
}

fn init_logging(daemon: bool) {
    // The daemon says what spare does; its libraries only warn, and libp2p
    // only errs: its warnings are caused by peers at will (a stream dropped
    // at capacity, a gossip message with a bad signature), one line each,
    // and spare logs what matters of them itself, within a budget. (A
    // target names the crates it starts: `libp2p` is every `libp2p_*`.)
    let default = if daemon {
        "warn,libp2p=error,spare=info"
    } else {
        "warn,libp2p=error"
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_refused_as_the_data_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("afile");
        std::fs::write(&file, b"").unwrap();
        let err = check_data_dir(&file).unwrap_err().to_string();
        assert!(
            err.ends_with("afile as the data directory: it is not a directory"),
            "{err}"
        );
        assert!(check_data_dir(dir.path()).is_ok());
        assert!(check_data_dir(&dir.path().join("new")).is_ok());
    }
}

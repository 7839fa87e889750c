//! The daemon's life: `spare init` and `spare up`.

use std::io::Write;
use std::os::unix::io::AsRawFd;

use libp2p::PeerId;
use spare_net::Transport;
use spare_runtime::WorkerCommand;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, TEMPLATE};
use crate::node::{Node, NodeOptions};
use crate::paths::Paths;
use crate::{NodeError, api, identity};

/// What `spare init` did.
#[derive(Debug)]
pub struct InitReport {
    pub peer_id: PeerId,
    /// False when the node already existed; nothing was overwritten.
    pub created_key: bool,
    pub created_config: bool,
}

/// Creates the node's directories, key and config file, keeping whatever
/// already exists.
pub fn init(paths: &Paths) -> Result<InitReport, NodeError> {
    private_files();
    paths.create_dirs().map_err(|e| NodeError::Io {
        what: format!("cannot create {}", paths.data_dir.display()),
        source: e,
    })?;
    let (key, created_key) = identity::load_or_create(&paths.key)?;
    let created_config = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&paths.config)
    {
        Ok(mut file) => {
            file.write_all(TEMPLATE.as_bytes())
                .map_err(|e| NodeError::Io {
                    what: format!("cannot write {}", paths.config.display()),
                    source: e,
                })?;
            true
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(e) => {
            return Err(NodeError::Io {
                what: format!("cannot create {}", paths.config.display()),
                source: e,
            });
        }
    };
    Ok(InitReport {
        peer_id: key.public().to_peer_id(),
        created_key,
        created_config,
    })
}

/// Makes every file this process creates from now on private to its user:
/// blobs, the database, the API socket (created private, not made private
/// after the fact).
fn private_files() {
    // SAFETY: umask only sets the process's file mode mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// Lets the daemon open as many files as the system allows it (the hard
/// limit), not the 1 024 a login shell usually starts with: its peers'
/// connections (256, and 64 being set up each way), blob fetches and
/// reads, the database and its workers' pipes all hold descriptors.
/// Returns the limit now in force.
fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limits into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 0;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit reads the limits from the struct it is given;
        // raising the soft limit up to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            return raised.rlim_cur;
        }
    }
    limit.rlim_cur
}

/// Everything `spare up` needs.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub paths: Paths,
    pub config: Config,
    pub worker: WorkerCommand,
}

/// Runs the daemon in the foreground until SIGINT, SIGTERM or SIGHUP.
pub async fn run(options: DaemonOptions) -> Result<(), NodeError> {
    let DaemonOptions {
        paths,
        config,
        worker,
    } = options;
    init(&paths)?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    paths.check_owner(euid).map_err(NodeError::Ownership)?;
    let _lock = lock(&paths)?;
    tracing::debug!(open_files = raise_open_files(), "file descriptor limit");
    let (key, _) = identity::load_or_create(&paths.key)?;
    let shutdown = CancellationToken::new();
    let node = Node::start(
        NodeOptions {
            paths: paths.clone(),
            config,
            key,
            worker,
            transport: Transport::TcpQuic,
        },
        shutdown.clone(),
    )
    .await?;
    let listener = match api::bind(&paths.socket) {
        Ok(listener) => listener,
        Err(e) => {
            // Its workers and their control groups go with it.
            node.shutdown().await;
            node.release();
            return Err(NodeError::Io {
                what: format!("cannot serve the API on {}", paths.socket.display()),
                source: e,
            });
        }
    };
    announce(&node, &paths);
    let app = api::router(node.clone());
    let server = axum::serve(listener, app);
    tokio::select! {
        result = server => {
            if let Err(e) = result {
                tracing::error!("API server stopped: {e}");
            }
        }
        () = signal() => tracing::info!("shutting down"),
    }
    node.shutdown().await;
    node.release();
    let _ = std::fs::remove_file(&paths.socket);
    Ok(())
}

/// Tells the person who started the daemon where it is.
fn announce(node: &Node, paths: &Paths) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "spare node {}", node.peer_id());
    for addr in node.net().listen_addrs() {
        let _ = writeln!(out, "  listening on {addr}");
    }
    let _ = writeln!(out, "  control API on {}", paths.socket.display());
    if let Some(p) = node.pool().priority() {
        let _ = writeln!(
            out,
            "  {} worker(s) at {:?} priority, nice {}, idle I/O {}",
            node.config().slots(),
            p.policy,
            p.nice,
            if p.idle_io { "yes" } else { "no" }
        );
    }
    let _ = out.flush();
}

/// Resolves when the daemon is asked to stop: Ctrl-C, `SIGTERM`, or
/// `SIGHUP` (the terminal of a foreground `spare up` closed), each a clean
/// shut-down. A `SIGHUP` the daemon was started ignoring (`nohup spare up`)
/// stays ignored.
async fn signal() {
    use tokio::signal::unix::{Signal, SignalKind, signal};
    async fn next(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let term = signal(SignalKind::terminate()).ok();
    let hang_up = if ignored(libc::SIGHUP) {
        None
    } else {
        signal(SignalKind::hangup()).ok()
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = next(term) => {}
        () = next(hang_up) => {}
    }
}

/// Whether this process was started with `signal` ignored, as `nohup`
/// does for `SIGHUP`: catching it then would undo what was asked.
pub fn ignored(signal: libc::c_int) -> bool {
    // SAFETY: with a null new action, sigaction only reads the current one
    // into `current`, which is zeroed and valid for the call.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(signal, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// Holds an exclusive lock on the data directory for the daemon's life.
fn lock(paths: &Paths) -> Result<std::fs::File, NodeError> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&paths.lock)
        .map_err(|e| NodeError::Io {
            what: format!("cannot open {}", paths.lock.display()),
            source: e,
        })?;
    // SAFETY: flock only takes the descriptor of a file we own and an integer.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(NodeError::Locked(paths.data_dir.display().to_string()));
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_one() {
        let raised = raise_open_files();
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as in `raise_open_files`.
        let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(read, 0);
        assert_eq!(raised, limit.rlim_cur);
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }

    use super::*;

    /// `nohup` starts a program with `SIGHUP` ignored; the daemon sees it
    /// and leaves it so.
    #[test]
    fn a_signal_started_ignored_is_seen_as_ignored() {
        // SIGWINCH's default is to be ignored by the kernel, but not with
        // SIG_IGN: nothing else in this test binary uses it.
        assert!(!ignored(libc::SIGWINCH));
        // SAFETY: sets SIGWINCH's disposition for this test process only.
        let previous = unsafe { libc::signal(libc::SIGWINCH, libc::SIG_IGN) };
        assert!(ignored(libc::SIGWINCH));
        // SAFETY: puts back what was there.
        unsafe { libc::signal(libc::SIGWINCH, previous) };
        assert!(!ignored(libc::SIGWINCH));
    }
}

//! Real spare daemons in temporary directories, for multi-process tests,
//! benchmarks and `spare demo`.
//!
//! A [`Daemon`] is a `spare up` child process on loopback with mDNS off (so
//! concurrent test swarms never find each other), its own data directory,
//! and its log in `daemon.log` there. A [`Swarm`] is several of them joined
//! through the first one. Dropping either kills its processes.
//!
//! Deliberately synchronous and free of the daemon's own crates: it talks to
//! the daemon the way an outsider would, over the API socket with plain
//! HTTP/1.1.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

pub mod vm;

/// A file of the source tree's `examples/` (the sample and hostile guests),
/// for tests and benchmarks run from a checkout.
pub fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .display()
        .to_string()
}

/// Fields of `/proc/<pid>/stat` after the command name: the state letter
/// (`R`, `S`, `T`, `Z`, …), and user + system CPU time in clock ticks.
/// `None` once the process is gone.
pub fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: the fields start
    // after its last `)`.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// Output of a command as text, for assertions and their messages.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// How long a daemon may take to start answering its API.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One `spare up` process.
#[derive(Debug)]
pub struct Daemon {
    /// Its data directory.
    pub dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
    peer_id: String,
    addr: String,
}

impl Daemon {
    /// Starts `bin --data-dir dir up` on a free loopback TCP port, with
    /// `extra` flags, and waits until its API answers.
    ///
    /// Unless `extra` says `--idle-only`, the daemon gives `--always`:
    /// daemons that share one machine would each take the others' guests
    /// for their owner's load and pause.
    pub fn start(bin: &Path, dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_as(bin, dir, extra, Tie::Loose)
    }

    fn start_as(bin: &Path, dir: &Path, extra: &[&str], tie: Tie) -> Result<Self> {
        let mut args = vec!["up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"];
        if !extra.contains(&"--idle-only") {
            args.push("--always");
        }
        args.extend_from_slice(extra);
        Self::spawn(bin, dir, &[], &args, tie)
    }

    /// Starts `wrapper... bin --data-dir dir args...` (a wrapper such as
    /// `ip netns exec <name>` runs the daemon elsewhere) and waits until its
    /// API answers.
    pub fn start_with(bin: &Path, dir: &Path, wrapper: &[&str], args: &[&str]) -> Result<Self> {
        Self::spawn(bin, dir, wrapper, args, Tie::Loose)
    }

    fn spawn(bin: &Path, dir: &Path, wrapper: &[&str], args: &[&str], tie: Tie) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("daemon.log"))?;
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut command = Command::new(program);
                command.args(rest).arg(bin);
                command
            }
            None => Command::new(bin),
        };
        if tie == Tie::ToThread {
            die_with_this_thread(&mut command);
        }
        let child = command
            .arg("--data-dir")
            .arg(dir)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let mut daemon = Self {
            dir: dir.to_path_buf(),
            bin: bin.to_path_buf(),
            child: Some(child),
            peer_id: String::new(),
            addr: String::new(),
        };
        let deadline = Instant::now() + START_TIMEOUT;
        let info = loop {
            if let Some(status) = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "daemon in {} exited with {status}:\n{}",
                    dir.display(),
                    daemon.log()
                );
            }
            match daemon.get("/v1/node") {
                Ok(info) => break info,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => bail!(
                    "daemon in {} did not start: {e}\n{}",
                    dir.display(),
                    daemon.log()
                ),
            }
        };
        daemon.peer_id = info["peer_id"].as_str().unwrap_or_default().to_owned();
        daemon.addr = info["listen_addrs"][0]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if daemon.peer_id.is_empty() || daemon.addr.is_empty() {
            bail!(
                "daemon in {} reported no id or address: {info}",
                dir.display()
            );
        }
        Ok(daemon)
    }

    pub fn peer_id(&self) -> &str {
        &self.peer_id
    }

    /// Its first listen address, with `/p2p/<peer id>`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The daemon's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A `spare --data-dir <dir>` command to run a CLI verb against it.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(&self.bin);
        command.arg("--data-dir").arg(&self.dir);
        command
    }

    /// Runs the CLI verb `args` against it as a user would, feeding it
    /// `stdin` (then closing it), and collects what it printed.
    pub fn run_cli(&self, args: &[&str], stdin: &[u8]) -> Result<Output> {
        let mut child = self
            .cli()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot run spare {}", args.join(" ")))?;
        let mut pipe = child.stdin.take().context("no stdin pipe")?;
        // Written beside the reading of the output, so that neither side
        // waits on a full pipe. A command that exits without reading all of
        // its input closes the pipe early; what it printed is still the
        // answer.
        let output = std::thread::scope(|scope| {
            scope.spawn(move || {
                let _ = pipe.write_all(stdin);
            });
            child.wait_with_output()
        })?;
        Ok(output)
    }

    /// GETs an API path and parses the JSON answer.
    pub fn get(&self, path: &str) -> Result<Value> {
        let mut stream = UnixStream::connect(self.socket())?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: spare\r\nConnection: close\r\n\r\n"
        )?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response);
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| anyhow!("malformed HTTP response"))?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
        }
        Ok(serde_json::from_str(body)?)
    }

    /// Peers this daemon sees with an offer.
    pub fn peers_with_offers(&self) -> Result<Vec<String>> {
        let peers = self.get("/v1/peers")?;
        Ok(peers
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|p| !p["offer"].is_null())
                    .filter_map(|p| p["peer_id"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Waits until at least `n` peers with offers are connected.
    pub fn wait_for_peers(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.peers_with_offers().unwrap_or_default();
            if found.len() >= n {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} sees {} peer(s) with offers, expected {n}\n{}",
                    self.peer_id,
                    found.len(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Pids of its worker processes.
    pub fn worker_pids(&self) -> Result<Vec<u32>> {
        let info = self.get("/v1/node")?;
        Ok(info["workers"]
            .as_array()
            .map(|w| {
                w.iter()
                    .filter_map(|w| w["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Kills the daemon with SIGKILL, as a crash would, and its workers.
    pub fn kill(&mut self) {
        let workers = self.worker_pids().unwrap_or_default();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in workers {
            // SAFETY: kill only takes integers; a pid that already exited is harmless.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// Stops the daemon with SIGTERM and waits for it.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill only takes integers.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            child.wait()?;
        }
        Ok(())
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        // Lossy: the daemon may be halfway through writing a character.
        let log = std::fs::read(self.dir.join("daemon.log")).unwrap_or_default();
        String::from_utf8_lossy(&log).into_owned()
    }
}

impl Drop for Daemon {
    /// Stops the daemon as `spare up` is meant to be stopped, so it cleans
    /// up after itself (its workers' control groups); kills it if it does
    /// not exit within a few seconds.
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SAFETY: kill only takes integers.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    self.child = None;
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.kill();
    }
}

/// Several daemons, joined through the first.
#[derive(Debug)]
pub struct Swarm {
    pub nodes: Vec<Daemon>,
    /// Holds the data directories until the swarm is dropped.
    _dir: Option<tempfile::TempDir>,
    root: PathBuf,
}

impl Swarm {
    /// Starts `n` daemons of `bin` in a fresh temporary directory, each
    /// contributing `cores` cores, and waits until every one sees all the
    /// others with offers.
    pub fn start(bin: &Path, n: usize, cores: u16) -> Result<Self> {
        Self::start_as(bin, n, cores, Tie::Loose)
    }

    /// As [`Swarm::start`], but the daemons are sent `SIGTERM` when the
    /// thread that calls this ends, however it ends (even when its process
    /// is killed with `SIGKILL`): for a caller whose daemons must not
    /// outlive it, on a thread that lives as long as the swarm.
    pub fn start_tied(bin: &Path, n: usize, cores: u16) -> Result<Self> {
        Self::start_as(bin, n, cores, Tie::ToThread)
    }

    fn start_as(bin: &Path, n: usize, cores: u16, tie: Tie) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("spare-swarm-").tempdir()?;
        let root = dir.path().to_path_buf();
        let mut swarm = Self::start_in_as(bin, &root, n, cores, tie)?;
        swarm._dir = Some(dir);
        Ok(swarm)
    }

    /// As [`Swarm::start`], in `root`, which is kept afterwards.
    pub fn start_in(bin: &Path, root: &Path, n: usize, cores: u16) -> Result<Self> {
        Self::start_in_as(bin, root, n, cores, Tie::Loose)
    }

    fn start_in_as(bin: &Path, root: &Path, n: usize, cores: u16, tie: Tie) -> Result<Self> {
        let cores = cores.to_string();
        let mut nodes: Vec<Daemon> = Vec::with_capacity(n);
        for i in 0..n {
            let name = char::from(b'a' + (i % 26) as u8).to_string();
            let mut extra = vec!["--cores", &cores];
            let bootstrap;
            if let Some(first) = nodes.first() {
                bootstrap = first.addr().to_owned();
                extra.extend(["--bootstrap", &bootstrap]);
            }
            nodes.push(Daemon::start_as(bin, &root.join(name), &extra, tie)?);
        }
        for node in &nodes {
            node.wait_for_peers(n - 1, Duration::from_secs(30))?;
        }
        Ok(Self {
            nodes,
            _dir: None,
            root: root.to_path_buf(),
        })
    }

    /// The directory holding the nodes' data directories.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// Whether a daemon ends with the thread that started it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tie {
    /// It runs until it is stopped (dropping its [`Daemon`] does).
    Loose,
    /// The kernel sends it `SIGTERM` when the starting thread ends.
    ToThread,
}

/// Has the kernel send `command`'s process `SIGTERM` when the calling
/// thread ends (`PR_SET_PDEATHSIG`).
fn die_with_this_thread(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: getpid only reads the process id.
    let parent = unsafe { libc::getpid() };
    // SAFETY: between fork and exec the closure only makes two system
    // calls, both async-signal-safe, and allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before the line above: then no
            // signal would come.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Gives this test process, and the processes it starts from now on, the
/// default `SIGHUP` disposition, as a program started from a terminal has:
/// a test run under `nohup` (which ignores it, and passes that on) would
/// otherwise see spare, rightly, leave hang-ups ignored.
pub fn hang_ups_as_from_a_terminal() {
    // SAFETY: sets one signal's disposition to the default; no handler.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_DFL);
    }
}

//! The setting of the owner benchmarks: a host daemon contributing every
//! core of this machine, a requester daemon that keeps those cores busy
//! with guests pinned to the host, and the means to fill and empty the
//! host and wait for its state.
//!
//! Both daemons and this process run on the machine being measured; the
//! host counts the requester's and this process's CPU as the owner's. So
//! everything here polls gently: the host's API every 50 ms, `/proc` only
//! where a latency is being timed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use serde_json::Value;
use spare_core::{BlobRef, LimitRequest, Limits};
use spare_node::api::client::Client;
use spare_node::api::types::{CancelReply, Placement, Submission, SubmitStdin, TaskEvent};
use spare_testkit::Daemon;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::procfs;
use crate::Env;

/// Cores the host contributes: all of them on the benchmark machine.
pub(crate) const HOST_CORES: u16 = 2;
/// The cool-down the host waits, quiet, before resuming guests: short, so
/// that trials follow each other quickly.
pub(crate) const COOL_DOWN: &str = "1s";
/// The cool-down of a host left at its default settings.
pub(crate) const DEFAULT_COOL_DOWN: &str = "10s";
/// How often the host's API is polled while waiting for a state.
const POLL: Duration = Duration::from_millis(50);
/// Longest wait for the host to reach a state.
const WAIT: Duration = Duration::from_secs(60);
/// Longest wait for the machine to be quiet: someone else's build can take
/// a while.
const QUIET_WAIT: Duration = Duration::from_secs(1800);
/// Owner CPU use below which the machine counts as quiet, in cores (the
/// host's owner threshold).
const QUIET_CORES: f64 = 0.25;
/// How long it must have been quiet.
const QUIET_FOR: Duration = Duration::from_secs(1);

/// Whether the host pauses its guests for the owner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// `--idle-only`, the default: pause when the owner is busy.
    IdleOnly,
    /// `--always`: never pause; only `SCHED_IDLE` stands between the
    /// guests and the owner.
    Always,
}

impl Mode {
    pub(crate) fn flag(self) -> &'static str {
        match self {
            Self::IdleOnly => "--idle-only",
            Self::Always => "--always",
        }
    }
}

/// The guest that keeps a core busy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Guest {
    /// `examples/hostile/loop.wasm`: increments a counter forever (CPU
    /// only, one cache line).
    Loop,
    /// [`MEMCOPY_WASM`]: copies 64 MiB within its memory forever, at the
    /// speed of the host's `memmove` (memory bandwidth).
    MemCopy,
}

impl Guest {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Loop => "loop.wasm",
            Self::MemCopy => "memcopy.wasm",
        }
    }

    fn bytes(self, env: &Env) -> Result<Vec<u8>> {
        Ok(match self {
            Self::Loop => std::fs::read(env.example("hostile/loop.wasm"))?,
            Self::MemCopy => MEMCOPY_WASM.to_vec(),
        })
    }
}

/// A guest that fills the first 64 MiB of its 128 MiB memory once, then
/// copies them to the second half forever:
///
/// ```wat
/// (module
///   (memory (export "memory") 2048)
///   (func (export "_start")
///     (memory.fill (i32.const 0) (i32.const 0x5a) (i32.const 0x4000000))
///     (loop $l
///       (memory.copy (i32.const 0x4000000) (i32.const 0) (i32.const 0x4000000))
///       (br $l))))
/// ```
///
/// Assembled by hand so that no WebAssembly toolchain is needed.
pub(crate) const MEMCOPY_WASM: &[u8] = &[
    0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
    0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // types: () -> ()
    0x03, 0x02, 0x01, 0x00, // functions: one of type 0
    0x05, 0x04, 0x01, 0x00, 0x80, 0x10, // memories: min 2048 pages
    0x07, 0x13, 0x02, // exports: two
    0x06, b'm', b'e', b'm', b'o', b'r', b'y', 0x02, 0x00, // "memory" = memory 0
    0x06, b'_', b's', b't', b'a', b'r', b't', 0x00, 0x00, // "_start" = func 0
    0x0a, 0x26, 0x01, 0x24, 0x00, // code: one body of 36 bytes, no locals
    0x41, 0x00, 0x41, 0xda, 0x00, 0x41, 0x80, 0x80, 0x80, 0x20, // 0, 0x5a, 64 MiB
    0xfc, 0x0b, 0x00, // memory.fill
    0x03, 0x40, // loop
    0x41, 0x80, 0x80, 0x80, 0x20, 0x41, 0x00, 0x41, 0x80, 0x80, 0x80,
    0x20, // 64 MiB, 0, 64 MiB
    0xfc, 0x0a, 0x00, 0x00, // memory.copy
    0x0c, 0x00, // br 0
    0x0b, 0x0b, // end loop, end function
];

/// A task running on the host, and the stream that waits for its end.
#[derive(Debug)]
struct Task {
    id: String,
    stream: JoinHandle<Result<String>>,
}

/// Host and requester daemons, and the guests running between them.
#[derive(Debug)]
pub(crate) struct Rig {
    pub(crate) host: Daemon,
    /// Kept for its lifetime: dropping it stops the daemon.
    _requester: Daemon,
    client: Client,
    runtime: Runtime,
    tasks: Vec<Task>,
    guest: Option<Guest>,
    pub(crate) slots: usize,
    mode: Mode,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Starts the host (every core, `mode`, a cool-down of `cool_down`) and
    /// the requester, connected.
    pub(crate) fn start(env: &Env, mode: Mode, cool_down: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("spare-owner-").tempdir()?;
        let host_dir = dir.path().join("host");
        std::fs::create_dir_all(&host_dir)?;
        std::fs::write(
            host_dir.join("config.toml"),
            format!("[when]\nowner_threshold = \"25%\"\ncool_down = \"{cool_down}\"\n"),
        )?;
        let cores = HOST_CORES.to_string();
        // The testkit gives `--always` unless told `--idle-only`.
        let mut flags = vec!["--cores", cores.as_str()];
        if mode == Mode::IdleOnly {
            flags.push(mode.flag());
        }
        let host = Daemon::start(&env.spare, &host_dir, &flags)?;
        let requester = Daemon::start(
            &env.spare,
            &dir.path().join("requester"),
            &["--cores", "1", "--bootstrap", host.addr()],
        )?;
        requester.wait_for_peers(1, WAIT)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let client = Client::new(&requester.socket(), "spare up".into());
        let slots = host.get("/v1/status")?["slots"].as_u64().unwrap_or(0) as usize;
        ensure!(slots == usize::from(HOST_CORES), "host has {slots} slots");
        Ok(Self {
            host,
            _requester: requester,
            client,
            runtime,
            tasks: Vec::new(),
            guest: None,
            slots,
            mode,
            _dir: dir,
        })
    }

    pub(crate) fn status(&self) -> Result<Value> {
        self.host.get("/v1/status")
    }

    /// Pauses the host has made since it started.
    pub(crate) fn pauses(&self) -> Result<u64> {
        Ok(self.status()?["pauses"].as_u64().unwrap_or(0))
    }

    /// The reasons the host gave for the pauses it logged after the first
    /// `skip` bytes of its log, and where its last whole line ends now:
    /// what made a host pause while the benchmark had the owner away.
    pub(crate) fn pause_reasons(&self, skip: usize) -> (Vec<String>, usize) {
        let log = self.host.log();
        // Whole lines only: the next call starts where this one ended, at
        // the start of a line, whatever the daemon was writing meanwhile.
        let seen = log.get(skip..).unwrap_or_default();
        let whole = seen.rfind('\n').map_or(0, |end| end + 1);
        let reasons = seen[..whole]
            .lines()
            .filter_map(|line| line.split_once("guests paused: "))
            .map(|(_, why)| why.to_owned())
            .collect();
        (reasons, skip + whole)
    }

    /// How the host enforces its limits, for the report.
    pub(crate) fn enforcement(&self) -> String {
        let status = self.status().unwrap_or_default();
        let policy = self
            .host
            .get("/v1/node")
            .map(|n| n["worker_policy"].as_str().unwrap_or("?").to_owned())
            .unwrap_or_default();
        format!(
            "{}, workers {policy}",
            status["enforcement"]["mechanism"].as_str().unwrap_or("?")
        )
    }

    /// Gets the host ready for a trial on a quiet machine: with `guest` on
    /// every slot, running (returns the workers' pids), or with no guest.
    pub(crate) fn ready(&mut self, guest: Option<Guest>, env: &Env) -> Result<Vec<u32>> {
        match guest {
            Some(guest) => {
                self.fill(guest, env)?;
                self.wait_quiet()?;
                self.wait_running()
            }
            None => {
                self.empty()?;
                self.wait_quiet()?;
                Ok(Vec::new())
            }
        }
    }

    /// Makes sure every slot of the host runs `guest` and that the guests
    /// are running (not paused), and returns the workers' pids.
    pub(crate) fn fill(&mut self, guest: Guest, env: &Env) -> Result<Vec<u32>> {
        if self.guest != Some(guest) {
            self.empty()?;
        }
        if self.tasks.is_empty() {
            self.wait_quiet()?;
            let submission = self.submission(guest, env)?;
            for _ in 0..self.slots {
                self.tasks.push(self.submit(submission.clone())?);
            }
            self.guest = Some(guest);
        }
        self.wait_running()
    }

    /// Waits until the host gives, every slot runs a task and every worker
    /// has a thread running; returns the workers' pids.
    pub(crate) fn wait_running(&mut self) -> Result<Vec<u32>> {
        let deadline = Instant::now() + QUIET_WAIT;
        let mut next_note = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(i) = self.tasks.iter().position(|t| t.stream.is_finished()) {
                let ended = self.tasks.remove(i);
                let why = self.runtime.block_on(ended.stream)??;
                bail!("guest task {} ended: {why}\n{}", ended.id, self.host.log());
            }
            let status = self.status()?;
            let slots = self.slots as u64;
            if status["state"] == "giving" && status["running"].as_u64() == Some(slots) {
                let pids = self.host.worker_pids()?;
                if pids.len() == self.slots && procfs::each_running(&pids) {
                    return Ok(pids);
                }
            }
            if Instant::now() > deadline {
                bail!("the guests are not running: {status}");
            }
            if Instant::now() > next_note {
                next_note += Duration::from_secs(30);
                eprintln!("  waiting for the guests to run: {}", status["reason"]);
            }
            std::thread::sleep(POLL);
        }
    }

    /// Cancels every guest and waits until the host runs none, and a
    /// little longer for the replacement workers to settle.
    pub(crate) fn empty(&mut self) -> Result<()> {
        if self.tasks.is_empty() {
            return Ok(());
        }
        for task in std::mem::take(&mut self.tasks) {
            let path = format!("/v1/tasks/{}/cancel", task.id);
            let client = self.client.clone();
            let reply: CancelReply = self
                .runtime
                .block_on(async move { client.post(&path, &()).await })?;
            ensure!(reply.cancelled, "task {} was not running", task.id);
            let ended = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(30), task.stream).await
            });
            ensure!(ended.is_ok(), "task {} did not end when cancelled", task.id);
        }
        self.guest = None;
        self.wait_until("the host runs no guest", |s| s["running"] == 0)?;
        // Not waiting for the killed workers' replacements: the pool may
        // not replace them all (see BENCHMARKS.md); the next task starts
        // the missing ones itself.
        // The replacement workers start up (wasmtime, the module cache).
        std::thread::sleep(Duration::from_millis(500));
        Ok(())
    }

    /// Waits until the machine has been quiet (owner below a quarter core,
    /// and the host giving) for a second, however long that takes: trials
    /// start only on a machine left alone.
    pub(crate) fn wait_quiet(&self) -> Result<()> {
        let start = Instant::now();
        let mut quiet_since: Option<Instant> = None;
        let mut next_note = start + Duration::from_secs(30);
        loop {
            let status = self.status()?;
            let owner = status["owner_cores"].as_f64().unwrap_or(f64::INFINITY);
            let giving = self.mode == Mode::Always || status["state"] == "giving";
            let now = Instant::now();
            if owner < QUIET_CORES && giving {
                let since = *quiet_since.get_or_insert(now);
                if now.duration_since(since) >= QUIET_FOR {
                    return Ok(());
                }
            } else {
                quiet_since = None;
            }
            if now > start + QUIET_WAIT {
                bail!("the machine was not quiet for {QUIET_WAIT:?}: {status}");
            }
            if now > next_note {
                next_note += Duration::from_secs(30);
                eprintln!(
                    "  waiting for a quiet machine: the owner uses {owner:.2} cores ({})",
                    status["reason"]
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Polls the host's status until `done` holds.
    pub(crate) fn wait_until(&self, what: &str, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.status()?;
            if done(&status) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting until {what}: {status}");
            }
            std::thread::sleep(POLL);
        }
    }

    fn submission(&self, guest: Guest, env: &Env) -> Result<Submission> {
        let bytes = guest.bytes(env)?;
        let module = BlobRef::of(&bytes);
        let client = self.client.clone();
        let path = format!("/v1/blobs/{}", module.id);
        self.runtime
            .block_on(async move { client.put(&path, Bytes::from(bytes)).await })?;
        Ok(Submission {
            name: guest.name().into(),
            module,
            args: vec![],
            env: vec![],
            stdin: SubmitStdin::None,
            // Runs until cancelled: far more fuel and time than a benchmark.
            limits: LimitRequest {
                fuel: Some(Limits::MAX.fuel),
                wall_ms: Some(3_600_000),
                ..LimitRequest::default()
            },
            placement: Placement::On(self.host.peer_id().to_owned()),
        })
    }

    /// Submits a task and returns once the requester has accepted it; a
    /// background task follows its stream to the end.
    fn submit(&self, submission: Submission) -> Result<Task> {
        let client = self.client.clone();
        let (accepted, id) = oneshot::channel();
        let stream = self.runtime.spawn(async move {
            let mut events = client.post_stream("/v1/tasks", &submission).await?;
            let mut accepted = Some(accepted);
            loop {
                match events.next::<TaskEvent>().await? {
                    Some(TaskEvent::Accepted { task }) => {
                        if let Some(tx) = accepted.take() {
                            let _ = tx.send(task);
                        }
                    }
                    Some(TaskEvent::Finished { result }) => {
                        return Ok(format!(
                            "finished: exit {:?}, {}",
                            result.exit_code,
                            result.failure.unwrap_or_default()
                        ));
                    }
                    Some(TaskEvent::Failed { error }) => return Ok(format!("failed: {error}")),
                    Some(_) => {}
                    None => return Ok("stream ended".into()),
                }
            }
        });
        let id = self
            .runtime
            .block_on(id)
            .context("the requester did not accept the guest task")?;
        Ok(Task { id, stream })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memcopy_guest_is_valid_webassembly() {
        let engine = wasmtime::Engine::default();
        let module = wasmtime::Module::new(&engine, MEMCOPY_WASM).expect("valid module");
        let exports: Vec<_> = module.exports().map(|e| e.name().to_owned()).collect();
        assert_eq!(exports, ["memory", "_start"]);
    }
}

//! The daemon's side of the workers: a fixed number of slots, warm worker
//! processes, and the watchdog that kills one when its task is cancelled or
//! overruns.
//!
//! Cancel-safety: dropping the future returned by [`WorkerPool::run`] kills
//! the worker it was using (its `Child` is `kill_on_drop`), so a job never
//! keeps running for a requester that has gone.
//!
//! Tenancy: a worker runs the jobs of one [`Tenant`] only (the owner, or
//! one requester of the swarm). A job takes the worker its tenant used
//! last, or a fresh one; without either, a worker is started for it, and
//! another tenant's idle worker is killed to make room. A guest that took
//! over its worker through a flaw in wasmtime therefore never sees another
//! tenant's jobs, their inputs or their outputs. So that a change of tenant
//! does not wait for a worker to start, the pool keeps one fresh worker in
//! reserve beyond a worker for every slot, started again in the background
//! whenever a job takes it ([`WorkerPool::replenish`]).

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use spare_core::{BlobId, Failure, Limits, Outcome, Status};
use tokio::io::BufReader;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;

use crate::Job;
use crate::confine::ConfineReport;
use crate::ipc::{
    FromWorker, MAX_READY_FRAME, ToWorker, read_frame_async, result_bound, write_frame_async,
};
use crate::priority::PriorityReport;
use crate::stop::{WorkerState, signal, stopped_and_ticks, transition};

/// Extra time beyond a job's wall-time limit before the pool kills its
/// worker: covers compiling a large module, which the guest's own clock
/// does not count. No honest host reports more wall time than the limit
/// and this.
pub const WATCHDOG_GRACE: Duration = Duration::from_secs(30);
/// How long a new worker may take to say it is ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often workers that should be running are sent `SIGCONT` again. A
/// resume can be lost: one that lands while a worker's `SIGTSTP` handler
/// has not yet stopped the worker (`stop.rs`) finds it running, and the
/// handler then stops it for good. `SIGCONT` to a running process does
/// nothing.
const RESUME_AGAIN: Duration = Duration::from_secs(1);
/// For this long after a worker is resumed from a pause, the window in
/// which its handler may still stop it, it is sent `SIGCONT` again at every
/// call of [`WorkerPool::set_state`] (the governor's readings, 20 to 50 ms
/// apart), not only every [`RESUME_AGAIN`]: a lost resume then costs a
/// reading, not a second.
const RESUME_CLOSELY: Duration = Duration::from_millis(500);
/// A worker told to pause stops itself (its `SIGTSTP` handler, see
/// `stop.rs`), so one taken over by its guest could ignore the pause. One
/// still running this long after it was told, that has meanwhile used more
/// than [`PAUSE_CPU_ALLOWANCE`] of CPU time, is stopped with `SIGSTOP`. (One
/// merely starved of CPU, as a worker at idle priority is on a busy
/// machine, uses none, and stops itself once it gets some.)
const PAUSE_CHECK: Duration = Duration::from_millis(100);
/// CPU time, in clock ticks (1/100 s), a worker may use after being told to
/// pause: its handler takes microseconds.
const PAUSE_CPU_ALLOWANCE: u64 = 5;

/// How long a cancelled job's worker has to stop its guest and report what
/// it used before it is killed (a paused worker cannot, and is killed). A
/// worker at `SCHED_IDLE` on a busy machine may wait a while for the CPU.
const CANCEL_GRACE: Duration = Duration::from_secs(3);
/// How long a killed worker may take to exit before the pool stops waiting
/// for it (the runtime reaps it later).
const REAP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the compiler may take over one module (pauses included)
/// before it is killed; a later job of the module asks again.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// Modules waiting for the compiler at most; more are not cached, this
/// time.
const MAX_COMPILES_WAITING: usize = 64;

/// Whose jobs a worker runs: it never runs another's (see the module's
/// documentation).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tenant {
    /// The machine's owner (`spare run --local`).
    Owner,
    /// A requester of the swarm, by the identity the daemon gives.
    Requester(String),
}

/// What a job finds among the idle workers (`take_idle`).
enum Idle {
    /// The one its tenant used last.
    Own(Worker),
    /// A fresh one: the reserve, or one never used.
    Fresh(Worker),
    /// None, and another tenant's to kill to make room for one.
    Retire(Worker),
    /// None, and room for one.
    None,
}

/// How sending a job to a worker, or waiting for its answer, ended.
enum Waited<T> {
    Done(T),
    /// Cancelled, and the worker did not finish in time.
    Cancelled,
    Watchdog,
}

/// How to start a worker process.
#[derive(Clone, Debug)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

/// The pool's shape.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub command: WorkerCommand,
    /// Jobs that run at once: the cores this node contributes.
    pub slots: usize,
    /// Files each new worker's pid is written to before it gets a job: the
    /// `cgroup.procs` of the control groups workers run in. A worker that
    /// cannot join is not used.
    pub join: Vec<PathBuf>,
}

/// A snapshot of the pool's load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolStats {
    pub slots: usize,
    /// Jobs running, the owner's own among them.
    pub running: usize,
    pub queued: usize,
    /// The owner's own jobs running: neither paused nor throttled.
    pub owner_running: usize,
}

/// Runs jobs in worker processes, at most `slots` at a time; the rest wait.
#[derive(Clone, Debug)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: PoolConfig,
    /// One permit per slot.
    slots: Semaphore,
    /// The owner's own jobs have slots of their own, as many: the swarm's
    /// work (running, or paused and holding its slot) never delays them.
    owner_slots: Semaphore,
    /// Warm workers not running a job.
    idle: Mutex<Vec<Worker>>,
    running: AtomicUsize,
    queued: AtomicUsize,
    owner_running: AtomicUsize,
    /// What the most recent worker obtained when lowering its priority.
    priority: Mutex<Option<PriorityReport>>,
    /// What the most recent worker could take from itself.
    confinement: Mutex<Option<ConfineReport>>,
    /// Pids of live workers, for status and tests.
    pids: Pids,
    /// The state the workers were last put in, and how long they have been
    /// stopped, so the watchdog does not count it.
    state: Mutex<StateClock>,
    /// Whether new jobs may start (not while paused).
    open: watch::Sender<bool>,
    /// Workers running the owner's own jobs, which are never stopped.
    exempt: Mutex<HashSet<u32>>,
    /// Pids of live compilers (`compile`): governed like the workers, but
    /// not workers.
    compilers: Pids,
    /// Pids of workers started but not yet ready: not yet governed, but
    /// their CPU time is spare's, not the owner's.
    starting: Pids,
    /// Whether a fresh worker is being started for the reserve.
    reserving: AtomicBool,
    /// Modules waiting for the compiler or being compiled.
    compiling: Mutex<HashSet<BlobId>>,
    /// One compiler at a time.
    compile_turn: Semaphore,
}

#[derive(Debug)]
struct StateClock {
    state: WorkerState,
    stopped_since: Option<Instant>,
    stopped_before: Duration,
    /// When the workers that should run were last told to (see
    /// [`RESUME_AGAIN`]).
    resumed: Instant,
    /// Until when they are told again at every call (see
    /// [`RESUME_CLOSELY`]): set when a pause ends, and when an owner's job
    /// takes a paused worker.
    closely_until: Instant,
    /// The workers told to pause that have not been seen stopped yet, with
    /// the CPU time each had used then, and when to look (see
    /// [`PAUSE_CHECK`]).
    pausing: Vec<(u32, u64)>,
    look_at: Instant,
}

impl StateClock {
    /// Notes that paused workers were just sent `SIGCONT`.
    fn resuming_from_pause(&mut self) {
        let now = Instant::now();
        self.resumed = now;
        self.closely_until = now + RESUME_CLOSELY;
    }
}

impl StateClock {
    fn stopped(&self) -> Duration {
        self.stopped_before + self.stopped_since.map_or(Duration::ZERO, |t| t.elapsed())
    }
}

type Pids = Arc<Mutex<Vec<u32>>>;

#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    /// Jobs sent to this worker so far: the number of the current one,
    /// which a cancel names (`stop::cancel`).
    jobs: u64,
    /// Whose jobs it runs; `None` until its first.
    tenant: Option<Tenant>,
    /// The pool's list of live pids, which this worker leaves when dropped
    /// (and killed, by `kill_on_drop`).
    pids: Pids,
}

impl Worker {
    /// Takes the worker off the list the governor signals, before it is
    /// reaped: once reaped, its pid may be another program's.
    fn unlist(&self) {
        self.pids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|p| *p != self.pid);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.unlist();
    }
}

/// Why the pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("cannot start worker process {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("worker process did not start: {0}")]
    Startup(String),
}

impl WorkerPool {
    /// Starts the pool with every slot's worker warm.
    pub async fn start(config: PoolConfig) -> Result<Self, PoolError> {
        let slots = config.slots.max(1);
        let pool = Self {
            inner: Arc::new(Inner {
                config,
                slots: Semaphore::new(slots),
                owner_slots: Semaphore::new(slots),
                idle: Mutex::new(Vec::new()),
                running: AtomicUsize::new(0),
                queued: AtomicUsize::new(0),
                owner_running: AtomicUsize::new(0),
                priority: Mutex::new(None),
                confinement: Mutex::new(None),
                pids: Pids::default(),
                state: Mutex::new(StateClock {
                    state: WorkerState::Run,
                    stopped_since: None,
                    stopped_before: Duration::ZERO,
                    resumed: Instant::now(),
                    closely_until: Instant::now(),
                    pausing: Vec::new(),
                    look_at: Instant::now(),
                }),
                open: watch::Sender::new(true),
                exempt: Mutex::new(HashSet::new()),
                compilers: Pids::default(),
                starting: Pids::default(),
                reserving: AtomicBool::new(false),
                compiling: Mutex::new(HashSet::new()),
                compile_turn: Semaphore::new(1),
            }),
        };
        for _ in 0..slots {
            let worker = pool.spawn().await?;
            pool.inner.lock_idle().push(worker);
        }
        Ok(pool)
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            slots: self.slots(),
            running: self.inner.running.load(Ordering::Relaxed),
            queued: self.inner.queued.load(Ordering::Relaxed),
            owner_running: self.inner.owner_running.load(Ordering::Relaxed),
        }
    }

    /// The priority the workers run at.
    pub fn priority(&self) -> Option<PriorityReport> {
        *self
            .inner
            .priority
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// What the workers could take from themselves (`confine/`).
    pub fn confinement(&self) -> Option<ConfineReport> {
        self.inner
            .confinement
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Process ids of the live workers.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.inner.lock_pids().clone()
    }

    /// Process ids of the live workers that pauses and throttling stop:
    /// all but those running the owner's own jobs.
    pub fn governed_pids(&self) -> Vec<u32> {
        let exempt = self.inner.lock_exempt();
        let mut pids = self.worker_pids();
        pids.retain(|p| !exempt.contains(p));
        pids.extend(self.inner.lock_compilers().iter());
        pids
    }

    /// Process ids of every process the pool runs for the swarm or the
    /// owner: the workers, those starting, and the compiler.
    pub fn spare_pids(&self) -> Vec<u32> {
        let mut pids = self.worker_pids();
        pids.extend(self.inner.lock_starting().iter());
        pids.extend(self.inner.lock_compilers().iter());
        // A worker becoming ready is listed twice for a moment.
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// The state the workers are in.
    pub fn state(&self) -> WorkerState {
        self.inner.lock_state().state
    }

    /// Puts every live worker in `state` (see [`crate::stop`]): stops or
    /// resumes them with signals, and holds new jobs back while paused.
    /// Safe to call from any thread, as often as a duty cycle needs.
    pub fn set_state(&self, state: WorkerState) {
        let mut clock = self.inner.lock_state();
        if clock.state == state {
            let now = Instant::now();
            if now < clock.closely_until || now >= clock.resumed + RESUME_AGAIN {
                clock.resumed = now;
                let exempt = self.inner.lock_exempt();
                let pids = self.inner.lock_pids();
                let compilers = self.inner.lock_compilers();
                let running = pids
                    .iter()
                    .filter(|pid| state == WorkerState::Run || exempt.contains(pid))
                    .chain(compilers.iter().filter(|_| state == WorkerState::Run));
                for pid in running {
                    signal(*pid, libc::SIGCONT);
                }
            }
            if state == WorkerState::Pause && !clock.pausing.is_empty() && now >= clock.look_at {
                self.stop_the_unstopped(&mut clock);
            }
            return;
        }
        let signals = transition(clock.state, state);
        if !signals.is_empty() {
            let exempt = self.inner.lock_exempt();
            // Held while signalling: a worker leaves this list (under its
            // lock) before it is reaped, so no pid signalled here can be
            // another program's.
            let pids = self.inner.lock_pids();
            for pid in pids.iter().filter(|pid| !exempt.contains(pid)) {
                for &s in signals {
                    signal(*pid, s);
                }
            }
            // Those still running are looked at again (see `PAUSE_CHECK`).
            clock.pausing.clear();
            if state == WorkerState::Pause {
                clock.pausing = pids
                    .iter()
                    .filter(|pid| !exempt.contains(pid))
                    .filter_map(|&pid| match stopped_and_ticks(pid) {
                        Some((false, ticks)) => Some((pid, ticks)),
                        _ => None,
                    })
                    .collect();
                clock.look_at = Instant::now() + PAUSE_CHECK;
            }
            for pid in self.inner.lock_compilers().iter() {
                signal(*pid, compiler_signal(state));
            }
        }
        if (clock.state, state) == (WorkerState::Pause, WorkerState::Run) {
            clock.resuming_from_pause();
        }
        match (clock.stopped_since, state) {
            (None, WorkerState::Pause | WorkerState::Throttle) => {
                clock.stopped_since = Some(Instant::now());
            }
            (Some(since), WorkerState::Run) => {
                clock.stopped_before += since.elapsed();
                clock.stopped_since = None;
            }
            _ => {}
        }
        clock.state = state;
        drop(clock);
        self.inner.open.send_replace(state != WorkerState::Pause);
    }

    /// Stops with `SIGSTOP` each worker told to pause that still runs and has
    /// used CPU since (see [`PAUSE_CHECK`]); forgets those seen stopped,
    /// ended, or running the owner's job since.
    fn stop_the_unstopped(&self, clock: &mut StateClock) {
        let exempt = self.inner.lock_exempt();
        // Held while signalling, as in `set_state`.
        let pids = self.inner.lock_pids();
        clock.pausing.retain(|&(pid, told_at)| {
            if exempt.contains(&pid) || !pids.contains(&pid) {
                return false;
            }
            match stopped_and_ticks(pid) {
                Some((false, ticks)) if ticks.saturating_sub(told_at) > PAUSE_CPU_ALLOWANCE => {
                    signal(pid, libc::SIGSTOP);
                    tracing::warn!(pid, "a worker ran on when told to pause: stopped by force");
                    false
                }
                Some((false, _)) => true,
                Some((true, _)) | None => false,
            }
        });
        clock.look_at = Instant::now() + PAUSE_CHECK;
    }

    /// Stops taking jobs and kills the idle workers, waiting for them to
    /// exit (so their control group empties). Running jobs end when their
    /// cancellation token fires. Blocking, briefly.
    pub fn close(&self) {
        self.inner.slots.close();
        self.inner.owner_slots.close();
        self.inner.compile_turn.close();
        self.set_state(WorkerState::Run);
        // Listed until their task reaps them, so each pid is still theirs.
        for pid in self.inner.lock_compilers().iter() {
            signal(*pid, libc::SIGKILL);
        }
        // Listed until they are ready or have failed, and reaped only then.
        for pid in self.inner.lock_starting().iter() {
            signal(*pid, libc::SIGKILL);
        }
        let idle: Vec<Worker> = std::mem::take(&mut *self.inner.lock_idle());
        for mut worker in idle {
            let _ = worker.child.start_kill();
            let pid = worker.pid;
            drop(worker);
            // The child was killed; reap it so it leaves its group at once.
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: waitpid on our own child writes nothing we pass.
                unsafe {
                    libc::waitpid(pid, std::ptr::null_mut(), 0);
                }
            }
        }
    }

    /// Total time the workers have been stopped.
    fn stopped(&self) -> Duration {
        self.inner.lock_state().stopped()
    }

    /// Resolves once the workers have been running (not stopped) for
    /// `allowed` since `started`, when they had been stopped for
    /// `stopped_before` in all.
    async fn after_running_for(
        &self,
        allowed: Duration,
        started: Instant,
        stopped_before: Duration,
    ) {
        loop {
            let due = started + allowed + self.stopped().saturating_sub(stopped_before);
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }

    /// Runs `job` for `requester` (any string that tells requesters apart:
    /// the daemon gives their peer ids), waiting for a free slot first, in
    /// a worker that has run no other requester's jobs. Resolves early with
    /// [`Failure::Cancelled`] when `cancel` fires.
    pub async fn run(
        &self,
        job: Job,
        requester: impl Into<String>,
        cancel: CancellationToken,
    ) -> Outcome {
        let tenant = Tenant::Requester(requester.into());
        self.run_as(job, tenant, cancel).await
    }

    /// Runs a job of the machine's owner (`spare run --local`): like
    /// [`WorkerPool::run`], but neither a pause nor the CPU duty cycle stops
    /// it, since those keep the swarm's work out of the owner's way, and it
    /// runs in a worker that has run none of the swarm's jobs.
    pub async fn run_for_owner(&self, job: Job, cancel: CancellationToken) -> Outcome {
        self.run_as(job, Tenant::Owner, cancel).await
    }

    async fn run_as(&self, job: Job, tenant: Tenant, cancel: CancellationToken) -> Outcome {
        let owner = tenant == Tenant::Owner;
        let _queued = Gauge::up(&self.inner.queued);
        let mut open = self.inner.open.subscribe();
        tokio::select! {
            biased;
            () = cancel.cancelled() => return Outcome::failed(Failure::Cancelled),
            _ = open.wait_for(|open| *open || owner) => {}
        }
        let permit = tokio::select! {
            biased;
            () = cancel.cancelled() => return Outcome::failed(Failure::Cancelled),
            permit = if owner { &self.inner.owner_slots } else { &self.inner.slots }.acquire() => match permit {
                Ok(permit) => permit,
                Err(_) => return Outcome::failed(Failure::Host("worker pool closed".into())),
            },
        };
        drop(_queued);
        let _running = Gauge::up(&self.inner.running);
        let _owner = owner.then(|| Gauge::up(&self.inner.owner_running));
        let outcome = self.run_in_worker(job, tenant, &cancel).await;
        drop(permit);
        outcome
    }

    async fn run_in_worker(&self, job: Job, tenant: Tenant, cancel: &CancellationToken) -> Outcome {
        let owner = tenant == Tenant::Owner;
        let idle = match self.take_idle(&tenant) {
            Idle::Own(worker) => Some(worker),
            // The reserve is taken or short: the next tenant without a
            // worker finds one started meanwhile.
            Idle::Fresh(worker) => {
                self.replenish();
                Some(worker)
            }
            Idle::Retire(other) => {
                self.retire(other);
                self.replenish();
                None
            }
            Idle::None => {
                self.replenish();
                None
            }
        };
        let (mut worker, exempt) = match idle {
            Some(worker) => {
                let exempt = owner.then(|| Exempt::new(self, worker.pid));
                (worker, exempt)
            }
            None => match self.spawn_as(owner).await {
                Ok(started) => started,
                Err(e) => return Outcome::failed(Failure::Host(e.to_string())),
            },
        };
        // From its first job on, whatever the job does to it.
        worker.tenant = Some(tenant);
        let limits = job.limits;
        let allowed = Duration::from_millis(limits.wall_ms) + WATCHDOG_GRACE;
        let (started, stopped_before) = (Instant::now(), self.stopped());
        // Time the workers spent stopped moves the watchdog's deadline.
        let watchdog = self.after_running_for(allowed, started, stopped_before);
        tokio::pin!(watchdog);
        // A worker that stops reading (a compromised one may) would block
        // the write of a job larger than the pipe's buffer for good, holding
        // the slot: the write races the cancel and the watchdog too. It is
        // polled first, so a job that fits the pipe is always sent whole and
        // a cancel then reaches the worker the usual way.
        // For the compiler, should the worker not find the module compiled.
        let module = (job.module, job.module_path.clone(), limits.stack);
        let frame = ToWorker::Run(Box::new(job));
        worker.jobs += 1;
        let sent = tokio::select! {
            biased;
            sent = write_frame_async(&mut worker.stdin, &frame) => Waited::Done(sent),
            () = cancel.cancelled() => Waited::Cancelled,
            () = &mut watchdog => Waited::Watchdog,
        };
        match sent {
            Waited::Done(Ok(())) => {}
            Waited::Done(Err(e)) => {
                return self
                    .bury(worker, &format!("cannot send it the job: {e}"))
                    .await;
            }
            // Part of the job may be in its pipe: the worker is of no more use.
            Waited::Cancelled => {
                self.kill(worker).await;
                return Outcome::failed(Failure::Cancelled);
            }
            Waited::Watchdog => {
                let why = format!("it did not read the job within {allowed:?}");
                return self.bury(worker, &why).await;
            }
        }
        drop(frame);
        let waited = {
            // Kept across a cancel: the worker's answer may be half read.
            let read = read_frame_async::<FromWorker>(&mut worker.stdout, result_bound(&limits));
            tokio::pin!(read);
            tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    // Asked to, the worker stops its guest at once and reports
                    // the fuel it used; one that does not is killed.
                    crate::stop::cancel(worker.pid, worker.jobs);
                    match tokio::time::timeout(CANCEL_GRACE, &mut read).await {
                        Ok(reply) => Waited::Done(reply),
                        Err(_) => Waited::Cancelled,
                    }
                }
                () = &mut watchdog => Waited::Watchdog,
                reply = &mut read => Waited::Done(reply),
            }
        };
        let ran_for = started.elapsed();
        let reply = match waited {
            Waited::Done(reply) => reply,
            // It ran for a while (pauses not counted, as the guest's own
            // clock does not count them); the fuel it used died with it.
            Waited::Cancelled => {
                self.kill(worker).await;
                let stopped = self.stopped().saturating_sub(stopped_before);
                let ran = ran_for.saturating_sub(stopped).min(allowed);
                return Outcome {
                    wall_ms: u64::try_from(ran.as_millis()).unwrap_or(u64::MAX),
                    ..Outcome::failed(Failure::Cancelled)
                };
            }
            // The sandbox stops a guest at its wall-time limit and answers:
            // a worker silent this long was compiling a module too slowly
            // (at idle priority on a busy machine) or is stuck. Not the
            // guest's timeout, and another host may do better.
            Waited::Watchdog => {
                let why = format!(
                    "it did not answer within {} of the job (the wall-time limit and {} \
                     for compiling the module)",
                    spare_core::units::format_duration(allowed),
                    spare_core::units::format_duration(WATCHDOG_GRACE)
                );
                return self.bury(worker, &why).await;
            }
        };
        let (outcome, uncached) = match reply {
            Ok(FromWorker::Done(outcome)) => (outcome, false),
            Ok(FromWorker::Uncached(outcome)) => (outcome, true),
            Ok(FromWorker::Ready { .. }) => {
                return self.bury(worker, "it answered out of turn").await;
            }
            Err(e) => return self.bury(worker, &e.to_string()).await,
        };
        match check_outcome(&outcome, &limits, ran_for) {
            Ok(()) => {
                // Back among the governed before another job can take it,
                // or its exemption would end in that job's run.
                drop(exempt);
                self.give_back(worker);
                if uncached {
                    let (id, path, stack) = module;
                    self.compile_later(id, path, stack);
                }
                *outcome
            }
            Err(e) => {
                self.bury(worker, &format!("it sent an invalid result: {e}"))
                    .await
            }
        }
    }

    /// The command that starts a worker process, with `extra` arguments:
    /// no environment but `RUST_LOG`, its output and its stderr piped to
    /// the daemon (the stderr to be relayed, `relay.rs`), and tied to the
    /// daemon's life in a session of its own.
    fn command(&self, extra: &[OsString]) -> Command {
        let command = &self.inner.config.command;
        let mut spawning = Command::new(&command.program);
        spawning
            .args(&command.args)
            .args(extra)
            .env_clear()
            .envs(std::env::vars_os().filter(|(k, _)| k == "RUST_LOG"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let daemon = std::process::id();
        // SAFETY: the closure runs in the child between fork and exec and
        // calls only prctl, getppid, _exit and setsid, which are
        // async-signal-safe.
        unsafe {
            spawning.pre_exec(move || {
                die_with(daemon)?;
                // A session of its own, without the daemon's terminal: Ctrl-C
                // there reaches the daemon alone, which stops its workers in
                // order, and a worker taken over cannot type into the
                // owner's shell (TIOCSTI wants its own controlling terminal).
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        spawning
    }

    /// Starts a worker, in the state the others are in, and waits for its
    /// ready message.
    async fn spawn(&self) -> Result<Worker, PoolError> {
        Ok(self.spawn_as(false).await?.0)
    }

    /// Starts a worker; for an owner's job (`exempt`), running and out of
    /// pauses from the start, for as long as the hold returned with it.
    async fn spawn_as(&self, exempt: bool) -> Result<(Worker, Option<Exempt<'_>>), PoolError> {
        let command = &self.inner.config.command;
        let mut spawning = self.command(&[]);
        spawning.stdin(Stdio::piped());
        let mut child = spawning.spawn().map_err(|source| PoolError::Spawn {
            program: command.program.display().to_string(),
            source,
        })?;
        let (Some(stdin), Some(stdout), Some(stderr), Some(pid)) = (
            child.stdin.take(),
            child.stdout.take(),
            child.stderr.take(),
            child.id(),
        ) else {
            return Err(PoolError::Startup("no pipes to the worker".into()));
        };
        crate::relay::spawn(pid, stderr);
        let mut worker = Worker {
            child,
            stdin,
            stdout: BufReader::with_capacity(64 << 10, stdout),
            pid,
            jobs: 0,
            tenant: None,
            pids: Arc::clone(&self.inner.pids),
        };
        // Its start takes a few milliseconds of CPU, which the governor
        // must not take for the owner's. Off the list once ready or failed,
        // and before it is reaped (declared after the worker, so dropped
        // before it).
        let starting = Listed::new(&self.inner.starting, pid);
        for procs in &self.inner.config.join {
            if let Err(e) = std::fs::write(procs, pid.to_string()) {
                return Err(PoolError::Startup(format!(
                    "cannot move worker {pid} into {}: {e}",
                    procs.display()
                )));
            }
        }
        let hello = tokio::time::timeout(
            STARTUP_TIMEOUT,
            read_frame_async::<FromWorker>(&mut worker.stdout, MAX_READY_FRAME),
        )
        .await;
        match hello {
            Ok(Ok(FromWorker::Ready {
                priority,
                confinement,
            })) => {
                *self
                    .inner
                    .priority
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(priority);
                *self
                    .inner
                    .confinement
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = Some(confinement);
                // Among the live in the state the others are in: one started
                // during a pause (to replace a worker killed then, or for a
                // job that found none idle) must not run. One for an owner's
                // job is not stopped at all: a resume right after the pause
                // can reach it before its handler has stopped it, and leave
                // it stopped until the resume is sent again.
                let clock = self.inner.lock_state();
                let exempt = exempt.then(|| {
                    self.inner.lock_exempt().insert(pid);
                    Exempt { pool: self, pid }
                });
                self.inner.lock_pids().push(pid);
                drop(starting);
                if exempt.is_none() {
                    for &s in transition(WorkerState::Run, clock.state) {
                        signal(pid, s);
                    }
                }
                drop(clock);
                Ok((worker, exempt))
            }
            Ok(Ok(FromWorker::Done(_) | FromWorker::Uncached(_))) => {
                Err(PoolError::Startup("unexpected first message".into()))
            }
            Ok(Err(e)) => {
                drop(starting);
                // It may have died of what it wrote; if not, it is killed.
                let status = match tokio::time::timeout(REAP_TIMEOUT, worker.child.wait()).await {
                    Ok(status) => status.ok(),
                    Err(_) => {
                        let _ = worker.child.start_kill();
                        None
                    }
                };
                Err(PoolError::Startup(format!("{e} ({})", describe(status))))
            }
            Err(_) => Err(PoolError::Startup(format!(
                "no answer within {STARTUP_TIMEOUT:?}"
            ))),
        }
    }

    /// Has the compiler store `module` (at `path`) in the compiled-module
    /// cache, in the background, one module at a time: workers only read
    /// the cache, and one compiled it for a job without finding it there.
    /// A worker could claim that of any module; the compiler does nothing
    /// for one already there.
    fn compile_later(&self, module: BlobId, path: PathBuf, stack: u64) {
        {
            let mut compiling = self.inner.lock_compiling();
            if compiling.len() >= MAX_COMPILES_WAITING || !compiling.insert(module) {
                return;
            }
        }
        let pool = self.clone();
        tokio::spawn(async move {
            if let Ok(_turn) = pool.inner.compile_turn.acquire().await
                && let Err(e) = pool.compile(&module, &path, stack).await
            {
                tracing::warn!(%module, "cannot cache the compiled module: {e}");
            }
            pool.inner.lock_compiling().remove(&module);
        });
    }

    /// Runs the compiler, a worker process that runs no guest
    /// (`worker::compile`), on `module`, and waits for it to exit.
    async fn compile(&self, module: &BlobId, path: &Path, stack: u64) -> Result<(), String> {
        let extra: [OsString; 6] = [
            "--compile".into(),
            module.to_string().into(),
            "--module".into(),
            path.into(),
            "--stack".into(),
            stack.to_string().into(),
        ];
        let mut child = self
            .command(&extra)
            .spawn()
            .map_err(|e| format!("cannot start the compiler: {e}"))?;
        let (Some(pid), Some(mut stdout), Some(stderr)) =
            (child.id(), child.stdout.take(), child.stderr.take())
        else {
            return Err("no pipe to the compiler".into());
        };
        crate::relay::spawn(pid, stderr);
        for procs in &self.inner.config.join {
            if let Err(e) = std::fs::write(procs, pid.to_string()) {
                let _ = child.start_kill();
                let _ = tokio::time::timeout(REAP_TIMEOUT, child.wait()).await;
                return Err(format!(
                    "cannot move the compiler into {}: {e}",
                    procs.display()
                ));
            }
        }
        {
            // Governed like the workers, from the state they are in.
            let clock = self.inner.lock_state();
            self.inner.lock_compilers().push(pid);
            if clock.state != WorkerState::Run {
                signal(pid, compiler_signal(clock.state));
            }
        }
        // Closed while it started: `close` did not see it.
        if self.inner.compile_turn.is_closed() {
            let _ = child.start_kill();
        }
        // Time stopped by pauses does not count, as for a job's watchdog.
        let deadline = self.after_running_for(COMPILE_TIMEOUT, Instant::now(), self.stopped());
        // It writes nothing: its output ends when it exits, before it is
        // reaped, so its pid is its own while listed. Should it write, it
        // is read at the pace of a worker's stderr and thrown away.
        let ended = tokio::select! {
            read = crate::relay::relay(&mut stdout, |_| {}) => Ok(read),
            () = deadline => Err(()),
        };
        if ended.is_err() {
            let _ = child.start_kill();
        }
        self.inner.lock_compilers().retain(|p| *p != pid);
        let status = tokio::time::timeout(REAP_TIMEOUT, child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        match (ended, status) {
            (Ok(_), Some(status)) if status.success() => Ok(()),
            (Err(_), _) => Err(format!("the compiler took longer than {COMPILE_TIMEOUT:?}")),
            (Ok(_), status) => Err(format!("the compiler {}", describe(status))),
        }
    }

    /// An idle worker for a job of `tenant`: the one it used last, or else
    /// a fresh one. Without either, the worker to retire first if the pool
    /// has all its workers: another tenant's, idle longest.
    fn take_idle(&self, tenant: &Tenant) -> Idle {
        let full = self.live() >= self.most();
        let mut idle = self.inner.lock_idle();
        // Given back at the end: the last is the most recently used.
        if let Some(at) = idle.iter().rposition(|w| w.tenant.as_ref() == Some(tenant)) {
            return Idle::Own(idle.remove(at));
        }
        match idle.iter().rposition(|w| w.tenant.is_none()) {
            Some(at) => Idle::Fresh(idle.remove(at)),
            None if full && !idle.is_empty() => Idle::Retire(idle.remove(0)),
            None => Idle::None,
        }
    }

    /// Kills an idle worker to make room for another, reaping it in the
    /// background. Keeping a fresh one ready is [`WorkerPool::replenish`]'s
    /// business.
    fn retire(&self, mut worker: Worker) {
        let _ = worker.child.start_kill();
        // Out of the live list before it is reaped.
        worker.unlist();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(REAP_TIMEOUT, worker.child.wait()).await;
        });
    }

    async fn kill(&self, mut worker: Worker) {
        let _ = worker.child.start_kill();
        // Out of the live list before it is reaped, and before its
        // replacement is considered (or it is thought unneeded).
        worker.unlist();
        let _ = tokio::time::timeout(REAP_TIMEOUT, worker.child.wait()).await;
        drop(worker);
        self.replenish();
    }

    /// Starts a fresh worker in the background, unless one is idle or
    /// starting already: the reserve, for the next job of a tenant without
    /// a worker of its own, and the replacement of a worker that was
    /// killed. (A job that finds no idle worker starts one itself;
    /// `give_back` keeps the total at [`WorkerPool::most`] either way.)
    fn replenish(&self) {
        if self.inner.slots.is_closed() {
            return;
        }
        let live = self.live();
        {
            // With every worker running (the owner's jobs may take more
            // than the slots), one more would find no room.
            let idle = self.inner.lock_idle();
            let room = live < self.most() || idle.iter().any(|w| w.tenant.is_some());
            if !room || idle.iter().any(|w| w.tenant.is_none()) {
                return;
            }
        }
        if self.inner.reserving.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool = self.clone();
        tokio::spawn(async move {
            match pool.spawn().await {
                Ok(worker) => pool.give_back(worker),
                // `close` kills workers still starting.
                Err(_) if pool.inner.slots.is_closed() => {}
                Err(e) => tracing::warn!("cannot start a worker: {e}"),
            }
            // Only now: until it is idle, another call would start a second.
            pool.inner.reserving.store(false, Ordering::Release);
        });
    }

    /// Keeps `worker` warm for the next job. Beyond [`WorkerPool::most`]
    /// workers, the used one idle longest goes (a fresh one only when no
    /// used one is idle). A pool that is closed keeps none (dropping it
    /// kills it).
    fn give_back(&self, worker: Worker) {
        let excess = self.live().saturating_sub(self.most());
        let mut idle = self.inner.lock_idle();
        // Checked under the lock `close` empties the idle list under, after
        // closing the slots: a worker given back as the pool closes is
        // either killed by `close` or not kept.
        if self.inner.slots.is_closed() {
            drop(idle);
            drop(worker);
            return;
        }
        idle.push(worker);
        let evicted: Vec<Worker> = (0..excess)
            .filter_map(|_| {
                let at = (idle.iter().position(|w| w.tenant.is_some()))
                    .or_else(|| (!idle.is_empty()).then_some(0))?;
                Some(idle.remove(at))
            })
            .collect();
        drop(idle);
        for worker in evicted {
            self.retire(worker);
        }
    }

    /// Workers the pool keeps alive at most, running or idle: one for
    /// every slot, and a fresh one in reserve. (The owner's jobs may take
    /// as many more while they run.)
    fn most(&self) -> usize {
        self.slots() + 1
    }

    /// Worker processes alive now.
    fn live(&self) -> usize {
        self.inner.lock_pids().len()
    }

    fn slots(&self) -> usize {
        self.inner.config.slots.max(1)
    }

    /// Reaps a worker that failed and reports how it died.
    async fn bury(&self, mut worker: Worker, why: &str) -> Outcome {
        let _ = worker.child.start_kill();
        // Out of the live list before it is reaped, and before its
        // replacement is considered.
        worker.unlist();
        let status = tokio::time::timeout(REAP_TIMEOUT, worker.child.wait())
            .await
            .ok()
            .and_then(Result::ok);
        let pid = worker.pid;
        drop(worker);
        self.replenish();
        let mut detail = describe(status);
        if !why.is_empty() {
            detail = format!("{why} ({detail})");
        }
        tracing::warn!(pid, "worker lost: {detail}");
        Outcome::failed(Failure::WorkerCrashed(detail))
    }
}

impl Inner {
    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pids(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.pids.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, StateClock> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_exempt(&self) -> std::sync::MutexGuard<'_, HashSet<u32>> {
        self.exempt.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_starting(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.starting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_compilers(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.compilers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_compiling(&self) -> std::sync::MutexGuard<'_, HashSet<BlobId>> {
        self.compiling.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What stops a compiler, or resumes it, for workers going to `state`: it
/// runs no guest, whose clock a pause must keep (`stop.rs`), so `SIGSTOP`
/// does, which needs no handler and cannot be lost.
fn compiler_signal(state: WorkerState) -> libc::c_int {
    match state {
        WorkerState::Run => libc::SIGCONT,
        WorkerState::Pause | WorkerState::Throttle => libc::SIGSTOP,
    }
}

/// In a new worker, before it runs anything: the kernel kills it when the
/// thread that started it (the daemon's runtime thread) ends. A worker that
/// the governor stopped cannot notice its daemon dying; without this, a
/// daemon killed during a pause would leave its workers stopped for good,
/// holding their memory and their cgroup.
fn die_with(daemon: u32) -> std::io::Result<()> {
    // SAFETY: prctl with these options takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The daemon may have died before the request took effect.
    // SAFETY: getppid cannot fail.
    if u32::try_from(unsafe { libc::getppid() }).ok() != Some(daemon) {
        // SAFETY: _exit ends the child at once, as after a failed exec.
        unsafe { libc::_exit(1) };
    }
    Ok(())
}

/// Checks a worker's outcome against the job it was sent. A compromised
/// worker could claim anything, and the fuel and wall time are signed into
/// the requester's receipt, so an outcome no honest worker could produce
/// is refused: more fuel or output than the job's limits, more wall time
/// than passed here while it ran (the worker's clock starts after ours and
/// stops before, less its pauses), or a failure naming another limit.
fn check_outcome(outcome: &Outcome, limits: &Limits, ran_for: Duration) -> Result<(), String> {
    outcome.validate()?;
    if outcome.fuel > limits.fuel {
        return Err(format!(
            "it reported {} fuel used, above the job's limit of {}",
            outcome.fuel, limits.fuel
        ));
    }
    let ran_ms = u64::try_from(ran_for.as_millis()).unwrap_or(u64::MAX);
    if outcome.wall_ms > ran_ms {
        return Err(format!(
            "it reported {} ms of wall time, but the job ran for {ran_ms} ms",
            outcome.wall_ms
        ));
    }
    for (name, bytes) in [("stdout", &outcome.stdout), ("stderr", &outcome.stderr)] {
        if bytes.len() as u64 > limits.output {
            return Err(format!(
                "it reported {} bytes of {name}, above the job's limit of {}",
                bytes.len(),
                limits.output
            ));
        }
    }
    // The sandbox names the job's own limit in each failure that has one.
    let named = match &outcome.status {
        Status::Failed(Failure::OutOfFuel { limit }) => Some(("fuel", *limit, limits.fuel)),
        Status::Failed(Failure::MemoryLimit { limit }) => Some(("memory", *limit, limits.memory)),
        Status::Failed(Failure::StackOverflow { limit }) => Some(("stack", *limit, limits.stack)),
        Status::Failed(Failure::Timeout { limit_ms }) => {
            Some(("wall-time", *limit_ms, limits.wall_ms))
        }
        Status::Failed(Failure::OutputLimit { limit, .. }) => {
            Some(("output", *limit, limits.output))
        }
        _ => None,
    };
    if let Some((name, claimed, limit)) = named
        && claimed != limit
    {
        return Err(format!(
            "it reported a {name} limit of {claimed}, but the job's is {limit}"
        ));
    }
    Ok(())
}

fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exited with code {code}"),
            (None, Some(signal)) => format!("killed by signal {signal}"),
            (None, None) => "ended".into(),
        },
        None => "exit status unknown".into(),
    }
}

/// Keeps a worker out of pauses and throttling while it runs an owner's
/// job; afterwards the worker rejoins whatever state the pool is in.
struct Exempt<'a> {
    pool: &'a WorkerPool,
    pid: u32,
}

impl<'a> Exempt<'a> {
    fn new(pool: &'a WorkerPool, pid: u32) -> Self {
        let mut clock = pool.inner.lock_state();
        pool.inner.lock_exempt().insert(pid);
        // An idle worker is stopped along with the others.
        for &s in transition(clock.state, WorkerState::Run) {
            signal(pid, s);
        }
        if clock.state == WorkerState::Pause {
            clock.resuming_from_pause();
        }
        Self { pool, pid }
    }
}

impl Drop for Exempt<'_> {
    fn drop(&mut self) {
        let clock = self.pool.inner.lock_state();
        self.pool.inner.lock_exempt().remove(&self.pid);
        // A worker killed meanwhile has been reaped: its pid may be
        // another program's now. (Held while signalling, as in `set_state`.)
        let pids = self.pool.inner.lock_pids();
        if !pids.contains(&self.pid) {
            return;
        }
        for &s in transition(WorkerState::Run, clock.state) {
            signal(self.pid, s);
        }
    }
}

/// Keeps a pid in a list for as long as it lives.
struct Listed<'a> {
    pids: &'a Pids,
    pid: u32,
}

impl<'a> Listed<'a> {
    fn new(pids: &'a Pids, pid: u32) -> Self {
        pids.lock().unwrap_or_else(|p| p.into_inner()).push(pid);
        Self { pids, pid }
    }
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        let mut pids = self.pids.lock().unwrap_or_else(|p| p.into_inner());
        pids.retain(|p| *p != self.pid);
    }
}

/// Counts something for as long as it lives.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::path::Path;

    use spare_core::{BlobId, TaskId};

    use super::*;
    use crate::JobStdin;
    use crate::ipc::write_frame;
    use crate::priority::{CpuPolicy, PriorityReport};

    const READY: FromWorker = FromWorker::Ready {
        priority: PriorityReport {
            policy: CpuPolicy::Normal,
            nice: 0,
            idle_io: false,
        },
        confinement: ConfineReport {
            landlock_abi: 0,
            files: false,
            tcp: false,
            signals: false,
            sockets: false,
            privileges: false,
            notes: Vec::new(),
        },
    };

    /// A pool of one fake worker: a shell that writes `frames` to the
    /// daemon, then runs `then` with the daemon's pipe as its stdin.
    async fn fake_pool(dir: &Path, frames: &[FromWorker], then: &str) -> WorkerPool {
        fake_pool_running(dir, frames, &format!("cat \"$0\"; exec {then}")).await
    }

    /// A pool of one fake worker: a shell running `script`, in which `$0`
    /// is a file of `frames` to write to the daemon.
    async fn fake_pool_running(dir: &Path, frames: &[FromWorker], script: &str) -> WorkerPool {
        let path = dir.join("frames");
        let mut bytes = Vec::new();
        for frame in frames {
            write_frame(&mut bytes, frame).unwrap();
        }
        std::fs::write(&path, bytes).unwrap();
        WorkerPool::start(PoolConfig {
            command: WorkerCommand {
                program: "/bin/sh".into(),
                args: vec!["-c".into(), script.into(), path.into()],
            },
            slots: 1,
            join: vec![],
        })
        .await
        .unwrap()
    }

    fn job(args: Vec<String>) -> Job {
        Job {
            task: TaskId::random(),
            module: BlobId::of(b""),
            module_path: "/nonexistent.wasm".into(),
            name: "fake.wasm".into(),
            args,
            env: vec![],
            stdin: JobStdin::Bytes(vec![]),
            limits: Limits::DEFAULT,
        }
    }

    /// The state letter of process `pid` (`T` when stopped).
    fn process_state(pid: u32) -> char {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = &stat[stat.rfind(')').unwrap() + 1..];
        after.trim_start().chars().next().unwrap()
    }

    /// Calls `step` every 20 ms until `pid` is (or is not) stopped; false if
    /// it did not come to that within five seconds.
    async fn comes_to(pid: u32, stopped: bool, step: impl Fn()) -> bool {
        for _ in 0..250 {
            step();
            if (process_state(pid) == 'T') == stopped {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// A worker started while the others are paused (to replace one killed
    /// then, or for a job that found none idle) is paused too, and resumes
    /// with them.
    #[tokio::test]
    async fn a_worker_started_during_a_pause_is_stopped_with_the_others() {
        let dir = tempfile::tempdir().unwrap();
        // Like a real worker, it stops itself on SIGTSTP: in a session of
        // its own, it is an orphaned process group, whose members the
        // kernel does not stop for SIGTSTP by default.
        // The trap is set before it says it is ready, as a real worker's
        // handler is.
        let stops_itself = r#"trap 'kill -STOP $$' TSTP; cat "$0"; while :; do sleep 0.05; done"#;
        let pool = fake_pool_running(dir.path(), &[READY], stops_itself).await;
        pool.set_state(WorkerState::Pause);
        let late = pool.spawn().await.unwrap();
        assert!(
            comes_to(late.pid, true, || {}).await,
            "it runs during the pause"
        );
        pool.set_state(WorkerState::Run);
        assert!(comes_to(late.pid, false, || {}).await, "it stays stopped");
    }

    /// A worker started during a pause for an owner's job is never
    /// stopped, so no resume can come too early for its pause handler
    /// (this one stops itself between sleeps, within 50 ms of a SIGTSTP);
    /// it rejoins the pause when the owner's job is done.
    #[tokio::test]
    async fn a_worker_started_during_a_pause_for_the_owner_runs() {
        let dir = tempfile::tempdir().unwrap();
        let stops_itself = r#"trap 'kill -STOP $$' TSTP; cat "$0"; while :; do sleep 0.05; done"#;
        let pool = fake_pool_running(dir.path(), &[READY], stops_itself).await;
        pool.set_state(WorkerState::Pause);
        let (late, exempt) = pool.spawn_as(true).await.unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let state = process_state(late.pid);
            assert_ne!(state, 'T', "stopped for the owner's job");
        }
        drop(exempt);
        assert!(
            comes_to(late.pid, true, || {}).await,
            "paused with the others after it"
        );
    }

    /// The compiler is governed like the workers: one started during a
    /// pause is stopped at once (it has no pause handler: `SIGSTOP`), runs
    /// when they do, and is killed when the pool closes.
    #[tokio::test]
    async fn a_compiler_started_during_a_pause_is_stopped_with_the_workers() {
        let dir = tempfile::tempdir().unwrap();
        let script =
            r#"if [ "$1" = --compile ]; then exec sleep 600; fi; cat "$0"; exec sleep 600"#;
        let pool = fake_pool_running(dir.path(), &[READY], script).await;
        pool.set_state(WorkerState::Pause);
        pool.compile_later(BlobId::of(b"module"), "/nonexistent.wasm".into(), 1 << 20);
        let compiler = async {
            loop {
                if let Some(&pid) = pool.inner.lock_compilers().first() {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let pid = tokio::time::timeout(Duration::from_secs(10), compiler)
            .await
            .expect("the compiler started");
        assert!(pool.governed_pids().contains(&pid));
        assert!(!pool.worker_pids().contains(&pid), "not a worker");
        assert!(comes_to(pid, true, || {}).await, "it runs during the pause");
        pool.set_state(WorkerState::Run);
        assert!(comes_to(pid, false, || {}).await, "it stays stopped");
        pool.set_state(WorkerState::Throttle);
        assert!(comes_to(pid, true, || {}).await, "it runs while throttled");
        pool.close();
        let gone = async {
            while !pool.inner.lock_compilers().is_empty() || !pool.inner.lock_compiling().is_empty()
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), gone)
            .await
            .expect("the compiler was killed when the pool closed");
    }

    /// A worker's start is spare's CPU time, not the owner's: its pid is
    /// among spare's before it says it is ready, once afterwards.
    #[tokio::test]
    async fn a_starting_worker_is_among_spares_processes() {
        let dir = tempfile::tempdir().unwrap();
        // The first worker is ready at once; later ones once told.
        let script = r#"if [ -e "$0.slow" ]; then while [ ! -e "$0.go" ]; do sleep 0.01; done; fi
            cat "$0"; exec sleep 600"#;
        let pool = fake_pool_running(dir.path(), &[READY], script).await;
        let first = pool.worker_pids();
        std::fs::write(dir.path().join("frames.slow"), "").unwrap();
        let started = tokio::spawn({
            let pool = pool.clone();
            async move { pool.spawn().await }
        });
        let starting = async {
            loop {
                let spares = pool.spare_pids();
                if let Some(&pid) = spares.iter().find(|pid| !first.contains(pid)) {
                    return pid;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let pid = tokio::time::timeout(Duration::from_secs(10), starting)
            .await
            .expect("the starting worker is among spare's processes");
        assert_eq!(pool.worker_pids(), first, "not a worker before it is ready");
        std::fs::write(dir.path().join("frames.go"), "").unwrap();
        let ready = started.await.unwrap().unwrap();
        assert_eq!(ready.pid, pid);
        let mut all = [first[0], pid];
        all.sort_unstable();
        assert_eq!(pool.spare_pids(), all);
    }

    /// A worker that ignores a pause, as one taken over by its guest could,
    /// is stopped all the same once it has run on for a moment; one that
    /// ignores it but uses no CPU (as if starved of it) is left alone.
    #[tokio::test]
    async fn a_worker_that_runs_on_when_told_to_pause_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let spins = r#"trap '' TSTP; cat "$0"; while :; do :; done"#;
        let pool = fake_pool_running(dir.path(), &[READY], spins).await;
        let pid = pool.worker_pids()[0];
        pool.set_state(WorkerState::Pause);
        // As the governor does, every few milliseconds.
        let stopped = comes_to(pid, true, || pool.set_state(WorkerState::Pause)).await;
        assert!(stopped, "it runs on through the pause");
        pool.set_state(WorkerState::Run);
        assert!(comes_to(pid, false, || {}).await, "not resumed");

        let sleeps = r#"trap '' TSTP; cat "$0"; exec sleep 600"#;
        let dir = tempfile::tempdir().unwrap();
        let pool = fake_pool_running(dir.path(), &[READY], sleeps).await;
        let pid = pool.worker_pids()[0];
        pool.set_state(WorkerState::Pause);
        for _ in 0..25 {
            pool.set_state(WorkerState::Pause);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(process_state(pid), 'S', "stopped though it used no CPU");
    }

    /// A worker left stopped while the pool runs (a resume lost in the
    /// race with a worker's pause handler) is resumed within seconds.
    #[tokio::test]
    async fn a_worker_stopped_while_the_pool_runs_is_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let pool = fake_pool(dir.path(), &[READY], "sleep 600").await;
        let pid = pool.worker_pids()[0];
        signal(pid, libc::SIGSTOP);
        assert!(comes_to(pid, true, || {}).await);
        // As the governor does, every few milliseconds.
        let resumed = comes_to(pid, false, || pool.set_state(WorkerState::Run)).await;
        assert!(resumed, "left stopped");
    }

    /// A resume lost to a worker's pause handler right after a pause (here
    /// the handler's late stop is a plain `SIGSTOP`) is made good at the
    /// governor's next reading, not a second later: both when the pause
    /// ends and when an owner's job takes a paused worker.
    #[tokio::test]
    async fn a_resume_lost_right_after_a_pause_is_sent_again_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let pool = fake_pool(dir.path(), &[READY], "sleep 600").await;
        let pid = pool.worker_pids()[0];
        // Lets the regular repetition fire in `state`: the next is a second
        // away, so it cannot make good a resume lost within the test.
        let repeated_just_now = |state| {
            let pool = pool.clone();
            async move {
                tokio::time::sleep(RESUME_AGAIN).await;
                pool.set_state(state);
                pool.set_state(state);
            }
        };
        let readings = |state| {
            let pool = pool.clone();
            async move {
                let steps = Cell::new(0);
                let came = comes_to(pid, false, || {
                    steps.set(steps.get() + 1);
                    pool.set_state(state);
                });
                assert!(came.await, "left stopped");
                steps.get()
            }
        };

        repeated_just_now(WorkerState::Run).await;
        pool.set_state(WorkerState::Pause);
        pool.set_state(WorkerState::Run);
        signal(pid, libc::SIGSTOP);
        assert!(comes_to(pid, true, || {}).await);
        assert!(readings(WorkerState::Run).await <= 3, "resumed too late");

        repeated_just_now(WorkerState::Pause).await;
        let exempt = Exempt::new(&pool, pid);
        signal(pid, libc::SIGSTOP);
        assert!(comes_to(pid, true, || {}).await);
        assert!(readings(WorkerState::Pause).await <= 3, "resumed too late");
        drop(exempt);
    }

    /// A worker that never reads its stdin cannot hold a job larger than
    /// the pipe's buffer, and its slot, past the job's cancel.
    #[tokio::test]
    async fn a_worker_that_stops_reading_frees_its_slot_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let pool = fake_pool(dir.path(), &[READY], "sleep 600").await;
        let first = pool.worker_pids();
        let cancel = CancellationToken::new();
        let running = tokio::spawn({
            let (pool, cancel) = (pool.clone(), cancel.clone());
            // Far more than a pipe holds.
            async move { pool.run(job(vec!["x".repeat(1 << 20)]), "a", cancel).await }
        });
        while pool.stats().running == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        cancel.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the job ended on its cancel")
            .unwrap();
        assert_eq!(outcome, Outcome::failed(Failure::Cancelled));
        assert_eq!(pool.stats().running, 0);
        assert_eq!(pool.inner.slots.available_permits(), 1);
        // The worker, with half a job in its pipe, was killed; the fresh
        // one in reserve is left.
        for _ in 0..500 {
            let pids = pool.worker_pids();
            if pids.len() == 1 && pids != first {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("worker {first:?} not replaced: {:?}", pool.worker_pids());
    }

    /// A worker that claims more fuel than the job had is buried.
    #[tokio::test]
    async fn a_worker_claiming_absurd_fuel_is_buried() {
        let dir = tempfile::tempdir().unwrap();
        let mut lie = Outcome::failed(Failure::Cancelled);
        lie.status = Status::Exited(0);
        lie.fuel = u64::MAX;
        let done = FromWorker::Done(Box::new(lie));
        let pool = fake_pool(dir.path(), &[READY, done], "cat >/dev/null").await;
        let outcome = pool.run(job(vec![]), "a", CancellationToken::new()).await;
        match outcome.failure() {
            Some(Failure::WorkerCrashed(why)) => assert!(why.contains("fuel"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(pool.inner.slots.available_permits(), 1);
    }

    #[test]
    fn outcomes_are_checked_against_the_jobs_limits() {
        let limits = Limits::DEFAULT;
        let ran_for = Duration::from_millis(1500);
        let honest = Outcome {
            status: Status::Exited(0),
            stdout: vec![b'o'; limits.output as usize],
            stderr: vec![],
            fuel: limits.fuel,
            wall_ms: 1500,
        };
        assert_eq!(check_outcome(&honest, &limits, ran_for), Ok(()));
        let failed = |failure| Outcome {
            status: Status::Failed(failure),
            ..honest.clone()
        };
        let fuel_out = failed(Failure::OutOfFuel { limit: limits.fuel });
        assert_eq!(check_outcome(&fuel_out, &limits, ran_for), Ok(()));

        let lies = [
            (
                "fuel",
                Outcome {
                    fuel: u64::MAX,
                    ..honest.clone()
                },
            ),
            (
                "fuel",
                Outcome {
                    fuel: limits.fuel + 1,
                    ..honest.clone()
                },
            ),
            (
                "wall time",
                Outcome {
                    wall_ms: 1501,
                    ..honest.clone()
                },
            ),
            (
                "wall time",
                Outcome {
                    wall_ms: u64::MAX,
                    ..honest.clone()
                },
            ),
            (
                "stdout",
                Outcome {
                    stdout: vec![0; limits.output as usize + 1],
                    ..honest.clone()
                },
            ),
            (
                "stderr",
                Outcome {
                    stderr: vec![0; limits.output as usize + 1],
                    ..honest.clone()
                },
            ),
            ("fuel limit", failed(Failure::OutOfFuel { limit: u64::MAX })),
            ("wall-time limit", failed(Failure::Timeout { limit_ms: 1 })),
            (
                "memory limit",
                failed(Failure::MemoryLimit {
                    limit: limits.memory + 1,
                }),
            ),
        ];
        for (cause, lie) in lies {
            let err = check_outcome(&lie, &limits, ran_for).unwrap_err();
            assert!(err.contains(cause), "{cause}: {err}");
        }
    }
}

//! The worker process: `spare worker`, started by the daemon's pool.
//!
//! It lowers its own priority before creating any thread, then serves jobs
//! from its stdin one at a time and writes each outcome to its stdout. The
//! guest thread reads the jobs itself (no hand-off between threads on the
//! hot path); a watchdog thread only waits for the daemon to hang up, so the
//! worker exits at once when the daemon goes away, even in the middle of a
//! guest.
//!
//! `spare worker --compile` is the compiler: the same process, confined the
//! same way but for writing the compiled-module cache, which compiles one
//! module into it and exits, running no guest ([`compile`]).

use std::io::BufReader;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use spare_core::BlobId;

use crate::confine::{ConfineReport, Confinement, confine};
use crate::ipc::{FromWorker, MAX_JOB_FRAME, ToWorker, read_frame, write_frame};
use crate::priority::lower_own_priority;
use crate::sandbox::Sandbox;

/// Native stack of the thread that drives guests. Guests themselves run on
/// wasmtime's fiber stacks, sized per engine to their stack limit; this one
/// only carries the executor, compilation and host calls.
const EXECUTOR_STACK: usize = 8 << 20;

/// Runs the worker until the daemon closes its stdin, confined to
/// `confinement` (`confine/`), which should let it only read `cache_dir`:
/// it never writes there. Returns the process exit code.
pub fn main(cache_dir: Option<PathBuf>, confinement: &Confinement) -> i32 {
    let (priority, confinement) = settle(confinement);
    // Without the handler a pause would not stop it at all: in a session
    // of its own, its process group is orphaned, and the kernel drops a
    // SIGTSTP no one catches. A worker that cannot be paused does not run.
    if let Err(e) = crate::stop::install_pause_handler() {
        eprintln!("spare worker: cannot catch SIGTSTP, so pauses could not stop it: {e}");
        return 1;
    }
    if let Err(e) = crate::stop::install_cancel_handler() {
        eprintln!("spare worker: cannot catch SIGUSR1, cancelled guests will be killed: {e}");
    }

    let guest = std::thread::Builder::new()
        .name("guest".into())
        .stack_size(EXECUTOR_STACK)
        .spawn(move || {
            // The signal handlers run on another thread, never on a
            // guest's fiber stack.
            block_handled_signals();
            serve(cache_dir, priority, confinement)
        });
    let guest = match guest {
        Ok(guest) => guest,
        Err(e) => {
            eprintln!("spare worker: cannot start the guest thread: {e}");
            return 1;
        }
    };
    // The guest thread ends on a clean end of input or a broken pipe; the
    // watchdog ends the process if the daemon hangs up while a guest runs.
    let _ = std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(|| {
            wait_for_hang_up();
            std::process::exit(0);
        });
    guest.join().unwrap_or(1)
}

/// Reads jobs and answers them until the input ends.
fn serve(
    cache_dir: Option<PathBuf>,
    priority: crate::priority::PriorityReport,
    confinement: ConfineReport,
) -> i32 {
    // Only where the kernel keeps it from writing there (Landlock, with
    // truncation governed from ABI 3) does it load what is in the cache:
    // elsewhere a worker taken over could write it like any of the user's
    // files, and what it left would run in the next.
    let cache_dir = cache_dir.filter(|_| confinement.files && confinement.landlock_abi >= 3);
    let mut sandbox = Sandbox::reading(cache_dir);
    // Most jobs ask for the default stack. Should this fail, the job says why.
    if let Err(e) = sandbox.warm(spare_core::Limits::DEFAULT.stack) {
        eprintln!("spare worker: {e}");
    }
    let mut input = BufReader::new(std::io::stdin().lock());
    // Our own handle on fd 1: std's stdout is line-buffered and would split
    // a result at the first newline of the guest's output, costing a
    // write here and a wake-up in the daemon. A frame is encoded whole and
    // leaves in one write.
    let mut out = match std::io::stdout().as_fd().try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => {
            eprintln!("spare worker: cannot use stdout: {e}");
            return 1;
        }
    };
    let ready = FromWorker::Ready {
        priority,
        confinement,
    };
    if write_frame(&mut out, &ready).is_err() {
        return 1;
    }
    loop {
        match read_frame::<ToWorker>(&mut input, MAX_JOB_FRAME) {
            Ok(Some(ToWorker::Run(job))) => {
                // Cancels name their job: one that came before this job
                // was read still counts, one for the last job does not.
                crate::stop::begin_job();
                let outcome = Box::new(sandbox.run(&job));
                let done = if sandbox.missed_cache() {
                    FromWorker::Uncached(outcome)
                } else {
                    FromWorker::Done(outcome)
                };
                if write_frame(&mut out, &done).is_err() {
                    return 1;
                }
            }
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("spare worker: bad frame from the daemon: {e}");
                return 1;
            }
        }
    }
}

/// What every worker process does first: lower its priority, limit itself,
/// and confine itself, all before its first thread.
fn settle(confinement: &Confinement) -> (crate::priority::PriorityReport, ConfineReport) {
    let priority = lower_own_priority();
    limit_core_dumps();
    limit_open_files();
    offer_to_the_oom_killer();
    // After the last write to /proc, before the first thread.
    (priority, confine(confinement))
}

/// Compiles one module into the cache at `cache_dir`, and exits: the
/// daemon's compiler, a process that runs no guest, so that no guest that
/// broke out of wasmtime can write code that later workers load. Confined
/// like a worker, but with `cache_dir` writable. `stack` is the jobs'
/// stack limit, which the compiled code depends on. Returns the process
/// exit code.
pub fn compile(
    cache_dir: PathBuf,
    confinement: &Confinement,
    module: &BlobId,
    path: &Path,
    stack: u64,
) -> i32 {
    // Paused and throttled with `SIGSTOP`: it has no guest's clock to keep.
    let _ = settle(confinement);
    match Sandbox::new(Some(cache_dir)).compile(module, path, stack) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("spare worker: cannot compile module {module}: {e}");
            1
        }
    }
}

/// Blocks until the daemon's end of our stdin is closed.
fn wait_for_hang_up() {
    let fd = std::io::stdin().as_raw_fd();
    loop {
        // Asking for no events still reports POLLHUP and POLLERR, so this
        // wakes only when the daemon hangs up, never for pending input.
        let mut pfd = libc::pollfd {
            fd,
            events: 0,
            revents: 0,
        };
        // SAFETY: `pfd` is a valid pollfd for the duration of the call, and
        // the count of 1 matches it.
        let ready = unsafe { libc::poll(&mut pfd, 1, -1) };
        if ready > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
            return;
        }
    }
}

/// When memory runs out, the kernel should kill a worker before anything of
/// the owner's.
fn offer_to_the_oom_killer() {
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "1000") {
        eprintln!("spare worker: cannot raise its OOM score: {e}");
    }
}

/// Blocks `SIGTSTP` in the calling thread.
fn block_handled_signals() {
    // SAFETY: the set is initialised by sigemptyset before use and lives
    // across both calls; pthread_sigmask only changes this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTSTP);
        libc::sigaddset(&mut set, crate::stop::CANCEL_SIGNAL);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

/// Open files a worker may hold (module, cache entry, pipes, wasmtime's own).
/// Guests open no host files at all; this bounds a worker that misbehaves.
const MAX_OPEN_FILES: libc::rlim_t = 256;

fn limit_open_files() {
    let limit = libc::rlimit {
        rlim_cur: MAX_OPEN_FILES,
        rlim_max: MAX_OPEN_FILES,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    unsafe {
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// A crashing guest must not fill the disk with core dumps of wasmtime.
fn limit_core_dumps() {
    let none = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `none` is a valid rlimit for the duration of the call.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &none);
    }
}

//! Pausing workers, and keeping a paused guest's clock honest.
//!
//! When the machine's owner needs it, the daemon stops its workers. A plain
//! `SIGSTOP` would let the guest's wall-time limit run on while it cannot
//! run, so a guest paused for a minute would time out through no fault of
//! its own. Pauses therefore use `SIGTSTP`, which a worker catches: its
//! handler notes the time, stops the whole process with `SIGSTOP`, and when
//! `SIGCONT` resumes it adds the time spent stopped to [`paused`]. The
//! sandbox extends a guest's deadline by that much and reports wall time
//! without it.
//!
//! A throttle (the CPU duty cycle that enforces a CPU share without a
//! cgroup) sends `SIGSTOP` directly: like a cgroup's `cpu.max`, it is part
//! of the host's declared capacity and counts as wall time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Nanoseconds this process has spent paused by `SIGTSTP`.
static PAUSED_NS: AtomicU64 = AtomicU64::new(0);

/// Time this process has spent paused so far.
pub fn paused() -> Duration {
    Duration::from_nanos(PAUSED_NS.load(Ordering::Relaxed))
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; it is
    // async-signal-safe, so this may run inside the handler.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts);
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

extern "C" fn on_tstp(_signal: libc::c_int) {
    let stopped = monotonic_ns();
    // SAFETY: raise is async-signal-safe. SIGSTOP stops every thread of the
    // process; the call returns once SIGCONT resumes it.
    unsafe {
        libc::raise(libc::SIGSTOP);
    }
    let gap = monotonic_ns().saturating_sub(stopped);
    PAUSED_NS.fetch_add(gap, Ordering::Relaxed);
}

/// Installs the `SIGTSTP` handler. Called once by the worker at start.
pub fn install_pause_handler() -> std::io::Result<()> {
    install(libc::SIGTSTP, on_tstp)
}

/// Installs `handler` for `signal`, restarting interrupted system calls.
/// `handler` must only call async-signal-safe functions.
fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value,
    // and the handlers given here only touch atomics and call
    // async-signal-safe functions.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signal that asks a worker to stop its guest and report what it used
/// (fuel, output so far) instead of being killed. It carries the number of
/// the job to cancel (`sigqueue`), counted from 1 by both sides: a cancel
/// that reaches the worker before it has read its job, or after it has
/// answered, cannot be mistaken for one of another job.
pub(crate) const CANCEL_SIGNAL: libc::c_int = libc::SIGUSR1;

/// The job the daemon last asked to cancel; 0 for none.
static CANCEL_JOB: AtomicU64 = AtomicU64::new(0);
/// The job this worker runs or last ran; 0 before the first.
static CURRENT_JOB: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_cancel(_signal: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if info.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers;
    // reading its value field is a plain load.
    let job = unsafe { (*info).si_value().sival_ptr } as usize;
    CANCEL_JOB.store(job as u64, Ordering::Relaxed);
}

/// Whether the daemon asked this worker to cancel its current guest.
pub(crate) fn cancel_requested() -> bool {
    let current = CURRENT_JOB.load(Ordering::Relaxed);
    current != 0 && CANCEL_JOB.load(Ordering::Relaxed) == current
}

/// Counts a new job read from the daemon: cancels now concern it.
pub(crate) fn begin_job() {
    CURRENT_JOB.fetch_add(1, Ordering::Relaxed);
}

/// Asks worker `pid` to cancel its job number `job`.
pub(crate) fn cancel(pid: u32, job: u64) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let value = libc::sigval {
        sival_ptr: usize::try_from(job).unwrap_or(usize::MAX) as *mut libc::c_void,
    };
    // SAFETY: sigqueue takes integers and a sigval by value; pid is one of
    // our own children, and one that already ended is not an error.
    unsafe {
        libc::sigqueue(pid, CANCEL_SIGNAL, value);
    }
}

/// Installs the `CANCEL_SIGNAL` handler. Called once by the worker at
/// start.
pub fn install_cancel_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value,
    // and the handler only reads its siginfo and stores to an atomic.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_cancel as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(CANCEL_SIGNAL, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The state the daemon wants its workers in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum WorkerState {
    /// Running guests.
    Run,
    /// Stopped by the owner's need; the time does not count against guests.
    Pause,
    /// Stopped by the CPU duty cycle; the time counts as wall time.
    Throttle,
}

/// Sends `signal` to `pid`; a process that already ended is not an error.
pub(crate) fn signal(pid: u32, signal: libc::c_int) {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    // SAFETY: kill takes two integers; pid is one of our own children.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Whether process `pid` is stopped, and the CPU time it has used
/// (utime + stime, in clock ticks); `None` once it has ended.
pub(crate) fn stopped_and_ticks(pid: u32) -> Option<(bool, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold anything, parentheses too:
    // the state, then 10 fields before utime and stime.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    let state = fields.next()?;
    let mut times = fields.skip(10);
    let utime: u64 = times.next()?.parse().ok()?;
    let stime: u64 = times.next()?.parse().ok()?;
    Some((matches!(state, "T" | "t"), utime.saturating_add(stime)))
}

/// The signals that take a worker from one state to another, in order.
pub(crate) fn transition(from: WorkerState, to: WorkerState) -> &'static [libc::c_int] {
    use WorkerState::{Pause, Run, Throttle};
    match (from, to) {
        (Run, Pause) => &[libc::SIGTSTP],
        (Run, Throttle) => &[libc::SIGSTOP],
        (Pause | Throttle, Run) => &[libc::SIGCONT],
        // SIGCONT discards pending stop signals, so it must come first; the
        // worker then runs for the microseconds it takes to catch SIGTSTP.
        (Throttle, Pause) => &[libc::SIGCONT, libc::SIGTSTP],
        // Already stopped; the pause clock keeps running until SIGCONT.
        (Pause, Throttle) => &[],
        (Run, Run) | (Pause, Pause) | (Throttle, Throttle) => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_process_reads_as_stopped_with_its_cpu_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let (stopped, _) = stopped_and_ticks(child.id()).unwrap();
        assert!(!stopped);
        signal(child.id(), libc::SIGSTOP);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while stopped_and_ticks(child.id()).is_some_and(|(stopped, _)| !stopped) {
            assert!(
                std::time::Instant::now() < deadline,
                "never read as stopped"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(stopped_and_ticks(child.id()), None);
    }

    #[test]
    fn every_transition_ends_in_the_wanted_state() {
        use WorkerState::{Pause, Run, Throttle};
        for from in [Run, Pause, Throttle] {
            for to in [Run, Pause, Throttle] {
                let signals = transition(from, to);
                let stopped_after = match signals.last() {
                    Some(&s) => s != libc::SIGCONT,
                    None => from != Run,
                };
                assert_eq!(stopped_after, to != Run, "{from:?} -> {to:?}");
            }
        }
    }
}

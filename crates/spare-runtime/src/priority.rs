//! Lowering a worker to the lowest priority the OS has.
//!
//! A worker calls [`lower_own_priority`] before it starts any thread, so every
//! thread it later creates (wasmtime's compiler threads, the guest executor)
//! inherits the same policy. `SCHED_IDLE` runs only when no other thread
//! wants the core; where it is refused, nice +19 is the fallback. The I/O
//! priority goes to the idle class so the owner's disk access comes first.

use serde::{Deserialize, Serialize};

/// What the worker obtained, reported to the daemon and shown to the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorityReport {
    /// The CPU scheduling policy now in force.
    pub policy: CpuPolicy,
    /// The nice value now in force.
    pub nice: i32,
    /// Whether the idle I/O class was granted.
    pub idle_io: bool,
}

/// A CPU scheduling policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuPolicy {
    /// `SCHED_IDLE`: runs only when nothing else wants the core.
    Idle,
    /// `SCHED_BATCH` or `SCHED_OTHER`; then only the nice value lowers it.
    Normal,
}

/// `ioprio_set` arguments (linux/ioprio.h), not exported by the libc crate.
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;

/// Lowers the calling process to nice +19, `SCHED_IDLE` and the idle I/O
/// class, each as far as the OS allows, and reports what it got.
pub fn lower_own_priority() -> PriorityReport {
    // SAFETY: setpriority only reads its plain integer arguments; who = 0
    // means the calling process.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 19);
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param living across the call; pid 0 is
    // the calling thread, the only thread at this point.
    let idle = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0;
    let ioprio = IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT;
    // SAFETY: ioprio_set takes three integers and touches no memory of ours.
    let idle_io =
        unsafe { libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, ioprio) } == 0;
    PriorityReport {
        policy: if idle {
            CpuPolicy::Idle
        } else {
            current_policy()
        },
        nice: current_nice(),
        idle_io,
    }
}

fn current_policy() -> CpuPolicy {
    // SAFETY: sched_getscheduler only reads its integer argument.
    match unsafe { libc::sched_getscheduler(0) } {
        libc::SCHED_IDLE => CpuPolicy::Idle,
        _ => CpuPolicy::Normal,
    }
}

fn current_nice() -> i32 {
    // getpriority can legitimately return -1, so errno must be cleared first
    // and checked after.
    // SAFETY: __errno_location returns this thread's errno slot; writing 0 to
    // it is how POSIX says to prepare for getpriority.
    unsafe {
        *libc::__errno_location() = 0;
    }
    // SAFETY: getpriority only reads its integer arguments.
    unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) }
}

/// Reads the nice value and scheduling policy of process `pid` from
/// `/proc/<pid>/stat`, as an outside observer sees them.
pub fn read_proc_priority(pid: u32) -> std::io::Result<(i32, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces;
    // fields are counted after its closing parenthesis.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or_else(|| std::io::Error::other("malformed /proc stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name, field 3 (state) is index 0, so field N is index N - 3.
    let nice = fields
        .get(19 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::other("no nice field in /proc stat"))?;
    let policy = fields
        .get(41 - 3)
        .and_then(|f| f.parse().ok())
        .ok_or_else(|| std::io::Error::other("no policy field in /proc stat"))?;
    Ok((nice, policy))
}

/// `SCHED_IDLE` as `/proc/<pid>/stat` reports it.
pub const PROC_SCHED_IDLE: u32 = libc::SCHED_IDLE as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_priority_from_proc() {
        let (nice, policy) = read_proc_priority(std::process::id()).unwrap();
        assert!((-20..=19).contains(&nice));
        assert!(policy <= 7);
    }

    #[test]
    fn a_thread_lowers_itself() {
        // On Linux all three settings are per thread, so lowering a fresh
        // thread leaves the rest of the test process untouched.
        let report = std::thread::spawn(lower_own_priority).join().unwrap();
        assert_eq!(report.policy, CpuPolicy::Idle, "{report:?}");
    }
}

//! The benchmarks of "the owner never notices": what the guests cost the
//! owner of the machine, and what the swarm gets from it.
//!
//! - [`interference`](mod@interference): a CPU-bound and a memory-bound native program, alone
//!   and with guests on every core (paused by `--idle-only`, or only
//!   deprioritised by `--always`);
//! - [`responsiveness`](mod@responsiveness): how late a thread sleeping 1 ms wakes up, alone
//!   and with guests on every core;
//! - [`harvest`](mod@harvest): the share of the contributed core-time that guests get
//!   while the owner is away, against native `SCHED_IDLE` spin loops;
//! - [`pause_latency`]: from the owner starting a busy program to every
//!   guest stopped, against the same observation of a direct `SIGSTOP`.
//!
//! Each starts its own host and requester daemons ([`rig`]); the native
//! programs are `spare-bench` itself behind hidden arguments
//! ([`programs`]).

pub(crate) mod harvest;
pub(crate) mod interference;
pub(crate) mod pause;
pub(crate) mod procfs;
pub(crate) mod programs;
pub(crate) mod responsiveness;
pub(crate) mod rig;

pub(crate) use harvest::run as harvest;
pub(crate) use interference::run as interference;
pub(crate) use pause::run as pause_latency;
pub(crate) use responsiveness::run as responsiveness;

use std::time::Duration;

/// A pause of 200–400 ms that does not repeat in step with anything
/// periodic (the host samples every 20 ms).
pub(crate) fn jitter_sleep() {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    std::thread::sleep(Duration::from_millis(
        200 + u64::from(nanos % 200_000_000) / 1_000_000,
    ));
}

/// `+1.2% ± 0.4%`.
pub(crate) fn percent_ci(mean: f64, half: f64) -> String {
    if half.is_nan() {
        format!("{:+.1}%", mean * 100.0)
    } else {
        format!("{:+.1}% ± {:.1}%", mean * 100.0, half * 100.0)
    }
}

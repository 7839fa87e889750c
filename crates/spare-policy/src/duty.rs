//! The fallback's CPU duty cycle, trimmed by what the workers really used.
//!
//! Without a cgroup, a CPU share is held by stopping the workers for part of
//! every [`PERIOD`]: with `n` guests running on a share of `s` cores, they
//! run for `s / n` of each period and are stopped (`SIGSTOP`) for the rest.
//! A signal takes effect late when the machine is slow or loaded (on an
//! emulated CPU, by milliseconds), and the guests overrun their on-time by
//! that much: an open-loop cycle set to half a core was measured
//! giving 0.6 there. So the cycle measures itself. At the start of each
//! period, while the workers are still stopped, it may read their CPU
//! clocks; every [`TRIM_PERIODS`] periods it compares what they used with
//! the share and scales the on-time by the ratio.
//!
//! The trim only ever shortens the on-time (it stays within
//! [`MIN_TRIM`]`..=1`): a guest that used less than its share — it waited
//! for input, or the owner's own work took the CPU, as it should — gives no
//! reason to let the next period run longer than the share.

use std::time::{Duration, Instant};

use spare_runtime::WorkerState;

/// The duty cycle's period.
pub const PERIOD: Duration = Duration::from_millis(100);
/// How many whole periods one measurement spans: long enough that the
/// signals' jitter averages out, short enough to settle within a second.
pub const TRIM_PERIODS: u64 = 5;
/// The shortest on-time, as a share of the nominal one. A machine whose
/// signals are so late that it needs less is not one to trim by guesswork.
pub const MIN_TRIM: f64 = 0.25;

/// The workers' CPU time at one moment: who they were (sorted) and their
/// total run time in nanoseconds.
pub type CpuReading = (Vec<u32>, u64);

/// A duty cycle and its trim. See the [module docs](self).
#[derive(Debug)]
pub struct DutyCycle {
    epoch: Instant,
    trim: f64,
    /// The period of the last call, while it was not interrupted.
    last_period: Option<u64>,
    window: Option<Window>,
}

/// A measurement in progress.
#[derive(Debug)]
struct Window {
    /// The period it began with.
    first: u64,
    /// The guests running and the workers' reading when it began; a change
    /// of either starts a new window.
    running: usize,
    start: CpuReading,
}

impl DutyCycle {
    pub fn new(epoch: Instant) -> Self {
        Self {
            epoch,
            trim: 1.0,
            last_period: None,
            window: None,
        }
    }

    /// The share of the nominal on-time the cycle runs now.
    pub fn trim(&self) -> f64 {
        self.trim
    }

    /// The workers' state at `now` and the next edge, for a share of
    /// `share_millicores` over `running` guests. `read` gives the workers'
    /// CPU reading; it is called at most once per period, at its start,
    /// before the workers are let run, and `None` (a worker gone) skips a
    /// measurement. `None` as the edge: no cycle is needed, they run.
    pub fn state(
        &mut self,
        now: Instant,
        share_millicores: u64,
        running: usize,
        read: impl FnOnce() -> Option<CpuReading>,
    ) -> (WorkerState, Option<Instant>) {
        let running = running.max(1);
        let on_share = share_millicores as f64 / (running as f64 * 1000.0);
        if on_share >= 1.0 {
            self.interrupt();
            return (WorkerState::Run, None);
        }
        let period_ns = PERIOD.as_nanos();
        let elapsed = now.saturating_duration_since(self.epoch).as_nanos();
        let period = u64::try_from(elapsed / period_ns).unwrap_or(u64::MAX);
        let into = Duration::from_nanos(u64::try_from(elapsed % period_ns).unwrap_or(0));
        if self.last_period.is_some_and(|last| last != period) {
            self.measure(period, share_millicores, running, read);
        }
        self.last_period = Some(period);
        let on = PERIOD.mul_f64(on_share * self.trim);
        let period_start = now.checked_sub(into).unwrap_or(now);
        if into < on {
            (WorkerState::Run, Some(period_start + on))
        } else {
            (WorkerState::Throttle, Some(period_start + PERIOD))
        }
    }

    /// The workers were paused or let run freely: what they use until the
    /// next whole period says nothing about the cycle.
    pub fn interrupt(&mut self) {
        self.last_period = None;
        self.window = None;
    }

    fn measure(
        &mut self,
        period: u64,
        share_millicores: u64,
        running: usize,
        read: impl FnOnce() -> Option<CpuReading>,
    ) {
        let Some(now) = read() else {
            self.window = None;
            return;
        };
        if let Some(window) = &self.window
            && window.running == running
            && window.start.0 == now.0
        {
            let periods = period.saturating_sub(window.first);
            if periods < TRIM_PERIODS {
                return;
            }
            let span = PERIOD.as_secs_f64() * periods as f64;
            let used = now.1.saturating_sub(window.start.1) as f64 / 1e9 / span;
            let before = self.trim;
            self.trim = trimmed(self.trim, share_millicores as f64 / 1000.0, used);
            if (self.trim - before).abs() > 0.05 {
                tracing::debug!(
                    "duty cycle: guests used {used:.3} cores of {:.3}; on-time trimmed to {:.0}%",
                    share_millicores as f64 / 1000.0,
                    self.trim * 100.0
                );
            }
        }
        self.window = Some(Window {
            first: period,
            running,
            start: now,
        });
    }
}

/// The next trim, after guests given `trim` of the nominal on-time used
/// `used` cores of a `share`. Overrun is the late signals' (a fixed time a
/// period), so scaling by `share / used` lands close and the next
/// measurement closes the rest; a guest under its share moves the trim back
/// towards the nominal on-time, never past it.
fn trimmed(trim: f64, share: f64, used: f64) -> f64 {
    if used <= 0.0 {
        return 1.0;
    }
    (trim * share / used).clamp(MIN_TRIM, 1.0)
}

/// The total CPU time of processes `pids`, in nanoseconds, from their
/// process CPU clocks (all threads, ended ones included); `None` if one is
/// gone.
pub fn cpu_time_ns(pids: &[u32]) -> Option<u64> {
    pids.iter().try_fold(0u64, |total, &pid| {
        let pid = libc::pid_t::try_from(pid).ok()?;
        let mut clock: libc::clockid_t = 0;
        // SAFETY: clock_getcpuclockid writes a clock id into the variable we
        // own; it fails (non-zero) for a process that is gone.
        if unsafe { libc::clock_getcpuclockid(pid, &mut clock) } != 0 {
            return None;
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
            return None;
        }
        let ns = u64::try_from(ts.tv_sec)
            .ok()?
            .checked_mul(1_000_000_000)?
            .checked_add(u64::try_from(ts.tv_nsec).ok()?)?;
        total.checked_add(ns)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker whose stops take effect `lag` late (continues at once),
    /// driven by a duty cycle for `seconds`; returns the cores it used over
    /// the last second and the trim at the end.
    fn simulate(share: u64, lag: Duration, seconds: u64) -> (f64, f64) {
        let epoch = Instant::now();
        let mut duty = DutyCycle::new(epoch);
        let step = Duration::from_micros(100);
        let mut cpu = Duration::ZERO;
        let mut cpu_at_last_second = Duration::ZERO;
        // When the worker's state last changed, as the cycle asked it.
        let mut asked = (WorkerState::Run, Duration::ZERO);
        let mut effective = WorkerState::Run;
        let mut t = Duration::ZERO;
        while t < Duration::from_secs(seconds) {
            if t == Duration::from_secs(seconds - 1) {
                cpu_at_last_second = cpu;
            }
            let reading = (vec![7], u64::try_from(cpu.as_nanos()).unwrap());
            let (state, _) = duty.state(epoch + t, share, 1, || Some(reading));
            if state != asked.0 {
                asked = (state, t);
            }
            if asked.0 == WorkerState::Run || t >= asked.1 + lag {
                effective = asked.0;
            }
            if effective == WorkerState::Run {
                cpu += step;
            }
            t += step;
        }
        ((cpu - cpu_at_last_second).as_secs_f64(), duty.trim())
    }

    #[test]
    fn signals_on_time_give_the_share_at_the_nominal_on_time() {
        let (used, trim) = simulate(250, Duration::ZERO, 2);
        assert!((used - 0.25).abs() < 0.005, "{used}");
        assert!((trim - 1.0).abs() < 1e-9, "{trim}");
    }

    #[test]
    fn late_stops_are_trimmed_away_within_two_seconds() {
        // Untrimmed, an 8 ms late stop gives a quarter-core share 0.33.
        for (share, lag_ms) in [(250, 8), (500, 10), (100, 5), (800, 3)] {
            let (used, trim) = simulate(share, Duration::from_millis(lag_ms), 3);
            let share = share as f64 / 1000.0;
            assert!(
                (used - share).abs() < 0.01,
                "share {share}, lag {lag_ms} ms: used {used}, trim {trim}"
            );
            assert!(trim < 1.0, "{trim}");
        }
    }

    #[test]
    fn using_less_than_the_share_never_lengthens_the_on_time() {
        assert_eq!(trimmed(1.0, 0.25, 0.0), 1.0);
        assert_eq!(trimmed(1.0, 0.25, 0.1), 1.0);
        assert!((trimmed(0.5, 0.25, 0.2) - 0.625).abs() < 1e-9);
        assert!((trimmed(1.0, 0.25, 0.5) - 0.5).abs() < 1e-9);
        assert_eq!(trimmed(0.3, 0.25, 1.0), MIN_TRIM);
    }

    #[test]
    fn a_change_of_guests_or_a_pause_starts_the_measurement_again() {
        let epoch = Instant::now();
        let mut duty = DutyCycle::new(epoch);
        let at = |period: u64| epoch + PERIOD * u32::try_from(period).unwrap();
        // A guest that overran to a whole core, measured only across a
        // pause or a change of workers: nothing is learnt.
        duty.state(at(0), 250, 1, || unreachable!("no period has ended yet"));
        duty.state(at(1), 250, 1, || Some((vec![1], 0)));
        duty.interrupt();
        duty.state(at(6), 250, 1, || unreachable!("the pause broke the cycle"));
        duty.state(at(7), 250, 1, || Some((vec![1], 0)));
        duty.state(at(10), 250, 1, || Some((vec![1, 2], 300_000_000)));
        duty.state(at(15), 250, 1, || Some((vec![1], 800_000_000)));
        assert_eq!(duty.trim(), 1.0);
        // Five uninterrupted periods at a whole core: trimmed to a quarter.
        duty.state(at(20), 250, 1, || Some((vec![1], 1_300_000_000)));
        assert_eq!(duty.trim(), MIN_TRIM);
    }

    #[test]
    fn no_cycle_runs_when_the_share_covers_every_guest() {
        let mut duty = DutyCycle::new(Instant::now());
        let (state, edge) = duty.state(Instant::now(), 2000, 2, || unreachable!());
        assert_eq!((state, edge), (WorkerState::Run, None));
    }

    #[test]
    fn a_busy_process_clock_advances_and_a_gone_one_reads_none() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap();
        let pid = child.id();
        let before = cpu_time_ns(&[pid]).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let after = cpu_time_ns(&[pid, std::process::id()]).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(after > before, "{before} → {after}");
        assert_eq!(cpu_time_ns(&[pid]), None);
    }
}

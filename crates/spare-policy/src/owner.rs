//! Is the owner using the machine? Read from `/proc`, never guessed.
//!
//! The owner's CPU use is everything the machine's CPUs did that was not
//! spare's: busy time from `/proc/stat` minus the CPU time of the daemon and
//! its workers from `/proc/<pid>/stat`. Pressure-stall information
//! (`/proc/pressure/cpu` and `memory`) adds what CPU time cannot show: tasks
//! that wait for a CPU or stall on memory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One reading of the counters.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    /// Busy and total CPU time of the whole machine, in clock ticks.
    busy: u64,
    total: u64,
    /// CPU time of each spare process, in clock ticks.
    spare: HashMap<u32, u64>,
    /// Stall totals, in microseconds.
    cpu_stall: Option<u64>,
    memory_stall: Option<u64>,
}

/// What happened between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// Cores the owner kept busy, on average.
    pub owner_cores: f64,
    /// Cores spare kept busy, on average.
    pub spare_cores: f64,
    /// Share of the time some task waited for a CPU (0..=1).
    pub cpu_pressure: Option<f64>,
    /// Share of the time some task stalled on memory (0..=1).
    pub memory_pressure: Option<f64>,
}

/// Reads the counters and turns consecutive readings into [`Usage`].
#[derive(Debug)]
pub struct Sampler {
    proc: PathBuf,
    cores: u16,
    last: Option<Reading>,
}

impl Sampler {
    /// A sampler over the `/proc` at `proc` (normally `/proc`) on a machine
    /// with `cores` cores.
    pub fn new(proc: &Path, cores: u16) -> Self {
        Self {
            proc: proc.to_path_buf(),
            cores: cores.max(1),
            last: None,
        }
    }

    /// Whether pressure-stall information is available here.
    pub fn has_pressure(&self) -> bool {
        self.proc.join("pressure/cpu").exists()
    }

    /// Takes a reading; returns the usage since the previous one (`None`
    /// for the first, or when `/proc/stat` cannot be read).
    pub fn sample(&mut self, spare_pids: &[u32]) -> Option<Usage> {
        let reading = self.read(spare_pids)?;
        let usage = self
            .last
            .as_ref()
            .map(|last| usage(last, &reading, self.cores));
        self.last = Some(reading);
        usage
    }

    fn read(&self, spare_pids: &[u32]) -> Option<Reading> {
        let stat = std::fs::read_to_string(self.proc.join("stat")).ok()?;
        let (busy, total) = machine_ticks(&stat)?;
        let spare = spare_pids
            .iter()
            .filter_map(|&pid| {
                let text = std::fs::read_to_string(self.proc.join(format!("{pid}/stat"))).ok()?;
                Some((pid, process_ticks(&text)?))
            })
            .collect();
        let stall = |name: &str| {
            std::fs::read_to_string(self.proc.join("pressure").join(name))
                .ok()
                .and_then(|t| some_total(&t))
        };
        Some(Reading {
            at: Instant::now(),
            busy,
            total,
            spare,
            cpu_stall: stall("cpu"),
            memory_stall: stall("memory"),
        })
    }
}

fn usage(last: &Reading, now: &Reading, cores: u16) -> Usage {
    let total = now.total.saturating_sub(last.total).max(1) as f64;
    let busy = now.busy.saturating_sub(last.busy) as f64;
    // A process seen for the first time counts from zero: a worker that
    // started since the last reading. One that ended takes its last interval
    // with it; that time shows as the owner's, a small and brief
    // overestimate.
    let spare: u64 = now
        .spare
        .iter()
        .map(|(pid, ticks)| ticks.saturating_sub(last.spare.get(pid).copied().unwrap_or(0)))
        .sum();
    let spare = (spare as f64).min(busy);
    let cores = f64::from(cores);
    let elapsed_us = now.at.duration_since(last.at).as_micros().max(1) as f64;
    let pressure = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a) as f64 / elapsed_us).min(1.0)),
        _ => None,
    };
    Usage {
        owner_cores: (busy - spare) / total * cores,
        spare_cores: spare / total * cores,
        cpu_pressure: pressure(last.cpu_stall, now.cpu_stall),
        memory_pressure: pressure(last.memory_stall, now.memory_stall),
    }
}

/// (busy, total) ticks from the aggregate `cpu` line of `/proc/stat`.
/// Steal time (the hypervisor's other guests) is neither the owner's nor
/// ours, so it counts as elapsed but not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // in user and nice).
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    let busy = get(0) + get(1) + get(2) + get(5) + get(6);
    let total = busy + get(3) + get(4) + get(7);
    Some((busy, total))
}

/// utime + stime of a process from its `/proc/<pid>/stat`.
fn process_ticks(stat: &str) -> Option<u64> {
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15, so indices 11 and 12 here.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The `total=` of the `some` line of a pressure file.
fn some_total(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_whitespace()
        .find_map(|f| f.strip_prefix("total="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_what_the_kernel_writes() {
        let stat = "cpu  100 10 20 500 5 1 2 7 0 0\ncpu0 50 5 10 250 2 0 1 3 0 0\n";
        assert_eq!(machine_ticks(stat), Some((133, 645)));
        let pid = "4242 (spare worker (x)) S 1 2 3 0 -1 4194304 97 0 0 0 31 9 0 0 39 19 3 0";
        assert_eq!(process_ticks(pid), Some(40));
        let pressure = "some avg10=0.00 avg60=0.00 avg300=0.00 total=2981715\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total(pressure), Some(2_981_715));
        assert_eq!(machine_ticks("intr 1 2 3\n"), None);
        assert_eq!(process_ticks("garbage"), None);
    }

    #[test]
    fn owner_time_is_busy_time_that_was_not_spares() {
        let at = Instant::now();
        let last = Reading {
            at,
            busy: 1000,
            total: 4000,
            spare: HashMap::from([(7, 100), (8, 50)]),
            cpu_stall: Some(0),
            memory_stall: Some(0),
        };
        // 2 cores, 100 ticks elapsed per core; 150 busy ticks, of which 80
        // were spare's (worker 7: 60, new worker 9: 20; worker 8 ended).
        let now = Reading {
            at: at + Duration::from_secs(1),
            busy: 1150,
            total: 4200,
            spare: HashMap::from([(7, 160), (9, 20)]),
            cpu_stall: Some(100_000),
            memory_stall: None,
        };
        let u = usage(&last, &now, 2);
        assert!((u.spare_cores - 0.8).abs() < 1e-9, "{u:?}");
        assert!((u.owner_cores - 0.7).abs() < 1e-9, "{u:?}");
        assert!((u.cpu_pressure.unwrap() - 0.1).abs() < 1e-3, "{u:?}");
        assert_eq!(u.memory_pressure, None);
    }

    #[test]
    fn samples_this_machine() {
        let mut sampler = Sampler::new(Path::new("/proc"), 2);
        assert!(sampler.sample(&[std::process::id()]).is_none());
        std::thread::sleep(Duration::from_millis(30));
        let u = sampler.sample(&[std::process::id()]).unwrap();
        assert!(u.owner_cores >= 0.0 && u.spare_cores >= 0.0, "{u:?}");
    }
}

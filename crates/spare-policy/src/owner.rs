//! Is the owner using the machine? Read from `/proc`, never guessed.
//!
//! The owner's CPU use is everything the machine's CPUs did that was not
//! spare's: the run time of every task on the machine minus the run time of
//! the daemon's and the workers' threads. Both are read in nanoseconds where
//! the kernel offers them (see [`BusyClock`] and `/proc/<pid>/task/*/
//! schedstat`), because the 10 ms ticks of `/proc/stat` and
//! `/proc/<pid>/stat` are too coarse for a 100 ms window: each process's
//! count is truncated separately, and a few ticks of rounding read as a
//! quarter of a core. Pressure-stall information (`/proc/pressure/cpu` and
//! `memory`) adds what CPU time cannot show: tasks that wait for a CPU or
//! stall on memory.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the run time of every task on the machine is read, finest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusyClock {
    /// `cpuacct.usage` of a v1 cpuacct hierarchy's root: nanoseconds,
    /// charged by the scheduler from the same counter as each thread's
    /// `schedstat`, so the two subtract exactly.
    CpuacctUsage(PathBuf),
    /// `usage_usec` of a cgroup2 root's `cpu.stat`: accrued a scheduler tick
    /// (1–10 ms) at a time per CPU.
    CgroupCpuStat(PathBuf),
    /// Busy time in `/proc/stat`: 10 ms ticks per CPU, truncated.
    ProcStat(PathBuf),
}

impl BusyClock {
    /// The finest clock that can be read under the `/proc` at `proc`.
    pub fn detect(proc: &Path) -> Self {
        let mountinfo = std::fs::read_to_string(proc.join("self/mountinfo")).unwrap_or_default();
        crate::cgroup::machine_run_time_files(&mountinfo)
            .into_iter()
            .map(|file| {
                if file.ends_with("cpuacct.usage") {
                    Self::CpuacctUsage(file)
                } else {
                    Self::CgroupCpuStat(file)
                }
            })
            .find(|clock| {
                std::fs::read_to_string(clock.path())
                    .ok()
                    .and_then(|text| clock.parse_ns(&text, 1))
                    .is_some()
            })
            .unwrap_or_else(|| Self::ProcStat(proc.join("stat")))
    }

    fn path(&self) -> &Path {
        match self {
            Self::CpuacctUsage(file) | Self::CgroupCpuStat(file) | Self::ProcStat(file) => file,
        }
    }

    /// Run time of all tasks so far, in nanoseconds, from the clock's file.
    fn parse_ns(&self, text: &str, ns_per_tick: u64) -> Option<u64> {
        match self {
            Self::CpuacctUsage(_) => text.trim().parse().ok(),
            Self::CgroupCpuStat(_) => field(text, "usage_usec")?.checked_mul(1000),
            Self::ProcStat(_) => busy_ticks(text)?.checked_mul(ns_per_tick),
        }
    }
}

/// A `/proc` or cgroup file kept open and read again from its start:
/// one system call per reading instead of four, which matters fifty times
/// a second.
#[derive(Debug)]
struct OpenFile {
    path: PathBuf,
    file: Option<File>,
}

/// Enough for every file read here; of `/proc/stat` only the first line is
/// needed.
const READ_BUFFER: usize = 4096;

impl OpenFile {
    fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// The file's text (as much of it as [`READ_BUFFER`] holds), or `None` when it
    /// cannot be read; it is opened again at the next reading.
    fn read<'a>(&mut self, buffer: &'a mut Vec<u8>) -> Option<&'a str> {
        if self.file.is_none() {
            self.file = File::open(&self.path).ok();
        }
        let file = self.file.as_ref()?;
        buffer.resize(READ_BUFFER, 0);
        // One read: the kernel fills it with every line that fits.
        let len = loop {
            match file.read_at(buffer, 0) {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.file = None;
                    return None;
                }
            }
        };
        buffer.truncate(len);
        std::str::from_utf8(buffer).ok()
    }
}

impl fmt::Display for BusyClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CpuacctUsage(file) => write!(f, "{} (ns)", file.display()),
            Self::CgroupCpuStat(file) => write!(f, "{} usage_usec", file.display()),
            Self::ProcStat(file) => write!(f, "{} (10 ms ticks)", file.display()),
        }
    }
}

/// One reading of the counters.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    /// Run time of all tasks on the machine, in nanoseconds.
    busy: u64,
    /// Run time of each of spare's threads, in nanoseconds, by (pid, tid).
    /// A process whose threads cannot be read counts as one entry with
    /// tid 0, from its `/proc/<pid>/stat`.
    spare: HashMap<(u32, u32), u64>,
    /// Stall totals, in microseconds.
    cpu_stall: Option<u64>,
    memory_stall: Option<u64>,
}

/// What happened between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// The time between the two readings.
    pub span: Duration,
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
    clock: BusyClock,
    ns_per_tick: u64,
    busy_file: OpenFile,
    cpu_pressure: OpenFile,
    memory_pressure: OpenFile,
    /// The open run-time file of each of spare's threads, by (pid, tid);
    /// tid 0 is a whole process's `stat`.
    threads: HashMap<(u32, u32), OpenFile>,
    buffer: Vec<u8>,
    last: Option<Reading>,
}

impl Sampler {
    /// A sampler over the `/proc` at `proc` (normally `/proc`).
    pub fn new(proc: &Path) -> Self {
        // SAFETY: sysconf only reads a constant of the C library.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks_per_second = u64::try_from(ticks_per_second)
            .ok()
            .filter(|&t| t > 0)
            .unwrap_or(100);
        let clock = BusyClock::detect(proc);
        Self {
            proc: proc.to_path_buf(),
            busy_file: OpenFile::new(clock.path().to_path_buf()),
            clock,
            ns_per_tick: 1_000_000_000 / ticks_per_second,
            cpu_pressure: OpenFile::new(proc.join("pressure/cpu")),
            memory_pressure: OpenFile::new(proc.join("pressure/memory")),
            threads: HashMap::new(),
            buffer: Vec::with_capacity(READ_BUFFER),
            last: None,
        }
    }

    /// Where the machine's run time is read.
    pub fn clock(&self) -> &BusyClock {
        &self.clock
    }

    /// Whether pressure-stall information is available here.
    pub fn has_pressure(&self) -> bool {
        self.proc.join("pressure/cpu").exists()
    }

    /// Takes a reading; returns the usage since the previous one (`None`
    /// for the first, or when the machine's run time cannot be read).
    pub fn sample(&mut self, spare_pids: &[u32]) -> Option<Usage> {
        let reading = self.read(spare_pids)?;
        let usage = self.last.as_ref().map(|last| usage(last, &reading));
        self.last = Some(reading);
        usage
    }

    fn read(&mut self, spare_pids: &[u32]) -> Option<Reading> {
        // spare's threads first, then the machine: a thread that runs
        // between the two reads shows, if anywhere, as the owner's for one
        // sample and as spare's in the next.
        let spare = self.read_spare(spare_pids);
        let busy = self
            .busy_file
            .read(&mut self.buffer)
            .and_then(|text| self.clock.parse_ns(text, self.ns_per_tick))?;
        let cpu_stall = self
            .cpu_pressure
            .read(&mut self.buffer)
            .and_then(some_total);
        let memory_stall = self
            .memory_pressure
            .read(&mut self.buffer)
            .and_then(some_total);
        Some(Reading {
            at: Instant::now(),
            busy,
            spare,
            cpu_stall,
            memory_stall,
        })
    }

    /// The run time of each thread of `pids`; a process that has ended
    /// adds nothing. Threads are listed again at every reading (new ones
    /// count from their start), and their files stay open between readings.
    fn read_spare(&mut self, pids: &[u32]) -> HashMap<(u32, u32), u64> {
        let mut ids = Vec::new();
        for &pid in pids {
            let before = ids.len();
            if let Ok(entries) = std::fs::read_dir(self.proc.join(format!("{pid}/task"))) {
                ids.extend(entries.filter_map(|entry| {
                    let tid = entry.ok()?.file_name().to_str()?.parse().ok()?;
                    Some((pid, tid))
                }));
            }
            if ids.len() == before {
                ids.push((pid, 0));
            }
        }
        self.threads.retain(|id, _| ids.contains(id));
        let mut spare = HashMap::with_capacity(ids.len());
        for id in ids {
            let (pid, tid) = id;
            let proc = &self.proc;
            let file = self.threads.entry(id).or_insert_with(|| {
                OpenFile::new(if tid == 0 {
                    proc.join(format!("{pid}/stat"))
                } else {
                    proc.join(format!("{pid}/task/{tid}/schedstat"))
                })
            });
            let ns = file.read(&mut self.buffer).and_then(|text| {
                if tid == 0 {
                    process_ticks(text)?.checked_mul(self.ns_per_tick)
                } else {
                    run_time_ns(text)
                }
            });
            match ns {
                Some(ns) => {
                    spare.insert(id, ns);
                }
                // A thread without a schedstat (a kernel without it): the
                // whole process in ticks, from the next reading on.
                None if tid != 0 => {
                    self.threads.remove(&id);
                    if let Some(ns) = self.process_ns(pid) {
                        spare.entry((pid, 0)).or_insert(ns);
                    }
                }
                None => {}
            }
        }
        spare
    }

    fn process_ns(&mut self, pid: u32) -> Option<u64> {
        let text = std::fs::read_to_string(self.proc.join(format!("{pid}/stat"))).ok()?;
        process_ticks(&text)?.checked_mul(self.ns_per_tick)
    }
}

fn usage(last: &Reading, now: &Reading) -> Usage {
    let span = now.at.duration_since(last.at);
    let elapsed_ns = span.as_nanos().max(1) as f64;
    let busy = now.busy.saturating_sub(last.busy) as f64;
    // A thread seen for the first time counts from zero: it started since
    // the last reading. One that ended takes its last interval with it;
    // that time shows as the owner's, a small and brief overestimate.
    let spare: u64 = now
        .spare
        .iter()
        .map(|(id, ns)| ns.saturating_sub(last.spare.get(id).copied().unwrap_or(0)))
        .sum();
    let spare = spare as f64;
    let pressure = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a) as f64 * 1000.0 / elapsed_ns).min(1.0)),
        _ => None,
    };
    Usage {
        span,
        owner_cores: (busy - spare).max(0.0) / elapsed_ns,
        spare_cores: spare / elapsed_ns,
        cpu_pressure: pressure(last.cpu_stall, now.cpu_stall),
        memory_pressure: pressure(last.memory_stall, now.memory_stall),
    }
}

/// Busy ticks from the aggregate `cpu` line of `/proc/stat`. Steal time
/// (the hypervisor's other guests) is neither the owner's nor ours.
fn busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already
    // in user and nice).
    let get = |i: usize| fields.get(i).copied().unwrap_or(0);
    Some(get(0) + get(1) + get(2) + get(5) + get(6))
}

/// The first field of a thread's `schedstat`: its run time in nanoseconds.
fn run_time_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().next()?.parse().ok()
}

/// A `name value` line of a flat keyed file such as `cpu.stat`.
fn field(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

/// utime + stime of a process from its `/proc/<pid>/stat`, in ticks.
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

    #[test]
    fn parses_what_the_kernel_writes() {
        let stat = "cpu  100 10 20 500 5 1 2 7 0 0\ncpu0 50 5 10 250 2 0 1 3 0 0\n";
        assert_eq!(busy_ticks(stat), Some(133));
        let pid = "4242 (spare worker (x)) S 1 2 3 0 -1 4194304 97 0 0 0 31 9 0 0 39 19 3 0";
        assert_eq!(process_ticks(pid), Some(40));
        let pressure = "some avg10=0.00 avg60=0.00 avg300=0.00 total=2981715\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(some_total(pressure), Some(2_981_715));
        assert_eq!(run_time_ns("180177974 13978882 670\n"), Some(180_177_974));
        let cpu_stat = "usage_usec 36728592109\nuser_usec 33947059591\nsystem_usec 2781532517\n";
        assert_eq!(field(cpu_stat, "usage_usec"), Some(36_728_592_109));
        assert_eq!(field(cpu_stat, "nice_usec"), None);
        assert_eq!(busy_ticks("intr 1 2 3\n"), None);
        assert_eq!(process_ticks("garbage"), None);
        assert_eq!(run_time_ns(""), None);
    }

    #[test]
    fn owner_time_is_run_time_that_was_not_spares() {
        let at = Instant::now();
        let ms = 1_000_000;
        let last = Reading {
            at,
            busy: 1000 * ms,
            spare: HashMap::from([((7, 7), 100 * ms), ((7, 70), 5 * ms), ((8, 8), 50 * ms)]),
            cpu_stall: Some(0),
            memory_stall: Some(0),
        };
        // 100 ms on 2 cores; 150 ms of run time, of which 80 ms were spare's
        // (worker 7: 55 + 5 in two threads, new worker 9: 20; worker 8
        // ended).
        let now = Reading {
            at: at + Duration::from_millis(100),
            busy: 1150 * ms,
            spare: HashMap::from([((7, 7), 155 * ms), ((7, 70), 10 * ms), ((9, 0), 20 * ms)]),
            cpu_stall: Some(10_000),
            memory_stall: None,
        };
        let u = usage(&last, &now);
        assert!((u.spare_cores - 0.8).abs() < 1e-9, "{u:?}");
        assert!((u.owner_cores - 0.7).abs() < 1e-9, "{u:?}");
        assert!((u.cpu_pressure.unwrap() - 0.1).abs() < 1e-9, "{u:?}");
        assert_eq!(u.memory_pressure, None);
        // spare's threads read after the machine: never a negative owner.
        let later = Reading {
            at: at + Duration::from_millis(200),
            busy: 1160 * ms,
            spare: HashMap::from([((7, 7), 200 * ms)]),
            cpu_stall: None,
            memory_stall: None,
        };
        assert_eq!(usage(&now, &later).owner_cores, 0.0);
    }

    #[test]
    fn reads_threads_and_falls_back_to_ticks() {
        let proc = tempfile::tempdir().unwrap();
        let write = |path: &str, text: &str| {
            let path = proc.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        };
        write("stat", "cpu  100 0 0 900 0 0 0 0 0 0\n");
        write("10/task/10/schedstat", "3000 0 1\n");
        write("10/task/11/schedstat", "4000 0 1\n");
        write("20/stat", "20 (w) S 1 2 3 0 -1 0 0 0 0 0 3 2 0 0 39 19 1 0");
        let mut sampler = Sampler::new(proc.path());
        assert_eq!(
            sampler.clock(),
            &BusyClock::ProcStat(proc.path().join("stat"))
        );
        let reading = sampler.read(&[10, 20, 30]).unwrap();
        let tick = sampler.ns_per_tick;
        assert_eq!(reading.busy, 100 * tick);
        assert_eq!(
            reading.spare,
            HashMap::from([((10, 10), 3000), ((10, 11), 4000), ((20, 0), 5 * tick)])
        );
        assert!(sampler.sample(&[10]).is_none());
        // The files stay open and are read again from their start.
        write("stat", "cpu  250 0 0 900 0 0 0 0 0 0\n");
        write("10/task/10/schedstat", "3000000000 0 1\n");
        let u = sampler.sample(&[10]).unwrap();
        assert!(u.owner_cores >= 0.0 && u.spare_cores > 0.0, "{u:?}");
        assert_eq!(sampler.last.as_ref().unwrap().busy, 250 * tick);
        write("stat", "garbage");
        assert!(sampler.sample(&[10]).is_none());
    }

    #[test]
    fn samples_this_machine() {
        let mut sampler = Sampler::new(Path::new("/proc"));
        assert!(sampler.sample(&[std::process::id()]).is_none());
        // Spin for a while: this process's own run time is spare's, not
        // the owner's, to well under the quarter core that would pause
        // guests (with 10 ms ticks, truncation alone could make that up).
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            std::hint::black_box(0u64);
        }
        let u = sampler.sample(&[std::process::id()]).unwrap();
        let clock = sampler.clock();
        assert!(u.spare_cores > 0.9, "{u:?} read from {clock}");
        if !matches!(clock, BusyClock::ProcStat(_)) {
            assert!(u.owner_cores < 0.2, "{u:?} read from {clock}");
        }
    }
}

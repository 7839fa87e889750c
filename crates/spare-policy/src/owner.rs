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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the run time of every task on the machine is read, finest first.
/// Only the root of a hierarchy counts the whole machine: inside a
/// container's cgroup namespace the mount shows the container's own group
/// as its root, so the real root is recognised by a file only it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BusyClock {
    /// `cpuacct.usage` of a v1 cpuacct hierarchy's root: nanoseconds,
    /// charged by the scheduler from the same counter as each thread's
    /// `schedstat`, so the two subtract exactly.
    CpuacctUsage(PathBuf),
    /// The `usage_usec` of every group directly below a cgroup2 root,
    /// summed: charged like `cpuacct.usage` (the root's own `cpu.stat`
    /// only adds up scheduler ticks), plus the run time of each thread of
    /// the processes in the root group itself. Where systemd runs, only
    /// kernel threads live there, and they are not counted; on a machine
    /// that leaves everything in the root group, that is everything.
    CgroupChildren(PathBuf),
    /// Busy time in `/proc/stat`: 10 ms ticks per CPU, truncated.
    ProcStat(PathBuf),
}

impl BusyClock {
    /// The finest clock that can be read under the `/proc` at `proc`.
    pub fn detect(proc: &Path) -> Self {
        let mountinfo = std::fs::read_to_string(proc.join("self/mountinfo")).unwrap_or_default();
        crate::cgroup::machine_run_time_files(&mountinfo)
            .into_iter()
            .filter_map(|file| {
                let dir = file.parent()?.to_path_buf();
                if file.ends_with("cpuacct.usage") {
                    // Only a v1 hierarchy's root has a release agent.
                    let root = dir.join("release_agent").exists();
                    let clock = Self::CpuacctUsage(file);
                    (root && clock.reads(&mut Counters::default())).then_some(clock)
                } else {
                    // Every cgroup2 group but the root has a type.
                    let root = !dir.join("cgroup.type").exists();
                    let clock = Self::CgroupChildren(dir);
                    (root && clock.reads(&mut Counters::default())).then_some(clock)
                }
            })
            .next()
            .unwrap_or_else(|| Self::ProcStat(proc.join("stat")))
    }

    fn reads(&self, counters: &mut Counters) -> bool {
        let mut buffer = Vec::new();
        counters.read(self, 1, &mut buffer).is_some()
    }
}

impl fmt::Display for BusyClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::CpuacctUsage(file) => write!(f, "{} (ns)", file.display()),
            Self::CgroupChildren(root) => {
                write!(f, "usage_usec of the groups in {}", root.display())
            }
            Self::ProcStat(file) => write!(f, "{} (10 ms ticks)", file.display()),
        }
    }
}

/// The open files of a [`BusyClock`]: one, or one per group below a
/// cgroup2 root, found again at every reading.
#[derive(Debug, Default)]
struct Counters(HashMap<String, OpenFile>);

impl Counters {
    /// Run time so far of each counter, in nanoseconds, by name; `None`
    /// when the clock cannot be read.
    fn read(
        &mut self,
        clock: &BusyClock,
        ns_per_tick: u64,
        buffer: &mut Vec<u8>,
    ) -> Option<HashMap<String, u64>> {
        match clock {
            BusyClock::CpuacctUsage(file) => {
                let text = self.open(String::new(), file).read(buffer)?;
                let ns = text.trim().parse().ok()?;
                Some(HashMap::from([(String::new(), ns)]))
            }
            BusyClock::ProcStat(file) => {
                let text = self.open(String::new(), file).read(buffer)?;
                let ns = busy_ticks(text)?.checked_mul(ns_per_tick)?;
                Some(HashMap::from([(String::new(), ns)]))
            }
            BusyClock::CgroupChildren(root) => {
                let groups: Vec<String> = std::fs::read_dir(root)
                    .ok()?
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect();
                let listed: HashSet<&String> = groups.iter().collect();
                self.0.retain(|name, _| listed.contains(name));
                let mut usage = HashMap::with_capacity(groups.len());
                for name in &groups {
                    let file = self.open(name.clone(), &root.join(name).join("cpu.stat"));
                    if let Some(us) = file.read(buffer).and_then(|t| field(t, "usage_usec")) {
                        usage.insert(name.clone(), us.saturating_mul(1000));
                    }
                }
                Some(usage)
            }
        }
    }

    fn open(&mut self, name: String, path: &Path) -> &mut OpenFile {
        self.0
            .entry(name)
            .or_insert_with(|| OpenFile::new(path.to_path_buf()))
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

/// Thread files kept open at most by each set of threads read (spare's, the
/// root group's); beyond this (hundreds of workers'
/// threads) the rest are opened for each reading, so the daemon never runs
/// short of descriptors for its own work.
const MAX_OPEN_THREAD_FILES: usize = 256;

impl OpenFile {
    fn new(path: PathBuf) -> Self {
        Self { path, file: None }
    }

    /// The file's text (as much of it as [`READ_BUFFER`] holds), or `None`
    /// when it cannot be read; it is opened again at the next reading.
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

/// One reading of the counters.
#[derive(Clone, Debug)]
struct Reading {
    at: Instant,
    /// Run time of all tasks on the machine, in nanoseconds, by counter
    /// (see [`Counters`]).
    busy: HashMap<String, u64>,
    /// Run time of each of spare's threads, in nanoseconds, by (pid, tid);
    /// where the kernel keeps no run time per thread, of each process, by
    /// (pid, 0), from its ticks.
    spare: HashMap<(u32, u32), u64>,
    /// Run time of each thread of the processes in the cgroup2 root group
    /// (see [`BusyClock::CgroupChildren`]), by (pid, tid): part of the
    /// machine's run time, like `busy`.
    root_tasks: HashMap<(u32, u32), u64>,
    /// Stall totals, in microseconds.
    cpu_stall: Option<u64>,
    memory_stall: Option<u64>,
}

/// What happened between two readings.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    /// The time between the two readings.
    pub span: Duration,
    /// Cores the owner kept busy, on average. Not clamped: the machine's
    /// and spare's counters are read a moment apart (and a cgroup2 or tick
    /// clock lags by up to a tick), so one reading may be slightly
    /// negative and the next as much too high; a mean over several
    /// readings cancels that, and is clamped at zero.
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
    busy: Counters,
    cpu_pressure: OpenFile,
    memory_pressure: OpenFile,
    /// spare's threads or processes.
    spare: ThreadTimes,
    /// The processes in the cgroup2 root group, where that is the clock.
    root: Option<RootGroup>,
    buffer: Vec<u8>,
    last: Option<Reading>,
}

impl Sampler {
    /// A sampler over the `/proc` at `proc` (normally `/proc`).
    pub fn new(proc: &Path) -> Self {
        let clock = BusyClock::detect(proc);
        // Whether threads have a `schedstat` here (a kernel with
        // `CONFIG_SCHED_INFO`); decided once, so one process is never
        // counted both ways.
        let per_thread = proc.join("thread-self/schedstat").exists();
        let root = match &clock {
            BusyClock::CgroupChildren(root) => Some(RootGroup {
                procs: root.join("cgroup.procs"),
                user: HashMap::new(),
                threads: ThreadTimes::new(per_thread),
            }),
            _ => None,
        };
        if let Some(root) = root
            .as_ref()
            .filter(|r| std::fs::metadata(&r.procs).is_err())
        {
            tracing::warn!(
                "cannot read {}: processes in the cgroup2 root group will not count as the owner's",
                root.procs.display()
            );
        }
        Self {
            proc: proc.to_path_buf(),
            clock,
            ns_per_tick: 1_000_000_000 / ticks_per_second(),
            busy: Counters::default(),
            cpu_pressure: OpenFile::new(proc.join("pressure/cpu")),
            memory_pressure: OpenFile::new(proc.join("pressure/memory")),
            spare: ThreadTimes::new(per_thread),
            root,
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
        // reading and as spare's in the next.
        let spare = self
            .spare
            .read(&self.proc, spare_pids, self.ns_per_tick, &mut self.buffer);
        let busy = self
            .busy
            .read(&self.clock, self.ns_per_tick, &mut self.buffer)?;
        let root_tasks = match &mut self.root {
            Some(root) => root.read(&self.proc, self.ns_per_tick, &mut self.buffer),
            None => HashMap::new(),
        };
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
            root_tasks,
            cpu_stall,
            memory_stall,
        })
    }
}

/// The run time of the threads of a changing set of processes, each
/// thread's file kept open between readings.
#[derive(Debug)]
struct ThreadTimes {
    /// Whether threads have a `schedstat`; without, each process counts
    /// whole, in ticks, by (pid, 0).
    per_thread: bool,
    files: HashMap<(u32, u32), OpenFile>,
}

impl ThreadTimes {
    fn new(per_thread: bool) -> Self {
        Self {
            per_thread,
            files: HashMap::new(),
        }
    }

    /// The run time of each thread of `pids` (or of each process, where
    /// threads have no `schedstat`). Threads are listed again at every
    /// reading, so a new one counts from its start; one that cannot be read
    /// has ended and counts no more.
    fn read(
        &mut self,
        proc: &Path,
        pids: &[u32],
        ns_per_tick: u64,
        buffer: &mut Vec<u8>,
    ) -> HashMap<(u32, u32), u64> {
        let mut ids = Vec::new();
        for &pid in pids {
            if !self.per_thread {
                ids.push((pid, 0));
            } else if let Ok(entries) = std::fs::read_dir(proc.join(format!("{pid}/task"))) {
                ids.extend(entries.filter_map(|entry| {
                    let tid = entry.ok()?.file_name().to_str()?.parse().ok()?;
                    Some((pid, tid))
                }));
            }
        }
        let listed: HashSet<(u32, u32)> = ids.iter().copied().collect();
        self.files.retain(|id, _| listed.contains(id));
        let mut times = HashMap::with_capacity(ids.len());
        for (pid, tid) in ids {
            let path = || {
                if tid == 0 {
                    proc.join(format!("{pid}/stat"))
                } else {
                    proc.join(format!("{pid}/task/{tid}/schedstat"))
                }
            };
            let mut uncached;
            let file = if self.files.len() < MAX_OPEN_THREAD_FILES
                || self.files.contains_key(&(pid, tid))
            {
                self.files
                    .entry((pid, tid))
                    .or_insert_with(|| OpenFile::new(path()))
            } else {
                uncached = OpenFile::new(path());
                &mut uncached
            };
            let ns = file.read(buffer).and_then(|text| {
                if tid == 0 {
                    process_ticks(text)?.checked_mul(ns_per_tick)
                } else {
                    run_time_ns(text)
                }
            });
            match ns {
                Some(ns) => {
                    times.insert((pid, tid), ns);
                }
                None => {
                    self.files.remove(&(pid, tid));
                }
            }
        }
        times
    }
}

/// Processes in the cgroup2 root group: no group below the root counts
/// them. Kernel threads are left out, as they are of the groups.
#[derive(Debug)]
struct RootGroup {
    /// The root's `cgroup.procs`.
    procs: PathBuf,
    /// Whether each process listed at the last reading is a user process
    /// (not a kernel thread): read once from its `stat`.
    user: HashMap<u32, bool>,
    threads: ThreadTimes,
}

impl RootGroup {
    /// The run time of each thread of the root group's user processes;
    /// none when the group's process list cannot be read (the groups
    /// below still count).
    fn read(
        &mut self,
        proc: &Path,
        ns_per_tick: u64,
        buffer: &mut Vec<u8>,
    ) -> HashMap<(u32, u32), u64> {
        let listed = std::fs::read_to_string(&self.procs).unwrap_or_default();
        let pids: HashSet<u32> = listed
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        self.user.retain(|pid, _| pids.contains(pid));
        let mut user = Vec::new();
        for &pid in &pids {
            let is_user = match self.user.get(&pid) {
                Some(&is_user) => is_user,
                None => {
                    // A name is any bytes, not always UTF-8; a process that
                    // cannot be read now is asked again at the next reading.
                    let flags = std::fs::read(proc.join(format!("{pid}/stat")))
                        .ok()
                        .and_then(|stat| process_flags(&String::from_utf8_lossy(&stat)));
                    let Some(flags) = flags else { continue };
                    let is_user = flags & PF_KTHREAD == 0;
                    self.user.insert(pid, is_user);
                    is_user
                }
            };
            if is_user {
                user.push(pid);
            }
        }
        self.threads.read(proc, &user, ns_per_tick, buffer)
    }
}

fn usage(last: &Reading, now: &Reading) -> Usage {
    let span = now.at.duration_since(last.at);
    let elapsed_ns = span.as_nanos().max(1) as f64;
    // A counter of the machine seen for the first time (a cgroup2 group
    // made since the last reading) starts from here: its past is unknown.
    let groups: u64 = now
        .busy
        .iter()
        .filter_map(|(name, ns)| Some(ns.saturating_sub(*last.busy.get(name)?)))
        .sum();
    // A thread seen for the first time counts from zero: it started since
    // the last reading. One that ended takes its last interval with it;
    // that time shows as the owner's, a small and brief overestimate.
    let threads = |now: &HashMap<(u32, u32), u64>, last: &HashMap<(u32, u32), u64>| -> u64 {
        now.iter()
            .map(|(id, ns)| ns.saturating_sub(last.get(id).copied().unwrap_or(0)))
            .sum()
    };
    let busy = groups + threads(&now.root_tasks, &last.root_tasks);
    let spare = threads(&now.spare, &last.spare);
    let (busy, spare) = (busy as f64, spare as f64);
    let pressure = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => Some((b.saturating_sub(a) as f64 * 1000.0 / elapsed_ns).min(1.0)),
        _ => None,
    };
    Usage {
        span,
        owner_cores: (busy - spare) / elapsed_ns,
        spare_cores: spare / elapsed_ns,
        cpu_pressure: pressure(last.cpu_stall, now.cpu_stall),
        memory_pressure: pressure(last.memory_stall, now.memory_stall),
    }
}

/// Clock ticks per second: the unit of the CPU times in `/proc/stat` and
/// `/proc/<pid>/stat`.
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a constant of the C library.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(ticks).ok().filter(|&t| t > 0).unwrap_or(100)
}

/// utime + stime of process `pid` (all its threads, ended ones included),
/// in clock ticks; `None` once it is gone. Coarse: for spans of seconds.
pub fn process_cpu_ticks(pid: u32) -> Option<u64> {
    process_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Busy clock ticks of the whole machine so far, from `/proc/stat`.
/// Coarse: for spans of seconds.
pub fn machine_busy_ticks() -> Option<u64> {
    busy_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
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

/// `PF_KTHREAD` in a process's flags: a kernel thread.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The flags of a process from its `/proc/<pid>/stat` (field 9).
fn process_flags(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(6)?.parse().ok()
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

    fn busy(ns: u64) -> HashMap<String, u64> {
        HashMap::from([(String::new(), ns)])
    }

    #[test]
    fn owner_time_is_run_time_that_was_not_spares() {
        let at = Instant::now();
        let ms = 1_000_000;
        let last = Reading {
            at,
            busy: busy(1000 * ms),
            spare: HashMap::from([((7, 7), 100 * ms), ((7, 70), 5 * ms), ((8, 8), 50 * ms)]),
            root_tasks: HashMap::new(),
            cpu_stall: Some(0),
            memory_stall: Some(0),
        };
        // 100 ms on 2 cores; 150 ms of run time, of which 80 ms were spare's
        // (worker 7: 55 + 5 in two threads, new worker 9: 20; worker 8
        // ended).
        let now = Reading {
            at: at + Duration::from_millis(100),
            busy: busy(1150 * ms),
            spare: HashMap::from([((7, 7), 155 * ms), ((7, 70), 10 * ms), ((9, 9), 20 * ms)]),
            root_tasks: HashMap::new(),
            cpu_stall: Some(10_000),
            memory_stall: None,
        };
        let u = usage(&last, &now);
        assert!((u.spare_cores - 0.8).abs() < 1e-9, "{u:?}");
        assert!((u.owner_cores - 0.7).abs() < 1e-9, "{u:?}");
        assert!((u.cpu_pressure.unwrap() - 0.1).abs() < 1e-9, "{u:?}");
        assert_eq!(u.memory_pressure, None);
        // A reading in which spare's counters ran ahead of the machine's
        // is negative, and the next one makes up for it.
        let ahead = Reading {
            at: at + Duration::from_millis(200),
            busy: busy(1160 * ms),
            spare: HashMap::from([((7, 7), 175 * ms)]),
            root_tasks: HashMap::new(),
            cpu_stall: None,
            memory_stall: None,
        };
        let caught_up = Reading {
            at: at + Duration::from_millis(300),
            busy: busy(1190 * ms),
            spare: HashMap::from([((7, 7), 185 * ms)]),
            root_tasks: HashMap::new(),
            cpu_stall: None,
            memory_stall: None,
        };
        let first = usage(&now, &ahead);
        let second = usage(&ahead, &caught_up);
        assert!((first.owner_cores + 0.1).abs() < 1e-9, "{first:?}");
        assert!((second.owner_cores - 0.2).abs() < 1e-9, "{second:?}");
    }

    #[test]
    fn groups_found_later_count_from_then() {
        let at = Instant::now();
        let reading = |ms: u64, groups: &[(&str, u64)]| Reading {
            at: at + Duration::from_millis(ms),
            busy: groups
                .iter()
                .map(|(g, ns)| ((*g).to_owned(), *ns))
                .collect(),
            spare: HashMap::new(),
            root_tasks: HashMap::new(),
            cpu_stall: None,
            memory_stall: None,
        };
        let last = reading(0, &[("system.slice", 1_000_000_000), ("gone", 5)]);
        let now = reading(
            100,
            &[
                ("system.slice", 1_050_000_000),
                ("new.slice", 9_000_000_000),
            ],
        );
        let u = usage(&last, &now);
        assert!((u.owner_cores - 0.5).abs() < 1e-9, "{u:?}");
    }

    fn fake_proc() -> tempfile::TempDir {
        let proc = tempfile::tempdir().unwrap();
        put(proc.path(), "stat", "cpu  100 0 0 900 0 0 0 0 0 0\n");
        put(proc.path(), "10/task/10/schedstat", "3000 0 1\n");
        put(proc.path(), "10/task/11/schedstat", "4000 0 1\n");
        put(
            proc.path(),
            "10/stat",
            "10 (w) S 1 2 3 0 -1 0 0 0 0 0 3 2 0 0 39 19 1 0",
        );
        proc
    }

    fn put(root: &Path, path: &str, text: &str) {
        let path = root.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_each_thread_and_reads_files_again() {
        let proc = fake_proc();
        put(proc.path(), "thread-self/schedstat", "1 0 1\n");
        let mut sampler = Sampler::new(proc.path());
        assert!(sampler.spare.per_thread);
        assert_eq!(
            sampler.clock(),
            &BusyClock::ProcStat(proc.path().join("stat"))
        );
        let tick = sampler.ns_per_tick;
        // Process 30 does not exist: it adds nothing.
        let reading = sampler.read(&[10, 30]).unwrap();
        assert_eq!(reading.busy, busy(100 * tick));
        assert_eq!(
            reading.spare,
            HashMap::from([((10, 10), 3000), ((10, 11), 4000)])
        );
        assert!(sampler.sample(&[10]).is_none());
        // The files stay open and are read again from their start; a
        // thread whose file cannot be read has ended.
        put(proc.path(), "stat", "cpu  250 0 0 900 0 0 0 0 0 0\n");
        put(proc.path(), "10/task/10/schedstat", "3000000000 0 1\n");
        put(proc.path(), "10/task/11/schedstat", "gone");
        let u = sampler.sample(&[10]).unwrap();
        assert!(u.spare_cores > 0.0, "{u:?}");
        let last = sampler.last.as_ref().unwrap();
        assert_eq!(last.busy, busy(250 * tick));
        assert_eq!(last.spare, HashMap::from([((10, 10), 3_000_000_000)]));
        put(proc.path(), "stat", "garbage");
        assert!(sampler.sample(&[10]).is_none());
    }

    #[test]
    fn without_thread_run_times_whole_processes_count_in_ticks() {
        let proc = fake_proc();
        let mut sampler = Sampler::new(proc.path());
        assert!(!sampler.spare.per_thread);
        let tick = sampler.ns_per_tick;
        let reading = sampler.read(&[10, 30]).unwrap();
        assert_eq!(reading.spare, HashMap::from([((10, 0), 5 * tick)]));
    }

    #[test]
    fn only_a_hierarchy_root_counts_the_machine() {
        let proc = tempfile::tempdir().unwrap();
        let cgroup = tempfile::tempdir().unwrap();
        let acct = cgroup.path().join("cpuacct");
        let unified = cgroup.path().join("unified");
        put(&acct, "cpuacct.usage", "123456789\n");
        put(
            &unified,
            "system.slice/cpu.stat",
            "usage_usec 5\nuser_usec 3\n",
        );
        put(&unified, "user.slice/cpu.stat", "usage_usec 7\n");
        put(&unified, "cpu.stat", "usage_usec 99\n");
        put(proc.path(), "stat", "cpu  1 0 0 1 0 0 0 0 0 0\n");
        let mountinfo = format!(
            "30 25 0:30 / {} rw - cgroup cgroup rw,cpuacct\n31 25 0:31 / {} rw - cgroup2 cgroup2 rw\n",
            acct.display(),
            unified.display()
        );
        put(proc.path(), "self/mountinfo", &mountinfo);
        // No release agent: a namespace's view of cpuacct, not its root.
        // The cgroup2 root (no cgroup.type) is used instead: its groups.
        let clock = BusyClock::detect(proc.path());
        assert_eq!(clock, BusyClock::CgroupChildren(unified.clone()));
        let mut counters = Counters::default();
        let read = counters.read(&clock, 1, &mut Vec::new()).unwrap();
        assert_eq!(
            read,
            HashMap::from([
                ("system.slice".to_owned(), 5000),
                ("user.slice".to_owned(), 7000)
            ])
        );
        put(&acct, "release_agent", "");
        assert_eq!(
            BusyClock::detect(proc.path()),
            BusyClock::CpuacctUsage(acct.join("cpuacct.usage"))
        );
        // A group's view of cgroup2 (it has a type) is not the machine.
        std::fs::remove_file(acct.join("release_agent")).unwrap();
        put(&unified, "cgroup.type", "domain\n");
        assert_eq!(
            BusyClock::detect(proc.path()),
            BusyClock::ProcStat(proc.path().join("stat"))
        );
    }

    /// A process's name is any bytes: one that is not UTF-8 is the
    /// owner's all the same.
    #[test]
    fn a_root_group_process_whose_name_is_not_utf8_counts() {
        let proc = fake_proc();
        let cgroup = tempfile::tempdir().unwrap();
        let unified = cgroup.path().join("unified");
        put(&unified, "system.slice/cpu.stat", "usage_usec 5\n");
        put(&unified, "cgroup.procs", "30\n");
        let mountinfo = format!(
            "31 25 0:31 / {} rw - cgroup2 cgroup2 rw\n",
            unified.display()
        );
        put(proc.path(), "self/mountinfo", &mountinfo);
        put(proc.path(), "thread-self/schedstat", "1 0 1\n");
        put(proc.path(), "30/task/30/schedstat", "1000 0 1\n");
        std::fs::write(
            proc.path().join("30/stat"),
            b"30 (\xff\xfe) R 1 30 30 0 -1 4194304 0 0",
        )
        .unwrap();
        let mut sampler = Sampler::new(proc.path());
        let reading = sampler.read(&[10]).unwrap();
        assert_eq!(reading.root_tasks.get(&(30, 30)), Some(&1000));
    }

    #[test]
    fn processes_in_the_cgroup2_root_group_count_but_kernel_threads_do_not() {
        let proc = fake_proc();
        let cgroup = tempfile::tempdir().unwrap();
        let unified = cgroup.path().join("unified");
        put(&unified, "system.slice/cpu.stat", "usage_usec 5\n");
        put(&unified, "cgroup.procs", "1\n2\n10\n");
        let mountinfo = format!(
            "31 25 0:31 / {} rw - cgroup2 cgroup2 rw\n",
            unified.display()
        );
        put(proc.path(), "self/mountinfo", &mountinfo);
        put(proc.path(), "thread-self/schedstat", "1 0 1\n");
        // 1 is init (flags 0x400100), 2 kthreadd (0x208040).
        put(proc.path(), "1/stat", "1 (init) S 0 1 1 0 -1 4194560 0 0");
        put(proc.path(), "1/task/1/schedstat", "1000 0 1\n");
        put(
            proc.path(),
            "2/stat",
            "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0",
        );
        put(proc.path(), "2/task/2/schedstat", "5000 0 1\n");
        let mut sampler = Sampler::new(proc.path());
        assert_eq!(sampler.clock(), &BusyClock::CgroupChildren(unified.clone()));
        let first = sampler.read(&[10]).unwrap();
        assert_eq!(
            first.busy,
            HashMap::from([("system.slice".to_owned(), 5000)])
        );
        let root = HashMap::from([((1, 1), 1000), ((10, 10), 3000), ((10, 11), 4000)]);
        assert_eq!(first.root_tasks, root);
        assert_eq!(
            first.spare,
            HashMap::from([((10, 10), 3000), ((10, 11), 4000)])
        );
        // The owner's process 20 joins the root group and runs 30 ms; init
        // runs 10 ms, the groups 10 ms, spare's 10 ms (counted on both
        // sides); the kernel thread's time is not the owner's.
        put(&unified, "system.slice/cpu.stat", "usage_usec 10005\n");
        put(&unified, "cgroup.procs", "1\n2\n10\n20\n");
        put(
            proc.path(),
            "20/stat",
            "20 (owner) R 1 20 20 0 -1 4194304 0 0",
        );
        put(proc.path(), "20/task/20/schedstat", "30000000 0 1\n");
        put(proc.path(), "1/task/1/schedstat", "10001000 0 1\n");
        put(proc.path(), "2/task/2/schedstat", "90000000 0 1\n");
        put(proc.path(), "10/task/10/schedstat", "10003000 0 1\n");
        let mut now = sampler.read(&[10]).unwrap();
        now.at = first.at + Duration::from_millis(100);
        let u = usage(&first, &now);
        assert!((u.owner_cores - 0.5).abs() < 1e-9, "{u:?}");
        assert!((u.spare_cores - 0.1).abs() < 1e-9, "{u:?}");
        // A root group that cannot be listed counts nothing; the groups
        // below it still do.
        std::fs::remove_file(unified.join("cgroup.procs")).unwrap();
        let unlisted = sampler.read(&[10]).unwrap();
        assert!(unlisted.root_tasks.is_empty(), "{unlisted:?}");
        assert_eq!(unlisted.busy.len(), 1);
    }

    /// Every process on the machine now.
    fn all_pids() -> Vec<u32> {
        std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect()
    }

    #[test]
    fn samples_this_machine() {
        // This process's spinning is its own run time.
        let mut sampler = Sampler::new(Path::new("/proc"));
        assert!(sampler.sample(&[std::process::id()]).is_none());
        let until = Instant::now() + Duration::from_millis(100);
        while Instant::now() < until {
            std::hint::black_box(0u64);
        }
        let u = sampler.sample(&[std::process::id()]).unwrap();
        assert!(u.spare_cores > 0.5, "{u:?} read from {}", sampler.clock());
        // With every process on the machine counted as spare's, what is
        // left for the owner is the kernel's own threads and processes that
        // ended between the readings: next to nothing, where the run time
        // is counted in nanoseconds (with 10 ms ticks, truncation alone
        // could make up a quarter core). Processes that come and go could
        // spoil one attempt; not three.
        if matches!(sampler.clock(), BusyClock::ProcStat(_)) {
            return;
        }
        let mut seen = Vec::new();
        for _ in 0..3 {
            let mut sampler = Sampler::new(Path::new("/proc"));
            assert!(sampler.sample(&all_pids()).is_none());
            let until = Instant::now() + Duration::from_millis(100);
            while Instant::now() < until {
                std::hint::black_box(0u64);
            }
            let u = sampler.sample(&all_pids()).unwrap();
            if u.owner_cores.abs() < 0.1 {
                return;
            }
            seen.push(u);
        }
        panic!(
            "run time of no process, read from {}: {seen:?}",
            sampler.clock()
        );
    }
}

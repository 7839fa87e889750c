//! Control groups for the workers, where the daemon can make one.
//!
//! With cgroup v2 the workers go into `<daemon's group>/spare-<pid>-<name>`
//! (the daemon's pid and name) with
//! `cpu.idle = 1` (the group only runs when nothing else wants the CPU),
//! `cpu.max` (the CPU share) and `memory.max`. A v2 group whose parent holds
//! processes cannot enable controllers for its children ("no internal
//! processes"), so the daemon first moves itself into a `spare-daemon` leaf
//! beside it, as systemd expects of a unit with `Delegate=yes`. Where the
//! CPU and memory controllers are mounted as cgroup v1 hierarchies instead,
//! the same limits go into `cpu.idle`, `cpu.cfs_quota_us` and
//! `memory.limit_in_bytes` of a `spare-<pid>-<name>` group in each.
//!
//! The kernel takes a quota of at least 1 ms per period, and a period of at
//! most 1 s: a share too small for 1 ms per [`CPU_PERIOD_US`] gets a longer
//! period (see [`cpu_max`]).
//!
//! A daemon removes its groups when it stops, and a setup that fails
//! removes the groups it made. A daemon that was killed cannot, so each
//! daemon, as it makes its own, removes the empty `spare-<pid>-…` groups
//! beside them whose daemon no longer runs.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// CFS period for the CPU quota.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The least quota the kernel takes, per period (v1 and v2 alike).
pub const MIN_QUOTA_US: u64 = 1000;
/// The longest period the kernel takes (v1 and v2 alike).
pub const MAX_PERIOD_US: u64 = 1_000_000;

/// The quota and period (in microseconds) that give `quota_us` per
/// [`CPU_PERIOD_US`]: that period, or the shortest multiple of it up to
/// [`MAX_PERIOD_US`] whose quota reaches [`MIN_QUOTA_US`], so the share is
/// exact. Errs for a share too small even at the longest period.
pub fn cpu_max(quota_us: u64) -> Result<(u64, u64), String> {
    if quota_us >= MIN_QUOTA_US {
        return Ok((quota_us, CPU_PERIOD_US));
    }
    let times = MIN_QUOTA_US.div_ceil(quota_us.max(1));
    if quota_us == 0 || times > MAX_PERIOD_US / CPU_PERIOD_US {
        return Err(format!(
            "the least CPU share a cgroup can hold is the kernel's least quota, {} ms per \
             {} s period (0.1% of one core); this is {quota_us} µs per {} ms",
            MIN_QUOTA_US / 1000,
            MAX_PERIOD_US / 1_000_000,
            CPU_PERIOD_US / 1000
        ));
    }
    Ok((quota_us * times, CPU_PERIOD_US * times))
}

/// The groups the workers run in.
#[derive(Clone, Debug, Serialize)]
pub struct Cgroups {
    /// `"v2"` or `"v1"`.
    pub version: &'static str,
    /// Group directories made for the workers.
    pub dirs: Vec<PathBuf>,
    /// `cgroup.procs` files each worker's pid is written to.
    #[serde(skip)]
    pub join: Vec<PathBuf>,
    /// What limits memory: the group, or (no memory controller) only the
    /// sandbox's per-guest limit.
    pub memory_in_group: bool,
    /// Settings that the kernel refused and were left at their default.
    pub warnings: Vec<String>,
}

/// What the groups should enforce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// CPU quota per [`CPU_PERIOD_US`], in microseconds; `None` is no
    /// quota. The groups may use a longer period for the same share
    /// ([`cpu_max`]).
    pub cpu_quota_us: Option<u64>,
    /// Memory of all workers together, in bytes.
    pub memory: u64,
}

/// A mounted cgroup hierarchy.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Mount {
    /// Where it is mounted.
    point: PathBuf,
    /// Which part of the hierarchy the mount shows (`/` unless namespaced).
    root: String,
    /// `None` for cgroup2, else the v1 controllers it carries.
    controllers: Option<Vec<String>>,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let fields: Vec<&str> = before.split_whitespace().collect();
            let mut after = after.split_whitespace();
            let fstype = after.next()?;
            let _source = after.next()?;
            let options = after.next().unwrap_or("");
            let root = (*fields.get(3)?).to_owned();
            let point = PathBuf::from(unescape(fields.get(4)?));
            match fstype {
                "cgroup2" => Some(Mount {
                    point,
                    root,
                    controllers: None,
                }),
                "cgroup" => Some(Mount {
                    point,
                    root,
                    controllers: Some(options.split(',').map(str::to_owned).collect()),
                }),
                _ => None,
            }
        })
        .collect()
}

/// mountinfo escapes spaces and a few other bytes as `\ooo`.
fn unescape(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Files that may count the run time of every task on the machine, finest
/// first: `cpuacct.usage` at a v1 cpuacct mount and `cpu.stat` at a cgroup2
/// mount. Only mounts of a hierarchy's root (as this namespace sees it)
/// qualify; [`crate::owner::BusyClock::detect`] tells the machine's root
/// from a container's.
pub(crate) fn machine_run_time_files(mountinfo: &str) -> Vec<PathBuf> {
    let mounts = mounts(mountinfo);
    let roots = || mounts.iter().filter(|m| m.root == "/");
    let v1 = roots()
        .filter(|m| {
            m.controllers
                .as_ref()
                .is_some_and(|c| c.iter().any(|c| c == "cpuacct"))
        })
        .map(|m| m.point.join("cpuacct.usage"));
    let v2 = roots()
        .filter(|m| m.controllers.is_none())
        .map(|m| m.point.join("cpu.stat"));
    v1.chain(v2).collect()
}

/// This process's group in the hierarchy with `controller` (`""` for v2).
fn own_path(cgroup_file: &str, controller: &str) -> Option<String> {
    cgroup_file.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let list = parts.next()?;
        let path = parts.next()?;
        let matches = if controller.is_empty() {
            list.is_empty()
        } else {
            list.split(',').any(|c| c == controller)
        };
        matches.then(|| path.to_owned())
    })
}

/// The directory of `path` in `mount`.
fn dir_of(mount: &Mount, path: &str) -> PathBuf {
    let relative = path
        .strip_prefix(mount.root.as_str())
        .unwrap_or(path)
        .trim_start_matches('/');
    if relative.is_empty() {
        // Not `point/`, which reads oddly in messages.
        return mount.point.clone();
    }
    mount.point.join(relative)
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value)
        .map_err(|e| format!("cannot write {value:?} to {}: {e}", path.display()))
}

fn make_dir(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    }
}

/// Makes the group `dir` and sets it up with `configure`; if that fails,
/// removes the group again (its name is this daemon's, so it is ours even
/// if it was there already), so a failed setup leaves nothing behind.
fn new_group<T>(dir: &Path, configure: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    make_dir(dir)?;
    configure().inspect_err(|_| {
        // cgroupfs removes a group with its control files in it.
        if let Err(e) = std::fs::remove_dir(dir) {
            tracing::warn!("cannot remove {}: {e}", dir.display());
        }
    })
}

/// Makes the workers' groups named `spare-<pid>-<name>`, or says why it
/// cannot. Where v1 is used, the first warning says why v2 was not.
pub fn setup(name: &str, limits: Limits) -> Result<Cgroups, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    setup_in(&mountinfo, &own, name, limits)
}

/// [`setup`] with the mount table and this process's groups (the contents
/// of `/proc/self/mountinfo` and `/proc/self/cgroup`).
fn setup_in(mountinfo: &str, own: &str, name: &str, limits: Limits) -> Result<Cgroups, String> {
    let mounts = mounts(mountinfo);
    let group = format!("spare-{}-{name}", std::process::id());
    let v2 = mounts
        .iter()
        .find(|m| m.controllers.is_none())
        .and_then(|m| Some((m, own_path(own, "")?)));
    let v2_error = match v2 {
        Some((mount, path)) => match setup_v2(&dir_of(mount, &path), &group, limits) {
            Ok(groups) => return Ok(groups),
            Err(e) => e,
        },
        None => "no cgroup2 hierarchy is mounted".to_owned(),
    };
    let v1 = |controller: &str| {
        mounts
            .iter()
            .find(|m| {
                m.controllers
                    .as_ref()
                    .is_some_and(|c| c.iter().any(|c| c == controller))
            })
            .and_then(|m| Some(dir_of(m, &own_path(own, controller)?)))
    };
    match v1("cpu") {
        Some(cpu) => match setup_v1(&cpu, v1("memory").as_deref(), &group, limits) {
            Ok(mut groups) => {
                groups
                    .warnings
                    .insert(0, format!("cgroup v2 is not used: {v2_error}"));
                Ok(groups)
            }
            Err(e) => Err(format!("cgroup v2: {v2_error}; cgroup v1: {e}")),
        },
        None => Err(format!(
            "cgroup v2: {v2_error}; cgroup v1: no cpu controller is mounted"
        )),
    }
}

fn setup_v2(own: &Path, group: &str, limits: Limits) -> Result<Cgroups, String> {
    let available = std::fs::read_to_string(own.join("cgroup.controllers")).map_err(|e| {
        format!(
            "cannot read {}: {e}",
            own.join("cgroup.controllers").display()
        )
    })?;
    let has = |c: &str| available.split_whitespace().any(|a| a == c);
    if !has("cpu") {
        return Err(format!(
            "the cpu controller is not available in {} (it has: {})",
            own.display(),
            available.trim()
        ));
    }
    let memory = has("memory");
    let enable = if memory { "+cpu +memory" } else { "+cpu" };
    let control = own.join("cgroup.subtree_control");
    if write(&control, enable).is_err() {
        // Our own group holds processes (this daemon at least), so it may
        // not give controllers to children until they move to a leaf.
        let leaf = own.join("spare-daemon");
        make_dir(&leaf)?;
        write(&leaf.join("cgroup.procs"), &std::process::id().to_string())?;
        write(&control, enable)?;
    }
    let max = match limits.cpu_quota_us {
        Some(q) => {
            let (quota, period) = cpu_max(q)?;
            format!("{quota} {period}")
        }
        None => format!("max {CPU_PERIOD_US}"),
    };
    let dir = own.join(group);
    remove_stale(own, Path::new("/proc"));
    let warnings = new_group(&dir, || {
        let mut warnings = Vec::new();
        if write(&dir.join("cpu.idle"), "1").is_err() {
            // Before Linux 5.15: the lowest weight instead.
            if let Err(e) = write(&dir.join("cpu.weight"), "1") {
                warnings.push(e);
            }
        }
        write(&dir.join("cpu.max"), &max)?;
        if memory {
            write(&dir.join("memory.max"), &limits.memory.to_string())?;
            // Swap would let guests page the owner's memory out to disk.
            if let Err(e) = write(&dir.join("memory.swap.max"), "0") {
                warnings.push(e);
            }
        }
        Ok(warnings)
    })?;
    Ok(Cgroups {
        version: "v2",
        join: vec![dir.join("cgroup.procs")],
        dirs: vec![dir],
        memory_in_group: memory,
        warnings,
    })
}

fn setup_v1(
    cpu: &Path,
    memory: Option<&Path>,
    group: &str,
    limits: Limits,
) -> Result<Cgroups, String> {
    let (quota, period) = match limits.cpu_quota_us {
        Some(q) => {
            let (quota, period) = cpu_max(q)?;
            (quota.to_string(), period)
        }
        None => ("-1".to_owned(), CPU_PERIOD_US),
    };
    let cpu_dir = cpu.join(group);
    remove_stale(cpu, Path::new("/proc"));
    let warnings = new_group(&cpu_dir, || {
        let mut warnings = Vec::new();
        if let Err(e) = write(&cpu_dir.join("cpu.idle"), "1") {
            // Before Linux 5.15: the lowest share instead.
            if write(&cpu_dir.join("cpu.shares"), "2").is_err() {
                warnings.push(e);
            }
        }
        write(&cpu_dir.join("cpu.cfs_period_us"), &period.to_string())?;
        write(&cpu_dir.join("cpu.cfs_quota_us"), &quota)?;
        Ok(warnings)
    })?;
    let mut groups = Cgroups {
        version: "v1",
        join: vec![cpu_dir.join("cgroup.procs")],
        dirs: vec![cpu_dir],
        memory_in_group: false,
        warnings,
    };
    let memory_dir = memory.map(|m| m.join(group));
    let memory_set = memory_dir.as_ref().map(|dir| {
        if let Some(parent) = dir.parent() {
            remove_stale(parent, Path::new("/proc"));
        }
        new_group(dir, || {
            write(
                &dir.join("memory.limit_in_bytes"),
                &limits.memory.to_string(),
            )
        })?;
        Ok::<_, String>(dir.clone())
    });
    match memory_set {
        Some(Ok(dir)) => {
            groups.join.push(dir.join("cgroup.procs"));
            groups.dirs.push(dir);
            groups.memory_in_group = true;
        }
        Some(Err(e)) => groups.warnings.push(e),
        None => groups
            .warnings
            .push("no memory controller is mounted".to_owned()),
    }
    Ok(groups)
}

/// Removes the groups in `parent` that a daemon killed before it could
/// remove them left behind: named `spare-<pid>-…` for a pid with no entry
/// in `proc`. A group that still holds a process is not empty, and the
/// kernel refuses to remove it.
fn remove_stale(parent: &Path, proc: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("spare-"))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !proc.join(pid.to_string()).exists() && std::fs::remove_dir(entry.path()).is_ok() {
            tracing::info!(
                "removed {}, left by a daemon that ended",
                entry.path().display()
            );
        }
    }
}

impl Cgroups {
    /// Removes the groups once their workers are gone, waiting up to a
    /// second for them to exit.
    pub fn remove(&self) {
        for dir in &self.dirs {
            for _ in 0..20 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
35 25 0:30 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
38 35 0:33 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 35 0:34 /lxc/x /sys/fs/cgroup/my\\040pids rw - cgroup cgroup rw,pids
";

    #[test]
    fn reads_mounts_and_own_groups() {
        let m = mounts(HYBRID);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].point, Path::new("/sys/fs/cgroup/unified"));
        assert_eq!(m[0].controllers, None);
        assert_eq!(
            m[1].controllers.as_deref(),
            Some(&["rw".to_owned(), "cpu".to_owned()][..])
        );
        assert_eq!(m[3].point, Path::new("/sys/fs/cgroup/my pids"));
        let own = "9:name=systemd:/\n4:memory:/process_api/f46c\n1:cpu,cpuacct:/\n0::/user.slice/x.scope\n";
        assert_eq!(
            own_path(own, "memory").as_deref(),
            Some("/process_api/f46c")
        );
        assert_eq!(own_path(own, "cpu").as_deref(), Some("/"));
        assert_eq!(own_path(own, "").as_deref(), Some("/user.slice/x.scope"));
        assert_eq!(own_path(own, "blkio"), None);
        assert_eq!(
            dir_of(&m[2], "/process_api/f46c"),
            Path::new("/sys/fs/cgroup/memory/process_api/f46c")
        );
        // A namespaced mount shows only its root's subtree.
        assert_eq!(
            dir_of(&m[3], "/lxc/x/a"),
            Path::new("/sys/fs/cgroup/my pids/a")
        );
    }

    #[test]
    fn groups_of_ended_daemons_are_removed() {
        let parent = tempfile::tempdir().unwrap();
        let proc = tempfile::tempdir().unwrap();
        std::fs::create_dir(proc.path().join("77")).unwrap();
        for name in [
            "spare-77-12D3KooWlive",
            "spare-88-12D3KooWgone",
            "spare-daemon",
            "spare-99",
            "other-88-x",
        ] {
            std::fs::create_dir(parent.path().join(name)).unwrap();
        }
        // A group that still holds something stays (here a file; in
        // cgroupfs the kernel refuses to remove a group with processes).
        std::fs::create_dir(parent.path().join("spare-66-busy")).unwrap();
        std::fs::write(parent.path().join("spare-66-busy/cgroup.procs"), "1").unwrap();
        remove_stale(parent.path(), proc.path());
        let mut left: Vec<String> = std::fs::read_dir(parent.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "other-88-x",
                "spare-66-busy",
                "spare-77-12D3KooWlive",
                "spare-99",
                "spare-daemon"
            ]
        );
    }

    fn read(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn small_cpu_shares_get_a_longer_period() {
        assert_eq!(cpu_max(50_000), Ok((50_000, 100_000)));
        assert_eq!(cpu_max(1000), Ok((1000, 100_000)));
        assert_eq!(cpu_max(999), Ok((1998, 200_000)));
        assert_eq!(cpu_max(300), Ok((1200, 400_000)));
        assert_eq!(cpu_max(200), Ok((1000, 500_000)));
        assert_eq!(cpu_max(100), Ok((1000, 1_000_000)));
        for quota in [0, 1, 99] {
            let err = cpu_max(quota).unwrap_err();
            assert!(err.contains("1 ms per 1 s period"), "{err}");
        }

        // 0.2% of a core, as the kernel takes it: 1 ms per 500 ms.
        let limits = Limits {
            cpu_quota_us: Some(200),
            memory: 1 << 30,
        };
        let v1 = tempfile::tempdir().unwrap();
        let groups = setup_v1(v1.path(), None, "spare-1-a", limits).unwrap();
        let dir = &groups.dirs[0];
        assert_eq!(read(&dir.join("cpu.cfs_period_us")), "500000");
        assert_eq!(read(&dir.join("cpu.cfs_quota_us")), "1000");
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let groups = setup_v2(v2.path(), "spare-1-a", limits).unwrap();
        assert_eq!(read(&groups.dirs[0].join("cpu.max")), "1000 500000");
        // Too small a share makes no group at all.
        let limits = Limits {
            cpu_quota_us: Some(50),
            ..limits
        };
        assert!(setup_v1(v1.path(), None, "spare-1-b", limits).is_err());
        assert!(setup_v2(v2.path(), "spare-1-b", limits).is_err());
        assert!(!v1.path().join("spare-1-b").exists());
        assert!(!v2.path().join("spare-1-b").exists());
    }

    #[test]
    fn v1_groups_say_why_v2_is_not_used() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            dir.display().to_string()
        };
        let (v2, cpu, memory) = (dir("unified"), dir("cpu"), dir("memory"));
        std::fs::write(Path::new(&v2).join("cgroup.controllers"), "pids\n").unwrap();
        let mountinfo = format!(
            "36 35 0:31 / {v2} rw - cgroup2 cgroup2 rw\n\
             37 35 0:32 / {cpu} rw - cgroup cgroup rw,cpu\n\
             38 35 0:33 / {memory} rw - cgroup cgroup rw,memory\n"
        );
        let own = "4:memory:/\n1:cpu:/\n0::/\n";
        let limits = Limits {
            cpu_quota_us: None,
            memory: 1 << 30,
        };
        let groups = setup_in(&mountinfo, own, "x", limits).unwrap();
        assert_eq!(groups.version, "v1");
        assert!(groups.memory_in_group);
        assert_eq!(
            groups.warnings,
            [format!(
                "cgroup v2 is not used: the cpu controller is not available in {v2} (it has: pids)"
            )]
        );
    }

    #[test]
    fn a_failed_group_is_removed() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("spare-1-x");
        let result: Result<(), String> = new_group(&dir, || Err("refused".into()));
        assert_eq!(result, Err("refused".to_owned()));
        assert!(!dir.exists());
        new_group(&dir, || Ok(())).unwrap();
        assert!(dir.is_dir());
    }

    /// On the machine's own hierarchies, where this process may make groups
    /// (as root): a quota the kernel refuses fails the setup after the
    /// group was made, and the group must go.
    #[test]
    fn a_failed_setup_leaves_no_group_behind() {
        let name = "failed-setup-test";
        let limits = Limits {
            cpu_quota_us: Some(u64::MAX),
            memory: 1 << 30,
        };
        match setup(name, limits) {
            Ok(groups) => {
                // A kernel that took it: nothing to check.
                groups.remove();
                return;
            }
            Err(e) => eprintln!("setup failed as it should: {e}"),
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        let group = format!("spare-{}-{name}", std::process::id());
        for mount in mounts(&mountinfo) {
            let controller = match &mount.controllers {
                None => "",
                Some(c) if c.iter().any(|c| c == "cpu") => "cpu",
                Some(c) if c.iter().any(|c| c == "memory") => "memory",
                Some(_) => continue,
            };
            if let Some(path) = own_path(&own, controller) {
                let dir = dir_of(&mount, &path).join(&group);
                assert!(!dir.exists(), "{} was left behind", dir.display());
            }
        }
    }

    #[test]
    fn machine_run_time_comes_from_hierarchy_roots() {
        let with_cpuacct = format!(
            "{HYBRID}40 35 0:35 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n\
             41 35 0:36 /lxc/x /sys/fs/cgroup/acct2 rw - cgroup cgroup rw,cpuacct\n"
        );
        assert_eq!(
            machine_run_time_files(&with_cpuacct),
            [
                PathBuf::from("/sys/fs/cgroup/cpuacct/cpuacct.usage"),
                PathBuf::from("/sys/fs/cgroup/unified/cpu.stat"),
            ]
        );
        assert!(machine_run_time_files("").is_empty());
    }
}

//! What a worker can reach if a guest breaks out of wasmtime.
//!
//! wasmtime is the sandbox; this is the second wall behind it. Before it
//! starts any thread, a worker takes from itself everything it does not
//! need to run guests:
//!
//! - **files** (Landlock): it may read the blob store, where modules and
//!   large inputs are, and the compiled-module cache, and write nowhere
//!   (the compiler, which runs no guest, alone writes the cache); nothing
//!   else, so not the node's key, its database or the owner's files, and
//!   it can execute no program;
//! - **TCP** (Landlock): it may neither connect nor bind;
//! - **signals and abstract Unix sockets** (Landlock scopes, and seccomp
//!   for signals on kernels before them): it may not signal, or connect to
//!   an abstract socket of, any process outside its own sandbox, so not
//!   the daemon, the owner's programs or other workers;
//! - **sockets and everything else a worker never calls** (seccomp):
//!   `socket(2)` fails with `EACCES`, for every family, so no UDP, raw,
//!   netlink or Unix socket either (so not the daemon's API socket); so
//!   does io_uring, which could open one without passing through seccomp,
//!   and the calls that reach beyond the process (`DENIED`): other
//!   processes' memory, file descriptors and priorities, its own priority,
//!   what the owner's programs share by user id (System V IPC, POSIX
//!   message queues), and the metadata of files (mode, owner, extended
//!   attributes, times), which Landlock does not govern;
//! - **privileges**: it gives up every capability, which only a daemon run
//!   as root would have passed on.
//!
//! The daemon still controls the worker from outside: it signals it,
//! stops and resumes it, and reads its `/proc` entries. A kernel without
//! Landlock (before 5.13, or without it enabled) or with an older ABI gets
//! what it supports; the worker reports what was enforced and `spare
//! status` shows it.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, Ruleset, RulesetAttr, RulesetCreatedAttr,
    RulesetStatus, Scope, path_beneath_rules,
};
use serde::{Deserialize, Serialize};

use self::capabilities::drop_capabilities;
use self::filter::filter_calls;

mod capabilities;
mod filter;

/// The Landlock ABI whose rights a worker asks for: 6 brings the signal and
/// abstract-socket scopes, 4 brought TCP.
const WANTED_ABI: ABI = ABI::V6;

/// Where a worker may go in the file system.
#[derive(Clone, Debug, Default)]
pub struct Confinement {
    /// Directories it may read (the blob store; a worker's cache too).
    pub read: Vec<PathBuf>,
    /// Directories it may read and write (the compiled-module cache, for
    /// the compiler alone).
    pub write: Vec<PathBuf>,
}

/// What a worker could take from itself, as it reports to the daemon.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfineReport {
    /// The kernel's Landlock ABI version; 0 without Landlock.
    pub landlock_abi: u32,
    /// Files outside the blob store and the cache are out of reach.
    pub files: bool,
    /// TCP connect and bind are refused.
    pub tcp: bool,
    /// Signals to processes outside the worker are refused.
    pub signals: bool,
    /// `socket(2)`, io_uring and the other `DENIED` calls are refused.
    pub sockets: bool,
    /// It holds no capabilities (a daemon run as root would otherwise
    /// give its workers all of root's).
    pub privileges: bool,
    /// What could not be done, and why.
    pub notes: Vec<String>,
}

impl ConfineReport {
    /// `confined: files, TCP, signals, sockets`, and what is missing, for
    /// humans.
    pub fn describe(&self) -> String {
        let mut held = Vec::new();
        let mut open = Vec::new();
        for (on, what) in [
            (self.files, "files"),
            (self.tcp, "TCP"),
            (self.signals, "signals"),
            (self.sockets, "sockets"),
            (self.privileges, "privileges"),
        ] {
            if on { &mut held } else { &mut open }.push(what);
        }
        let mut text = if held.is_empty() {
            "not confined".to_owned()
        } else {
            format!("confined: {}", held.join(", "))
        };
        if !open.is_empty() && !held.is_empty() {
            text.push_str(&format!("; not {}", open.join(", ")));
        }
        text
    }
}

/// Confines the calling process as `confinement` says. Call it before
/// starting any thread: threads started later inherit it, earlier ones do
/// not.
pub fn confine(confinement: &Confinement) -> ConfineReport {
    let mut report = ConfineReport {
        landlock_abi: landlock_abi(),
        ..ConfineReport::default()
    };
    // Landlock skips a directory it cannot open, and the worker could then
    // never use it: the cache is made if it went missing, and a missing
    // blob store is said.
    for dir in &confinement.write {
        let _ = std::fs::create_dir_all(dir);
    }
    for dir in confinement.read.iter().chain(&confinement.write) {
        if !dir.is_dir() {
            report.notes.push(format!(
                "{} is not a directory: workers cannot open anything in it",
                dir.display()
            ));
        }
    }
    match landlock(confinement, report.landlock_abi) {
        Ok(status) if status != RulesetStatus::NotEnforced => {
            let abi = report.landlock_abi;
            report.files = !confinement.read.is_empty() || !confinement.write.is_empty();
            report.tcp = abi >= 4;
            report.signals = abi >= 6;
        }
        Ok(_) => report
            .notes
            .push("Landlock is not available in this kernel".into()),
        Err(e) => report.notes.push(format!("Landlock refused: {e}")),
    }
    match filter_calls() {
        Ok(()) => {
            report.sockets = true;
            report.signals = true;
        }
        Err(e) => report
            .notes
            .push(format!("seccomp refused the system call filter: {e}")),
    }
    match drop_capabilities() {
        Ok(()) => report.privileges = true,
        Err(e) => report
            .notes
            .push(format!("cannot give up its capabilities: {e}")),
    }
    report
}

/// The kernel's Landlock ABI version, 0 if it has none.
fn landlock_abi() -> u32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: with a null attribute, a size of 0 and the VERSION flag, the
    // call only returns a number.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(version).unwrap_or(0)
}

fn landlock(confinement: &Confinement, abi: u32) -> Result<RulesetStatus, landlock::RulesetError> {
    let files = !confinement.read.is_empty() || !confinement.write.is_empty();
    if !files && abi < 4 {
        // Nothing this kernel's Landlock could take.
        return Ok(RulesetStatus::NotEnforced);
    }
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let write: BitFlags<AccessFs> = read
        | AccessFs::WriteFile
        | AccessFs::MakeReg
        | AccessFs::MakeDir
        | AccessFs::RemoveFile
        | AccessFs::RemoveDir
        | AccessFs::Refer
        | AccessFs::Truncate;
    let mut ruleset = Ruleset::default();
    if files {
        ruleset = ruleset.handle_access(AccessFs::from_all(WANTED_ABI))?;
    }
    if abi >= 4 {
        ruleset = ruleset.handle_access(AccessNet::from_all(WANTED_ABI))?;
    }
    if abi >= 6 {
        ruleset = ruleset.scope(Scope::from_all(WANTED_ABI))?;
    }
    let mut created = ruleset.create()?;
    if files {
        created = created
            .add_rules(path_beneath_rules(&confinement.read, read))?
            .add_rules(path_beneath_rules(&confinement.write, write))?;
    }
    Ok(created.restrict_self()?.ruleset)
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::path::Path;
    use std::process::Command;

    use super::*;

    /// Set in the process the confinement test starts: where its files are,
    /// the port of a listener to try to reach, and the pid to try to signal.
    const PROBE: &str = "SPARE_CONFINE_PROBE";

    /// Confinement is for good, so it is tried in a fresh process: this
    /// test binary again, running only this test, which then probes.
    #[test]
    fn a_confined_process_reaches_only_what_it_was_given() {
        if let Ok(setup) = std::env::var(PROBE) {
            std::process::exit(probe(&setup));
        }
        let dir = tempfile::tempdir().unwrap();
        for sub in ["blobs", "cache"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        std::fs::write(dir.path().join("blobs/module"), b"wasm").unwrap();
        std::fs::write(dir.path().join("key"), b"secret").unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let setup = format!("{}|{port}|{}", dir.path().display(), std::process::id());
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "confine::tests::a_confined_process_reaches_only_what_it_was_given",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(PROBE, setup)
            .output()
            .unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "the probe found:\n{said}");
        assert!(said.contains("probe done"), "{said}");
    }

    /// In the confined process: tries what a worker that broke out of
    /// wasmtime would try. Returns the exit code: 0 if everything was as
    /// expected for this kernel's Landlock ABI.
    fn probe(setup: &str) -> i32 {
        let mut parts = setup.split('|');
        let (Some(dir), Some(port), Some(parent)) = (parts.next(), parts.next(), parts.next())
        else {
            eprintln!("bad probe setup {setup:?}");
            return 2;
        };
        let dir = Path::new(dir);
        let port: u16 = port.parse().unwrap_or(0);
        let parent: libc::pid_t = parent.parse().unwrap_or(0);
        let abi = landlock_abi();
        let confinement = Confinement {
            read: vec![dir.join("blobs")],
            write: vec![dir.join("cache")],
        };
        let mut wrong = Vec::new();
        let mut expect = |what: &str, allowed: bool, result: std::io::Result<()>| {
            if result.is_ok() != allowed {
                wrong.push(format!(
                    "{what}: expected {}, got {result:?}",
                    if allowed { "success" } else { "refusal" }
                ));
            }
        };
        if let Err(e) = landlock(&confinement, abi) {
            eprintln!("Landlock refused: {e}");
            return 2;
        }
        let files = abi >= 1;
        let read = |path: &Path| {
            let mut text = String::new();
            std::fs::File::open(path)?
                .read_to_string(&mut text)
                .map(drop)
        };
        expect("read a blob", true, read(&dir.join("blobs/module")));
        expect(
            "write to the cache",
            true,
            std::fs::File::create(dir.join("cache/entry")).and_then(|mut f| f.write_all(b"x")),
        );
        expect("read the node key", !files, read(&dir.join("key")));
        expect("read /etc/passwd", !files, read(Path::new("/etc/passwd")));
        expect(
            "write to the blob store",
            !files,
            std::fs::write(dir.join("blobs/planted"), b"x"),
        );
        expect(
            "execute a program",
            !files,
            Command::new("/bin/true").status().map(drop),
        );
        expect(
            "connect over TCP",
            abi < 4,
            std::net::TcpStream::connect(("127.0.0.1", port)).map(drop),
        );
        // SAFETY: kill with signal 0 only checks that it would be allowed.
        let signalled = unsafe { libc::kill(parent, 0) };
        expect(
            "signal the process outside",
            abi < 6,
            if signalled == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            },
        );
        if let Err(e) = filter_calls() {
            eprintln!("seccomp refused: {e}");
            return 2;
        }
        expect(
            "open a UDP socket",
            false,
            std::net::UdpSocket::bind("127.0.0.1:0").map(drop),
        );
        expect(
            "open a Unix socket",
            false,
            std::os::unix::net::UnixDatagram::unbound().map(drop),
        );
        // io_uring could open sockets behind seccomp's back.
        let mut params = [0u8; 120];
        // SAFETY: io_uring_setup reads and writes `params`, which is as
        // large as the kernel's `struct io_uring_params`.
        let ring = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
        expect(
            "set up an io_uring",
            false,
            if ring >= 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            },
        );
        // Refused by the filter (`EACCES`), not for want of a terminal or
        // of privileges, which would fail these calls just the same.
        let raw = |result: libc::c_long| {
            let error = std::io::Error::last_os_error();
            if result < 0 && error.raw_os_error() == Some(libc::EACCES) {
                Err(error)
            } else {
                Ok(())
            }
        };
        // SAFETY: with a namespace flag the filter refuses the call; were it
        // let through, the child would exit at once.
        let child = unsafe {
            libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0usize,
                0usize,
                0usize,
                0usize,
            )
        };
        if child == 0 {
            // SAFETY: the child of a clone that should not have happened.
            unsafe { libc::_exit(0) };
        }
        expect("clone into a new user namespace", false, raw(child));
        // SAFETY: TIOCSTI reads one byte from the pointer given; the
        // filter answers first.
        let typed = unsafe { libc::ioctl(2, libc::TIOCSTI, c"x".as_ptr()) };
        expect("type into a terminal", false, raw(typed.into()));
        // SAFETY: fsopen takes a C string and flags.
        let fs = unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), 0u32) };
        expect("open a file system to mount", false, raw(fs));
        // SAFETY: clone3 with no arguments; the filter answers first.
        let clone3 = unsafe { libc::syscall(libc::SYS_clone3, 0usize, 0usize) };
        let enosys = std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS);
        expect(
            "clone3, which must look missing",
            false,
            if clone3 >= 0 || !enosys {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            },
        );
        expect(
            "start a thread (clone without namespaces)",
            true,
            std::thread::spawn(|| ())
                .join()
                .map_err(|_| std::io::Error::other("panicked")),
        );
        expect(
            "execute a program",
            false,
            Command::new("/bin/true").status().map(drop),
        );
        // Landlock refuses running files too; the filter refuses the call
        // itself (unfiltered, these null arguments fail with EFAULT).
        for call in [libc::SYS_execve, libc::SYS_execveat] {
            // SAFETY: null pointers; the filter answers before the kernel
            // would read them.
            let exec = unsafe { libc::syscall(call, 0usize, 0usize, 0usize, 0usize, 0usize) };
            expect("call execve or execveat", false, raw(exec));
        }
        // Other processes: signals, pidfds, limits, priorities; and its
        // own priority. Its own signals and limits stay allowed (its pause
        // handler stops itself; the C library reads its own limits).
        // SAFETY: getpid cannot fail.
        let own = unsafe { libc::getpid() };
        let ok = |result: libc::c_long| {
            if result >= 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        // SAFETY: each call takes integers, null pointers, C strings and
        // pointers to locals living across it; signal 0 only checks that a
        // signal would be allowed.
        let refused = unsafe {
            [
                (
                    "signal the process outside",
                    raw(libc::kill(parent, 0).into()),
                ),
                (
                    "signal a thread outside",
                    raw(libc::syscall(libc::SYS_tgkill, parent, parent, 0)),
                ),
                (
                    "queue a signal outside",
                    raw(libc::syscall(libc::SYS_rt_sigqueueinfo, parent, 0, 0usize)),
                ),
                (
                    "open a pidfd of the process outside",
                    raw(libc::syscall(libc::SYS_pidfd_open, parent, 0)),
                ),
                (
                    "read the limits of the process outside",
                    raw(libc::syscall(
                        libc::SYS_prlimit64,
                        parent,
                        libc::RLIMIT_NOFILE,
                        0usize,
                        1usize,
                    )),
                ),
                (
                    "renice the process outside",
                    raw(libc::setpriority(libc::PRIO_PROCESS, parent.cast_unsigned(), 19).into()),
                ),
                (
                    "renice itself",
                    raw(libc::setpriority(libc::PRIO_PROCESS, 0, 19).into()),
                ),
                (
                    "leave its scheduling policy",
                    raw({
                        let param = libc::sched_param { sched_priority: 0 };
                        libc::sched_setscheduler(0, libc::SCHED_BATCH, &raw const param)
                    }
                    .into()),
                ),
                (
                    "move to other cores",
                    raw({
                        let mut cores: libc::cpu_set_t = std::mem::zeroed();
                        libc::CPU_SET(0, &mut cores);
                        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const cores)
                    }
                    .into()),
                ),
                (
                    "get System V shared memory",
                    raw(libc::shmget(libc::IPC_PRIVATE, 4096, 0o600).into()),
                ),
                (
                    "read the kernel's log",
                    raw(libc::syscall(libc::SYS_syslog, 10, 0usize, 0)),
                ),
            ]
        };
        // SAFETY: as above.
        let allowed = unsafe {
            [
                ("signal itself", ok(libc::kill(own, 0).into())),
                (
                    "signal its own thread",
                    ok(libc::syscall(libc::SYS_tgkill, own, libc::gettid(), 0)),
                ),
                (
                    "open a pidfd of itself",
                    ok(libc::syscall(libc::SYS_pidfd_open, own, 0)),
                ),
                (
                    "read its own limits",
                    ok({
                        let mut limit: libc::rlimit = std::mem::zeroed();
                        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit)
                    }
                    .into()),
                ),
                (
                    "read its own limits by its pid",
                    ok({
                        let mut limit: libc::rlimit = std::mem::zeroed();
                        libc::prlimit(own, libc::RLIMIT_NOFILE, std::ptr::null(), &raw mut limit)
                    }
                    .into()),
                ),
            ]
        };
        // Files' metadata, which Landlock leaves alone: refused even for a
        // file the worker may read, but for the times of one it opened.
        let key = std::ffi::CString::new(dir.join("key").into_os_string().into_encoded_bytes())
            .unwrap_or_default();
        let blob = std::fs::File::open(dir.join("blobs/module"));
        let blob_fd = blob.as_ref().map_or(-1, std::os::fd::AsRawFd::as_raw_fd);
        // SAFETY: each call takes integers, null pointers and `key`, a C
        // string living across it.
        let metadata = unsafe {
            [
                (
                    "make the key readable to all",
                    raw(libc::chmod(key.as_ptr(), 0o644).into()),
                ),
                (
                    "change a blob's mode",
                    raw(libc::fchmod(blob_fd, 0o644).into()),
                ),
                (
                    "give the key away",
                    raw(libc::chown(key.as_ptr(), libc::getuid(), libc::getgid()).into()),
                ),
                (
                    "set an extended attribute",
                    raw(libc::setxattr(
                        key.as_ptr(),
                        c"user.spare".as_ptr(),
                        std::ptr::null(),
                        0,
                        0,
                    )
                    .into()),
                ),
                (
                    "set the key's times by its path",
                    raw(libc::utimensat(libc::AT_FDCWD, key.as_ptr(), std::ptr::null(), 0).into()),
                ),
                (
                    "watch the key",
                    raw(libc::inotify_add_watch(
                        libc::inotify_init1(0),
                        key.as_ptr(),
                        libc::IN_ACCESS,
                    )
                    .into()),
                ),
            ]
        };
        for (what, result) in refused.into_iter().chain(metadata) {
            expect(what, false, result);
        }
        for (what, result) in allowed {
            expect(what, true, result);
        }
        expect(
            "mark a blob it opened as used",
            true,
            blob.and_then(|file| file.set_modified(std::time::SystemTime::now())),
        );

        // Capabilities: a process run as root holds them until it gives
        // them up.
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let held = capabilities::capabilities().is_ok_and(|[effective, ..]| effective != 0);
        expect(
            "hold capabilities (as root only)",
            root,
            if held {
                Ok(())
            } else {
                Err(std::io::Error::other("holds none"))
            },
        );
        expect("give up its capabilities", true, drop_capabilities());
        expect(
            "hold none after",
            true,
            match capabilities::capabilities() {
                Ok([0, 0, 0]) => Ok(()),
                other => Err(std::io::Error::other(format!("{other:x?}"))),
            },
        );
        for line in &wrong {
            eprintln!("{line}");
        }
        eprintln!("probe done (Landlock ABI {abi})");
        i32::from(!wrong.is_empty())
    }

    #[test]
    fn reports_say_what_is_held_and_what_is_not() {
        let all = ConfineReport {
            landlock_abi: 7,
            files: true,
            tcp: true,
            signals: true,
            sockets: true,
            privileges: true,
            notes: Vec::new(),
        };
        assert_eq!(
            all.describe(),
            "confined: files, TCP, signals, sockets, privileges"
        );
        let old_kernel = ConfineReport {
            landlock_abi: 3,
            tcp: false,
            privileges: false,
            ..all.clone()
        };
        assert_eq!(
            old_kernel.describe(),
            "confined: files, signals, sockets; not TCP, privileges"
        );
        assert_eq!(ConfineReport::default().describe(), "not confined");
    }
}

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
//! - **signals and abstract Unix sockets** (Landlock scopes): it may not
//!   signal, or connect to an abstract socket of, any process outside its
//!   own sandbox, so not the daemon, the owner's programs or other workers;
//! - **sockets** (seccomp): `socket(2)` fails with `EACCES`, for every
//!   family, so no UDP, raw, netlink or Unix socket either (so not the
//!   daemon's API socket); so does io_uring, which could open one without
//!   passing through seccomp, and a few more calls that reach beyond the
//!   process (`DENIED`).
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
    match deny_sockets() {
        Ok(()) => report.sockets = true,
        Err(e) => report
            .notes
            .push(format!("seccomp refused the socket filter: {e}")),
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

/// System calls a worker never makes, refused by its seccomp filter:
/// sockets of any family, io_uring (whose operations, sockets among them,
/// never pass through seccomp), running programs, and what would reach
/// beyond the process (other processes' memory, kernel keys, BPF,
/// namespaces, mounts old and new, modules).
#[cfg(target_arch = "x86_64")]
const DENIED: [libc::c_long; 33] = [
    libc::SYS_socket,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
];

/// `clone` flags that make new namespaces, refused like `unshare`. (Its
/// flag `CLONE_NEWTIME` only `clone3` and `unshare` take.)
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// Installs a seccomp filter under which the [`DENIED`] calls fail with
/// `EACCES`, as do `clone` with [`CLONE_NAMESPACES`] flags, the terminal
/// `ioctl`s `TIOCSTI` and `TIOCLINUX`, and every call of another ABI
/// (i386, x32). `clone3`, whose flags sit in memory a
/// filter cannot read, fails with `ENOSYS`, so that the C library falls
/// back to `clone` for new threads.
#[cfg(target_arch = "x86_64")]
fn deny_sockets() -> std::io::Result<()> {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W, sock_filter,
    };

    /// `AUDIT_ARCH_X86_64`: the architecture a seccomp filter sees.
    const ARCH: u32 = 0xc000_003e;
    /// System calls of the x32 ABI have this bit set in their number.
    const X32_BIT: u32 = 0x4000_0000;
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    /// The low halves of a call's first and second arguments
    /// (little-endian).
    const ARG0_OFFSET: u32 = 16;
    const ARG1_OFFSET: u32 = 24;
    const TIOCSTI: u32 = 0x5412;
    const TIOCLINUX: u32 = 0x541c;
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | u32::try_from(e).unwrap_or(1);
    let (denied, missing) = (errno(libc::EACCES), errno(libc::ENOSYS));
    let call = |nr: libc::c_long| u32::try_from(nr).unwrap_or(u32::MAX);
    let stmt = |code: u32, k: u32| sock_filter {
        code: u16::try_from(code).unwrap_or(0),
        jt: 0,
        jf: 0,
        k,
    };
    // Where the program's ends are: after the checks of the call number
    // (which fall through to "allow", at `checks`), these, in this order.
    let checks = 8 + DENIED.len();
    let (deny, enosys, clone) = (checks + 1, checks + 2, checks + 3);
    let ioctl = clone + 4;
    // A jump from instruction `at` to `target` (both absolute; BPF jumps
    // only forward, counting the instructions skipped).
    let to = |at: usize, target: usize| u8::try_from(target - at - 1).unwrap_or(u8::MAX);
    let jump = |at: usize, code: u32, k: u32, jt: usize, jf: usize| sock_filter {
        code: u16::try_from(code).unwrap_or(0),
        jt: to(at, jt),
        jf: to(at, jf),
        k,
    };
    let mut program = vec![
        // Another architecture's calls (int 0x80) have other numbers.
        stmt(BPF_LD | BPF_W | BPF_ABS, ARCH_OFFSET),
        jump(1, BPF_JMP | BPF_JEQ | BPF_K, ARCH, 3, 2),
        stmt(BPF_RET | BPF_K, denied),
        stmt(BPF_LD | BPF_W | BPF_ABS, NR_OFFSET),
        jump(4, BPF_JMP | BPF_JGE | BPF_K, X32_BIT, deny, 5),
        jump(
            5,
            BPF_JMP | BPF_JEQ | BPF_K,
            call(libc::SYS_clone3),
            enosys,
            6,
        ),
        jump(
            6,
            BPF_JMP | BPF_JEQ | BPF_K,
            call(libc::SYS_clone),
            clone,
            7,
        ),
        jump(
            7,
            BPF_JMP | BPF_JEQ | BPF_K,
            call(libc::SYS_ioctl),
            ioctl,
            8,
        ),
    ];
    for (n, nr) in DENIED.iter().enumerate() {
        let at = 8 + n;
        program.push(jump(at, BPF_JMP | BPF_JEQ | BPF_K, call(*nr), deny, at + 1));
    }
    program.extend([
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET | BPF_K, denied),
        stmt(BPF_RET | BPF_K, missing),
        // `clone`: its flags are its first argument.
        stmt(BPF_LD | BPF_W | BPF_ABS, ARG0_OFFSET),
        jump(
            clone + 1,
            BPF_JMP | BPF_JSET | BPF_K,
            u32::try_from(CLONE_NAMESPACES).unwrap_or(u32::MAX),
            clone + 2,
            clone + 3,
        ),
        stmt(BPF_RET | BPF_K, denied),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
        // `ioctl`: no faking input on, or reaching into, a terminal the
        // worker may have inherited (its request is its second argument).
        stmt(BPF_LD | BPF_W | BPF_ABS, ARG1_OFFSET),
        jump(
            ioctl + 1,
            BPF_JMP | BPF_JEQ | BPF_K,
            TIOCSTI,
            ioctl + 4,
            ioctl + 2,
        ),
        jump(
            ioctl + 2,
            BPF_JMP | BPF_JEQ | BPF_K,
            TIOCLINUX,
            ioctl + 4,
            ioctl + 3,
        ),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
        stmt(BPF_RET | BPF_K, denied),
    ]);
    debug_assert_eq!(program.len(), ioctl + 5);
    let filter = libc::sock_fprog {
        len: u16::try_from(program.len()).unwrap_or(0),
        filter: program.as_ptr().cast_mut(),
    };
    // SAFETY: prctl with these options takes plain integers; a process may
    // always give up privileges it could gain through exec.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `filter` points at `program`, which outlives the call; the
    // kernel copies the program.
    let installed = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            &raw const filter,
            0,
            0,
        )
    };
    if installed != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(target_arch = "x86_64"))]
fn deny_sockets() -> std::io::Result<()> {
    Err(std::io::Error::other(
        "the socket filter is written for x86_64 only",
    ))
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
        if let Err(e) = deny_sockets() {
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
        // SAFETY: getpid cannot fail; signalling ourselves stays allowed.
        let own = unsafe { libc::kill(libc::getpid(), 0) };
        expect(
            "signal itself",
            true,
            if own == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
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
            notes: Vec::new(),
        };
        assert_eq!(all.describe(), "confined: files, TCP, signals, sockets");
        let old_kernel = ConfineReport {
            landlock_abi: 3,
            files: true,
            tcp: false,
            signals: false,
            ..all.clone()
        };
        assert_eq!(
            old_kernel.describe(),
            "confined: files, sockets; not TCP, signals"
        );
        assert_eq!(ConfineReport::default().describe(), "not confined");
    }
}

//! The worker's seccomp filter: the system calls it never makes, and
//! those it may make only on itself.

/// System calls a worker never makes, refused by its seccomp filter:
/// sockets of any family, io_uring (whose operations, sockets among them,
/// never pass through seccomp), running programs, and what would reach
/// beyond the process: other processes' memory, file descriptors and
/// priorities, kernel keys, BPF, namespaces, mounts old and new, modules,
/// the kernel's log, System V and POSIX message queues and shared memory
/// (shared with the owner's programs by user id), watches on files, and
/// the metadata of files, which Landlock does not govern (a worker could
/// otherwise make the owner's files readable to everyone, or take them
/// away from the owner).
#[cfg(target_arch = "x86_64")]
const DENIED: [libc::c_long; 85] = [
    // Sockets and what opens them unseen.
    libc::SYS_socket,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // Programs.
    libc::SYS_execve,
    libc::SYS_execveat,
    // Other processes.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_process_madvise,
    libc::SYS_process_mrelease,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_tkill,
    libc::SYS_kcmp,
    libc::SYS_migrate_pages,
    libc::SYS_move_pages,
    // Priorities: a worker keeps the one it took before confining itself,
    // and changes no other process's.
    libc::SYS_setpriority,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_setparam,
    libc::SYS_sched_setattr,
    libc::SYS_sched_setaffinity,
    libc::SYS_ioprio_set,
    // The kernel's facilities.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_syslog,
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
    // What the owner's programs share by user id.
    libc::SYS_shmget,
    libc::SYS_shmat,
    libc::SYS_shmctl,
    libc::SYS_semget,
    libc::SYS_semop,
    libc::SYS_semtimedop,
    libc::SYS_semctl,
    libc::SYS_msgget,
    libc::SYS_msgsnd,
    libc::SYS_msgrcv,
    libc::SYS_msgctl,
    libc::SYS_mq_open,
    libc::SYS_mq_unlink,
    // Files: watches, handles and metadata, outside Landlock's reach.
    libc::SYS_inotify_add_watch,
    libc::SYS_fanotify_init,
    libc::SYS_fanotify_mark,
    libc::SYS_name_to_handle_at,
    libc::SYS_open_by_handle_at,
    libc::SYS_chmod,
    libc::SYS_fchmod,
    libc::SYS_fchmodat,
    libc::SYS_fchmodat2,
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
    libc::SYS_setxattr,
    libc::SYS_lsetxattr,
    libc::SYS_fsetxattr,
    libc::SYS_removexattr,
    libc::SYS_lremovexattr,
    libc::SYS_fremovexattr,
    SYS_SETXATTRAT,
    SYS_REMOVEXATTRAT,
    libc::SYS_utime,
    libc::SYS_utimes,
    libc::SYS_futimesat,
];

/// `setxattrat` and `removexattrat` (Linux 6.13), which the libc crate
/// does not name yet.
#[cfg(target_arch = "x86_64")]
const SYS_SETXATTRAT: libc::c_long = 463;
#[cfg(target_arch = "x86_64")]
const SYS_REMOVEXATTRAT: libc::c_long = 466;

/// Calls whose first argument names a process, allowed only when it names
/// the worker itself: signals (`kill`, `tgkill`, `rt_sigqueueinfo`,
/// `rt_tgsigqueueinfo`), pidfds (`pidfd_open`) and, with 0 for itself too,
/// resource limits (`prlimit64`). The kernel reads a pid as 32 bits, the
/// half of the argument the filter compares.
#[cfg(target_arch = "x86_64")]
const OWN_PROCESS_ONLY: [libc::c_long; 5] = [
    libc::SYS_kill,
    libc::SYS_tgkill,
    libc::SYS_rt_sigqueueinfo,
    libc::SYS_rt_tgsigqueueinfo,
    libc::SYS_pidfd_open,
];

/// Calls numbered below this (`read`, `write`, `mmap`, `mprotect`,
/// `rt_sigprocmask` and the like) are allowed at once: none is refused or
/// checked (`the_calls_allowed_at_once_are_never_checked`).
const FIRST_CHECKED: u32 = 16;

/// `clone` flags that make new namespaces, refused like `unshare`. (Its
/// flag `CLONE_NEWTIME` only `clone3` and `unshare` take.)
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u64;

/// Where a jump of the filter goes: on to the next instruction, or to one
/// of the program's named places, resolved when it is finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum To {
    Next,
    Allow,
    Deny,
    Missing,
    Clone,
    Ioctl,
    OwnProcess,
    OwnLimits,
    OpenFileTimes,
}

/// A classic BPF program under construction. Jumps go only forward, at
/// most 255 instructions; [`Bpf::finish`] checks both.
#[derive(Default)]
struct Bpf {
    code: Vec<libc::sock_filter>,
    /// Where each jump goes when its test holds and when it does not.
    jumps: Vec<(usize, To, To)>,
    places: Vec<(To, usize)>,
}

impl Bpf {
    fn op(&mut self, code: u32, k: u32) {
        self.code.push(libc::sock_filter {
            code: u16::try_from(code).unwrap_or(u16::MAX),
            jt: 0,
            jf: 0,
            k,
        });
    }

    /// Loads the 32-bit word at `offset` of the call's `seccomp_data`.
    fn load(&mut self, offset: u32) {
        self.op(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, offset);
    }

    fn ret(&mut self, action: u32) {
        self.op(libc::BPF_RET | libc::BPF_K, action);
    }

    /// Jumps to `yes` if the loaded word compares with `k` as `test` says
    /// (`BPF_JEQ`, `BPF_JGE`, `BPF_JSET`), else to `no`.
    fn jump(&mut self, test: u32, k: u32, yes: To, no: To) {
        self.jumps.push((self.code.len(), yes, no));
        self.op(libc::BPF_JMP | test | libc::BPF_K, k);
    }

    /// Names the place of the next instruction.
    fn place(&mut self, name: To) {
        self.places.push((name, self.code.len()));
    }

    fn finish(mut self) -> std::io::Result<Vec<libc::sock_filter>> {
        let places = std::mem::take(&mut self.places);
        let offset = |from: usize, to: To| -> std::io::Result<u8> {
            if to == To::Next {
                return Ok(0);
            }
            let target = places
                .iter()
                .find(|(name, _)| *name == to)
                .map(|&(_, at)| at)
                .ok_or_else(|| std::io::Error::other(format!("filter: no place {to:?}")))?;
            target
                .checked_sub(from + 1)
                .and_then(|skip| u8::try_from(skip).ok())
                .ok_or_else(|| std::io::Error::other(format!("filter: cannot jump to {to:?}")))
        };
        for &(at, yes, no) in &self.jumps {
            let (jt, jf) = (offset(at, yes)?, offset(at, no)?);
            self.code[at].jt = jt;
            self.code[at].jf = jf;
        }
        Ok(self.code)
    }
}

/// Installs a seccomp filter under which the [`DENIED`] calls fail with
/// `EACCES`, as do the [`OWN_PROCESS_ONLY`] calls naming another process,
/// `clone` with [`CLONE_NAMESPACES`] flags, `utimensat` on a path rather
/// than a file the worker holds open (it marks the cached artifacts it
/// uses), the terminal `ioctl`s `TIOCSTI` and `TIOCLINUX`, and every call
/// of another ABI (i386, x32). `clone3`, whose flags sit in memory a
/// filter cannot read, fails with `ENOSYS`, so that the C library falls
/// back to `clone` for new threads.
#[cfg(target_arch = "x86_64")]
pub(super) fn filter_calls() -> std::io::Result<()> {
    use libc::{BPF_JEQ, BPF_JGE, BPF_JSET};

    /// `AUDIT_ARCH_X86_64`: the architecture a seccomp filter sees.
    const ARCH: u32 = 0xc000_003e;
    /// System calls of the x32 ABI have this bit set in their number.
    const X32_BIT: u32 = 0x4000_0000;
    const ARCH_OFFSET: u32 = 4;
    const NR_OFFSET: u32 = 0;
    /// The halves of a call's first and second arguments (little-endian).
    const ARG0_OFFSET: u32 = 16;
    const ARG1_OFFSET: u32 = 24;
    const ARG1_HIGH_OFFSET: u32 = 28;
    const TIOCSTI: u32 = 0x5412;
    const TIOCLINUX: u32 = 0x541c;
    let errno = |e: i32| libc::SECCOMP_RET_ERRNO | u32::try_from(e).unwrap_or(1);
    let call = |nr: libc::c_long| u32::try_from(nr).unwrap_or(u32::MAX);
    let own = std::process::id();

    let mut bpf = Bpf::default();
    // Another architecture's calls (int 0x80) have other numbers.
    bpf.load(ARCH_OFFSET);
    bpf.jump(BPF_JEQ, ARCH, To::Next, To::Deny);
    bpf.load(NR_OFFSET);
    bpf.jump(BPF_JGE, X32_BIT, To::Deny, To::Next);
    // The calls a guest's run makes most (reads, writes, memory, signal
    // masks, waits) are let through first, without the checks below.
    bpf.jump(BPF_JGE, FIRST_CHECKED, To::Next, To::Allow);
    bpf.jump(BPF_JEQ, call(libc::SYS_futex), To::Allow, To::Next);
    bpf.jump(BPF_JEQ, call(libc::SYS_madvise), To::Allow, To::Next);
    bpf.jump(BPF_JEQ, call(libc::SYS_clone3), To::Missing, To::Next);
    bpf.jump(BPF_JEQ, call(libc::SYS_clone), To::Clone, To::Next);
    bpf.jump(BPF_JEQ, call(libc::SYS_ioctl), To::Ioctl, To::Next);
    bpf.jump(BPF_JEQ, call(libc::SYS_prlimit64), To::OwnLimits, To::Next);
    bpf.jump(
        BPF_JEQ,
        call(libc::SYS_utimensat),
        To::OpenFileTimes,
        To::Next,
    );
    for nr in OWN_PROCESS_ONLY {
        bpf.jump(BPF_JEQ, call(nr), To::OwnProcess, To::Next);
    }
    for nr in DENIED {
        bpf.jump(BPF_JEQ, call(nr), To::Deny, To::Next);
    }
    bpf.ret(libc::SECCOMP_RET_ALLOW);
    // `clone`: its flags are its first argument.
    bpf.place(To::Clone);
    bpf.load(ARG0_OFFSET);
    let namespaces = u32::try_from(CLONE_NAMESPACES).unwrap_or(u32::MAX);
    bpf.jump(BPF_JSET, namespaces, To::Deny, To::Allow);
    // `ioctl`: no faking input on, or reaching into, a terminal the worker
    // may have inherited (its request is its second argument).
    bpf.place(To::Ioctl);
    bpf.load(ARG1_OFFSET);
    bpf.jump(BPF_JEQ, TIOCSTI, To::Deny, To::Next);
    bpf.jump(BPF_JEQ, TIOCLINUX, To::Deny, To::Allow);
    // `prlimit64`: its own limits, as 0 or by its pid.
    bpf.place(To::OwnLimits);
    bpf.load(ARG0_OFFSET);
    bpf.jump(BPF_JEQ, 0, To::Allow, To::OwnProcess);
    bpf.place(To::OwnProcess);
    bpf.load(ARG0_OFFSET);
    bpf.jump(BPF_JEQ, own, To::Allow, To::Deny);
    // `utimensat(fd, NULL, ...)`, which is `futimens`: the times of a file
    // it opened, which Landlock let it open.
    bpf.place(To::OpenFileTimes);
    bpf.load(ARG1_OFFSET);
    bpf.jump(BPF_JEQ, 0, To::Next, To::Deny);
    bpf.load(ARG1_HIGH_OFFSET);
    bpf.jump(BPF_JEQ, 0, To::Allow, To::Deny);
    bpf.place(To::Allow);
    bpf.ret(libc::SECCOMP_RET_ALLOW);
    bpf.place(To::Deny);
    bpf.ret(errno(libc::EACCES));
    bpf.place(To::Missing);
    bpf.ret(errno(libc::ENOSYS));
    let program = bpf.finish()?;

    let filter = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| std::io::Error::other("filter: too long"))?,
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
pub(super) fn filter_calls() -> std::io::Result<()> {
    Err(std::io::Error::other(
        "the system call filter is written for x86_64 only",
    ))
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;

    #[test]
    fn the_calls_allowed_at_once_are_never_checked() {
        let checked = [
            libc::SYS_clone3,
            libc::SYS_clone,
            libc::SYS_ioctl,
            libc::SYS_prlimit64,
            libc::SYS_utimensat,
        ];
        for nr in DENIED.iter().chain(&OWN_PROCESS_ONLY).chain(&checked) {
            assert!(*nr >= libc::c_long::from(FIRST_CHECKED), "call {nr}");
            assert!(
                *nr != libc::SYS_futex && *nr != libc::SYS_madvise,
                "call {nr}"
            );
        }
    }
}

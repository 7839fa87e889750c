//! Giving up the capabilities a daemon run as root passes on.

/// `_LINUX_CAPABILITY_VERSION_3`: capability sets of 64 bits, in two
/// halves.
const CAPABILITY_VERSION: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

impl CapHeader {
    /// Version 3, for the calling process.
    fn own() -> Self {
        Self {
            version: CAPABILITY_VERSION,
            pid: 0,
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// The calling process's capabilities: effective, permitted, inheritable,
/// each 64 bits.
pub(super) fn capabilities() -> std::io::Result<[u64; 3]> {
    let mut header = CapHeader::own();
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 of capget writes two `CapData` into `data`.
    let got = unsafe { libc::syscall(libc::SYS_capget, &raw mut header, data.as_mut_ptr()) };
    if got != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let join = |low: u32, high: u32| u64::from(low) | u64::from(high) << 32;
    let [low, high] = data;
    Ok([
        join(low.effective, high.effective),
        join(low.permitted, high.permitted),
        join(low.inheritable, high.inheritable),
    ])
}

/// Gives up every capability the process holds: a daemon run as root
/// starts its workers with all of them, and with them they could renice,
/// signal or trace any process and pass over every file's permissions.
/// The bounding set goes first, while `CAP_SETPCAP` is still held (a
/// process without it cannot shrink it, and has nothing there to gain:
/// workers run no program, and `no_new_privs` is set), then the ambient,
/// inheritable, permitted and effective sets. Succeeds when the process
/// holds none at the end.
pub(super) fn drop_capabilities() -> std::io::Result<()> {
    let [effective, permitted, inheritable] = capabilities()?;
    if effective | permitted | inheritable == 0 {
        return Ok(());
    }
    for cap in 0..64 {
        // SAFETY: prctl with these options takes plain integers.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            // EINVAL: past the kernel's last capability.
            break;
        }
    }
    // SAFETY: as above.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        );
    }
    let mut header = CapHeader::own();
    let none = [CapData::default(); 2];
    // SAFETY: version 3 of capset reads two `CapData` from `none`.
    let set = unsafe { libc::syscall(libc::SYS_capset, &raw mut header, none.as_ptr()) };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    match capabilities()? {
        [0, 0, 0] => Ok(()),
        held => Err(std::io::Error::other(format!(
            "still holds capabilities {held:x?}"
        ))),
    }
}

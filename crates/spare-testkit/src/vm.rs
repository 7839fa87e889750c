//! A virtual machine for tests that need a kernel set up unlike this
//! machine's: cgroup v2 with every controller, where the machine mounts
//! its CPU and memory controllers as v1 hierarchies.
//!
//! qemu boots a distribution kernel (an unpacked Debian `linux-image`
//! package, named by `SPARE_TEST_KERNEL`) with an initramfs made here: a
//! static busybox, the virtio and 9p modules, and an `/init` that mounts
//! this machine's root read-only over 9p, gives it a fresh `/proc`, `/sys`,
//! `/dev` and `/run` and a cgroup2 hierarchy at `/sys/fs/cgroup`, and runs
//! one command in it with `TMPDIR` in `/run` (this machine's `/tmp` stays
//! visible, read-only: a checkout or target directory may be there). So the guest runs the very binaries of this checkout,
//! with the host's libraries, and needs no image of its own. The command's
//! output and exit code come back through a second, writable 9p share.
//!
//! qemu emulates the CPU (TCG) unless `SPARE_TEST_VM_ACCEL` says otherwise
//! (`kvm` where nested virtualisation works; on this project's CI machines
//! a KVM guest hangs while the kernel boots). Emulation is tens of times
//! slower than the machine: tests run in it should check behaviour, not
//! speed.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A kernel to boot and the modules the initramfs needs from it.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// The compressed kernel image (`boot/vmlinuz-*`).
    pub image: PathBuf,
    /// The modules' `kernel/` directory (`lib/modules/<version>/kernel`).
    pub modules: PathBuf,
}

/// Modules loaded by `/init`, in dependency order, by path below the
/// modules' `kernel/` directory: virtio over PCI, then the 9p file system
/// on it.
const MODULES: [&str; 10] = [
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "fs/netfs/netfs.ko",
    "fs/fscache/fscache.ko",
    "net/9p/9pnet.ko",
    "net/9p/9pnet_virtio.ko",
    "fs/9p/9p.ko",
];

/// Where the guest sees the writable share: below its fresh `/run`.
const GUEST_SHARE: &str = "/run/spare-vm";

/// The guest's writable temporary directory (`TMPDIR`).
const GUEST_TMP: &str = "/run/tmp";

/// The guest's `/init`. Kernel parameters it does not know reach it as
/// environment variables (`spare_vm_script`).
const INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t devtmpfs dev /dev
for m in $MODULES; do $B insmod "/modules/$m" || echo "spare-vm: cannot load $m"; done
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=loose,ro host /mnt \
  || echo "spare-vm: cannot mount the host's root"
$B mount -t proc proc /mnt/proc
$B mount -t sysfs sys /mnt/sys
$B mount -t cgroup2 cgroup2 /mnt/sys/fs/cgroup
$B mount -t devtmpfs dev /mnt/dev
$B mount -t tmpfs run /mnt/run
$B mkdir -p /mnt/run/spare-vm /mnt/run/tmp
$B mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288 results /mnt/run/spare-vm \
  || echo "spare-vm: cannot mount the results share"
$B ip link set lo up
$B chroot /mnt /bin/sh /run/spare-vm/run.sh
$B poweroff -f
"#;

/// How a command in the virtual machine ended.
#[derive(Debug)]
pub struct Run {
    /// Its exit code; `None` when it never wrote one (the guest crashed or
    /// the command could not start).
    pub exit_code: Option<i32>,
    /// Its standard output and error, interleaved.
    pub output: String,
    /// What the kernel and `/init` printed on the serial console.
    pub console: String,
}

impl Kernel {
    /// The kernel unpacked in the directory named by `SPARE_TEST_KERNEL`
    /// (`dpkg-deb -x linux-image-<version>-amd64_*.deb <dir>`).
    pub fn from_env() -> Result<Self> {
        let dir = std::env::var_os("SPARE_TEST_KERNEL").context(
            "SPARE_TEST_KERNEL is not set: it names a directory holding an unpacked \
             linux-image package (.ci/run fetches one)",
        )?;
        Self::unpacked(Path::new(&dir))
    }

    /// The kernel of an unpacked `linux-image` package at `dir`.
    pub fn unpacked(dir: &Path) -> Result<Self> {
        let only = |parent: &Path, what: &str, pick: &dyn Fn(&str) -> bool| -> Result<PathBuf> {
            let mut found: Vec<PathBuf> = std::fs::read_dir(parent)
                .with_context(|| format!("cannot list {}", parent.display()))?
                .flatten()
                .filter(|e| e.file_name().to_str().is_some_and(pick))
                .map(|e| e.path())
                .collect();
            found.sort();
            match found.pop() {
                Some(path) if found.is_empty() => Ok(path),
                Some(_) => bail!("{} holds more than one {what}", parent.display()),
                None => bail!("{} holds no {what}", parent.display()),
            }
        };
        let image = only(&dir.join("boot"), "vmlinuz-*", &|n| {
            n.starts_with("vmlinuz-")
        })?;
        let version = only(&dir.join("lib/modules"), "module directory", &|_| true)?;
        let kernel = Self {
            image,
            modules: version.join("kernel"),
        };
        for module in MODULES {
            let path = kernel.modules.join(module);
            if !path.is_file() {
                bail!("the kernel has no module {}", path.display());
            }
        }
        Ok(kernel)
    }

    /// Boots the kernel and runs `command` (program and arguments) in
    /// directory `cwd` with `env` (shell variable names and values) added,
    /// on `cpus` virtual CPUs; kills the machine after `timeout`. The
    /// command sees this machine's files read-only, a fresh `/run` with its
    /// `TMPDIR`, and nothing of its network but loopback.
    pub fn run(
        &self,
        command: &[&str],
        cwd: &Path,
        env: &[(&str, &str)],
        cpus: usize,
        timeout: Duration,
    ) -> Result<Run> {
        let busybox = static_busybox()?;
        let share = tempfile::Builder::new().prefix("spare-vm-").tempdir()?;
        let initramfs = share.path().join("initramfs.cpio");
        let mut archive = Cpio::default();
        archive.dir("bin")?;
        archive.file("bin/busybox", 0o755, &std::fs::read(&busybox)?)?;
        archive.dir("modules")?;
        let mut names = Vec::new();
        for module in MODULES {
            let name = Path::new(module)
                .file_name()
                .and_then(|n| n.to_str())
                .context("module path")?;
            let bytes = std::fs::read(self.modules.join(module))
                .with_context(|| format!("cannot read module {module}"))?;
            archive.file(&format!("modules/{name}"), 0o644, &bytes)?;
            names.push(name);
        }
        for dir in ["proc", "sys", "dev", "mnt"] {
            archive.dir(dir)?;
        }
        let init = INIT.replace("$MODULES", &names.join(" "));
        archive.file("init", 0o755, init.as_bytes())?;
        std::fs::write(&initramfs, archive.finish())?;

        let mut script = String::from(
            "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root\n",
        );
        writeln!(script, "export TMPDIR={GUEST_TMP}")?;
        for (key, value) in env {
            writeln!(script, "export {key}={}", quote(value))?;
        }
        writeln!(
            script,
            "cd {} || exit 125",
            quote(&cwd.display().to_string())
        )?;
        let words: Vec<String> = command.iter().map(|w| quote(w)).collect();
        writeln!(script, "{} > {GUEST_SHARE}/output 2>&1", words.join(" "))?;
        writeln!(script, "echo $? > {GUEST_SHARE}/exit-code")?;
        std::fs::write(share.path().join("run.sh"), script)?;

        let accel = std::env::var("SPARE_TEST_VM_ACCEL").unwrap_or_else(|_| "tcg".to_owned());
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", &accel, "-cpu", "max", "-m", "3G", "-nographic"])
            .args(["-no-reboot", "-smp", &cpus.to_string()])
            .arg("-kernel")
            .arg(&self.image)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 quiet panic=-1"])
            .args(["-virtfs", "local,path=/,mount_tag=host,security_model=passthrough,id=host,multidevs=remap,readonly=on"])
            .arg("-virtfs")
            .arg(format!(
                "local,path={},mount_tag=results,security_model=passthrough,id=results",
                share.path().display()
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(share.path().join("console"))?)
            .stderr(Stdio::from(std::fs::File::create(share.path().join("qemu.err"))?));
        let mut machine = Machine(
            qemu.spawn()
                .context("cannot start qemu-system-x86_64 (Debian's qemu-system-x86)")?,
        );
        let started = Instant::now();
        let status = loop {
            if let Some(status) = machine.0.try_wait()? {
                break Some(status);
            }
            if started.elapsed() > timeout {
                break None;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        drop(machine);
        let read = |name: &str| {
            std::fs::read(share.path().join(name))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let mut console = read("console");
        console.push_str(&read("qemu.err"));
        let run = Run {
            exit_code: read("exit-code").trim().parse().ok(),
            output: read("output"),
            console,
        };
        match status {
            None => bail!(
                "the virtual machine did not stop within {timeout:?}\n--- output\n{}\n--- console\n{}",
                run.output,
                run.console
            ),
            Some(status) if !status.success() => {
                bail!("qemu failed ({status})\n--- console\n{}", run.console)
            }
            Some(_) => Ok(run),
        }
    }
}

/// The qemu process, killed when dropped: on a timeout, and when the
/// caller gives up early, no machine is left running.
struct Machine(Child);

impl Drop for Machine {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A statically linked busybox: the initramfs has no libraries.
fn static_busybox() -> Result<PathBuf> {
    for path in ["/bin/busybox", "/usr/bin/busybox"] {
        let path = PathBuf::from(path);
        let Ok(bytes) = std::fs::read(&path) else {
            continue;
        };
        // A dynamically linked program names its loader.
        if bytes.windows(8).any(|w| w == b"/lib64/l") {
            bail!(
                "{} is dynamically linked; the virtual machine needs a static one \
                 (Debian's busybox-static)",
                path.display()
            );
        }
        return Ok(path);
    }
    bail!("no busybox found: the virtual machine needs Debian's busybox-static")
}

/// `text` as one POSIX shell word.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A `newc` cpio archive, the format of an initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) -> Result<()> {
        self.entry(name, 0o040_755, &[])
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.entry(name, 0o100_000 | mode, data)
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> Result<()> {
        self.inode += 1;
        let size = u32::try_from(data.len()).context("a file of over 4 GiB in a cpio archive")?;
        let name_size = u32::try_from(name.len() + 1).context("name length")?;
        // magic, inode, mode, uid, gid, nlink, mtime, size, dev major and
        // minor, rdev major and minor, name size, checksum.
        let fields = [self.inode, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, name_size, 0];
        write!(self.bytes, "070701")?;
        for field in fields {
            write!(self.bytes, "{field:08x}")?;
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
        Ok(())
    }

    /// Header plus name, and data, each end on a multiple of four bytes.
    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        // The archive ends with an entry named TRAILER!!!; the kernel
        // needs nothing after it.
        let _ = self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_newc_and_aligned() {
        let mut cpio = Cpio::default();
        cpio.dir("bin").unwrap();
        cpio.file("bin/x", 0o755, b"hello").unwrap();
        let bytes = cpio.finish();
        assert_eq!(bytes.len() % 4, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.starts_with("070701"), "{text}");
        // The second header starts right after the first entry: 110 bytes
        // of header, "bin\0", padded to 116.
        assert_eq!(&bytes[116..122], b"070701");
        // Its mode is a regular file with 0755, its size 5.
        assert_eq!(&bytes[116 + 14..116 + 22], b"000081ed");
        assert_eq!(&bytes[116 + 54..116 + 62], b"00000005");
        assert!(text.contains("bin/x\0"), "{text}");
        assert!(text.contains("hello"), "{text}");
        assert!(text.contains("TRAILER!!!\0"), "{text}");
    }

    #[test]
    fn shell_words_survive_quotes() {
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
    }
}

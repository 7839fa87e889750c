//! Tests that need a network of their own: they run daemons in a Linux
//! network namespace created for the test, so nothing leaves the machine.
//! Skipped, with the reason printed, where namespaces cannot be made (not
//! root, no `ip`).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use spare_testkit::Daemon;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spare"))
}

/// A network namespace with loopback and a two-ended virtual Ethernet link
/// (`lan0` 10.77.0.1, `lan1` 10.77.0.2): a LAN of two hosts inside one
/// namespace, with multicast. Deleted on drop.
struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates it, or says why it cannot.
    fn create(tag: &str) -> Result<Self, String> {
        let name = format!("spare-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| -> Result<(), String> {
            let out = Command::new("ip")
                .args(args)
                .output()
                .map_err(|e| format!("cannot run `ip`: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "`ip {}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        ip(&["netns", "add", &name])?;
        let namespace = Self { name };
        let n = namespace.name.as_str();
        ip(&["-n", n, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", n, "link", "add", "lan0", "type", "veth", "peer", "name", "lan1",
        ])?;
        for (link, addr) in [("lan0", "10.77.0.1/24"), ("lan1", "10.77.0.2/24")] {
            ip(&["-n", n, "link", "set", link, "multicast", "on"])?;
            ip(&["-n", n, "addr", "add", addr, "dev", link])?;
            ip(&["-n", n, "link", "set", link, "up"])?;
        }
        Ok(namespace)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

#[test]
fn nodes_on_one_lan_find_each_other_with_mdns() {
    let namespace = match Namespace::create("mdns") {
        Ok(namespace) => namespace,
        Err(why) => {
            eprintln!("skipped: cannot make a network namespace ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let wrapper = ["ip", "netns", "exec", namespace.name.as_str()];
    // No --bootstrap, no --no-mdns: discovery is mDNS's job.
    let up = |addr: &'static str| ["up", "--listen", addr, "--cores", "1", "--always"];
    let a = Daemon::start_with(
        &bin(),
        &dir.path().join("a"),
        &wrapper,
        &up("/ip4/10.77.0.1/tcp/0"),
    )
    .unwrap();
    let b = Daemon::start_with(
        &bin(),
        &dir.path().join("b"),
        &wrapper,
        &up("/ip4/10.77.0.2/tcp/0"),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = a.peers_with_offers().unwrap_or_default();
        if found.iter().any(|p| p == b.peer_id()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a never found b by mDNS\n{}\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // And the peer it found runs tasks.
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/hello.wasm");
    let out = a
        .cli()
        .args(["run", "--json", "--on", b.peer_id()])
        .arg(&example)
        .output()
        .unwrap();
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["host"], b.peer_id());
    assert_eq!(result["stdout"], "hello from spare\n");
    drop((a, b));
}

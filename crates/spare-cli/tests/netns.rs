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

/// Runs `ip args...`, or says why it failed.
fn ip(args: &[&str]) -> Result<(), String> {
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
}

/// A network namespace made for one test, with loopback up. Deleted on
/// drop.
struct Namespace {
    name: String,
}

impl Namespace {
    /// Creates it, or says why it cannot.
    fn create(tag: &str) -> Result<Self, String> {
        let name = format!("spare-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let namespace = Self { name };
        ip(&["-n", &namespace.name, "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// One with a two-ended virtual Ethernet link inside (`lan0` 10.77.0.1,
    /// `lan1` 10.77.0.2): a LAN of two hosts in one namespace, with
    /// multicast.
    fn lan(tag: &str) -> Result<Self, String> {
        let namespace = Self::create(tag)?;
        let n = namespace.name.as_str();
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

    /// Links this namespace to `other` with a virtual Ethernet cable,
    /// addressed `here` on this end and `there` on the other (with their
    /// prefix length).
    fn cable_to(&self, other: &Namespace, here: &str, there: &str) -> Result<(), String> {
        let (a, b) = (self.name.as_str(), other.name.as_str());
        ip(&[
            "-n", a, "link", "add", "wire", "type", "veth", "peer", "name", "wire", "netns", b,
        ])?;
        ip(&["-n", a, "addr", "add", here, "dev", "wire"])?;
        ip(&["-n", b, "addr", "add", there, "dev", "wire"])?;
        ip(&["-n", a, "link", "set", "wire", "up"])?;
        ip(&["-n", b, "link", "set", "wire", "up"])
    }

    /// The command prefix that runs a program inside.
    fn exec(&self) -> [&str; 4] {
        ["ip", "netns", "exec", self.name.as_str()]
    }

    /// A TCP listener on this namespace's loopback.
    fn listen_on_loopback(&self) -> std::net::TcpListener {
        self.inside(|| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
    }

    /// What `make` returns, made inside this namespace: sockets belong to
    /// the namespace of the thread that made them, so a thread enters it,
    /// makes them, and ends.
    fn inside<T: Send>(&self, make: impl FnOnce() -> T + Send) -> T {
        use std::os::fd::AsRawFd;
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let handle = std::fs::File::open(&path).unwrap();
                    // SAFETY: setns on a namespace file we opened; it changes
                    // only this short-lived thread.
                    let entered = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
                    make()
                })
                .join()
                .unwrap()
        })
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
    let namespace = match Namespace::lan("mdns") {
        Ok(namespace) => namespace,
        Err(why) => {
            eprintln!("skipped: cannot make a network namespace ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let wrapper = namespace.exec();
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

/// A peer on the internet must not make a node dial into its own machine.
/// Three daemons: `far` and `near` share a namespace, connected over its
/// loopback; `node` is in another namespace, reached over an address of
/// the internet's shape (198.51.100.0/24, kept for documentation). When
/// `node` asks `near` for peers (Kademlia), `near` answers with `far` at
/// `127.0.0.1`, which for `node` is its own loopback; a listener waits
/// there for the dial that must not come. (`node` listens on its loopback
/// only, so that `far` cannot learn of it and connect first.)
#[test]
fn a_peer_cannot_make_a_node_dial_its_own_loopback() {
    let namespaces = Namespace::create("node").and_then(|node| {
        let others = Namespace::create("others")?;
        node.cable_to(&others, "198.51.100.1/24", "198.51.100.2/24")?;
        Ok((node, others))
    });
    let (node_ns, others_ns) = match namespaces {
        Ok(namespaces) => namespaces,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces ({why})");
            return;
        }
    };
    let trap = node_ns.listen_on_loopback();
    trap.set_nonblocking(true).unwrap();
    let port = trap.local_addr().unwrap().port();

    let dir = tempfile::tempdir().unwrap();
    let up = |listen: &str, bootstrap: Option<&str>| {
        let mut args = vec!["up", "--listen", listen, "--no-mdns", "--always"]
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>();
        if let Some(addr) = bootstrap {
            args.extend(["--bootstrap".into(), addr.to_owned()]);
        }
        args
    };
    // The node logs each dial it refuses at debug level.
    let start = |name: &str, namespace: &Namespace, args: Vec<String>| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut wrapper = namespace.exec().to_vec();
        wrapper.extend(["env", "RUST_LOG=info,spare_net=debug"]);
        Daemon::start_with(&bin(), &dir.path().join(name), &wrapper, &args).unwrap()
    };
    let far = start(
        "far",
        &others_ns,
        up(&format!("/ip4/127.0.0.1/tcp/{port}"), None),
    );
    let near = start(
        "near",
        &others_ns,
        up("/ip4/198.51.100.2/tcp/0", Some(far.addr())),
    );
    near.wait_for_peers(1, Duration::from_secs(30)).unwrap();
    let node = start(
        "node",
        &node_ns,
        up("/ip4/127.0.0.1/tcp/0", Some(near.addr())),
    );
    node.wait_for_peers(1, Duration::from_secs(30)).unwrap();
    // Kademlia asks its new neighbour for peers within a second of
    // meeting it, and dials what it hears at once: the node refuses.
    let refusal = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{}", far.peer_id());
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut refused = false;
    while Instant::now() < deadline && !refused {
        refused = node
            .log()
            .lines()
            .any(|line| line.contains("not dialling") && line.contains(&refusal));
        match trap.accept() {
            Ok((_, from)) => panic!(
                "the node dialled its own loopback (from {from}), as a peer told it to\n{}",
                node.log()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("the listener failed: {e}"),
        }
    }
    assert!(
        refused,
        "the node heard of far's loopback address and refused it\n{}",
        node.log()
    );
    // Nor by another way a little later (identify's cache, a redial).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(trap.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing dialled the node's loopback"
    );
    drop((node, near, far));
}

/// A host on the LAN that names peers over mDNS without end (answers no
/// one asked for, each naming several peers) cannot make a node's list of
/// what mDNS found grow past its bound: the node keeps at most
/// `MAX_DISCOVERED`, says so once, and keeps serving.
#[test]
fn a_lan_host_naming_peers_without_end_fills_the_mdns_list_only_to_its_bound() {
    let namespace = match Namespace::lan("mdnsflood") {
        Ok(namespace) => namespace,
        Err(why) => {
            eprintln!("skipped: cannot make a network namespace ({why})");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut wrapper = namespace.exec().to_vec();
    // The node logs at debug level how many finds mDNS keeps.
    wrapper.extend(["env", "RUST_LOG=info,spare_net=debug"]);
    let node = Daemon::start_with(
        &bin(),
        &dir.path().join("node"),
        &wrapper,
        &["up", "--listen", "/ip4/10.77.0.1/tcp/0", "--always"],
    )
    .unwrap();
    let bound = libp2p::mdns::MAX_DISCOVERED;
    let forger = namespace.inside(|| std::net::UdpSocket::bind("10.77.0.2:0").unwrap());
    // Twice the bound, in answers of 6 peers (each well under an MTU).
    let peers: Vec<libp2p::PeerId> = (0..2 * bound)
        .map(|_| {
            libp2p::identity::Keypair::generate_ed25519()
                .public()
                .to_peer_id()
        })
        .collect();
    let kept = |log: &str| -> Vec<usize> {
        log.lines()
            .filter(|line| line.contains("mDNS"))
            .filter_map(|line| {
                line.split("kept=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    // Sent again each second until the list fills: the node's mDNS may
    // bind its socket a moment after its API answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !kept(&node.log()).contains(&bound) {
        assert!(
            Instant::now() < deadline,
            "the node's mDNS list never filled\n{}",
            node.log()
        );
        for (n, some) in peers.chunks(6).enumerate() {
            forger
                .send_to(&mdns_answer(n, some), "10.77.0.1:5353")
                .unwrap();
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    // The rest of the flood is ignored, not kept, now and when it comes
    // again.
    for (n, some) in peers.chunks(6).enumerate() {
        forger
            .send_to(&mdns_answer(n, some), "10.77.0.1:5353")
            .unwrap();
    }
    std::thread::sleep(Duration::from_secs(1));
    let log = node.log();
    assert!(kept(&log).iter().all(|&k| k <= bound), "{log}");
    let warnings = log
        .lines()
        .filter(|line| line.contains("the most this node keeps"))
        .count();
    assert_eq!(warnings, 1, "{log}");
    // And it serves its owner as before.
    let status = node.get("/v1/status").unwrap();
    assert!(status.is_object(), "{status}");
    drop(node);
}

/// An mDNS answer (DNS, RFC 6762) that no one asked for, naming `peers`
/// at the sender's address: for each, a PTR record from libp2p's service
/// name to a name of the peer's own, and a TXT record there holding its
/// `dnsaddr`.
fn mdns_answer(id: usize, peers: &[libp2p::PeerId]) -> Vec<u8> {
    fn name(labels: &[&str]) -> Vec<u8> {
        let mut bytes = Vec::new();
        for label in labels {
            bytes.push(u8::try_from(label.len()).unwrap());
            bytes.extend_from_slice(label.as_bytes());
        }
        bytes.push(0);
        bytes
    }
    fn record(owner: &[u8], kind: u16, data: &[u8]) -> Vec<u8> {
        let mut bytes = owner.to_vec();
        bytes.extend(kind.to_be_bytes());
        bytes.extend(1u16.to_be_bytes()); // class IN
        bytes.extend(3600u32.to_be_bytes()); // time to live, s
        bytes.extend(u16::try_from(data.len()).unwrap().to_be_bytes());
        bytes.extend_from_slice(data);
        bytes
    }
    const PTR: u16 = 12;
    const TXT: u16 = 16;
    let count = u16::try_from(peers.len()).unwrap();
    let mut packet = Vec::new();
    packet.extend(u16::try_from(id % 65536).unwrap().to_be_bytes());
    packet.extend(0x8400u16.to_be_bytes()); // an authoritative response
    packet.extend(0u16.to_be_bytes()); // no questions
    packet.extend(count.to_be_bytes()); // answers
    packet.extend(0u16.to_be_bytes()); // authorities
    packet.extend(count.to_be_bytes()); // additional records
    let service = name(&["_p2p", "_udp", "local"]);
    let owners: Vec<Vec<u8>> = peers
        .iter()
        .map(|peer| {
            let label = peer.to_string();
            name(&[&label[label.len() - 20..], "_p2p", "_udp", "local"])
        })
        .collect();
    for owner in &owners {
        packet.extend(record(&service, PTR, owner));
    }
    for (owner, peer) in owners.iter().zip(peers) {
        let text = format!("dnsaddr=/ip4/10.77.0.2/tcp/4001/p2p/{peer}");
        let mut data = vec![u8::try_from(text.len()).unwrap()];
        data.extend_from_slice(text.as_bytes());
        packet.extend(record(owner, TXT, &data));
    }
    packet
}

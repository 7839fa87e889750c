//! Multi-process tests of the real `spare` binary: daemons on loopback,
//! tasks run through the CLI exactly as a user would run them.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use spare_runtime::priority::{PROC_SCHED_IDLE, read_proc_priority};
use spare_testkit::{Daemon, Swarm, example, proc_stat, text};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spare"))
}

/// Runs a CLI verb against `node`, feeding `stdin`.
fn spare(node: &Daemon, args: &[&str], stdin: &[u8]) -> Output {
    node.run_cli(args, stdin).expect("spare runs")
}

fn json(output: &Output) -> serde_json::Value {
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            text(&output.stdout),
            text(&output.stderr)
        )
    })
}

/// The exactly-one-line error a failed command prints.
fn error_line(output: &Output) -> String {
    let stderr = text(&output.stderr);
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("spare: error:"))
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{stderr}");
    lines[0].to_owned()
}

#[test]
fn a_task_runs_on_a_remote_peer_like_a_local_program() {
    let swarm = Swarm::start(&bin(), 3, 1).expect("swarm starts");
    let a = &swarm.nodes[0];

    // stdout, stderr, exit code, args, env and stdin, as if run locally.
    let out = spare(
        a,
        &[
            "run",
            "--env",
            "GREETING=hello",
            "-e",
            "EXIT_CODE=3",
            // The last value of a name wins, as with env(1).
            "--env",
            "GREETING=hi",
            &example("echo.wasm"),
            "--",
            "x",
            "y z",
        ],
        b"piped input\n",
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        "arg[1]=x\narg[2]=y z\nenv GREETING=hi\nenv EXIT_CODE=3\nstdin:\npiped input\n"
    );
    assert_eq!(text(&out.stderr), "to stderr\n");

    // Input larger than a request carries travels as a blob the host fetches.
    let big: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = spare(a, &["run", &example("echo.wasm")], &big);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.starts_with(b"stdin:\n"));
    assert_eq!(&out.stdout[b"stdin:\n".len()..], &big[..]);

    // --json names the host, which is not the requester.
    let out = spare(
        a,
        &["run", "--json", &example("primes.wasm"), "--", "1000"],
        b"1 2 3\n",
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result = json(&out);
    let host = result["host"].as_str().expect("host").to_owned();
    assert_ne!(host, a.peer_id());
    assert!(swarm.nodes.iter().any(|n| n.peer_id() == host));
    assert_eq!(result["exit_code"], 0);
    assert!(
        result["stdout"]
            .as_str()
            .unwrap()
            .contains("primes below 1000: 168")
    );
    assert!(result["stdout"].as_str().unwrap().contains("sum 6"));
    assert!(result["fuel"].as_u64().unwrap() > 0);
    assert!(result["wall_ms"].is_u64());
    assert!(result.get("stdout_base64").is_none(), "{result}");
    // Output that is not UTF-8 comes exactly in base64 too.
    let out = spare(a, &["run", "--json", &example("echo.wasm")], b"\xff\xfe\n");
    let result = json(&out);
    assert!(
        result["stdout"].as_str().unwrap().contains('\u{fffd}'),
        "{result}"
    );
    let exact = result["stdout_base64"]
        .as_str()
        .expect("base64 of the bytes");
    assert_eq!(
        exact,
        spare_node::api::types::encode_b64(b"stdin:\n\xff\xfe\n")
    );

    // --on pins the host; --local runs here.
    let c = swarm.nodes[2].peer_id();
    let out = spare(
        a,
        &["run", "--json", "--on", c, &example("hello.wasm")],
        b"",
    );
    assert_eq!(json(&out)["host"], c);
    // ... also by the end of its id, as `spare tasks` shows it, or by its
    // address, as `spare id` prints it.
    let short = format!("…{}", &c[c.len() - 8..]);
    for named in [short.as_str(), swarm.nodes[2].addr()] {
        let out = spare(
            a,
            &["run", "--json", "--on", named, &example("hello.wasm")],
            b"",
        );
        assert_eq!(json(&out)["host"], c, "--on {named}");
    }
    // Everything after the program is the program's, `--` or not.
    let out = spare(a, &["run", &example("echo.wasm"), "x", "-y"], b"");
    assert!(
        text(&out.stdout).starts_with("arg[1]=x\narg[2]=-y\n"),
        "{}",
        text(&out.stdout)
    );
    let out = spare(
        a,
        &["run", "--json", "--local", &example("hello.wasm")],
        b"",
    );
    assert_eq!(json(&out)["host"], a.peer_id());
    assert_eq!(json(&out)["stdout"], "hello from spare\n");

    // A preview-2 component runs too.
    let out = spare(a, &["run", &example("hello_component.wasm")], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from spare\n");

    // `tasks` lists them, with where they ran and how they ended.
    let out = spare(a, &["tasks", "--json"], b"");
    let tasks = json(&out);
    let tasks = tasks.as_array().expect("list");
    assert_eq!(tasks.len(), 10);
    assert!(tasks.iter().all(|t| t["state"] == "exited"));
    assert!(tasks.iter().any(|t| t["host"] == c));
    let out = spare(a, &["tasks"], b"");
    assert!(text(&out.stdout).contains("primes.wasm"));

    // The host keeps a record and a signed receipt of what it ran.
    let host_node = swarm.nodes.iter().find(|n| n.peer_id() == c).unwrap();
    let hosted = spare(host_node, &["tasks", "--hosted", "--json"], b"");
    assert!(
        json(&hosted)
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["requester"] == a.peer_id())
    );

    // `id` and `peers`.
    let id = json(&spare(a, &["id", "--json"], b""));
    assert_eq!(id["peer_id"], a.peer_id());
    assert!(
        id["listen_addrs"][0]
            .as_str()
            .unwrap()
            .starts_with("/ip4/127.0.0.1/tcp/")
    );
    let peers = json(&spare(a, &["peers", "--json"], b""));
    assert_eq!(peers.as_array().unwrap().len(), 2);
    assert!(peers[0]["offer"]["cores"].as_u64().unwrap() >= 1);
}

#[test]
fn hostile_guests_and_bad_input_end_with_one_clear_line() {
    let swarm = Swarm::start(&bin(), 2, 1).expect("swarm starts");
    let a = &swarm.nodes[0];
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["run", "--fuel", "1e8", &example("hostile/loop.wasm")],
            137,
            "ran out of fuel (limit 100000000)",
        ),
        (
            &["run", "--timeout", "500ms", &example("hostile/loop.wasm")],
            124,
            "exceeded its wall-time limit of 500 ms",
        ),
        (
            &["run", "--memory", "16MiB", &example("hostile/alloc.wasm")],
            137,
            "exceeded its memory limit of 16 MiB",
        ),
        (
            &["run", "--stack", "256KiB", &example("hostile/recurse.wasm")],
            137,
            "overflowed its stack (limit 256 KiB)",
        ),
        (
            &["run", "--output", "1MiB", &example("hostile/flood.wasm")],
            137,
            "wrote more than 1 MiB to stdout",
        ),
        (&["run", &example("hostile/crash.wasm")], 134, "trapped"),
        (
            &["run", &example("hostile/import.wasm")],
            126,
            "imports `env::launch_missiles`",
        ),
        (
            &["run", &example("hostile/notwasm.wasm")],
            126,
            "is not WebAssembly",
        ),
        (
            &["run", "--memory", "1TiB", &example("hello.wasm")],
            125,
            "--memory: memory limit 1 TiB is above the maximum, 4 GiB",
        ),
        (
            &[
                "run",
                "--on",
                "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
                &example("hello.wasm"),
            ],
            125,
            "is not connected",
        ),
        (
            &["run", "--on", "not-a-peer", &example("hello.wasm")],
            125,
            "is not a peer id",
        ),
        (
            &["run", "--on", "sn7", &example("hello.wasm")],
            125,
            "nor 4 or more of its last characters",
        ),
        (
            &[
                "run",
                "--on",
                "/ip4/127.0.0.1/tcp/1",
                &example("hello.wasm"),
            ],
            125,
            "is an address without a peer id: it must end in `/p2p/<peer id>`",
        ),
        (
            &["run", "--memory", "64 parsecs", &example("hello.wasm")],
            125,
            "unknown unit `parsecs`",
        ),
        // A program file that cannot be read or run: 126, as a shell says.
        (&["run", &example("no-such-file.wasm")], 126, "cannot read"),
        (
            &["run", &example("hostile")],
            126,
            "is a directory, not a WebAssembly program",
        ),
        (
            &["run", "/dev/zero"],
            126,
            "/dev/zero is larger than 64 MiB, the largest module spare runs",
        ),
        // A bare number is bytes: less than a page is refused here.
        (
            &["run", "--memory", "64", &example("hello.wasm")],
            125,
            "--memory: `64` is 64 B, less than one WebAssembly page (64 KiB), the least a guest runs in; did you mean 64MiB?",
        ),
        // WASI reserves exit codes from 126 up: the guest traps, and the line
        // says why without wasmtime's backtrace.
        (
            &["run", "-e", "EXIT_CODE=255", &example("echo.wasm")],
            134,
            "the program trapped: exit with invalid exit status outside of [0..126) (on ",
        ),
    ];
    for (args, code, message) in cases {
        let out = spare(a, args, b"");
        let line = error_line(&out);
        assert!(line.contains(message), "{args:?}: {line}");
        assert!(!line.contains("backtrace"), "{args:?}: {line}");
        assert_eq!(out.status.code(), Some(*code), "{args:?}: {line}");
    }
    // The backtrace stays in the JSON answers and records.
    let out = spare(
        a,
        &[
            "run",
            "--json",
            "-e",
            "EXIT_CODE=255",
            &example("echo.wasm"),
        ],
        b"",
    );
    assert_eq!(out.status.code(), Some(134));
    let error = json(&out)["error"].as_str().unwrap().to_owned();
    assert!(error.contains("wasm backtrace"), "{error}");
    assert!(
        error.ends_with("exit with invalid exit status outside of [0..126)"),
        "{error}"
    );
    let tasks = json(&spare(a, &["tasks", "--json", "--limit", "1"], b""));
    assert_eq!(tasks[0]["failure"], error.as_str(), "{tasks}");
    let out = spare(a, &["tasks", "--limit", "1"], b"");
    assert!(
        text(&out.stdout).contains("trapped: exit with invalid exit status"),
        "{}",
        text(&out.stdout)
    );
    // No list of nothing.
    let out = spare(a, &["tasks", "--limit", "0"], b"");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("invalid value '0' for '--limit <LIMIT>'"),
        "{}",
        text(&out.stderr)
    );

    // A flood keeps its first bytes, as a truncated local run would.
    let out = spare(
        a,
        &["run", "--output", "1KiB", &example("hostile/flood.wasm")],
        b"",
    );
    assert_eq!(out.status.code(), Some(137));
    assert_eq!(out.stdout.len(), 1024);

    // A peer id that is this node's own, or its end, points to --local.
    let own = a.peer_id();
    for named in [own, &own[own.len() - 8..]] {
        let out = spare(a, &["run", "--on", named, &example("hello.wasm")], b"");
        assert!(
            error_line(&out).contains("is this node; run here with --local"),
            "{}",
            error_line(&out)
        );
        assert_eq!(out.status.code(), Some(125));
    }

    // With --json, a task that never ran still answers in JSON.
    let out = spare(a, &["run", "--json", &example("hostile/notwasm.wasm")], b"");
    assert_eq!(out.status.code(), Some(126));
    let answer = json(&out);
    assert!(answer["exit_code"].is_null());
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("is not WebAssembly")
    );

    // The guest's own failed open, not a sandbox error.
    let out = spare(a, &["run", &example("hostile/passwd.wasm")], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).starts_with("cannot open /etc/passwd:"),
        "{}",
        text(&out.stderr)
    );

    // The daemons keep serving after all of that.
    let out = spare(a, &["run", &example("hello.wasm")], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hello from spare\n");
}

#[test]
fn a_task_whose_host_is_killed_finishes_on_another_peer() {
    let swarm = Swarm::start(&bin(), 3, 1).expect("swarm starts");
    let a = &swarm.nodes[0];
    // Long enough to kill its host mid-run (a few seconds of CPU).
    let child = a
        .cli()
        .args(["run", "--json", &example("cpubound.wasm"), "--", "150"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Find the host from the requester's records once the task is placed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let host = loop {
        let tasks = a.get("/v1/tasks?limit=1").unwrap();
        if let Some(host) = tasks[0]["host"].as_str() {
            break host.to_owned();
        }
        assert!(Instant::now() < deadline, "task never placed");
        std::thread::sleep(Duration::from_millis(20));
    };
    std::thread::sleep(Duration::from_millis(300));
    let mut swarm = swarm;
    let victim = swarm
        .nodes
        .iter()
        .position(|n| n.peer_id() == host)
        .expect("host is in the swarm");
    swarm.nodes[victim].kill();

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_ne!(result["host"], host.as_str());
    assert_eq!(result["attempts"], 2);
    assert!(text(&out.stdout).contains("cpubound: rounds=150"));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("retrying on another peer"), "{stderr}");
}

#[test]
fn workers_run_at_idle_priority() {
    let dir = tempfile::tempdir().unwrap();
    let node = Daemon::start(&bin(), &dir.path().join("a"), &["--cores", "2"]).unwrap();
    let pids = node.worker_pids().unwrap();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        let (nice, policy) = read_proc_priority(pid).unwrap();
        // SCHED_IDLE where granted; where it is refused, nice 19 is the floor.
        assert!(
            policy == PROC_SCHED_IDLE || nice == 19,
            "worker {pid}: policy {policy}, nice {nice}"
        );
        let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).unwrap();
        assert_eq!(
            oom.trim(),
            "1000",
            "worker {pid} is first in line for the OOM killer"
        );
    }
    // The daemon itself keeps normal priority.
    let (_, policy) = read_proc_priority(node.pid().unwrap()).unwrap();
    assert_eq!(policy, 0);

    // Workers are confined (confine/): no socket at all, so a seccomp
    // filter is in force, and status says what they cannot reach.
    for pid in node.worker_pids().unwrap() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        assert!(status.contains("\nSeccomp:\t2\n"), "worker {pid}: {status}");
        assert!(
            status.contains("\nNoNewPrivs:\t1\n"),
            "worker {pid}: {status}"
        );
        // Whoever runs the daemon, root included, its workers hold no
        // capabilities (a root daemon's would otherwise have them all).
        for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert!(
                status.contains(&format!("\n{set}:\t0000000000000000\n")),
                "worker {pid}: {set} in {status}"
            );
        }
        // SAFETY: geteuid cannot fail. Only a process that holds
        // CAP_SETPCAP (root, here) can empty its bounding set.
        if unsafe { libc::geteuid() } == 0 {
            assert!(
                status.contains("\nCapBnd:\t0000000000000000\n"),
                "worker {pid}: {status}"
            );
        }
    }
    let workers = node.get("/v1/status").unwrap()["enforcement"]["workers"].clone();
    let workers = workers.as_str().unwrap_or_default();
    assert!(workers.starts_with("confined: "), "{workers}");
    assert!(workers.contains("sockets"), "{workers}");
    if landlock_abi() >= 6 {
        assert_eq!(
            workers,
            "confined: files, TCP, signals, sockets, privileges"
        );
    }
}

/// The kernel's Landlock ABI version, 0 without Landlock.
fn landlock_abi() -> i64 {
    // SAFETY: with a null attribute, size 0 and flag 1 (VERSION), the call
    // only returns a number.
    let version = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            1u32,
        )
    };
    version.max(0)
}

#[test]
fn ctrl_c_cancels_the_task_on_its_host() {
    ctrl_c_cancels_on_the_host("hostile/loop.wasm");
}

/// A guest that lives in host calls, where it reaches no fuel yield, is
/// stopped by a cancel all the same (on its return from one).
#[test]
fn ctrl_c_cancels_a_guest_inside_host_calls() {
    ctrl_c_cancels_on_the_host("hostile/entropy.wasm");
}

fn ctrl_c_cancels_on_the_host(guest: &str) {
    let swarm = Swarm::start(&bin(), 2, 1).expect("swarm starts");
    let (a, b) = (&swarm.nodes[0], &swarm.nodes[1]);
    let child = a
        .cli()
        .args(["run", &example(guest)])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while b.get("/v1/node").unwrap()["running"] != 1 {
        assert!(Instant::now() < deadline, "task never started on b");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Sent to its worker is not yet running: a task cancelled before its
    // guest ran an instruction rightly reports no fuel. Let it burn some:
    // CPU time, not wall time, for an idle-priority worker on a busy
    // machine gets none until the machine has some to spare. 300 ms of it
    // is far more than compiling this guest takes. Each worker's CPU time
    // is counted from when it is first seen (the task's may start late).
    let mut first_seen = std::collections::HashMap::new();
    wait_until("the guest to run", Duration::from_secs(120), || {
        b.worker_pids().unwrap().into_iter().any(|pid| {
            proc_stat(pid).is_some_and(|(_, now)| now >= *first_seen.entry(pid).or_insert(now) + 30)
        })
    });
    // SAFETY: kill only takes integers.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let hosted = b.get("/v1/hosted?limit=1").unwrap();
        if hosted[0]["state"] == "cancelled" {
            break;
        }
        assert!(Instant::now() < deadline, "host did not cancel: {hosted}");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(b.get("/v1/node").unwrap()["running"], 0);
    // The guest stopped rather than being killed, so both sides know the
    // fuel it burnt, and the host signed for it.
    let hosted = b.get("/v1/hosted?limit=1").unwrap();
    assert!(hosted[0]["fuel"].as_u64().unwrap() > 0, "{hosted}");
    let tasks = json(&spare(a, &["tasks", "--json"], b""));
    assert_eq!(tasks[0]["state"], "cancelled", "{tasks}");
    assert!(tasks[0]["fuel"].as_u64().unwrap() > 0, "{tasks}");
}

#[test]
fn init_is_implied_never_destructive_and_the_cli_explains_a_missing_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let run = |args: &[&str]| {
        Command::new(bin())
            .arg("--data-dir")
            .arg(&data)
            .args(args)
            .output()
            .unwrap()
    };

    let out = run(&["id"]);
    assert_eq!(out.status.code(), Some(125));
    let line = text(&out.stderr);
    assert!(line.contains("no spare daemon is running"), "{line}");
    assert!(
        line.contains(&format!("spare --data-dir {} up", data.display())),
        "{line}"
    );

    // An empty SPARE_DATA_DIR is as good as unset: the default is used.
    let home = dir.path().join("home");
    let out = Command::new(bin())
        .arg("id")
        .env("SPARE_DATA_DIR", "")
        .env("HOME", &home)
        .env_remove("XDG_DATA_HOME")
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        error_line(&out).contains(&format!(
            "no spare daemon is running on {}",
            home.join(".local/share/spare").display()
        )),
        "{}",
        error_line(&out)
    );

    // `run` says so before it reads stdin, which here never ends.
    let mut child = Command::new(bin())
        .arg("--data-dir")
        .arg(&data)
        .args(["run", &example("hello.wasm")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let _open_stdin = child.stdin.take();
    wait_until(
        "run to end without a daemon",
        Duration::from_secs(20),
        || child.try_wait().unwrap().is_some(),
    );
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        error_line(&out).contains("no spare daemon is running"),
        "{}",
        error_line(&out)
    );

    let out = run(&["init"]);
    assert!(out.status.success());
    let key = std::fs::read(data.join("node.key")).unwrap();
    let out = run(&["init"]);
    assert!(text(&out.stdout).contains("already exists"));
    assert_eq!(std::fs::read(data.join("node.key")).unwrap(), key);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(data.join("node.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // `up` on a fresh directory creates the node by itself.
    let fresh = dir.path().join("fresh");
    let node = Daemon::start(&bin(), &fresh, &[]).unwrap();
    assert!(fresh.join("node.key").exists());
    let mode = std::fs::metadata(node.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A data directory that is a file is named as such, with no error
    // told twice.
    let afile = dir.path().join("afile");
    std::fs::write(&afile, b"").unwrap();
    for verb in ["init", "id"] {
        let out = Command::new(bin())
            .arg("--data-dir")
            .arg(&afile)
            .arg(verb)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(125));
        assert_eq!(
            error_line(&out),
            format!(
                "spare: error: cannot use {} as the data directory: it is not a directory",
                afile.display()
            )
        );
    }

    // An error that carries its cause is printed with it once.
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(afile.join("sub"))
        .arg("init")
        .output()
        .unwrap();
    assert_eq!(
        error_line(&out),
        format!(
            "spare: error: cannot create {}: Not a directory (os error 20)",
            afile.join("sub").display()
        )
    );

    // A second daemon on the same directory is refused with the reason.
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(&fresh)
        .args(["up", "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("already running"),
        "{}",
        text(&out.stderr)
    );

    // A bad config line is named.
    std::fs::write(data.join("config.toml"), "cores = 0\n").unwrap();
    let out = run(&["up", "--no-mdns"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("config.toml:1: cores = 0"),
        "{}",
        text(&out.stderr)
    );
}

/// A bootstrap list that names the node itself (one list shared by a
/// swarm's nodes) is taken as it is meant: that address is not dialled.
#[test]
fn a_bootstrap_address_of_the_node_itself_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("n");
    let out = Command::new(bin())
        .arg("--data-dir")
        .arg(&data)
        .arg("init")
        .output()
        .unwrap();
    let created = text(&out.stdout);
    let id = created
        .split_whitespace()
        .find(|word| word.starts_with("12D3"))
        .expect("init names the node");
    let mut daemon = Command::new(bin())
        .arg("--data-dir")
        .arg(&data)
        .args([
            "up",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--bootstrap",
        ])
        .arg(format!("/ip4/127.0.0.1/tcp/9/p2p/{id}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seen = stderr_lines(&mut daemon);
    let said = std::iter::from_fn(|| seen.recv_timeout(Duration::from_secs(20)).ok())
        .find(|line| line.contains("bootstrap"));
    // SAFETY: kill only takes integers.
    unsafe {
        libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM);
    }
    let _ = daemon.wait();
    let said = said.expect("a word about the bootstrap address");
    assert!(said.contains("is this node's own; not dialled"), "{said}");
}

/// The lines `child` writes to its (piped) stderr, as they come.
fn stderr_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<String> {
    lines_of(child.stderr.take().expect("stderr is piped"))
}

/// The lines read from `reader`, as they come, from a thread of their own.
fn lines_of(reader: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (lines, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(reader)
            .lines()
            .map_while(Result::ok)
        {
            let _ = lines.send(line);
        }
    });
    seen
}

/// Polls `check` every 20 ms until it holds or `timeout` passes.
fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn spawn_run(node: &Daemon, args: &[&str]) -> std::process::Child {
    node.cli()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spare run starts")
}

#[test]
fn a_host_runs_as_many_tasks_as_its_cores_and_queues_the_rest() {
    let swarm = Swarm::start(&bin(), 2, 1).expect("swarm starts");
    let (a, b) = (&swarm.nodes[0], &swarm.nodes[1]);
    let loop_wasm = example("hostile/loop.wasm");
    let mut first = spawn_run(a, &["--on", b.peer_id(), "--timeout", "30s", &loop_wasm]);
    let mut second = spawn_run(a, &["--on", b.peer_id(), "--timeout", "30s", &loop_wasm]);
    wait_until(
        "one running and one queued on b",
        Duration::from_secs(20),
        || {
            let info = b.get("/v1/node").unwrap();
            info["running"] == 1 && info["queued"] == 1
        },
    );
    // Both are listed as running on b, until they end.
    let hosted = b.get("/v1/hosted").unwrap();
    let running = hosted
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["state"] == "running")
        .count();
    assert_eq!(running, 2, "{hosted}");
    // The queue shows in b's offer too, so requesters can avoid it.
    wait_until(
        "b's offer to show the queue",
        Duration::from_secs(10),
        || {
            let peers = a.get("/v1/peers").unwrap();
            peers[0]["offer"]["idle"] == 0 && peers[0]["offer"]["queued"] == 1
        },
    );
    // Closing the requesting CLI cancels the tasks on b.
    first.kill().unwrap();
    second.kill().unwrap();
    let _ = (first.wait(), second.wait());
    wait_until("b to be idle again", Duration::from_secs(10), || {
        let info = b.get("/v1/node").unwrap();
        info["running"] == 0 && info["queued"] == 0
    });
}

#[test]
fn a_crashed_worker_is_replaced_and_its_task_retried_elsewhere() {
    let swarm = Swarm::start(&bin(), 3, 1).expect("swarm starts");
    let a = &swarm.nodes[0];
    let child = spawn_run(a, &["--json", &example("cpubound.wasm"), "--", "150"]);
    let mut host = String::new();
    wait_until("the task to be placed", Duration::from_secs(20), || {
        host = a.get("/v1/tasks?limit=1").unwrap()[0]["host"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        !host.is_empty()
    });
    let host_node = swarm.nodes.iter().find(|n| n.peer_id() == host).unwrap();
    wait_until(
        "the task to run on its host",
        Duration::from_secs(20),
        || host_node.get("/v1/node").unwrap()["running"] == 1,
    );
    // The worker running it (beside the fresh one the host keeps in
    // reserve): the one whose CPU time grows.
    let ticks = |pid: u32| spare_policy::owner::process_cpu_ticks(pid).unwrap_or(0);
    let mut busy = 0;
    wait_until("a worker to run the task", Duration::from_secs(20), || {
        let before: Vec<(u32, u64)> = (host_node.worker_pids().unwrap().into_iter())
            .map(|pid| (pid, ticks(pid)))
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let grew: Vec<u32> = (before.iter())
            .filter(|&&(pid, was)| ticks(pid) > was + 2)
            .map(|&(pid, _)| pid)
            .collect();
        busy = grew.first().copied().unwrap_or(0);
        grew.len() == 1
    });
    let workers = host_node.worker_pids().unwrap();
    // SAFETY: kill only takes integers.
    unsafe {
        libc::kill(busy as libc::pid_t, libc::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let result = json(&out);
    assert_ne!(result["host"], host.as_str());
    assert_eq!(result["attempts"], 2);
    assert!(
        text(&out.stderr).contains("lost its worker process"),
        "{}",
        text(&out.stderr)
    );
    // The host replaced its worker and keeps serving.
    let out = spare(
        a,
        &["run", "--json", "--on", &host, &example("hello.wasm")],
        b"",
    );
    assert_eq!(json(&out)["stdout"], "hello from spare\n");
    let replaced = host_node.worker_pids().unwrap();
    assert!(!replaced.contains(&busy), "{replaced:?}");
    assert!(replaced.len() <= workers.len(), "{replaced:?} {workers:?}");
}

#[test]
fn a_peer_that_stops_answering_is_given_up_on() {
    let swarm = Swarm::start(&bin(), 2, 1).expect("swarm starts");
    let (a, b) = (&swarm.nodes[0], &swarm.nodes[1]);
    let child = spawn_run(
        a,
        &[
            "--on",
            b.peer_id(),
            "--timeout",
            "60s",
            &example("hostile/loop.wasm"),
        ],
    );
    wait_until("the task to run on b", Duration::from_secs(20), || {
        b.get("/v1/node").unwrap()["running"] == 1
    });
    let pid = b.pid().unwrap() as libc::pid_t;
    // SAFETY: kill only takes integers.
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    let line = error_line(&out);
    assert_eq!(out.status.code(), Some(125), "{line}");
    assert!(
        line.contains(b.peer_id()) && line.contains("connection to peer closed"),
        "{line}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    // The requester keeps serving.
    let out = spare(a, &["run", "--local", &example("hello.wasm")], b"");
    assert_eq!(text(&out.stdout), "hello from spare\n");
}

#[test]
fn a_task_waits_while_every_peer_gives_nothing_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let (host, requester) =
        paused_host_and_requester(dir.path(), "[max_limits]\nmemory = \"64MiB\"\n");

    // Too much memory for any peer: refused at once, naming the limit.
    let out = spare(
        &requester,
        &["run", "--memory", "4GiB", &example("hello.wasm")],
        b"",
    );
    let line = error_line(&out);
    assert!(
        line.contains("no connected peer grants these limits"),
        "{line}"
    );

    // Within the limits: the task waits for the host, saying why; so does
    // one pinned to it. Ctrl-C ends each wait.
    let waiting = |args: &[&str], expected: &str| {
        let mut child = requester
            .cli()
            .args(args)
            .arg(example("hello.wasm"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let seen = stderr_lines(&mut child);
        let line = seen
            .recv_timeout(Duration::from_secs(20))
            .expect("a line on stderr");
        // `spare tasks` tells a task no host has yet from one on its host.
        let newest = || {
            let tasks = json(&spare(&requester, &["tasks", "--json"], b""));
            tasks[0]["state"].as_str().unwrap_or_default().to_owned()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut state = newest();
        while state != expected && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            state = newest();
        }
        // SAFETY: kill only takes integers.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(130), "{line}");
        assert!(line.starts_with("spare: waiting:"), "{line}");
        (line, state, out.stdout)
    };
    let (line, state, _) = waiting(&["run", "--memory", "32MiB"], "waiting");
    assert_eq!(state, "waiting");
    assert!(
        line.contains("1 connected peer gives nothing right now (outside its time windows) ("),
        "{line}"
    );
    let host_id = host.peer_id().to_string();
    // With --json, what `spare run` prints is JSON however the task ends.
    let (_, _, stdout) = waiting(&["run", "--json", "--memory", "32MiB"], "waiting");
    let printed: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(
        printed,
        serde_json::json!({"exit_code": null, "error": "cancelled before it ran"})
    );
    let (line, state, _) = waiting(&["run", "--on", &host_id, "--memory", "32MiB"], "running");
    assert_eq!(state, "running", "in its host's queue");
    assert!(
        line.contains(&format!(
            "peer {host_id} gives nothing right now (outside its time windows); \
             the task waits there"
        )),
        "{line}"
    );
    // `spare peers` says the same of the host.
    let out = spare(&requester, &["peers"], b"");
    assert!(
        text(&out.stdout).contains("paused (outside its time windows)"),
        "{}",
        text(&out.stdout)
    );

    // A peer that gives now, but less memory than asked, is named too:
    // asking less would run at once.
    let small_dir = dir.path().join("small");
    std::fs::create_dir_all(&small_dir).unwrap();
    std::fs::write(
        small_dir.join("config.toml"),
        "[max_limits]\nmemory = \"16MiB\"\n",
    )
    .unwrap();
    let small = Daemon::start(
        &bin(),
        &small_dir,
        &["--cores", "1", "--bootstrap", requester.addr()],
    )
    .expect("a small host starts");
    requester
        .wait_for_peers(2, Duration::from_secs(20))
        .expect("the three connect");
    let (line, _, _) = waiting(&["run", "--memory", "32MiB"], "waiting");
    assert!(
        line.contains(&format!(
            "1 connected peer gives nothing right now (outside its time windows); \
             1 more does not grant these limits (peer {}: memory limit",
            small.peer_id()
        )),
        "{line}"
    );
}

/// A host that gives only in a window two hours from now (so is paused),
/// with `more` after its `[when]` line in its config, and a requester
/// connected to it.
fn paused_host_and_requester(dir: &std::path::Path, more: &str) -> (Daemon, Daemon) {
    let hour: u32 = text(&Command::new("date").arg("+%H").output().unwrap().stdout)
        .trim()
        .parse()
        .unwrap();
    let host_dir = dir.join("host");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("config.toml"),
        format!(
            "[when]\nwindows = [\"{:02}:00-{:02}:00\"]\n{more}",
            (hour + 2) % 24,
            (hour + 3) % 24
        ),
    )
    .unwrap();
    let host = Daemon::start(&bin(), &host_dir, &["--cores", "1"]).expect("host starts");
    let requester = Daemon::start(
        &bin(),
        &dir.join("requester"),
        &["--cores", "1", "--bootstrap", host.addr()],
    )
    .expect("requester starts");
    requester
        .wait_for_peers(1, Duration::from_secs(20))
        .expect("the two connect");
    (host, requester)
}

/// A task pinned to a host that has been paused for longer than its
/// `hand_back_after` still gets all of it before it is handed back.
#[test]
fn a_task_sent_into_a_long_pause_waits_its_whole_hand_back_time() {
    let dir = tempfile::tempdir().unwrap();
    let (host, requester) = paused_host_and_requester(dir.path(), "hand_back_after = \"2s\"\n");
    // The host has been paused since it started: longer than 2 s by now.
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let out = spare(
        &requester,
        &["run", "--on", host.peer_id(), &example("hello.wasm")],
        b"",
    );
    let waited = started.elapsed();
    let line = error_line(&out);
    assert_eq!(out.status.code(), Some(125), "{line}");
    assert!(
        line.contains("handed back by the host: it waited 2 s while the host was paused"),
        "{line}"
    );
    assert!(
        waited >= Duration::from_millis(1900),
        "handed back after {waited:?}"
    );
    // It never reached a worker: like a refusal, it leaves no record (a
    // peer could otherwise fill the host's history while it is paused).
    let hosted = host.get("/v1/hosted?limit=10").unwrap();
    assert_eq!(hosted, serde_json::json!([]), "{hosted}");
}

#[test]
fn a_reader_that_goes_away_ends_any_command_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let node = Daemon::start(&bin(), &dir.path().join("a"), &[]).unwrap();
    let out = spare(&node, &["run", "--local", &example("hello.wasm")], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    for args in [
        &["id"][..],
        &["tasks"],
        &["peers", "--json"],
        &["status"],
        &["tasks", "--json"],
    ] {
        // stdout is a pipe whose reader is gone before the first write, as
        // `head -1`'s is after its line.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = node
            .cli()
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(text(&out.stderr), "", "{args:?}");
        assert_eq!(out.status.code(), Some(0), "{args:?}");
    }
    // `run` ends with the guest's exit code still.
    for json in [true, false] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut command = node.cli();
        command.args(["run", "--local", "-e", "EXIT_CODE=3"]);
        if json {
            command.arg("--json");
        }
        let out = command
            .arg(example("echo.wasm"))
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let stderr = if json { "" } else { "to stderr\n" };
        assert_eq!(text(&out.stderr), stderr, "--json {json}");
        assert_eq!(out.status.code(), Some(3), "--json {json}");
    }
}

/// Output that cannot be written (a full disk) is an error, unlike a
/// reader that went away.
#[test]
fn a_full_stdout_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = Daemon::start(&bin(), &dir.path().join("a"), &[]).unwrap();
    let out = spare(&node, &["run", "--local", &example("hello.wasm")], b"");
    assert!(out.status.success(), "{}", text(&out.stderr));
    for args in [
        &["id"][..],
        &["id", "--json"],
        &["tasks"],
        &["tasks", "--hosted"],
        &["peers"],
        &["status"],
        &["tasks", "--json"],
    ] {
        let out = node
            .cli()
            .args(args)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert_eq!(
            text(&out.stderr),
            "spare: error: cannot write to stdout: No space left on device (os error 28)\n",
            "{args:?}"
        );
        assert_eq!(out.status.code(), Some(125), "{args:?}");
    }
}

/// Pids of live processes whose command line mentions `text`.
fn processes_mentioning(text: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // A zombie's command line is empty.
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(text))
        })
        .collect()
}

/// Starts `spare demo` with its swarm under `tmp`, sends it `signal` once
/// its stdout has a line containing `after`, and checks that its daemons
/// and their workers stop, and that it removes its directory (unless the
/// signal is `SIGKILL`, which it cannot catch: its daemons still stop).
/// Returns the lines it printed.
fn demo_stopped_by(signal: libc::c_int, after: &str, tmp: &std::path::Path) -> Vec<String> {
    let mut child = Command::new(bin())
        .arg("demo")
        .env("TMPDIR", tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = lines_of(child.stdout.take().unwrap());
    let mut seen = Vec::new();
    while !seen.last().is_some_and(|l: &String| l.contains(after)) {
        let line = lines
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("demo never printed {after:?}: {seen:?}"));
        seen.push(line);
    }
    let running = processes_mentioning(&tmp.display().to_string());
    // SAFETY: kill only takes integers.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "demo did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let caught = signal != libc::SIGKILL;
    assert_eq!(
        status.code().is_some(),
        caught,
        "demo died of the signal: {status}"
    );
    let left = || -> Vec<String> {
        processes_mentioning(&tmp.display().to_string())
            .into_iter()
            .map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                // Each thread: its name, state and where it waits.
                let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|task| {
                        let read = |f: &str| {
                            std::fs::read_to_string(task.path().join(f)).unwrap_or_default()
                        };
                        let stack: Vec<String> =
                            read("stack").lines().take(6).map(str::to_owned).collect();
                        format!(
                            "{} {} {} {stack:?}",
                            read("comm").trim(),
                            read("stat")
                                .split(") ")
                                .nth(1)
                                .unwrap_or("")
                                .get(..1)
                                .unwrap_or(""),
                            read("wchan"),
                        )
                    })
                    .collect();
                format!(
                    "{} [{}] {threads:?}",
                    text(&cmdline).replace('\0', " "),
                    stat.unwrap_or_default()
                )
            })
            .collect()
    };
    // The daemons' logs, where a failure says why.
    let logs = || -> String {
        let mut logs = String::new();
        let swarms = std::fs::read_dir(tmp).into_iter().flatten().flatten();
        for node in swarms.flat_map(|s| std::fs::read_dir(s.path()).into_iter().flatten()) {
            let Ok(node) = node else { continue };
            let log = std::fs::read_to_string(node.path().join("daemon.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            logs += &format!("\n{}: {tail:?}", node.path().display());
        }
        logs
    };
    // Reaping a worker can take the kernel seconds while other threads
    // keep reading `/proc` (a daemon's thread was seen spending 5 to 10 s
    // of system time in `release_task` → `shrink_dcache_parent` while four
    // of these loops read every process's command line 50 times a
    // second): they look every 200 ms, and allow a minute, as a daemon
    // left behind would live on for good.
    let stopped = Instant::now();
    let gone = stopped + Duration::from_secs(60);
    while !left().is_empty() {
        assert!(
            Instant::now() < gone,
            "the demo's daemons and workers did not exit: {:?}{}",
            left(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    if stopped.elapsed() > Duration::from_secs(10) {
        eprintln!("the demo's processes took {:?} to exit", stopped.elapsed());
    }
    if caught {
        assert!(
            std::fs::read_dir(tmp).unwrap().next().is_none(),
            "the swarm's directory is left"
        );
    }
    seen.extend(lines.try_iter());
    seen.push(format!("{running:?} {status}"));
    seen
}

#[test]
fn the_demo_stops_its_swarm_on_sigterm_and_sighup_too_and_sigkill_its_daemons() {
    spare_testkit::hang_ups_as_from_a_terminal();
    let dir = tempfile::tempdir().unwrap();
    let tmp = |name: &str| {
        let path = dir.path().join(name);
        std::fs::create_dir(&path).unwrap();
        path
    };
    let (term, hup, early, kill) = (tmp("term"), tmp("hup"), tmp("early"), tmp("kill"));
    let ready = "the swarm keeps running";
    let (term, hup, early) = std::thread::scope(|scope| {
        let term = scope.spawn(|| demo_stopped_by(libc::SIGTERM, "-- 2000000", &term));
        let hup = scope.spawn(|| demo_stopped_by(libc::SIGHUP, ready, &hup));
        // While its daemons are starting.
        let early = scope.spawn(|| demo_stopped_by(libc::SIGTERM, "starting", &early));
        // Killed outright, its daemons go with it all the same.
        let killed = scope.spawn(|| demo_stopped_by(libc::SIGKILL, ready, &kill));
        killed.join().unwrap();
        (
            term.join().unwrap(),
            hup.join().unwrap(),
            early.join().unwrap(),
        )
    });
    assert!(term.last().unwrap().ends_with("exit status: 0"), "{term:?}");
    assert!(hup.last().unwrap().ends_with("exit status: 0"), "{hup:?}");
    assert!(
        early.last().unwrap().ends_with("exit status: 143"),
        "{early:?}"
    );
}

#[test]
fn the_demo_suggests_a_command_that_runs_from_any_directory() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .arg("demo")
        .env("TMPDIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let suggested = loop {
        let line = stdout.next().expect("a suggested run").unwrap();
        if line.contains(" run ") {
            break line;
        }
    };
    // `spare --data-dir <dir> run <module> -- 2000000`
    let words: Vec<&str> = suggested.split_whitespace().collect();
    assert_eq!(words[..2], ["spare", "--data-dir"], "{suggested}");
    assert_eq!(
        words[3..],
        ["run", words[4], "--", "2000000"],
        "{suggested}"
    );
    let module = std::path::Path::new(words[4]);
    assert!(module.is_absolute(), "{suggested}");
    assert!(module.starts_with(dir.path()), "{suggested}");
    let out = Command::new(bin())
        .current_dir("/")
        .args(&words[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("primes below 2000000: 148933"),
        "{}",
        text(&out.stdout)
    );
    // SAFETY: kill only takes integers.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    assert!(child.wait().unwrap().success());
}

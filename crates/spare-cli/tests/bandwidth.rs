//! Bandwidth limits, end to end: two daemons on loopback, a task whose
//! large stdin travels as a blob the host fetches from its requester, and a
//! transfer that takes as long as the requester's upload limit, or the
//! host's download limit, says.
//!
//! Each case starts its own two daemons, so the cases may run in parallel.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use spare_testkit::{Daemon, example, text};

/// The limit under test, in bytes per second (its burst is one second's).
const RATE: u64 = 1 << 20;
/// The stdin blob: six seconds' worth at the limit, five beyond the burst.
const STDIN: usize = 6 << 20;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_spare"))
}

/// `spare run --on <host> primes.wasm -- 1000` on `node`, fed `stdin`.
fn run_on(node: &Daemon, host: &str, stdin: &[u8]) -> Output {
    let primes = example("primes.wasm");
    node.run_cli(&["run", "--on", host, &primes, "--", "1000"], stdin)
        .expect("spare runs")
}

/// A counter from `spare status --json`.
fn status_counter(node: &Daemon, key: &str) -> u64 {
    let out = node
        .cli()
        .args(["status", "--json"])
        .output()
        .expect("spare status runs");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", text(&out.stdout)));
    status[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no `{key}` in {status}"))
}

/// Starts a host with `host_flags` and a requester with `requester_flags`,
/// and returns how long the requester's task with a [`STDIN`]-byte blob for
/// stdin took on the host, after a warm-up task that fetched and compiled
/// the module there (so what is timed is the blob's transfer).
fn timed_transfer(root: &Path, requester_flags: &[&str], host_flags: &[&str]) -> Duration {
    let bin = bin();
    let mut flags = vec!["--cores", "1"];
    flags.extend_from_slice(host_flags);
    let host = Daemon::start(&bin, &root.join("host"), &flags).expect("host starts");
    let mut flags = vec!["--cores", "1", "--bootstrap", host.addr()];
    flags.extend_from_slice(requester_flags);
    let requester = Daemon::start(&bin, &root.join("requester"), &flags).expect("requester starts");
    requester
        .wait_for_peers(1, Duration::from_secs(20))
        .expect("the requester sees the host");

    let warm_up = run_on(&requester, host.peer_id(), b"1 2 3\n");
    assert!(warm_up.status.success(), "{}", text(&warm_up.stderr));
    assert!(text(&warm_up.stdout).contains("stdin: 6 bytes, sum 6"));
    // Both buckets refill their one-second burst.
    std::thread::sleep(Duration::from_millis(1200));

    // Distinct per case, so no store anywhere has it already.
    let salt = root.display().to_string();
    let mut stdin: Vec<u8> = salt.bytes().chain(*b"\n").collect();
    stdin.extend((0..STDIN - stdin.len()).map(|i| if i % 8 == 7 { b' ' } else { b'1' }));
    let uploaded_before = status_counter(&requester, "uploaded");
    let downloaded_before = status_counter(&host, "downloaded");
    let started = Instant::now();
    let out = run_on(&requester, host.peer_id(), &stdin);
    let elapsed = started.elapsed();
    assert!(
        out.status.success(),
        "{}\nrequester log:\n{}\nhost log:\n{}",
        text(&out.stderr),
        requester.log(),
        host.log()
    );
    // primes reads the first MiB of its stdin.
    assert!(
        text(&out.stdout).contains("stdin: 1048576 bytes"),
        "{}",
        text(&out.stdout)
    );
    // The counters behind `spare status` saw the blob go out and come in.
    let uploaded = status_counter(&requester, "uploaded") - uploaded_before;
    let downloaded = status_counter(&host, "downloaded") - downloaded_before;
    assert!(uploaded >= STDIN as u64, "uploaded {uploaded}");
    assert!(downloaded >= STDIN as u64, "downloaded {downloaded}");
    elapsed
}

/// The transfer beyond the one-second burst took its time at [`RATE`],
/// and not absurdly longer.
fn assert_paced(elapsed: Duration, which: &str) {
    let ideal = Duration::from_secs_f64((STDIN as u64 - RATE) as f64 / RATE as f64);
    eprintln!("{which}: {STDIN} bytes in {elapsed:?} (ideal {ideal:?})");
    assert!(
        elapsed >= ideal.mul_f64(0.9),
        "{which}: {STDIN} bytes at {RATE} B/s took {elapsed:?}, less than {ideal:?}"
    );
    assert!(
        elapsed <= ideal * 3,
        "{which}: {STDIN} bytes at {RATE} B/s took {elapsed:?}, over 3 × {ideal:?}"
    );
}

#[test]
fn the_requesters_upload_limit_paces_the_blob_it_serves() {
    let root = tempfile::tempdir().expect("temporary directory");
    let elapsed = timed_transfer(root.path(), &["--upload", "1MiB/s"], &[]);
    assert_paced(elapsed, "upload limit");
}

#[test]
fn the_hosts_download_limit_paces_the_blob_it_fetches() {
    let root = tempfile::tempdir().expect("temporary directory");
    let elapsed = timed_transfer(root.path(), &[], &["--download", "1MiB/s"]);
    assert_paced(elapsed, "download limit");
}

#[test]
fn the_hosts_upload_limit_paces_the_output_it_sends_back() {
    let root = tempfile::tempdir().expect("temporary directory");
    let bin = bin();
    let host_dir = root.path().join("host");
    let host = Daemon::start(&bin, &host_dir, &["--cores", "1", "--upload", "1MiB/s"])
        .expect("host starts");
    let requester = Daemon::start(
        &bin,
        &root.path().join("requester"),
        &["--cores", "1", "--bootstrap", host.addr()],
    )
    .expect("requester starts");
    requester
        .wait_for_peers(1, Duration::from_secs(20))
        .expect("the requester sees the host");
    let flood = example("hostile/flood.wasm");
    let output = format!("{STDIN}B");
    let run = || {
        requester
            .run_cli(
                &["run", "--on", host.peer_id(), "--output", &output, &flood],
                b"",
            )
            .expect("spare runs")
    };
    // The first run fetches and compiles the module; then the bucket
    // refills its burst.
    let _ = run();
    std::thread::sleep(Duration::from_millis(1200));
    let uploaded_before = status_counter(&host, "uploaded");
    let started = Instant::now();
    let out = run();
    let elapsed = started.elapsed();
    // The flood is stopped at its output limit, and its output comes back.
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), STDIN);
    let uploaded = status_counter(&host, "uploaded") - uploaded_before;
    assert!(uploaded >= STDIN as u64, "uploaded {uploaded}");
    assert_paced(elapsed, "the host's upload limit on output");
}

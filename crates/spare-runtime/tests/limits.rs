//! The sandbox-limits suite: every hostile guest of `examples/hostile` is
//! stopped with the failure that names its cause, and well-behaved guests
//! see exactly their args, env and stdin.
//!
//! These run the sandbox in-process; `spare-cli/tests/e2e.rs` runs the same
//! guests through real daemons and worker processes.

use std::path::PathBuf;
use std::time::Instant;

use spare_core::{BlobId, Failure, Limits, Outcome, OutputStream, Status, TaskId};
use spare_runtime::{FUEL_PER_YIELD, Job, JobStdin, Sandbox};

fn example(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
}

fn job(name: &str, limits: Limits) -> Job {
    let path = example(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Job {
        task: TaskId::random(),
        module: BlobId::of(&bytes),
        module_path: path,
        name: name.rsplit('/').next().unwrap_or(name).to_owned(),
        args: vec![],
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits,
    }
}

fn run(job: &Job) -> Outcome {
    Sandbox::new(None).run(job)
}

fn failure(outcome: &Outcome) -> &Failure {
    outcome
        .failure()
        .unwrap_or_else(|| panic!("expected a failure, got {:?}", outcome.status))
}

fn quick() -> Limits {
    Limits {
        wall_ms: 2_000,
        ..Limits::DEFAULT
    }
}

#[test]
fn an_endless_loop_runs_out_of_fuel() {
    let limits = Limits {
        fuel: 50_000_000,
        ..quick()
    };
    let outcome = run(&job("hostile/loop.wasm", limits));
    assert_eq!(failure(&outcome), &Failure::OutOfFuel { limit: 50_000_000 });
    assert_eq!(outcome.fuel, 50_000_000, "all fuel is reported consumed");
}

#[test]
fn an_endless_loop_hits_the_wall_time_limit() {
    let outcome = stopped_at_300_ms("hostile/loop.wasm");
    assert!(outcome.fuel > 0);
}

/// Host calls cost a guest little fuel, so one that lives in them reaches a
/// fuel yield only after hours: its wall time is checked as each returns.
#[test]
fn a_guest_inside_host_calls_hits_the_wall_time_limit() {
    stopped_at_300_ms("hostile/entropy.wasm");
}

/// Runs `guest` with a wall-time limit of 300 ms, which must stop it, and
/// soon after.
fn stopped_at_300_ms(guest: &str) -> Outcome {
    let limits = Limits {
        wall_ms: 300,
        ..Limits::DEFAULT
    };
    let started = Instant::now();
    let outcome = run(&job(guest, limits));
    assert_eq!(failure(&outcome), &Failure::Timeout { limit_ms: 300 });
    let took = started.elapsed().as_millis();
    assert!((300..3_000).contains(&took), "stopped after {took} ms");
    outcome
}

#[test]
fn endless_allocation_hits_the_memory_limit() {
    let limits = Limits {
        memory: 16 << 20,
        ..quick()
    };
    let outcome = run(&job("hostile/alloc.wasm", limits));
    assert_eq!(failure(&outcome), &Failure::MemoryLimit { limit: 16 << 20 });
}

#[test]
fn endless_recursion_overflows_the_stack() {
    let limits = Limits {
        stack: 256 << 10,
        ..quick()
    };
    let outcome = run(&job("hostile/recurse.wasm", limits));
    assert_eq!(
        failure(&outcome),
        &Failure::StackOverflow { limit: 256 << 10 }
    );
}

#[test]
fn the_largest_stack_a_host_grants_works_and_still_ends() {
    let limits = Limits {
        stack: Limits::MAX.stack,
        ..quick()
    };
    let outcome = run(&job("hostile/recurse.wasm", limits));
    assert_eq!(
        failure(&outcome),
        &Failure::StackOverflow {
            limit: Limits::MAX.stack
        }
    );
    let outcome = run(&job("hello.wasm", limits));
    assert_eq!(outcome.status, Status::Exited(0));
}

#[test]
fn flooding_stdout_hits_the_output_limit() {
    let limits = Limits {
        output: 1 << 20,
        ..quick()
    };
    let outcome = run(&job("hostile/flood.wasm", limits));
    assert_eq!(
        failure(&outcome),
        &Failure::OutputLimit {
            stream: OutputStream::Stdout,
            limit: 1 << 20
        }
    );
    assert!(outcome.stdout.len() <= 1 << 20);
    assert!(outcome.stdout.starts_with(b"flood flood"));
}

#[test]
fn host_files_are_out_of_reach() {
    let outcome = run(&job("hostile/passwd.wasm", quick()));
    assert_eq!(
        outcome.status,
        Status::Exited(1),
        "{}",
        String::from_utf8_lossy(&outcome.stdout)
    );
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    assert!(stderr.starts_with("cannot open /etc/passwd:"), "{stderr}");
    assert!(!String::from_utf8_lossy(&outcome.stdout).contains("root:"));
}

#[test]
fn a_missing_import_is_named() {
    let outcome = run(&job("hostile/import.wasm", quick()));
    assert_eq!(
        failure(&outcome),
        &Failure::MissingImport {
            module: "env".into(),
            name: "launch_missiles".into()
        }
    );
    assert_eq!(outcome.fuel, 0);
}

#[test]
fn a_file_that_is_not_wasm_is_refused() {
    let outcome = run(&job("hostile/notwasm.wasm", quick()));
    assert!(
        matches!(failure(&outcome), Failure::NotWasm(why) if why.contains("magic")),
        "{:?}",
        outcome.status
    );
}

#[test]
fn a_trap_is_reported_and_earlier_output_kept() {
    let outcome = run(&job("hostile/crash.wasm", quick()));
    let Failure::Trap(message) = failure(&outcome) else {
        panic!("expected a trap, got {:?}", outcome.status);
    };
    assert!(message.contains("unreachable"), "{message}");
    assert_eq!(outcome.stdout, b"crash: about to trap\n");
}

#[test]
fn args_env_and_stdin_reach_the_guest_and_nothing_else() {
    let mut job = job("echo.wasm", quick());
    job.args = vec!["one".into(), "two words".into()];
    job.env = vec![
        ("GREETING".into(), "hi".into()),
        ("EXIT_CODE".into(), "7".into()),
    ];
    job.stdin = JobStdin::Bytes(b"from stdin\n".to_vec());
    let outcome = run(&job);
    assert_eq!(outcome.status, Status::Exited(7));
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    assert_eq!(
        stdout,
        "arg[1]=one\narg[2]=two words\nenv GREETING=hi\nenv EXIT_CODE=7\nstdin:\nfrom stdin\n"
    );
    assert_eq!(outcome.stderr, b"to stderr\n");
    assert!(outcome.fuel > 0);
}

/// Fuel checks call the host every `FUEL_PER_YIELD` units (to yield, which is how
/// wall time and cancellation are enforced) through spare's patch to
/// wasmtime (`vendor/README.md`): a trampoline that must preserve every
/// register of the guest. A register it lost would show here as a wrong
/// checksum (the value below is the native build's), or worse.
#[test]
fn a_guest_computes_exactly_across_hundreds_of_fuel_yields() {
    let mut job = job("cpubound.wasm", Limits::DEFAULT);
    job.args = vec!["2".into()];
    let first = run(&job);
    assert_eq!(first.status, Status::Exited(0), "{:?}", first.status);
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        "cpubound: rounds=2 checksum=0x068a7e127efd41e3\n"
    );
    assert!(
        first.fuel > 100 * FUEL_PER_YIELD,
        "only {} fuel: too few yields to test anything",
        first.fuel
    );
    // Metering is exact: the same guest with the same input costs the same.
    assert_eq!(run(&job).fuel, first.fuel);
}

#[test]
fn stdin_can_come_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("stdin");
    std::fs::write(&input, b"1 2 3\n").unwrap();
    let mut job = job("primes.wasm", quick());
    job.args = vec!["100".into()];
    job.stdin = JobStdin::File(input);
    let outcome = run(&job);
    assert_eq!(outcome.status, Status::Exited(0));
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    assert!(stdout.contains("primes below 100: 25"), "{stdout}");
    assert!(stdout.contains("sum 6"), "{stdout}");
}

#[test]
fn a_preview2_component_runs() {
    let outcome = run(&job("hello_component.wasm", quick()));
    assert_eq!(outcome.status, Status::Exited(0), "{:?}", outcome.status);
    assert_eq!(outcome.stdout, b"hello from spare\n");
}

#[test]
fn a_guest_survives_nothing_of_the_previous_one() {
    // One sandbox, two jobs: the second sees fresh memory and fresh limits.
    let mut sandbox = Sandbox::new(None);
    let mut first = job("echo.wasm", quick());
    first.env = vec![("EXIT_CODE".into(), "3".into())];
    assert_eq!(sandbox.run(&first).status, Status::Exited(3));
    let second = job("echo.wasm", quick());
    let outcome = sandbox.run(&second);
    assert_eq!(outcome.status, Status::Exited(0));
    assert!(!String::from_utf8_lossy(&outcome.stdout).contains("EXIT_CODE"));
}

#[test]
fn compiled_modules_are_cached_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let job = job("hello.wasm", quick());
    assert_eq!(
        Sandbox::new(Some(dir.path().to_path_buf()))
            .run(&job)
            .status,
        Status::Exited(0)
    );
    let artifacts: Vec<_> = walk(dir.path())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    // A fresh sandbox (a new worker) loads the artifact instead of compiling.
    assert_eq!(
        Sandbox::new(Some(dir.path().to_path_buf()))
            .run(&job)
            .status,
        Status::Exited(0)
    );
}

/// A worker's sandbox only reads the cache: what it compiles it keeps in
/// memory and says it missed, and it loads what a compiler stored.
#[test]
fn a_reading_sandbox_never_writes_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = || Some(dir.path().to_path_buf());
    for name in ["hello.wasm", "hello_component.wasm"] {
        let job = job(name, quick());
        let mut worker = Sandbox::reading(cache());
        assert_eq!(worker.run(&job).status, Status::Exited(0), "{name}");
        assert!(worker.missed_cache(), "{name}");
        // Compiled once, kept in memory.
        assert_eq!(worker.run(&job).status, Status::Exited(0), "{name}");
        assert!(!worker.missed_cache(), "{name}");
        let artifacts = |ext: &str| {
            walk(dir.path())
                .into_iter()
                .filter(|p| p.extension().is_some_and(|e| e == ext))
                .count()
        };
        let before = artifacts("cwasm");

        let mut compiler = Sandbox::new(cache());
        compiler
            .compile(&job.module, &job.module_path, job.limits.stack)
            .unwrap();
        assert_eq!(artifacts("cwasm"), before + 1, "{name}");
        let mut fresh = Sandbox::reading(cache());
        assert_eq!(fresh.run(&job).status, Status::Exited(0), "{name}");
        assert!(!fresh.missed_cache(), "{name}: loaded, not compiled");
    }
}

/// spare's patch to wasmtime (`vendor/README.md`) is what keeps fuel checks
/// off the hot path; losing it (a dropped `[patch]`, a wasmtime upgrade that
/// forgot it) would change no result, only the speed, so it is checked
/// here: compiled code reaches the out-of-fuel handler through the
/// register-preserving trampoline and not the ordinary one.
#[test]
fn fuel_checks_use_the_register_preserving_trampoline() {
    let dir = tempfile::tempdir().unwrap();
    // Zero rounds: only the compiled artifact is wanted.
    let mut job = job("cpubound.wasm", quick());
    job.args = vec!["0".into()];
    let outcome = Sandbox::new(Some(dir.path().to_path_buf())).run(&job);
    assert_eq!(outcome.status, Status::Exited(0), "{:?}", outcome.status);
    let artifact = walk(dir.path())
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .expect("a compiled artifact");
    let code = std::fs::read(artifact).unwrap();
    let has = |symbol: &[u8]| code.windows(symbol.len()).any(|w| w == symbol);
    assert!(has(b"wasmtime_patchable_builtin_out_of_gas"));
    assert!(!has(b"wasmtime_builtin_out_of_gas"));
}

fn walk(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

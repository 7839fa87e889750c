//! Guest speed: a CPU-bound C program as fuel-metered WebAssembly in spare's
//! sandbox, against the same program compiled natively, and against
//! `wasmtime run` with and without fuel.
//!
//! Every variant runs as a fresh process each time (the sandbox through
//! this binary's hidden `__sandbox-once` mode), and the variants take turns,
//! so each samples the machine's state the same way; the figure is the
//! median of the runs. Each variant also runs with zero rounds, so its
//! start-up alone is known and the run can be compared without it.

use std::ffi::OsString;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use spare_core::{BlobId, Limits, Status, TaskId};
use spare_runtime::{Job, JobStdin, Sandbox};

use crate::Env;
use crate::stats::{fmt, header, ratio, row};

/// Rounds of the kernel per run: about a third of a second natively.
const ROUNDS: &str = "30";
/// The hidden mode that runs the sandbox once in a fresh process.
pub(crate) const SANDBOX_ONCE: &str = "__sandbox-once";

pub(crate) fn run(env: &Env) -> Result<()> {
    let runs = env.iterations(9).max(3);
    let dir = tempfile::tempdir()?;
    let native = dir.path().join("cpubound");
    compile_native(&env.example("cpubound.c"), &native)?;
    let wasm = env.example("cpubound.wasm");
    let cache = dir.path().join("cache");
    // Compile into the cache once, outside the measurement.
    sandbox_once(&cache, &wasm, "1")?;

    let here = std::env::current_exe()?;
    // Each variant as a command for a given number of rounds: the full run,
    // and zero rounds for its start-up alone.
    let mut variants: Vec<(&str, Vec<OsString>)> = vec![
        ("native", vec![native.into()]),
        (
            "spare sandbox (fuel-metered, every limit on)",
            vec![
                here.into(),
                SANDBOX_ONCE.into(),
                cache.into(),
                wasm.clone().into(),
            ],
        ),
    ];
    if let Some(wasmtime) = &env.wasmtime {
        for (label, flags) in [
            ("wasmtime run", &[][..]),
            ("wasmtime run -W fuel", &["-W", "fuel=1000000000000"][..]),
        ] {
            let cwasm = dir.path().join(format!("cpubound{}.cwasm", flags.len()));
            let status = Command::new(wasmtime)
                .arg("compile")
                .args(flags)
                .arg(&wasm)
                .arg("-o")
                .arg(&cwasm)
                .status()?;
            ensure!(status.success(), "wasmtime compile failed");
            let mut argv: Vec<OsString> = vec![wasmtime.into(), "run".into()];
            argv.extend(flags.iter().map(OsString::from));
            argv.push("--allow-precompiled".into());
            argv.push(cwasm.into());
            variants.push((label, argv));
        }
    }
    let command = |argv: &[OsString], rounds: &str| {
        let mut command = Command::new(&argv[0]);
        command.args(&argv[1..]).arg(rounds);
        command
    };

    let mut full: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    let mut startup: Vec<Vec<Duration>> = vec![Vec::new(); variants.len()];
    let mut outputs: Vec<String> = vec![String::new(); variants.len()];
    for _ in 0..runs {
        for (i, (_, argv)) in variants.iter().enumerate() {
            let (took, out) = timed(&mut command(argv, ROUNDS))?;
            full[i].push(took);
            outputs[i] = out;
            startup[i].push(timed(&mut command(argv, "0"))?.0);
        }
    }
    for (i, (label, _)) in variants.iter().enumerate() {
        ensure!(
            outputs[i].lines().next() == outputs[0].lines().next(),
            "{label} disagrees with native: {}",
            outputs[i]
        );
    }
    let full = medians(&mut full);
    let startup = medians(&mut startup);

    header(&format!(
        "Guest speed (cpubound.c, {ROUNDS} rounds, median of {runs} fresh processes each)"
    ));
    for (i, (label, _)) in variants.iter().enumerate().skip(1) {
        row(
            label,
            &fmt(full[i]),
            &fmt(full[0]),
            &ratio(full[i], full[0]),
        );
    }
    println!(
        "\nbaseline: the same C source compiled natively with -O2; every time includes process start-up"
    );

    header("Start-up alone (0 rounds), and the run without it");
    for (i, (label, _)) in variants.iter().enumerate() {
        row(&format!("{label}: start-up"), &fmt(startup[i]), "", "");
    }
    let compute = |i: usize| full[i].saturating_sub(startup[i]);
    for (i, (label, _)) in variants.iter().enumerate().skip(1) {
        row(
            &format!("{label}: run minus start-up"),
            &fmt(compute(i)),
            &fmt(compute(0)),
            &ratio(compute(i), compute(0)),
        );
    }
    Ok(())
}

/// Loads the module from `cache` (compiling it there if needed), runs it
/// once and returns the guest's stdout. The hidden mode prints it.
pub(crate) fn sandbox_once(cache: &Path, wasm: &Path, rounds: &str) -> Result<String> {
    let bytes = std::fs::read(wasm)?;
    let job = |rounds: &str| Job {
        task: TaskId::random(),
        module: BlobId::of(&bytes),
        module_path: wasm.to_path_buf(),
        name: "cpubound.wasm".into(),
        args: vec![rounds.into()],
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits: Limits::DEFAULT,
    };
    let outcome = Sandbox::new(Some(cache.to_path_buf())).run(&job(rounds));
    ensure!(
        outcome.status == Status::Exited(0),
        "cpubound failed: {:?}",
        outcome.status
    );
    Ok(String::from_utf8_lossy(&outcome.stdout).into_owned())
}

/// The median of each variant's samples.
fn medians(samples: &mut [Vec<Duration>]) -> Vec<Duration> {
    samples
        .iter_mut()
        .map(|t| {
            t.sort();
            t[t.len() / 2]
        })
        .collect()
}

fn compile_native(source: &Path, out: &Path) -> Result<()> {
    for cc in ["clang", "cc"] {
        let status = Command::new(cc)
            .args(["-O2", "-o"])
            .arg(out)
            .arg(source)
            .status();
        if matches!(status, Ok(s) if s.success()) {
            return Ok(());
        }
    }
    bail!(
        "cannot compile {} natively: neither clang nor cc worked",
        source.display()
    )
}

fn timed(command: &mut Command) -> Result<(Duration, String)> {
    let start = Instant::now();
    let out = command
        .output()
        .context("cannot run the benchmark program")?;
    let took = start.elapsed();
    ensure!(
        out.status.success(),
        "{:?} failed: {}",
        command,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
}

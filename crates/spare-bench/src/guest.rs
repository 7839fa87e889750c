//! Guest speed: a CPU-bound C program as fuel-metered WebAssembly in spare's
//! sandbox, against the same program compiled natively, and against
//! `wasmtime run` with and without fuel.

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

pub(crate) fn run(env: &Env) -> Result<()> {
    let runs = env.iterations(5).max(3);
    let dir = tempfile::tempdir()?;
    let native = dir.path().join("cpubound");
    compile_native(&env.example("cpubound.c"), &native)?;

    let (native_time, native_out) = median(runs, || timed(Command::new(&native).arg(ROUNDS)))?;

    let wasm = env.example("cpubound.wasm");
    let bytes = std::fs::read(&wasm)?;
    let mut sandbox = Sandbox::new(Some(dir.path().join("cache")));
    let job = Job {
        task: TaskId::random(),
        module: BlobId::of(&bytes),
        module_path: wasm.clone(),
        name: "cpubound.wasm".into(),
        args: vec![ROUNDS.into()],
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits: Limits::DEFAULT,
    };
    sandbox.run(&job); // compile and cache outside the measurement
    let (spare_time, spare_out) = median(runs, || {
        let start = Instant::now();
        let outcome = sandbox.run(&job);
        let took = start.elapsed();
        ensure!(
            outcome.status == Status::Exited(0),
            "cpubound failed: {:?}",
            outcome.status
        );
        Ok((took, String::from_utf8_lossy(&outcome.stdout).into_owned()))
    })?;
    ensure!(
        spare_out == native_out,
        "wasm and native disagree: {spare_out} vs {native_out}"
    );

    header(&format!(
        "Guest speed (cpubound.c, {ROUNDS} rounds, median of {runs})"
    ));
    row(
        "spare sandbox (fuel + epoch)",
        &fmt(spare_time),
        &fmt(native_time),
        &ratio(spare_time, native_time),
    );
    if let Some(wasmtime) = &env.wasmtime {
        for (label, flags) in [
            ("wasmtime run", &[][..]),
            ("wasmtime run -W fuel", &["-W", "fuel=1000000000000"][..]),
        ] {
            let cwasm = dir.path().join("cpubound.cwasm");
            let status = Command::new(wasmtime)
                .arg("compile")
                .args(flags)
                .arg(&wasm)
                .arg("-o")
                .arg(&cwasm)
                .status()?;
            ensure!(status.success(), "wasmtime compile failed");
            let (time, out) = median(runs, || {
                timed(
                    Command::new(wasmtime)
                        .arg("run")
                        .args(flags)
                        .arg("--allow-precompiled")
                        .arg(&cwasm)
                        .arg(ROUNDS),
                )
            })?;
            ensure!(out == native_out, "{label} disagrees with native");
            row(
                label,
                &fmt(time),
                &fmt(native_time),
                &ratio(time, native_time),
            );
        }
    }
    println!(
        "\nbaseline: the same C source compiled natively with -O2; `wasmtime run` times include process start-up"
    );
    Ok(())
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

fn median(
    runs: usize,
    mut f: impl FnMut() -> Result<(Duration, String)>,
) -> Result<(Duration, String)> {
    let mut results = (0..runs).map(|_| f()).collect::<Result<Vec<_>>>()?;
    results.sort_by_key(|(d, _)| *d);
    Ok(results.swap_remove(runs / 2))
}

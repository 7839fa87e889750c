//! Instantiation of a cached module: spare's sandbox running a trivial guest
//! whose compiled module is already cached, against bare wasmtime doing the
//! least the same work needs (WASI context, store, instantiate, `_start`).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use spare_core::{BlobId, Limits, Status, TaskId};
use spare_runtime::{Job, JobStdin, Sandbox};
use wasmtime::{Engine, Linker, Module, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;

use crate::Env;
use crate::stats::{Samples, header, percentile_rows};

pub(crate) fn run(env: &Env) -> Result<()> {
    let path = env.example("hello.wasm");
    let bytes = std::fs::read(&path)?;
    let n = env.iterations(20_000);

    let cache = tempfile::tempdir()?;
    let mut sandbox = Sandbox::new(Some(cache.path().to_path_buf()));
    let job = Job {
        task: TaskId::random(),
        module: BlobId::of(&bytes),
        module_path: path,
        name: "hello.wasm".into(),
        args: vec![],
        env: vec![],
        stdin: JobStdin::Bytes(vec![]),
        limits: Limits::DEFAULT,
    };
    let spare = measure(n, || {
        let outcome = sandbox.run(&job);
        ensure!(
            outcome.status == Status::Exited(0),
            "hello failed: {:?}",
            outcome.status
        );
        Ok(())
    })?;

    let engine = Engine::default();
    let mut linker: Linker<WasiP1Ctx> = Linker::new(&engine);
    wt(wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |cx| cx))?;
    let module = wt(Module::new(&engine, &bytes))?;
    let pre = wt(linker.instantiate_pre(&module))?;
    let bare = measure(n, || {
        let wasi = WasiCtxBuilder::new()
            .stdout(MemoryOutputPipe::new(4096))
            .build_p1();
        let mut store = Store::new(&engine, wasi);
        let instance = wt(pre.instantiate(&mut store))?;
        let start = wt(instance.get_typed_func::<(), ()>(&mut store, "_start"))?;
        wt(start.call(&mut store, ()))
    })?;

    header(&format!(
        "Instantiation of a cached module ({} runs of hello.wasm)",
        spare.len()
    ));
    percentile_rows("", &spare, &bare);
    println!(
        "\nbaseline: bare wasmtime in the same process (no fuel, no limits, no output capture bookkeeping)"
    );
    Ok(())
}

/// wasmtime's own error type, as anyhow's.
fn wt<T>(result: wasmtime::Result<T>) -> Result<T> {
    result.map_err(|e| anyhow::anyhow!("{e:#}"))
}

/// Times `n` calls of `f` after a warm-up of `n / 10`.
fn measure(n: usize, mut f: impl FnMut() -> Result<()>) -> Result<Samples> {
    for _ in 0..n / 10 {
        f()?;
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(n);
    for _ in 0..n {
        let start = Instant::now();
        f()?;
        samples.push(start.elapsed());
    }
    Ok(Samples::new(samples))
}

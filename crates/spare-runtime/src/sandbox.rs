//! Running one guest under its limits with wasmtime.
//!
//! A [`Sandbox`] owns the wasmtime engines, the WASI linkers and the caches of
//! compiled modules. It is used by one worker thread; every call to
//! [`Sandbox::run`] gets a fresh [`Store`] that dies with the job, so nothing
//! a guest does outlives it.
//!
//! The wall-time limit costs the guest nothing: instead of epoch checks in
//! every loop (measured at 30% of a CPU-bound guest's speed), the guest runs
//! as a future on a one-thread executor and yields every
//! [`FUEL_PER_YIELD`] units of the fuel it is metered by anyway; a timer
//! drops the future when the limit passes, and the fuel used so far is
//! still known. A guest that lives in host calls (each cheap in fuel, dear
//! in time) may not reach a fuel yield for hours: every return from a host
//! call looks at the clock and for a cancel too.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spare_core::limits::{
    MAX_INSTANCES, MAX_MEMORIES, MAX_RANDOM_BYTES, MAX_RESOURCES, MAX_TABLE_ELEMENTS, MAX_TABLES,
};
use spare_core::outcome::clip_detail;
use spare_core::wasm::{WasmKind, sniff};
use spare_core::{BlobId, Failure, Limits, Outcome, OutputStream, Status};
use wasmtime::component::{Component, ResourceTable};
use wasmtime::{
    CallHook, Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module, OptLevel,
    PoolingAllocationConfig, Store, Trap,
};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::bindings::{Command, CommandPre};
use wasmtime_wasi::p2::pipe::MemoryInputPipe;
use wasmtime_wasi::{I32Exit, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::cache::{DiskCache, Lru};
use crate::job::{Job, JobStdin};
use crate::limiter::GuestLimiter;
use crate::output::CappedOutput;

/// Fuel a guest burns between two chances for the host to check the wall
/// clock: about a millisecond of guest work, which bounds how far past its
/// wall-time limit a guest can run.
pub const FUEL_PER_YIELD: u64 = 2_000_000;
/// Native stack for host functions on top of the guest's own stack limit.
const HOST_STACK: u64 = 1 << 20;
/// Prepared modules kept in memory per engine.
const PREPARED_CACHE: usize = 64;
/// Compiled code those may hold, per engine: a worker's memory beyond its
/// guest's that a requester's modules choose. The module a job runs is
/// kept whatever its size.
const PREPARED_BYTES: usize = 64 << 20;
/// Engines kept at once; there is one per distinct stack limit in use.
const MAX_ENGINES: usize = 4;

/// Store state for a WASI preview 1 module.
struct P1State {
    wasi: WasiP1Ctx,
    limiter: GuestLimiter,
}

/// Store state for a WASI preview 2 component.
/// A preview-2 guest's table of host resources, within [`MAX_RESOURCES`].
fn resource_table() -> ResourceTable {
    let mut table = ResourceTable::new();
    table.set_max_capacity(MAX_RESOURCES);
    table
}

struct P2State {
    ctx: WasiCtx,
    table: ResourceTable,
    limiter: GuestLimiter,
}

impl WasiView for P2State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// A module or component ready to instantiate.
#[derive(Clone)]
enum Prepared {
    Module(InstancePre<P1State>),
    Component(CommandPre<P2State>),
}

/// One wasmtime engine (engines differ only by their stack limit) with its
/// linkers and caches.
struct EngineSet {
    stack: u64,
    engine: Engine,
    p1_linker: Linker<P1State>,
    p2_linker: wasmtime::component::Linker<P2State>,
    /// Every `(module, name)` the preview 1 linker defines, to name a missing
    /// import precisely.
    p1_provided: HashSet<(String, String)>,
    disk: Option<DiskCache>,
    prepared: Lru<BlobId, Prepared>,
    /// Set when a module was compiled here and, the cache being read-only
    /// to this process, not stored (see [`Sandbox::missed_cache`]).
    missed: std::cell::Cell<bool>,
}

/// Runs guests. See the crate docs for the limits it enforces.
pub struct Sandbox {
    cache_root: Option<PathBuf>,
    /// Whether compiled modules are stored in the cache, or only read.
    writes_cache: bool,
    engines: Vec<EngineSet>,
    /// Drives guests and their wall-time timers; made on first use.
    executor: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("cache_root", &self.cache_root)
            .field("engines", &self.engines.len())
            .finish()
    }
}

impl Sandbox {
    /// A sandbox that caches compiled modules under `cache_root`, if given.
    pub fn new(cache_root: Option<PathBuf>) -> Self {
        Self {
            cache_root,
            writes_cache: true,
            engines: Vec::new(),
            executor: None,
        }
    }

    /// A sandbox that loads compiled modules from under `cache_root` but
    /// never stores any: a worker that runs guests, which a guest that
    /// broke out of wasmtime could use to plant code for later workers.
    /// What it compiles itself it keeps in memory, and says so
    /// ([`Sandbox::missed_cache`]) for a compiler to store.
    pub fn reading(cache_root: Option<PathBuf>) -> Self {
        Self {
            writes_cache: false,
            ..Self::new(cache_root)
        }
    }

    /// Whether the last [`Sandbox::run`] compiled its module because the
    /// cache had no artifact for it, and stored none.
    pub fn missed_cache(&self) -> bool {
        self.engines.iter().any(|set| set.missed.get())
    }

    /// Compiles `module` (at `path`) for jobs with a `stack` limit and
    /// stores it in the cache, unless an artifact that loads is there
    /// already. For a process that runs no guest.
    pub fn compile(&mut self, module: &BlobId, path: &Path, stack: u64) -> Result<(), Failure> {
        let set = self.engine_for(stack)?;
        // Loads an artifact that is there, and replaces one that does not
        // load (cut short, or refused by wasmtime).
        let loaded = set.load(module, path);
        // Linking (a missing import, no entry point) fails after the
        // artifact is stored: that is the job's failure, not the cache's.
        match (loaded, &set.disk) {
            (Ok(_), _) => Ok(()),
            (Err(_), Some(disk)) if disk.path(module).exists() => Ok(()),
            (Err(e), _) => Err(e),
        }
    }

    /// Runs `job` to completion and reports how it ended. Never panics on
    /// anything the guest does.
    pub fn run(&mut self, job: &Job) -> Outcome {
        let started = Instant::now();
        let paused_before = crate::stop::paused();
        let mut outcome = match self.run_inner(job) {
            Ok(outcome) => outcome,
            Err(failure) => Outcome::failed(failure),
        };
        // Time the host spent paused is not the guest's.
        let paused = crate::stop::paused().saturating_sub(paused_before);
        let wall = started.elapsed().saturating_sub(paused);
        outcome.wall_ms = u64::try_from(wall.as_millis()).unwrap_or(u64::MAX);
        outcome
    }

    fn run_inner(&mut self, job: &Job) -> Result<Outcome, Failure> {
        let stdin = match &job.stdin {
            JobStdin::Bytes(bytes) => bytes.clone(),
            JobStdin::File(path) => std::fs::read(path)
                .map_err(|e| Failure::Host(format!("cannot read stdin blob: {e}")))?,
        };
        self.start_executor()?;
        for set in &self.engines {
            set.missed.set(false);
        }
        let set = self.engine_for(job.limits.stack)?;
        let prepared = set.prepare(&job.module, &job.module_path)?;
        let engine = set.engine.clone();
        let executor = self
            .executor
            .as_ref()
            .ok_or_else(|| Failure::Host("no guest executor".into()))?;
        let stdout = CappedOutput::new(job.limits.output);
        let stderr = CappedOutput::new(job.limits.output);
        let mut builder = WasiCtxBuilder::new();
        builder
            .arg(&job.name)
            .args(&job.args)
            .envs(&job.env)
            .stdin(MemoryInputPipe::new(stdin))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .max_random_size(MAX_RANDOM_BYTES);
        let limiter = GuestLimiter::new(job.limits.memory);
        let clock = WallClock::start(Duration::from_millis(job.limits.wall_ms));
        let (result, fuel_left, memory_exceeded) = match prepared {
            Prepared::Module(pre) => {
                let mut store = Store::new(
                    &engine,
                    P1State {
                        wasi: builder.build_p1(),
                        limiter,
                    },
                );
                store.limiter(|s| &mut s.limiter);
                arm(&mut store, &job.limits, clock)?;
                let run = async {
                    let instance = pre.instantiate_async(&mut store).await?;
                    let start = instance.get_typed_func::<(), ()>(&mut store, "_start")?;
                    start.call_async(&mut store, ()).await
                };
                let result = executor.block_on(within(clock, run));
                let fuel_left = store.get_fuel().unwrap_or(0);
                (
                    result.map(|ran| ran.map(|()| 0)),
                    fuel_left,
                    store.data().limiter.memory_exceeded,
                )
            }
            Prepared::Component(pre) => {
                let mut store = Store::new(
                    &engine,
                    P2State {
                        ctx: builder.build(),
                        table: resource_table(),
                        limiter,
                    },
                );
                store.limiter(|s| &mut s.limiter);
                arm(&mut store, &job.limits, clock)?;
                let run = async {
                    let command: Command = pre.instantiate_async(&mut store).await?;
                    let ran = command.wasi_cli_run().call_run(&mut store).await?;
                    Ok(if ran.is_ok() { 0 } else { 1 })
                };
                let result = executor.block_on(within(clock, run));
                let fuel_left = store.get_fuel().unwrap_or(0);
                (result, fuel_left, store.data().limiter.memory_exceeded)
            }
        };
        let status = match result {
            Ok(Ok(code)) => Status::Exited(code),
            Ok(Err(err)) => match err.downcast_ref::<Cut>() {
                Some(cut) => Status::Failed(cut.failure(&job.limits)),
                None => classify(&err, &job.limits, memory_exceeded, &stdout, &stderr),
            },
            Err(cut) => Status::Failed(cut.failure(&job.limits)),
        };
        Ok(Outcome {
            status,
            stdout: stdout.take(),
            stderr: stderr.take(),
            fuel: job.limits.fuel.saturating_sub(fuel_left),
            wall_ms: 0,
        })
    }

    /// Makes ready, before any job, what every job needs: the guest
    /// executor, and the engine for jobs with a `stack` limit. A fresh
    /// worker does this before it says it is ready, so that its first job
    /// costs little more than a warm worker's.
    pub fn warm(&mut self, stack: u64) -> Result<(), Failure> {
        self.start_executor()?;
        self.engine_for(stack).map(|_| ())
    }

    fn start_executor(&mut self) -> Result<(), Failure> {
        if self.executor.is_none() {
            let executor = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| Failure::Host(format!("cannot start the guest executor: {e}")))?;
            self.executor = Some(executor);
        }
        Ok(())
    }

    /// The engine whose stack limit is `stack`, created on first use.
    fn engine_for(&mut self, stack: u64) -> Result<&mut EngineSet, Failure> {
        if let Some(pos) = self.engines.iter().position(|e| e.stack == stack) {
            // Most recently used last.
            let set = self.engines.remove(pos);
            self.engines.push(set);
        } else {
            if self.engines.len() >= MAX_ENGINES {
                self.engines.remove(0);
            }
            let set = EngineSet::new(stack, self.cache_root.as_deref(), self.writes_cache)?;
            self.engines.push(set);
        }
        self.engines
            .last_mut()
            .ok_or_else(|| Failure::Host("no engine".into()))
    }
}

/// Gives a fresh store its fuel, makes it yield to the executor regularly
/// so the wall-time timer can fire, and has every return from a host call
/// trap once the guest is out of time or cancelled.
fn arm<T>(store: &mut Store<T>, limits: &Limits, clock: WallClock) -> Result<(), Failure> {
    let host = |e: wasmtime::Error| Failure::Host(format!("cannot set fuel: {e}"));
    store.set_fuel(limits.fuel).map_err(host)?;
    store
        .fuel_async_yield_interval(Some(FUEL_PER_YIELD))
        .map_err(host)?;
    store.call_hook(move |_, hook| match hook {
        CallHook::ReturningFromHost if crate::stop::cancel_requested() => {
            Err(Cut::Cancelled.into())
        }
        CallHook::ReturningFromHost if Instant::now() >= clock.due() => Err(Cut::TimedOut.into()),
        _ => Ok(()),
    });
    Ok(())
}

/// When a guest's time is up: its wall-time limit after it started, moved
/// on by the time its worker has spent paused since (see `stop`).
#[derive(Clone, Copy)]
struct WallClock {
    started: Instant,
    wall: Duration,
    paused_before: Duration,
}

impl WallClock {
    fn start(wall: Duration) -> Self {
        Self {
            started: Instant::now(),
            wall,
            paused_before: crate::stop::paused(),
        }
    }

    fn due(&self) -> Instant {
        let paused = crate::stop::paused().saturating_sub(self.paused_before);
        self.started + self.wall + paused
    }
}

/// Why a guest was cut short from outside: the end of a [`within`], or the
/// trap a host call returns with (see [`arm`]).
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// The wall-time limit passed.
    TimedOut,
    /// The daemon asked for it (the task was cancelled; see `stop`).
    Cancelled,
}

impl Cut {
    fn failure(self, limits: &Limits) -> Failure {
        match self {
            Cut::TimedOut => Failure::Timeout {
                limit_ms: limits.wall_ms,
            },
            Cut::Cancelled => Failure::Cancelled,
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cut::TimedOut => "wall-time limit reached",
            Cut::Cancelled => "cancelled",
        })
    }
}

impl std::error::Error for Cut {}

/// How often a guest asleep in a host call is checked for a cancel; a
/// running guest is checked at each of its fuel yields.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// Runs `guest` until it ends, its `clock` runs out or the daemon cancels
/// it; dropping the future stops the guest at its next yield.
async fn within<T>(
    clock: WallClock,
    guest: impl std::future::Future<Output = wasmtime::Result<T>>,
) -> Result<wasmtime::Result<T>, Cut> {
    let deadline = async {
        // A pause moves the deadline by its length (see `stop`); the timer
        // fires late after one, and then sleeps on for what is left.
        loop {
            let due = clock.due();
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    };
    let mut tick = tokio::time::interval(CANCEL_POLL);
    let cancelled = std::future::poll_fn(|cx| {
        if crate::stop::cancel_requested() {
            return std::task::Poll::Ready(());
        }
        // Keep a timer armed, so that a guest which does not yield is
        // checked too.
        while tick.poll_tick(cx).is_ready() {}
        std::task::Poll::Pending
    });
    tokio::select! {
        biased;
        () = cancelled => Err(Cut::Cancelled),
        result = guest => Ok(result),
        () = deadline => Err(Cut::TimedOut),
    }
}

/// The length of compiled code's image in memory.
fn code_bytes(image: std::ops::Range<*const u8>) -> usize {
    image.end.addr().saturating_sub(image.start.addr())
}

/// Names the cause of a guest's abnormal end.
fn classify(
    err: &wasmtime::Error,
    limits: &Limits,
    memory_exceeded: bool,
    stdout: &CappedOutput,
    stderr: &CappedOutput,
) -> Status {
    if let Some(exit) = err.downcast_ref::<I32Exit>() {
        return Status::Exited(exit.0);
    }
    let failure = if stdout.overflowed() {
        Failure::OutputLimit {
            stream: OutputStream::Stdout,
            limit: limits.output,
        }
    } else if stderr.overflowed() {
        Failure::OutputLimit {
            stream: OutputStream::Stderr,
            limit: limits.output,
        }
    } else if memory_exceeded {
        Failure::MemoryLimit {
            limit: limits.memory,
        }
    } else {
        match err.downcast_ref::<Trap>() {
            Some(Trap::OutOfFuel) => Failure::OutOfFuel { limit: limits.fuel },
            Some(Trap::Interrupt) => Failure::Timeout {
                limit_ms: limits.wall_ms,
            },
            Some(Trap::StackOverflow) => Failure::StackOverflow {
                limit: limits.stack,
            },
            Some(trap) => Failure::Trap(trap.to_string()),
            None => Failure::Trap(one_line(err)),
        }
    };
    Status::Failed(failure)
}

/// An error and its causes on one line, clipped.
fn one_line(err: &wasmtime::Error) -> String {
    let text = format!("{err:#}").replace('\n', " ");
    clip_detail(text)
}

impl EngineSet {
    fn new(stack: u64, cache_root: Option<&Path>, writes: bool) -> Result<Self, Failure> {
        let host =
            |what: &str, e: wasmtime::Error| Failure::Host(format!("{what}: {}", one_line(&e)));
        let mut config = Config::new();
        config
            .consume_fuel(true)
            .max_wasm_stack(usize::try_from(stack).unwrap_or(usize::MAX))
            .async_stack_size(usize::try_from(stack + HOST_STACK).unwrap_or(usize::MAX))
            .wasm_component_model(true)
            .cranelift_opt_level(OptLevel::Speed)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pooling()));
        let engine = Engine::new(&config).map_err(|e| host("cannot create engine", e))?;

        let mut p1_linker = Linker::new(&engine);
        wasmtime_wasi::p1::add_to_linker_async(&mut p1_linker, |s: &mut P1State| &mut s.wasi)
            .map_err(|e| host("cannot link WASI preview 1", e))?;
        let mut p2_linker = wasmtime::component::Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut p2_linker)
            .map_err(|e| host("cannot link WASI preview 2", e))?;

        let mut probe = Store::new(
            &engine,
            P1State {
                wasi: WasiCtxBuilder::new().build_p1(),
                limiter: GuestLimiter::new(0),
            },
        );
        let p1_provided = p1_linker
            .iter(&mut probe)
            .map(|(module, name, _)| (module.to_owned(), name.to_owned()))
            .collect();

        let disk = match cache_root {
            Some(root) => match DiskCache::new(root, &engine, writes) {
                Ok(disk) => Some(disk),
                Err(e) => {
                    tracing::warn!("compiled-module cache disabled: {e}");
                    None
                }
            },
            None => None,
        };
        Ok(Self {
            stack,
            engine,
            p1_linker,
            p2_linker,
            p1_provided,
            disk,
            prepared: Lru::new(PREPARED_CACHE, PREPARED_BYTES),
            missed: std::cell::Cell::new(false),
        })
    }

    /// Finds or builds the prepared instance of `module`: memory cache, then
    /// disk cache, then compilation.
    fn prepare(&mut self, module: &BlobId, path: &Path) -> Result<Prepared, Failure> {
        if let Some(prepared) = self.prepared.get(module) {
            return Ok(prepared.clone());
        }
        let (prepared, code) = self.load(module, path)?;
        self.prepared.insert(*module, prepared.clone(), code);
        Ok(prepared)
    }

    /// The prepared instance of `id`, and the bytes its compiled code
    /// takes.
    fn load(&self, id: &BlobId, path: &Path) -> Result<(Prepared, usize), Failure> {
        let cached = self
            .disk
            .as_ref()
            .map(|d| d.path(id))
            .filter(|p| p.exists());
        let mut header = [0u8; 8];
        let kind = {
            use std::io::Read;
            let mut file = std::fs::File::open(path).map_err(|e| {
                Failure::Host(format!("cannot open module {}: {e}", file_name(path)))
            })?;
            let n = file.read(&mut header).unwrap_or(0);
            sniff(&header[..n]).map_err(Failure::NotWasm)?
        };
        match kind {
            WasmKind::Module => {
                let module = match cached.and_then(|p| self.deserialize_module(&p)) {
                    Some(module) => module,
                    None => {
                        let bytes = read_module(path)?;
                        let module = Module::new(&self.engine, &bytes).map_err(|e| invalid(&e))?;
                        self.save(id, module.serialize());
                        module
                    }
                };
                let code = code_bytes(module.image_range());
                let pre = self.prepare_module(&module)?;
                Ok((Prepared::Module(pre), code))
            }
            WasmKind::Component => {
                let component = match cached.and_then(|p| self.deserialize_component(&p)) {
                    Some(component) => component,
                    None => {
                        let bytes = read_module(path)?;
                        let component =
                            Component::new(&self.engine, &bytes).map_err(|e| invalid(&e))?;
                        self.save(id, component.serialize());
                        component
                    }
                };
                let pre = self
                    .p2_linker
                    .instantiate_pre(&component)
                    .map_err(|e| Failure::Invalid(one_line(&e)))?;
                let code = code_bytes(component.image_range());
                CommandPre::new(pre)
                    .map(|pre| (Prepared::Component(pre), code))
                    .map_err(|_| Failure::NoEntryPoint)
            }
        }
    }

    fn prepare_module(&self, module: &Module) -> Result<InstancePre<P1State>, Failure> {
        for import in module.imports() {
            let key = (import.module().to_owned(), import.name().to_owned());
            if !self.p1_provided.contains(&key) {
                return Err(Failure::MissingImport {
                    module: clip_detail(key.0),
                    name: clip_detail(key.1),
                });
            }
        }
        match module.get_export("_start") {
            Some(wasmtime::ExternType::Func(_)) => {}
            _ => return Err(Failure::NoEntryPoint),
        }
        self.p1_linker
            .instantiate_pre(module)
            .map_err(|e| Failure::Invalid(one_line(&e)))
    }

    fn deserialize_module(&self, path: &Path) -> Option<Module> {
        // SAFETY: the file was written by `save` from `Module::serialize` of
        // an engine with the same compatibility hash (it names the
        // directory), in the node's private data directory, by the compiler,
        // a process that runs no guest (workers only read the cache);
        // wasmtime still checks the header and refuses an incompatible
        // artifact.
        match unsafe { Module::deserialize_file(&self.engine, path) } {
            Ok(module) => {
                crate::cache::touch(path);
                Some(module)
            }
            Err(e) => {
                tracing::debug!("ignoring cached artifact {}: {e}", path.display());
                None
            }
        }
    }

    fn deserialize_component(&self, path: &Path) -> Option<Component> {
        // SAFETY: as in `deserialize_module`.
        match unsafe { Component::deserialize_file(&self.engine, path) } {
            Ok(component) => {
                crate::cache::touch(path);
                Some(component)
            }
            Err(e) => {
                tracing::debug!("ignoring cached artifact {}: {e}", path.display());
                None
            }
        }
    }

    fn save(&self, id: &BlobId, artifact: wasmtime::Result<Vec<u8>>) {
        let (Some(disk), Ok(bytes)) = (&self.disk, artifact) else {
            return;
        };
        if !disk.writes() {
            self.missed.set(true);
            return;
        }
        if let Err(e) = disk.store(id, &bytes) {
            tracing::warn!("cannot cache compiled module {id}: {e}");
        }
    }
}

/// The pooling allocator, sized for one guest at a time (a worker runs one
/// job at a time) at the largest limits any host grants. Reusing slots
/// instead of mapping fresh memory per instance is what makes instantiation
/// take microseconds; the reservation is virtual address space only.
fn pooling() -> PoolingAllocationConfig {
    let (instances, memories, tables) =
        (MAX_INSTANCES as u32, MAX_MEMORIES as u32, MAX_TABLES as u32);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(instances)
        .total_component_instances(2)
        .total_memories(memories)
        .total_tables(tables)
        .max_core_instances_per_component(instances)
        .max_memories_per_component(memories)
        .max_tables_per_component(tables)
        .max_memories_per_module(memories)
        .max_tables_per_module(tables)
        .table_elements(MAX_TABLE_ELEMENTS)
        .max_memory_size(usize::try_from(Limits::MAX.memory).unwrap_or(usize::MAX))
        // One guest at a time, on one fiber stack.
        .total_stacks(2)
        // Small guests reuse their slot's first pages without a page fault.
        .linear_memory_keep_resident(1 << 20)
        .table_keep_resident(64 << 10);
    pool
}

/// A module's file name (its hash, in the blob store) without the
/// directories: a failure goes back to the requester, who has no business
/// knowing where the host keeps its data.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(|| "?".into(), |n| n.to_string_lossy().into_owned())
}

fn read_module(path: &Path) -> Result<Vec<u8>, Failure> {
    let bytes = std::fs::read(path)
        .map_err(|e| Failure::Host(format!("cannot read module {}: {e}", file_name(path))))?;
    if bytes.len() as u64 > spare_core::limits::MAX_MODULE_BYTES {
        return Err(Failure::Invalid(format!(
            "module of {} bytes exceeds the maximum {}",
            bytes.len(),
            spare_core::limits::MAX_MODULE_BYTES
        )));
    }
    Ok(bytes)
}

fn invalid(err: &wasmtime::Error) -> Failure {
    Failure::Invalid(one_line(err))
}

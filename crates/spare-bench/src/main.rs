//! spare's benchmarks. Each prints its figure next to a baseline measured in
//! the same run, and the ratio between them. See BENCHMARKS.md.
//!
//! ```sh
//! cargo build --release -p spare-cli -p spare-bench
//! target/release/spare-bench all
//! ```

#![allow(clippy::print_stdout)] // A benchmark reports on stdout.

mod dispatch;
mod guest;
mod instantiate;
mod owner;
mod stats;
mod throughput;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};

#[derive(Debug, Parser)]
#[command(about = "spare benchmarks, each a ratio against a same-run baseline")]
struct Args {
    /// Which benchmarks to run.
    #[arg(value_enum, required = true)]
    benches: Vec<Bench>,
    /// The `spare` binary to benchmark (default: next to this one).
    #[arg(long)]
    spare: Option<PathBuf>,
    /// The `wasmtime` CLI for the `wasmtime run` baselines (default: on PATH,
    /// or ~/.cargo/bin/wasmtime); those baselines are skipped without it.
    #[arg(long)]
    wasmtime: Option<PathBuf>,
    /// Scale the number of iterations (1.0 = the documented runs).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    Dispatch,
    Throughput,
    Guest,
    Instantiate,
    /// The owner's programs alone vs with guests on every core.
    Interference,
    /// Wake-up latency of the owner's sleeping thread, alone vs with guests.
    Responsiveness,
    /// Share of the contributed core-time guests get with the owner away.
    Harvest,
    /// Owner starts a busy program → every guest stopped.
    PauseLatency,
    All,
}

/// What every benchmark gets.
#[derive(Debug)]
pub(crate) struct Env {
    pub(crate) spare: PathBuf,
    pub(crate) wasmtime: Option<PathBuf>,
    pub(crate) scale: f64,
    pub(crate) examples: PathBuf,
}

impl Env {
    pub(crate) fn iterations(&self, n: usize) -> usize {
        ((n as f64 * self.scale).round() as usize).max(1)
    }

    pub(crate) fn example(&self, name: &str) -> PathBuf {
        self.examples.join(name)
    }
}

fn main() -> ExitCode {
    // A fresh process running the sandbox once, for the guest benchmark.
    let raw: Vec<String> = std::env::args().collect();
    // Fresh processes for the owner benchmarks' native programs.
    if let Some(code) = owner::programs::hook(&raw) {
        return code;
    }
    if raw.get(1).map(String::as_str) == Some(guest::SANDBOX_ONCE) {
        return match raw.as_slice() {
            [_, _, cache, wasm, rounds] => {
                match guest::sandbox_once(Path::new(cache), Path::new(wasm), rounds) {
                    Ok(stdout) => {
                        print!("{stdout}");
                        ExitCode::SUCCESS
                    }
                    Err(e) => {
                        eprintln!("spare-bench: error: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            }
            _ => ExitCode::FAILURE,
        };
    }
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("spare-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<()> {
    let here = std::env::current_exe()?;
    let spare = match &args.spare {
        Some(path) => path.clone(),
        None => here.with_file_name("spare"),
    };
    if !spare.exists() {
        bail!(
            "{} not found; build it first with `cargo build --release -p spare-cli`",
            spare.display()
        );
    }
    let env = Env {
        spare,
        wasmtime: args.wasmtime.clone().or_else(find_wasmtime),
        scale: args.scale,
        examples: examples_dir()?,
    };
    println!("# spare benchmarks");
    println!("machine: {}", machine());
    println!("spare:   {}", env.spare.display());
    match &env.wasmtime {
        Some(w) => println!("wasmtime: {} ({})", w.display(), version(w)),
        None => println!("wasmtime: not found; `wasmtime run` baselines skipped"),
    }
    let all = args.benches.contains(&Bench::All);
    let wants = |b: Bench| all || args.benches.contains(&b);
    if wants(Bench::Instantiate) {
        instantiate::run(&env)?;
    }
    if wants(Bench::Guest) {
        guest::run(&env)?;
    }
    // One thread, as the `spare` CLI uses: the client competes with the
    // daemons for the same cores, and should take as little as it can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    if wants(Bench::Dispatch) {
        runtime.block_on(dispatch::run(&env))?;
    }
    if wants(Bench::Throughput) {
        runtime.block_on(throughput::run(&env))?;
    }
    drop(runtime);
    // Each starts its own host and requester daemons; they run one at a
    // time, on a machine otherwise left alone.
    if wants(Bench::Interference) {
        owner::interference(&env)?;
    }
    if wants(Bench::Responsiveness) {
        owner::responsiveness(&env)?;
    }
    if wants(Bench::Harvest) {
        owner::harvest(&env)?;
    }
    if wants(Bench::PauseLatency) {
        owner::pause_latency(&env)?;
    }
    Ok(())
}

fn examples_dir() -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    dir.canonicalize()
        .with_context(|| format!("examples not found at {}", dir.display()))
}

fn find_wasmtime() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("wasmtime"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let home = PathBuf::from(std::env::var_os("HOME")?);
        Some(home.join(".cargo/bin/wasmtime")).filter(|p| p.is_file())
    })
}

fn version(program: &Path) -> String {
    std::process::Command::new(program)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU model, core count, memory and kernel, for the record.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}, {cores} cores, {mem_gib:.0} GiB, Linux {}",
        kernel.trim()
    )
}

//! The native programs the owner benchmarks run in fresh processes, behind
//! hidden first arguments of `spare-bench` (so no other toolchain is
//! needed), and the small pieces of libc they need.

use std::hint::black_box;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// `spare-bench __owner-cpu <iterations>`: a CPU-bound loop (xorshift and
/// multiply, all in registers); prints its own work time in nanoseconds.
pub(crate) const CPU: &str = "__owner-cpu";
/// `spare-bench __owner-mem <MiB> <passes>`: a memory-bound loop, read,
/// modify and write a buffer of that size (well beyond the L3 cache) from
/// end to end, `passes` times; prints its own work time in nanoseconds
/// (the buffer's first touch is not in it).
pub(crate) const MEM: &str = "__owner-mem";
/// `spare-bench __owner-spin <seconds>`: the owner starting something busy,
/// at normal priority; exits after that long at the latest.
pub(crate) const SPIN: &str = "__owner-spin";
/// `spare-bench __idle-spin <seconds>`: a spin loop lowered exactly as a
/// worker lowers itself (`SCHED_IDLE`, nice 19, idle I/O): what a perfect
/// harvester would run.
pub(crate) const IDLE_SPIN: &str = "__idle-spin";

/// `spare-bench __idle-mem <MiB> <seconds>`: the memory-bound loop lowered
/// as a worker lowers itself, for that long at most: a native stand-in for
/// a memory-hungry guest.
pub(crate) const IDLE_MEM: &str = "__idle-mem";

/// The buffer of the memory-bound program: 8× the 32 MiB L3 of the
/// benchmark machine.
pub(crate) const MEM_MIB: u64 = 256;

/// Runs a hook if the first argument names one.
pub(crate) fn hook(args: &[String]) -> Option<ExitCode> {
    let number = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    let work = match args.get(1).map(String::as_str)? {
        CPU => cpu(number(2)?),
        MEM => mem(number(2)?, number(3)?),
        SPIN => {
            spin(Duration::from_secs(number(2)?));
            Duration::ZERO
        }
        IDLE_SPIN => {
            spare_runtime::priority::lower_own_priority();
            spin(Duration::from_secs(number(2)?));
            Duration::ZERO
        }
        IDLE_MEM => {
            spare_runtime::priority::lower_own_priority();
            let (mib, limit) = (number(2)?, Duration::from_secs(number(3)?));
            let mut buffer = vec![1u64; usize::try_from(mib << 17).unwrap_or(usize::MAX)];
            let start = Instant::now();
            let mut pass = 0;
            while start.elapsed() < limit {
                stream(&mut buffer, pass);
                pass += 1;
            }
            Duration::ZERO
        }
        _ => return None,
    };
    #[allow(clippy::print_stdout)]
    {
        println!("{}", work.as_nanos());
    }
    Some(ExitCode::SUCCESS)
}

fn cpu(iterations: u64) -> Duration {
    let start = Instant::now();
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut acc: u64 = 0;
    for i in 0..black_box(iterations) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        acc = acc.wrapping_add(x.wrapping_mul(i | 1));
    }
    black_box(acc);
    start.elapsed()
}

fn mem(mib: u64, passes: u64) -> Duration {
    let words = usize::try_from(mib << 17).unwrap_or(usize::MAX);
    let mut buffer = vec![1u64; words];
    let start = Instant::now();
    for pass in 0..passes {
        stream(&mut buffer, pass);
    }
    black_box(buffer.iter().fold(0u64, |a, &w| a ^ w));
    start.elapsed()
}

/// One pass over `buffer`: read, modify, write every word.
fn stream(buffer: &mut [u64], pass: u64) {
    for word in buffer.iter_mut() {
        *word = word.wrapping_mul(3).wrapping_add(pass);
    }
    black_box(buffer);
}

fn spin(limit: Duration) {
    let start = Instant::now();
    let mut x = 0u64;
    while start.elapsed() < limit {
        for _ in 0..100_000 {
            x = black_box(x.wrapping_add(1));
        }
    }
}

/// A fresh `spare-bench <hook> <args>` process.
pub(crate) fn command(hook: &str, args: &[String]) -> Result<Command> {
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg(hook)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    Ok(command)
}

/// Runs a program to its end: (wall time from spawn to exit as the parent
/// saw it, the work time the program measured itself).
pub(crate) fn run(hook: &str, args: &[String]) -> Result<(Duration, Duration)> {
    let start = Instant::now();
    let output = command(hook, args)?.output()?;
    let wall = start.elapsed();
    if !output.status.success() {
        bail!("{hook} failed: {}", output.status);
    }
    let work: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .with_context(|| format!("{hook} printed no time"))?;
    Ok((wall, Duration::from_nanos(work)))
}

/// Starts a program in the background.
pub(crate) fn start(hook: &str, args: &[String]) -> Result<Child> {
    Ok(command(hook, args)?.stdout(Stdio::null()).spawn()?)
}

/// Kills and reaps a background program.
pub(crate) fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

// The few libc functions the benchmarks need, declared here so that
// spare-bench's dependencies stay as they are; std links libc anyway.
unsafe extern "C" {
    fn kill(pid: std::ffi::c_int, signal: std::ffi::c_int) -> std::ffi::c_int;
}

/// Signal numbers on Linux (x86 and ARM).
pub(crate) const SIGCONT: i32 = 18;
pub(crate) const SIGSTOP: i32 = 19;

/// Sends `signal` to `pid`.
pub(crate) fn signal(pid: u32, signal: i32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill takes two integers and touches no memory of ours; the pid
    // is one of our own children.
    unsafe {
        kill(pid, signal);
    }
}

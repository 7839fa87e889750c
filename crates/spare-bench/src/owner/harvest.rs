//! Harvest: with the owner away, the share of the contributed core-time
//! that became guest work.
//!
//! A host runs `loop.wasm` on every slot; nothing else runs but the two
//! daemons and this process, which sleeps. The figure is the workers' CPU
//! time (utime + stime from `/proc/<pid>/stat`) over slots × elapsed time.
//! Baseline: the same measured for native spin loops at `SCHED_IDLE`, one
//! per slot, with the daemons idle: what a perfect harvester gets on this
//! machine. The rounds alternate. Measured for an `--idle-only` host with
//! the 1 s cool-down of the other owner benchmarks and with the default
//! 10 s (the figures that matter: it must not pause when the owner is
//! away), and an `--always` one (what the workers get when nothing pauses
//! them).

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use spare_policy::owner::{process_cpu_ticks, ticks_per_second};

use super::programs::{self, IDLE_SPIN};
use super::rig::{COOL_DOWN, DEFAULT_COOL_DOWN, Guest, HOST_CORES, Mode, Rig};
use crate::Env;
use crate::stats::{header, mean_ci95, row};

pub(crate) fn run(env: &Env) -> Result<()> {
    let rounds = 2;
    let span = Duration::from_secs_f64(20.0 * env.scale).max(Duration::from_secs(1));
    let ticks = ticks_per_second() as f64;
    let mut native = Phase::default();
    let mut phases = Vec::new();
    let mut enforcement = String::new();
    for (mode, cool_down) in [
        (Mode::IdleOnly, COOL_DOWN),
        (Mode::IdleOnly, DEFAULT_COOL_DOWN),
        (Mode::Always, COOL_DOWN),
    ] {
        let mut rig = Rig::start(env, mode, cool_down)?;
        enforcement = rig.enforcement();
        let mut spare = Phase::default();
        for round in 0..rounds {
            for guests in [round % 2 == 0, round % 2 == 1] {
                if guests {
                    let pids = rig.ready(Some(Guest::Loop), env)?;
                    let before = rig.pauses()?;
                    let (_, logged) = rig.pause_reasons(0);
                    let (share, other) = measure(&pids, span, ticks)?;
                    spare.pauses += rig.pauses()? - before;
                    spare.reasons.extend(rig.pause_reasons(logged).0);
                    ensure!(
                        rig.host.worker_pids()? == pids,
                        "a worker was replaced during the measurement"
                    );
                    spare.push(share, other);
                } else {
                    rig.ready(None, env)?;
                    let secs = (span.as_secs() + 10).to_string();
                    let spinners = (0..rig.slots)
                        .map(|_| programs::start(IDLE_SPIN, std::slice::from_ref(&secs)))
                        .collect::<Result<Vec<_>>>()?;
                    let pids: Vec<u32> = spinners.iter().map(|c| c.id()).collect();
                    std::thread::sleep(Duration::from_millis(300));
                    let measured = measure(&pids, span, ticks);
                    spinners.into_iter().for_each(programs::stop);
                    let (share, other) = measured?;
                    native.push(share, other);
                }
            }
            eprintln!(
                "  harvest {mode:?} {cool_down}: round {}/{rounds}",
                round + 1
            );
        }
        let label = match mode {
            Mode::IdleOnly => format!("`--idle-only`, cool-down {cool_down}"),
            Mode::Always => "`--always`".to_owned(),
        };
        phases.push((label, spare));
    }
    let (native_share, _) = mean_ci95(&native.shares);
    header(&format!(
        "Harvest: share of {HOST_CORES} contributed cores that became guest work, owner away ({rounds} × {} s each)",
        span.as_secs_f64()
    ));
    for (label, phase) in &phases {
        let (share, _) = mean_ci95(&phase.shares);
        row(
            &format!("guest CPU time / (slots × elapsed), {label}"),
            &format!("{:.1}%", share * 100.0),
            &format!("{:.1}%", native_share * 100.0),
            &format!("{:.3}×", share / native_share),
        );
    }
    println!(
        "\nbaseline: native spin loops at SCHED_IDLE, one per slot, with the same daemons idle; host: {enforcement}"
    );
    for (label, phase) in &phases {
        let why = if phase.reasons.is_empty() {
            String::new()
        } else {
            format!(" ({})", phase.reasons.join("; "))
        };
        println!(
            "{label}: rounds {}; the host paused {} time(s) while measured{why}; everything else used {} cores",
            percents(&phase.shares),
            phase.pauses,
            cores(&phase.others)
        );
    }
    println!(
        "native: rounds {}; everything else used {} cores",
        percents(&native.shares),
        cores(&native.others)
    );
    Ok(())
}

/// The rounds of one kind of measurement.
#[derive(Debug, Default)]
struct Phase {
    shares: Vec<f64>,
    /// CPU use of everything but the measured processes, in cores.
    others: Vec<f64>,
    pauses: u64,
    /// Why the host said it paused, as it logged it.
    reasons: Vec<String>,
}

impl Phase {
    fn push(&mut self, share: f64, other: f64) {
        self.shares.push(share);
        self.others.push(other);
    }
}

fn percents(v: &[f64]) -> String {
    v.iter()
        .map(|s| format!("{:.1}%", s * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cores(v: &[f64]) -> String {
    v.iter()
        .map(|c| format!("{c:.3}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Over `span`: the CPU time of `pids` as a share of `pids.len()` cores,
/// and the CPU time of everything else on the machine, in cores.
fn measure(pids: &[u32], span: Duration, ticks_per_second: f64) -> Result<(f64, f64)> {
    let total = || -> Result<(u64, u64)> {
        let measured = pids
            .iter()
            .map(|&pid| {
                process_cpu_ticks(pid).ok_or_else(|| anyhow::anyhow!("process {pid} is gone"))
            })
            .sum::<Result<u64>>()?;
        Ok((measured, machine_busy_ticks()?))
    };
    let (start, (before, busy_before)) = (Instant::now(), total()?);
    std::thread::sleep(span);
    let ((after, busy_after), elapsed) = (total()?, start.elapsed());
    let seconds = elapsed.as_secs_f64();
    let measured = (after - before) as f64 / ticks_per_second;
    let busy = busy_after.saturating_sub(busy_before) as f64 / ticks_per_second;
    Ok((
        measured / (pids.len() as f64 * seconds),
        (busy - measured).max(0.0) / seconds,
    ))
}

/// Busy ticks of all CPUs together, from the `cpu` line of `/proc/stat`
/// (user, nice, system, irq, softirq).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .ok_or_else(|| anyhow::anyhow!("no cpu line in /proc/stat"))?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    ensure!(fields.len() >= 7, "short cpu line in /proc/stat");
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
}

//! Owner responsiveness: how late a thread that sleeps 1 ms in a loop
//! wakes up, alone and with guests on every core.
//!
//! The sleeper uses far too little CPU for the host to pause its guests,
//! so this measures what `SCHED_IDLE` alone does for the owner's wake-ups:
//! the guests must give way the moment the owner's thread is runnable.
//! Rounds alternate (A B, then B A, ...): **A** no guest, **B** `loop.wasm`
//! guests on every slot; the figure is the overshoot beyond 1 ms, pooled
//! over the rounds of each kind.
//!
//! The host gives `--always`, so that the guests really run throughout: an
//! `--idle-only` host also pauses now and then with the owner away (a
//! defect, see BENCHMARKS.md), which would hide part of what is measured.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use super::rig::{Guest, HOST_CORES, Mode, Rig};
use crate::Env;
use crate::stats::{Samples, fmt, header, ratio, row};

const SLEEP: Duration = Duration::from_millis(1);

pub(crate) fn run(env: &Env) -> Result<()> {
    let rounds = 6;
    let per_round = env.iterations(2000);
    let mut rig = Rig::start(env, Mode::Always, super::rig::COOL_DOWN)?;
    let mut alone = Vec::new();
    let mut loaded = Vec::new();
    let mut pauses = 0;
    for round in 0..rounds {
        let loaded_first = round % 2 == 1;
        for with_guests in [loaded_first, !loaded_first] {
            if with_guests {
                rig.ready(Some(Guest::Loop), env)?;
                let before = rig.pauses()?;
                loaded.extend(sleeper(per_round)?);
                pauses += rig.pauses()? - before;
            } else {
                rig.ready(None, env)?;
                alone.extend(sleeper(per_round)?);
            }
        }
        eprintln!("  responsiveness: round {}/{rounds}", round + 1);
    }
    let (alone, loaded) = (Samples::new(alone), Samples::new(loaded));
    header(&format!(
        "Owner responsiveness: wake-up overshoot of a 1 ms sleep loop, with loop.wasm guests on all {HOST_CORES} cores vs alone ({} wake-ups each)",
        alone.len()
    ));
    for (what, p) in [("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9)] {
        row(
            &format!("overshoot {what}"),
            &fmt(loaded.percentile(p)),
            &fmt(alone.percentile(p)),
            &ratio(loaded.percentile(p), alone.percentile(p)),
        );
    }
    println!(
        "\nhost: `--always`, {}; it paused {pauses} time(s) while the sleeper ran with guests",
        rig.enforcement()
    );
    Ok(())
}

/// `n` sleeps of 1 ms on a fresh thread; how late each one woke.
fn sleeper(n: usize) -> Result<Vec<Duration>> {
    let thread = std::thread::spawn(move || {
        let mut late = Vec::with_capacity(n);
        for _ in 0..n {
            let start = Instant::now();
            std::thread::sleep(SLEEP);
            late.push(start.elapsed().saturating_sub(SLEEP));
        }
        late
    });
    let late = thread
        .join()
        .map_err(|_| anyhow::anyhow!("the sleeper panicked"))?;
    ensure!(late.len() == n);
    Ok(late)
}

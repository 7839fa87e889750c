//! Pause latency: from the owner starting a busy program to every guest
//! stopped.
//!
//! With `loop.wasm` on every slot of an `--idle-only` host, each trial
//! starts the owner's busy loop (a fresh process at normal priority) and
//! polls the state of every thread of every worker in `/proc` each
//! millisecond until all are stopped (`T`); then ends the busy loop and
//! times how long the guests take to run again (the cool-down is 1 s).
//! Baseline, the floor of the method: native `SCHED_IDLE` spin loops in
//! place of the workers, stopped by a direct `kill(SIGSTOP)` right after the
//! busy loop is started, observed the same way. Blocks of trials alternate.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::jitter_sleep;
use super::procfs::{Watch, each_running};
use super::programs::{self, IDLE_SPIN, SIGCONT, SIGSTOP, SPIN};
use super::rig::{Guest, HOST_CORES, Mode, Rig};
use crate::Env;
use crate::stats::{Samples, fmt, header, ratio, row};

/// Longest wait for a pause, counted as a miss beyond.
const MISS: Duration = Duration::from_secs(5);
/// How long the owner's busy loop may live at most.
const OWNER_SECS: &str = "20";

pub(crate) fn run(env: &Env) -> Result<()> {
    let trials = env.iterations(20).max(4);
    let block = 5;
    let mut rig = Rig::start(env, Mode::IdleOnly, super::rig::COOL_DOWN)?;
    let mut spare = Vec::new();
    let mut resume = Vec::new();
    let mut direct = Vec::new();
    let mut missed = 0;
    let mut delayed = 0;
    let mut spare_turn = true;
    while spare.len() + missed < trials || direct.len() < trials {
        if spare_turn && spare.len() + missed < trials {
            for _ in 0..block.min(trials - spare.len() - missed) {
                let pids = rig.ready(Some(Guest::Loop), env)?;
                match guest_pause(&pids, &mut delayed)? {
                    Some((paused, resumed)) => {
                        spare.push(paused);
                        resume.push(resumed);
                    }
                    None => missed += 1,
                }
            }
        } else if direct.len() < trials {
            rig.ready(None, env)?;
            let spinners = (0..rig.slots)
                .map(|_| programs::start(IDLE_SPIN, &["600".into()]))
                .collect::<Result<Vec<_>>>()?;
            let pids: Vec<u32> = spinners.iter().map(|c| c.id()).collect();
            let result = (0..block.min(trials - direct.len()))
                .map(|_| direct_stop(&pids))
                .collect::<Result<Vec<_>>>();
            spinners.into_iter().for_each(programs::stop);
            direct.extend(result?);
        }
        spare_turn = !spare_turn;
        eprintln!(
            "  pause latency: {}/{trials} guest pauses ({missed} missed), {}/{trials} direct stops",
            spare.len(),
            direct.len()
        );
    }
    let (spare, direct, resume) = (
        Samples::new(spare),
        Samples::new(direct),
        Samples::new(resume),
    );
    header(&format!(
        "Pause latency: owner starts a busy program → every guest stopped ({} trials, loop.wasm on all {HOST_CORES} cores)",
        spare.len()
    ));
    for (what, p) in [("p50", 50.0), ("p99", 99.0)] {
        row(
            what,
            &fmt(spare.percentile(p)),
            &fmt(direct.percentile(p)),
            &ratio(spare.percentile(p), direct.percentile(p)),
        );
    }
    println!(
        "\nbaseline: the same observation of native SCHED_IDLE spinners stopped by kill(SIGSTOP) \
         right after the busy program starts; missed (no pause within {}): {missed}; \
         trials put off because the host had paused by itself: {delayed}",
        fmt(MISS)
    );
    println!(
        "resume after the busy program ends (cool-down {}): p50 {}, max {}; host: {}",
        super::rig::COOL_DOWN,
        fmt(resume.p50()),
        fmt(resume.percentile(100.0)),
        rig.enforcement()
    );
    Ok(())
}

/// One trial against the guests: (time to every worker stopped, time from
/// the owner's program ending to the guests running again); `None` if they
/// were not stopped within [`MISS`].
fn guest_pause(pids: &[u32], delayed: &mut usize) -> Result<Option<(Duration, Duration)>> {
    let watch = Watch::new(pids);
    // The host also pauses by itself now and then; a trial starts only
    // while every guest runs.
    loop {
        jitter_sleep();
        if each_running(pids) {
            break;
        }
        *delayed += 1;
        wait_running(pids, "the guests did not resume")?;
    }
    let start = Instant::now();
    let owner = programs::start(SPIN, &[OWNER_SECS.into()])?;
    let paused = wait_stopped(&watch, start);
    programs::stop(owner);
    let Some(paused) = paused else {
        return Ok(None);
    };
    let gone = Instant::now();
    wait_running(
        pids,
        "the guests did not resume after the owner's program ended",
    )?;
    Ok(Some((paused, gone.elapsed())))
}

/// One baseline trial: the owner's program starts and the spinners are
/// stopped directly.
fn direct_stop(pids: &[u32]) -> Result<Duration> {
    let watch = Watch::new(pids);
    jitter_sleep();
    let start = Instant::now();
    let owner = programs::start(SPIN, &[OWNER_SECS.into()])?;
    for &pid in pids {
        programs::signal(pid, SIGSTOP);
    }
    let stopped = wait_stopped(&watch, start);
    programs::stop(owner);
    for &pid in pids {
        programs::signal(pid, SIGCONT);
    }
    wait_running(pids, "the spinners did not run again after SIGCONT")?;
    stopped.ok_or_else(|| anyhow::anyhow!("SIGSTOP did not stop the spinners"))
}

/// Polls every 5 ms until each process has a running thread.
fn wait_running(pids: &[u32], otherwise: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !each_running(pids) {
        if Instant::now() > deadline {
            bail!("{otherwise} within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Polls each millisecond until every watched thread is stopped.
fn wait_stopped(watch: &Watch, start: Instant) -> Option<Duration> {
    loop {
        if watch.all_stopped() {
            return Some(start.elapsed());
        }
        if start.elapsed() > MISS {
            return None;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

//! Interference: how much longer the owner's programs take while spare
//! gives every core.
//!
//! Two native foreground programs, a CPU-bound and a memory-bound one, each
//! sized to about 2.5 s alone, each run as a fresh process and timed from
//! spawn to exit. **A** the program alone (the daemons up, no guest), **B**
//! the program started while guests run on every contributed core. Each B
//! trial starts only once the guests run (the host says `giving` with every
//! slot busy, and each worker has a thread in state `R`), and every trial
//! only after the machine has been quiet for a second. The figure is the
//! slowdown of each B against the A of its round, mean ± 95% confidence
//! interval; the order of the arms rotates from round to round.
//!
//! Done twice: with the host `--idle-only` (it pauses the guests when the
//! owner's program shows up) and `--always` (no pause: the guests only run
//! at `SCHED_IDLE`), the comparison that shows what pausing is for. The
//! guests are the worst case for the owner: [`Guest::MemCopy`], a copy loop
//! that takes all the memory bandwidth a core can.
//!
//! With `--idle-only`, a third arm **C** is the ideal pause: native memory
//! hogs at `SCHED_IDLE` in place of the guests, stopped with `SIGSTOP` right
//! after the program's spawn. On the benchmark VM, a program that starts
//! just after other work stopped runs measurably faster than one that
//! starts on a machine idle for a while, so C is the fair reference for B.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};

use super::percent_ci;
use super::programs::{self, CPU, IDLE_MEM, MEM, MEM_MIB, SIGSTOP};
use super::rig::{Guest, HOST_CORES, Mode, Rig};
use crate::Env;
use crate::stats::{fmt, mean_ci95};

/// How long each foreground program runs alone.
const TARGET: Duration = Duration::from_millis(2500);
/// The guests of the B trials.
const GUEST: Guest = Guest::MemCopy;
/// The buffer of each native memory hog: as much as a memcopy guest uses.
const HOG_MIB: u64 = 128;

#[derive(Clone, Copy, Debug)]
enum Program {
    Cpu { iterations: u64 },
    Mem { passes: u64 },
}

impl Program {
    fn name(self) -> &'static str {
        match self {
            Self::Cpu { .. } => "CPU-bound",
            Self::Mem { .. } => "memory-bound",
        }
    }

    /// Runs it once in a fresh process; the wall time from spawn to exit.
    /// `started` runs right after the spawn.
    fn run(self, started: impl FnOnce()) -> Result<Duration> {
        let (hook, args) = match self {
            Self::Cpu { iterations } => (CPU, vec![iterations.to_string()]),
            Self::Mem { passes } => (MEM, vec![MEM_MIB.to_string(), passes.to_string()]),
        };
        let start = Instant::now();
        let child = programs::command(hook, &args)?.spawn()?;
        started();
        let output = child.wait_with_output()?;
        let wall = start.elapsed();
        ensure!(output.status.success(), "{hook} failed: {}", output.status);
        Ok(wall)
    }

    /// Sizes both programs to about [`TARGET`] on this machine.
    fn calibrate() -> Result<[Self; 2]> {
        let probe = 300_000_000u64;
        let (_, work) = programs::run(CPU, &[probe.to_string()])?;
        let iterations = (probe as f64 * TARGET.as_secs_f64() / work.as_secs_f64()) as u64;
        let (wall, work) = programs::run(MEM, &[MEM_MIB.to_string(), "4".into()])?;
        let setup = wall.saturating_sub(work);
        let per_pass = work.as_secs_f64() / 4.0;
        let passes = ((TARGET.saturating_sub(setup)).as_secs_f64() / per_pass).round() as u64;
        Ok([
            Self::Cpu { iterations },
            Self::Mem {
                passes: passes.max(1),
            },
        ])
    }
}

#[derive(Debug)]
struct Outcome {
    mode: Mode,
    program: Program,
    alone: Vec<Duration>,
    loaded: Vec<Duration>,
    /// The ideal pause (`--idle-only` only): native memory hogs stopped
    /// the moment the program starts.
    ideal: Vec<Duration>,
    /// Pauses the host made during the B trials.
    pauses: u64,
}

/// Each of `b` against its paired `a`: mean slowdown ± 95% CI.
fn slowdown(a: &[Duration], b: &[Duration]) -> (f64, f64) {
    let slowdowns: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(a, b)| b.as_secs_f64() / a.as_secs_f64() - 1.0)
        .collect();
    mean_ci95(&slowdowns)
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / u32::try_from(v.len().max(1)).unwrap_or(u32::MAX)
}

pub(crate) fn run(env: &Env) -> Result<()> {
    let programs = Program::calibrate()?;
    let pairs = env.iterations(20).max(2);
    let mut outcomes = Vec::new();
    let mut enforcement = String::new();
    for mode in [Mode::IdleOnly, Mode::Always] {
        let mut rig = Rig::start(env, mode, super::rig::COOL_DOWN)?;
        enforcement = rig.enforcement();
        for program in programs {
            outcomes.push(trials(&mut rig, env, mode, program, pairs)?);
        }
    }

    crate::stats::header(&format!(
        "Interference: the owner's program alone vs with {GUEST_NAME} guests on all {HOST_CORES} cores ({pairs} pairs each)",
        GUEST_NAME = GUEST.name()
    ));
    for o in &outcomes {
        let how = match o.mode {
            Mode::IdleOnly => "`--idle-only` (guests paused)",
            Mode::Always => "`--always` (SCHED_IDLE only)",
        };
        let (mean_slowdown, half) = slowdown(&o.alone, &o.loaded);
        crate::stats::row(
            &format!("{}, {how}, slowdown", o.program.name()),
            &fmt(mean(&o.loaded)),
            &fmt(mean(&o.alone)),
            &percent_ci(mean_slowdown, half),
        );
        if !o.ideal.is_empty() {
            let (mean_slowdown, half) = slowdown(&o.alone, &o.ideal);
            crate::stats::row(
                &format!(
                    "{}, ideal pause (native memory hogs, SIGSTOP at the start), slowdown",
                    o.program.name()
                ),
                &fmt(mean(&o.ideal)),
                &fmt(mean(&o.alone)),
                &percent_ci(mean_slowdown, half),
            );
        }
    }
    println!(
        "\nfigure: mean wall time from spawn to exit with the guests running; baseline: alone; \
         ratio: mean slowdown of each trial against its paired one, ± 95% CI"
    );
    for o in &outcomes {
        if o.mode == Mode::IdleOnly {
            let (vs_ideal, half) = slowdown(&o.ideal, &o.loaded);
            println!(
                "{}: the host paused {} time(s) during {} loaded trials; `--idle-only` against the ideal pause: {}",
                o.program.name(),
                o.pauses,
                o.loaded.len(),
                percent_ci(vs_ideal, half)
            );
        }
    }
    let [cpu, mem] = programs;
    println!(
        "programs: {} ({cpu:?}), {} ({mem:?}, {MEM_MIB} MiB buffer); host: {enforcement}; cool-down {}",
        cpu.name(),
        mem.name(),
        super::rig::COOL_DOWN
    );
    Ok(())
}

/// One kind of trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Arm {
    /// A: the program alone.
    Alone,
    /// B: started while guests run on every slot.
    Loaded,
    /// C: started while native memory hogs at `SCHED_IDLE` run, one per
    /// slot, stopped by `SIGSTOP` right after the spawn: what a host that
    /// paused instantly would give.
    Ideal,
}

fn trials(rig: &mut Rig, env: &Env, mode: Mode, program: Program, pairs: usize) -> Result<Outcome> {
    let mut outcome = Outcome {
        mode,
        program,
        alone: Vec::with_capacity(pairs),
        loaded: Vec::with_capacity(pairs),
        ideal: Vec::with_capacity(pairs),
        pauses: 0,
    };
    let mut arms = match mode {
        Mode::IdleOnly => vec![Arm::Alone, Arm::Loaded, Arm::Ideal],
        Mode::Always => vec![Arm::Alone, Arm::Loaded],
    };
    for pair in 0..pairs {
        // Each arm takes each place in turn.
        arms.rotate_left(1);
        for &arm in &arms {
            match arm {
                Arm::Loaded => {
                    rig.ready(Some(GUEST), env)?;
                    let before = rig.pauses()?;
                    let time = program.run(|| {})?;
                    outcome.pauses += rig.pauses()? - before;
                    outcome.loaded.push(time);
                }
                Arm::Alone => {
                    rig.ready(None, env)?;
                    outcome.alone.push(program.run(|| {})?);
                }
                Arm::Ideal => {
                    rig.ready(None, env)?;
                    outcome.ideal.push(ideal_pause(rig.slots, program)?);
                }
            }
        }
        eprintln!(
            "  interference {mode:?} {}: pair {}/{pairs}: alone {}, loaded {}{}",
            program.name(),
            pair + 1,
            fmt(outcome.alone[pair]),
            fmt(outcome.loaded[pair]),
            outcome
                .ideal
                .get(pair)
                .map(|d| format!(", ideal pause {}", fmt(*d)))
                .unwrap_or_default()
        );
    }
    Ok(outcome)
}

/// The program started while `slots` native memory hogs run, which are
/// stopped with `SIGSTOP` right after the spawn.
fn ideal_pause(slots: usize, program: Program) -> Result<Duration> {
    let args = [(HOG_MIB).to_string(), "60".to_owned()];
    let hogs = (0..slots)
        .map(|_| programs::start(IDLE_MEM, &args))
        .collect::<Result<Vec<_>>>()?;
    let pids: Vec<u32> = hogs.iter().map(|h| h.id()).collect();
    // As long as the guests have run before a loaded trial, at least.
    std::thread::sleep(Duration::from_secs(2));
    let time = program.run(|| {
        for &pid in &pids {
            programs::signal(pid, SIGSTOP);
        }
    });
    hogs.into_iter().for_each(programs::stop);
    time
}

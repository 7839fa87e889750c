//! The governor: one thread that decides, many times a second, whether the
//! workers may run, and makes it so.
//!
//! Every [`SAMPLE`] it reads who used the CPU (see [`owner`](crate::owner)).
//! It pauses the workers when the owner's use over the last [`WINDOW`]
//! passes the threshold, when memory stalls, outside the time windows, or on
//! battery; it resumes them once the owner has been quiet for the cool-down.
//! Without a cgroup to hold the CPU share it also runs the
//! [duty cycle](crate::duty) that stops and continues the workers within
//! each period. It is a
//! plain thread, not a task on the daemon's runtime, so a busy runtime never
//! delays a pause.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use spare_core::units::format_duration;
use spare_core::wire::Pause;
use spare_runtime::{WorkerPool, WorkerState};
use tokio::sync::watch;

use crate::duty::{DutyCycle, cpu_time_ns};
use crate::machine::{Machine, Power, power};
use crate::owner::{Sampler, Usage};
use crate::settings::{Policy, When};
use crate::window::{Window, local_minute_now, next_start};

/// How often the governor reads the counters while guests run and the
/// owner may need the machine back: fast enough to pause within 100 ms.
pub const SAMPLE: Duration = Duration::from_millis(20);
/// How often it reads them while no guest runs or guests are paused: it
/// still tracks the owner (for the cool-down and honest offers) but wakes
/// the machine twenty times a second, not fifty. A guest that starts is
/// watched at the fast rate from the next reading on.
pub const SAMPLE_IDLE: Duration = Duration::from_millis(50);
/// How often it reads them when it only reports (giving always).
pub const SAMPLE_RELAXED: Duration = Duration::from_millis(250);
/// The span over which the owner's use is averaged.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Memory stalls above this share of the time mean the owner is short of
/// memory: guests pause.
pub const MEMORY_PRESSURE_LIMIT: f64 = 0.10;
/// While guests are paused, CPU stalls above this share mean the owner's
/// own tasks are queueing for the CPUs: guests stay paused.
pub const CPU_PRESSURE_LIMIT: f64 = 0.20;
/// Time windows and the power source change slowly; they are read this
/// often.
const SLOW_CHECK: Duration = Duration::from_secs(1);

/// How limits are enforced on this node, for `spare status`.
#[derive(Clone, Debug, Serialize)]
pub struct Enforcement {
    /// `"cgroup v2"`, `"cgroup v1"` or `"fallback"`.
    pub mechanism: String,
    /// What enforces the CPU share.
    pub cpu: String,
    /// What enforces the memory budget.
    pub memory: String,
    /// What the OS refused and what is used instead, and settings that
    /// leave the owner little.
    pub notes: Vec<String>,
}

/// What the governor needs.
#[derive(Clone, Debug)]
pub struct GovernorConfig {
    pub policy: Policy,
    pub machine: Machine,
    pub enforcement: Enforcement,
    /// Run the duty cycle (no cgroup holds the CPU share).
    pub duty_cycle: bool,
    /// `/proc`, and the power-supply directory of sysfs.
    pub proc: PathBuf,
    pub power_supply: PathBuf,
}

/// What the node gives right now, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// `"giving"`, `"throttled"` (the CPU share is below what the tasks
    /// running at once would use, so each is slowed) or `"paused"`. A node
    /// the config gives only part of the machine, each task a whole core,
    /// is `"giving"`; the reason says what the config holds back.
    pub state: &'static str,
    /// Why guests are paused, while they are; the cause offers carry.
    pub pause: Option<Pause>,
    /// One line for humans, starting with the state, e.g.
    /// `paused: owner active 3 s ago`, `giving 1 core of 2 (limited by
    /// config: cores = 1)`.
    pub reason: String,
    /// Cores the guests may use now, in thousandths.
    pub giving_millicores: u64,
    /// The owner's CPU use over the last window, in cores.
    pub owner_cores: f64,
    /// spare's own CPU use (daemon and workers), in cores.
    pub spare_cores: f64,
    pub cpu_pressure: Option<f64>,
    pub memory_pressure: Option<f64>,
    /// Milliseconds since the owner was last seen active.
    pub owner_active_ms_ago: Option<u64>,
    /// Milliseconds the current pause has lasted.
    pub paused_ms: Option<u64>,
    /// Pauses since the daemon started.
    pub pauses: u64,
    /// Where the power comes from now: `"on battery"`, `"on AC power"` or
    /// `"no battery"`; `None` when the power-supply directory cannot be
    /// read.
    pub power: Option<&'static str>,
    pub enforcement: Enforcement,
}

/// Handle to the governor thread. Stops it when the last clone is dropped
/// or [`Governor::stop`] is called.
#[derive(Clone, Debug)]
pub struct Governor {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    status: Mutex<Status>,
    /// When the current pause began; `None` while giving.
    paused_since: watch::Sender<Option<Instant>>,
    /// Whether the first decision, to give or to pause, has been made.
    decided: AtomicBool,
    stop: AtomicBool,
}

impl Governor {
    /// Starts the governor thread over `pool`.
    pub fn start(pool: WorkerPool, config: GovernorConfig) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            status: Mutex::new(Status {
                state: "giving",
                pause: None,
                reason: "starting".into(),
                giving_millicores: 0,
                owner_cores: 0.0,
                spare_cores: 0.0,
                cpu_pressure: None,
                memory_pressure: None,
                owner_active_ms_ago: None,
                paused_ms: None,
                pauses: 0,
                power: None,
                enforcement: config.enforcement.clone(),
            }),
            paused_since: watch::Sender::new(None),
            decided: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("governor".into())
            .spawn(move || Loop::new(pool, config, thread_shared).run())?;
        Ok(Self { shared })
    }

    /// What the node gives now and why.
    pub fn status(&self) -> Status {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Whether the governor has decided, once at least, whether to give
    /// or to pause: until then what the node gives is not known, and it
    /// offers nothing.
    pub fn decided(&self) -> bool {
        self.shared.decided.load(Ordering::Acquire)
    }

    /// Whether guests may run now.
    pub fn giving(&self) -> bool {
        self.shared.paused_since.borrow().is_none()
    }

    /// Why guests are paused; `None` while they may run.
    pub fn pause(&self) -> Option<Pause> {
        if self.giving() {
            return None;
        }
        let status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        // Written before the pause is announced; a pause that ended just
        // now has cleared it.
        Some(status.pause.unwrap_or(Pause::Other))
    }

    /// When the current pause began, as it changes.
    pub fn paused_since(&self) -> watch::Receiver<Option<Instant>> {
        self.shared.paused_since.subscribe()
    }

    /// Resolves once the node has been paused for `after` without a break,
    /// counting from `from` at the earliest: a task that arrives during a
    /// pause gets all of `after`, not what is left of it.
    pub async fn paused_for(&self, after: Duration, from: Instant) {
        let mut since = self.paused_since();
        loop {
            let current = *since.borrow_and_update();
            match current {
                None => {
                    if since.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
                Some(began) => {
                    tokio::select! {
                        () = tokio::time::sleep_until((began.max(from) + after).into()) => return,
                        changed = since.changed() => if changed.is_err() {
                            return std::future::pending().await;
                        },
                    }
                }
            }
        }
    }

    /// Stops the thread; the workers are left running.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// Why the workers must be paused, if they must.
#[derive(Clone, Debug, PartialEq)]
enum Hold {
    OutsideWindows(String),
    OnBattery,
    OwnerActive,
}

impl Hold {
    fn pause(&self) -> Pause {
        match self {
            Self::OutsideWindows(_) => Pause::OutsideWindows,
            Self::OnBattery => Pause::OnBattery,
            Self::OwnerActive => Pause::OwnerActive,
        }
    }
}

struct Loop {
    pool: WorkerPool,
    config: GovernorConfig,
    shared: Arc<Shared>,
    sampler: Sampler,
    window: Recent,
    pids: Vec<u32>,
    last_active: Option<Instant>,
    slow_hold: Option<Hold>,
    power: Option<Power>,
    next_slow: Instant,
    duty: DutyCycle,
    paused_since: Option<Instant>,
    pauses: u64,
}

impl Loop {
    fn new(pool: WorkerPool, config: GovernorConfig, shared: Arc<Shared>) -> Self {
        let sampler = Sampler::new(&config.proc);
        tracing::info!("owner detection reads {}", sampler.clock());
        let now = Instant::now();
        Self {
            pool,
            config,
            shared,
            sampler,
            window: Recent::default(),
            pids: Vec::new(),
            last_active: None,
            slow_hold: None,
            power: None,
            next_slow: now,
            duty: DutyCycle::new(now),
            paused_since: None,
            pauses: 0,
        }
    }

    fn sample_every(&self) -> Duration {
        if !self.config.policy.when.idle_only {
            SAMPLE_RELAXED
        } else if self.paused_since.is_none() && self.pool.stats().running > 0 {
            SAMPLE
        } else {
            SAMPLE_IDLE
        }
    }

    fn run(mut self) {
        let mut next_sample = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) && Arc::strong_count(&self.shared) > 1 {
            let now = Instant::now();
            let sampled = now >= next_sample;
            if sampled {
                self.sample(now);
            }
            let hold = self.hold(now);
            let (state, next_edge) = match &hold {
                Some(_) => {
                    self.duty.interrupt();
                    (WorkerState::Pause, None)
                }
                None => self.duty(now),
            };
            self.pool.set_state(state);
            self.report(now, hold.as_ref());
            // After the state is known: guests that just resumed are
            // watched at the fast rate from the next reading on.
            let every = self.sample_every();
            next_sample = if sampled {
                now + every
            } else {
                next_sample.min(now + every)
            };
            let wake = next_edge.map_or(next_sample, |edge| edge.min(next_sample));
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
        // Never leave workers stopped behind.
        self.pool.set_state(WorkerState::Run);
    }

    fn sample(&mut self, now: Instant) {
        self.pids.clear();
        self.pids.push(std::process::id());
        self.pids.extend(self.pool.spare_pids());
        if let Some(usage) = self.sampler.sample(&self.pids) {
            self.window.push(usage);
        }
        let paused = self.paused_since.is_some();
        let owner = self.owner_cores();
        let memory = self.average(|u| u.memory_pressure).unwrap_or(0.0);
        let cpu = self.average(|u| u.cpu_pressure).unwrap_or(0.0);
        let threshold = f64::from(self.config.policy.when.owner_threshold) / 1000.0;
        let active = owner > threshold
            || memory > MEMORY_PRESSURE_LIMIT
            // While guests run, their own waiting shows as CPU pressure;
            // only while they are stopped is it all the owner's.
            || (paused && cpu > CPU_PRESSURE_LIMIT);
        if active {
            self.last_active = Some(now);
        }
        if now >= self.next_slow {
            self.next_slow = now + SLOW_CHECK;
            // Read even when the policy gives on battery: `spare status`
            // shows it.
            self.power = power(&self.config.power_supply);
            let when = &self.config.policy.when;
            let minute = if when.windows.is_empty() {
                0
            } else {
                local_minute_now()
            };
            self.slow_hold = slow_hold(when, minute, self.power);
        }
    }

    fn average(&self, f: impl Fn(&Usage) -> Option<f64>) -> Option<f64> {
        self.window.average(f)
    }

    /// The owner's CPU use over the window, in cores: the mean of readings
    /// that may each be a little off either way, clamped once.
    fn owner_cores(&self) -> f64 {
        self.average(|u| Some(u.owner_cores))
            .unwrap_or(0.0)
            .max(0.0)
    }

    fn hold(&self, now: Instant) -> Option<Hold> {
        if let Some(hold) = &self.slow_hold {
            return Some(hold.clone());
        }
        let when = &self.config.policy.when;
        let recent = self
            .last_active
            .is_some_and(|t| now.duration_since(t) < when.cool_down);
        (when.idle_only && recent).then_some(Hold::OwnerActive)
    }

    /// The duty cycle's state now and its next edge; always running when no
    /// duty cycle is needed.
    fn duty(&mut self, now: Instant) -> (WorkerState, Option<Instant>) {
        if !self.config.duty_cycle {
            return (WorkerState::Run, None);
        }
        let allowed = self.config.policy.cpu_millicores(self.config.machine.cores);
        // The owner's own jobs are never throttled: the share is the
        // swarm's guests'.
        let stats = self.pool.stats();
        let running = stats.running.saturating_sub(stats.owner_running);
        let pool = &self.pool;
        self.duty.state(now, allowed, running, || {
            let mut pids = pool.governed_pids();
            pids.sort_unstable();
            let ns = cpu_time_ns(&pids)?;
            Some((pids, ns))
        })
    }

    fn report(&mut self, now: Instant, hold: Option<&Hold>) {
        match (hold, self.paused_since) {
            (Some(hold), None) => {
                self.paused_since = Some(now);
                self.pauses += 1;
                // The cause first, so whoever sees the pause can say why.
                self.shared
                    .status
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pause = Some(hold.pause());
                self.shared.paused_since.send_replace(Some(now));
                tracing::info!("guests paused: {}", describe(hold, || self.owner_now(now)));
            }
            (None, Some(since)) => {
                self.paused_since = None;
                self.shared.paused_since.send_replace(None);
                tracing::info!("guests resumed after {}", format_duration(since.elapsed()));
            }
            _ => {}
        }
        let owner = self.owner_cores();
        let machine_cores = self.config.machine.cores;
        let allowed = self.config.policy.cpu_millicores(machine_cores);
        let (state_name, reason) = match hold {
            Some(hold) => (
                "paused",
                format!("paused: {}", describe(hold, || self.owner_now(now))),
            ),
            None => giving(&self.config.policy, machine_cores),
        };
        let mut status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        status.state = state_name;
        status.pause = hold.map(Hold::pause);
        status.reason = reason;
        status.giving_millicores = if hold.is_some() { 0 } else { allowed };
        status.owner_cores = owner;
        status.spare_cores = self.average(|u| Some(u.spare_cores)).unwrap_or(0.0);
        status.cpu_pressure = self.average(|u| u.cpu_pressure);
        status.memory_pressure = self.average(|u| u.memory_pressure);
        status.owner_active_ms_ago = self
            .last_active
            .map(|t| u64::try_from(now.duration_since(t).as_millis()).unwrap_or(u64::MAX));
        status.paused_ms = self
            .paused_since
            .map(|t| u64::try_from(now.duration_since(t).as_millis()).unwrap_or(u64::MAX));
        status.pauses = self.pauses;
        status.power = self.power.map(Power::describe);
        drop(status);
        self.shared.decided.store(true, Ordering::Release);
    }

    /// What the owner is doing, to say why guests wait for them.
    fn owner_now(&self, now: Instant) -> OwnerNow {
        OwnerNow {
            cores: self.owner_cores(),
            memory_pressure: self.average(|u| u.memory_pressure).unwrap_or(0.0),
            threshold: f64::from(self.config.policy.when.owner_threshold) / 1000.0,
            active_ago: self
                .last_active
                .map(|t| now.saturating_duration_since(t))
                .unwrap_or_default(),
            cool_down: self.config.policy.when.cool_down,
        }
    }
}

/// Why the workers must be paused for the time of day or the power
/// source, if they must: the slow checks, at `minute` after local midnight
/// with `power` as read.
fn slow_hold(when: &When, minute: u16, power: Option<Power>) -> Option<Hold> {
    if !when.windows.is_empty() && !when.windows.iter().any(|w| w.contains(minute)) {
        return Some(Hold::OutsideWindows(outside_windows(&when.windows, minute)));
    }
    if !when.on_battery && power == Some(Power::Battery) {
        return Some(Hold::OnBattery);
    }
    None
}

/// `outside the time window (10:00-11:00 local time); giving again at
/// 10:00`.
fn outside_windows(windows: &[Window], minute: u16) -> String {
    let list: Vec<String> = windows.iter().map(ToString::to_string).collect();
    let noun = if windows.len() == 1 {
        "window"
    } else {
        "windows"
    };
    let mut text = format!("outside the time {noun} ({} local time)", list.join(", "));
    if let Some(start) = next_start(windows, minute) {
        text.push_str(&format!("; giving again {start}"));
    }
    text
}

/// The state and the reason while nothing pauses the guests: what the
/// config gives of the machine, and which settings hold the rest back.
fn giving(policy: &Policy, machine_cores: u16) -> (&'static str, String) {
    let allowed = policy.cpu_millicores(machine_cores);
    let whole = u64::from(machine_cores) * 1000;
    if allowed >= whole {
        return (
            "giving",
            format!("giving {} (the whole machine)", cores(allowed)),
        );
    }
    // The settings that set the share: the smaller of the two, or both.
    let mut by = Vec::new();
    if policy.cores < machine_cores && u64::from(policy.cores) * 1000 == allowed {
        by.push(format!("cores = {}", policy.cores));
    }
    if policy.cpu_permille < 1000
        && u64::from(policy.cpu_permille) * u64::from(machine_cores) == allowed
    {
        by.push(format!("cpu = {}%", f64::from(policy.cpu_permille) / 10.0));
    }
    let by = by.join(", ");
    if policy.throttled(machine_cores) {
        (
            "throttled",
            format!(
                "throttled to {} of {machine_cores} by its settings ({by})",
                cores(allowed)
            ),
        )
    } else {
        (
            "giving",
            format!(
                "giving {} of {machine_cores} (limited by its settings: {by})",
                cores(allowed)
            ),
        )
    }
}

/// The readings that cover the last [`WINDOW`] (at least one), whatever
/// rate they were taken at.
#[derive(Debug, Default)]
struct Recent(VecDeque<Usage>);

impl Recent {
    fn push(&mut self, usage: Usage) {
        self.0.push_back(usage);
        let mut covered: Duration = self.0.iter().map(|u| u.span).sum();
        while let Some(first) = self.0.front()
            && self.0.len() > 1
            && covered.saturating_sub(first.span) >= WINDOW
        {
            covered -= first.span;
            self.0.pop_front();
        }
    }

    /// The mean of `f` over the window, each reading weighted by its span.
    fn average(&self, f: impl Fn(&Usage) -> Option<f64>) -> Option<f64> {
        let (sum, weight) = self
            .0
            .iter()
            .filter_map(|u| Some((f(u)?, u.span.as_secs_f64())))
            .fold((0.0, 0.0), |(sum, weight), (value, span)| {
                (sum + value * span, weight + span)
            });
        (weight > 0.0).then(|| sum / weight)
    }
}

/// What the owner is doing, as the governor last read it.
#[derive(Clone, Debug, Default)]
struct OwnerNow {
    /// CPU use over the window, in cores.
    cores: f64,
    memory_pressure: f64,
    /// Above this many cores the owner counts as active.
    threshold: f64,
    /// Since the owner was last active.
    active_ago: Duration,
    cool_down: Duration,
}

/// Why guests are paused, after `paused: `; `owner` is read only when the
/// owner is the reason.
fn describe(hold: &Hold, owner: impl FnOnce() -> OwnerNow) -> String {
    match hold {
        Hold::OutsideWindows(text) => text.clone(),
        Hold::OnBattery => "on battery".into(),
        Hold::OwnerActive => {
            let owner = owner();
            if owner.cores > owner.threshold {
                format!("owner active now ({:.2} cores)", owner.cores)
            } else if owner.memory_pressure > MEMORY_PRESSURE_LIMIT {
                format!("memory pressure {:.0}%", owner.memory_pressure * 100.0)
            } else {
                format!(
                    "owner active {} ago, resuming after {} quiet",
                    format_duration(owner.active_ago),
                    format_duration(owner.cool_down)
                )
            }
        }
    }
}

/// `0.5 core`, `2 cores`.
fn cores(millicores: u64) -> String {
    let value = millicores as f64 / 1000.0;
    // Shares come in thousandths of a core (0.1% of a core's time).
    let text = format!("{value:.3}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_owned();
    if millicores <= 1000 {
        format!("{text} core")
    } else {
        format!("{text} cores")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::policy;

    fn reading(ms: u64, owner_cores: f64) -> Usage {
        Usage {
            span: Duration::from_millis(ms),
            owner_cores,
            ..Usage::default()
        }
    }

    #[test]
    fn the_window_covers_the_last_100_ms_at_any_rate() {
        let mut recent = Recent::default();
        assert_eq!(recent.average(|u| Some(u.owner_cores)), None);
        // A slow reading, then fast ones: the slow one leaves once the
        // fast ones cover the window.
        recent.push(reading(100, 1.0));
        assert_eq!(recent.average(|u| Some(u.owner_cores)), Some(1.0));
        recent.push(reading(20, 0.0));
        let mean = recent.average(|u| Some(u.owner_cores)).unwrap();
        assert!((mean - 100.0 / 120.0).abs() < 1e-9, "{mean}");
        for _ in 0..4 {
            recent.push(reading(20, 0.0));
        }
        assert_eq!(recent.0.len(), 5);
        assert_eq!(recent.average(|u| Some(u.owner_cores)), Some(0.0));
        // One long reading replaces them all.
        recent.push(reading(250, 0.5));
        assert_eq!(recent.0.len(), 1);
        assert_eq!(recent.average(|u| u.memory_pressure), None);
    }

    #[test]
    fn the_reason_says_what_the_config_holds_back() {
        // (cores, cpu ‰, machine cores) → (state, reason)
        let cases = [
            ((2, 1000, 2), "giving", "giving 2 cores (the whole machine)"),
            ((1, 1000, 1), "giving", "giving 1 core (the whole machine)"),
            // `--cores 1` on two cores: each task has a whole core, but the
            // config keeps the other.
            (
                (1, 1000, 2),
                "giving",
                "giving 1 core of 2 (limited by its settings: cores = 1)",
            ),
            (
                (2, 500, 2),
                "giving",
                "giving 1 core of 2 (limited by its settings: cpu = 50%)",
            ),
            (
                (1, 500, 2),
                "giving",
                "giving 1 core of 2 (limited by its settings: cores = 1, cpu = 50%)",
            ),
            // A share below what the tasks would use: each is slowed.
            (
                (2, 250, 2),
                "throttled",
                "throttled to 0.5 core of 2 by its settings (cpu = 25%)",
            ),
            (
                (1, 250, 2),
                "throttled",
                "throttled to 0.5 core of 2 by its settings (cpu = 25%)",
            ),
            (
                (2, 750, 2),
                "throttled",
                "throttled to 1.5 cores of 2 by its settings (cpu = 75%)",
            ),
            // Thousandths of a core are shown, not rounded away.
            (
                (2, 1, 2),
                "throttled",
                "throttled to 0.002 core of 2 by its settings (cpu = 0.1%)",
            ),
            (
                (2, 999, 2),
                "throttled",
                "throttled to 1.998 cores of 2 by its settings (cpu = 99.9%)",
            ),
            (
                (4, 125, 8),
                "giving",
                "giving 1 core of 8 (limited by its settings: cpu = 12.5%)",
            ),
        ];
        for ((cores, cpu, machine), state, reason) in cases {
            let got = giving(&policy(cores, cpu), machine);
            assert!(got.1.starts_with(got.0), "{got:?}");
            assert_eq!(got, (state, reason.to_owned()), "{cores} {cpu} {machine}");
        }
    }

    #[test]
    fn outside_the_windows_the_reason_says_when_giving_resumes() {
        let at = |h: u16, m: u16| h * 60 + m;
        let when = When {
            windows: vec![Window::parse("10:00-11:00").unwrap()],
            ..When::default()
        };
        let paused = |minute| {
            let hold = slow_hold(&when, minute, None).unwrap();
            format!("paused: {}", describe(&hold, OwnerNow::default))
        };
        assert_eq!(
            paused(at(8, 15)),
            "paused: outside the time window (10:00-11:00 local time); giving again at 10:00"
        );
        assert_eq!(
            paused(at(11, 0)),
            "paused: outside the time window (10:00-11:00 local time); giving again tomorrow at 10:00"
        );
        assert_eq!(slow_hold(&when, at(10, 30), None), None);
        let when = When {
            windows: vec![
                Window::parse("22:00-07:00").unwrap(),
                Window::parse("12:00-13:00").unwrap(),
            ],
            ..When::default()
        };
        assert_eq!(
            slow_hold(&when, at(13, 5), None),
            Some(Hold::OutsideWindows(
                "outside the time windows (22:00-07:00, 12:00-13:00 local time); \
                 giving again at 22:00"
                    .into()
            ))
        );
        assert_eq!(slow_hold(&when, at(23, 0), None), None);
    }

    #[test]
    fn on_battery_the_reason_says_so() {
        let root = tempfile::tempdir().unwrap();
        let supply = |name: &str, files: &[(&str, &str)]| {
            let dir = root.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            for (file, text) in files {
                std::fs::write(dir.join(file), format!("{text}\n")).unwrap();
            }
        };
        supply("AC", &[("type", "Mains"), ("online", "0")]);
        supply("BAT0", &[("type", "Battery"), ("status", "Discharging")]);
        let now = power(root.path());
        assert_eq!(now.map(Power::describe), Some("on battery"));
        let when = When::default();
        let hold = slow_hold(&when, 0, now).unwrap();
        assert_eq!(
            format!("paused: {}", describe(&hold, OwnerNow::default)),
            "paused: on battery"
        );
        // Giving on battery is the owner's call.
        let gives = When {
            on_battery: true,
            ..When::default()
        };
        assert_eq!(slow_hold(&gives, 0, now), None);
        // Plugged in again.
        supply("AC", &[("type", "Mains"), ("online", "1")]);
        let now = power(root.path());
        assert_eq!(now.map(Power::describe), Some("on AC power"));
        assert_eq!(slow_hold(&when, 0, now), None);
        // Outside the windows as well: the windows say when it resumes.
        let both = When {
            windows: vec![Window::parse("10:00-11:00").unwrap()],
            ..When::default()
        };
        assert!(matches!(
            slow_hold(&both, 0, Some(Power::Battery)),
            Some(Hold::OutsideWindows(_))
        ));
    }

    #[test]
    fn the_owner_reason_names_what_they_do() {
        let owner = OwnerNow {
            cores: 1.5,
            memory_pressure: 0.0,
            threshold: 0.25,
            active_ago: Duration::ZERO,
            cool_down: Duration::from_secs(10),
        };
        let text = |owner: &OwnerNow| describe(&Hold::OwnerActive, || owner.clone());
        assert_eq!(text(&owner), "owner active now (1.50 cores)");
        let owner = OwnerNow {
            cores: 0.0,
            memory_pressure: 0.3,
            ..owner
        };
        assert_eq!(text(&owner), "memory pressure 30%");
        let owner = OwnerNow {
            memory_pressure: 0.0,
            active_ago: Duration::from_secs(3),
            ..owner
        };
        assert_eq!(
            text(&owner),
            "owner active 3 s ago, resuming after 10 s quiet"
        );
    }

    #[test]
    fn cores_read_naturally() {
        assert_eq!(cores(500), "0.5 core");
        assert_eq!(cores(1000), "1 core");
        assert_eq!(cores(2000), "2 cores");
        assert_eq!(cores(1250), "1.25 cores");
    }
}

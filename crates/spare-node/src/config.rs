//! The node's configuration file (`config.toml`) and its validation.
//!
//! Every value is checked at start-up; a bad one stops the daemon with an
//! error that names the file, the line and the cause. Command-line flags of
//! `spare up` override the file.

use std::path::Path;
use std::time::Duration;

use libp2p::Multiaddr;
use serde::Deserialize;
use spare_core::Limits;
use spare_core::limits::WASM_PAGE_BYTES;
use spare_core::units::{
    format_bytes, parse_bytes, parse_count, parse_duration, parse_percent, parse_rate,
};
use spare_policy::settings::{MIN_RATE, When};
use spare_policy::{Enforcement, Machine, Policy, Window, cgroup};

/// Default TCP and QUIC port.
pub const DEFAULT_PORT: u16 = 4117;
/// Tasks a host keeps waiting for a core before it refuses more.
pub const DEFAULT_QUEUE: u32 = 256;
/// Upper bound for `queue`.
const MAX_QUEUE: u32 = 65_536;
/// Disk for blobs unless the owner says otherwise (at most half the file
/// system).
pub const DEFAULT_DISK: u64 = 10 << 30;
/// The least disk budget that holds a module of the largest size and its
/// compiled form.
const MIN_DISK: u64 = 256 << 20;
/// The least memory one guest may be given: below it, a guest built with a
/// C or Rust standard library does not start.
const MIN_GUEST_MEMORY: u64 = 16 << 20;
/// Longest cool-down and hand-back delay accepted.
const MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
/// Shortest hand-back delay accepted.
const MIN_HAND_BACK: Duration = Duration::from_secs(1);

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Tasks waiting for a core before new ones are refused.
    pub queue: u32,
    /// What this machine gives, and when.
    pub policy: Policy,
    /// The most this node grants a guest.
    pub max_limits: Limits,
    /// The machine the policy was checked against.
    pub machine: Machine,
}

impl Config {
    /// Tasks that run at once.
    pub fn slots(&self) -> u16 {
        self.policy.slots(self.machine.cores)
    }

    /// All defaults, on `machine`.
    pub fn defaults(machine: Machine) -> Self {
        let policy = Policy {
            cores: machine.cores,
            cpu_permille: 1000,
            memory: machine.memory / 2,
            disk: machine
                .disk
                .map_or(DEFAULT_DISK, |d| DEFAULT_DISK.min(d / 2)),
            upload: None,
            download: None,
            when: When::default(),
            enforcement: Enforcement::Auto,
        };
        let mut config = Self {
            listen: default_listen(),
            bootstrap: Vec::new(),
            mdns: true,
            queue: DEFAULT_QUEUE,
            max_limits: Limits::MAX,
            policy,
            machine,
        };
        config.max_limits.memory = config.guest_memory();
        config
    }

    /// Settings that are valid but that leave the owner little: one line
    /// each, said at start-up and by `spare status`.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // Guests are the first the OOM killer takes and pause under memory
        // pressure, but a paused guest keeps what it holds.
        if self.policy.memory.saturating_mul(10) > self.machine.memory.saturating_mul(9) {
            warnings.push(format!(
                "memory = {} lets guests hold more than 90% of this machine's {}: \
                 the owner's programs may be pushed to swap",
                format_bytes(self.policy.memory),
                format_bytes(self.machine.memory)
            ));
        }
        if self.listen.is_empty() {
            warnings.push(
                "listen = [] makes this node listen nowhere: it can use its peers, \
                 but none can reach it to send it tasks"
                    .into(),
            );
        }
        warnings
    }

    /// The memory one guest gets by default: the guests' memory shared
    /// among the tasks that run at once, in whole MiB, within
    /// [`Limits::MAX`].
    fn guest_memory(&self) -> u64 {
        let share = self.policy.memory / u64::from(self.slots().max(1));
        (share & !((1 << 20) - 1)).min(Limits::MAX.memory)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::defaults(Machine::detect())
    }
}

fn default_listen() -> Vec<Multiaddr> {
    [
        format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}"),
        format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1"),
    ]
    .iter()
    .filter_map(|a| a.parse().ok())
    .collect()
}

/// The file as written, before validation. Flags of `spare up` arrive in
/// the same shape, so both go through the same checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Option<Vec<String>>,
    pub bootstrap: Option<Vec<String>>,
    pub mdns: Option<bool>,
    #[serde(default, deserialize_with = "whole")]
    pub cores: Option<i64>,
    #[serde(default, deserialize_with = "text")]
    pub cpu: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub memory: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub disk: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub upload: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub download: Option<String>,
    pub enforcement: Option<String>,
    #[serde(default, deserialize_with = "whole")]
    pub queue: Option<i64>,
    pub when: Option<RawWhen>,
    pub max_limits: Option<RawLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWhen {
    pub idle_only: Option<bool>,
    #[serde(default, deserialize_with = "text")]
    pub owner_threshold: Option<String>,
    #[serde(default, deserialize_with = "text")]
    pub cool_down: Option<String>,
    pub windows: Option<Vec<String>>,
    pub on_battery: Option<bool>,
    #[serde(default, deserialize_with = "text")]
    pub hand_back_after: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default, deserialize_with = "text")]
    fuel: Option<String>,
    #[serde(default, deserialize_with = "text")]
    memory: Option<String>,
    #[serde(default, deserialize_with = "text")]
    wall_time: Option<String>,
    #[serde(default, deserialize_with = "text")]
    output: Option<String>,
    #[serde(default, deserialize_with = "text")]
    stack: Option<String>,
}

/// A setting with a unit, written as a string (`memory = "4GiB"`) or as a
/// bare number (`memory = 4294967296`, `fuel = 1e9`): its text either way,
/// for the setting's own parser, which says what a bare number means.
fn text<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Text;
    impl serde::de::Visitor<'_> for Text {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string such as \"4GiB\", \"50%\" or \"30s\", or a number")
        }
        fn visit_str<E>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_i64<E>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_u64<E>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(Text).map(Some)
}

/// A whole number, written as one (`cores = 2`) or as a string of one
/// (`cores = "2"`).
fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    struct Whole;
    impl serde::de::Visitor<'_> for Whole {
        type Value = i64;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a whole number, such as 2")
        }
        fn visit_i64<E>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<i64, E> {
            i64::try_from(v).map_err(|_| E::custom(format!("{v} is too large")))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<i64, E> {
            v.trim()
                .parse()
                .map_err(|_| E::custom(format!("`{v}` is not a whole number, such as 2")))
        }
    }
    d.deserialize_any(Whole).map(Some)
}

/// A configuration error, located in its file (or naming its flag).
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// What `spare init` writes: every setting, commented out at its default.
pub const TEMPLATE: &str = r#"# spare node configuration. Flags of `spare up` override these settings
# (most have a flag of the same name, e.g. `--cool-down 30s`; `mdns` has
# `--no-mdns`, `[max_limits]` none); `spare status` shows what is in force
# and what the node gives right now.
#
# Sizes take B, KB, MB, GB, TB, PB (powers of 1000) or KiB, MiB, GiB, TiB,
# PiB (powers of 1024); rates are sizes per second ("2MiB/s"); durations
# take the units ms, s, m, h, d; shares are percentages ("12.5%"); counts
# (fuel) are bare numbers. A bare number is also read as bytes, bytes per
# second or seconds (`memory = 1073741824`); a share needs its `%`.

# Addresses to listen on (TCP and QUIC), as multiaddresses.
# listen = ["/ip4/0.0.0.0/tcp/4117", "/ip4/0.0.0.0/udp/4117/quic-v1"]

# Peers to connect to at start, e.g. "/ip4/192.0.2.7/tcp/4117/p2p/12D3Koo...".
# `spare up --bootstrap` adds to these.
# bootstrap = []

# Find peers on the local network.
# mdns = true

## How much this machine gives the swarm.

# Tasks run at once: 1 to the machine's cores (default: every core).
# cores = 2

# Share of the whole machine's CPU all guests together may use: 0.1% to
# 100%, in steps of 0.1%.
# cpu = "100%"

# Memory all guests together may use: up to the machine's memory (over 90%
# of it is warned of), and at least 16 MiB for each task run at once
# (default: half the machine's).
# memory = "8GiB"

# Disk for the swarm's modules and inputs with this node's database, three
# quarters, and their compiled code, a quarter: at least 256 MiB, at most
# the file system holding the data directory (default: 10GiB, at most half
# the file system).
# disk = "10GiB"

# Bandwidth for the swarm's transfers: at least 128 KiB/s, e.g. "2MiB/s",
# or "unlimited".
# upload = "unlimited"
# download = "unlimited"

# How limits are enforced: "auto" (a cgroup where possible), "cgroup"
# (or refuse to start), "fallback" (SCHED_IDLE, rlimits and a CPU duty
# cycle).
# enforcement = "auto"

# Tasks waiting for a core before new ones are refused: 0 to 65536.
# queue = 256

## When it gives.
# [when]
# Only while the owner leaves the machine idle; guests pause within about
# 100 ms when the owner needs it (`spare up --always` is false).
# idle_only = true
# The owner counts as active above this much CPU, of one core: 0.1% to 100%.
# owner_threshold = "25%"
# Owner quiet this long before guests resume: 0s to 24h.
# cool_down = "10s"
# Local times of day to give in, "HH:MM-HH:MM" (one may wrap past
# midnight; 24:00 may end one); empty means all day.
# windows = ["22:00-07:00"]
# Give while running on battery.
# on_battery = false
# A task kept waiting this long by a pause (whether it was running or had
# just arrived) goes back to its requester: 1s to 24h.
# hand_back_after = "60s"

# The most this node grants one guest.
# [max_limits]
# Fuel, about one per WebAssembly instruction: 1 to 1e13.
# fuel = 1e13
# Memory: up to 4GiB and at most `memory` above (default: `memory` divided
# among the tasks run at once, in whole MiB, at most 4GiB).
# memory = "4GiB"
# Wall time: 1ms to 24h.
# wall_time = "24h"
# Output, each of stdout and stderr: 0 to 32MiB.
# output = "32MiB"
# Native stack: 64KiB to 8MiB.
# stack = "8MiB"
"#;

/// Where a value came from, for errors: a line of the file, or a flag.
struct Source<'a> {
    file: &'a str,
    text: &'a str,
    /// Keys that came from flags of `spare up`.
    flags: &'a [&'static str],
}

impl Source<'_> {
    /// An error about `key`: `"cpu"`, or `"when.cool_down"` for a key of a
    /// table. A flag is named by the key's last part (`--cool-down`).
    fn err(&self, key: &str, message: String) -> ConfigError {
        if self.flags.contains(&key) {
            let name = key.rsplit('.').next().unwrap_or(key);
            // The flag names the setting already: `--cpu: 150% is over
            // 100%`, not `--cpu: cpu = 150% is over 100%`.
            let message = [format!("{name} = "), format!("{name}: ")]
                .iter()
                .find_map(|named| message.strip_prefix(named.as_str()))
                .map_or_else(|| message.clone(), str::to_owned);
            ConfigError {
                file: format!("--{}", name.replace('_', "-")),
                line: None,
                message,
            }
        } else {
            ConfigError {
                file: self.file.to_owned(),
                line: line_of(self.text, key),
                message,
            }
        }
    }
}

impl Config {
    /// Reads and validates `path` (a missing file means all defaults), with
    /// `flags` from the command line on top.
    pub fn load(path: &Path, flags: Flags) -> Result<Self, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                return Err(ConfigError {
                    file: path.display().to_string(),
                    line: None,
                    message: format!("cannot read: {e}"),
                });
            }
        };
        let mut machine = Machine::detect();
        machine.disk = path
            .parent()
            .and_then(filesystem_space)
            .map(|(size, _)| size);
        Self::parse_with(&text, &path.display().to_string(), flags, machine)
    }

    /// Parses and validates config text on this machine; `file` names it in
    /// errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        Self::parse_with(text, file, Flags::default(), Machine::detect())
    }

    /// Parses and validates config text with `flags` on top, against
    /// `machine`.
    pub fn parse_with(
        text: &str,
        file: &str,
        flags: Flags,
        machine: Machine,
    ) -> Result<Self, ConfigError> {
        let read = || {
            toml::from_str::<RawConfig>(text).map_err(|e| ConfigError {
                file: file.to_owned(),
                line: e.span().map(|s| line_at(text, s.start)),
                message: e.message().to_owned(),
            })
        };
        let mut raw = read()?;
        // The file must hold on its own: a wrong line that a flag covers
        // today would stop the next start without the flag.
        if !flags.is_empty() {
            let alone = Source {
                file,
                text,
                flags: &[],
            };
            Self::validate(read()?, &alone, machine)?;
        }
        let set_flags = flags.apply(&mut raw);
        let source = Source {
            file,
            text,
            flags: &set_flags,
        };
        Self::validate(raw, &source, machine)
    }

    fn validate(raw: RawConfig, src: &Source<'_>, machine: Machine) -> Result<Self, ConfigError> {
        let mut config = Config::defaults(machine);
        if let Some(listen) = raw.listen {
            config.listen = parse_addrs(&listen).map_err(|m| src.err("listen", m))?;
        }
        if let Some(bootstrap) = raw.bootstrap {
            config.bootstrap = parse_addrs(&bootstrap).map_err(|m| src.err("bootstrap", m))?;
        }
        if let Some(mdns) = raw.mdns {
            config.mdns = mdns;
        }
        if let Some(queue) = raw.queue {
            config.queue = u32::try_from(queue)
                .ok()
                .filter(|q| *q <= MAX_QUEUE)
                .ok_or_else(|| {
                    src.err(
                        "queue",
                        format!("queue = {queue} is not in 0..={MAX_QUEUE}"),
                    )
                })?;
        }
        let policy = &mut config.policy;
        if let Some(cores) = raw.cores {
            policy.cores = check_cores(cores, machine.cores).map_err(|m| src.err("cores", m))?;
        }
        if let Some(cpu) = raw.cpu {
            policy.cpu_permille = check_cpu(&cpu).map_err(|m| src.err("cpu", m))?;
            // A cgroup holds the share as a quota per period, which the
            // kernel takes down to 1 ms per 1 s.
            let millicores = policy.cpu_millicores(machine.cores);
            if policy.throttled(machine.cores) {
                cgroup::cpu_max(millicores * cgroup::CPU_PERIOD_US / 1000).map_err(|m| {
                    src.err("cpu", format!("cpu = {cpu} is below the minimum: {m}"))
                })?;
            }
        }
        if let Some(memory) = raw.memory {
            let bytes =
                parse_bytes(&memory).map_err(|e| src.err("memory", format!("memory: {e}")))?;
            if bytes > machine.memory {
                return Err(src.err(
                    "memory",
                    format!(
                        "memory = {memory} is more than this machine has ({})",
                        format_bytes(machine.memory)
                    ),
                ));
            }
            policy.memory = bytes;
        }
        if let Some(disk) = raw.disk {
            let bytes = parse_bytes(&disk).map_err(|e| src.err("disk", format!("disk: {e}")))?;
            if bytes < MIN_DISK {
                return Err(src.err(
                    "disk",
                    format!(
                        "disk = {disk} is below the minimum, {}",
                        format_bytes(MIN_DISK)
                    ),
                ));
            }
            if let Some(size) = machine.disk.filter(|size| bytes > *size) {
                return Err(src.err(
                    "disk",
                    format!(
                        "disk = {disk} is more than the file system holding the data directory has ({})",
                        format_bytes(size)
                    ),
                ));
            }
            policy.disk = bytes;
        }
        for (key, value, slot) in [
            ("upload", raw.upload, &mut policy.upload),
            ("download", raw.download, &mut policy.download),
        ] {
            if let Some(value) = value {
                *slot = check_rate(key, &value).map_err(|m| src.err(key, m))?;
            }
        }
        if let Some(enforcement) = raw.enforcement {
            policy.enforcement =
                Enforcement::parse(&enforcement).map_err(|m| src.err("enforcement", m))?;
        }
        if let Some(when) = raw.when {
            policy.when = check_when(when, src)?;
        }
        // Memory per guest follows the budget and the slots, unless the
        // owner set it; either way it must fit.
        config.max_limits.memory = config.guest_memory();
        if config.max_limits.memory < MIN_GUEST_MEMORY {
            return Err(src.err(
                "memory",
                format!(
                    "memory = {} leaves each of {} tasks less than the {} a guest needs",
                    format_bytes(config.policy.memory),
                    config.slots(),
                    format_bytes(MIN_GUEST_MEMORY)
                ),
            ));
        }
        if let Some(limits) = raw.max_limits {
            check_max_limits(limits, &mut config, src)?;
        }
        Ok(config)
    }
}

fn check_max_limits(
    limits: RawLimits,
    config: &mut Config,
    src: &Source<'_>,
) -> Result<(), ConfigError> {
    let max = &mut config.max_limits;
    let set = |key: &str,
               value: Option<String>,
               parse: fn(&str) -> Result<u64, String>,
               slot: &mut u64| {
        if let Some(value) = value {
            *slot = parse(&value).map_err(|m| {
                src.err(
                    &format!("max_limits.{key}"),
                    format!("[max_limits] {key}: {m}"),
                )
            })?;
        }
        Ok::<(), ConfigError>(())
    };
    set(
        "fuel",
        limits.fuel,
        |v| parse_count(v).map_err(|e| e.to_string()),
        &mut max.fuel,
    )?;
    let memory_set = limits.memory.is_some();
    set(
        "memory",
        limits.memory,
        |v| parse_bytes(v).map_err(|e| e.to_string()),
        &mut max.memory,
    )?;
    set(
        "wall_time",
        limits.wall_time,
        |v| {
            parse_duration(v)
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                .map_err(|e| e.to_string())
        },
        &mut max.wall_ms,
    )?;
    set(
        "output",
        limits.output,
        |v| parse_bytes(v).map_err(|e| e.to_string()),
        &mut max.output,
    )?;
    set(
        "stack",
        limits.stack,
        |v| parse_bytes(v).map_err(|e| e.to_string()),
        &mut max.stack,
    )?;
    max.validate().map_err(|e| {
        let key = match e.name() {
            "wall time" => "wall_time",
            name => name,
        };
        src.err(&format!("max_limits.{key}"), format!("[max_limits] {e}"))
    })?;
    if memory_set && max.memory < WASM_PAGE_BYTES {
        return Err(src.err(
            "max_limits.memory",
            format!(
                "[max_limits] memory = {} is less than one WebAssembly page ({}), the least a \
                 guest runs in: this node could run no task",
                format_bytes(max.memory),
                format_bytes(WASM_PAGE_BYTES)
            ),
        ));
    }
    if memory_set && max.memory > config.policy.memory {
        return Err(src.err(
            "max_limits.memory",
            format!(
                "[max_limits] memory = {} is more than all guests together may use (memory = {})",
                format_bytes(max.memory),
                format_bytes(config.policy.memory)
            ),
        ));
    }
    Ok(())
}

fn check_when(raw: RawWhen, src: &Source<'_>) -> Result<When, ConfigError> {
    let mut when = When::default();
    if let Some(idle_only) = raw.idle_only {
        when.idle_only = idle_only;
    }
    if let Some(on_battery) = raw.on_battery {
        when.on_battery = on_battery;
    }
    if let Some(threshold) = raw.owner_threshold {
        let permille = parse_percent(&threshold)
            .map_err(|e| src.err("when.owner_threshold", format!("owner_threshold: {e}")))?;
        if !(1..=1000).contains(&permille) {
            return Err(src.err(
                "when.owner_threshold",
                format!("owner_threshold = {threshold} is not between 0.1% and 100% (of one core)"),
            ));
        }
        when.owner_threshold = permille;
    }
    let wait = |key: &str, value: &str, min: Duration| {
        let path = format!("when.{key}");
        let d = parse_duration(value).map_err(|e| src.err(&path, format!("{key}: {e}")))?;
        if d < min || d > MAX_WAIT {
            return Err(src.err(
                &path,
                format!("{key} = {value} is not between {}s and 24h", min.as_secs()),
            ));
        }
        Ok(d)
    };
    if let Some(cool_down) = raw.cool_down {
        when.cool_down = wait("cool_down", &cool_down, Duration::ZERO)?;
    }
    if let Some(after) = raw.hand_back_after {
        when.hand_back_after = wait("hand_back_after", &after, MIN_HAND_BACK)?;
    }
    if let Some(windows) = raw.windows {
        when.windows = windows
            .iter()
            .map(|w| Window::parse(w))
            .collect::<Result<_, _>>()
            .map_err(|m| src.err("when.windows", m))?;
    }
    Ok(when)
}

/// Checks a core count against what the machine has.
pub fn check_cores(cores: i64, available: u16) -> Result<u16, String> {
    match u16::try_from(cores) {
        Ok(n) if n >= 1 && n <= available => Ok(n),
        _ => Err(format!(
            "cores = {cores} is not in 1..={available} (this machine has {available})"
        )),
    }
}

fn check_cpu(cpu: &str) -> Result<u32, String> {
    let permille = parse_percent(cpu).map_err(|e| format!("cpu: {e}"))?;
    // Rounded up to the least share from below it.
    let below_least = cpu
        .trim()
        .trim_end_matches('%')
        .trim()
        .parse::<f64>()
        .is_ok_and(|percent| percent > 0.0 && percent < 0.1);
    if below_least {
        return Err(format!(
            "cpu = {cpu} is below the minimum, 0.1% (shares are counted in steps of 0.1%)"
        ));
    }
    match permille {
        // Rounded to nothing, but not nothing.
        0 if cpu.contains(|c: char| ('1'..='9').contains(&c)) => Err(format!(
            "cpu = {cpu} is below the minimum, 0.1% (shares are counted in steps of 0.1%)"
        )),
        0 => Err(format!(
            "cpu = {cpu} gives nothing; to give nothing at times, set [when] windows"
        )),
        1..=1000 => Ok(permille),
        _ => Err(format!("cpu = {cpu} is over 100%")),
    }
}

fn check_rate(key: &str, value: &str) -> Result<Option<u64>, String> {
    let rate = parse_rate(value).map_err(|e| format!("{key}: {e}"))?;
    if let Some(r) = rate.filter(|r| *r < MIN_RATE) {
        return Err(format!(
            "{key} = {value} ({}/s) is below the minimum, {}/s",
            format_bytes(r),
            format_bytes(MIN_RATE)
        ));
    }
    Ok(rate)
}

/// Size of the file system holding `dir`, and what is free on it (for an
/// unprivileged user).
pub(crate) fn filesystem_space(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let existing = dir.ancestors().find(|d| d.exists())?;
    let path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is plain data; statvfs reads the C string we
    // own and writes only into `stat`.
    let stat = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut stat) == 0).then_some(stat)
    }?;
    Some((
        stat.f_blocks.saturating_mul(stat.f_frsize),
        stat.f_bavail.saturating_mul(stat.f_frsize),
    ))
}

/// Values given as flags of `spare up`; each overrides its key in the file
/// and is checked the same way.
#[derive(Clone, Debug, Default)]
pub struct Flags {
    pub listen: Vec<String>,
    pub bootstrap: Vec<String>,
    pub no_mdns: bool,
    pub cores: Option<i64>,
    pub cpu: Option<String>,
    pub memory: Option<String>,
    pub disk: Option<String>,
    pub upload: Option<String>,
    pub download: Option<String>,
    pub enforcement: Option<String>,
    pub queue: Option<i64>,
    /// `Some(true)` for `--idle-only`, `Some(false)` for `--always` (or
    /// `--idle-only=false`).
    pub idle_only: Option<bool>,
    pub owner_threshold: Option<String>,
    pub cool_down: Option<String>,
    /// `Some` of no windows is all day.
    pub windows: Option<Vec<String>>,
    pub on_battery: Option<bool>,
    pub hand_back_after: Option<String>,
}

impl Flags {
    /// Whether no flag is given.
    fn is_empty(&self) -> bool {
        let mut none = RawConfig::default();
        self.clone().apply(&mut none).is_empty() && !self.no_mdns
    }

    /// Writes the flags over `raw`; returns the keys they set.
    fn apply(self, raw: &mut RawConfig) -> Vec<&'static str> {
        let mut set = Vec::new();
        let mut put = |key: &'static str, value: Option<String>, slot: &mut Option<String>| {
            if value.is_some() {
                *slot = value;
                set.push(key);
            }
        };
        put("cpu", self.cpu, &mut raw.cpu);
        put("memory", self.memory, &mut raw.memory);
        put("disk", self.disk, &mut raw.disk);
        put("upload", self.upload, &mut raw.upload);
        put("download", self.download, &mut raw.download);
        put("enforcement", self.enforcement, &mut raw.enforcement);
        let when = raw.when.get_or_insert_with(RawWhen::default);
        put(
            "when.owner_threshold",
            self.owner_threshold,
            &mut when.owner_threshold,
        );
        put("when.cool_down", self.cool_down, &mut when.cool_down);
        put(
            "when.hand_back_after",
            self.hand_back_after,
            &mut when.hand_back_after,
        );
        for (key, value, slot) in [
            ("when.idle_only", self.idle_only, &mut when.idle_only),
            ("when.on_battery", self.on_battery, &mut when.on_battery),
        ] {
            if value.is_some() {
                *slot = value;
                set.push(key);
            }
        }
        if self.windows.is_some() {
            when.windows = self.windows;
            set.push("when.windows");
        }
        for (key, value, slot) in [
            ("cores", self.cores, &mut raw.cores),
            ("queue", self.queue, &mut raw.queue),
        ] {
            if value.is_some() {
                *slot = value;
                set.push(key);
            }
        }
        if !self.listen.is_empty() {
            raw.listen = Some(self.listen);
            set.push("listen");
        }
        if !self.bootstrap.is_empty() {
            // Flags add to the file's bootstrap peers.
            raw.bootstrap
                .get_or_insert_with(Vec::new)
                .extend(self.bootstrap);
            set.push("bootstrap");
        }
        if self.no_mdns {
            raw.mdns = Some(false);
        }
        set
    }
}

fn parse_addrs(addrs: &[String]) -> Result<Vec<Multiaddr>, String> {
    addrs
        .iter()
        .map(|a| {
            a.parse()
                .map_err(|e| format!("`{a}` is not a multiaddress: {e}"))
        })
        .collect()
}

/// The line, 1-based, holding byte `offset` of `text`.
fn line_at(text: &str, offset: usize) -> usize {
    let before = &text.as_bytes()[..offset.min(text.len())];
    before.iter().filter(|b| **b == b'\n').count() + 1
}

/// The first line that sets `key`, 1-based. A top-level key (`"cpu"`) is
/// looked for before the first table header only; a key of a table
/// (`"when.cool_down"`) within that table's sections, or as a dotted key
/// before the first header. A key the text does not set (the table's
/// default was at fault) finds its table's header or inline table; a table's
/// name alone (`"when"`) finds its header.
fn line_of(text: &str, key: &str) -> Option<usize> {
    let (table, name) = match key.split_once('.') {
        Some((table, name)) => (Some(table), name),
        None => (None, key),
    };
    // The table this line is in; `None` before the first header.
    let mut section: Option<String> = None;
    let mut table_line = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(header) = table_header(line) {
            if table.is_none() && header == name {
                return Some(i + 1);
            }
            if table == Some(header.as_str()) {
                table_line.get_or_insert(i + 1);
            }
            section = Some(header);
            continue;
        }
        let Some(found) = key_of(line) else {
            continue;
        };
        match (section.as_deref(), table) {
            (None, None) if found == name => return Some(i + 1),
            (None, Some(t)) if found == format!("{t}.{name}") => return Some(i + 1),
            (None, Some(t)) if found == t => {
                // An inline table: `when = { cool_down = "1s" }`.
                table_line.get_or_insert(i + 1);
            }
            (Some(s), Some(t)) if s == t && found == name => return Some(i + 1),
            _ => {}
        }
    }
    table_line
}

/// The name of the table a `[table]` (or `[[table]]`) header line opens.
fn table_header(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?;
    let inner = inner.strip_prefix('[').unwrap_or(inner);
    let (name, _) = inner.split_once(']')?;
    Some(normalize_key(name))
}

/// The key a `key = value` line sets, dotted parts joined by `.`.
fn key_of(line: &str) -> Option<String> {
    if line.starts_with('#') {
        return None;
    }
    let (key, _) = line.split_once('=')?;
    Some(normalize_key(key))
}

/// `a . "b"` as `a.b`.
fn normalize_key(key: &str) -> String {
    key.split('.')
        .map(|part| part.trim().trim_matches(|c| c == '"' || c == '\''))
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MACHINE: Machine = Machine {
        cores: 2,
        memory: 8 << 30,
        disk: Some(100 << 30),
    };

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse_with(text, "c.toml", Flags::default(), MACHINE)
    }

    #[test]
    fn nearly_all_the_machines_memory_is_allowed_with_a_warning() {
        assert!(Config::defaults(MACHINE).warnings().is_empty());
        let most = parse("memory = \"7GiB\"\n").unwrap();
        assert!(most.warnings().is_empty(), "{:?}", most.warnings());
        let all = parse("memory = \"8GiB\"\n").unwrap();
        assert_eq!(
            all.warnings(),
            [
                "memory = 8 GiB lets guests hold more than 90% of this machine's 8 GiB: \
              the owner's programs may be pushed to swap"
            ]
        );
    }

    #[test]
    fn a_node_that_listens_nowhere_is_warned_of() {
        let nowhere = parse("listen = []\n").unwrap();
        assert_eq!(nowhere.warnings().len(), 1);
        assert!(nowhere.warnings()[0].contains("none can reach it"));
    }

    #[test]
    fn the_template_is_all_defaults() {
        assert_eq!(parse(TEMPLATE).unwrap(), Config::defaults(MACHINE));
        let defaults = Config::defaults(MACHINE);
        assert_eq!(defaults.policy.memory, 4 << 30);
        assert_eq!(defaults.max_limits.memory, 2 << 30);
        assert!(defaults.policy.when.idle_only);
    }

    #[test]
    fn values_are_read() {
        let config = parse(
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\ncores = 1\ncpu = \"25%\"\nmemory = \"2GiB\"\ndisk = \"1GiB\"\nupload = \"1MiB/s\"\nenforcement = \"fallback\"\n[when]\nidle_only = false\nowner_threshold = \"50%\"\ncool_down = \"2s\"\nwindows = [\"22:00-07:00\"]\nhand_back_after = \"5s\"\n[max_limits]\nmemory = \"1GiB\"\nwall_time = \"1h\"\n",
        )
        .unwrap();
        assert_eq!(
            config.listen,
            vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()]
        );
        assert!(!config.mdns);
        let p = &config.policy;
        assert_eq!(
            (p.cores, p.cpu_permille, p.memory, p.disk),
            (1, 250, 2 << 30, 1 << 30)
        );
        assert_eq!((p.upload, p.download), (Some(1 << 20), None));
        assert_eq!(p.enforcement, Enforcement::Fallback);
        assert!(!p.when.idle_only);
        assert_eq!(p.when.owner_threshold, 500);
        assert_eq!(p.when.cool_down, Duration::from_secs(2));
        assert_eq!(p.when.windows, vec![Window::parse("22:00-07:00").unwrap()]);
        assert_eq!(p.when.hand_back_after, Duration::from_secs(5));
        assert_eq!(config.max_limits.memory, 1 << 30);
        assert_eq!(config.max_limits.wall_ms, 3_600_000);
        assert_eq!(config.slots(), 1);
    }

    #[test]
    fn bare_numbers_are_read_as_the_settings_own_units_say() {
        let config = parse(
            "cores = \"1\"\nmemory = 2147483648\n[when]\ncool_down = 3\n[max_limits]\nfuel = 1e9\nmemory = 1073741824\n",
        )
        .unwrap();
        assert_eq!(config.policy.cores, 1);
        assert_eq!(config.policy.memory, 2 << 30);
        assert_eq!(config.policy.when.cool_down, Duration::from_secs(3));
        assert_eq!(config.max_limits.fuel, 1_000_000_000);
        assert_eq!(config.max_limits.memory, 1 << 30);
        for (text, needle) in [
            ("cpu = 50\n", "`50` needs a unit (one of %)"),
            ("cores = \"two\"\n", "`two` is not a whole number"),
            ("memory = true\n", "expected a string such as \"4GiB\""),
            (
                "memory = \"4G\"\n",
                "`G` could mean GB (powers of 1000) or GiB",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(err.starts_with("c.toml:1"), "{text}: {err}");
        }
    }

    #[test]
    fn errors_name_the_line_and_cause() {
        for (text, line, needle) in [
            ("mdns = true\ncores = -1\n", 2, "cores = -1 is not in 1..=2"),
            ("cores = 3\n", 1, "this machine has 2"),
            ("cpu = \"150%\"\n", 1, "over 100%"),
            ("cpu = \"-5%\"\n", 1, "negative"),
            ("cpu = \"0%\"\n", 1, "gives nothing"),
            ("cpu = \"50\"\n", 1, "`50` needs a unit (one of %)"),
            ("cpu = \"0.05%\"\n", 1, "below the minimum, 0.1%"),
            (
                "\nmemory = \"64GiB\"\n",
                2,
                "more than this machine has (8 GiB)",
            ),
            ("memory = \"3 parsecs\"\n", 1, "unknown unit `parsecs`"),
            ("disk = \"1TiB\"\n", 1, "more than the file system"),
            ("disk = \"1MiB\"\n", 1, "below the minimum"),
            ("upload = \"10KB/s\"\n", 1, "below the minimum"),
            ("download = \"fast\"\n", 1, "not a number"),
            ("enforcement = \"magic\"\n", 1, "not one of"),
            (
                "[when]\nowner_threshold = \"150%\"\n",
                2,
                "between 0.1% and 100%",
            ),
            ("[when]\ncool_down = \"2 weeks\"\n", 2, "unknown unit"),
            ("[when]\nhand_back_after = \"0s\"\n", 2, "not between"),
            ("[when]\nwindows = [\"25:00-01:00\"]\n", 2, "past 24:00"),
            ("memory = \"20MiB\"\n", 1, "less than the"),
            (
                "memory = \"1GiB\"\n[max_limits]\nmemory = \"2GiB\"\n",
                3,
                "more than all guests",
            ),
            ("[max_limits]\nmemory = \"12 parsecs\"\n", 2, "unknown unit"),
            (
                "[max_limits]\nmemory = \"1KiB\"\n",
                2,
                "less than one WebAssembly page (64 KiB)",
            ),
            (
                "[max_limits]\nwall_time = \"48h\"\n",
                2,
                "above the maximum",
            ),
            ("colour = \"blue\"\n", 1, "unknown field"),
            ("listen = [\"not an address\"]\n", 1, "not a multiaddress"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, Some(line), "{text}: {err}");
            assert!(err.to_string().contains(needle), "{text}: {err}");
            assert!(
                err.to_string().starts_with(&format!("c.toml:{line}: ")),
                "{err}"
            );
        }
    }

    #[test]
    fn parser_errors_name_the_line_of_the_cause() {
        for (text, line, needle) in [
            (
                "mdns = false\nqueue = 1\ncolour = \"blue\"\n",
                3,
                "unknown field `colour`",
            ),
            ("mdns = false\nqueue = 1\nqueue = 2\n", 3, "duplicate key"),
            ("[when]\nidle = true\n", 2, "unknown field `idle`"),
            ("\n\n[when]\n\nidle_only = 3\n", 5, "invalid type"),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, Some(line), "{text:?}: {err}");
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
    }

    #[test]
    fn errors_in_a_table_name_the_line_in_that_table() {
        for (text, line, needle) in [
            (
                "memory = \"2GiB\"\n[max_limits]\nfuel = \"1e9\"\nmemory = \"12 parsecs\"\n",
                4,
                "[max_limits] memory: `12 parsecs` has an unknown unit",
            ),
            (
                "memory = \"2GiB\"\n[when]\ncool_down = \"1s\"\n[max_limits]\nmemory = \"3GiB\"\n",
                5,
                "more than all guests",
            ),
            // Dotted keys, and a header with spaces and a comment.
            ("when.cool_down = \"25h\"\n", 1, "between 0s and 24h"),
            (
                "cpu = \"50%\"\n[ when ] # the times\nowner_threshold = \"0%\"\n",
                3,
                "between 0.1% and 100%",
            ),
            (
                "[max_limits]\nstack = \"1GiB\"\n[when]\nidle_only = true\n",
                2,
                "stack limit 1 GiB is above the maximum, 8 MiB",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert_eq!(err.line, Some(line), "{text:?}: {err}");
            assert!(err.to_string().contains(needle), "{text:?}: {err}");
        }
        let text = "queue = 1\n[max_limits]\nmemory = \"1GiB\"\n[when]\n# cool_down = \"x\"\ncool_down = \"1s\"\n";
        // A top-level key is looked for only before the first table.
        assert_eq!(line_of(text, "memory"), None);
        assert_eq!(line_of(text, "queue"), Some(1));
        assert_eq!(line_of(text, "max_limits.memory"), Some(3));
        assert_eq!(line_of(text, "when.cool_down"), Some(6));
        // A key not in the text: its table.
        assert_eq!(line_of(text, "when.windows"), Some(4));
        assert_eq!(line_of(text, "max_limits"), Some(2));
        assert_eq!(
            line_of("when = { cool_down = \"1s\" }\n", "when.cool_down"),
            Some(1)
        );
        assert_eq!(line_of(text, "cpu"), None);
    }

    #[test]
    fn a_cpu_share_too_small_for_any_quota_is_refused() {
        for cpu in ["0.01%", "0.04%"] {
            let err = parse(&format!("cpu = \"{cpu}\"\n")).unwrap_err();
            assert!(
                err.to_string().contains("below the minimum, 0.1%"),
                "{cpu}: {err}"
            );
        }
        // The smallest share there is: 0.1% of the machine.
        let config = parse("cpu = \"0.1%\"\n").unwrap();
        assert_eq!(config.policy.cpu_permille, 1);
        let err = parse("cpu = \"0%\"\n").unwrap_err();
        assert!(err.to_string().contains("gives nothing"), "{err}");
    }

    #[test]
    fn units_errors_echo_the_value_and_take_days_and_pebibytes() {
        let flags = Flags {
            upload: Some("-1MiB/s".into()),
            ..Flags::default()
        };
        let err = Config::parse_with("", "c.toml", flags, MACHINE).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--upload: `-1MiB/s` is negative"),
            "{err}"
        );
        let config = parse("[when]\ncool_down = \"0.5d\"\nhand_back_after = \"1d\"\n").unwrap();
        assert_eq!(config.policy.when.cool_down, Duration::from_secs(12 * 3600));
        assert_eq!(config.policy.when.hand_back_after, MAX_WAIT);
        let err = parse("[when]\ncool_down = \"2d\"\n").unwrap_err();
        assert!(
            err.to_string()
                .ends_with("cool_down = 2d is not between 0s and 24h"),
            "{err}"
        );
        let err = parse("memory = \"1PiB\"\n").unwrap_err();
        assert!(
            err.to_string()
                .ends_with("memory = 1PiB is more than this machine has (8 GiB)"),
            "{err}"
        );
        let err = parse("disk = \"2PB\"\n").unwrap_err();
        assert!(
            err.to_string().contains("more than the file system"),
            "{err}"
        );
        let err = parse("[max_limits]\nwall_time = \"2d\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "c.toml:2: [max_limits] wall time limit 48 h is above the maximum, 24 h"
        );
        let err = parse("[max_limits]\nstack = \"1KiB\"\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "c.toml:2: [max_limits] stack limit 1 KiB is below the minimum, 64 KiB"
        );
    }

    #[test]
    fn the_template_states_each_range() {
        for needle in [
            "1 to the machine's cores",
            "0.1% to\n# 100%",
            "16 MiB for each task run at once",
            "at least 256 MiB",
            "at least 128 KiB/s",
            "0 to 65536",
            "CPU, of one core: 0.1% to 100%",
            "resume: 0s to 24h",
            "requester: 1s to 24h",
            "ms, s, m, h, d",
            "PiB",
            "1 to 1e13",
            "1ms to 24h",
            "0 to 32MiB",
            "64KiB to 8MiB",
        ] {
            assert!(TEMPLATE.contains(needle), "template lacks {needle:?}");
        }
    }

    #[test]
    fn flags_override_the_file_and_are_named_in_errors() {
        let flags = Flags {
            cpu: Some("50%".into()),
            idle_only: Some(false),
            ..Flags::default()
        };
        let config = Config::parse_with("cpu = \"25%\"\n", "c.toml", flags, MACHINE).unwrap();
        assert_eq!(config.policy.cpu_permille, 500);
        assert!(!config.policy.when.idle_only);

        let flags = Flags {
            memory: Some("1TiB".into()),
            ..Flags::default()
        };
        let err = Config::parse_with("", "c.toml", flags, MACHINE).unwrap_err();
        assert_eq!(err.file, "--memory");
        assert!(
            err.to_string().starts_with("--memory: 1TiB is more than"),
            "{err}"
        );
    }
}

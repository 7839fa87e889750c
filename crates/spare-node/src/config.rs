//! The node's configuration file (`config.toml`) and its validation.
//!
//! Every value is checked at start-up; a bad one stops the daemon with an
//! error that names the file, the line and the cause. Command-line flags of
//! `spare up` override the file.

use std::path::Path;

use libp2p::Multiaddr;
use serde::Deserialize;
use spare_core::Limits;
use spare_core::units::{parse_bytes, parse_count, parse_duration};

/// Default TCP and QUIC port.
pub const DEFAULT_PORT: u16 = 4117;
/// Tasks a host keeps waiting for a core before it refuses more.
pub const DEFAULT_QUEUE: u32 = 256;
/// Upper bound for `queue`.
const MAX_QUEUE: u32 = 65_536;

/// The validated configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub mdns: bool,
    /// Tasks run at once: the cores this node contributes.
    pub cores: u16,
    /// Tasks waiting for a core before new ones are refused.
    pub queue: u32,
    /// The most this node grants a guest.
    pub max_limits: Limits,
}

impl Default for Config {
    fn default() -> Self {
        let cores = available_cores();
        Self {
            listen: default_listen(),
            bootstrap: Vec::new(),
            mdns: true,
            cores,
            queue: DEFAULT_QUEUE,
            max_limits: Limits {
                memory: default_guest_memory(cores),
                ..Limits::MAX
            },
        }
    }
}

/// The most memory one guest gets by default: half the machine's memory
/// shared among the guests that run at once, within [`Limits::MAX`]. Every
/// core busy with a guest at its limit then leaves the owner half the
/// machine.
fn default_guest_memory(cores: u16) -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            let kib = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
            kib.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(|kib| kib * 1024);
    match total {
        Some(bytes) => {
            let share = bytes / 2 / u64::from(cores.max(1));
            // Whole MiB, at least the default limit, at most the maximum.
            (share & !((1 << 20) - 1)).clamp(Limits::DEFAULT.memory, Limits::MAX.memory)
        }
        None => Limits::DEFAULT.memory,
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

/// Cores the OS lets this process use.
pub fn available_cores() -> u16 {
    std::thread::available_parallelism()
        .map(|n| u16::try_from(n.get()).unwrap_or(u16::MAX))
        .unwrap_or(1)
}

/// The file as written, before validation.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<Vec<String>>,
    bootstrap: Option<Vec<String>>,
    mdns: Option<bool>,
    cores: Option<i64>,
    queue: Option<i64>,
    max_limits: Option<RawLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    fuel: Option<String>,
    memory: Option<String>,
    wall_time: Option<String>,
    output: Option<String>,
    stack: Option<String>,
}

/// A configuration error, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

/// What `spare init` writes: every setting, commented out at its default.
pub const TEMPLATE: &str = r#"# spare node configuration. Flags of `spare up` override these settings.

# Addresses to listen on (TCP and QUIC).
# listen = ["/ip4/0.0.0.0/tcp/4117", "/ip4/0.0.0.0/udp/4117/quic-v1"]

# Peers to connect to at start, e.g. "/ip4/192.0.2.7/tcp/4117/p2p/12D3Koo...".
# bootstrap = []

# Find peers on the local network.
# mdns = true

# Tasks this node runs at once for the swarm (default: every core).
# cores = 2

# Tasks waiting for a core before new ones are refused.
# queue = 256

# The most this node grants one guest (memory defaults to half the machine's
# memory divided among the cores, at most 4GiB).
# [max_limits]
# fuel = "1e13"
# memory = "4GiB"
# wall_time = "24h"
# output = "32MiB"
# stack = "8MiB"
"#;

impl Config {
    /// Reads and validates `path`; a missing file means all defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(ConfigError {
                file: path.display().to_string(),
                line: None,
                message: format!("cannot read: {e}"),
            }),
        }
    }

    /// Parses and validates config text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, ConfigError> {
        let err = |key: &str, message: String| ConfigError {
            file: file.to_owned(),
            line: line_of(text, key),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError {
            file: file.to_owned(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1)),
            message: e.message().to_owned(),
        })?;
        let mut config = Config::default();
        if let Some(listen) = raw.listen {
            config.listen = parse_addrs(&listen).map_err(|m| err("listen", m))?;
        }
        if let Some(bootstrap) = raw.bootstrap {
            config.bootstrap = parse_addrs(&bootstrap).map_err(|m| err("bootstrap", m))?;
        }
        if let Some(mdns) = raw.mdns {
            config.mdns = mdns;
        }
        if let Some(cores) = raw.cores {
            config.cores = check_cores(cores).map_err(|m| err("cores", m))?;
        }
        if let Some(queue) = raw.queue {
            config.queue = u32::try_from(queue)
                .ok()
                .filter(|q| *q <= MAX_QUEUE)
                .ok_or_else(|| {
                    err(
                        "queue",
                        format!("queue = {queue} is not in 0..={MAX_QUEUE}"),
                    )
                })?;
        }
        if let Some(limits) = raw.max_limits {
            let max = &mut config.max_limits;
            let set = |key: &str,
                       value: Option<String>,
                       parse: fn(&str) -> Result<u64, String>,
                       slot: &mut u64| {
                if let Some(value) = value {
                    *slot = parse(&value).map_err(|m| err(key, format!("{key}: {m}")))?;
                }
                Ok::<(), ConfigError>(())
            };
            set(
                "fuel",
                limits.fuel,
                |v| parse_count(v).map_err(|e| e.to_string()),
                &mut max.fuel,
            )?;
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
            max.validate()
                .map_err(|e| err("max_limits", format!("[max_limits]: {e}")))?;
        }
        Ok(config)
    }
}

/// Checks a core count against what the machine has.
pub fn check_cores(cores: i64) -> Result<u16, String> {
    let available = available_cores();
    match u16::try_from(cores) {
        Ok(n) if n >= 1 && n <= available => Ok(n),
        _ => Err(format!(
            "cores = {cores} is not in 1..={available} (this machine has {available})"
        )),
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

/// The first line that sets `key`, 1-based.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('=') || key.starts_with('['))
                || l.starts_with(&format!("[{key}]"))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_all_defaults() {
        assert_eq!(Config::parse(TEMPLATE, "t").unwrap(), Config::default());
    }

    #[test]
    fn values_are_read() {
        let config = Config::parse(
            "listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\ncores = 1\n[max_limits]\nmemory = \"1GiB\"\nwall_time = \"1h\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            config.listen,
            vec!["/ip4/127.0.0.1/tcp/0".parse::<Multiaddr>().unwrap()]
        );
        assert!(!config.mdns);
        assert_eq!(config.cores, 1);
        assert_eq!(config.max_limits.memory, 1 << 30);
        assert_eq!(config.max_limits.wall_ms, 3_600_000);
    }

    #[test]
    fn errors_name_the_line_and_cause() {
        let err = Config::parse("mdns = true\ncores = -1\n", "c.toml").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.to_string().starts_with("c.toml:2: cores = -1"), "{err}");

        let err = Config::parse("[max_limits]\nmemory = \"12 parsecs\"\n", "c.toml").unwrap_err();
        assert_eq!(err.line, Some(2));
        assert!(err.message.contains("unknown unit"), "{err}");

        let err = Config::parse("[max_limits]\nmemory = \"64GiB\"\n", "c.toml").unwrap_err();
        assert!(err.message.contains("above the maximum"), "{err}");

        let err = Config::parse("colour = \"blue\"\n", "c.toml").unwrap_err();
        assert_eq!(err.line, Some(1));
        assert!(err.message.contains("unknown field"), "{err}");

        let err = Config::parse("listen = [\"not an address\"]\n", "c.toml").unwrap_err();
        assert!(err.message.contains("not a multiaddress"), "{err}");
    }
}

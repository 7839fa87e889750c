//! The limits a guest runs under.
//!
//! Every resource a guest controls is bounded by one of these fields or by one
//! of the fixed constants below. A user sets limits within [`Limits::MAX`]
//! ([`LimitRequest`]: the defaults for the rest, which a requester may lower
//! to fit a host); a host refuses anything above its own maximum, naming
//! the field.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::units::{format_bytes, format_duration};

/// Largest number of table elements a guest may have in one table.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;
/// Largest number of instances a guest may create (a component is several).
pub const MAX_INSTANCES: usize = 64;
/// Largest number of linear memories a guest may create.
pub const MAX_MEMORIES: usize = 16;
/// Largest number of tables a guest may create.
pub const MAX_TABLES: usize = 64;
/// Largest number of host resources (streams, pollables, ...) a preview-2
/// guest may hold at once; each costs host memory outside its linear
/// memory. A command needs a handful.
pub const MAX_RESOURCES: usize = 10_000;
/// Largest number of random bytes a guest may ask for in one call: the
/// host makes them in its own memory before copying them in. Rust's
/// `getrandom` asks for a whole buffer at once, so this is generous
/// (wasmtime-wasi's own default).
pub const MAX_RANDOM_BYTES: u64 = 64 << 20;
/// A WebAssembly page: the least memory a guest with a memory has, and the
/// step its memory grows by.
pub const WASM_PAGE_BYTES: u64 = 64 << 10;
/// Largest module or component a host accepts, in bytes.
pub const MAX_MODULE_BYTES: u64 = 64 << 20;
/// Largest stdin a task may carry, in bytes.
pub const MAX_STDIN_BYTES: u64 = 64 << 20;
/// Largest number of arguments a task may pass.
pub const MAX_ARGS: usize = 4096;
/// Largest number of environment variables a task may pass.
pub const MAX_ENV: usize = 1024;
/// Largest total size of all arguments and environment variables, in bytes.
pub const MAX_ARGS_ENV_BYTES: usize = 1 << 20;

/// Resource limits of one task. Each field is enforced by the sandbox on the
/// host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Fuel: roughly one unit per WebAssembly instruction executed. The guest
    /// traps when it runs out.
    pub fuel: u64,
    /// Bytes of linear memory, summed over all memories of the guest.
    pub memory: u64,
    /// Wall-clock time from start of execution, in milliseconds.
    pub wall_ms: u64,
    /// Bytes the guest may write to stdout, and separately to stderr.
    pub output: u64,
    /// Bytes of native stack the guest may use (bounds recursion).
    pub stack: u64,
}

impl Limits {
    /// What a task gets when the user sets nothing: about a minute of CPU.
    pub const DEFAULT: Limits = Limits {
        fuel: 100_000_000_000,
        memory: 256 << 20,
        wall_ms: 120_000,
        output: 8 << 20,
        stack: 1 << 20,
    };

    /// The most any host of this version grants.
    pub const MAX: Limits = Limits {
        fuel: 10_000_000_000_000,
        memory: 4 << 30,
        wall_ms: 24 * 3600 * 1000,
        output: 32 << 20,
        stack: 8 << 20,
    };

    /// The least that makes sense; below these a guest cannot start.
    pub const MIN: Limits = Limits {
        fuel: 1,
        memory: 0,
        wall_ms: 1,
        output: 0,
        stack: 64 << 10,
    };

    /// Checks every field against [`Limits::MIN`] and `max`.
    pub fn check_within(&self, max: &Limits) -> Result<(), LimitError> {
        for limit in Limit::ALL {
            let (value, min, max) = (limit.of(self), limit.of(&Self::MIN), limit.of(max));
            if value < min {
                return Err(LimitError::TooLow {
                    name: limit.name(),
                    value: limit.show(value),
                    min: limit.show(min),
                });
            }
            if value > max {
                return Err(LimitError::TooHigh {
                    name: limit.name(),
                    value: limit.show(value),
                    max: limit.show(max),
                });
            }
        }
        Ok(())
    }

    /// Limits with each field from `value`.
    fn from_fn(value: impl Fn(Limit) -> u64) -> Limits {
        Limits {
            fuel: value(Limit::Fuel),
            memory: value(Limit::Memory),
            wall_ms: value(Limit::WallTime),
            output: value(Limit::Output),
            stack: value(Limit::Stack),
        }
    }

    /// Checks every field against [`Limits::MIN`] and [`Limits::MAX`].
    pub fn validate(&self) -> Result<(), LimitError> {
        self.check_within(&Self::MAX)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl fmt::Display for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "fuel {}, memory {}, wall time {}, output {}, stack {}",
            self.fuel,
            format_bytes(self.memory),
            format_duration(std::time::Duration::from_millis(self.wall_ms)),
            format_bytes(self.output),
            format_bytes(self.stack),
        )
    }
}

/// The limits a user asks for: the ones they set, and for the rest
/// [`Limits::DEFAULT`], which a requester may lower to what a host grants.
/// A user who sets no memory limit wants a task that runs, not one refused
/// by every host that gives less than the default.
///
/// In JSON, each field is optional; a full [`Limits`] reads as a request
/// that sets every field.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fuel: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wall_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack: Option<u64>,
}

impl LimitRequest {
    /// A request that sets every field to `limits`.
    pub fn exactly(limits: Limits) -> Self {
        Self {
            fuel: Some(limits.fuel),
            memory: Some(limits.memory),
            wall_ms: Some(limits.wall_ms),
            output: Some(limits.output),
            stack: Some(limits.stack),
        }
    }

    /// What the user set of `limit`, if anything.
    pub fn get(&self, limit: Limit) -> Option<u64> {
        match limit {
            Limit::Fuel => self.fuel,
            Limit::Memory => self.memory,
            Limit::WallTime => self.wall_ms,
            Limit::Output => self.output,
            Limit::Stack => self.stack,
        }
    }

    /// Whether the user set `limit`.
    pub fn is_set(&self, limit: Limit) -> bool {
        self.get(limit).is_some()
    }

    /// What is asked for, with `fill` where nothing was set.
    fn with(&self, fill: impl Fn(Limit) -> u64) -> Limits {
        Limits::from_fn(|limit| self.get(limit).unwrap_or_else(|| fill(limit)))
    }

    /// How much of the wanted limits `fitted` keeps, summed over the
    /// fields: 5 when it lowers none, less the more it lowers.
    pub fn kept(&self, fitted: &Limits) -> f64 {
        let wanted = self.wanted();
        Limit::ALL
            .iter()
            .map(|limit| limit.of(fitted) as f64 / limit.of(&wanted).max(1) as f64)
            .map(|share| share.min(1.0))
            .sum()
    }

    /// The limits wanted: the defaults where nothing was set.
    pub fn wanted(&self) -> Limits {
        self.with(|limit| limit.of(&Limits::DEFAULT))
    }

    /// The least the request accepts: what was set, and [`Limits::MIN`]
    /// for the rest (one page of memory). A host that grants this can run
    /// the task, with [`fitted`](Self::fitted) limits.
    pub fn least(&self) -> Limits {
        self.with(Limit::least)
    }

    /// The limits for a host that grants at most `max`: what was set, and
    /// each default lowered to `max` where it is above (never below
    /// [`Limits::MIN`], nor memory below one page).
    pub fn fitted(&self, max: &Limits) -> Limits {
        self.with(|limit| {
            limit
                .of(&Limits::DEFAULT)
                .min(limit.of(max))
                .max(limit.least())
        })
    }

    /// Which defaults `fitted` lowered below the wanted ones, in words:
    /// `memory 128 MiB, wall time 30 s`; `None` if none was.
    pub fn lowered(&self, fitted: &Limits) -> Option<String> {
        let wanted = self.wanted();
        let lowered: Vec<String> = Limit::ALL
            .iter()
            .filter(|limit| limit.of(fitted) < limit.of(&wanted))
            .map(|limit| format!("{} {}", limit.name(), limit.show(limit.of(fitted))))
            .collect();
        (!lowered.is_empty()).then(|| lowered.join(", "))
    }
}

/// One of the fields of [`Limits`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Fuel,
    Memory,
    WallTime,
    Output,
    Stack,
}

impl Limit {
    pub const ALL: [Limit; 5] = [
        Limit::Fuel,
        Limit::Memory,
        Limit::WallTime,
        Limit::Output,
        Limit::Stack,
    ];

    /// Its name in messages: `fuel`, `memory`, `wall time`, `output`,
    /// `stack`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Fuel => "fuel",
            Limit::Memory => "memory",
            Limit::WallTime => "wall time",
            Limit::Output => "output",
            Limit::Stack => "stack",
        }
    }

    /// A value of this limit in its unit: `1000`, `64 MiB`, `2 min`.
    pub fn show(self, value: u64) -> String {
        match self {
            Limit::Fuel => value.to_string(),
            Limit::WallTime => format_duration(std::time::Duration::from_millis(value)),
            Limit::Memory | Limit::Output | Limit::Stack => format_bytes(value),
        }
    }

    /// The least of it a request without a value accepts:
    /// [`Limits::MIN`], and one page of memory.
    fn least(self) -> u64 {
        match self {
            Limit::Memory => WASM_PAGE_BYTES,
            other => other.of(&Limits::MIN),
        }
    }

    /// This limit's value in `limits`.
    pub fn of(self, limits: &Limits) -> u64 {
        match self {
            Limit::Fuel => limits.fuel,
            Limit::Memory => limits.memory,
            Limit::WallTime => limits.wall_ms,
            Limit::Output => limits.output,
            Limit::Stack => limits.stack,
        }
    }
}

/// A limit outside what a host grants. Values are shown in their units.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("{name} limit {value} is above the maximum, {max}")]
    TooHigh {
        name: &'static str,
        value: String,
        max: String,
    },
    #[error("{name} limit {value} is below the minimum, {min}")]
    TooLow {
        name: &'static str,
        value: String,
        min: String,
    },
}

impl LimitError {
    /// The limit at fault: `fuel`, `memory`, `wall time`, `output` or
    /// `stack`.
    pub fn name(&self) -> &'static str {
        match self {
            LimitError::TooHigh { name, .. } | LimitError::TooLow { name, .. } => name,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        assert_eq!(Limits::DEFAULT.validate(), Ok(()));
        assert_eq!(Limits::MAX.validate(), Ok(()));
        assert_eq!(Limits::MIN.validate(), Ok(()));
    }

    #[test]
    fn out_of_range_names_the_field() {
        let limits = Limits {
            memory: Limits::MAX.memory + 1,
            ..Limits::DEFAULT
        };
        let err = limits.validate().unwrap_err();
        assert_eq!(err.name(), "memory");
        assert!(err.to_string().starts_with("memory limit"), "{err}");
        let limits = Limits {
            memory: 1 << 40,
            ..Limits::DEFAULT
        };
        assert_eq!(
            limits.validate().unwrap_err().to_string(),
            "memory limit 1 TiB is above the maximum, 4 GiB"
        );
        let limits = Limits {
            stack: 1,
            ..Limits::DEFAULT
        };
        assert_eq!(
            limits.validate().unwrap_err().to_string(),
            "stack limit 1 B is below the minimum, 64 KiB"
        );
        let limits = Limits {
            wall_ms: 0,
            ..Limits::DEFAULT
        };
        assert_eq!(limits.validate().unwrap_err().name(), "wall time");
    }

    #[test]
    fn unset_limits_are_defaults_lowered_to_fit_a_host() {
        let small = Limits {
            memory: 64 << 20,
            wall_ms: 10_000,
            ..Limits::MAX
        };
        let nothing_set = LimitRequest::default();
        assert_eq!(nothing_set.wanted(), Limits::DEFAULT);
        let fitted = nothing_set.fitted(&small);
        assert_eq!(fitted.memory, 64 << 20);
        assert_eq!(fitted.wall_ms, 10_000);
        assert_eq!(fitted.fuel, Limits::DEFAULT.fuel, "never raised");
        assert_eq!(fitted.check_within(&small), Ok(()));
        assert_eq!(
            nothing_set.lowered(&fitted).as_deref(),
            Some("memory 64 MiB, wall time 10 s")
        );
        assert_eq!(nothing_set.lowered(&nothing_set.fitted(&Limits::MAX)), None);

        let memory_set = LimitRequest {
            memory: Some(256 << 20),
            ..LimitRequest::default()
        };
        assert_eq!(
            memory_set.fitted(&small).memory,
            256 << 20,
            "what was set stays"
        );
        assert!(memory_set.least().check_within(&small).is_err());
        assert_eq!(nothing_set.least().check_within(&small), Ok(()));
        assert_eq!(LimitRequest::exactly(small).wanted(), small);
        assert_eq!(
            nothing_set
                .fitted(&Limits {
                    memory: 0,
                    ..Limits::MAX
                })
                .memory,
            WASM_PAGE_BYTES,
            "never fitted below what a guest with memory needs"
        );
        assert_eq!(nothing_set.kept(&Limits::DEFAULT), 5.0);
        assert!(nothing_set.kept(&fitted) < 5.0);
        assert!(memory_set.is_set(Limit::Memory) && !memory_set.is_set(Limit::Fuel));
    }

    #[test]
    fn a_full_limits_object_reads_as_a_request_that_sets_everything() {
        let json = serde_json::to_string(&Limits::DEFAULT).unwrap();
        let request: LimitRequest = serde_json::from_str(&json).unwrap();
        assert_eq!(request, LimitRequest::exactly(Limits::DEFAULT));
        let request: LimitRequest = serde_json::from_str(r#"{"memory": 1048576}"#).unwrap();
        assert_eq!(request.memory, Some(1 << 20));
        assert_eq!(request.fuel, None);
        assert_eq!(
            serde_json::to_string(&LimitRequest::default()).unwrap(),
            "{}"
        );
    }
}

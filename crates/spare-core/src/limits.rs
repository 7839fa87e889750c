//! The limits a guest runs under.
//!
//! Every resource a guest controls is bounded by one of these fields or by one
//! of the fixed constants below. A requester picks limits within
//! [`Limits::MAX`]; a host refuses anything above it, naming the field.

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
        fn bytes(v: u64) -> String {
            format_bytes(v)
        }
        fn millis(v: u64) -> String {
            format_duration(std::time::Duration::from_millis(v))
        }
        fn count(v: u64) -> String {
            v.to_string()
        }
        type Show = fn(u64) -> String;
        let fields: [(&'static str, u64, u64, u64, Show); 5] = [
            ("fuel", self.fuel, Self::MIN.fuel, max.fuel, count),
            ("memory", self.memory, Self::MIN.memory, max.memory, bytes),
            (
                "wall time",
                self.wall_ms,
                Self::MIN.wall_ms,
                max.wall_ms,
                millis,
            ),
            ("output", self.output, Self::MIN.output, max.output, bytes),
            ("stack", self.stack, Self::MIN.stack, max.stack, bytes),
        ];
        for (name, value, min, max, show) in fields {
            if value < min {
                return Err(LimitError::TooLow {
                    name,
                    value: show(value),
                    min: show(min),
                });
            }
            if value > max {
                return Err(LimitError::TooHigh {
                    name,
                    value: show(value),
                    max: show(max),
                });
            }
        }
        Ok(())
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
}

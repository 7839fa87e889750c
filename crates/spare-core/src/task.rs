//! What a requester asks a host to run.

use serde::{Deserialize, Serialize};

use crate::limits::{
    LimitError, MAX_ARGS, MAX_ARGS_ENV_BYTES, MAX_ENV, MAX_MODULE_BYTES, MAX_STDIN_BYTES,
};
use crate::{BlobId, Limits, TaskId};

/// Largest stdin carried inside the task request itself; larger stdin travels
/// as a blob the host fetches.
pub const MAX_INLINE_STDIN: usize = 64 << 10;
/// Longest program name (the guest's `argv[0]`), in bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// A reference to a blob: its hash, and its size so the receiver can refuse
/// before fetching.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    pub id: BlobId,
    pub size: u64,
}

impl BlobRef {
    pub fn of(bytes: &[u8]) -> Self {
        Self {
            id: BlobId::of(bytes),
            size: bytes.len() as u64,
        }
    }
}

/// The guest's standard input.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum Stdin {
    /// End of file at once.
    #[default]
    Empty,
    /// Small input, carried in the request.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Large input, fetched by the host from the requester.
    Blob(BlobRef),
}

impl Stdin {
    /// Chooses inline or blob for `bytes` by size.
    pub fn for_bytes(bytes: &[u8]) -> Self {
        if bytes.is_empty() {
            Stdin::Empty
        } else if bytes.len() <= MAX_INLINE_STDIN {
            Stdin::Inline(bytes.to_vec())
        } else {
            Stdin::Blob(BlobRef::of(bytes))
        }
    }
}

/// A batch task: one WebAssembly program run to completion.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Chosen by the requester; names the task on both sides.
    pub id: TaskId,
    /// The guest's `argv[0]`, usually the module's file name.
    pub name: String,
    /// The module (WASI preview 1) or component (WASI preview 2).
    pub module: BlobRef,
    /// `argv[1..]`.
    #[serde(deserialize_with = "at_most::<_, _, MAX_ARGS>")]
    pub args: Vec<String>,
    /// The whole environment the guest sees; nothing of the host's leaks in.
    #[serde(deserialize_with = "at_most::<_, _, MAX_ENV>")]
    pub env: Vec<(String, String)>,
    pub stdin: Stdin,
    pub limits: Limits,
}

/// Decodes a sequence of at most `MAX` elements, refusing a longer one as
/// soon as it passes the bound: a 2 MiB request of two million empty
/// arguments would otherwise become 48 MiB of `String`s before validation
/// saw it.
fn at_most<'de, D, T, const MAX: usize>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Bounded<T, const MAX: usize>(std::marker::PhantomData<T>);

    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for Bounded<T, MAX> {
        type Value = Vec<T>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a sequence of at most {MAX} elements")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(64));
            while let Some(item) = seq.next_element()? {
                if items.len() == MAX {
                    return Err(serde::de::Error::custom(format!(
                        "more than {MAX} elements"
                    )));
                }
                items.push(item);
            }
            Ok(items)
        }
    }

    deserializer.deserialize_seq(Bounded::<T, MAX>(std::marker::PhantomData))
}

/// Why a task spec is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Limits(#[from] LimitError),
    #[error("the module is {size} bytes, more than the maximum {max}")]
    ModuleTooLarge { size: u64, max: u64 },
    #[error("stdin is {size} bytes, more than the maximum {max}")]
    StdinTooLarge { size: u64, max: u64 },
    #[error("inline stdin is {size} bytes, more than the maximum {max}")]
    InlineStdinTooLarge { size: usize, max: usize },
    #[error("{count} arguments, more than the maximum {max}")]
    TooManyArgs { count: usize, max: usize },
    #[error("{count} environment variables, more than the maximum {max}")]
    TooManyEnv { count: usize, max: usize },
    #[error("arguments and environment take {size} bytes, more than the maximum {max}")]
    ArgsEnvTooLarge { size: usize, max: usize },
    #[error("the program name is longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("{0} contains a NUL byte")]
    Nul(&'static str),
    #[error("environment variable name `{0}` is empty or contains `=`")]
    BadEnvName(String),
}

impl TaskSpec {
    /// The memory its parts of variable size take (name, args, env and
    /// inline stdin), which a host holds while the task waits or runs.
    pub fn held_bytes(&self) -> usize {
        let string = std::mem::size_of::<String>();
        let args: usize = self.args.iter().map(|a| a.len() + string).sum();
        let env: usize = self
            .env
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * string)
            .sum();
        let stdin = match &self.stdin {
            Stdin::Inline(bytes) => bytes.len(),
            Stdin::Empty | Stdin::Blob(_) => 0,
        };
        self.name.len() + args + env + stdin
    }

    /// Checks every bound a host relies on. Cheap; run on every request.
    pub fn validate(&self) -> Result<(), SpecError> {
        self.limits.validate()?;
        if self.module.size > MAX_MODULE_BYTES {
            return Err(SpecError::ModuleTooLarge {
                size: self.module.size,
                max: MAX_MODULE_BYTES,
            });
        }
        match &self.stdin {
            Stdin::Empty => {}
            Stdin::Inline(bytes) if bytes.len() > MAX_INLINE_STDIN => {
                return Err(SpecError::InlineStdinTooLarge {
                    size: bytes.len(),
                    max: MAX_INLINE_STDIN,
                });
            }
            Stdin::Inline(_) => {}
            Stdin::Blob(blob) if blob.size > MAX_STDIN_BYTES => {
                return Err(SpecError::StdinTooLarge {
                    size: blob.size,
                    max: MAX_STDIN_BYTES,
                });
            }
            Stdin::Blob(_) => {}
        }
        if self.name.len() > MAX_NAME_BYTES {
            return Err(SpecError::NameTooLong);
        }
        if self.name.contains('\0') {
            return Err(SpecError::Nul("the program name"));
        }
        if self.args.len() > MAX_ARGS {
            return Err(SpecError::TooManyArgs {
                count: self.args.len(),
                max: MAX_ARGS,
            });
        }
        if self.env.len() > MAX_ENV {
            return Err(SpecError::TooManyEnv {
                count: self.env.len(),
                max: MAX_ENV,
            });
        }
        let size: usize = self.args.iter().map(String::len).sum::<usize>()
            + self
                .env
                .iter()
                .map(|(k, v)| k.len() + v.len() + 1)
                .sum::<usize>();
        if size > MAX_ARGS_ENV_BYTES {
            return Err(SpecError::ArgsEnvTooLarge {
                size,
                max: MAX_ARGS_ENV_BYTES,
            });
        }
        if self.args.iter().any(|a| a.contains('\0')) {
            return Err(SpecError::Nul("an argument"));
        }
        for (key, value) in &self.env {
            if key.is_empty() || key.contains('=') {
                return Err(SpecError::BadEnvName(key.clone()));
            }
            if key.contains('\0') || value.contains('\0') {
                return Err(SpecError::Nul("an environment variable"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> TaskSpec {
        TaskSpec {
            id: TaskId::from_bytes([7; 16]),
            name: "primes.wasm".into(),
            module: BlobRef::of(b"\0asm\x01\0\0\0"),
            args: vec!["100".into()],
            env: vec![("GREETING".into(), "hi".into())],
            stdin: Stdin::for_bytes(b"1 2 3\n"),
            limits: Limits::DEFAULT,
        }
    }

    /// More arguments than the bound are refused while decoding, before
    /// they are all made; up to the bound they decode, for validation.
    #[test]
    fn decoding_stops_at_the_argument_bound() {
        let encode = |spec: &TaskSpec| {
            let mut bytes = Vec::new();
            ciborium::into_writer(spec, &mut bytes).unwrap();
            bytes
        };
        let decode = |bytes: &[u8]| ciborium::from_reader::<TaskSpec, _>(bytes);
        let mut spec = sample();
        spec.args = vec![String::new(); MAX_ARGS];
        assert_eq!(decode(&encode(&spec)).unwrap(), spec);
        spec.args.push(String::new());
        let err = decode(&encode(&spec)).unwrap_err().to_string();
        assert!(err.contains("more than 4096 elements"), "{err}");

        let mut spec = sample();
        spec.env = vec![("A".into(), String::new()); MAX_ENV + 1];
        let err = decode(&encode(&spec)).unwrap_err().to_string();
        assert!(err.contains("more than 1024 elements"), "{err}");
    }

    #[test]
    fn sample_is_valid() {
        assert_eq!(sample().validate(), Ok(()));
    }

    #[test]
    fn bounds_are_enforced() {
        let mut spec = sample();
        spec.env.push(("A=B".into(), "x".into()));
        assert_eq!(spec.validate(), Err(SpecError::BadEnvName("A=B".into())));

        let mut spec = sample();
        spec.args = vec![String::new(); MAX_ARGS + 1];
        assert!(matches!(
            spec.validate(),
            Err(SpecError::TooManyArgs { .. })
        ));

        let mut spec = sample();
        spec.args = vec!["x".repeat(MAX_ARGS_ENV_BYTES + 1)];
        assert!(matches!(
            spec.validate(),
            Err(SpecError::ArgsEnvTooLarge { .. })
        ));

        let mut spec = sample();
        spec.stdin = Stdin::Inline(vec![0; MAX_INLINE_STDIN + 1]);
        assert!(matches!(
            spec.validate(),
            Err(SpecError::InlineStdinTooLarge { .. })
        ));

        let mut spec = sample();
        spec.module.size = MAX_MODULE_BYTES + 1;
        assert!(matches!(
            spec.validate(),
            Err(SpecError::ModuleTooLarge { .. })
        ));
    }

    #[test]
    fn stdin_goes_inline_when_small() {
        assert_eq!(Stdin::for_bytes(b""), Stdin::Empty);
        assert!(matches!(Stdin::for_bytes(b"abc"), Stdin::Inline(_)));
        assert!(matches!(
            Stdin::for_bytes(&vec![1; MAX_INLINE_STDIN + 1]),
            Stdin::Blob(_)
        ));
    }
}

//! Content and task identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The BLAKE3 hash of a blob's bytes: modules, stdin, outputs.
///
/// Blobs are content-addressed, so whoever holds the bytes can serve them and
/// the receiver verifies them against this id on arrival.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(#[serde(with = "serde_bytes")] [u8; 32]);

impl BlobId {
    /// The id of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// Wraps a hash computed elsewhere (for example by a streaming hasher).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// A task's identifier, chosen at random by the requester.
///
/// Random rather than derived from content: running the same module twice is
/// two tasks.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(#[serde(with = "serde_bytes")] [u8; 16]);

impl TaskId {
    /// A fresh random id.
    pub fn random() -> Self {
        Self(rand::random())
    }

    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Result<[u8; N], ParseIdError> {
    if s.len() != N * 2 {
        return Err(ParseIdError::Length {
            expected: N * 2,
            found: s.len(),
        });
    }
    let mut out = [0u8; N];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(chunk).map_err(|_| ParseIdError::NotHex)?;
        out[i] = u8::from_str_radix(pair, 16).map_err(|_| ParseIdError::NotHex)?;
    }
    Ok(out)
}

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseIdError {
    /// the id has {found} hex digits, expected {expected}
    #[error("the id has {found} hex digits, expected {expected}")]
    Length { expected: usize, found: usize },
    /// the id is not hexadecimal
    #[error("the id is not hexadecimal")]
    NotHex,
}

macro_rules! hex_id {
    ($ty:ident, $n:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex(&self.0))
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($ty), hex(&self.0[..6]))
            }
        }
        impl FromStr for $ty {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                unhex::<$n>(s).map(Self)
            }
        }
    };
}
hex_id!(BlobId, 32);
hex_id!(TaskId, 16);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_id_round_trips_through_hex() {
        let id = BlobId::of(b"hello");
        let text = id.to_string();
        assert_eq!(text.len(), 64);
        assert_eq!(text.parse::<BlobId>(), Ok(id));
    }

    #[test]
    fn bad_ids_name_the_problem() {
        assert_eq!(
            "abc".parse::<TaskId>(),
            Err(ParseIdError::Length {
                expected: 32,
                found: 3
            })
        );
        assert_eq!("zz".repeat(16).parse::<TaskId>(), Err(ParseIdError::NotHex));
    }

    #[test]
    fn random_task_ids_differ() {
        assert_ne!(TaskId::random(), TaskId::random());
    }
}

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

/// A task's identifier, chosen by the requester: the millisecond it was
/// made (48 bits, big-endian) followed by 80 random bits.
///
/// Random rather than derived from content: running the same module twice is
/// two tasks. The time prefix keeps a node's ids in creation order, so its
/// ledger appends to the end of its indexes instead of touching a random
/// page of them for every task; 80 random bits keep ids from colliding
/// however many tasks share a millisecond. Nothing trusts an id to be
/// secret: a host files tasks under their requester's peer id.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(#[serde(with = "serde_bytes")] [u8; 16]);

impl TaskId {
    /// A fresh id: now, then random bits.
    pub fn random() -> Self {
        Self::at(crate::now_ms(), rand::random())
    }

    /// The id made at `ms` (Unix milliseconds; only the low 48 bits count)
    /// with random part `random`.
    pub fn at(ms: u64, random: [u8; 10]) -> Self {
        let mut bytes = [0; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        bytes[6..].copy_from_slice(&random);
        Self(bytes)
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

    #[test]
    fn task_ids_sort_by_the_millisecond_they_were_made() {
        let (early, late) = (TaskId::at(1_000, [0xff; 10]), TaskId::at(1_001, [0; 10]));
        assert!(early < late);
        // Text sorts as the bytes do, so the ledger's text keys keep the order.
        assert!(early.to_string() < late.to_string());
        let a_second_ago = TaskId::at(crate::now_ms() - 1_000, [0xff; 10]);
        assert!(TaskId::random() > a_second_ago);
    }
}

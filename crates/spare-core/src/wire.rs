//! The messages peers exchange, their size bounds, and their codec.
//!
//! Every message type implements [`Message`]: a hard size bound checked
//! before decoding, and a semantic check run right after. [`decode`] is the
//! only way bytes from a peer become a value, so a message that is oversized,
//! malformed or out of bounds is an error here and never a panic elsewhere.
//! The property tests at the bottom feed it arbitrary bytes.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::limits::MAX_MODULE_BYTES;
use crate::outcome::{MAX_DETAIL_BYTES, clip_detail};
use crate::receipt::MAX_RECEIPT_BYTES;
use crate::task::SpecError;
use crate::{BlobId, Limits, Outcome, SignedReceipt, TaskId, TaskSpec};

/// Protocol for running and cancelling tasks: requests and answers as
/// length-prefixed frames on reused streams (`spare-net`'s `tasks.rs`).
pub const TASK_PROTOCOL: &str = "/spare/task/2";
/// Request-response protocol for fetching blob chunks.
pub const BLOB_PROTOCOL: &str = "/spare/blob/1";
/// Gossipsub topic on which nodes publish their [`Offer`].
pub const OFFER_TOPIC: &str = "spare/offers/1";

/// Largest blob chunk requested or served at once.
pub const MAX_BLOB_CHUNK: u32 = 1 << 20;

/// A message that crosses the wire between peers.
pub trait Message: Serialize + DeserializeOwned {
    /// Largest encoding accepted, in bytes.
    const MAX_BYTES: usize;
    /// What a well-formed message promises beyond its type.
    fn validate(&self) -> Result<(), String>;
}

/// Why bytes from a peer were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("message of {size} bytes exceeds the {max}-byte bound")]
    TooLarge { size: usize, max: usize },
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("invalid message: {0}")]
    Invalid(String),
}

/// Encodes `msg`, refusing to produce anything the receiver would refuse.
pub fn encode<M: Message>(msg: &M) -> Result<Vec<u8>, WireError> {
    msg.validate().map_err(WireError::Invalid)?;
    let mut out = Vec::new();
    ciborium::into_writer(msg, &mut out).map_err(|e| WireError::Malformed(e.to_string()))?;
    if out.len() > M::MAX_BYTES {
        return Err(WireError::TooLarge {
            size: out.len(),
            max: M::MAX_BYTES,
        });
    }
    Ok(out)
}

/// Decodes and validates bytes received from a peer.
pub fn decode<M: Message>(bytes: &[u8]) -> Result<M, WireError> {
    if bytes.len() > M::MAX_BYTES {
        return Err(WireError::TooLarge {
            size: bytes.len(),
            max: M::MAX_BYTES,
        });
    }
    let msg: M = ciborium::from_reader(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    msg.validate().map_err(WireError::Invalid)?;
    Ok(msg)
}

/// A requester's message to a host on [`TASK_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskRequest {
    /// Run this task; the response comes when it has finished.
    Run(TaskSpec),
    /// Stop a task this requester asked for earlier.
    Cancel(TaskId),
}

/// A host's answer on [`TASK_PROTOCOL`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskResponse {
    /// The task ran (or was stopped by the sandbox); here is how it ended.
    Done(Report),
    /// The host did not run the task. The requester may try elsewhere.
    Refused(Refusal),
    /// Answer to [`TaskRequest::Cancel`]: whether a running task was found.
    Cancelled(bool),
}

/// How a task ended on its host, with the host's signed receipt.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub task: TaskId,
    pub outcome: Outcome,
    pub receipt: SignedReceipt,
}

/// Why a host did not run a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("the host is busy ({queued} tasks queued)")]
    Busy { queued: u32 },
    #[error("the host is overloaded and takes no requests now")]
    Overloaded,
    #[error("the host refused the task: {0}")]
    Invalid(String),
    #[error("the host could not get the task's inputs: {0}")]
    BlobUnavailable(String),
    #[error("the host is shutting down")]
    ShuttingDown,
    #[error("the host did not run it: {0}")]
    Unavailable(String),
    /// The host's owner needed the machine for longer than the host lets
    /// a task wait; the task may have run part of the way.
    #[error("handed back by the host: {0}")]
    HandedBack(String),
}

impl Refusal {
    pub fn invalid(err: &SpecError) -> Self {
        Refusal::Invalid(clip_detail(err.to_string()))
    }
}

impl Message for TaskRequest {
    /// A spec carries at most 1 MiB of args and env and 64 KiB of stdin.
    const MAX_BYTES: usize = 2 << 20;

    fn validate(&self) -> Result<(), String> {
        match self {
            TaskRequest::Run(spec) => spec.validate().map_err(|e| e.to_string()),
            TaskRequest::Cancel(_) => Ok(()),
        }
    }
}

/// Room in an answer for everything but the task's output: the receipt,
/// the outcome's other fields, a refusal's detail, the framing.
const ANSWER_ROOM: usize = 64 << 10;

impl TaskResponse {
    /// The largest answer a task run within `limits` can honestly get: its
    /// two output streams at its own output limit, and room for the rest.
    /// A requester reads no more; a host reserves this much before it runs
    /// the task.
    pub fn bound_for(limits: &Limits) -> usize {
        usize::try_from(limits.output)
            .unwrap_or(usize::MAX)
            .saturating_mul(2)
            .saturating_add(ANSWER_ROOM)
            .min(Self::MAX_BYTES)
    }

    /// The largest answer to a cancel (or any refusal): no output.
    pub const SMALL_BYTES: usize = ANSWER_ROOM;
}

impl Message for TaskResponse {
    /// Two output streams at the largest limit, plus room for the rest.
    const MAX_BYTES: usize = 2 * Limits::MAX.output as usize + ANSWER_ROOM;

    fn validate(&self) -> Result<(), String> {
        match self {
            TaskResponse::Done(report) => {
                report.outcome.validate()?;
                if report.receipt.body.len() > MAX_RECEIPT_BYTES {
                    return Err("receipt too large".into());
                }
                Ok(())
            }
            TaskResponse::Refused(refusal) => match refusal {
                Refusal::Invalid(t)
                | Refusal::BlobUnavailable(t)
                | Refusal::Unavailable(t)
                | Refusal::HandedBack(t)
                    if t.len() > MAX_DETAIL_BYTES =>
                {
                    Err("refusal detail too long".into())
                }
                _ => Ok(()),
            },
            TaskResponse::Cancelled(_) => Ok(()),
        }
    }
}

/// A request on [`BLOB_PROTOCOL`] for `len` bytes of blob `id` from `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    pub id: BlobId,
    pub offset: u64,
    pub len: u32,
}

/// The answer to a [`BlobRequest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobResponse {
    /// Bytes from the requested offset, and the blob's total size.
    Chunk {
        total: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// This peer does not have the blob, or will not share it with the asker.
    NotFound,
    /// This peer is too busy to answer now.
    Busy,
    /// The request was malformed.
    Invalid(String),
}

impl Message for BlobRequest {
    const MAX_BYTES: usize = 128;

    fn validate(&self) -> Result<(), String> {
        if self.len == 0 || self.len > MAX_BLOB_CHUNK {
            return Err(format!(
                "chunk length {} not in 1..={MAX_BLOB_CHUNK}",
                self.len
            ));
        }
        if self.offset >= MAX_MODULE_BYTES.max(crate::limits::MAX_STDIN_BYTES) {
            return Err(format!("offset {} beyond any blob", self.offset));
        }
        Ok(())
    }
}

impl Message for BlobResponse {
    const MAX_BYTES: usize = MAX_BLOB_CHUNK as usize + 128;

    fn validate(&self) -> Result<(), String> {
        match self {
            BlobResponse::Chunk { total, data } => {
                if data.len() > MAX_BLOB_CHUNK as usize {
                    return Err("chunk larger than the maximum".into());
                }
                if (data.len() as u64) > *total {
                    return Err("chunk larger than its blob".into());
                }
                Ok(())
            }
            BlobResponse::NotFound | BlobResponse::Busy => Ok(()),
            BlobResponse::Invalid(why) if why.len() > MAX_DETAIL_BYTES => {
                Err("detail too long".into())
            }
            BlobResponse::Invalid(_) => Ok(()),
        }
    }
}

/// What a runtime is called in offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Runtime {
    /// WASI preview 1 modules and preview 2 components on wasmtime.
    Wasm,
}

/// What a node can give the swarm right now, published on [`OFFER_TOPIC`].
///
/// The publisher is the gossipsub message's signed source, so an offer does
/// not name its node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// Cores this node contributes: it runs this many tasks at once.
    pub cores: u16,
    /// Of those, how many are idle now.
    pub idle: u16,
    /// Tasks waiting for a core.
    pub queued: u32,
    /// The most linear memory one guest may have here, in bytes.
    pub memory: u64,
    pub runtimes: Vec<Runtime>,
    /// The largest limits this host grants.
    pub max_limits: Limits,
    /// Increases with every offer this node publishes; older ones are stale.
    pub seq: u64,
    /// Why the node gives nothing right now; only with `cores == 0`.
    /// Absent in offers from nodes that predate it.
    #[serde(default)]
    pub paused: Option<Pause>,
}

/// Why a node's owner has it give nothing right now. Requesters say it to
/// their users while they wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pause {
    /// The owner is using the machine, or did within the cool-down.
    OwnerActive,
    /// Outside the time windows the owner set.
    OutsideWindows,
    /// On battery, and the owner gives only on AC power.
    OnBattery,
    /// A cause this node does not know, from a newer peer.
    #[serde(other)]
    Other,
}

impl Pause {
    /// `owner active`, for humans.
    pub fn describe(self) -> &'static str {
        match self {
            Self::OwnerActive => "owner active",
            Self::OutsideWindows => "outside its time windows",
            Self::OnBattery => "on battery",
            Self::Other => "paused by its owner",
        }
    }
}

/// Largest number of runtimes an offer may list.
pub const MAX_OFFER_RUNTIMES: usize = 8;

impl Message for Offer {
    const MAX_BYTES: usize = 1024;

    fn validate(&self) -> Result<(), String> {
        if self.idle > self.cores {
            return Err(format!("{} idle cores of {}", self.idle, self.cores));
        }
        if self.runtimes.len() > MAX_OFFER_RUNTIMES {
            return Err("too many runtimes".into());
        }
        if self.paused.is_some() && self.cores > 0 {
            return Err(format!("paused, yet offers {} cores", self.cores));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::{Failure, OutputStream, Status};
    use crate::task::{BlobRef, Stdin};
    use proptest::prelude::*;

    fn report() -> Report {
        Report {
            task: TaskId::from_bytes([3; 16]),
            outcome: Outcome {
                status: Status::Exited(3),
                stdout: b"out".to_vec(),
                stderr: b"err".to_vec(),
                fuel: 99,
                wall_ms: 1,
            },
            receipt: SignedReceipt {
                body: vec![1, 2, 3],
                host_key: vec![4],
                signature: vec![5],
            },
        }
    }

    #[test]
    fn round_trips() {
        let spec = crate::task::tests::sample();
        let req = TaskRequest::Run(spec);
        assert_eq!(decode::<TaskRequest>(&encode(&req).unwrap()), Ok(req));
        let resp = TaskResponse::Done(report());
        assert_eq!(decode::<TaskResponse>(&encode(&resp).unwrap()), Ok(resp));
        let refused = TaskResponse::Refused(Refusal::Busy { queued: 4 });
        assert_eq!(
            decode::<TaskResponse>(&encode(&refused).unwrap()),
            Ok(refused)
        );
    }

    #[test]
    fn refusal_details_round_trip_within_their_bound_and_not_beyond() {
        let refusals: [fn(String) -> Refusal; 4] = [
            Refusal::Invalid,
            Refusal::BlobUnavailable,
            Refusal::Unavailable,
            Refusal::HandedBack,
        ];
        for refusal in refusals {
            let fits = TaskResponse::Refused(refusal("d".repeat(MAX_DETAIL_BYTES)));
            let bytes = encode(&fits).unwrap();
            assert_eq!(decode::<TaskResponse>(&bytes), Ok(fits));
            let long = TaskResponse::Refused(refusal("d".repeat(MAX_DETAIL_BYTES + 1)));
            let mut bytes = Vec::new();
            ciborium::into_writer(&long, &mut bytes).unwrap();
            assert!(matches!(
                decode::<TaskResponse>(&bytes),
                Err(WireError::Invalid(_))
            ));
        }
    }

    #[test]
    fn oversized_input_is_refused_before_decoding() {
        let bytes = vec![0u8; BlobRequest::MAX_BYTES + 1];
        assert!(matches!(
            decode::<BlobRequest>(&bytes),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn invalid_values_are_refused_after_decoding() {
        let req = BlobRequest {
            id: BlobId::of(b""),
            offset: 0,
            len: MAX_BLOB_CHUNK + 1,
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&req, &mut bytes).unwrap();
        assert!(matches!(
            decode::<BlobRequest>(&bytes),
            Err(WireError::Invalid(_))
        ));

        let offer = Offer {
            cores: 1,
            idle: 2,
            queued: 0,
            memory: 0,
            runtimes: vec![Runtime::Wasm],
            max_limits: Limits::MAX,
            seq: 1,
            paused: None,
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&offer, &mut bytes).unwrap();
        assert!(matches!(
            decode::<Offer>(&bytes),
            Err(WireError::Invalid(_))
        ));

        let paused_yet_giving = Offer {
            idle: 0,
            paused: Some(Pause::OwnerActive),
            ..offer
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&paused_yet_giving, &mut bytes).unwrap();
        assert!(matches!(
            decode::<Offer>(&bytes),
            Err(WireError::Invalid(_))
        ));
    }

    /// Offers without `paused` (older nodes) still decode, and a cause
    /// this node does not know is kept as `Other`, not refused.
    #[test]
    fn offers_old_and_new_decode() {
        /// An offer as another build writes it: without `paused` when
        /// `None` (an older node), or with any cause (a newer one).
        #[derive(Serialize)]
        struct Foreign {
            cores: u16,
            idle: u16,
            queued: u32,
            memory: u64,
            runtimes: Vec<Runtime>,
            max_limits: Limits,
            seq: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            paused: Option<&'static str>,
        }
        let decode_with = |cores: u16, paused: Option<&'static str>| {
            let offer = Foreign {
                cores,
                idle: 0,
                queued: 0,
                memory: 1 << 20,
                runtimes: vec![Runtime::Wasm],
                max_limits: Limits::MAX,
                seq: 7,
                paused,
            };
            let mut bytes = Vec::new();
            ciborium::into_writer(&offer, &mut bytes).unwrap();
            decode::<Offer>(&bytes).unwrap()
        };
        let old = decode_with(2, None);
        assert_eq!((old.cores, old.paused), (2, None));
        assert_eq!(
            decode_with(0, Some("solar_eclipse")).paused,
            Some(Pause::Other)
        );
        assert_eq!(
            decode_with(0, Some("on_battery")).paused,
            Some(Pause::OnBattery)
        );
    }

    fn arb_limits() -> impl Strategy<Value = Limits> {
        (
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(fuel, memory, wall_ms, output, stack)| Limits {
                fuel,
                memory,
                wall_ms,
                output,
                stack,
            })
    }

    fn arb_spec() -> impl Strategy<Value = TaskSpec> {
        (
            any::<[u8; 16]>(),
            ".{0,20}",
            any::<[u8; 32]>(),
            any::<u64>(),
            prop::collection::vec(".{0,10}", 0..5),
            prop::collection::vec((".{0,8}", ".{0,8}"), 0..5),
            prop::collection::vec(any::<u8>(), 0..64),
            arb_limits(),
        )
            .prop_map(
                |(id, name, module, size, args, env, stdin, limits)| TaskSpec {
                    id: TaskId::from_bytes(id),
                    name,
                    module: BlobRef {
                        id: BlobId::from_bytes(module),
                        size,
                    },
                    args,
                    env,
                    stdin: Stdin::for_bytes(&stdin),
                    limits,
                },
            )
    }

    fn arb_failure() -> impl Strategy<Value = Failure> {
        prop_oneof![
            ".{0,30}".prop_map(Failure::Trap),
            ".{0,30}".prop_map(Failure::Invalid),
            any::<u64>().prop_map(|limit| Failure::OutOfFuel { limit }),
            any::<u64>().prop_map(|limit| Failure::OutputLimit {
                stream: OutputStream::Stderr,
                limit
            }),
            Just(Failure::Cancelled),
        ]
    }

    /// An answer, blob message or offer (valid or not, as a peer may send
    /// it), encoded: mutated, it gets past the first CBOR header, where
    /// random bytes rarely do.
    fn arb_other_message() -> impl Strategy<Value = Vec<u8>> {
        fn raw(message: &impl Serialize) -> Vec<u8> {
            let mut bytes = Vec::new();
            ciborium::into_writer(message, &mut bytes).unwrap();
            bytes
        }
        let detail = ".{0,40}";
        let response = prop_oneof![
            (arb_failure(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(f, out)| {
                let mut r = report();
                r.outcome.status = Status::Failed(f);
                r.outcome.stdout = out;
                TaskResponse::Done(r)
            }),
            any::<u32>().prop_map(|queued| TaskResponse::Refused(Refusal::Busy { queued })),
            detail.prop_map(|t| TaskResponse::Refused(Refusal::HandedBack(t))),
            any::<bool>().prop_map(TaskResponse::Cancelled),
        ]
        .prop_map(|m| raw(&m));
        let blob = prop_oneof![
            (any::<[u8; 32]>(), any::<u64>(), any::<u32>()).prop_map(|(id, offset, len)| {
                raw(&BlobRequest {
                    id: BlobId::from_bytes(id),
                    offset,
                    len,
                })
            }),
            (any::<u64>(), prop::collection::vec(any::<u8>(), 0..64))
                .prop_map(|(total, data)| raw(&BlobResponse::Chunk { total, data })),
            detail.prop_map(|t| raw(&BlobResponse::Invalid(t))),
        ];
        let offer = (
            any::<u16>(),
            any::<u32>(),
            any::<u64>(),
            arb_limits(),
            any::<u64>(),
        )
            .prop_map(|(cores, queued, memory, max_limits, seq)| {
                let offer = Offer {
                    cores,
                    idle: cores / 2,
                    queued,
                    memory,
                    runtimes: vec![Runtime::Wasm],
                    max_limits,
                    seq,
                    paused: (cores == 0).then_some(Pause::OwnerActive),
                };
                raw(&offer)
            });
        prop_oneof![response, blob, offer]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
            let _ = decode::<TaskRequest>(&bytes);
            let _ = decode::<TaskResponse>(&bytes);
            let _ = decode::<BlobRequest>(&bytes);
            let _ = decode::<BlobResponse>(&bytes);
            let _ = decode::<Offer>(&bytes);
        }

        #[test]
        fn specs_round_trip_or_are_refused_by_validation(spec in arb_spec()) {
            let req = TaskRequest::Run(spec.clone());
            match (spec.validate(), encode(&req)) {
                (Ok(()), Ok(bytes)) => prop_assert_eq!(decode::<TaskRequest>(&bytes), Ok(req)),
                (Err(_), Err(WireError::Invalid(_))) => {
                    // A hostile peer sends it all the same.
                    let mut bytes = Vec::new();
                    ciborium::into_writer(&req, &mut bytes).unwrap();
                    let decoded = decode::<TaskRequest>(&bytes);
                    prop_assert!(matches!(decoded, Err(WireError::Invalid(_))));
                }
                (valid, encoded) => prop_assert!(false, "{valid:?} but {encoded:?}"),
            }
        }

        #[test]
        fn mutated_valid_messages_never_panic(
            spec in arb_spec(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = encode(&TaskRequest::Run(spec)).unwrap_or_default();
            if !bytes.is_empty() {
                for (index, value) in flips {
                    let i = index.index(bytes.len());
                    bytes[i] = value;
                }
            }
            let _ = decode::<TaskRequest>(&bytes);
        }

        #[test]
        fn mutated_answers_blobs_and_offers_never_panic(
            message in arb_other_message(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = message.clone();
            for (index, value) in flips {
                let i = index.index(bytes.len());
                bytes[i] = value;
            }
            let _ = decode::<TaskResponse>(&bytes);
            let _ = decode::<BlobRequest>(&bytes);
            let _ = decode::<BlobResponse>(&bytes);
            let _ = decode::<Offer>(&bytes);
        }

        #[test]
        fn failures_round_trip(failure in arb_failure(), code in any::<i32>(), out in prop::collection::vec(any::<u8>(), 0..100)) {
            for status in [Status::Exited(code), Status::Failed(failure.clone())] {
                let mut r = report();
                r.outcome.status = status;
                r.outcome.stdout = out.clone();
                let resp = TaskResponse::Done(r);
                prop_assert_eq!(decode::<TaskResponse>(&encode(&resp).unwrap()), Ok(resp));
            }
        }
    }
}

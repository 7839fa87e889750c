//! Receipts: a host's signed statement of work it did for a requester.
//!
//! The credit system builds on these. A receipt is signed by the host's node
//! key over its CBOR encoding, so anyone holding it can check who issued it
//! and that it was not altered.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::{BlobId, TaskId};

/// Signatures are over this prefix followed by the body, so a receipt
/// signature can never be replayed as a signature over anything else.
const DOMAIN: &[u8] = b"spare/receipt/v1\0";
/// Largest encoded receipt body a verifier accepts.
pub const MAX_RECEIPT_BYTES: usize = 1024;

/// Work done by a host for a requester.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub task: TaskId,
    pub requester: PeerId,
    pub host: PeerId,
    pub module: BlobId,
    /// Fuel consumed.
    pub fuel: u64,
    /// Wall time of execution, milliseconds.
    pub wall_ms: u64,
    /// The guest's exit code, or `None` if the sandbox stopped it.
    pub exit_code: Option<i32>,
    /// When the task finished, ms since the Unix epoch (host clock).
    pub finished_ms: u64,
}

/// A receipt with the host's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedReceipt {
    /// CBOR encoding of the [`Receipt`]; signed as is, so re-encoding
    /// differences can never break verification.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// The host's public key, protobuf-encoded (libp2p's format).
    #[serde(with = "serde_bytes")]
    pub host_key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// Why a receipt does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReceiptError {
    #[error("receipt is larger than {MAX_RECEIPT_BYTES} bytes")]
    TooLarge,
    #[error("receipt body does not decode: {0}")]
    Decode(String),
    #[error("receipt carries an invalid public key")]
    BadKey,
    #[error("receipt is signed by {signer}, not by its host {host}")]
    WrongSigner { signer: String, host: String },
    #[error("receipt signature is invalid")]
    BadSignature,
    #[error("could not sign receipt: {0}")]
    Sign(String),
}

impl SignedReceipt {
    /// Signs `receipt` with the host's `key`.
    pub fn sign(receipt: &Receipt, key: &Keypair) -> Result<Self, ReceiptError> {
        let mut body = Vec::with_capacity(256);
        ciborium::into_writer(receipt, &mut body).map_err(|e| ReceiptError::Sign(e.to_string()))?;
        let signature = key
            .sign(&signed_bytes(&body))
            .map_err(|e| ReceiptError::Sign(e.to_string()))?;
        Ok(Self {
            body,
            host_key: key.public().encode_protobuf(),
            signature,
        })
    }

    /// Checks the signature and that the signer is the receipt's host, and
    /// returns the receipt.
    pub fn verify(&self) -> Result<Receipt, ReceiptError> {
        if self.body.len() > MAX_RECEIPT_BYTES
            || self.host_key.len() > MAX_RECEIPT_BYTES
            || self.signature.len() > MAX_RECEIPT_BYTES
        {
            return Err(ReceiptError::TooLarge);
        }
        let receipt: Receipt = ciborium::from_reader(self.body.as_slice())
            .map_err(|e| ReceiptError::Decode(e.to_string()))?;
        let key =
            PublicKey::try_decode_protobuf(&self.host_key).map_err(|_| ReceiptError::BadKey)?;
        let signer = key.to_peer_id();
        if signer != receipt.host {
            return Err(ReceiptError::WrongSigner {
                signer: signer.to_string(),
                host: receipt.host.to_string(),
            });
        }
        if !key.verify(&signed_bytes(&self.body), &self.signature) {
            return Err(ReceiptError::BadSignature);
        }
        Ok(receipt)
    }
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(DOMAIN.len() + body.len());
    bytes.extend_from_slice(DOMAIN);
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A receipt from a peer is decoded and verified without panicking,
        /// whatever its bytes.
        #[test]
        fn arbitrary_receipts_never_panic(
            body in prop::collection::vec(any::<u8>(), 0..300),
            host_key in prop::collection::vec(any::<u8>(), 0..80),
            signature in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let _ = SignedReceipt { body, host_key, signature }.verify();
        }

        /// Flipping any byte of a genuine receipt makes it fail to verify.
        #[test]
        fn any_bit_flip_is_detected(index in any::<prop::sample::Index>(), bit in 0u8..8, part in 0u8..3) {
            let key = Keypair::generate_ed25519();
            let mut signed = SignedReceipt::sign(&receipt(&key), &key).unwrap();
            let bytes = match part {
                0 => &mut signed.body,
                1 => &mut signed.host_key,
                _ => &mut signed.signature,
            };
            let i = index.index(bytes.len());
            bytes[i] ^= 1 << bit;
            prop_assert!(signed.verify().is_err());
        }
    }

    fn receipt(host: &Keypair) -> Receipt {
        Receipt {
            task: TaskId::from_bytes([1; 16]),
            requester: PeerId::random(),
            host: host.public().to_peer_id(),
            module: BlobId::of(b"module"),
            fuel: 12345,
            wall_ms: 6,
            exit_code: Some(0),
            finished_ms: 1_700_000_000_000,
        }
    }

    #[test]
    fn signed_receipts_verify() {
        let key = Keypair::generate_ed25519();
        let r = receipt(&key);
        let signed = SignedReceipt::sign(&r, &key).unwrap();
        assert_eq!(signed.verify(), Ok(r));
    }

    #[test]
    fn tampering_is_detected() {
        let key = Keypair::generate_ed25519();
        let mut signed = SignedReceipt::sign(&receipt(&key), &key).unwrap();
        let last = signed.body.len() - 1;
        signed.body[last] ^= 1;
        assert!(signed.verify().is_err());
    }

    #[test]
    fn a_receipt_signed_by_someone_else_is_refused() {
        let host = Keypair::generate_ed25519();
        let forger = Keypair::generate_ed25519();
        let signed = SignedReceipt::sign(&receipt(&host), &forger).unwrap();
        assert!(matches!(
            signed.verify(),
            Err(ReceiptError::WrongSigner { .. })
        ));
    }
}

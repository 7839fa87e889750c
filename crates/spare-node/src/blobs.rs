//! The content-addressed blob store: modules, large stdin.
//!
//! A blob lives at `blobs/<first two hex digits>/<hash>`. Files appear under
//! their final name only by an atomic rename after their hash was checked,
//! so a reader never sees a partial or wrong blob.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use libp2p::PeerId;
use spare_core::wire::{BlobRequest, BlobResponse, MAX_BLOB_CHUNK};
use spare_core::{BlobId, BlobRef};
use spare_net::NetHandle;

/// The store.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// One lock per blob being fetched, so concurrent tasks needing the same
    /// module fetch it once.
    fetching: Mutex<HashMap<BlobId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Why a blob could not be stored or fetched.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob store I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("content does not match its hash: expected {expected}, got {actual}")]
    Mismatch { expected: BlobId, actual: BlobId },
    #[error("peer does not have blob {0}")]
    NotFound(BlobId),
    #[error("peer sent a bad chunk of blob {id}: {reason}")]
    BadChunk { id: BlobId, reason: String },
    #[error("fetching blob {id} failed: {reason}")]
    Network { id: BlobId, reason: String },
}

impl BlobStore {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            fetching: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }

    pub fn has(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    pub fn size(&self, id: &BlobId) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.path(id))?.len())
    }

    pub fn read(&self, id: &BlobId) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.path(id))
    }

    /// Stores `bytes`, checking them against `expected`.
    pub fn put_verified(&self, expected: &BlobId, bytes: &[u8]) -> Result<(), BlobError> {
        let actual = BlobId::of(bytes);
        if actual != *expected {
            return Err(BlobError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        if self.has(expected) {
            return Ok(());
        }
        let tmp = self.temp_path(expected);
        std::fs::write(&tmp, bytes)?;
        self.commit(&tmp, expected)?;
        Ok(())
    }

    /// Stores `bytes` under their own hash.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobId, BlobError> {
        let id = BlobId::of(bytes);
        self.put_verified(&id, bytes)?;
        Ok(id)
    }

    /// Reads up to `len` bytes at `offset`, and the blob's total size.
    pub fn read_chunk(
        &self,
        id: &BlobId,
        offset: u64,
        len: u32,
    ) -> std::io::Result<(u64, Vec<u8>)> {
        let mut file = std::fs::File::open(self.path(id))?;
        let total = file.metadata()?.len();
        let start = offset.min(total);
        let want = (total - start).min(u64::from(len.min(MAX_BLOB_CHUNK)));
        file.seek(SeekFrom::Start(start))?;
        let mut data = vec![0u8; usize::try_from(want).unwrap_or(0)];
        file.read_exact(&mut data)?;
        Ok((total, data))
    }

    /// Makes sure `blob` is in the store, fetching it from `peer` if not.
    /// Verifies size and hash before the blob becomes visible.
    pub async fn fetch(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
    ) -> Result<(), BlobError> {
        if self.has(&blob.id) {
            return Ok(());
        }
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(fetching.entry(blob.id).or_default())
        };
        let _guard = lock.lock().await;
        let result = if self.has(&blob.id) {
            Ok(())
        } else {
            self.fetch_unlocked(net, peer, blob).await
        };
        self.fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&blob.id);
        result
    }

    async fn fetch_unlocked(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
    ) -> Result<(), BlobError> {
        let id = blob.id;
        let bad = |reason: String| BlobError::BadChunk { id, reason };
        let tmp = self.temp_path(&id);
        let mut file = std::fs::File::create(&tmp)?;
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0u64;
        let result = async {
            while offset < blob.size {
                let len = u32::try_from((blob.size - offset).min(u64::from(MAX_BLOB_CHUNK)))
                    .unwrap_or(MAX_BLOB_CHUNK);
                let response = net
                    .fetch_blob(peer, BlobRequest { id, offset, len })
                    .await
                    .map_err(|e| BlobError::Network {
                        id,
                        reason: e.to_string(),
                    })?;
                let data = match response {
                    BlobResponse::NotFound => return Err(BlobError::NotFound(id)),
                    BlobResponse::Invalid(why) => {
                        return Err(bad(format!("peer refused our request: {why}")));
                    }
                    BlobResponse::Chunk { total, data } => {
                        if total != blob.size {
                            return Err(bad(format!("size {total}, expected {}", blob.size)));
                        }
                        if data.is_empty() || data.len() > len as usize {
                            return Err(bad(format!(
                                "{} bytes for a {len}-byte request",
                                data.len()
                            )));
                        }
                        data
                    }
                };
                hasher.update(&data);
                file.write_all(&data)?;
                offset += data.len() as u64;
            }
            let actual = BlobId::from_bytes(*hasher.finalize().as_bytes());
            if actual != id {
                return Err(BlobError::Mismatch {
                    expected: id,
                    actual,
                });
            }
            file.sync_data()?;
            Ok(())
        }
        .await;
        match result {
            Ok(()) => self.commit(&tmp, &id).map_err(BlobError::from),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn temp_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(format!(".{id}.{}.tmp", rand_suffix()))
    }

    fn commit(&self, tmp: &Path, id: &BlobId) -> std::io::Result<()> {
        let path = self.path(id);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(tmp, path)
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    u64::from(std::process::id()) << 32 | COUNTER.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_stored_verified_and_chunked() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path()).unwrap();
        let id = store.put(b"hello world").unwrap();
        assert!(store.has(&id));
        assert_eq!(store.read(&id).unwrap(), b"hello world");
        assert_eq!(
            store.read_chunk(&id, 6, 100).unwrap(),
            (11, b"world".to_vec())
        );
        assert_eq!(store.read_chunk(&id, 50, 100).unwrap(), (11, vec![]));
        let wrong = BlobId::of(b"other");
        assert!(matches!(
            store.put_verified(&wrong, b"hello"),
            Err(BlobError::Mismatch { .. })
        ));
        assert!(!store.has(&wrong));
    }
}

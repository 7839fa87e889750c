//! The content-addressed blob store: modules, large stdin.
//!
//! A blob lives at `blobs/<first two hex digits>/<hash>`. Files appear under
//! their final name only by an atomic rename after their hash was checked and
//! their bytes synced, so a reader never sees a partial or wrong blob, even
//! after a power cut. File I/O runs off the daemon's async thread.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libp2p::PeerId;
use spare_core::wire::{BlobRequest, BlobResponse, MAX_BLOB_CHUNK};
use spare_core::{BlobId, BlobRef};
use spare_net::NetHandle;
use tokio::io::AsyncWriteExt;

/// The slowest transfer a fetch tolerates, in bytes per second: a peer that
/// trickles a blob slower than this is given up on.
const MIN_FETCH_RATE: u64 = 256 << 10;
/// Time every fetch gets on top of its size at the slowest rate.
const FETCH_GRACE: Duration = Duration::from_secs(30);

/// The store.
#[derive(Debug)]
pub struct BlobStore {
    dir: PathBuf,
    /// One lock per blob being fetched from a peer, so concurrent tasks of
    /// one requester fetch a module once, while a slow requester cannot hold
    /// up another requester's fetch of the same blob.
    fetching: Mutex<HashMap<(BlobId, PeerId), FetchLock>>,
}

/// Held while one blob is fetched from one peer.
type FetchLock = Arc<tokio::sync::Mutex<()>>;

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
    #[error("fetching blob {id} took longer than {} s", .limit.as_secs())]
    TooSlow { id: BlobId, limit: Duration },
}

impl BlobStore {
    /// Opens the store, removing temporary files a crash left behind.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
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

    /// Stores `bytes`, checking them against `expected`. Blocking: call it
    /// from a blocking thread.
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
        let tmp = TempFile(self.temp_path(expected));
        let mut file = std::fs::File::create(&tmp.0)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        self.commit(&tmp.0, expected)?;
        Ok(())
    }

    /// Stores `bytes` under their own hash. Blocking.
    pub fn put(&self, bytes: &[u8]) -> Result<BlobId, BlobError> {
        let id = BlobId::of(bytes);
        self.put_verified(&id, bytes)?;
        Ok(id)
    }

    /// Reads up to `len` bytes at `offset`, and the blob's total size.
    /// Blocking.
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
    /// Verifies size and hash before the blob becomes visible, and gives up
    /// on a peer that sends it slower than [`MIN_FETCH_RATE`].
    pub async fn fetch(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
    ) -> Result<(), BlobError> {
        if self.has(&blob.id) {
            return Ok(());
        }
        let key = (blob.id, peer);
        let lock = {
            let mut fetching = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            Arc::clone(fetching.entry(key).or_default())
        };
        // Removes the lock entry however this fetch ends, cancelled included.
        let _entry = FetchEntry { store: self, key };
        let _guard = lock.lock().await;
        if self.has(&blob.id) {
            return Ok(());
        }
        let limit = FETCH_GRACE + Duration::from_secs(blob.size / MIN_FETCH_RATE);
        tokio::time::timeout(limit, self.fetch_unlocked(net, peer, blob))
            .await
            .map_err(|_| BlobError::TooSlow { id: blob.id, limit })?
    }

    async fn fetch_unlocked(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
    ) -> Result<(), BlobError> {
        let id = blob.id;
        let bad = |reason: String| BlobError::BadChunk { id, reason };
        // Deleted if the fetch fails or is cancelled.
        let tmp = TempFile(self.temp_path(&id));
        let mut file = tokio::fs::File::create(&tmp.0).await?;
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0u64;
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
                BlobResponse::Busy => {
                    return Err(BlobError::Network {
                        id,
                        reason: "the peer is too busy to serve it".into(),
                    });
                }
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
            file.write_all(&data).await?;
            offset += data.len() as u64;
        }
        let actual = BlobId::from_bytes(*hasher.finalize().as_bytes());
        if actual != id {
            return Err(BlobError::Mismatch {
                expected: id,
                actual,
            });
        }
        file.sync_data().await?;
        drop(file);
        let (path, commit) = (tmp.0.clone(), self.committer(&id));
        tokio::task::spawn_blocking(move || commit(&path))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }

    fn temp_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(format!(".{id}.{}.tmp", rand_suffix()))
    }

    /// Moves a synced temporary file to its final name, and syncs the
    /// directory so the rename survives a power cut.
    fn commit(&self, tmp: &Path, id: &BlobId) -> std::io::Result<()> {
        self.committer(id)(tmp)
    }

    fn committer(&self, id: &BlobId) -> impl FnOnce(&Path) -> std::io::Result<()> + Send + 'static {
        let path = self.path(id);
        move |tmp: &Path| {
            let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
            std::fs::create_dir_all(&parent)?;
            std::fs::rename(tmp, &path)?;
            std::fs::File::open(&parent)?.sync_all()
        }
    }
}

/// A temporary file, removed on drop unless it was renamed away.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Removes a fetch's lock entry when the fetch ends.
struct FetchEntry<'a> {
    store: &'a BlobStore,
    key: (BlobId, PeerId),
}

impl Drop for FetchEntry<'_> {
    fn drop(&mut self) {
        self.store
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    (u64::from(std::process::id()) << 32) | COUNTER.fetch_add(1, Ordering::Relaxed)
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
        assert_eq!(std::fs::read(store.path(&id)).unwrap(), b"hello world");
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
        // Nothing but the blob's directory is left behind.
        let entries: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().collect();
        assert_eq!(entries.len(), 1);
    }

    #[test]
    fn leftover_temporary_files_are_swept_at_open() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".abc.1.tmp"), b"half a blob").unwrap();
        BlobStore::open(dir.path()).unwrap();
        assert!(!dir.path().join(".abc.1.tmp").exists());
    }
}

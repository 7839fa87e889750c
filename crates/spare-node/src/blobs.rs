//! The content-addressed blob store: modules, large stdin.
//!
//! A blob lives at `blobs/<first two hex digits>/<hash>`. Files appear under
//! their final name only by an atomic rename after their hash was checked and
//! their bytes synced, so a reader never sees a partial or wrong blob, even
//! after a power cut. File I/O runs off the daemon's async thread.
//!
//! The store keeps within the owner's disk budget (`disk` in the config). It
//! knows every blob's size and when it was last used: walked once at open
//! (a file's mtime is its last use), then kept up to date in memory as
//! blobs are committed, used and evicted. A fetch that finds its blob here
//! bumps the file's mtime too, at most once a minute, so the order
//! survives a restart without a file write for every task. Before fetching
//! a blob it lacks, it makes room by evicting the least recently used
//! blobs, never a pinned one: a [`BlobPin`] is held by every fetch and, for
//! as long as the task runs, by every hosted task using the blob. A blob
//! that does not fit even so is refused with [`BlobError::NoRoom`] (the host
//! then refuses the task and its requester tries another peer). Blobs the
//! owner stores through the API ([`BlobStore::put_verified`]) make room the
//! same way but are never refused: where nothing can be evicted they take
//! the store over its budget until later fetches evict what is not in use.
//!
//! The budget is three quarters of the owner's `disk`, for the blobs and
//! the node's state (its database, measured every 30 s by the node) together.
//! Compiled modules (`paths.cache`, written by the worker processes) have
//! the other quarter, kept by the node's periodic sweep
//! (`spare_runtime::cache::sweep`).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use libp2p::PeerId;
use spare_core::units::format_bytes;
use spare_core::wire::{BlobRequest, BlobResponse, MAX_BLOB_CHUNK};
use spare_core::{BlobId, BlobRef};
use spare_net::NetHandle;
use spare_policy::TokenBucket;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

/// The slowest transfer a fetch tolerates, in bytes per second: a peer that
/// trickles a blob slower than this is given up on. Half the lowest upload
/// or download limit an owner may set (`spare_policy::settings::MIN_RATE`),
/// so two honest peers at their lowest limits never trip it, with room for
/// a chunk's round trips and a second transfer sharing one side's bucket.
/// Time spent waiting on our own download bucket is not held against the
/// peer.
const MIN_FETCH_RATE: u64 = 64 << 10;
const _: () = assert!(MIN_FETCH_RATE * 2 <= spare_policy::settings::MIN_RATE);
/// Time every fetch gets on top of its size at the slowest rate.
const FETCH_GRACE: Duration = Duration::from_secs(30);

/// The store.
#[derive(Debug)]
pub struct BlobStore {
    shared: Arc<Shared>,
    /// One lock per blob being fetched from a peer, so concurrent tasks of
    /// one requester fetch a module once, while a slow requester cannot hold
    /// up another requester's fetch of the same blob.
    fetching: Mutex<HashMap<(BlobId, PeerId), FetchLock>>,
}

/// What blocking threads, pins and reservations share with the store.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// Bytes the blobs and the node's state may take together.
    budget: u64,
    /// Bytes of that budget the node's state (its database) takes, as last
    /// measured (see [`BlobStore::set_state_bytes`]).
    state: AtomicU64,
    space: Mutex<Space>,
}

/// The store's accounting of its disk budget.
#[derive(Debug, Default)]
struct Space {
    /// Every committed blob.
    blobs: HashMap<BlobId, Stored>,
    /// The sum of their sizes.
    stored: u64,
    /// Room reserved by fetches in progress for the blobs they write.
    reserved: u64,
    /// How many holders keep each blob from eviction (it may not be stored
    /// yet: a fetch pins its blob before it starts).
    pins: HashMap<BlobId, u32>,
}

#[derive(Clone, Copy, Debug)]
struct Stored {
    size: u64,
    /// Last use, the order of eviction.
    used: SystemTime,
    /// When the file's mtime, the order after a restart, was last set to
    /// `used`.
    touched: SystemTime,
}

/// How stale a blob's mtime may grow behind its last use: a module used by
/// every task has its file touched once in this time, not once a task.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

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
    /// Even with every unpinned blob evicted, the blob would not fit.
    #[error(
        "a blob of {} does not fit in this host's disk budget for blobs, {} ({} of it in use by \
         running tasks, fetches and the node's state)",
        format_bytes(*.size), format_bytes(*.budget), format_bytes(*.in_use)
    )]
    NoRoom { size: u64, budget: u64, in_use: u64 },
}

impl BlobStore {
    /// Opens the store with a budget of `budget` bytes, removing temporary
    /// files a crash left behind and taking stock of the blobs there.
    /// Blocking.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut space = Space::default();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            } else if name.len() == 2 && entry.file_type().is_ok_and(|t| t.is_dir()) {
                for blob in std::fs::read_dir(entry.path())?.flatten() {
                    let Ok(id) = blob.file_name().to_string_lossy().parse::<BlobId>() else {
                        continue;
                    };
                    let Ok(meta) = blob.metadata() else { continue };
                    if meta.is_file() {
                        let used = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                        space.insert(id, meta.len(), used);
                    }
                }
            }
        }
        if space.stored > budget {
            tracing::warn!(
                "the blob store holds {}, more than its budget of {}; the least recently used blobs will be evicted",
                format_bytes(space.stored),
                format_bytes(budget)
            );
        }
        Ok(Self {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                budget,
                state: AtomicU64::new(0),
                space: Mutex::new(space),
            }),
            fetching: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self, id: &BlobId) -> PathBuf {
        self.shared.path(id)
    }

    pub fn has(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    pub fn size(&self, id: &BlobId) -> std::io::Result<u64> {
        Ok(std::fs::metadata(self.path(id))?.len())
    }

    /// The bytes the blobs and the node's state may take together.
    pub fn budget(&self) -> u64 {
        self.shared.budget
    }

    /// Tells the store how much of its budget the node's state (the ledger
    /// database) takes now; later fetches make room for it.
    pub fn set_state_bytes(&self, bytes: u64) {
        self.shared.state.store(bytes, Ordering::Relaxed);
    }

    /// The node's state, as last measured.
    pub fn state_bytes(&self) -> u64 {
        self.shared.state.load(Ordering::Relaxed)
    }

    /// The bytes the stored blobs take, plus the room fetches in progress
    /// have reserved.
    pub fn used(&self) -> u64 {
        let space = self.shared.space();
        space.stored + space.reserved
    }

    /// Keeps `id` from eviction until the pin is dropped. The blob need not
    /// be stored yet.
    pub fn pin(&self, id: &BlobId) -> BlobPin {
        *self.shared.space().pins.entry(*id).or_insert(0) += 1;
        BlobPin {
            shared: Arc::clone(&self.shared),
            id: *id,
        }
    }

    /// Stores `bytes`, checking them against `expected`. The owner's own
    /// blobs: counted in the budget, never refused for it. Blocking: call it
    /// from a blocking thread.
    pub fn put_verified(&self, expected: &BlobId, bytes: &[u8]) -> Result<(), BlobError> {
        let actual = BlobId::of(bytes);
        if actual != *expected {
            return Err(BlobError::Mismatch {
                expected: *expected,
                actual,
            });
        }
        // Unless an eviction got there first.
        if self.has(expected) && self.shared.touch(expected) {
            return Ok(());
        }
        let size = bytes.len() as u64;
        // Room is made as for a fetch, but the owner's blob is stored even
        // where none can be made.
        let room = match self.shared.make_room(size) {
            Ok(room) => Some(room),
            Err(BlobError::NoRoom { .. }) => None,
            Err(e) => return Err(e),
        };
        let tmp = TempFile(self.shared.temp_path(expected));
        let mut file = std::fs::File::create(&tmp.0)?;
        file.write_all(bytes)?;
        file.sync_data()?;
        self.shared.commit(&tmp.0, expected, size, room)?;
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

    /// Makes sure `blob` is in the store, fetching it from `peer` if not,
    /// and pins it: it stays until the returned pin is dropped. Before
    /// fetching, makes room within the disk budget (or fails with
    /// [`BlobError::NoRoom`]); waits on `bucket` before requesting each
    /// chunk. Verifies size and hash before the blob becomes visible, and
    /// gives up on a peer that sends it slower than [`MIN_FETCH_RATE`].
    pub async fn fetch(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
        bucket: &TokenBucket,
    ) -> Result<BlobPin, BlobError> {
        // Pinned first, so it cannot be evicted between being found and
        // being used.
        let pin = self.pin(&blob.id);
        if self.has(&blob.id) {
            self.mark_used(blob.id).await;
            return Ok(pin);
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
            self.mark_used(blob.id).await;
            return Ok(pin);
        }
        let shared = Arc::clone(&self.shared);
        let room = tokio::task::spawn_blocking(move || shared.make_room(blob.size))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        let limit = FETCH_GRACE + Duration::from_secs(blob.size / MIN_FETCH_RATE);
        self.fetch_unlocked(net, peer, blob, bucket, limit, room)
            .await?;
        Ok(pin)
    }

    /// Marks a blob a fetch found here as just used, so hot modules stay:
    /// in memory every time, on disk (a blocking call) only when its file's
    /// mtime is [`TOUCH_EVERY`] behind.
    async fn mark_used(&self, id: BlobId) {
        if self.shared.mark_used_in_memory(&id) {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let _ = tokio::task::spawn_blocking(move || shared.touch(&id)).await;
    }

    async fn fetch_unlocked(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
        bucket: &TokenBucket,
        limit: Duration,
        room: Reservation,
    ) -> Result<(), BlobError> {
        let id = blob.id;
        let bad = |reason: String| BlobError::BadChunk { id, reason };
        // Waits on our own bucket move the deadline: they are not the
        // peer's slowness.
        let mut deadline = Instant::now() + limit;
        let too_slow = || BlobError::TooSlow { id, limit };
        // Deleted if the fetch fails or is cancelled.
        let tmp = TempFile(self.shared.temp_path(&id));
        let mut file = tokio::fs::File::create(&tmp.0).await?;
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0u64;
        while offset < blob.size {
            let len = u32::try_from((blob.size - offset).min(u64::from(MAX_BLOB_CHUNK)))
                .unwrap_or(MAX_BLOB_CHUNK);
            let paced = Instant::now();
            bucket.take(u64::from(len)).await;
            deadline += paced.elapsed();
            let response = tokio::time::timeout_at(
                deadline,
                net.fetch_blob(peer, BlobRequest { id, offset, len }),
            )
            .await
            .map_err(|_| too_slow())?
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
            tokio::time::timeout_at(deadline, file.write_all(&data))
                .await
                .map_err(|_| too_slow())??;
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
        let (path, shared) = (tmp.0.clone(), Arc::clone(&self.shared));
        tokio::task::spawn_blocking(move || shared.commit(&path, &id, blob.size, Some(room)))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }
}

impl Shared {
    fn path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }

    fn temp_path(&self, id: &BlobId) -> PathBuf {
        self.dir.join(format!(".{id}.{}.tmp", rand_suffix()))
    }

    fn space(&self) -> MutexGuard<'_, Space> {
        self.space.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Moves a synced temporary file of `size` bytes to its final name,
    /// counts it (turning a fetch's reservation into the stored blob), and
    /// syncs the directory so the rename survives a power cut. Blocking.
    fn commit(
        &self,
        tmp: &Path,
        id: &BlobId,
        size: u64,
        room: Option<Reservation>,
    ) -> std::io::Result<()> {
        let path = self.path(id);
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        std::fs::create_dir_all(&parent)?;
        std::fs::rename(tmp, &path)?;
        {
            let mut space = self.space();
            space.insert(*id, size, SystemTime::now());
            if let Some(mut room) = room {
                space.reserved = space.reserved.saturating_sub(room.bytes);
                room.bytes = 0;
            }
        }
        std::fs::File::open(&parent)?.sync_all()
    }

    /// Marks a stored blob as used now, on disk (so the order survives a
    /// restart) and in the accounting. Says whether it is there. Blocking.
    fn touch(&self, id: &BlobId) -> bool {
        let now = SystemTime::now();
        let size = std::fs::File::open(self.path(id)).and_then(|file| {
            file.set_modified(now)?;
            Ok(file.metadata()?.len())
        });
        let size = match size {
            Ok(size) => size,
            Err(e) => {
                tracing::debug!(blob = %id, "cannot bump the blob's mtime: {e}");
                return false;
            }
        };
        let mut space = self.space();
        match space.blobs.get_mut(id) {
            Some(stored) => {
                stored.used = now;
                stored.touched = now;
                true
            }
            // Renamed in by a concurrent fetch that has not counted it yet
            // (counting it twice only replaces the entry), or put there
            // behind the store's back. Checked under the lock, as evictions
            // rename blobs away under it.
            None if self.path(id).is_file() => {
                space.insert(*id, size, now);
                true
            }
            None => false,
        }
    }

    /// Marks a counted blob as used now, in memory only; says whether that
    /// was enough (its mtime is recent, so the order after a restart is
    /// close enough) or the file needs a [`Shared::touch`].
    fn mark_used_in_memory(&self, id: &BlobId) -> bool {
        let now = SystemTime::now();
        match self.space().blobs.get_mut(id) {
            Some(stored) => {
                stored.used = now;
                now.duration_since(stored.touched)
                    .is_ok_and(|behind| behind < TOUCH_EVERY)
            }
            None => false,
        }
    }

    /// Reserves room for a blob of `size` bytes about to be fetched,
    /// evicting the least recently used unpinned blobs if need be. Blocking.
    fn make_room(self: &Arc<Self>, size: u64) -> Result<Reservation, BlobError> {
        let mut evicted = Vec::new();
        let reservation = {
            let mut space = self.space();
            let state = self.state.load(Ordering::Relaxed);
            let mut used = space.stored + space.reserved + state;
            if used.saturating_add(size) > self.budget {
                let mut victims: Vec<(SystemTime, BlobId, u64)> = space
                    .blobs
                    .iter()
                    .filter(|(id, _)| !space.pins.contains_key(id))
                    .map(|(id, stored)| (stored.used, *id, stored.size))
                    .collect();
                let evictable: u64 = victims.iter().map(|(_, _, size)| size).sum();
                let in_use = used - evictable;
                if in_use.saturating_add(size) > self.budget {
                    return Err(BlobError::NoRoom {
                        size,
                        budget: self.budget,
                        in_use,
                    });
                }
                victims.sort_unstable();
                for (_, id, victim_size) in victims {
                    if used.saturating_add(size) <= self.budget {
                        break;
                    }
                    // Out of its name under the lock, so no fetch finds it
                    // there unpinned; removed once the lock is released.
                    let doomed = self.temp_path(&id);
                    match std::fs::rename(self.path(&id), &doomed) {
                        Ok(()) => evicted.push(TempFile(doomed)),
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(e.into()),
                    }
                    space.remove(&id);
                    used -= victim_size;
                }
            }
            space.reserved += size;
            Reservation {
                shared: Arc::clone(self),
                bytes: size,
            }
        };
        if !evicted.is_empty() {
            tracing::info!(
                "evicted {} least recently used blob(s) to make room for one of {}",
                evicted.len(),
                format_bytes(size)
            );
        }
        drop(evicted);
        Ok(reservation)
    }
}

impl Space {
    fn insert(&mut self, id: BlobId, size: u64, used: SystemTime) {
        let stored = Stored {
            size,
            used,
            touched: used,
        };
        if let Some(old) = self.blobs.insert(id, stored) {
            self.stored -= old.size;
        }
        self.stored += size;
    }

    fn remove(&mut self, id: &BlobId) {
        if let Some(old) = self.blobs.remove(id) {
            self.stored -= old.size;
        }
    }
}

/// Keeps one blob from eviction while held; see [`BlobStore::pin`].
#[derive(Debug)]
#[must_use = "the blob may be evicted as soon as its pin is dropped"]
pub struct BlobPin {
    shared: Arc<Shared>,
    id: BlobId,
}

impl BlobPin {
    pub fn id(&self) -> &BlobId {
        &self.id
    }
}

impl Drop for BlobPin {
    fn drop(&mut self) {
        let mut space = self.shared.space();
        if let Some(count) = space.pins.get_mut(&self.id) {
            *count -= 1;
            if *count == 0 {
                space.pins.remove(&self.id);
            }
        }
    }
}

/// Room reserved for a blob being fetched; given back if the fetch fails.
#[derive(Debug)]
struct Reservation {
    shared: Arc<Shared>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            let mut space = self.shared.space();
            space.reserved = space.reserved.saturating_sub(self.bytes);
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
        let store = BlobStore::open(dir.path(), 1 << 20).unwrap();
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
        BlobStore::open(dir.path(), 1 << 20).unwrap();
        assert!(!dir.path().join(".abc.1.tmp").exists());
    }

    /// A store of `budget` bytes holding three 30-byte blobs, last used in
    /// the order given (oldest first), reopened so it walks them.
    fn store_of_three(dir: &Path, budget: u64) -> (BlobStore, [BlobId; 3]) {
        let store = BlobStore::open(dir, budget).unwrap();
        let ids = [b'a', b'b', b'c'].map(|c| store.put(&[c; 30]).unwrap());
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        for (i, id) in ids.iter().enumerate() {
            std::fs::File::open(store.path(id))
                .unwrap()
                .set_modified(t0 + Duration::from_secs(i as u64 * 60))
                .unwrap();
        }
        drop(store);
        let store = BlobStore::open(dir, budget).unwrap();
        assert_eq!(store.used(), 90);
        (store, ids)
    }

    #[test]
    fn the_least_recently_used_blobs_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [a, b, c]) = store_of_three(dir.path(), 100);
        // Fits without evicting anything.
        let room = store.shared.make_room(10).unwrap();
        assert_eq!(store.used(), 100);
        drop(room);
        assert_eq!(store.used(), 90);
        // A fetch found `a` here: it is now the most recently used, so `b`
        // goes first, and only as much as is needed.
        assert!(store.shared.touch(&a));
        let room = store.shared.make_room(40).unwrap();
        assert!(store.has(&a) && !store.has(&b) && store.has(&c));
        assert_eq!(store.used(), 100);
        // The mtime bump survives a restart: `c` is now the oldest.
        drop(room);
        drop(store);
        let store = BlobStore::open(dir.path(), 100).unwrap();
        assert_eq!(store.used(), 60);
        let _room = store.shared.make_room(70).unwrap();
        assert!(store.has(&a) && !store.has(&c));
        // Evicted files leave nothing behind.
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn a_use_soon_after_a_touch_is_marked_in_memory_only() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [a, b, c]) = store_of_three(dir.path(), 100);
        let mtime = |id| {
            std::fs::metadata(store.path(id))
                .unwrap()
                .modified()
                .unwrap()
        };
        // `a`'s file is an hour old: marking it is not enough.
        assert!(!store.shared.mark_used_in_memory(&a));
        assert!(store.shared.touch(&a));
        let touched = mtime(&a);
        // Just touched: a use now stays in memory and leaves the file be.
        assert!(store.shared.mark_used_in_memory(&a));
        assert_eq!(mtime(&a), touched);
        // A use marked in memory counts for eviction: `b`, marked after
        // `a` was touched, outlives both `c` and `a`.
        store.shared.mark_used_in_memory(&b);
        let _room = store.shared.make_room(70).unwrap();
        assert!(store.has(&b) && !store.has(&a) && !store.has(&c));
    }

    #[test]
    fn pinned_blobs_are_never_evicted() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [a, b, c]) = store_of_three(dir.path(), 100);
        let pin_a = store.pin(&a);
        let pin_a_again = store.pin(&a);
        // `a` is the oldest but pinned: `b` goes instead.
        let room = store.shared.make_room(40).unwrap();
        assert!(store.has(&a) && !store.has(&b) && store.has(&c));
        drop(room);
        // One pin of two released: still pinned.
        drop(pin_a);
        let _room = store.shared.make_room(70).unwrap();
        assert!(store.has(&a) && !store.has(&c));
        drop(pin_a_again);
        assert!(store.shared.space().pins.is_empty());
    }

    #[test]
    fn a_blob_that_cannot_fit_is_refused_and_evicts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [a, b, c]) = store_of_three(dir.path(), 100);
        let _pins = (store.pin(&a), store.pin(&b));
        // 60 bytes pinned: 50 more do not fit even with `c` evicted.
        let err = store.shared.make_room(50).unwrap_err();
        assert!(matches!(
            err,
            BlobError::NoRoom {
                size: 50,
                budget: 100,
                in_use: 60
            }
        ));
        assert_eq!(
            err.to_string(),
            "a blob of 50 B does not fit in this host's disk budget for blobs, 100 B \
             (60 B of it in use by running tasks, fetches and the node's state)"
        );
        assert!(store.has(&c));
        assert_eq!(store.used(), 90);
        // Room reserved by a fetch in progress is in use too.
        let room = store.shared.make_room(10).unwrap();
        let err = store.shared.make_room(40).unwrap_err();
        assert!(matches!(err, BlobError::NoRoom { in_use: 70, .. }), "{err}");
        assert!(store.has(&c));
        drop(room);
        // A blob larger than the whole budget never fits.
        let big = BlobStore::open(tempfile::tempdir().unwrap().path(), 100).unwrap();
        assert!(matches!(
            big.shared.make_room(101),
            Err(BlobError::NoRoom { in_use: 0, .. })
        ));
    }

    #[test]
    fn usage_follows_commits_and_the_owners_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 100).unwrap();
        // A fetched blob's reservation becomes the stored blob.
        let bytes = [7u8; 40];
        let id = BlobId::of(&bytes);
        let room = store.shared.make_room(40).unwrap();
        let tmp = store.shared.temp_path(&id);
        std::fs::write(&tmp, bytes).unwrap();
        store.shared.commit(&tmp, &id, 40, Some(room)).unwrap();
        assert_eq!(store.used(), 40);
        // The owner's blobs make room like fetches, the oldest blob going
        // first, and a blob stored twice counts once.
        let first = store.put(&[1u8; 50]).unwrap();
        store.put(&[2u8; 50]).unwrap();
        store.put(&[2u8; 50]).unwrap();
        assert_eq!(store.used(), 100);
        assert!(!store.has(&id), "the oldest blob goes first");
        // Where nothing can be evicted they are stored all the same.
        let _pins = [store.pin(&first), store.pin(&BlobId::of(&[2u8; 50]))];
        store.put(&[3u8; 50]).unwrap();
        assert_eq!(store.used(), 150);
    }

    #[test]
    fn the_nodes_state_takes_its_part_of_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 100).unwrap();
        let old = store.put(&[1u8; 40]).unwrap();
        store.put(&[2u8; 40]).unwrap();
        store.set_state_bytes(30);
        // 40 + 40 + 30 state: a 10-byte fetch evicts the oldest blob.
        let _room = store.shared.make_room(10).unwrap();
        assert!(!store.has(&old));
        store.set_state_bytes(95);
        let _pin = store.pin(&BlobId::of(&[2u8; 40]));
        let err = store.shared.make_room(10).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
    }
}

//! The content-addressed blob store: modules, large stdin.
//!
//! A blob lives at `blobs/<first two hex digits>/<hash>`. Files appear under
//! their final name only by an atomic rename after their hash was checked and
//! their bytes synced, so a reader never sees a partial or wrong blob, even
//! after a power cut. File I/O runs off the daemon's async thread.
//!
//! The store keeps within the owner's disk budget (`disk` in the config),
//! counting each blob's file in whole blocks ([`BLOCK`]), so many tiny
//! blobs cost the budget what they cost the disk. It knows every blob's
//! size and when it was last used: walked once at open
//! (a file's mtime is its last use), then kept up to date in memory as
//! blobs are committed, used and evicted. A fetch that finds its blob here
//! bumps the file's mtime too, at most once a minute, so the order
//! survives a restart without a file write for every task. Before fetching
//! a blob it lacks, it checks that the blob would fit once the least
//! recently used blobs were evicted, never a pinned one: a [`BlobPin`] is
//! held by every fetch and, for as long as the task runs, by every hosted
//! task using the blob. A blob that does not fit even so is refused with
//! [`BlobError::NoRoom`] (the host then refuses the task as busy, room
//! coming back as tasks and fetches end, and its requester tries another
//! peer or comes back later). One requester's fetches in progress hold at most
//! half of the budget ([`PEER_SHARE`]); a fetch beyond that fails at once
//! with [`BlobError::ShareTaken`] (the host then refuses the task as busy,
//! and its requester tries another peer or comes back later). The room
//! itself is made chunk by chunk as the bytes
//! arrive, never ahead of them: a peer that names a blob it does not have,
//! or stops sending, evicts no more than it sent. Blobs the owner stores
//! through the API ([`BlobStore::put_verified`]) make room at once and are
//! never refused: where nothing can be evicted they take the store over its
//! budget until later fetches evict what is not in use.
//!
//! A fetch holds its peer to the protocol: every chunk must be exactly as
//! long as asked (what an honest peer's [`BlobStore::read_chunk`] sends), so
//! a blob takes one request per [`MAX_BLOB_CHUNK`], and the node's download
//! bucket is charged for the bytes that arrived, after they arrived, never
//! for a reply that carried none. A peer that answers
//! [`BlobResponse::Busy`] is asked again after a pause, within the fetch's
//! deadline and its chunk's (`FetchLimits`).
//!
//! The store also bounds what serving chunks to peers holds in memory
//! ([`BlobStore::serving_permit`], [`MAX_SERVING_BYTES`]).
//!
//! The budget is three quarters of the owner's `disk`, for the blobs and
//! the node's state (its database, measured every 30 s by the node) together.
//! Compiled modules (`paths.cache`, written by the worker processes) have
//! the other quarter, kept by the node's periodic sweep
//! (`spare_runtime::cache::sweep`).

use std::collections::{BTreeSet, HashMap};
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
pub(crate) const MIN_FETCH_RATE: u64 = 64 << 10;
const _: () = assert!(MIN_FETCH_RATE * 2 <= spare_policy::settings::MIN_RATE);
/// Time every fetch gets on top of its size at the slowest rate; and every
/// chunk on top of its own size at that rate, from the end of the one
/// before (see [`FetchLimits`]).
const FETCH_GRACE: Duration = Duration::from_secs(30);

/// How long a fetch may take: in all, its size at [`MIN_FETCH_RATE`] and
/// [`FETCH_GRACE`]; and each chunk, from the end of the one before, its
/// own size at that rate and the grace. A peer must keep sending, not only
/// make the average: one that answers `Busy`, or stalls, for longer than
/// a chunk's time ends the fetch, and the room the fetch counted on for
/// the whole blob goes back within a minute, not within the whole blob's
/// time (17 minutes for 64 MiB).
#[derive(Clone, Copy, Debug)]
struct FetchLimits {
    whole: Duration,
    chunk_grace: Duration,
}

impl FetchLimits {
    fn for_size(size: u64) -> Self {
        Self {
            whole: FETCH_GRACE + Duration::from_secs(size / MIN_FETCH_RATE),
            chunk_grace: FETCH_GRACE,
        }
    }

    /// The time a chunk of `len` bytes may take.
    fn chunk(&self, len: u32) -> Duration {
        self.chunk_grace + Duration::from_secs(u64::from(len) / MIN_FETCH_RATE)
    }
}
/// How long a fetch waits before asking a peer that answered
/// [`BlobResponse::Busy`] again, the first time; doubled at each further
/// `Busy` in a row up to [`BUSY_RETRY_MAX`]. The waits count against the
/// fetch's deadline, so a peer that is always busy fails it as too slow.
const BUSY_RETRY_FIRST: Duration = Duration::from_millis(50);
/// The longest wait between two requests a peer answered `Busy`.
const BUSY_RETRY_MAX: Duration = Duration::from_secs(1);

/// The most bytes of blob chunks this node holds in memory at once to serve
/// them to peers, from reading a chunk until libp2p reports that the peer
/// took it (or the request failed, at the latest its 60 s timeout):
/// 32 of the largest chunks (32 MiB). A peer it was given to that opens
/// many streams and reads none of the replies holds at most its share
/// ([`MAX_SERVING_BYTES_PER_PEER`]); a request beyond either bound is
/// answered [`BlobResponse::Busy`] at once, which the fetcher retries
/// after a pause, rather than queued.
pub const MAX_SERVING_BYTES: u64 = 32 * MAX_BLOB_CHUNK as u64;
/// The most of [`MAX_SERVING_BYTES`] one peer holds at once: 8 MiB, so
/// one peer never takes more than a quarter and the others are still
/// served. An honest peer has one chunk in flight per blob it fetches.
pub const MAX_SERVING_BYTES_PER_PEER: u64 = MAX_SERVING_BYTES / 4;
const _: () = assert!(MAX_SERVING_BYTES_PER_PEER >= MAX_BLOB_CHUNK as u64);
/// What a chunk request is charged at least, however few bytes it asks
/// for: each costs a file read on a blocking thread, so the budget bounds
/// how many are served at once too (128 for one peer, 512 in all).
pub const MIN_SERVING_CHARGE: u64 = 64 << 10;

/// The share of the disk budget one requester's fetches in progress may
/// hold: a half. A fetch holds its blob's whole room (promised, then
/// reserved as its bytes arrive) against its requester's share from its
/// start until it ends, however it ends: committed, failed, or cancelled.
/// So a requester that names large blobs and never sends them (each fetch
/// holding its room until it stalls) keeps at most half of the budget from
/// the others, like its half of a host's slots, admitted specs and answer
/// budget. The least budget a node runs with (`disk` of 256 MiB, 192 MiB
/// for blobs) gives a share of 96 MiB, more than the largest module or
/// stdin. The owner's own blobs ([`BlobStore::put_verified`]) take no
/// share.
pub const PEER_SHARE: u64 = 2;

/// How many eviction lines a minute are logged at `info`; more go to
/// `debug`, since a peer that sends distinct blobs causes evictions at
/// will.
static EVICTIONS_LOGGED: spare_core::LogBudget = spare_core::LogBudget::new(10);

/// The unit the budget counts a blob's file in: a file takes whole blocks
/// of the file system (4 KiB on the usual ones), and an empty one takes an
/// inode and a directory entry, counted as one block. So a peer's tiny
/// blobs cost the budget what they cost the disk, not the few bytes each
/// holds.
pub const BLOCK: u64 = 4096;

/// The store.
#[derive(Debug)]
pub struct BlobStore {
    shared: Arc<Shared>,
    /// One lock per blob being fetched from a peer, so concurrent tasks of
    /// one requester fetch a module once, while a slow requester cannot hold
    /// up another requester's fetch of the same blob.
    fetching: Mutex<HashMap<(BlobId, PeerId), FetchLock>>,
}

/// What blocking threads, pins, reservations and serving permits share
/// with the store.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    /// Bytes the blobs and the node's state may take together.
    budget: u64,
    /// The unit a blob's file is counted in ([`BLOCK`]).
    block: u64,
    /// Bytes of that budget the node's state (its database) takes, as last
    /// measured (see [`BlobStore::set_state_bytes`]).
    state: AtomicU64,
    space: Mutex<Space>,
    serving: Mutex<Serving>,
}

/// Bytes of chunks being served to peers, in all and per peer; see
/// [`MAX_SERVING_BYTES`].
#[derive(Debug, Default)]
struct Serving {
    total: u64,
    peers: HashMap<PeerId, u64>,
}

/// The store's accounting of its disk budget, in bytes of whole blocks
/// ([`Shared::charge`]). Kept so that no step walks every blob: a fetch
/// asks whether its blob fits, and evictions go in order of use, at a
/// cost that does not grow with the number of blobs stored.
#[derive(Debug, Default)]
struct Space {
    /// Every committed blob.
    blobs: HashMap<BlobId, Stored>,
    /// The same, least recently used first: the order of eviction.
    by_use: BTreeSet<(SystemTime, BlobId)>,
    /// The sum of their charges.
    stored: u64,
    /// The part of it pinned blobs take (evicting every unpinned blob
    /// would leave that much).
    pinned: u64,
    /// Room reserved for blobs being written: by fetches in progress for
    /// the bytes that have arrived, by the owner's blobs for all of theirs.
    reserved: u64,
    /// Bytes fetches in progress still expect. No room is made for them
    /// (nothing is evicted for a byte that has not arrived), but they count
    /// when a fetch asks whether its blob would fit, so the fetches in
    /// progress never together expect more than the budget.
    promised: u64,
    /// The room each requester's fetches in progress hold (their blobs'
    /// whole charges), within its share ([`PEER_SHARE`]); a requester with
    /// none in progress has no entry.
    shares: HashMap<PeerId, u64>,
    /// How many holders keep each blob from eviction (it may not be stored
    /// yet: a fetch pins its blob before it starts).
    pins: HashMap<BlobId, u32>,
}

#[derive(Clone, Copy, Debug)]
struct Stored {
    /// What the blob's file is counted as: whole blocks.
    charge: u64,
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
    #[error("fetching blob {id} stalled: no chunk came within {} s of the one before", .limit.as_secs())]
    Stalled { id: BlobId, limit: Duration },
    /// Even with every unpinned blob evicted, the blob would not fit.
    #[error(
        "a blob of {} does not fit in this host's disk budget for blobs, {} ({} of it in use by \
         running tasks, fetches and the node's state)",
        format_bytes(*.size), format_bytes(*.budget), format_bytes(*.in_use)
    )]
    NoRoom { size: u64, budget: u64, in_use: u64 },
    /// The requester's fetches in progress hold its share of the budget
    /// ([`PEER_SHARE`]): the blob may be fetched once some of them end.
    #[error(
        "this requester's fetches in progress hold {} of its share of this host's disk budget \
         for blobs, {}: no room for a blob of {} until some of them end",
        format_bytes(*.held), format_bytes(*.share), format_bytes(*.size)
    )]
    ShareTaken { size: u64, share: u64, held: u64 },
    /// The blob is larger than one requester's share of the budget
    /// ([`PEER_SHARE`]): it is never fetched here.
    #[error(
        "a blob of {} is more than one requester's share of this host's disk budget for \
         blobs, {}",
        format_bytes(*.size), format_bytes(*.share)
    )]
    OverShare { size: u64, share: u64 },
}

impl BlobStore {
    /// Opens the store with a budget of `budget` bytes, removing temporary
    /// files a crash left behind and taking stock of the blobs there.
    /// Blocking.
    pub fn open(dir: &Path, budget: u64) -> std::io::Result<Self> {
        Self::open_counting(dir, budget, BLOCK)
    }

    /// [`BlobStore::open`], counting files in blocks of `block` bytes
    /// (tests count single bytes).
    fn open_counting(dir: &Path, budget: u64, block: u64) -> std::io::Result<Self> {
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
                        space.insert(id, charge(meta.len(), block), used);
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
                block,
                state: AtomicU64::new(0),
                space: Mutex::new(space),
                serving: Mutex::new(Serving::default()),
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

    /// The bytes the stored blobs take (in whole blocks), plus the room
    /// fetches in progress have reserved.
    pub fn used(&self) -> u64 {
        let space = self.shared.space();
        space.stored + space.reserved
    }

    /// Keeps `id` from eviction until the pin is dropped. The blob need not
    /// be stored yet.
    pub fn pin(&self, id: &BlobId) -> BlobPin {
        self.shared.space().pin(id);
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
            Err(BlobError::NoRoom { .. }) => {
                tracing::warn!(
                    blob = %expected,
                    size,
                    budget = self.budget(),
                    "the owner's blob is stored beyond the blob budget: what is stored is in use"
                );
                None
            }
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

    /// Reads up to `len` bytes at `offset`, and the blob's total size: all
    /// of `len` (at most [`MAX_BLOB_CHUNK`]) unless the blob ends sooner,
    /// the length a fetch requires of a chunk. Blocking.
    pub fn read_chunk(
        &self,
        id: &BlobId,
        offset: u64,
        len: u32,
    ) -> std::io::Result<(u64, Vec<u8>)> {
        self.shared.read_chunk(id, offset, len)
    }

    /// [`BlobStore::read_chunk`] on a blocking thread.
    pub async fn load_chunk(
        &self,
        id: BlobId,
        offset: u64,
        len: u32,
    ) -> std::io::Result<(u64, Vec<u8>)> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.read_chunk(&id, offset, len))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
    }

    /// Takes room for a chunk of `len` bytes to be served to `peer` out of
    /// [`MAX_SERVING_BYTES`] and the peer's share of it,
    /// [`MAX_SERVING_BYTES_PER_PEER`], until the permit is dropped; `None`
    /// when either is taken (the peer is then answered
    /// [`BlobResponse::Busy`]).
    pub fn serving_permit(&self, peer: PeerId, len: u32) -> Option<ServingPermit> {
        let bytes = u64::from(len.min(MAX_BLOB_CHUNK)).max(MIN_SERVING_CHARGE);
        let mut serving = self.shared.serving();
        let mine = serving.peers.get(&peer).copied().unwrap_or(0);
        if serving.total + bytes > MAX_SERVING_BYTES || mine + bytes > MAX_SERVING_BYTES_PER_PEER {
            return None;
        }
        serving.total += bytes;
        serving.peers.insert(peer, mine + bytes);
        Some(ServingPermit {
            shared: Arc::clone(&self.shared),
            peer,
            bytes,
        })
    }

    /// Makes sure `blob` is in the store, fetching it from `peer` if not,
    /// and pins it: it stays until the returned pin is dropped. Before
    /// fetching, checks the blob would fit in `peer`'s share of the disk
    /// budget beside its other fetches in progress (or fails with
    /// [`BlobError::ShareTaken`] or [`BlobError::OverShare`]) and in the
    /// budget (or fails with [`BlobError::NoRoom`]), and makes the room as its chunks
    /// arrive. Requires every chunk to be exactly as long as asked, charges
    /// `bucket` for each chunk once it arrived, asks again after a pause a
    /// peer that is busy, and verifies size and hash before the blob
    /// becomes visible. Gives up on a peer that sends it slower than
    /// `MIN_FETCH_RATE`.
    pub async fn fetch(
        &self,
        net: &NetHandle,
        peer: PeerId,
        blob: BlobRef,
        bucket: &TokenBucket,
    ) -> Result<BlobPin, BlobError> {
        let limits = FetchLimits::for_size(blob.size);
        self.fetch_from(peer, blob, bucket, limits, |request| {
            net.fetch_blob(peer, request)
        })
        .await
    }

    /// [`BlobStore::fetch`], asking `peer` for each chunk through `ask`
    /// and giving it `limits` (plus the waits on `bucket`).
    async fn fetch_from<F, Fut, E>(
        &self,
        peer: PeerId,
        blob: BlobRef,
        bucket: &TokenBucket,
        limits: FetchLimits,
        ask: F,
    ) -> Result<BlobPin, BlobError>
    where
        F: FnMut(BlobRequest) -> Fut,
        Fut: Future<Output = Result<BlobResponse, E>>,
        E: std::fmt::Display,
    {
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
        // Removes the lock entry however this fetch ends, cancelled
        // included, once no other fetch waits on it.
        let entry = FetchEntry {
            store: self,
            key,
            lock,
        };
        let _guard = entry.lock.lock().await;
        if self.has(&blob.id) {
            self.mark_used(blob.id).await;
            return Ok(pin);
        }
        // Evicts nothing yet: room is made as the bytes arrive. Counted in
        // the requester's share until the fetch ends.
        let room = self.shared.promise_for(peer, blob.size)?;
        self.fetch_unlocked(blob, bucket, limits, room, ask).await?;
        Ok(pin)
    }

    /// Marks a stored blob as just used (a fetch found it here, or its
    /// owner asked for it), so hot modules stay: in memory every time, on
    /// disk (a blocking call) only when its file's mtime is
    /// `TOUCH_EVERY` (a minute) behind.
    pub async fn mark_used(&self, id: BlobId) {
        if self.shared.mark_used_in_memory(&id) {
            return;
        }
        let shared = Arc::clone(&self.shared);
        let _ = tokio::task::spawn_blocking(move || shared.touch(&id)).await;
    }

    async fn fetch_unlocked<F, Fut, E>(
        &self,
        blob: BlobRef,
        bucket: &TokenBucket,
        limits: FetchLimits,
        mut room: Reservation,
        mut ask: F,
    ) -> Result<(), BlobError>
    where
        F: FnMut(BlobRequest) -> Fut,
        Fut: Future<Output = Result<BlobResponse, E>>,
        E: std::fmt::Display,
    {
        let id = blob.id;
        let bad = |reason: String| BlobError::BadChunk { id, reason };
        // Waits on our own bucket move the deadline: they are not the
        // peer's slowness. They are for bytes that arrived, each chunk
        // exactly as long as asked, so they add up to no more than the
        // blob's size at the bucket's rate (shared with other transfers).
        let mut deadline = Instant::now() + limits.whole;
        // The end of the last chunk (or the start), and its bucket wait.
        let mut progress = Instant::now();
        // Deleted if the fetch fails or is cancelled.
        let tmp = TempFile(self.shared.temp_path(&id));
        let mut file = tokio::fs::File::create(&tmp.0).await?;
        let mut hasher = blake3::Hasher::new();
        let mut offset = 0u64;
        let mut busy_wait = BUSY_RETRY_FIRST;
        while offset < blob.size {
            let len = u32::try_from((blob.size - offset).min(u64::from(MAX_BLOB_CHUNK)))
                .unwrap_or(MAX_BLOB_CHUNK);
            let chunk = limits.chunk(len);
            let due = deadline.min(progress + chunk);
            let too_slow = || {
                if due < deadline {
                    BlobError::Stalled { id, limit: chunk }
                } else {
                    BlobError::TooSlow {
                        id,
                        limit: limits.whole,
                    }
                }
            };
            let response = tokio::time::timeout_at(due, ask(BlobRequest { id, offset, len }))
                .await
                .map_err(|_| too_slow())?
                .map_err(|e| BlobError::Network {
                    id,
                    reason: e.to_string(),
                })?;
            let data = match response {
                BlobResponse::NotFound => return Err(BlobError::NotFound(id)),
                BlobResponse::Busy => {
                    // Serving others: asked again after a pause, which is
                    // the peer's slowness and counts against the deadline.
                    tokio::time::sleep_until(due.min(Instant::now() + busy_wait)).await;
                    if Instant::now() >= due {
                        return Err(too_slow());
                    }
                    busy_wait = (busy_wait * 2).min(BUSY_RETRY_MAX);
                    continue;
                }
                BlobResponse::Invalid(why) => {
                    return Err(bad(format!("peer refused our request: {why}")));
                }
                BlobResponse::Chunk { total, data } => {
                    // An honest peer sends exactly what was asked: the
                    // blob's size, and all of `len` (the blob has that
                    // much left). Anything else ends the fetch.
                    let wrong = if total != blob.size {
                        Some(format!(
                            "the peer says the blob has {total} bytes, its reference {}",
                            blob.size
                        ))
                    } else if data.len() != len as usize {
                        Some(format!(
                            "the peer sent {} bytes at offset {offset} where it must send \
                             exactly {len}: a short or long chunk is a misbehaving peer's",
                            data.len()
                        ))
                    } else {
                        None
                    };
                    if let Some(reason) = wrong {
                        // The bytes came over our link all the same: counted,
                        // without a wait, as the fetch ends here.
                        let _ = bucket.reserve(data.len() as u64);
                        return Err(bad(reason));
                    }
                    data
                }
            };
            busy_wait = BUSY_RETRY_FIRST;
            let received = data.len() as u64;
            // Room for them, now that they are here.
            room = self.take_room(room, received).await?;
            hasher.update(&data);
            tokio::time::timeout_at(due, file.write_all(&data))
                .await
                .map_err(|_| too_slow())??;
            offset += received;
            drop(data);
            // Paced for the bytes that arrived, once they arrived (a reply
            // that carries none costs the node's allowance nothing), and
            // once they are on disk: the wait holds no chunk in memory.
            let paced = Instant::now();
            bucket.take(received).await;
            deadline += paced.elapsed();
            progress = Instant::now();
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
        // And for the rest of the blocks its file takes, so that committing
        // it takes the store no further than the room it holds.
        let slack = self.shared.charge(blob.size) - blob.size;
        if slack > 0 {
            room = self.take_room(room, slack).await?;
        }
        let (path, shared) = (tmp.0.clone(), Arc::clone(&self.shared));
        tokio::task::spawn_blocking(move || shared.commit(&path, &id, blob.size, Some(room)))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok(())
    }
}

impl BlobStore {
    /// Grows `room` by `bytes`, evicting (on a blocking thread) if need be.
    async fn take_room(&self, mut room: Reservation, bytes: u64) -> Result<Reservation, BlobError> {
        if self.shared.grow_without_evicting(&mut room, bytes) {
            return Ok(room);
        }
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || shared.grow(&mut room, bytes).map(|()| room))
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?
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

    fn serving(&self) -> MutexGuard<'_, Serving> {
        self.serving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// See [`BlobStore::read_chunk`]. Blocking.
    fn read_chunk(&self, id: &BlobId, offset: u64, len: u32) -> std::io::Result<(u64, Vec<u8>)> {
        let mut file = std::fs::File::open(self.path(id))?;
        let total = file.metadata()?.len();
        let start = offset.min(total);
        let want = (total - start).min(u64::from(len.min(MAX_BLOB_CHUNK)));
        file.seek(SeekFrom::Start(start))?;
        let mut data = vec![0u8; usize::try_from(want).unwrap_or(0)];
        file.read_exact(&mut data)?;
        Ok((total, data))
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
            space.insert(*id, self.charge(size), SystemTime::now());
            if let Some(mut room) = room {
                room.release(&mut space);
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
        match space.mark_used(id, now) {
            Some(stored) => {
                stored.touched = now;
                true
            }
            // Renamed in by a concurrent fetch that has not counted it yet
            // (counting it twice only replaces the entry), or put there
            // behind the store's back. Checked under the lock, as evictions
            // rename blobs away under it.
            None if self.path(id).is_file() => {
                space.insert(*id, self.charge(size), now);
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
        match self.space().mark_used(id, now) {
            Some(stored) => now
                .duration_since(stored.touched)
                .is_ok_and(|behind| behind < TOUCH_EVERY),
            None => false,
        }
    }

    /// What a file of `size` bytes is counted as: whole blocks, one at
    /// least.
    fn charge(&self, size: u64) -> u64 {
        charge(size, self.block)
    }

    /// Bytes of the budget that evicting every unpinned blob would not
    /// free: pinned blobs, reserved room, promised room and the node's
    /// state.
    fn in_use(&self, space: &Space) -> u64 {
        let state = self.state.load(Ordering::Relaxed);
        space.pinned + space.reserved + space.promised + state
    }

    /// Starts the accounting of a blob of `size` bytes about to be fetched:
    /// fails with [`BlobError::NoRoom`] unless it would fit with every
    /// unpinned blob evicted, beside what other fetches in progress have
    /// reserved or still expect. Evicts nothing: the returned reservation
    /// is grown ([`Shared::grow`]) as the bytes arrive.
    fn promise(self: &Arc<Self>, size: u64) -> Result<Reservation, BlobError> {
        self.promise_locked(&mut self.space(), size)
    }

    /// [`Shared::promise`] for a fetch from `peer`, which holds the blob's
    /// whole charge in the peer's share of the budget ([`PEER_SHARE`])
    /// until the reservation is committed or dropped. Fails with
    /// [`BlobError::ShareTaken`] if the peer's other fetches in progress
    /// leave too little of its share, with [`BlobError::OverShare`] if the
    /// blob is larger than the share.
    fn promise_for(self: &Arc<Self>, peer: PeerId, size: u64) -> Result<Reservation, BlobError> {
        let charge = self.charge(size);
        let share = self.budget / PEER_SHARE;
        if charge > share {
            return Err(BlobError::OverShare { size, share });
        }
        let mut space = self.space();
        let held = space.shares.get(&peer).copied().unwrap_or(0);
        if held.saturating_add(charge) > share {
            return Err(BlobError::ShareTaken { size, share, held });
        }
        let mut room = self.promise_locked(&mut space, size)?;
        *space.shares.entry(peer).or_insert(0) += charge;
        room.share = Some((peer, charge));
        Ok(room)
    }

    /// [`Shared::promise`], with the store's accounting locked.
    fn promise_locked(
        self: &Arc<Self>,
        space: &mut Space,
        size: u64,
    ) -> Result<Reservation, BlobError> {
        let charge = self.charge(size);
        let in_use = self.in_use(space);
        if in_use.saturating_add(charge) > self.budget {
            return Err(BlobError::NoRoom {
                size,
                budget: self.budget,
                in_use,
            });
        }
        space.promised += charge;
        Ok(Reservation {
            shared: Arc::clone(self),
            size,
            reserved: 0,
            promised: charge,
            share: None,
        })
    }

    /// Reserves `bytes` more for `room` if that needs no eviction (the
    /// common case, and no I/O); says whether it did.
    fn grow_without_evicting(&self, room: &mut Reservation, bytes: u64) -> bool {
        let mut space = self.space();
        let state = self.state.load(Ordering::Relaxed);
        let used = space.stored + space.reserved + state;
        if used.saturating_add(bytes) > self.budget {
            return false;
        }
        room.take(&mut space, bytes);
        true
    }

    /// Reserves `bytes` more for `room` (bytes of its blob that arrived),
    /// out of its promise, evicting the least recently used unpinned blobs
    /// if need be. Fails with [`BlobError::NoRoom`], evicting nothing, if
    /// even evicting every one would not do (blobs were pinned or the
    /// node's state grew since the promise). Blocking.
    fn grow(&self, room: &mut Reservation, bytes: u64) -> Result<(), BlobError> {
        let evicted = {
            let mut space = self.space();
            let evicted = self.evict_for(&mut space, bytes).map_err(|e| match e {
                // Told as the whole blob not fitting beside the rest.
                BlobError::NoRoom { budget, .. } => BlobError::NoRoom {
                    size: room.size,
                    budget,
                    in_use: self
                        .in_use(&space)
                        .saturating_sub(room.reserved + room.promised),
                },
                e => e,
            })?;
            room.take(&mut space, bytes);
            evicted
        };
        // A peer that sends distinct blobs evicts at will: the owner reads
        // a few lines a minute of it, the rest go to `debug`.
        if !evicted.is_empty() {
            if EVICTIONS_LOGGED.allow() {
                tracing::info!(
                    "evicted {} least recently used blob(s) to make room for one of {}",
                    evicted.len(),
                    format_bytes(room.size)
                );
            } else {
                tracing::debug!(
                    "evicted {} least recently used blob(s) to make room for one of {}",
                    evicted.len(),
                    format_bytes(room.size)
                );
            }
        }
        drop(evicted);
        Ok(())
    }

    /// Reserves room for a blob of `size` bytes at once (the owner's own,
    /// its bytes in hand), evicting the least recently used unpinned blobs
    /// if need be. Blocking.
    fn make_room(self: &Arc<Self>, size: u64) -> Result<Reservation, BlobError> {
        let mut room = self.promise(size)?;
        self.grow(&mut room, self.charge(size))?;
        Ok(room)
    }

    /// Evicts the least recently used unpinned blobs until `bytes` more fit
    /// beside the stored blobs, the reserved room and the node's state (not
    /// the promised room: that is made as its bytes arrive), and returns
    /// the evicted files, removed when dropped (after the lock is
    /// released). Fails with [`BlobError::NoRoom`] for `bytes`, evicting
    /// nothing, if evicting every unpinned blob would not do.
    fn evict_for(&self, space: &mut Space, bytes: u64) -> Result<Vec<TempFile>, BlobError> {
        let mut evicted = Vec::new();
        let state = self.state.load(Ordering::Relaxed);
        let used = space.stored + space.reserved + state;
        if used.saturating_add(bytes) <= self.budget {
            return Ok(evicted);
        }
        let in_use = space.pinned + space.reserved + state;
        if in_use.saturating_add(bytes) > self.budget {
            return Err(BlobError::NoRoom {
                size: bytes,
                budget: self.budget,
                in_use,
            });
        }
        // The least recently used unpinned blobs that make room: pinned
        // ones (held by fetches and running tasks, a few) are passed over.
        let mut victims = Vec::new();
        let mut left = used;
        for (_, id) in &space.by_use {
            if left.saturating_add(bytes) <= self.budget {
                break;
            }
            if let (false, Some(stored)) = (space.pins.contains_key(id), space.blobs.get(id)) {
                victims.push(*id);
                left -= stored.charge;
            }
        }
        for id in victims {
            // Out of its name under the lock, so no fetch finds it there
            // unpinned; removed once the lock is released.
            let doomed = self.temp_path(&id);
            match std::fs::rename(self.path(&id), &doomed) {
                Ok(()) => evicted.push(TempFile(doomed)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            space.remove(&id);
        }
        Ok(evicted)
    }
}

/// What a file of `size` bytes is counted as, in blocks of `block` bytes:
/// whole blocks, one at least.
fn charge(size: u64, block: u64) -> u64 {
    size.div_ceil(block).max(1).saturating_mul(block)
}

impl Space {
    /// Counts a stored blob charged `charge` bytes, last used at `used`, in
    /// place of any entry it had.
    fn insert(&mut self, id: BlobId, charge: u64, used: SystemTime) {
        self.remove(&id);
        let stored = Stored {
            charge,
            used,
            touched: used,
        };
        self.blobs.insert(id, stored);
        self.by_use.insert((used, id));
        self.stored += charge;
        if self.pins.contains_key(&id) {
            self.pinned += charge;
        }
    }

    fn remove(&mut self, id: &BlobId) {
        if let Some(old) = self.blobs.remove(id) {
            self.by_use.remove(&(old.used, *id));
            self.stored -= old.charge;
            if self.pins.contains_key(id) {
                self.pinned -= old.charge;
            }
        }
    }

    /// Marks a counted blob as used at `now`; its entry, if it has one.
    fn mark_used(&mut self, id: &BlobId, now: SystemTime) -> Option<&mut Stored> {
        let stored = self.blobs.get_mut(id)?;
        self.by_use.remove(&(stored.used, *id));
        self.by_use.insert((now, *id));
        stored.used = now;
        Some(stored)
    }

    fn pin(&mut self, id: &BlobId) {
        let count = self.pins.entry(*id).or_insert(0);
        *count += 1;
        if *count == 1
            && let Some(stored) = self.blobs.get(id)
        {
            self.pinned += stored.charge;
        }
    }

    fn unpin(&mut self, id: &BlobId) {
        let Some(count) = self.pins.get_mut(id) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.pins.remove(id);
            if let Some(stored) = self.blobs.get(id) {
                self.pinned -= stored.charge;
            }
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
        self.shared.space().unpin(&self.id);
    }
}

/// A blob's room in the budget while it is written: reserved for its bytes
/// that arrived, promised for the rest; and, for a fetch, the blob's whole
/// charge in its requester's share ([`PEER_SHARE`]). Becomes the stored
/// blob when committed; given back if the fetch fails or is dropped.
#[derive(Debug)]
struct Reservation {
    shared: Arc<Shared>,
    /// The blob's size.
    size: u64,
    reserved: u64,
    promised: u64,
    /// The requester whose share this holds, and how much of it.
    share: Option<(PeerId, u64)>,
}

impl Reservation {
    /// Moves `bytes` from promised to reserved (counting any beyond the
    /// promise as reserved too).
    fn take(&mut self, space: &mut Space, bytes: u64) {
        let promised = bytes.min(self.promised);
        self.promised -= promised;
        space.promised = space.promised.saturating_sub(promised);
        self.reserved += bytes;
        space.reserved += bytes;
    }

    /// Gives the room back to `space`, and the requester's share.
    fn release(&mut self, space: &mut Space) {
        space.reserved = space.reserved.saturating_sub(self.reserved);
        space.promised = space.promised.saturating_sub(self.promised);
        self.reserved = 0;
        self.promised = 0;
        if let Some((peer, bytes)) = self.share.take()
            && let Some(held) = space.shares.get_mut(&peer)
        {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                space.shares.remove(&peer);
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Released already when committed (under the lock, so it must not
        // be taken again).
        if self.reserved > 0 || self.promised > 0 || self.share.is_some() {
            let shared = Arc::clone(&self.shared);
            self.release(&mut shared.space());
        }
    }
}

/// Room for one chunk in [`MAX_SERVING_BYTES`], held from reading the chunk
/// until it is handed to the network; see [`BlobStore::serving_permit`].
#[derive(Debug)]
#[must_use = "the room is given back as soon as the permit is dropped"]
pub struct ServingPermit {
    shared: Arc<Shared>,
    peer: PeerId,
    bytes: u64,
}

impl Drop for ServingPermit {
    fn drop(&mut self) {
        let mut serving = self.shared.serving();
        serving.total = serving.total.saturating_sub(self.bytes);
        if let Some(mine) = serving.peers.get_mut(&self.peer) {
            *mine = mine.saturating_sub(self.bytes);
            if *mine == 0 {
                serving.peers.remove(&self.peer);
            }
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

/// A fetch's hold on the lock for its blob and peer, whose entry goes when
/// the last fetch that holds it ends: a fetch that came later while others
/// still waited on it would otherwise make a new lock, and fetch the blob a
/// second time beside them.
struct FetchEntry<'a> {
    store: &'a BlobStore,
    key: (BlobId, PeerId),
    lock: FetchLock,
}

impl Drop for FetchEntry<'_> {
    fn drop(&mut self) {
        let mut fetching = self
            .store
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // This fetch's hold goes first, under the map's lock (where holds
        // are taken too), so what remains counts the others exactly.
        drop(std::mem::take(&mut self.lock));
        if fetching
            .get(&self.key)
            .is_some_and(|lock| Arc::strong_count(lock) == 1)
        {
            fetching.remove(&self.key);
        }
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

    /// A store that counts single bytes, not blocks, so the figures below
    /// are the blobs' own sizes.
    fn open_exact(dir: &Path, budget: u64) -> std::io::Result<BlobStore> {
        BlobStore::open_counting(dir, budget, 1)
    }

    /// The sums and the order `Space` keeps agree with its blobs and pins,
    /// counted from scratch.
    fn assert_consistent(store: &BlobStore) {
        let space = store.shared.space();
        let charges = |pinned: bool| -> u64 {
            space
                .blobs
                .iter()
                .filter(|(id, _)| space.pins.contains_key(id) == pinned)
                .map(|(_, stored)| stored.charge)
                .sum()
        };
        assert_eq!(space.pinned, charges(true));
        assert_eq!(space.stored, charges(true) + charges(false));
        let order: BTreeSet<_> = space.blobs.iter().map(|(id, s)| (s.used, *id)).collect();
        assert_eq!(space.by_use, order);
    }

    #[test]
    fn a_blob_is_counted_in_whole_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::open(dir.path(), 4 * BLOCK).unwrap();
        // An empty blob takes a block, as does a byte; one more than a
        // block takes two.
        let empty = store.put(b"").unwrap();
        let byte = store.put(b"x").unwrap();
        assert_eq!(store.used(), 2 * BLOCK);
        let big = store.put(&vec![1u8; BLOCK as usize + 1]).unwrap();
        assert_eq!(store.used(), 4 * BLOCK);
        // Used in this order, oldest first.
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        for (i, id) in [empty, byte, big].iter().enumerate() {
            std::fs::File::open(store.path(id))
                .unwrap()
                .set_modified(t0 + Duration::from_secs(i as u64 * 60))
                .unwrap();
        }
        drop(store);
        let store = BlobStore::open(dir.path(), 4 * BLOCK).unwrap();
        assert_eq!(store.used(), 4 * BLOCK);
        // So the store is full: a one-byte blob from a peer evicts the
        // least recently used (where counting bytes it would have fitted
        // beside the 4 098 stored), and one a block larger than the budget
        // never fits.
        let _pin = store.pin(&big);
        assert!(store.shared.make_room(1).is_ok());
        assert!(!store.has(&empty) && store.has(&byte));
        assert!(matches!(
            store.shared.make_room(3 * BLOCK),
            Err(BlobError::NoRoom { .. })
        ));
        assert_consistent(&store);
    }

    #[test]
    fn blobs_are_stored_verified_and_chunked() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 1 << 20).unwrap();
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
        open_exact(dir.path(), 1 << 20).unwrap();
        assert!(!dir.path().join(".abc.1.tmp").exists());
    }

    /// A store of `budget` bytes holding three 30-byte blobs, last used in
    /// the order given (oldest first), reopened so it walks them.
    fn store_of_three(dir: &Path, budget: u64) -> (BlobStore, [BlobId; 3]) {
        store_of_three_sized(dir, budget, 30)
    }

    /// [`store_of_three`] with blobs of `size` bytes.
    fn store_of_three_sized(dir: &Path, budget: u64, size: usize) -> (BlobStore, [BlobId; 3]) {
        let store = open_exact(dir, budget).unwrap();
        let ids = [b'a', b'b', b'c'].map(|c| store.put(&vec![c; size]).unwrap());
        let t0 = SystemTime::now() - Duration::from_secs(3600);
        for (i, id) in ids.iter().enumerate() {
            std::fs::File::open(store.path(id))
                .unwrap()
                .set_modified(t0 + Duration::from_secs(i as u64 * 60))
                .unwrap();
        }
        drop(store);
        let store = open_exact(dir, budget).unwrap();
        assert_eq!(store.used(), 3 * size as u64);
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
        let store = open_exact(dir.path(), 100).unwrap();
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
        assert_consistent(&store);
        drop(pin_a_again);
        assert!(store.shared.space().pins.is_empty());
        assert_consistent(&store);
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
        let big = open_exact(tempfile::tempdir().unwrap().path(), 100).unwrap();
        assert!(matches!(
            big.shared.make_room(101),
            Err(BlobError::NoRoom { in_use: 0, .. })
        ));
    }

    #[test]
    fn usage_follows_commits_and_the_owners_uploads() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 100).unwrap();
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
        assert_consistent(&store);
    }

    #[test]
    fn the_nodes_state_takes_its_part_of_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 100).unwrap();
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

    /// What an honest peer holding `bytes` answers `request`: the same as
    /// [`BlobStore::read_chunk`].
    fn honest(bytes: &[u8], request: &BlobRequest) -> BlobResponse {
        let total = bytes.len() as u64;
        let start = request.offset.min(total);
        let end = (start + u64::from(request.len)).min(total);
        BlobResponse::Chunk {
            total,
            data: bytes[start as usize..end as usize].to_vec(),
        }
    }

    /// A blob of two full chunks and a bit, of bytes that differ.
    fn two_chunks_and_a_bit() -> Vec<u8> {
        (0..2 * MAX_BLOB_CHUNK as usize + 5)
            .map(|i| (i % 251) as u8)
            .collect()
    }

    fn no_temporary_files(dir: &Path) {
        let stray: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    const LIMIT: FetchLimits = FetchLimits {
        whole: Duration::from_secs(30),
        chunk_grace: Duration::from_secs(30),
    };

    /// A fetch that fails hands the blob's lock to the one waiting on it,
    /// and a fetch that comes meanwhile waits on the same lock: the blob
    /// is fetched once at a time, not twice side by side.
    #[tokio::test]
    async fn a_fetch_that_comes_while_another_waits_shares_its_lock() {
        use tokio::sync::Notify;
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 64 << 20).unwrap();
        let bytes = vec![7u8; 1000];
        let blob = BlobRef::of(&bytes);
        let (bucket, peer) = (TokenBucket::new(None), PeerId::random());
        let (a_asks, fail_a) = (Notify::new(), Notify::new());
        let (b_asks, answer_b) = (Notify::new(), Notify::new());
        let c_asked = std::sync::atomic::AtomicUsize::new(0);
        // A asks, then fails once told to; B waits on A's lock.
        let a = store.fetch_from(peer, blob, &bucket, LIMIT, |_| {
            a_asks.notify_one();
            let fail = fail_a.notified();
            async move {
                fail.await;
                Err::<BlobResponse, _>("gone".to_string())
            }
        });
        let b = async {
            a_asks.notified().await;
            store
                .fetch_from(peer, blob, &bucket, LIMIT, |request| {
                    b_asks.notify_one();
                    let response = honest(&bytes, &request);
                    let answer = answer_b.notified();
                    async move {
                        answer.await;
                        Ok::<_, String>(response)
                    }
                })
                .await
        };
        // C comes while B fetches, after A's fetch ended.
        let c = async {
            b_asks.notified().await;
            store
                .fetch_from(peer, blob, &bucket, LIMIT, |request| {
                    c_asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let response = honest(&bytes, &request);
                    async move { Ok::<_, String>(response) }
                })
                .await
        };
        let driver = async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            fail_a.notify_one();
            tokio::time::sleep(Duration::from_millis(100)).await;
            answer_b.notify_one();
        };
        let (a, b, c, ()) = tokio::join!(a, b, c, driver);
        assert!(a.is_err());
        assert_eq!(b.unwrap().id(), &blob.id);
        assert_eq!(c.unwrap().id(), &blob.id);
        assert_eq!(
            c_asked.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "C waited for B's fetch and found the blob"
        );
        assert!(store.fetching.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_honest_peer_is_paced_for_the_bytes_it_sends() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 64 << 20).unwrap();
        let bytes = two_chunks_and_a_bit();
        let blob = BlobRef::of(&bytes);
        let bucket = TokenBucket::new(None);
        let mut asked = Vec::new();
        let pin = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                asked.push((request.offset, request.len));
                let response = honest(&bytes, &request);
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap();
        assert_eq!(pin.id(), &blob.id);
        // One request a chunk, each for all that is left up to a chunk.
        let chunk = MAX_BLOB_CHUNK;
        assert_eq!(
            asked,
            [
                (0, chunk),
                (u64::from(chunk), chunk),
                (2 * u64::from(chunk), 5)
            ]
        );
        assert_eq!(bucket.moved(), blob.size);
        assert_eq!(std::fs::read(store.path(&blob.id)).unwrap(), bytes);
        assert_eq!(store.used(), blob.size);
        let space = store.shared.space();
        assert_eq!((space.reserved, space.promised), (0, 0));
    }

    /// A fetched blob makes room for the whole blocks its file takes
    /// before it is committed: a full store stays within its budget.
    #[tokio::test]
    async fn a_fetched_blob_takes_room_for_its_last_block_too() {
        let dir = tempfile::tempdir().unwrap();
        // Room for the old blob's two blocks and the new one's bytes, not
        // for its block.
        let budget = 3 * BLOCK - 5;
        let store = BlobStore::open(dir.path(), budget).unwrap();
        let old = store.put(&vec![1u8; BLOCK as usize + 1]).unwrap();
        assert_eq!(store.used(), 2 * BLOCK);
        let bytes = b"a few bytes".to_vec();
        let blob = BlobRef::of(&bytes);
        let bucket = TokenBucket::new(None);
        let _pin = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                let response = honest(&bytes, &request);
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap();
        assert!(!store.has(&old));
        assert_eq!(store.used(), BLOCK);
        let space = store.shared.space();
        assert_eq!((space.reserved, space.promised), (0, 0));
        drop(space);
        assert_consistent(&store);
    }

    #[tokio::test]
    async fn a_peer_that_sends_short_chunks_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 64 << 20).unwrap();
        let bytes = two_chunks_and_a_bit();
        let blob = BlobRef::of(&bytes);
        // The node's download allowance: a reply of one byte costs one byte
        // of it, not a chunk's worth.
        let bucket = TokenBucket::new(Some(1 << 20));
        let mut asked = 0;
        let err = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                asked += 1;
                let response = BlobResponse::Chunk {
                    total: blob.size,
                    data: vec![bytes[request.offset as usize]],
                };
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::BadChunk { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!(
                "peer sent a bad chunk of blob {}: the peer sent 1 bytes at offset 0 where it \
                 must send exactly 1048576: a short or long chunk is a misbehaving peer's",
                blob.id
            )
        );
        assert_eq!(
            asked, 1,
            "no second request to a peer that sent a short chunk"
        );
        assert_eq!(bucket.moved(), 1);
        assert!(!store.has(&blob.id));
        assert_eq!(store.used(), 0);
        let space = store.shared.space();
        assert_eq!((space.reserved, space.promised), (0, 0));
        drop(space);
        no_temporary_files(dir.path());
    }

    #[tokio::test]
    async fn a_peer_that_sends_a_long_last_chunk_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 64 << 20).unwrap();
        let bytes = two_chunks_and_a_bit();
        let blob = BlobRef::of(&bytes);
        let bucket = TokenBucket::new(None);
        let err = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                let mut response = honest(&bytes, &request);
                if let BlobResponse::Chunk { data, .. } = &mut response
                    && request.len < MAX_BLOB_CHUNK
                {
                    data.push(0);
                }
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("6 bytes at offset 2097152 where it must send exactly 5"),
            "{err}"
        );
        // Everything that arrived was counted, the refused chunk too.
        assert_eq!(bucket.moved(), blob.size + 1);
        assert!(!store.has(&blob.id));
        assert_eq!(store.used(), 0);
        no_temporary_files(dir.path());
    }

    #[tokio::test]
    async fn a_peer_without_the_blob_evicts_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, ids) = store_of_three(dir.path(), 200);
        // With the node's state taking half the budget, a blob of the
        // requester's whole share fits only with all three evicted; the
        // peer does not have it.
        store.set_state_bytes(100);
        let blob = BlobRef {
            id: BlobId::of(b"never sent"),
            size: 100,
        };
        let bucket = TokenBucket::new(None);
        let mut asked = 0;
        let err = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |_| {
                asked += 1;
                // Nothing was evicted before the peer answered: the room is
                // only promised.
                assert!(ids.iter().all(|id| store.has(id)));
                assert_eq!(store.used(), 90);
                assert_eq!(store.shared.space().promised, 100);
                async { Ok::<_, String>(BlobResponse::NotFound) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::NotFound(_)), "{err}");
        assert_eq!(asked, 1);
        assert!(ids.iter().all(|id| store.has(id)));
        assert_eq!(store.used(), 90);
        assert_eq!(store.shared.space().promised, 0);
        assert_eq!(bucket.moved(), 0);
    }

    #[tokio::test]
    async fn room_is_made_as_the_chunks_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let chunk = MAX_BLOB_CHUNK as usize;
        let budget = 4 * chunk as u64;
        // Four blobs of a chunk each, `a` the oldest: the store is full,
        // and the blob fetched is the requester's whole share.
        let (store, [a, b, c]) = store_of_three_sized(dir.path(), budget, chunk);
        let d = store.put(&vec![b'd'; chunk]).unwrap();
        let bytes: Vec<u8> = (0..2 * chunk).map(|i| (i % 13) as u8).collect();
        let blob = BlobRef::of(&bytes);
        let bucket = TokenBucket::new(None);
        let mut seen = Vec::new();
        let _pin = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                // What the store held when each chunk was asked for.
                seen.push([a, b, c].map(|id| store.has(&id)));
                assert!(store.used() + store.state_bytes() <= budget);
                let response = honest(&bytes, &request);
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap();
        // Before the first chunk nothing was evicted; it took the oldest
        // blob's room, and the second chunk the next one's.
        assert_eq!(seen, [[true, true, true], [false, true, true]]);
        assert!(!store.has(&a) && !store.has(&b) && store.has(&c) && store.has(&d));
        assert!(store.has(&blob.id));
        assert_eq!(store.used(), budget);
        no_temporary_files(dir.path());
    }

    #[tokio::test]
    async fn a_blob_that_cannot_fit_is_refused_before_it_is_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (store, [a, b, c]) = store_of_three(dir.path(), 100);
        let _pins = (store.pin(&a), store.pin(&b));
        let blob = BlobRef {
            id: BlobId::of(b"too big"),
            size: 50,
        };
        let err = store
            .fetch_from(
                PeerId::random(),
                blob,
                &TokenBucket::new(None),
                LIMIT,
                |_| async {
                    unreachable!("asked for a blob that cannot fit") as Result<BlobResponse, String>
                },
            )
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::NoRoom {
                    size: 50,
                    in_use: 60,
                    ..
                }
            ),
            "{err}"
        );
        assert!(store.has(&c));
        // Fetches in progress count with all they still expect, so they
        // never together expect more than the budget.
        let first = store.shared.promise(30).unwrap();
        assert!(matches!(
            store.shared.promise(20),
            Err(BlobError::NoRoom { in_use: 90, .. })
        ));
        drop(first);
        drop(store.shared.promise(20).unwrap());
        assert_eq!(store.shared.space().promised, 0);
        // Blobs pinned since the promise: the room cannot be made as the
        // bytes arrive, and the fetch fails, evicting nothing.
        let mut room = store.shared.promise(40).unwrap();
        let _more = store.pin(&c);
        let err = store.shared.grow(&mut room, 20).unwrap_err();
        assert!(
            matches!(
                err,
                BlobError::NoRoom {
                    size: 40,
                    in_use: 90,
                    ..
                }
            ),
            "{err}"
        );
        assert!(store.has(&a) && store.has(&b) && store.has(&c));
        drop(room);
        let space = store.shared.space();
        assert_eq!((space.reserved, space.promised), (0, 0));
    }

    #[tokio::test]
    async fn a_busy_peer_is_asked_again_after_a_pause() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 1 << 20).unwrap();
        let bytes = b"a module".to_vec();
        let blob = BlobRef::of(&bytes);
        let bucket = TokenBucket::new(None);
        let mut asked = 0;
        let started = Instant::now();
        let _pin = store
            .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                asked += 1;
                let response = if asked <= 2 {
                    BlobResponse::Busy
                } else {
                    honest(&bytes, &request)
                };
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap();
        assert_eq!(asked, 3);
        assert!(
            started.elapsed() >= BUSY_RETRY_FIRST * 3,
            "50 ms, then 100 ms"
        );
        assert!(store.has(&blob.id));
        assert_eq!(bucket.moved(), blob.size);
    }

    #[tokio::test]
    async fn the_deadline_holds_against_a_busy_or_silent_peer() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 1 << 20).unwrap();
        let blob = BlobRef::of(b"a module");
        let bucket = TokenBucket::new(None);
        let limit = Duration::from_millis(400);
        let limits = FetchLimits {
            whole: limit,
            ..LIMIT
        };
        // Always busy: asked again a few times, then too slow.
        let mut asked = 0;
        let started = Instant::now();
        let err = store
            .fetch_from(PeerId::random(), blob, &bucket, limits, |_| {
                asked += 1;
                async { Ok::<_, String>(BlobResponse::Busy) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooSlow { .. }), "{err}");
        // 50 ms, 100 ms, 200 ms, then the deadline (fewer on a loaded
        // machine).
        assert!((1..=4).contains(&asked), "{asked}");
        let took = started.elapsed();
        assert!(took >= limit && took < limit * 10, "{took:?}");
        // Never answers.
        let started = Instant::now();
        let err = store
            .fetch_from(PeerId::random(), blob, &bucket, limits, |_| {
                std::future::pending::<Result<BlobResponse, String>>()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::TooSlow { .. }), "{err}");
        let took = started.elapsed();
        assert!(took >= limit && took < limit * 10, "{took:?}");
        assert_eq!(store.shared.space().promised, 0);
        no_temporary_files(dir.path());
    }

    /// A peer that sends a chunk and then answers `Busy` ends the fetch
    /// within the next chunk's time, however long the whole blob is given:
    /// it cannot keep the room promised to the blob by never sending.
    #[tokio::test]
    async fn a_peer_that_stops_sending_ends_the_fetch_within_a_chunks_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 4 << 20).unwrap();
        let bytes = vec![7u8; MAX_BLOB_CHUNK as usize + 8];
        let blob = BlobRef::of(&bytes);
        let bucket = TokenBucket::new(None);
        let limits = FetchLimits {
            whole: Duration::from_secs(3600),
            chunk_grace: Duration::from_millis(300),
        };
        let started = Instant::now();
        let err = store
            .fetch_from(PeerId::random(), blob, &bucket, limits, |request| {
                let response = if request.offset == 0 {
                    honest(&bytes, &request)
                } else {
                    BlobResponse::Busy
                };
                async move { Ok::<_, String>(response) }
            })
            .await
            .unwrap_err();
        assert!(matches!(err, BlobError::Stalled { .. }), "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(10), "{took:?}");
        let space = store.shared.space();
        assert_eq!((space.reserved, space.promised), (0, 0));
        drop(space);
        no_temporary_files(dir.path());
    }

    /// A peer that never answers, and tells `asked` when it is asked (its
    /// fetch holds its room by then).
    fn silent(
        asked: &tokio::sync::Notify,
    ) -> impl FnMut(BlobRequest) -> std::future::Pending<Result<BlobResponse, String>> + '_ {
        move |_| {
            asked.notify_one();
            std::future::pending()
        }
    }

    /// A made-up blob of `size` bytes, distinct for each `n`.
    fn made_up(n: u8, size: u64) -> BlobRef {
        BlobRef {
            id: BlobId::of(&[n]),
            size,
        }
    }

    /// A requester that names blobs it never sends holds at most half the
    /// budget in fetches in progress: its next fetch fails at once, while
    /// another requester still fetches a blob of its own whole share.
    #[tokio::test]
    async fn one_requester_holds_at_most_its_share_of_the_budget() {
        use tokio::sync::Notify;
        let dir = tempfile::tempdir().unwrap();
        let budget = 400;
        let share = budget / PEER_SHARE;
        let store = open_exact(dir.path(), budget).unwrap();
        let bucket = TokenBucket::new(None);
        let hog = PeerId::random();
        // Two fetches of a quarter of the budget each, whose chunks never
        // come: the hog's whole share.
        let asked = [Notify::new(), Notify::new()];
        let hogging = async {
            tokio::join!(
                store.fetch_from(hog, made_up(0, 100), &bucket, LIMIT, silent(&asked[0])),
                store.fetch_from(hog, made_up(1, 100), &bucket, LIMIT, silent(&asked[1])),
            )
        };
        let others = async {
            asked[0].notified().await;
            asked[1].notified().await;
            assert_eq!(store.shared.space().shares.get(&hog), Some(&share));
            // A third fails at once, asking the peer nothing.
            let err = tokio::time::timeout(
                Duration::from_secs(5),
                store.fetch_from(hog, made_up(2, 100), &bucket, LIMIT, |_| async {
                    unreachable!("asked beyond its share") as Result<BlobResponse, String>
                }),
            )
            .await
            .expect("refused at once, not fetched")
            .map(|_| ())
            .unwrap_err();
            assert!(
                matches!(
                    err,
                    BlobError::ShareTaken {
                        size: 100,
                        share: 200,
                        held: 200
                    }
                ),
                "{err}"
            );
            // Another requester fetches a blob of its whole share.
            let bytes = vec![3u8; share as usize];
            let blob = BlobRef::of(&bytes);
            let pin = store
                .fetch_from(PeerId::random(), blob, &bucket, LIMIT, |request| {
                    let response = honest(&bytes, &request);
                    async move { Ok::<_, String>(response) }
                })
                .await
                .unwrap();
            assert!(store.has(pin.id()));
        };
        tokio::select! {
            biased;
            _ = hogging => unreachable!("the hog's fetches never end"),
            () = others => {}
        }
        // The hog's fetches, dropped, gave their room and share back.
        {
            let space = store.shared.space();
            assert_eq!((space.reserved, space.promised), (0, 0));
            assert!(space.shares.is_empty(), "{:?}", space.shares);
        }
        assert_eq!(store.used(), share);
        // A blob larger than a requester's share is never fetched.
        let err = store
            .fetch_from(
                PeerId::random(),
                made_up(4, share + 1),
                &bucket,
                LIMIT,
                |_| async {
                    unreachable!("asked for too large a blob") as Result<BlobResponse, String>
                },
            )
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, BlobError::OverShare { .. }), "{err}");
        assert_consistent(&store);
    }

    /// A requester's share comes back however its fetch ends: dropped
    /// (cancelled), failed, stalled, or committed.
    #[tokio::test]
    async fn a_requesters_share_comes_back_when_its_fetch_ends() {
        use tokio::sync::Notify;
        let dir = tempfile::tempdir().unwrap();
        let budget = 200;
        let share = budget / PEER_SHARE;
        let store = open_exact(dir.path(), budget).unwrap();
        let bucket = TokenBucket::new(None);
        let hog = PeerId::random();
        // Held while a fetch is in progress; back once it is dropped.
        let (asked, unasked) = (Notify::new(), Notify::new());
        let holding = store.fetch_from(hog, made_up(0, share), &bucket, LIMIT, silent(&asked));
        let meanwhile = async {
            asked.notified().await;
            tokio::time::timeout(
                Duration::from_secs(5),
                store.fetch_from(hog, made_up(1, share), &bucket, LIMIT, silent(&unasked)),
            )
            .await
            .expect("refused at once, not fetched")
            .map(|_| ())
            .unwrap_err()
        };
        let err = tokio::select! {
            biased;
            _ = holding => unreachable!("its chunks never come"),
            err = meanwhile => err,
        };
        assert!(matches!(err, BlobError::ShareTaken { .. }), "{err}");
        assert!(store.shared.space().shares.is_empty());
        // Back after a fetch that failed: the peer did not have the blob...
        let err = store
            .fetch_from(hog, made_up(2, share), &bucket, LIMIT, |_| async {
                Ok::<_, String>(BlobResponse::NotFound)
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, BlobError::NotFound(_)), "{err}");
        assert!(store.shared.space().shares.is_empty());
        // ... or stopped sending.
        let stalls = FetchLimits {
            whole: Duration::from_secs(3600),
            chunk_grace: Duration::from_millis(100),
        };
        let err = store
            .fetch_from(hog, made_up(3, share), &bucket, stalls, |_| async {
                Ok::<_, String>(BlobResponse::Busy)
            })
            .await
            .map(|_| ())
            .unwrap_err();
        assert!(matches!(err, BlobError::Stalled { .. }), "{err}");
        assert!(store.shared.space().shares.is_empty());
        // And after one that was committed, which the blob now takes
        // instead: the next fetch of the whole share evicts it.
        for fill in [4u8, 5] {
            let bytes = vec![fill; share as usize];
            let blob = BlobRef::of(&bytes);
            drop(
                store
                    .fetch_from(hog, blob, &bucket, LIMIT, |request| {
                        let response = honest(&bytes, &request);
                        async move { Ok::<_, String>(response) }
                    })
                    .await
                    .unwrap(),
            );
            assert!(store.shared.space().shares.is_empty());
        }
        let space = store.shared.space();
        assert_eq!((space.reserved, space.promised), (0, 0));
        drop(space);
        assert_eq!(store.used(), 2 * share);
        assert_consistent(&store);
    }

    #[test]
    fn the_serving_budget_bounds_chunks_held_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = open_exact(dir.path(), 1 << 20).unwrap();
        let per_peer = (MAX_SERVING_BYTES_PER_PEER / u64::from(MAX_BLOB_CHUNK)) as usize;
        let peers = (MAX_SERVING_BYTES / MAX_SERVING_BYTES_PER_PEER) as usize;
        let hog = PeerId::random();
        // One peer holds its share, and no more.
        let mut held: Vec<_> = (0..per_peer)
            .map(|_| store.serving_permit(hog, MAX_BLOB_CHUNK).unwrap())
            .collect();
        assert!(store.serving_permit(hog, 1).is_none());
        // Others are still served, up to the node's bound.
        for _ in 1..peers {
            let peer = PeerId::random();
            for _ in 0..per_peer {
                held.push(store.serving_permit(peer, MAX_BLOB_CHUNK).unwrap());
            }
        }
        assert!(store.serving_permit(PeerId::random(), 1).is_none());
        // A chunk sent gives its room back, to its peer's share too.
        drop(held.remove(0));
        let permit = store.serving_permit(hog, MAX_BLOB_CHUNK).unwrap();
        assert!(store.serving_permit(PeerId::random(), 1).is_none());
        drop((held, permit));
        let serving = store.shared.serving();
        assert_eq!(serving.total, 0);
        assert!(serving.peers.is_empty());
    }
}

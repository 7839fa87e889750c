//! Compiled-module caches: on disk across worker restarts, in memory across
//! jobs of one worker.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use spare_core::BlobId;
use wasmtime::Engine;

/// The revision of spare's patch to wasmtime's code generator
/// (`vendor/wasmtime-internal-cranelift`). wasmtime's own compatibility hash
/// cannot see the patch (the version number is unchanged), so artifacts
/// compiled before it would otherwise load and run the old, slower code.
const CODEGEN_PATCH: &str = "fuel checks call out-of-gas through a preserve-all trampoline, r1; fuel reloads its store pointer; loop heads on 64-byte lines";

/// Who may write the cache. Artifacts from builds in which workers, which
/// run guests, wrote it themselves are not trusted: a guest that broke out
/// of wasmtime could have planted them. A new value starts a fresh cache
/// (the old artifacts, used least recently, are the first the sweep
/// removes).
const WRITER: &str = "the compiler alone, a process that runs no guest";

/// Compiled artifacts on disk, one file per module hash, in a directory
/// named after the engine's compatibility hash, [`CODEGEN_PATCH`] and
/// [`WRITER`], so a wasmtime upgrade, a config change, a change to spare's
/// patch of the code generator or to who writes the cache starts a fresh
/// cache instead of loading stale or untrusted code.
#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    /// Whether this process writes artifacts here: a worker that runs
    /// guests only reads them (`worker.rs`).
    writes: bool,
}

impl DiskCache {
    pub(crate) fn new(root: &Path, engine: &Engine, writes: bool) -> std::io::Result<Self> {
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        CODEGEN_PATCH.hash(&mut hasher);
        WRITER.hash(&mut hasher);
        let dir = root.join(format!("wasmtime-{:016x}", hasher.finish()));
        // A reader finds the directory once a writer has made it.
        if writes {
            std::fs::create_dir_all(&dir)?;
        }
        Ok(Self { dir, writes })
    }

    pub(crate) fn writes(&self) -> bool {
        self.writes
    }

    /// Where the artifact for `module` lives (whether or not it exists yet).
    pub(crate) fn path(&self, module: &BlobId) -> PathBuf {
        self.dir.join(format!("{module}.cwasm"))
    }

    /// Stores an artifact atomically: concurrent workers compiling the same
    /// module race harmlessly, and a crash never leaves half a file under the
    /// final name.
    pub(crate) fn store(&self, module: &BlobId, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        let tmp = self
            .dir
            .join(format!("{module}.{}.tmp", std::process::id()));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        // Synced before it gets its name: this file is loaded as trusted code.
        file.sync_data()?;
        std::fs::rename(&tmp, self.path(module))
    }
}

/// Marks a cached artifact as just used, so the sweep keeps it longest.
pub(crate) fn touch(path: &Path) {
    if let Ok(file) = std::fs::File::open(path) {
        let _ = file.set_modified(std::time::SystemTime::now());
    }
}

/// Deletes the least recently used compiled artifacts under `root` (every
/// engine's directory) until they take at most `budget` bytes. Returns the
/// bytes left and the number of files removed. A worker that has an
/// artifact mapped keeps using it; the next one compiles the module again.
pub fn sweep(root: &Path, budget: u64) -> std::io::Result<(u64, usize)> {
    let mut files = Vec::new();
    // Wide enough for any number of files of any length, huge sparse
    // ones included.
    let mut total = 0u128;
    for engine_dir in std::fs::read_dir(root)?.flatten() {
        let Ok(entries) = std::fs::read_dir(engine_dir.path()) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
            total += u128::from(meta.len());
            files.push((modified, meta.len(), entry.path()));
        }
    }
    files.sort();
    let mut removed = 0;
    for (_, len, path) in files {
        if total <= u128::from(budget) {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= u128::from(len);
            removed += 1;
        }
    }
    Ok((u64::try_from(total).unwrap_or(u64::MAX), removed))
}

/// A small least-recently-used map, for prepared instances: at most
/// `capacity` entries, and at most `max_weight` in all (each entry weighs
/// what `insert` says), except that the newest entry is kept whatever it
/// weighs.
#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    capacity: usize,
    max_weight: usize,
    weight: usize,
    map: HashMap<K, (V, usize)>,
    /// Keys from least to most recently used.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub(crate) fn new(capacity: usize, max_weight: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            max_weight,
            weight: 0,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        if self.map.contains_key(key) {
            self.touch(key);
        }
        self.map.get(key).map(|(value, _)| value)
    }

    pub(crate) fn insert(&mut self, key: K, value: V, weight: usize) {
        self.weight = self.weight.saturating_add(weight);
        if let Some((_, old)) = self.map.insert(key.clone(), (value, weight)) {
            self.weight = self.weight.saturating_sub(old);
            self.touch(&key);
        } else {
            self.order.push_back(key);
        }
        while self.map.len() > self.capacity
            || (self.weight > self.max_weight && self.map.len() > 1)
        {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some((_, gone)) = self.map.remove(&oldest) {
                self.weight = self.weight.saturating_sub(gone);
            }
        }
    }

    fn touch(&mut self, key: &K) {
        if let Some(k) = self
            .order
            .iter()
            .position(|k| k == key)
            .and_then(|pos| self.order.remove(pos))
        {
            self.order.push_back(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_removes_the_least_recently_used_first() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("wasmtime-0");
        std::fs::create_dir_all(&dir).unwrap();
        let now = std::time::SystemTime::now();
        for (i, name) in ["old", "middle", "new"].iter().enumerate() {
            let path = dir.join(format!("{name}.cwasm"));
            std::fs::write(&path, vec![0u8; 100]).unwrap();
            let age = std::time::Duration::from_secs(100 * (3 - i as u64));
            std::fs::File::open(&path)
                .unwrap()
                .set_modified(now - age)
                .unwrap();
        }
        touch(&dir.join("old.cwasm"));
        assert_eq!(sweep(root.path(), 250).unwrap(), (200, 1));
        assert!(!dir.join("middle.cwasm").exists());
        assert!(dir.join("old.cwasm").exists(), "touched, so recently used");
        assert_eq!(sweep(root.path(), 1000).unwrap(), (200, 0));
        assert_eq!(sweep(root.path(), 0).unwrap(), (0, 2));
    }

    #[test]
    fn lru_evicts_the_least_recently_used() {
        let mut lru = Lru::new(2, usize::MAX);
        lru.insert(1, "a", 0);
        lru.insert(2, "b", 0);
        assert_eq!(lru.get(&1), Some(&"a"));
        lru.insert(3, "c", 0);
        assert_eq!(lru.get(&2), None);
        assert_eq!(lru.get(&1), Some(&"a"));
        assert_eq!(lru.get(&3), Some(&"c"));
    }

    #[test]
    fn lru_keeps_within_its_weight_but_always_the_newest() {
        let mut lru = Lru::new(10, 100);
        lru.insert(1, "a", 40);
        lru.insert(2, "b", 40);
        assert_eq!(lru.get(&1), Some(&"a"));
        // 120 in all: the least recently used goes.
        lru.insert(3, "c", 40);
        assert_eq!(lru.get(&2), None);
        assert_eq!(lru.get(&1), Some(&"a"));
        // Heavier than the bound alone: it stays, and only it.
        lru.insert(4, "d", 500);
        assert_eq!(lru.get(&1), None);
        assert_eq!(lru.get(&3), None);
        assert_eq!(lru.get(&4), Some(&"d"));
        // Replacing an entry counts its new weight only.
        lru.insert(4, "d", 10);
        lru.insert(5, "e", 90);
        assert_eq!(lru.get(&4), Some(&"d"));
        assert_eq!(lru.get(&5), Some(&"e"));
    }
}

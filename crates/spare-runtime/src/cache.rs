//! Compiled-module caches: on disk across worker restarts, in memory across
//! jobs of one worker.

use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use spare_core::BlobId;
use wasmtime::Engine;

/// Compiled artifacts on disk, one file per module hash, in a directory
/// named after the engine's compatibility hash so a wasmtime upgrade or a
/// config change starts a fresh cache instead of loading stale code.
#[derive(Debug, Clone)]
pub(crate) struct DiskCache {
    dir: PathBuf,
}

impl DiskCache {
    pub(crate) fn new(root: &Path, engine: &Engine) -> std::io::Result<Self> {
        let mut hasher = std::hash::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let dir = root.join(format!("wasmtime-{:016x}", hasher.finish()));
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
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

/// A small least-recently-used map, for prepared instances.
#[derive(Debug)]
pub(crate) struct Lru<K, V> {
    capacity: usize,
    map: HashMap<K, V>,
    /// Keys from least to most recently used.
    order: VecDeque<K>,
}

impl<K: Hash + Eq + Clone, V> Lru<K, V> {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub(crate) fn get(&mut self, key: &K) -> Option<&V> {
        if self.map.contains_key(key) {
            self.touch(key);
        }
        self.map.get(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_some() {
            self.touch(&key);
            return;
        }
        self.order.push_back(key);
        while self.map.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.map.remove(&oldest);
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
    fn lru_evicts_the_least_recently_used() {
        let mut lru = Lru::new(2);
        lru.insert(1, "a");
        lru.insert(2, "b");
        assert_eq!(lru.get(&1), Some(&"a"));
        lru.insert(3, "c");
        assert_eq!(lru.get(&2), None);
        assert_eq!(lru.get(&1), Some(&"a"));
        assert_eq!(lru.get(&3), Some(&"c"));
    }
}

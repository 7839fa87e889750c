//! The node key: Ed25519, stored with mode 0600, never overwritten.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;

/// Why the node key could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read node key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write node key {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("node key {path} is corrupt: {reason}")]
    Corrupt { path: String, reason: String },
    #[error("node key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}`")]
    Exposed { path: String, mode: u32 },
}

/// Loads the key at `path`, or creates one if there is none. Returns the key
/// and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Keypair, bool), KeyError> {
    match load(path) {
        Ok(key) => Ok((key, false)),
        Err(KeyError::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            match create(path)? {
                Some(key) => Ok((key, true)),
                // Another `spare init` or `up` made it meanwhile: theirs
                // stands, and is this node's.
                None => load(path).map(|key| (key, false)),
            }
        }
        Err(e) => Err(e),
    }
}

/// Loads an existing key, refusing one that others can read.
pub fn load(path: &Path) -> Result<Keypair, KeyError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Exposed { path: shown, mode });
    }
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        path: shown.clone(),
        source,
    })?;
    if bytes.is_empty() {
        return Err(KeyError::Corrupt {
            path: shown,
            reason: "the file is empty; restore it from a backup, or move it away to \
                     start this node with a new identity"
                .into(),
        });
    }
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| KeyError::Corrupt {
        path: shown.clone(),
        reason: format!("not a libp2p Ed25519 key ({e})"),
    })?;
    if key.key_type() != libp2p::identity::KeyType::Ed25519 {
        return Err(KeyError::Corrupt {
            path: shown,
            reason: "not an Ed25519 key".into(),
        });
    }
    Ok(key)
}

/// Creates a new key, or `None` if another process made one first: never
/// overwritten, even in a race. The key is written to a temporary file
/// first and linked into place, so a crash never leaves a partial key
/// behind.
fn create(path: &Path) -> Result<Option<Keypair>, KeyError> {
    let shown = path.display().to_string();
    let key = Keypair::generate_ed25519();
    let bytes = key.to_protobuf_encoding().map_err(|e| KeyError::Corrupt {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let write = |source| KeyError::Write {
        path: shown.clone(),
        source,
    };
    let mut temporary = path.as_os_str().to_owned();
    // Unique to this process and this call: two threads creating the key
    // at once do not share a temporary file.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    temporary.push(format!(".new-{}-{call}", std::process::id()));
    let temporary = std::path::PathBuf::from(temporary);
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        Ok(())
    })()
    .map_err(write);
    // `link` fails if the key exists.
    let linked = written.and_then(|()| match std::fs::hard_link(&temporary, path) {
        Ok(()) => Ok(Some(key)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(write(e)),
    });
    let _ = std::fs::remove_file(&temporary);
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_created_private_and_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let (first, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (second, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(first.public(), second.public());
    }

    /// Many processes creating the node at once agree on one key.
    #[test]
    fn concurrent_creators_all_get_the_one_key_made() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        let barrier = std::sync::Barrier::new(8);
        let keys: Vec<_> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    scope.spawn(|| {
                        barrier.wait();
                        load_or_create(&path).map(|(key, created)| (key.public(), created))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let keys: Vec<_> = keys.into_iter().map(Result::unwrap).collect();
        assert_eq!(keys.iter().filter(|(_, created)| *created).count(), 1);
        assert!(keys.iter().all(|(key, _)| *key == keys[0].0));
    }

    #[test]
    fn an_exposed_or_corrupt_key_is_refused_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.key");
        std::fs::write(&path, b"garbage").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Exposed { .. })
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(KeyError::Corrupt { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"garbage");
        std::fs::write(&path, b"").unwrap();
        let err = load_or_create(&path).unwrap_err().to_string();
        assert!(err.contains("the file is empty"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), b"");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1, "no temporary file is left behind");
    }
}

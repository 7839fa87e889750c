//! Where a node keeps its files.
//!
//! With `--data-dir` (or `SPARE_DATA_DIR`) everything of one node lives in
//! that directory, so several nodes can share a machine. Without it, spare
//! follows the XDG base directories: config in `$XDG_CONFIG_HOME/spare`,
//! state in `$XDG_DATA_HOME/spare`, the API socket in `$XDG_RUNTIME_DIR`.

use std::path::{Path, PathBuf};

/// Every path of one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Paths {
    /// Keys, database, blobs and caches.
    pub data_dir: PathBuf,
    /// The TOML configuration file.
    pub config: PathBuf,
    /// The Ed25519 node key (libp2p protobuf encoding), mode 0600.
    pub key: PathBuf,
    /// The SQLite database.
    pub db: PathBuf,
    /// Content-addressed blobs.
    pub blobs: PathBuf,
    /// Compiled-module cache.
    pub cache: PathBuf,
    /// The control API's Unix socket, mode 0600.
    pub socket: PathBuf,
    /// Held (flock) by the running daemon.
    pub lock: PathBuf,
}

impl Paths {
    /// All paths inside one directory.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            data_dir: dir.to_path_buf(),
            config: dir.join("config.toml"),
            key: dir.join("node.key"),
            db: dir.join("state.db"),
            blobs: dir.join("blobs"),
            cache: dir.join("cache"),
            socket: dir.join("api.sock"),
            lock: dir.join("daemon.lock"),
        }
    }

    /// The XDG locations, for a node run without `--data-dir`.
    pub fn xdg() -> Result<Self, String> {
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let base = |var: &str, fallback: &str| -> Result<PathBuf, String> {
            match std::env::var_os(var)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
            {
                Some(p) => Ok(p),
                None => home
                    .as_ref()
                    .map(|h| h.join(fallback))
                    .ok_or_else(|| format!("neither {var} nor HOME is set; pass --data-dir")),
            }
        };
        let data = base("XDG_DATA_HOME", ".local/share")?.join("spare");
        let config = base("XDG_CONFIG_HOME", ".config")?.join("spare");
        let mut paths = Self::in_dir(&data);
        paths.config = config.join("config.toml");
        if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
            paths.socket = runtime.join("spare.sock");
        }
        Ok(paths)
    }

    /// `--data-dir` if given, else XDG.
    pub fn resolve(data_dir: Option<&Path>) -> Result<Self, String> {
        match data_dir {
            Some(dir) => Ok(Self::in_dir(dir)),
            None => Self::xdg(),
        }
    }

    /// Creates the directories, private to the user. The data directory is
    /// the node's own: it is made private even if it existed before, since
    /// it holds other peers' modules and inputs.
    pub fn create_dirs(&self) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true).mode(0o700);
        for dir in [&self.data_dir, &self.blobs, &self.cache] {
            builder.create(dir)?;
        }
        std::fs::set_permissions(&self.data_dir, std::fs::Permissions::from_mode(0o700))?;
        for file in [&self.config, &self.socket] {
            if let Some(parent) = file.parent() {
                builder.create(parent)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_dir_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("node");
        std::fs::create_dir(&data).unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
        Paths::in_dir(&data).create_dirs().unwrap();
        let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_data_dir_holds_everything() {
        let paths = Paths::in_dir(Path::new("/tmp/a"));
        for p in [
            &paths.config,
            &paths.key,
            &paths.db,
            &paths.blobs,
            &paths.socket,
        ] {
            assert!(p.starts_with("/tmp/a"), "{}", p.display());
        }
    }
}

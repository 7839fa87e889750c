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

/// The longest path a Unix socket can be bound at (`sun_path` is 108 bytes
/// with its terminating NUL).
const MAX_SOCKET_PATH: usize = 107;

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
        Self::xdg_from(|var| std::env::var_os(var))
    }

    /// The XDG locations from the environment `var` reads. A variable that
    /// is empty or relative counts as unset, as the XDG specification says.
    fn xdg_from(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Self, String> {
        let absolute = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
        let home = absolute("HOME");
        let base = |name: &str, fallback: &str| -> Result<PathBuf, String> {
            match absolute(name) {
                Some(p) => Ok(p),
                None => home
                    .as_ref()
                    .map(|h| h.join(fallback))
                    .ok_or_else(|| format!("neither {name} nor HOME is set; pass --data-dir")),
            }
        };
        let data = base("XDG_DATA_HOME", ".local/share")?.join("spare");
        let config = base("XDG_CONFIG_HOME", ".config")?.join("spare");
        let mut paths = Self::in_dir(&data);
        paths.config = config.join("config.toml");
        if let Some(runtime) = absolute("XDG_RUNTIME_DIR") {
            paths.socket = runtime.join("spare.sock");
        }
        Ok(paths)
    }

    /// `--data-dir` if given (made absolute, so that the daemon, its workers
    /// and the CLI agree wherever they start), else XDG.
    pub fn resolve(data_dir: Option<&Path>) -> Result<Self, String> {
        let paths = match data_dir {
            Some(dir) if dir.as_os_str().is_empty() => {
                Err("--data-dir (or SPARE_DATA_DIR) is empty".to_owned())
            }
            Some(dir) => std::path::absolute(dir)
                .map(|dir| Self::in_dir(&dir))
                .map_err(|e| format!("--data-dir {}: {e}", dir.display())),
            None => Self::xdg(),
        }?;
        let length = paths.socket.as_os_str().len();
        if length > MAX_SOCKET_PATH {
            return Err(format!(
                "the API socket's path {} is {length} bytes, more than the \
                 {MAX_SOCKET_PATH} a Unix socket's address holds; use a shorter --data-dir",
                paths.socket.display()
            ));
        }
        Ok(paths)
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

    /// Refuses directories that workers of a daemon running as `euid`
    /// could not read. Workers give up every capability (`confine/`),
    /// so those of a daemon run as root read the blob store and the cache
    /// as a plain user whose id is 0: a private directory another user
    /// owns is closed to them, and every task would fail.
    pub fn check_owner(&self, euid: u32) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        if euid != 0 {
            return Ok(());
        }
        for dir in [&self.data_dir, &self.blobs, &self.cache] {
            let uid = std::fs::metadata(dir)
                .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                .uid();
            if uid != 0 {
                return Err(format!(
                    "the daemon runs as root, but {} belongs to the user with id {uid}: \
                     workers give up root's privileges and could not read it; run the \
                     daemon as that user, or give it a data directory root owns",
                    dir.display()
                ));
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
    fn a_root_daemon_refuses_a_data_dir_another_user_owns() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_dir(&dir.path().join("node"));
        paths.create_dirs().unwrap();
        let mine = std::fs::metadata(&paths.data_dir).unwrap().uid();
        // Run as root, make the directory another user's.
        if mine == 0 {
            std::os::unix::fs::chown(&paths.data_dir, Some(65_534), None).unwrap();
        }
        let error = paths.check_owner(0).unwrap_err();
        assert!(
            error.contains(&paths.data_dir.display().to_string()) && error.contains("runs as root"),
            "{error}"
        );
        // Its own user's directory is fine for a daemon of that user.
        let owner = std::fs::metadata(&paths.data_dir).unwrap().uid();
        paths.check_owner(owner).unwrap();
        if mine == 0 {
            std::os::unix::fs::chown(&paths.data_dir, Some(0), None).unwrap();
            paths.check_owner(0).unwrap();
        }
    }

    #[test]
    fn empty_or_relative_xdg_variables_count_as_unset() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let paths = Paths::xdg_from(env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", ""),
            ("XDG_DATA_HOME", "rel"),
        ]))
        .unwrap();
        assert_eq!(
            paths.socket,
            Path::new("/home/u/.local/share/spare/api.sock")
        );
        assert_eq!(paths.db, Path::new("/home/u/.local/share/spare/state.db"));
        let paths = Paths::xdg_from(env(&[
            ("HOME", "/home/u"),
            ("XDG_RUNTIME_DIR", "/run/user/1"),
        ]))
        .unwrap();
        assert_eq!(paths.socket, Path::new("/run/user/1/spare.sock"));
        let err = Paths::xdg_from(env(&[("HOME", "")])).unwrap_err();
        assert!(err.contains("pass --data-dir"), "{err}");
    }

    #[test]
    fn a_relative_data_dir_is_made_absolute() {
        let paths = Paths::resolve(Some(Path::new("node-a"))).unwrap();
        assert!(paths.socket.is_absolute());
        assert!(paths.socket.ends_with("node-a/api.sock"));
        assert!(Paths::resolve(Some(Path::new(""))).is_err());
        let long = format!("/tmp/{}", "d".repeat(100));
        let err = Paths::resolve(Some(Path::new(&long))).unwrap_err();
        assert!(err.contains("use a shorter --data-dir"), "{err}");
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

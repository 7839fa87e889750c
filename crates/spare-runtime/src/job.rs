//! What the daemon hands a worker: one task, resolved to local files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use spare_core::{BlobId, Limits, TaskId};

/// One task to run, with its module already in the local blob store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub task: TaskId,
    /// The module's content hash: the key of the compiled-module caches.
    pub module: BlobId,
    /// Where the module's bytes are (verified against `module` by the daemon).
    pub module_path: PathBuf,
    /// The guest's `argv[0]`.
    pub name: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub stdin: JobStdin,
    pub limits: Limits,
}

/// Where the guest's stdin comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStdin {
    Bytes(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A file in the blob store, for input too large to pass through the
    /// worker's pipe.
    File(PathBuf),
}

//! The spare daemon: network, sandbox workers, ledger and control API.
//!
//! A [`Node`] ties the parts together: [`spare_net`] for peers,
//! [`spare_runtime`] for worker processes, [`spare_ledger`] for state,
//! [`spare_scheduler`] for placement. [`daemon::run`] is `spare up`; the
//! [`api`] is how the CLI talks to it.
//!
//! Module map: `host` serves tasks for peers; [`requester`] places our
//! own tasks and retries them; [`blobs`] stores and fetches content;
//! [`config`], [`paths`] and [`identity`] are the node's files.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod api;
pub mod blobs;
pub mod config;
pub mod daemon;
mod host;
pub mod identity;
pub mod node;
pub mod paths;
pub mod requester;

pub use config::Config;
pub use host::MAX_ADMITTED_BYTES;
pub use node::{Node, NodeOptions};
pub use paths::Paths;

/// Why the daemon could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Key(#[from] identity::KeyError),
    #[error(transparent)]
    Ledger(#[from] spare_ledger::LedgerError),
    #[error(transparent)]
    Pool(#[from] spare_runtime::PoolError),
    #[error(transparent)]
    Net(#[from] spare_net::NetError),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(
        "cannot open the node's database {path}: {source} (if it is damaged, move it \
         aside and start again: a new one is made, without the task history and receipts)"
    )]
    Database {
        path: String,
        source: spare_ledger::LedgerError,
    },
    #[error("another spare daemon is already running on {0}")]
    Locked(String),
    #[error("{0}")]
    Enforcement(String),
    #[error("{0}")]
    Ownership(String),
}

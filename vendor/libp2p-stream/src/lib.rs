#![doc = include_str!("../README.md")]

mod behaviour;
mod control;
mod handler;
mod shared;
mod upgrade;

pub use behaviour::{AlreadyRegistered, Behaviour};
pub use control::{Control, IncomingStreams, OpenStreamError};

/// Inbound streams of an accepted protocol that may wait, negotiated, for
/// the application to take them (spare's patch; upstream holds one). A
/// stream that arrives while this many (and one more) wait is dropped, and its opener
/// sees it end before it was read.
pub const ACCEPT_BUFFER: usize = 32;

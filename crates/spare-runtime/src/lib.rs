//! The WebAssembly sandbox of spare, and the worker processes that run it.
//!
//! A guest never runs inside the daemon. The daemon keeps a [`WorkerPool`] of
//! worker processes (the `spare` binary started with its hidden `worker`
//! verb); each lowers its own priority to `SCHED_IDLE` and the idle I/O class
//! first thing ([`priority`]), then runs one [`Job`] at a time in a
//! [`Sandbox`] and answers with an [`Outcome`](spare_core::Outcome). A guest
//! that crashes wasmtime takes down one worker, which the pool replaces.
//!
//! **Architecture invariant:** this crate knows nothing about the network.
//! A job names its module by a local file path; fetching it is the daemon's
//! business.
//!
//! # Guest-controlled resources and their bounds
//! | resource | bound |
//! |---|---|
//! | instructions | [`Limits::fuel`](spare_core::Limits::fuel) |
//! | linear memory (all memories together) | [`Limits::memory`](spare_core::Limits::memory) |
//! | native stack | [`Limits::stack`](spare_core::Limits::stack) |
//! | wall time | [`Limits::wall_ms`](spare_core::Limits::wall_ms): the guest yields every 2M fuel and a timer stops it; the pool's kill is the backstop |
//! | stdout, stderr | [`Limits::output`](spare_core::Limits::output) each |
//! | table elements | [`MAX_TABLE_ELEMENTS`](spare_core::limits::MAX_TABLE_ELEMENTS) |
//! | instances, memories, tables | [`MAX_INSTANCES`](spare_core::limits::MAX_INSTANCES), [`MAX_MEMORIES`](spare_core::limits::MAX_MEMORIES), [`MAX_TABLES`](spare_core::limits::MAX_TABLES) |
//! | open files | stdin, stdout, stderr only: no preopened directory, no sockets |
//! | host resources of a preview-2 guest | [`MAX_RESOURCES`](spare_core::limits::MAX_RESOURCES) |
//! | random bytes per call | [`MAX_RANDOM_BYTES`](spare_core::limits::MAX_RANDOM_BYTES) |
//! | a worker's own stderr, should a guest take it over | read at [`relay::READ_RATE`] after [`relay::READ_BURST`], lines cut at [`relay::MAX_LINE`], [`relay::LINES_PER_MINUTE`] logged where the owner reads |
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod cache;
pub mod confine;
mod ipc;
mod job;
mod limiter;
mod output;
mod pool;
pub mod priority;
pub mod relay;
mod sandbox;
pub mod stop;
pub mod worker;

pub use job::{Job, JobStdin};
pub use pool::{PoolConfig, PoolError, PoolStats, WATCHDOG_GRACE, WorkerCommand, WorkerPool};
pub use sandbox::{FUEL_PER_YIELD, Sandbox};
pub use stop::WorkerState;

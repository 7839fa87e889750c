//! What a host gives the swarm, and when: the owner's side of spare.
//!
//! The owner sets a [`Policy`]: cores or a CPU share, memory, disk,
//! bandwidth, and [`When`] to give (only while idle, in time windows, not on
//! battery). This crate makes it true:
//!
//! - [`cgroup`] puts the workers in a control group that holds the CPU
//!   share and the memory budget, where the daemon can make one;
//! - [`Governor`] watches the owner's CPU use and pressure stalls
//!   ([`owner`]), pauses the workers within a sampling window when the
//!   owner needs the machine and resumes them after a cool-down, and runs
//!   the CPU [`duty`] cycle, trimmed by what the workers really used, when
//!   no cgroup can;
//! - [`TokenBucket`] paces every byte moved for the swarm.
//!
//! It knows nothing about the network: the daemon asks the governor whether
//! it is giving, and offers and admits tasks accordingly.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod bucket;
pub mod cgroup;
pub mod duty;
pub mod governor;
pub mod machine;
pub mod owner;
pub mod settings;
pub mod window;

pub use bucket::TokenBucket;
pub use governor::{Enforcement as EnforcementReport, Governor, GovernorConfig, Status};
pub use machine::Machine;
pub use settings::{Enforcement, Policy, When};
pub use window::Window;

//! What a running process knows about itself, shared by the work (daemon,
//! consumer) and whoever reports on it (HTTP, logs, metrics): readiness
//! and the daemon's counters. A leaf: it depends on nothing but the core.

mod readiness;
mod stats;

pub use readiness::{Readiness, Ready};
pub use stats::Stats;

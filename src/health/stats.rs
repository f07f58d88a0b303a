//! Counters of what a daemon has done, shared with whoever reports them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};

use super::Readiness;

/// Monotonic counters since the daemon started.
#[derive(Debug, Default)]
pub struct Stats {
    /// Input entries applied (any op, including dead letters).
    pub ingested: AtomicU64,
    /// `add` ops applied.
    pub adds: AtomicU64,
    /// `cancel` ops applied.
    pub cancels: AtomicU64,
    /// `watermark` ops applied.
    pub watermarks: AtomicU64,
    /// Entries sent to `:dead`.
    pub dead: AtomicU64,
    /// Adds released at once because they were already due.
    pub late: AtomicU64,
    /// Elements released into `:out` (late adds included).
    pub released: AtomicU64,
    /// Adds dropped: their element was released less than
    /// `daemon.dedup_window` ago.
    pub duplicates: AtomicU64,
    /// Input entries claimed from other consumers.
    pub claimed: AtomicU64,
    /// Daemons whose pending input was taken over because their liveness
    /// lease expired (their entries also count in `claimed`).
    pub failovers: AtomicU64,
    /// Times the connection to Redis was re-established.
    pub reconnects: AtomicU64,
    /// Whether this daemon holds the housekeeping lock right now (a state,
    /// not a counter).
    pub housekeeping_leader: AtomicBool,
    /// Partitions this daemon owns (applies the input of) right now.
    pub partitions_owned: AtomicU64,
    /// Whether the daemon is connected and set up (`/readyz`).
    pub readiness: Readiness,
}

impl Stats {
    /// Adds elements released by a release or clock call.
    pub fn record_release(&self, n: u64) {
        self.released.fetch_add(n, Relaxed);
    }
}

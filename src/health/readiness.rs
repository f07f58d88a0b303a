//! Whether the process can do its work right now: the state behind
//! `/readyz`, set by the daemon and the consumer runtime.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use crate::core::Fault;

/// The readiness of a daemon or consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Ready {
    /// Not connected yet.
    Starting,
    /// Connected: Redis answered, the scripts are loaded and the groups
    /// exist.
    Ready,
    /// Redis cannot be used right now: the class of the failure, and a
    /// short error text (never holding the password).
    Unavailable(Fault, String),
    /// Shutdown has begun: no new work is taken.
    ShuttingDown,
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ready::Starting => f.write_str("starting: not connected to Redis yet"),
            Ready::Ready => f.write_str("ready"),
            Ready::Unavailable(Fault::Disconnected, reason) => write!(f, "disconnected from Redis: {reason}"),
            Ready::Unavailable(fault, reason) => write!(f, "Redis unavailable ({}): {fault}: {reason}", fault.label()),
            Ready::ShuttingDown => f.write_str("shutting down"),
        }
    }
}

/// A shared, cheaply cloned readiness cell. Starts as [`Ready::Starting`];
/// once [`Ready::ShuttingDown`] it stays so.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<Mutex<Ready>>);

impl Default for Readiness {
    fn default() -> Self {
        Readiness(Arc::new(Mutex::new(Ready::Starting)))
    }
}

impl Readiness {
    /// The current state.
    pub fn get(&self) -> Ready {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn set(&self, next: Ready) {
        let mut state = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if *state != Ready::ShuttingDown {
            *state = next;
        }
    }

    /// Connected and set up.
    pub fn set_ready(&self) {
        self.set(Ready::Ready);
    }

    /// Redis cannot be used because of `fault`; `reason` says more.
    pub fn set_unavailable(&self, fault: Fault, reason: impl fmt::Display) {
        self.set(Ready::Unavailable(fault, reason.to_string()));
    }

    /// Shutdown has begun (final).
    pub fn set_shutting_down(&self) {
        self.set(Ready::ShuttingDown);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_and_final_shutdown() {
        let r = Readiness::default();
        assert_eq!(r.get(), Ready::Starting);
        let shared = r.clone();
        shared.set_ready();
        assert_eq!(r.get(), Ready::Ready);
        shared.set_unavailable(Fault::Disconnected, "connection refused");
        assert_eq!(r.get().to_string(), "disconnected from Redis: connection refused");
        shared.set_unavailable(Fault::OutOfMemory, "OOM command not allowed");
        assert!(r.get().to_string().starts_with("Redis unavailable (oom): Redis is out of memory"), "{}", r.get());
        r.set_shutting_down();
        r.set_ready();
        r.set_unavailable(Fault::Disconnected, "late");
        assert_eq!(shared.get(), Ready::ShuttingDown);
    }
}

//! Waiting with a deadline: poll a condition until it holds, or fail the
//! test naming what never happened.

use std::future::Future;
use std::time::{Duration, Instant};

/// Poll interval of the waiting helpers.
pub const POLL_INTERVAL: Duration = Duration::from_millis(15);

/// Polls `f` every ~15 ms until it returns true; panics naming `what` on timeout.
pub fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut f: F) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async version of [`wait_until`], sleeping with `tokio::time::sleep`.
pub async fn wait_until_async<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

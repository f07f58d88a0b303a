//! Capped, jittered exponential backoff for reconnecting to Redis.

use std::time::Duration;

/// Why a backoff policy was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    /// The first delay must be positive.
    #[error("the minimum delay must be greater than zero")]
    ZeroMin,
    /// The cap must not be below the first delay.
    #[error("the maximum delay ({max:?}) is below the minimum ({min:?})")]
    MaxBelowMin {
        /// The configured first delay.
        min: Duration,
        /// The configured cap.
        max: Duration,
    },
}

/// "Full jitter" exponential backoff: attempt `n` waits a uniformly random
/// time in `[base_n / 2, base_n]`, where `base_n = min * 2^n` capped at `max`.
/// Keeping half the base as a floor avoids hammering a Redis that is
/// restarting, while the jitter spreads many daemons apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
}

impl Backoff {
    /// Validates the bounds.
    pub fn try_new(min: Duration, max: Duration) -> Result<Self, BackoffError> {
        if min.is_zero() {
            return Err(BackoffError::ZeroMin);
        }
        if max < min {
            return Err(BackoffError::MaxBelowMin { min, max });
        }
        Ok(Backoff { min, max })
    }

    /// The first delay.
    pub fn min(&self) -> Duration {
        self.min
    }

    /// The cap.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The un-jittered delay before retry number `attempt` (0-based).
    pub fn base(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.min.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `attempt`, given a uniform random
    /// `unit` in `[0, 1]`. Pure, so tests can check its bounds.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let base = self.base(attempt);
        let unit = unit.clamp(0.0, 1.0);
        base.mul_f64(0.5 + 0.5 * unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_bad_bounds() {
        assert_eq!(Backoff::try_new(Duration::ZERO, Duration::from_secs(1)), Err(BackoffError::ZeroMin));
        assert!(matches!(
            Backoff::try_new(Duration::from_secs(2), Duration::from_secs(1)),
            Err(BackoffError::MaxBelowMin { .. })
        ));
    }

    #[test]
    fn doubles_until_the_cap() {
        let b = Backoff::try_new(Duration::from_millis(100), Duration::from_secs(1)).unwrap();
        let bases: Vec<u128> = (0..6).map(|n| b.base(n).as_millis()).collect();
        assert_eq!(bases, [100, 200, 400, 800, 1000, 1000]);
    }

    proptest! {
        #[test]
        fn delay_stays_within_bounds(min_ms in 1u64..5_000, extra_ms in 0u64..60_000,
                                     attempt in 0u32..200, unit in 0.0f64..=1.0) {
            let min = Duration::from_millis(min_ms);
            let max = Duration::from_millis(min_ms + extra_ms);
            let b = Backoff::try_new(min, max).unwrap();
            let d = b.delay(attempt, unit);
            prop_assert!(d <= max);
            prop_assert!(d >= min / 2);
            prop_assert!(d >= b.base(attempt) / 2);
        }
    }
}

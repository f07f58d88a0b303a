//! The consumer's knobs and their rules: the one place where they are
//! checked, by the configuration (`[consume]`, `[lease]`) and by
//! [`super::ConsumerBuilder::build`] alike.

use std::time::Duration;

use crate::config::MAX_BATCH_SIZE;

/// The knobs to check.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Knobs<'a> {
    pub consumer: &'a str,
    pub concurrency: usize,
    pub prefetch: usize,
    pub batch_size: usize,
    pub max_deliveries: u64,
    pub block: Duration,
    pub claim_idle: Duration,
    pub shutdown_grace: Duration,
    pub lease_ttl: Duration,
    pub dead_consumer_grace: Duration,
}

/// A knob that breaks its rule: its name (as [`super::ConsumerBuilder`]
/// calls it) and why.
pub(crate) type Broken = (&'static str, String);

/// Checks every knob; the first one that breaks its rule is returned.
pub(crate) fn check(k: &Knobs<'_>) -> Result<(), Broken> {
    let within = |name: &'static str, v: usize, lo: usize, hi: usize| {
        if (lo..=hi).contains(&v) {
            Ok(())
        } else {
            Err((name, format!("must be between {lo} and {hi} (got {v})")))
        }
    };
    if k.consumer.is_empty() || k.consumer.chars().any(char::is_control) {
        return Err(("consumer", format!("{:?} must be non-empty, without control characters", k.consumer)));
    }
    within("concurrency", k.concurrency, 1, 10_000)?;
    within("prefetch", k.prefetch, 0, 10_000)?;
    within("batch_size", k.batch_size, 1, MAX_BATCH_SIZE)?;
    within("max_deliveries", usize::try_from(k.max_deliveries).unwrap_or(usize::MAX), 1, 1_000_000)?;
    for (name, d) in [
        ("block", k.block),
        ("claim_idle", k.claim_idle),
        ("shutdown_grace", k.shutdown_grace),
        ("dead_consumer_grace", k.dead_consumer_grace),
    ] {
        if d.is_zero() {
            return Err((name, "must be greater than zero".into()));
        }
    }
    if k.lease_ttl < Duration::from_millis(300) {
        return Err(("lease_ttl", "must be at least 300ms".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Knobs<'static> {
        Knobs {
            consumer: "c",
            concurrency: 16,
            prefetch: 0,
            batch_size: 100,
            max_deliveries: 5,
            block: Duration::from_secs(2),
            claim_idle: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(10),
            lease_ttl: Duration::from_secs(5),
            dead_consumer_grace: Duration::from_secs(60),
        }
    }

    #[test]
    fn each_rule_names_its_knob() {
        assert_eq!(check(&good()), Ok(()));
        let cases: [(Knobs, &str); 8] = [
            (Knobs { concurrency: 0, ..good() }, "concurrency"),
            (Knobs { prefetch: 10_001, ..good() }, "prefetch"),
            (Knobs { batch_size: MAX_BATCH_SIZE + 1, ..good() }, "batch_size"),
            (Knobs { max_deliveries: 0, ..good() }, "max_deliveries"),
            (Knobs { max_deliveries: 1_000_001, ..good() }, "max_deliveries"),
            (Knobs { block: Duration::ZERO, ..good() }, "block"),
            (Knobs { lease_ttl: Duration::from_millis(299), ..good() }, "lease_ttl"),
            (Knobs { consumer: "a\nb", ..good() }, "consumer"),
        ];
        for (knobs, name) in cases {
            assert_eq!(check(&knobs).map_err(|(n, _)| n), Err(name));
        }
    }
}

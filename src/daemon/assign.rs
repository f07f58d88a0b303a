//! Which daemon should own which partition, pure: a balanced assignment
//! that keeps current owners where it can, so that daemons joining or
//! leaving move as few partitions as possible. Every daemon computes it
//! from the same view (the live daemons, each partition's owner); views
//! that differ for a moment only delay a handover, since a partition's
//! owner lock admits one daemon at a time.

use std::collections::HashMap;

/// The target owner of each partition, given the live daemons (any order;
/// duplicates ignored) and each partition's current owner (`None`: free,
/// or held by a daemon that is not live). Each live daemon gets
/// `P / N` or `P / N + 1` partitions; the extra ones go to daemons that
/// already own the most, then by name. Empty if no daemon is live.
pub fn assign(live: &[String], owners: &[Option<String>]) -> Vec<Option<String>> {
    let mut daemons: Vec<&str> = live.iter().map(String::as_str).collect();
    daemons.sort_unstable();
    daemons.dedup();
    let partitions = owners.len();
    if daemons.is_empty() {
        return vec![None; partitions];
    }
    let n = daemons.len();
    let (base, extra) = (partitions / n, partitions % n);
    let mut owned: HashMap<&str, usize> = daemons.iter().map(|d| (*d, 0)).collect();
    for owner in owners.iter().flatten() {
        if let Some(count) = owned.get_mut(owner.as_str()) {
            *count += 1;
        }
    }
    let mut by_claim = daemons.clone();
    by_claim.sort_by(|a, b| owned[b].cmp(&owned[a]).then(a.cmp(b)));
    let quota: HashMap<&str, usize> =
        by_claim.iter().enumerate().map(|(i, d)| (*d, base + usize::from(i < extra))).collect();

    let mut target: Vec<Option<String>> = vec![None; partitions];
    let mut kept: HashMap<&str, usize> = daemons.iter().map(|d| (*d, 0)).collect();
    for (p, owner) in owners.iter().enumerate() {
        let Some(owner) = owner.as_deref() else { continue };
        if let (Some(k), Some(q)) = (kept.get_mut(owner), quota.get(owner)) {
            if *k < *q {
                *k += 1;
                target[p] = Some(owner.to_owned());
            }
        }
    }
    // The rest, in partition order, to the first daemon (by name) with room.
    for slot in target.iter_mut().filter(|t| t.is_none()) {
        let Some(d) = daemons.iter().copied().find(|d| kept[d] < quota[d]) else { break };
        *kept.get_mut(d).expect("a live daemon") += 1;
        *slot = Some(d.to_owned());
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn owners(v: &[Option<&str>]) -> Vec<Option<String>> {
        v.iter().map(|o| o.map(str::to_owned)).collect()
    }

    #[test]
    fn one_partition_stays_with_its_owner() {
        let t = assign(&names(&["a", "b"]), &owners(&[Some("b")]));
        assert_eq!(t, owners(&[Some("b")]));
        let t = assign(&names(&["a", "b"]), &owners(&[None]));
        assert_eq!(t, owners(&[Some("a")]));
        // Its owner is gone: the first live daemon takes it.
        let t = assign(&names(&["b", "c"]), &owners(&[Some("a")]));
        assert_eq!(t, owners(&[Some("b")]));
    }

    #[test]
    fn partitions_spread_evenly_and_a_newcomer_takes_only_its_share() {
        let none: Vec<Option<String>> = vec![None; 6];
        let t = assign(&names(&["a", "b", "c"]), &none);
        assert_eq!(t, owners(&[Some("a"), Some("a"), Some("b"), Some("b"), Some("c"), Some("c")]));
        // Two daemons own everything; a third arrives: two partitions move.
        let before = owners(&[Some("a"), Some("a"), Some("a"), Some("b"), Some("b"), Some("b")]);
        let t = assign(&names(&["a", "b", "c"]), &before);
        let moved = t.iter().zip(&before).filter(|(x, y)| x != y).count();
        assert_eq!(moved, 2, "{t:?}");
        assert_eq!(t.iter().filter(|o| o.as_deref() == Some("c")).count(), 2);
    }

    #[test]
    fn nobody_live_means_nobody_owns() {
        assert_eq!(assign(&[], &owners(&[Some("a"), None])), vec![None, None]);
    }

    proptest! {
        /// Everyone gets its fair share (±1), every partition gets a live
        /// owner, and owners within their share keep their partitions.
        #[test]
        fn balanced_complete_and_sticky(n in 1usize..6, p in 1usize..40,
                                        current in proptest::collection::vec(proptest::option::of(0usize..8), 40)) {
            let live: Vec<String> = (0..n).map(|i| format!("d{i}")).collect();
            let owners: Vec<Option<String>> = current[..p].iter().map(|o| o.map(|i| format!("d{i}"))).collect();
            let t = assign(&live, &owners);
            prop_assert_eq!(t.len(), p);
            let mut count: HashMap<String, usize> = HashMap::new();
            for o in &t {
                let o = o.clone().expect("every partition has a target");
                prop_assert!(live.contains(&o));
                *count.entry(o).or_default() += 1;
            }
            for d in &live {
                let c = count.get(d).copied().unwrap_or(0);
                prop_assert!(c == p / n || c == p / n + 1, "{} owns {} of {} over {}", d, c, p, n);
            }
            // The same view gives the same answer (every daemon agrees).
            prop_assert_eq!(assign(&live, &owners), t.clone());
            // Applying the target and asking again changes nothing.
            prop_assert_eq!(assign(&live, &t), t);
        }
    }
}

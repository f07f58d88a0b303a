//! The consumer's bookkeeping, pure: which entries it holds and in which
//! state, so that the runtime around it is a thin loop of I/O. An entry the
//! consumer is responsible for is in exactly one of four states:
//!
//! ```text
//! accept ─▶ queued ─start─▶ running ─settle─┬▶ awaiting ack ─acked─▶ (gone)
//!    │                                      ├▶ condemned ─flushed─▶ (gone)
//!    └─ not an element ─▶ condemned         └▶ (gone: failed, retried later by whoever claims it)
//! ```
//!
//! and `held` (what the runtime keeps fresh so no peer claims it, and what
//! a second delivery is checked against) is exactly their union. A peer
//! may take an entry over ([`Ledger::lost`]), and stopping drops what is
//! queued ([`Ledger::begin_stop`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;

use crate::core::op::Reason;

/// What became of a finished handler's entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// It succeeded: acknowledge it at the next flush.
    Ack,
    /// It failed; it stays pending in the group for a later delivery.
    Retry {
        /// The delivery that failed.
        delivery: u64,
    },
    /// It failed on its last allowed delivery: dead-letter it at the next
    /// flush.
    Dead {
        /// The delivery that failed.
        delivery: u64,
    },
    /// It was not running here (already lost to a peer, or stopped).
    Unknown,
}

/// An entry bound for `:dead`, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doomed<K> {
    /// The entry.
    pub key: K,
    /// Why.
    pub reason: Reason,
    /// A sentence for the operator.
    pub detail: String,
}

/// The bookkeeping of one consumer (see the module docs). `K` identifies an
/// entry (its stream and id), `E` is what a handler gets.
#[derive(Debug)]
pub struct Ledger<K, E> {
    /// Most handlers at once.
    concurrency: usize,
    /// Elements read ahead of free handler slots.
    prefetch: usize,
    /// Deliveries before a failed element goes to `:dead`.
    max_deliveries: u64,
    /// Accepted and not started, in delivery order, with their delivery.
    queued: VecDeque<(K, u64, E)>,
    /// Started and not settled: their delivery.
    running: HashMap<K, u64>,
    /// Handled, to acknowledge at the next flush.
    acks: Vec<K>,
    /// To move to `:dead` at the next flush.
    condemned: Vec<Doomed<K>>,
    /// The union of the four above.
    held: HashSet<K>,
    /// Set once stopping: nothing more starts.
    stopping: bool,
}

impl<K: Copy + Eq + Hash, E> Ledger<K, E> {
    /// An empty ledger.
    pub fn new(concurrency: usize, prefetch: usize, max_deliveries: u64) -> Self {
        Ledger {
            concurrency,
            prefetch,
            max_deliveries,
            queued: VecDeque::new(),
            running: HashMap::new(),
            acks: Vec::new(),
            condemned: Vec::new(),
            held: HashSet::new(),
            stopping: false,
        }
    }

    /// Takes an element delivered to us (`delivery`: 1 for a first read).
    /// Returns `false`, and keeps nothing, if the entry is held already (a
    /// second delivery of an entry we are working on).
    pub fn accept(&mut self, key: K, delivery: u64, element: E) -> bool {
        if !self.held.insert(key) {
            return false;
        }
        self.queued.push_back((key, delivery, element));
        true
    }

    /// Takes an entry delivered to us that is not an element: it goes to
    /// `:dead` at the next flush. Returns `false` if it is held already.
    pub fn reject(&mut self, key: K, reason: Reason, detail: String) -> bool {
        if !self.held.insert(key) {
            return false;
        }
        self.condemned.push(Doomed { key, reason, detail });
        true
    }

    /// The next element to hand to a handler, if a slot is free and we are
    /// not stopping. It counts as running from now on.
    pub fn start_next(&mut self) -> Option<(K, u64, E)> {
        if self.stopping || self.running.len() >= self.concurrency {
            return None;
        }
        let (key, delivery, element) = self.queued.pop_front()?;
        self.running.insert(key, delivery);
        Some((key, delivery, element))
    }

    /// Records how a handler ended: `Ok`, or its error text.
    pub fn settle(&mut self, key: K, result: Result<(), String>) -> (Settled, Option<String>) {
        let Some(delivery) = self.running.remove(&key) else { return (Settled::Unknown, None) };
        match result {
            Ok(()) => {
                self.acks.push(key);
                (Settled::Ack, None)
            }
            Err(error) if delivery >= self.max_deliveries => {
                let detail = format!("delivery {delivery} of {} failed: {error}", self.max_deliveries);
                self.condemned.push(Doomed { key, reason: Reason::MaxDeliveries, detail });
                (Settled::Dead { delivery }, Some(error))
            }
            Err(error) => {
                self.held.remove(&key);
                (Settled::Retry { delivery }, Some(error))
            }
        }
    }

    /// A running handler was aborted (end of the shutdown grace): the entry
    /// stays pending for another consumer.
    pub fn abandon(&mut self, key: K) {
        if self.running.remove(&key).is_some() {
            self.held.remove(&key);
        }
    }

    /// The acknowledgements to send now.
    pub fn acks(&self) -> &[K] {
        &self.acks
    }

    /// The acknowledgements were sent.
    pub fn acked(&mut self) {
        for key in self.acks.drain(..) {
            self.held.remove(&key);
        }
    }

    /// The dead letters to send now.
    pub fn condemned(&self) -> &[Doomed<K>] {
        &self.condemned
    }

    /// The dead letters were sent; returns them.
    pub fn condemned_sent(&mut self) -> Vec<Doomed<K>> {
        let sent: Vec<Doomed<K>> = self.condemned.drain(..).collect();
        for d in &sent {
            self.held.remove(&d.key);
        }
        sent
    }

    /// A peer took `key` over (we were cut off long enough for it to claim
    /// it). Returns `true` if that matters: it is still queued or running
    /// here, and may be processed twice. An entry awaiting its ack or dead
    /// letter is kept: sending them finds it gone, which is harmless.
    pub fn lost(&mut self, key: K) -> bool {
        if self.acks.contains(&key) || self.condemned.iter().any(|d| d.key == key) {
            return false;
        }
        let was_running = self.running.remove(&key).is_some();
        let queued_at = self.queued.iter().position(|(k, ..)| *k == key);
        if let Some(at) = queued_at {
            self.queued.remove(at);
        }
        self.held.remove(&key) && (was_running || queued_at.is_some())
    }

    /// Stops starting handlers and drops what is queued (it stays pending
    /// in the group, for peers). Returns how many were dropped.
    pub fn begin_stop(&mut self) -> usize {
        self.stopping = true;
        let dropped = self.queued.len();
        for (key, ..) in self.queued.drain(..) {
            self.held.remove(&key);
        }
        dropped
    }

    /// Whether stopping has begun.
    #[cfg(test)]
    fn stopping(&self) -> bool {
        self.stopping
    }

    /// Free handler slots not spoken for by queued elements: how much a
    /// claim may take.
    pub fn room(&self) -> usize {
        self.concurrency.saturating_sub(self.running.len() + self.queued.len())
    }

    /// How many new entries a read may ask for: free slots plus the
    /// read-ahead allowance, minus what is queued.
    pub fn free_for_read(&self) -> usize {
        (self.concurrency + self.prefetch).saturating_sub(self.running.len() + self.queued.len())
    }

    /// Every entry held, to keep fresh.
    pub fn held(&self) -> impl Iterator<Item = &K> {
        self.held.iter()
    }

    /// Whether `key` is held.
    pub fn holds(&self, key: &K) -> bool {
        self.held.contains(key)
    }

    /// Handlers running.
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Elements waiting for a slot.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Nothing is buffered for a flush.
    pub fn nothing_to_flush(&self) -> bool {
        self.acks.is_empty() && self.condemned.is_empty()
    }

    /// Entries buffered for the next flush.
    pub fn to_flush(&self) -> usize {
        self.acks.len() + self.condemned.len()
    }

    /// The invariant (for tests): `held` is the disjoint union of queued,
    /// running, awaiting ack and condemned.
    #[cfg(test)]
    fn check(&self) -> Result<(), String> {
        let mut union = HashSet::new();
        let all = self
            .queued
            .iter()
            .map(|(k, ..)| *k)
            .chain(self.running.keys().copied())
            .chain(self.acks.iter().copied())
            .chain(self.condemned.iter().map(|d| d.key));
        for k in all {
            if !union.insert(k) {
                return Err("an entry is in two states at once".into());
            }
        }
        if union != self.held {
            return Err("held is not the union of the states".into());
        }
        if self.running.len() > self.concurrency {
            return Err("more handlers running than the concurrency".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_element_goes_from_queued_to_running_to_acknowledged() {
        let mut l: Ledger<u32, &str> = Ledger::new(1, 0, 3);
        assert!(l.accept(1, 1, "a"));
        assert!(!l.accept(1, 2, "a again"), "a second delivery of a held entry is ignored");
        assert!(l.accept(2, 1, "b"));
        assert_eq!(l.room(), 0);
        assert_eq!(l.start_next(), Some((1, 1, "a")));
        assert_eq!(l.start_next(), None, "one slot");
        assert_eq!(l.settle(1, Ok(())), (Settled::Ack, None));
        assert_eq!(l.acks(), [1]);
        assert!(l.holds(&1), "held until acknowledged");
        l.acked();
        assert!(!l.holds(&1));
        l.check().unwrap();
    }

    #[test]
    fn failures_retry_until_the_last_delivery_then_go_dead() {
        let mut l: Ledger<u32, ()> = Ledger::new(4, 0, 2);
        l.accept(7, 1, ());
        l.start_next();
        assert_eq!(l.settle(7, Err("boom".into())), (Settled::Retry { delivery: 1 }, Some("boom".into())));
        assert!(!l.holds(&7), "a failed entry is left for a later claim");
        l.accept(7, 2, ());
        l.start_next();
        assert_eq!(l.settle(7, Err("boom".into())).0, Settled::Dead { delivery: 2 });
        assert_eq!(l.condemned()[0].detail, "delivery 2 of 2 failed: boom");
        assert!(l.holds(&7));
        let sent = l.condemned_sent();
        assert_eq!(sent.len(), 1);
        assert!(!l.holds(&7));
        assert_eq!(l.settle(7, Ok(())).0, Settled::Unknown);
        l.check().unwrap();
    }

    #[test]
    fn stopping_drops_the_queue_and_starts_nothing() {
        let mut l: Ledger<u32, ()> = Ledger::new(1, 5, 5);
        for k in 0..4 {
            l.accept(k, 1, ());
        }
        assert_eq!(l.free_for_read(), 2);
        l.start_next();
        assert_eq!(l.begin_stop(), 3);
        assert!(l.stopping());
        assert_eq!(l.start_next(), None);
        assert_eq!((l.running(), l.queued()), (1, 0));
        l.abandon(0);
        assert_eq!(l.held().count(), 0);
        l.check().unwrap();
    }

    #[test]
    fn a_lost_entry_matters_only_while_queued_or_running() {
        let mut l: Ledger<u32, ()> = Ledger::new(2, 0, 5);
        l.accept(1, 1, ());
        l.accept(2, 1, ());
        l.accept(3, 1, ());
        l.start_next();
        l.start_next();
        l.settle(2, Ok(()));
        assert!(l.lost(1), "running");
        assert!(l.lost(3), "queued");
        assert!(!l.lost(2), "awaiting its ack");
        assert!(!l.lost(9), "unknown");
        assert_eq!(l.held().copied().collect::<Vec<_>>(), [2]);
        l.check().unwrap();
    }

    #[derive(Debug, Clone)]
    enum Step {
        Accept(u8, u64),
        Reject(u8),
        Start,
        Settle(u8, bool),
        Abandon(u8),
        Acked,
        CondemnedSent,
        Lost(u8),
        Stop,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0u8..12, 1u64..5).prop_map(|(k, d)| Step::Accept(k, d)),
            1 => (0u8..12).prop_map(Step::Reject),
            4 => Just(Step::Start),
            4 => (0u8..12, any::<bool>()).prop_map(|(k, ok)| Step::Settle(k, ok)),
            1 => (0u8..12).prop_map(Step::Abandon),
            2 => Just(Step::Acked),
            1 => Just(Step::CondemnedSent),
            1 => (0u8..12).prop_map(Step::Lost),
            1 => Just(Step::Stop),
        ]
    }

    proptest! {
        /// Whatever happens, held is exactly the union of the four states,
        /// no more handlers run than allowed, and nothing starts after stop.
        #[test]
        fn held_is_always_the_union_of_the_states(concurrency in 1usize..4, prefetch in 0usize..3,
                                                  steps in proptest::collection::vec(step(), 0..200)) {
            let mut l: Ledger<u8, ()> = Ledger::new(concurrency, prefetch, 3);
            for s in steps {
                match s {
                    Step::Accept(k, d) => { l.accept(k, d, ()); }
                    Step::Reject(k) => { l.reject(k, Reason::MaxDeliveries, String::new()); }
                    Step::Start => {
                        let stopping = l.stopping();
                        let started = l.start_next();
                        prop_assert!(!(stopping && started.is_some()), "started after stop");
                    }
                    Step::Settle(k, ok) => { l.settle(k, if ok { Ok(()) } else { Err("x".into()) }); }
                    Step::Abandon(k) => l.abandon(k),
                    Step::Acked => l.acked(),
                    Step::CondemnedSent => { l.condemned_sent(); }
                    Step::Lost(k) => { l.lost(k); }
                    Step::Stop => { l.begin_stop(); }
                }
                prop_assert_eq!(l.check(), Ok(()));
                prop_assert!(l.free_for_read() <= concurrency + prefetch);
                prop_assert!(l.room() <= concurrency);
            }
        }
    }
}

//! The daemon's window of apply calls in flight, pure. Up to a few calls
//! are sent before the first one's reply arrives, so Redis goes from one
//! batch to the next without waiting for us. That is safe because
//! `apply.lua` applies nothing while an older entry is pending: should a
//! call stop early, every call sent after it finds its entries behind
//! that call's leftovers and applies nothing either.
//!
//! One round of the window:
//!
//! ```text
//! send while may_send ──▶ completed(reply) per call, in order ──▶ end()
//!                     ▲                                            │
//!                     └──────── Again (leftovers to resend) ◀──────┤
//!                               Release (due elements first) ◀─────┤
//!                               Blocked (an older entry elsewhere) ◀┘
//! ```

use std::collections::VecDeque;

use crate::core::EntryId;

/// How a round ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoundEnd {
    /// Every call applied what it was sent, or a call stopped early for a
    /// reason that a new call resolves: send what is left.
    Again,
    /// A call stopped because due elements wait: release them, then go on.
    Release,
    /// A call stopped at an entry held back by an older entry pending at
    /// another daemon: wait (or claim it) before going on.
    Blocked,
}

/// What one call's reply says (the parts the window acts on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Leading entries of the call that are done.
    pub processed: usize,
    /// The rest waits for an older entry pending elsewhere.
    pub blocked: bool,
    /// Due elements remain.
    pub more_due: bool,
}

/// Why sending stopped within a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// A call stopped early, held back by another daemon's entry (or
    /// applying nothing at all).
    Blocked,
    /// A call stopped early and its leftovers can be sent again at once.
    Short,
}

/// The calls in flight of one round (see the module docs).
#[derive(Debug)]
pub struct Window {
    /// Most calls in flight.
    capacity: usize,
    /// Each call's entry ids, in the order sent.
    sent: VecDeque<Vec<EntryId>>,
    /// The last entry id sent this round: the next call starts after it.
    last_sent: Option<EntryId>,
    /// Set by the first call that stopped early; after it nothing more is
    /// sent this round.
    stop: Option<Stop>,
    /// Some reply said due elements remain; nothing more is sent.
    more_due: bool,
}

impl Window {
    /// An empty round with room for `capacity` calls in flight.
    pub fn new(capacity: usize) -> Self {
        assert!(capacity > 0, "a window holds at least one call");
        Window { capacity, sent: VecDeque::new(), last_sent: None, stop: None, more_due: false }
    }

    /// Whether another call may be sent now.
    pub fn may_send(&self) -> bool {
        self.stop.is_none() && !self.more_due && self.sent.len() < self.capacity
    }

    /// Whether new input may join the round: a call is in flight (so
    /// waiting costs nothing) and another could be sent.
    pub fn may_take_input(&self) -> bool {
        !self.sent.is_empty() && self.may_send()
    }

    /// The next call starts after this entry id (`None`: from the start).
    pub fn after(&self) -> Option<EntryId> {
        self.last_sent
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        self.sent.len()
    }

    /// A call with `ids` (ascending, after [`Window::after`]) was sent.
    pub fn sent(&mut self, ids: Vec<EntryId>) {
        debug_assert!(self.may_send(), "sent past a stop or a full window");
        debug_assert!(ids.windows(2).all(|w| w[0] < w[1]), "a call's ids ascend");
        debug_assert!(match (self.last_sent, ids.first()) {
            (Some(last), Some(first)) => last < *first,
            _ => true,
        });
        if let Some(last) = ids.last() {
            self.last_sent = Some(*last);
        }
        self.sent.push_back(ids);
    }

    /// The oldest call in flight replied: returns its entry ids that are
    /// done (applied now or before) and may leave the backlog.
    pub fn completed(&mut self, reply: Reply) -> Vec<EntryId> {
        let mut ids = self.sent.pop_front().expect("a reply for a call in flight");
        self.more_due |= reply.more_due;
        if reply.processed < ids.len() && self.stop.is_none() {
            let blocked = (reply.blocked || reply.processed == 0) && !reply.more_due;
            self.stop = Some(if blocked { Stop::Blocked } else { Stop::Short });
        }
        ids.truncate(reply.processed);
        ids
    }

    /// How the round ended; call once no call is in flight.
    pub fn end(&self) -> RoundEnd {
        debug_assert!(self.sent.is_empty(), "the round ends with no call in flight");
        if self.more_due {
            RoundEnd::Release
        } else if self.stop == Some(Stop::Blocked) {
            RoundEnd::Blocked
        } else {
            RoundEnd::Again
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(range: std::ops::Range<u64>) -> Vec<EntryId> {
        range.map(|seq| EntryId { ms: 1, seq }).collect()
    }

    fn reply(processed: usize, blocked: bool, more_due: bool) -> Reply {
        Reply { processed, blocked, more_due }
    }

    #[test]
    fn two_full_calls_end_the_round_for_more() {
        let mut w = Window::new(2);
        w.sent(ids(0..3));
        assert!(w.may_send() && w.may_take_input());
        assert_eq!(w.after(), Some(EntryId { ms: 1, seq: 2 }));
        w.sent(ids(3..6));
        assert!(!w.may_send(), "the window is full");
        assert_eq!(w.completed(reply(3, false, false)), ids(0..3));
        assert!(w.may_send(), "a slot is free again");
        assert_eq!(w.completed(reply(3, false, false)), ids(3..6));
        assert_eq!(w.end(), RoundEnd::Again);
    }

    #[test]
    fn a_blocked_call_stops_sending_and_the_call_ahead_of_it_applies_nothing() {
        let mut w = Window::new(2);
        w.sent(ids(0..4));
        w.sent(ids(4..8));
        assert_eq!(w.completed(reply(1, true, false)), ids(0..1));
        assert!(!w.may_send() && !w.may_take_input(), "nothing more is sent after a stop");
        // The call sent ahead finds the leftovers pending: applies nothing.
        assert_eq!(w.completed(reply(0, true, false)), vec![]);
        assert_eq!(w.end(), RoundEnd::Blocked);
    }

    #[test]
    fn a_call_that_applies_nothing_counts_as_blocked() {
        let mut w = Window::new(2);
        w.sent(ids(0..4));
        assert_eq!(w.completed(reply(0, false, false)), vec![]);
        assert_eq!(w.end(), RoundEnd::Blocked);
    }

    #[test]
    fn due_elements_stop_the_round_for_a_release() {
        let mut w = Window::new(2);
        w.sent(ids(0..4));
        w.sent(ids(4..8));
        // A watermark at the third entry left due elements behind.
        assert_eq!(w.completed(reply(3, false, true)), ids(0..3));
        assert!(!w.may_send());
        assert_eq!(w.completed(reply(0, false, true)), vec![]);
        assert_eq!(w.end(), RoundEnd::Release);
    }

    #[test]
    fn due_elements_win_over_a_block_and_a_short_call_goes_again() {
        let mut w = Window::new(2);
        w.sent(ids(0..4));
        w.completed(reply(0, true, true));
        assert_eq!(w.end(), RoundEnd::Release, "releasing first; the block is looked at afterwards");

        let mut w = Window::new(1);
        w.sent(ids(0..4));
        assert_eq!(w.completed(reply(2, false, false)), ids(0..2));
        assert_eq!(w.end(), RoundEnd::Again, "a short call without a cause: send the rest again");
    }

    #[test]
    fn a_call_sent_ahead_that_did_apply_is_still_counted() {
        // Not expected from the script, but the window must not drop done
        // entries: they leave the backlog whatever the first reply said.
        let mut w = Window::new(2);
        w.sent(ids(0..2));
        w.sent(ids(2..4));
        w.completed(reply(1, true, false));
        assert_eq!(w.completed(reply(2, false, false)), ids(2..4));
        assert_eq!(w.end(), RoundEnd::Blocked);
    }

    proptest! {
        /// Never more calls in flight than the capacity, nothing sent after
        /// a stop, done ids are a prefix of their call, and the round's end
        /// follows from the first stop and any due elements.
        #[test]
        fn any_sequence_of_replies_keeps_the_rules(capacity in 1usize..4,
                                                   replies in proptest::collection::vec((0usize..6, any::<bool>(), any::<bool>()), 1..12)) {
            let mut w = Window::new(capacity);
            let mut next = 0u64;
            let mut any_due = false;
            let mut first_stop: Option<bool> = None;
            let mut replies = replies.into_iter();
            loop {
                while w.may_send() {
                    w.sent(ids(next..next + 5));
                    next += 5;
                }
                prop_assert!(w.in_flight() <= capacity);
                if w.in_flight() == 0 {
                    break;
                }
                let (processed, blocked, more_due) = replies.next().unwrap_or((5, false, false));
                let stopped_before = first_stop.is_some();
                let done = w.completed(reply(processed, blocked, more_due));
                prop_assert_eq!(done.len(), processed.min(5));
                any_due |= more_due;
                if processed < 5 && !stopped_before {
                    first_stop = Some((blocked || processed == 0) && !more_due);
                }
                if first_stop.is_some() || any_due {
                    prop_assert!(!w.may_send());
                }
                if next > 200 {
                    // Drain what is in flight and stop sending.
                    while w.in_flight() > 0 {
                        w.completed(reply(0, true, false));
                    }
                    return Ok(());
                }
            }
            let expect = if any_due {
                RoundEnd::Release
            } else if first_stop == Some(true) {
                RoundEnd::Blocked
            } else {
                RoundEnd::Again
            };
            prop_assert_eq!(w.end(), expect);
        }
    }
}

//! Where hand-overs land: the back and front buffers, and the admission rule for
//! an enforced bound (the `Reject` and `Block` policies).
//!
//! The store keeps the buffers under their own lock, the only one a hand-over
//! takes (unless it fills a batch, or a bound is enforced); this module holds
//! the pure parts: where entries go in a buffer, whether hand-overs are still
//! taken, and whether a hand-over may go in now, must fail, or may wait.

use crate::overflow::OverflowPolicy;
use crate::queue::Pile;
use crate::task::Priority;
use std::time::Instant;

/// Entries handed over by one call: one, or a `Vec` moved in whole.
pub(crate) enum Entries<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Entries<T> {
    pub(crate) fn into_vec(self) -> Vec<T> {
        match self {
            Entries::One(e) => vec![e],
            Entries::Many(v) => v,
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            Entries::One(_) => 1,
            Entries::Many(v) => v.len(),
        }
    }
}

/// The back and front buffers.
pub(crate) struct Intake<T> {
    back: Pile<T>,
    front: Pile<T>,
    /// When the oldest buffered entry arrived (`None`: both are empty).
    since: Option<Instant>,
    /// Hand-overs are refused (a shutdown began, or the engine failed).
    pub(crate) closed: bool,
    /// Entries ever handed over into the buffers.
    pub(crate) accepted: u64,
}

impl<T> Intake<T> {
    pub(crate) fn new() -> Self {
        Intake {
            back: Pile::new(),
            front: Pile::new(),
            since: None,
            closed: false,
            accepted: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.back.len() + self.front.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When the oldest buffered entry arrived.
    pub(crate) fn since(&self) -> Option<Instant> {
        self.since
    }

    /// Adds a call's entries to a buffer; `now` is read only when the buffers
    /// were empty.
    #[inline]
    pub(crate) fn put(
        &mut self,
        entries: Entries<T>,
        priority: Priority,
        batch: usize,
        now: impl FnOnce() -> Instant,
    ) {
        if self.since.is_none() {
            self.since = Some(now());
        }
        self.accepted += entries.len() as u64;
        let pile = match priority {
            Priority::Back => &mut self.back,
            Priority::Front => &mut self.front,
        };
        match entries {
            Entries::One(entry) => pile.push_one(entry, batch),
            Entries::Many(v) => pile.push_vec(v, batch),
        }
    }

    /// Takes both buffers: (front chunks, back chunks), each in arrival order.
    pub(crate) fn take(&mut self) -> (Vec<Vec<T>>, Vec<Vec<T>>) {
        self.since = None;
        (self.front.take(), self.back.take())
    }
}

/// What an enforced bound says to a hand-over of `n` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admit {
    /// It fits now (or no bound is enforced).
    Now,
    /// It can never fit, or the policy does not wait: fail with `Full`.
    Full,
    /// It does not fit now; the caller may wait for room.
    Wait,
}

/// The admission rule. `waiting` counts the entries that hold room now
/// (buffered, queued, retrying); `bound` is the bound in force (lowered by a
/// shrink), `configured` the one set at build time. A hand-over that fits the
/// configured bound is always admitted into an empty engine: with nothing
/// waiting, no room would ever come by waiting (only an `expand`).
pub(crate) fn admit(
    policy: OverflowPolicy,
    configured: Option<usize>,
    bound: Option<usize>,
    waiting: usize,
    n: usize,
) -> Admit {
    let (Some(configured), Some(bound)) = (configured, bound) else {
        return Admit::Now;
    };
    if policy == OverflowPolicy::DropNewest {
        return Admit::Now;
    }
    if n > configured {
        return Admit::Full;
    }
    if waiting.saturating_add(n) <= bound || waiting == 0 {
        return Admit::Now;
    }
    match policy {
        OverflowPolicy::Block => Admit::Wait,
        _ => Admit::Full,
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_rule() {
        use OverflowPolicy::*;
        assert_eq!(admit(Block, None, None, 10, 5), Admit::Now);
        assert_eq!(admit(DropNewest, Some(3), Some(3), 10, 5), Admit::Now);
        assert_eq!(admit(Reject, Some(10), Some(10), 5, 5), Admit::Now);
        assert_eq!(admit(Reject, Some(10), Some(10), 6, 5), Admit::Full);
        assert_eq!(admit(Block, Some(10), Some(10), 6, 5), Admit::Wait);
        assert_eq!(admit(Block, Some(10), Some(4), 1, 5), Admit::Wait); // shrunk
        assert_eq!(admit(Block, Some(10), Some(4), 0, 5), Admit::Now); // but empty
        assert_eq!(admit(Block, Some(10), Some(10), 0, 11), Admit::Full);
        assert_eq!(admit(Block, Some(10), Some(10), usize::MAX, 1), Admit::Wait);
    }

    #[test]
    fn the_oldest_arrival_is_kept_until_taken() {
        let mut intake = Intake::new();
        let t0 = Instant::now();
        intake.put(Entries::One(1), Priority::Back, 2, || t0);
        intake.put(Entries::Many(vec![2, 3]), Priority::Front, 2, || {
            panic!("read")
        });
        assert_eq!((intake.len(), intake.since()), (3, Some(t0)));
        let (front, back) = intake.take();
        assert_eq!((front, back), (vec![vec![2, 3]], vec![vec![1]]));
        assert!(intake.is_empty() && intake.since().is_none());
    }
}

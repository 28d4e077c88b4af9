//! The store's side of key de-duplication (see `dedup`): hand-overs pass the
//! key table before they take the callers' lock (the key function is user
//! code), a failed hand-over is taken back out of it, and the entries it drops
//! are reported as duplicates.

use super::{Refusal, Store, Wait};
use crate::intake::Entries;
use crate::overflow::OverflowReason;
use crate::task::Priority;

impl<T: Send + 'static> Store<T> {
    /// `buffer` and friends: into the back or front buffer.
    #[inline(always)]
    pub(crate) fn hand_over(
        &self,
        entries: Entries<T>,
        priority: Priority,
        wait: Wait,
    ) -> Result<(), (Refusal, Entries<T>)> {
        let Some(table) = &self.dedup else {
            return self.hand_over_kept(entries, priority, wait);
        };
        let front = priority == Priority::Front;
        let all = entries.into_vec();
        let keep = table.admit(&all, front);
        let (kept, dups) = split(all, &keep);
        if kept.is_empty() {
            // Nothing to hand over, but a stopped engine still says so (the
            // duplicates are back entries: the table did not change for them).
            if self.is_stopped() {
                return Err((Refusal::Stopped, Entries::Many(dups)));
            }
            self.duplicates(dups);
            return Ok(());
        }
        match self.hand_over_kept(Entries::Many(kept), priority, wait) {
            Ok(()) => {
                self.duplicates(dups);
                Ok(())
            }
            Err((refusal, kept)) => {
                let kept = kept.into_vec();
                table.left(&kept);
                Err((refusal, Entries::Many(merge(kept, dups, &keep))))
            }
        }
    }

    /// `push_back` / `push_front`: straight into the queue.
    pub(crate) fn push(
        &self,
        entries: Vec<T>,
        priority: Priority,
        wait: Wait,
    ) -> Result<(), (Refusal, Vec<T>)> {
        let Some(table) = &self.dedup else {
            return self.push_kept(entries, priority, wait);
        };
        let front = priority == Priority::Front;
        let keep = table.admit(&entries, front);
        let (kept, dups) = split(entries, &keep);
        let result = match (kept.is_empty(), self.is_stopped()) {
            (true, true) => Err((Refusal::Stopped, kept)), // as in `hand_over`
            (true, false) => Ok(()),
            (false, _) => self.push_kept(kept, priority, wait),
        };
        match result {
            Ok(()) => {
                self.duplicates(dups);
                Ok(())
            }
            Err((refusal, kept)) => {
                table.left(&kept);
                Err((refusal, merge(kept, dups, &keep)))
            }
        }
    }

    /// Entries coming in another way (`init`, a run's retries): the
    /// duplicates are dropped and reported; the rest come back.
    pub(crate) fn drop_duplicates(&self, entries: Vec<T>, priority: Priority) -> Vec<T> {
        let Some(table) = &self.dedup else {
            return entries;
        };
        if entries.is_empty() {
            return entries;
        }
        let keep = table.admit(&entries, priority == Priority::Front);
        let (kept, dups) = split(entries, &keep);
        self.duplicates(dups);
        kept
    }

    /// Entries dropped as duplicates: counted, then reported. (Counted only
    /// here, so a refused hand-over, which hands its duplicates back, counts
    /// none.)
    fn duplicates(&self, dups: Vec<T>) {
        if dups.is_empty() {
            return;
        }
        if let Some(table) = &self.dedup {
            table.count_dropped(dups.len());
        }
        self.reporter.overflow(dups, OverflowReason::Duplicate);
    }

    /// A failed run's entries come back: each is admitted again as a back
    /// hand-over (one whose key another waiting entry holds is dropped).
    pub(crate) fn readmit(&self, s: &mut crate::retry::Settled<T>) {
        if self.dedup.is_none() {
            return;
        }
        s.requeue = self.drop_duplicates(std::mem::take(&mut s.requeue), Priority::Back);
        s.fresh = self.drop_duplicates(std::mem::take(&mut s.fresh), Priority::Back);
        let later = std::mem::take(&mut s.later.entries);
        if !later.is_empty() {
            let attempts = std::mem::take(&mut s.later.attempts);
            let keep = self
                .dedup
                .as_ref()
                .map_or_else(Vec::new, |t| t.admit(&later, false));
            s.later.attempts = attempts
                .into_iter()
                .zip(&keep)
                .filter(|(_, k)| **k)
                .map(|(a, _)| a)
                .collect();
            let (kept, dups) = split(later, &keep);
            s.later.entries = kept;
            self.duplicates(dups);
        }
    }

    /// A worker took these entries: their keys are no longer waiting (a new
    /// entry with one of them is queued again while this one runs).
    pub(crate) fn taken(&self, entries: &[T]) {
        if let Some(table) = &self.dedup {
            table.left(entries);
        }
    }
}

/// Splits `entries` by `keep` into (kept, dropped), each in order.
fn split<T>(entries: Vec<T>, keep: &[bool]) -> (Vec<T>, Vec<T>) {
    if keep.iter().all(|k| *k) {
        return (entries, Vec::new());
    }
    let mut kept = Vec::with_capacity(entries.len());
    let mut dropped = Vec::new();
    for (entry, k) in entries.into_iter().zip(keep) {
        if *k {
            kept.push(entry);
        } else {
            dropped.push(entry);
        }
    }
    (kept, dropped)
}

/// Undoes `split`: the entries back in their original order.
fn merge<T>(kept: Vec<T>, dropped: Vec<T>, keep: &[bool]) -> Vec<T> {
    let (mut kept, mut dropped) = (kept.into_iter(), dropped.into_iter());
    keep.iter()
        .filter_map(|k| if *k { kept.next() } else { dropped.next() })
        .collect()
}

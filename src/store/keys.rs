//! The store's side of key de-duplication (see `dedup`): a hand-over's keys
//! are computed before the callers' lock (the key function is user code) and
//! marked under it once the hand-over is admitted; the entries it drops are
//! counted and reported as duplicates.

use super::{Job, Refusal, Store, Wait};
use crate::dedup::{Prepared, Table};
use crate::intake::Entries;
use crate::intake::Intake;
use crate::overflow::OverflowReason;
use crate::task::Priority;
use crate::unwind::drop_quietly;
use parking_lot::MutexGuard;

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
        let a = self
            .admit_keyed(table.as_ref(), entries.into_vec(), priority, wait, false)
            .map_err(|(refusal, all)| (refusal, Entries::Many(all)))?;
        if a.kept.is_empty() {
            drop(a.intake);
            self.add_heap(a.heap);
        } else {
            self.buffer_admitted(a.intake, Entries::Many(a.kept), priority, a.heap);
        }
        drop_quietly("dedup keys", a.keys);
        self.unweigh(&a.dups);
        self.duplicates(a.dups);
        Ok(())
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
        let a = self.admit_keyed(table.as_ref(), entries, priority, wait, true)?;
        if a.kept.is_empty() {
            drop(a.intake);
            self.add_heap(a.heap);
            self.release_unsettled(a.held);
        } else {
            // Released once the bound has looked (before the overflow
            // handler runs): see `enqueue`.
            self.queue_admitted(a.intake, a.kept, priority, a.heap, a.held);
        }
        drop_quietly("dedup keys", a.keys);
        self.unweigh(&a.dups);
        self.duplicates(a.dups);
        Ok(())
    }

    /// Weighs the entries and computes their keys (user code, outside the
    /// locks), admits the hand-over, and only then marks the keys, under the
    /// callers' lock: a hand-over that is refused never marked anything
    /// another one could have seen. The bound counts the duplicates too.
    fn admit_keyed<'a>(
        &'a self,
        table: &'a dyn Table<T>,
        entries: Vec<T>,
        priority: Priority,
        wait: Wait,
        pushed: bool,
    ) -> Result<Admitted<'a, T>, (Refusal, Vec<T>)> {
        let heap = self.weigh(&entries);
        let mut keys = table.prepare(&entries);
        let mut intake = self.intake.lock();
        if let Err(refusal) = self.admit(&mut intake, entries.len(), wait) {
            drop(intake);
            drop_quietly("dedup keys", keys);
            return Err((refusal, entries));
        }
        // Straight into the queue, where a bound (or a shrink) may refuse
        // them: unsettled from before their keys are marked.
        let held = self.hold_unsettled(pushed && !self.config.enforced(), || entries.len());
        let (kept, dups) = split(entries, &keys.mark(priority == Priority::Front, held));
        Ok(Admitted {
            intake,
            kept,
            dups,
            heap,
            keys,
            held,
        })
    }

    /// Entries coming in another way (`init`): the kept ones and the
    /// duplicates, not yet reported (see [`duplicates`](Self::duplicates)).
    pub(crate) fn split_duplicates(
        &self,
        entries: Vec<T>,
        priority: Priority,
        own: usize,
    ) -> (Vec<T>, Vec<T>) {
        let Some(table) = &self.dedup else {
            return (entries, Vec::new());
        };
        if entries.is_empty() {
            return (entries, Vec::new());
        }
        let keep = table.admit(&entries, priority == Priority::Front, own);
        split(entries, &keep)
    }

    /// Entries coming in another way (`init`, a run's retries): the
    /// duplicates are dropped and reported; the rest come back.
    pub(crate) fn drop_duplicates(
        &self,
        entries: Vec<T>,
        priority: Priority,
        own: usize,
    ) -> Vec<T> {
        let Some(table) = &self.dedup else {
            return entries;
        };
        if entries.is_empty() {
            return entries;
        }
        let keep = table.admit(&entries, priority == Priority::Front, own);
        let (kept, dups) = split(entries, &keep);
        self.duplicates(dups);
        kept
    }

    /// Entries dropped as duplicates: counted, then reported. (Counted only
    /// here, so a refused hand-over, which hands its duplicates back, counts
    /// none.)
    pub(crate) fn duplicates(&self, dups: Vec<T>) {
        if dups.is_empty() {
            return;
        }
        if let Some(table) = &self.dedup {
            table.count_dropped(dups.len());
        }
        let _mark = crate::threads::handling(self.id); // as in `report`
        self.reporter.overflow(dups, OverflowReason::Duplicate);
    }

    /// A failed run's entries come back, admitted again. The batch's own
    /// entries first, as they go back whatever the bound: so a retry never
    /// yields to one of the run's new entries that the bound then refuses;
    /// and, unless the bound is enforced, as front entries, never dropped at
    /// once (a buffered twin may yet be refused at the flush). The new ones,
    /// as back hand-overs, may be refused: they are held unsettled from
    /// before their keys are marked until `apply` has looked at them (see
    /// `dedup::Unsettled`).
    pub(crate) fn readmit(&self, s: &mut crate::retry::Settled<T>) {
        let Some(table) = &self.dedup else {
            return;
        };
        // A twin may be buffered, and a bound that is not enforced may still
        // refuse it at the flush: then the batch's own entries (which go back
        // whatever the bound) are kept, and dropped only if a worker reaches
        // them after a twin's run began.
        let own = if self.config.enforced() {
            Priority::Back
        } else {
            Priority::Front
        };
        s.requeue = self.drop_duplicates(std::mem::take(&mut s.requeue), own, 0);
        let later = std::mem::take(&mut s.later.entries);
        if !later.is_empty() {
            let attempts = std::mem::take(&mut s.later.attempts);
            let keep = table.admit(&later, own == Priority::Front, 0);
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
        s.unsettled = self.hold_unsettled(true, || s.fresh.len());
        s.fresh = self.drop_duplicates(std::mem::take(&mut s.fresh), Priority::Back, s.unsettled);
    }

    /// Under key de-duplication, counts `n()` entries unsettled (see
    /// `dedup::Unsettled`) when `at_risk`: a bound may still refuse them
    /// once their keys are marked. Returns how many, for
    /// [`release_unsettled`](Self::release_unsettled).
    pub(super) fn hold_unsettled(&self, at_risk: bool, n: impl FnOnce() -> usize) -> usize {
        match &self.unsettled {
            Some(d) if at_risk => {
                let n = n();
                d.hold(n);
                n
            }
            _ => 0,
        }
    }

    /// The entries [`hold_unsettled`](Self::hold_unsettled) counted are
    /// settled: admitted, or counted again as overflow.
    pub(super) fn release_unsettled(&self, held: usize) {
        if let Some(d) = &self.unsettled {
            d.release(held);
        }
    }

    /// A worker took this batch: its keys are no longer waiting (a new entry
    /// with one of them is kept while this one runs). An entry whose work a
    /// run that started after it came in covers (a twin taken before it) is
    /// dropped from the batch as a duplicate, counted and reported (with the
    /// worker's run slot still held, so `wait_idle` waits for its handler).
    ///
    /// Worker `w`'s run slot then counts only the entries that run (for a
    /// shutdown's `still_running`, `wait_idle`'s count, the watchdog's line).
    pub(crate) fn taken(&self, w: usize, job: &mut Job<T>) {
        let Some(table) = &self.dedup else {
            return;
        };
        let Some(run) = table.taken(&job.entries) else {
            return;
        };
        if let Some(attempts) = job.attempts.take() {
            let (kept, _) = split(attempts, &run);
            job.attempts = Some(kept);
        }
        let (kept, dups) = split(std::mem::take(&mut job.entries), &run);
        job.entries = kept;
        let n = dups.len();
        self.unweigh(&dups);
        self.duplicates(dups);
        // Only once their handler has returned: until then they have not
        // left, and `wait_idle` counts them through this slot.
        self.lock().run_shrank(w, n);
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

/// An admitted hand-over, its keys marked: the callers' lock still held, the
/// entries to keep, the duplicates, and the heap of them all.
struct Admitted<'a, T> {
    intake: MutexGuard<'a, Intake<T>>,
    kept: Vec<T>,
    dups: Vec<T>,
    heap: i64,
    /// The keys not marked: dropped once the callers' lock is released.
    keys: Box<dyn Prepared + 'a>,
    /// Entries held unsettled (see `hold_unsettled`), released once queued.
    held: usize,
}

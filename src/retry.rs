//! The opt-in retry policy: per-entry attempt counts, a maximum, exponential
//! backoff with jitter, and a dead-letter handler.
//!
//! Without a policy (the default) a retry goes straight to the back of the queue,
//! for ever, as in the original. With one, retried entries stay out of the queue:
//! each group waits in a timer heap until its backoff has passed (no thread
//! sleeps), then is taken ahead of the queue, as its own batches, carrying its
//! attempt counts. An entry whose attempts reach the maximum goes to the
//! dead-letter handler instead, with the reason.
//!
//! [`settle`] decides, for a run that did not simply succeed, where each entry
//! goes; the worker calls it outside every lock, then hands the result to the
//! store.

use crate::clock::{self, FAR};
use crate::unwind::catch;
use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

/// How often, and how far apart, failed entries are tried again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub(crate) max_attempts: u32,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
}

impl RetryPolicy {
    /// An entry is run at most `max_attempts` times (at least 1); then it goes to
    /// the dead-letter handler. Backoff defaults: 100 ms, doubling, capped at 30 s.
    pub fn new(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }

    /// The wait before the second attempt; each later wait doubles, up to `max`.
    /// Each wait is then drawn between half and all of that ("equal jitter"), so
    /// entries that failed together do not all come back at once. Zero: no wait.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max.max(initial);
        self
    }

    /// The wait after an entry's `attempts`-th failed run, before jitter.
    pub(crate) fn delay(&self, attempts: u32) -> Duration {
        let doublings = attempts.saturating_sub(1).min(32);
        self.initial_backoff
            .saturating_mul(1u32 << doublings.min(31))
            .min(self.max_backoff)
    }
}

/// Why entries were dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DeadLetterReason {
    /// The last run panicked, with this message.
    Panicked(String),
    /// The last run asked for a retry.
    RetryRequested,
    /// The last run failed with this error.
    Failed(crate::task::RunError),
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterReason::Panicked(msg) => write!(f, "panicked: {msg}"),
            DeadLetterReason::RetryRequested => f.write_str("retry requested"),
            DeadLetterReason::Failed(error) => write!(f, "failed: {error}"),
        }
    }
}

/// Receives entries whose attempts are spent. Called on the worker thread whose
/// run spent them, never under a lock; a panic in it is caught and logged.
pub type DeadLetterHandler<T> = Box<dyn Fn(Vec<T>, DeadLetterReason) + Send + Sync + 'static>;

/// How a retried entry is told to be one of the failed batch's own.
pub(crate) type Same<T> = fn(&T, &T) -> bool;

/// Entries with their attempt counts (parallel vectors), and the generation
/// of the batch they came from (see `queue`).
pub(crate) struct Group<T> {
    pub(crate) entries: Vec<T>,
    pub(crate) attempts: Vec<u32>,
    pub(crate) gen: u64,
}

/// The policy with its matcher: fixed at start, read by every worker.
pub(crate) struct Rules<T> {
    pub(crate) policy: RetryPolicy,
    pub(crate) same: Same<T>,
}

/// The policy's state: waiting groups and ready groups.
pub(crate) struct Retries<T> {
    policy: RetryPolicy,
    waiting: BinaryHeap<Reverse<(Instant, u64)>>,
    groups: std::collections::HashMap<u64, Group<T>>,
    ready: VecDeque<Group<T>>,
    next_id: u64,
    rng: u64,
    len: usize,
}

impl<T> Retries<T> {
    pub(crate) fn new(policy: RetryPolicy) -> Self {
        // Seeded per process (std's hasher keys are random), so processes that
        // fail together do not retry in step.
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u64(0x9E37_79B9_7F4A_7C15);
        let seed = hasher.finish();
        Retries {
            policy,
            waiting: BinaryHeap::new(),
            groups: Default::default(),
            ready: VecDeque::new(),
            next_id: 0,
            rng: seed | 1,
            len: 0,
        }
    }

    /// Entries waiting or ready.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Groups whose backoff has passed, waiting to be taken.
    pub(crate) fn ready_groups(&self) -> usize {
        self.ready.len()
    }

    /// When the next waiting group is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.waiting.peek().map(|Reverse((when, _))| *when)
    }

    fn jitter(&mut self, delay: Duration) -> Duration {
        // xorshift64: cheap, and good enough to spread retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let fraction = 0.5 + (self.rng >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        // Cut first: a fraction of `Duration::MAX` may not fit a `Duration`.
        delay.min(FAR).mul_f64(fraction)
    }

    /// Files entries after a failed run: each with its new attempt count, waiting
    /// its backoff.
    pub(crate) fn delay(&mut self, group: Group<T>, now: Instant) {
        if group.entries.is_empty() {
            return;
        }
        let most = group.attempts.iter().copied().max().unwrap_or(1);
        let wait = self.jitter(self.policy.delay(most));
        self.len += group.entries.len();
        if wait.is_zero() {
            self.ready.push_back(group);
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.groups.insert(id, group);
        self.waiting.push(Reverse((clock::after(now, wait), id)));
    }

    /// Moves groups whose time has come to the ready list.
    pub(crate) fn wake(&mut self, now: Instant) {
        while let Some(Reverse((when, id))) = self.waiting.peek().copied() {
            if when > now {
                break;
            }
            self.waiting.pop();
            if let Some(group) = self.groups.remove(&id) {
                self.ready.push_back(group);
            }
        }
    }

    /// Up to `n` ready entries with their attempts, as one batch.
    pub(crate) fn pop_ready(&mut self, n: usize) -> Option<Group<T>> {
        let group = self.ready.front_mut()?;
        let batch = if group.entries.len() <= n {
            self.ready.pop_front().expect("front exists")
        } else {
            Group {
                entries: group.entries.drain(..n).collect(),
                attempts: group.attempts.drain(..n).collect(),
                gen: group.gen,
            }
        };
        self.len -= batch.entries.len();
        Some(batch)
    }

    /// Entries waiting or ready from generation `gen` or earlier.
    pub(crate) fn count_upto(&self, gen: u64) -> usize {
        let ready = self.ready.iter().filter(|g| g.gen <= gen);
        let waiting = self.groups.values().filter(|g| g.gen <= gen);
        ready.chain(waiting).map(|g| g.entries.len()).sum()
    }

    /// Every entry, ready first, then waiting in due order.
    pub(crate) fn drain_all(&mut self) -> Vec<T> {
        let mut all = Vec::with_capacity(self.len);
        for group in self.ready.drain(..) {
            all.extend(group.entries);
        }
        let mut waiting: Vec<(Instant, u64)> = self.waiting.drain().map(|r| r.0).collect();
        waiting.sort();
        for (_, id) in waiting {
            if let Some(group) = self.groups.remove(&id) {
                all.extend(group.entries);
            }
        }
        self.len = 0;
        all
    }
}

impl<T> Rules<T> {
    /// Splits a failed batch's retry list into entries that were in the batch
    /// (their count goes on) and new ones (which start afresh).
    ///
    /// Each entry is looked for from just past the last match, wrapping round
    /// once: a list that keeps the batch's order (the whole batch, or a filter of
    /// it) is matched in one pass, linear in the batch's size. A list in another
    /// order, or new entries, cost up to one pass of the batch each.
    ///
    /// The comparison is the entries' `==`, user code: it runs contained. If it
    /// panics, the list is sorted as without a policy (the first as many entries
    /// as the batch held are its own, with the attempts of the batch's entries
    /// in the same places), so nothing is lost or doubled.
    pub(crate) fn match_attempts(
        &self,
        batch: &[T],
        attempts: &[u32],
        again: Vec<T>,
    ) -> (Group<T>, Vec<T>) {
        let places = match catch(|| self.places(batch, &again)) {
            Ok(places) => places,
            Err(msg) => {
                log::error!("comparing retried entries panicked (matched by position): {msg}");
                (0..again.len())
                    .map(|i| (i < batch.len()).then_some(i))
                    .collect()
            }
        };
        let mut known = Group::default();
        let mut fresh = Vec::new();
        for (entry, place) in again.into_iter().zip(places) {
            match place {
                Some(i) => {
                    let before = attempts.get(i).copied().unwrap_or(0);
                    known.attempts.push(before.saturating_add(1));
                    known.entries.push(entry);
                }
                None => fresh.push(entry),
            }
        }
        (known, fresh)
    }

    /// For each retried entry, the place in the batch of the entry it equals
    /// (each place used once), or `None` for a new entry.
    fn places(&self, batch: &[T], again: &[T]) -> Vec<Option<usize>> {
        let mut used = vec![false; batch.len()];
        let mut cursor = 0;
        again
            .iter()
            .map(|entry| {
                let found = (cursor..batch.len())
                    .chain(0..cursor)
                    .find(|&i| !used[i] && (self.same)(&batch[i], entry));
                if let Some(i) = found {
                    used[i] = true;
                    cursor = i + 1;
                }
                found
            })
            .collect()
    }
}

/// Why a run did not simply succeed.
pub(crate) enum Failed<T> {
    /// `Retry` or `Fail`: the whole batch again.
    All(Option<crate::task::RunError>),
    /// `RetryEntries` or `FailEntries`: these entries again (the batch's own, or
    /// new ones).
    These(Vec<T>, Option<crate::task::RunError>),
    /// The run panicked with this message: the whole batch again.
    Panicked(String),
}

/// Where the entries of a run that did not simply succeed go.
pub(crate) struct Settled<T> {
    /// Entries the run let go: done.
    pub(crate) processed: u64,
    /// The batch's own entries, back to the queue whatever its bound (no policy).
    pub(crate) requeue: Vec<T>,
    /// The batch's own entries waiting their backoff (under a policy).
    pub(crate) later: Group<T>,
    /// New entries: admitted like any hand-over (the bound applies).
    pub(crate) fresh: Vec<T>,
    /// Entries whose attempts are spent, and why.
    pub(crate) dead: Vec<T>,
    pub(crate) reason: DeadLetterReason,
    /// The panic message, if the run panicked.
    pub(crate) panic: Option<String>,
    /// The error the run failed with, if it said.
    pub(crate) error: Option<crate::task::RunError>,
    /// The batch itself, to be dropped by the worker (outside every lock).
    pub(crate) spent: Vec<T>,
    /// New entries the key table counts unsettled until the bound has looked
    /// at them (see `dedup::Unsettled`).
    pub(crate) unsettled: usize,
}

impl<T> Settled<T> {
    /// Entries that run again (counted as retried).
    pub(crate) fn retried(&self) -> usize {
        self.requeue.len() + self.later.entries.len() + self.fresh.len()
    }
}

/// Decides where the entries of a failed run go. `policy` is the retry policy
/// and its matcher, if one is set.
///
/// Without a policy the engine cannot tell a batch's own entries from new ones
/// (entries need not be comparable), so it counts: the first as many entries of
/// the list as the batch held count as its own; any more are new. With a policy
/// they are matched by `==` (see [`Retries::match_attempts`]).
pub(crate) fn settle<T>(
    batch: Vec<T>,
    attempts: Option<Vec<u32>>,
    failed: Failed<T>,
    policy: Option<&Rules<T>>,
) -> Settled<T> {
    let (again, panic, error) = match failed {
        Failed::All(error) => (None, None, error),
        Failed::These(list, error) => (Some(list), None, error),
        Failed::Panicked(msg) => (None, Some(msg), None),
    };
    let reason = match (&panic, &error) {
        (Some(msg), _) => DeadLetterReason::Panicked(msg.clone()),
        (None, Some(error)) => DeadLetterReason::Failed(error.clone()),
        (None, None) => DeadLetterReason::RetryRequested,
    };
    let mut out = Settled {
        processed: 0,
        requeue: Vec::new(),
        later: Group::default(),
        fresh: Vec::new(),
        dead: Vec::new(),
        reason,
        panic,
        error,
        spent: Vec::new(),
        unsettled: 0,
    };
    match policy {
        None => settle_counted(&mut out, batch, again),
        Some(rules) => settle_matched(&mut out, batch, attempts, again, rules),
    }
    out
}

/// Without a policy: the first as many entries of the list as the batch held
/// are its own; any more are new.
fn settle_counted<T>(out: &mut Settled<T>, batch: Vec<T>, again: Option<Vec<T>>) {
    match again {
        None => out.requeue = batch,
        Some(mut list) => {
            let own = list.len().min(batch.len());
            out.fresh = list.split_off(own);
            out.requeue = list;
            out.processed = (batch.len() - own) as u64;
            out.spent = batch;
        }
    }
}

/// Under a policy: entries matched to the batch carry their attempts on, and
/// those out of attempts die.
fn settle_matched<T>(
    out: &mut Settled<T>,
    batch: Vec<T>,
    attempts: Option<Vec<u32>>,
    again: Option<Vec<T>>,
    rules: &Rules<T>,
) {
    let attempts = attempts.unwrap_or_else(|| vec![0; batch.len()]);
    let known = match again {
        None => Group {
            attempts: attempts.iter().map(|a| a.saturating_add(1)).collect(),
            entries: batch,
            gen: 0,
        },
        Some(list) => {
            let (known, fresh) = rules.match_attempts(&batch, &attempts, list);
            out.processed = (batch.len() - known.entries.len()) as u64;
            out.fresh = fresh;
            out.spent = batch;
            known
        }
    };
    let max = rules.policy.max_attempts;
    for (entry, n) in known.entries.into_iter().zip(known.attempts) {
        if n >= max {
            out.dead.push(entry);
        } else {
            out.later.entries.push(entry);
            out.later.attempts.push(n);
        }
    }
}

impl<T> Default for Group<T> {
    fn default() -> Self {
        Group {
            entries: Vec::new(),
            attempts: Vec::new(),
            gen: 0,
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let p = RetryPolicy::new(10).backoff(Duration::from_millis(10), Duration::from_millis(50));
        assert_eq!(p.delay(1), Duration::from_millis(10));
        assert_eq!(p.delay(2), Duration::from_millis(20));
        assert_eq!(p.delay(3), Duration::from_millis(40));
        assert_eq!(p.delay(4), Duration::from_millis(50));
        assert_eq!(p.delay(400), Duration::from_millis(50));
        assert_eq!(RetryPolicy::new(0).max_attempts, 1);
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        let mut r: Retries<u8> = Retries::new(RetryPolicy::new(3));
        for _ in 0..1000 {
            let d = r.jitter(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
    }

    /// Issue #9, defect 15: the jitter is seeded from std's random hasher
    /// keys, not from a clock or a constant, so two engines (or processes)
    /// made at the same moment do not retry in step.
    #[test]
    fn each_retry_set_draws_its_own_jitter() {
        let draws = || {
            let mut r: Retries<u8> = Retries::new(RetryPolicy::new(3));
            (0..8)
                .map(|_| r.jitter(Duration::from_secs(1)))
                .collect::<Vec<_>>()
        };
        assert_ne!(draws(), draws());
    }

    #[test]
    fn retried_entries_keep_their_count_and_new_ones_start_afresh() {
        let r: Rules<u8> = Rules {
            policy: RetryPolicy::new(3),
            same: |a, b| a == b,
        };
        let (known, fresh) = r.match_attempts(&[1, 2, 2, 3], &[0, 1, 2, 0], vec![2, 9, 2, 3]);
        assert_eq!(known.entries, vec![2, 2, 3]);
        assert_eq!(known.attempts, vec![2, 3, 1]);
        assert_eq!(fresh, vec![9]);
    }

    #[test]
    fn matching_a_long_list_in_order_is_linear() {
        use std::cell::Cell;
        thread_local!(static CALLS: Cell<u64> = const { Cell::new(0) });
        let r: Rules<u32> = Rules {
            policy: RetryPolicy::new(3),
            same: |a, b| {
                CALLS.with(|c| c.set(c.get() + 1));
                a == b
            },
        };
        let n = 40_000u32;
        let batch: Vec<u32> = (0..n).collect();
        let attempts = vec![1; n as usize];
        let (known, fresh) = r.match_attempts(&batch, &attempts, batch.clone());
        assert_eq!((known.entries.len(), fresh.len()), (n as usize, 0));
        assert!(known.attempts.iter().all(|&a| a == 2));
        assert_eq!(CALLS.with(Cell::get), u64::from(n)); // one comparison each
        CALLS.with(|c| c.set(0));
        let odd: Vec<u32> = batch.iter().copied().filter(|e| e % 2 == 1).collect();
        let (known, _) = r.match_attempts(&batch, &attempts, odd);
        assert_eq!(known.entries.len(), n as usize / 2);
        assert!(CALLS.with(Cell::get) <= u64::from(n)); // one pass
    }

    #[test]
    fn without_a_policy_a_run_hands_back_at_most_its_batch_unbounded() {
        let s = settle(
            vec![1, 2, 3],
            None,
            Failed::These(vec![7, 8, 9, 10, 11], None),
            None,
        );
        assert_eq!(
            (s.requeue, s.fresh, s.processed),
            (vec![7, 8, 9], vec![10, 11], 0)
        );
        let s = settle(vec![1, 2, 3], None, Failed::These(vec![2], None), None);
        assert_eq!((s.requeue, s.fresh, s.processed), (vec![2], vec![], 2));
        let s = settle(vec![1, 2], None, Failed::Panicked("x".into()), None);
        assert_eq!((s.requeue, s.panic), (vec![1, 2], Some("x".to_string())));
    }

    #[test]
    fn under_a_policy_spent_entries_die_with_the_reason() {
        let r: Rules<u8> = Rules {
            policy: RetryPolicy::new(2),
            same: |a, b| a == b,
        };
        let s = settle(
            vec![1, 2, 3],
            Some(vec![1, 0, 0]),
            Failed::These(vec![1, 2, 9], None),
            Some(&r),
        );
        assert_eq!(s.dead, vec![1]);
        assert_eq!((s.later.entries, s.later.attempts), (vec![2], vec![1]));
        assert_eq!((s.fresh, s.processed), (vec![9], 1));
        assert_eq!(s.reason, DeadLetterReason::RetryRequested);
        let s = settle(
            vec![5],
            Some(vec![1]),
            Failed::Panicked("boom".into()),
            Some(&r),
        );
        assert_eq!(s.dead, vec![5]);
        assert_eq!(s.reason, DeadLetterReason::Panicked("boom".into()));
    }

    #[test]
    fn huge_backoffs_saturate() {
        let mut r: Retries<u8> =
            Retries::new(RetryPolicy::new(3).backoff(Duration::MAX, Duration::MAX));
        for _ in 0..100 {
            let d = r.jitter(Duration::MAX);
            assert!(d <= FAR);
        }
        let now = Instant::now();
        r.delay(
            Group {
                entries: vec![1],
                attempts: vec![40],
                gen: 0,
            },
            now,
        );
        assert!(r.next_due().unwrap() > now);
    }

    #[test]
    fn groups_wait_their_turn() {
        let mut r: Retries<u8> = Retries::new(
            RetryPolicy::new(3).backoff(Duration::from_secs(1), Duration::from_secs(1)),
        );
        let now = Instant::now();
        r.delay(
            Group {
                entries: vec![1, 2, 3],
                attempts: vec![1, 1, 1],
                gen: 0,
            },
            now,
        );
        assert_eq!(r.len(), 3);
        assert!(r.pop_ready(2).is_none());
        r.wake(now + Duration::from_secs(2));
        let g = r.pop_ready(2).unwrap();
        assert_eq!((g.entries, g.attempts), (vec![1, 2], vec![1, 1]));
        assert_eq!(r.drain_all(), vec![3]);
        assert_eq!(r.len(), 0);
    }
}

//! The opt-in retry policy: per-entry attempt counts, a maximum, exponential
//! backoff with jitter, and a dead-letter handler.
//!
//! Without a policy (the default) a retry goes straight to the back of the queue,
//! for ever, as in the original. With one, the coordinator keeps the retried
//! entries out of the queue: each group waits in a timer heap until its backoff
//! has passed (no thread sleeps), then is dispatched ahead of the queue, as its own
//! batches, carrying its attempt counts. An entry whose attempts reach the maximum
//! goes to the dead-letter handler instead, with the reason.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
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
}

impl fmt::Display for DeadLetterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeadLetterReason::Panicked(msg) => write!(f, "panicked: {msg}"),
            DeadLetterReason::RetryRequested => f.write_str("retry requested"),
        }
    }
}

/// Receives entries whose attempts are spent. Called on the coordinator thread,
/// never under a lock; a panic in it is caught and logged.
pub type DeadLetterHandler<T> = Box<dyn Fn(Vec<T>, DeadLetterReason) + Send + 'static>;

/// How the coordinator tells whether a retried entry was in the failed batch.
pub(crate) type Same<T> = fn(&T, &T) -> bool;

/// Entries with their attempt counts (parallel vectors).
pub(crate) struct Group<T> {
    pub(crate) entries: Vec<T>,
    pub(crate) attempts: Vec<u32>,
}

/// The coordinator's side of the policy: waiting groups and ready groups.
pub(crate) struct Retries<T> {
    pub(crate) policy: RetryPolicy,
    pub(crate) same: Same<T>,
    waiting: BinaryHeap<Reverse<(Instant, u64)>>,
    groups: std::collections::HashMap<u64, Group<T>>,
    ready: VecDeque<Group<T>>,
    next_id: u64,
    rng: u64,
    len: usize,
}

impl<T> Retries<T> {
    pub(crate) fn new(policy: RetryPolicy, same: Same<T>) -> Self {
        let seed = Instant::now().elapsed().as_nanos() as u64 ^ 0x9E37_79B9_7F4A_7C15;
        Retries {
            policy,
            same,
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
        delay.mul_f64(fraction)
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
        self.waiting.push(Reverse((now + wait, id)));
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
            }
        };
        self.len -= batch.entries.len();
        Some(batch)
    }

    /// Puts a group back at the front of the ready list (a recalled batch).
    pub(crate) fn push_ready_front(&mut self, group: Group<T>) {
        self.len += group.entries.len();
        self.ready.push_front(group);
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

    /// Splits a failed batch's retry list into entries that were in the batch
    /// (their count goes on) and new ones (which start afresh).
    pub(crate) fn match_attempts(
        &self,
        batch: &[T],
        attempts: &[u32],
        again: Vec<T>,
    ) -> (Group<T>, Vec<T>) {
        let mut used = vec![false; batch.len()];
        let mut known = Group {
            entries: Vec::new(),
            attempts: Vec::new(),
        };
        let mut fresh = Vec::new();
        for entry in again {
            let found = (0..batch.len()).find(|&i| !used[i] && (self.same)(&batch[i], &entry));
            match found {
                Some(i) => {
                    used[i] = true;
                    known
                        .attempts
                        .push(attempts.get(i).copied().unwrap_or(0) + 1);
                    known.entries.push(entry);
                }
                None => fresh.push(entry),
            }
        }
        (known, fresh)
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
        let mut r: Retries<u8> = Retries::new(RetryPolicy::new(3), |a, b| a == b);
        for _ in 0..1000 {
            let d = r.jitter(Duration::from_millis(100));
            assert!(
                d >= Duration::from_millis(50) && d <= Duration::from_millis(100),
                "{d:?}"
            );
        }
    }

    #[test]
    fn retried_entries_keep_their_count_and_new_ones_start_afresh() {
        let r: Retries<u8> = Retries::new(RetryPolicy::new(3), |a, b| a == b);
        let (known, fresh) = r.match_attempts(&[1, 2, 2, 3], &[0, 1, 2, 0], vec![2, 9, 2, 3]);
        assert_eq!(known.entries, vec![2, 2, 3]);
        assert_eq!(known.attempts, vec![2, 3, 1]);
        assert_eq!(fresh, vec![9]);
    }

    #[test]
    fn groups_wait_their_turn() {
        let mut r: Retries<u8> = Retries::new(
            RetryPolicy::new(3).backoff(Duration::from_secs(1), Duration::from_secs(1)),
            |a, b| a == b,
        );
        let now = Instant::now();
        r.delay(
            Group {
                entries: vec![1, 2, 3],
                attempts: vec![1, 1, 1],
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

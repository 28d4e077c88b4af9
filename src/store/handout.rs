//! The worker side of the store: take a batch (accounting the last one), settle
//! a run that did not simply succeed, and give back a batch whose worker failed.
//! The protocol is described in the parent module.

use super::guard::Guard;
use super::{Phase, Run, Slot, State, Store};
use crate::overflow::{OverflowReason, Trouble};
use crate::retry::Settled;
use crate::unwind::drop_quietly;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A worker out of work looks again this many times before it sleeps: first
/// spinning `1, 2, 4, … 2^(SPIN_DOUBLINGS-1)` times, then yielding its core.
const SPIN_STEPS: u32 = 10;
const SPIN_DOUBLINGS: u32 = 6;

/// One batch for a worker.
pub(crate) struct Job<T> {
    pub(crate) entries: Vec<T>,
    /// The entries' attempt counts, for a batch of retries under a policy.
    pub(crate) attempts: Option<Vec<u32>>,
    /// When the batch's oldest chunk was queued (or its retries came due).
    pub(crate) since: Instant,
}

impl<T> State<T> {
    fn start_run(&mut self, w: usize, entries: usize, started: Instant, gen: u64) {
        self.slots[w] = Slot::Run(Run {
            started,
            entries,
            reported: false,
            gen,
        });
        self.running += 1;
    }

    /// Worker `w`'s run lost `n` entries before it began (dropped as
    /// duplicates).
    pub(super) fn run_shrank(&mut self, w: usize, n: usize) {
        if let Some(Slot::Run(run)) = self.slots.get_mut(w) {
            run.entries = run.entries.saturating_sub(n);
        }
    }

    /// Ends worker `w`'s run, if it has one, and puts its slot in `next`.
    pub(super) fn end_run(&mut self, w: usize, next: Slot) {
        if let Some(Slot::Run(_)) = self.slots.get(w) {
            self.running -= 1;
        }
        if let Some(slot) = self.slots.get_mut(w) {
            *slot = next;
        }
    }
}

/// How a worker's last batch ended.
pub(crate) enum Done<T> {
    /// There was none: the worker just started.
    Nothing,
    /// It succeeded with this many entries.
    Ok(u64),
    /// It failed; [`retry::settle`](crate::retry::settle) sorted its entries.
    Failed(Box<Settled<T>>),
}

/// What a settled failure leaves to report outside the lock.
struct Leftovers<T> {
    overflow: Vec<T>,
    reason: Option<OverflowReason>,
    dead: Vec<T>,
    dead_reason: Option<crate::retry::DeadLetterReason>,
    spent: Vec<T>,
    /// How the run failed, for its log line, with how many entries go back
    /// (the logger is user code too: never called under the lock).
    logs: Vec<(Trouble, usize)>,
    /// The line that says a stuck run returned (rare: not rate-limited).
    stuck: Option<String>,
    /// The generation of the batch they come from.
    gen: u64,
}

impl<T> Leftovers<T> {
    fn empty() -> Self {
        Leftovers {
            overflow: Vec::new(),
            reason: None,
            dead: Vec::new(),
            dead_reason: None,
            spent: Vec::new(),
            logs: Vec::new(),
            stuck: None,
            gen: 0,
        }
    }
}

impl<T: Send + 'static> Store<T> {
    /// Accounts worker `w`'s last batch and takes its next one, waiting for work
    /// if there is none. `None`: the engine has finished and the worker exits.
    ///
    /// A failed batch's entries go back to the queue sealed (a batch of their
    /// own); what is left to report (overflow, dead letters, log lines) is
    /// reported before the next batch is taken, with the worker's slot marked
    /// as in user code. `took`: how long the last run took, when adaptive
    /// concurrency needs it.
    pub(crate) fn take(&self, w: usize, done: Done<T>, took: Option<Duration>) -> Option<Job<T>> {
        let job = self.take_locked(w, done, took);
        if job.is_some() && self.config.enforced() {
            self.room.open(); // the batch left the waiting set
        }
        job
    }

    fn take_locked(&self, w: usize, done: Done<T>, took: Option<Duration>) -> Option<Job<T>> {
        let (mut st, leftovers) = self.account(w, done, took);
        self.wake_watchers(&mut st);
        if let Some(leftovers) = leftovers {
            // In user code until it is done; its entries are not gone yet.
            st.slots[w] = Slot::Reporting {
                gen: leftovers.gen,
                entries: leftovers.overflow.len() + leftovers.dead.len(),
            };
            drop(st);
            self.report_leftovers(leftovers);
            st = self.lock();
            st.slots[w] = Slot::Free;
            self.wake_watchers(&mut st); // a shutdown may wait for this slot
        }
        if let Some(job) = self.start_next(&mut st, w) {
            return Some(job);
        }
        if self.config.natural() {
            drop(st);
            return self.take_buffered(w);
        }
        self.wait_for_job(st, w)
    }

    /// Natural batching: with nothing queued, a free worker takes what is
    /// buffered (a partial batch, if that is all); with nothing buffered either,
    /// it counts itself idle *before* it lets go of the callers' lock, so the
    /// next hand-over sees it and moves its entries into the queue at once.
    /// Then, as in ticked mode, it spins a moment before it sleeps (the first
    /// time round only): under a steady load the next batch comes within
    /// microseconds, and a sleep would cost the caller a futex wake per batch.
    fn take_buffered(&self, w: usize) -> Option<Job<T>> {
        let mut spin = true;
        loop {
            let (intake, mut st) = self.lock_both();
            if !intake.is_empty() {
                let overflow = self.queue_intake(intake, &mut st);
                let job = self.start_next(&mut st, w);
                drop(st);
                self.report(overflow, crate::overflow::OverflowReason::Full);
                match job {
                    Some(job) => return Some(job),
                    None => continue,
                }
            }
            if let Some(job) = self.start_next(&mut st, w) {
                return Some(job);
            }
            if st.phase == Phase::Finished {
                return None;
            }
            self.set_idle(&mut st, 1);
            drop(intake);
            if std::mem::take(&mut spin) {
                // Counted idle: a hand-over meanwhile queues its entries and
                // moves `work_added`; whatever it did, the state lock below
                // sees it before this worker waits.
                let seen = self.work_added.load(Ordering::Acquire);
                drop(st);
                self.spin_for_work(seen);
                st = self.lock();
            }
            let job = self.start_next(&mut st, w);
            if job.is_none() && st.phase != Phase::Finished {
                self.work.wait(st.raw());
            }
            self.set_idle(&mut st, -1);
            if job.is_some() {
                return job;
            }
            if let Some(job) = self.start_next(&mut st, w) {
                return Some(job);
            }
        }
    }

    /// Counts a worker into (`+1`) or out of (`-1`) the idle ones.
    fn set_idle(&self, st: &mut State<T>, by: isize) {
        st.idle = st.idle.saturating_add_signed(by);
        self.idle_workers.store(st.idle, Ordering::SeqCst);
    }

    /// Ends worker `w`'s run and accounts how it went; returns the state lock
    /// and, for a failure, what is left to report.
    fn account(
        &self,
        w: usize,
        done: Done<T>,
        took: Option<Duration>,
    ) -> (Guard<'_, T>, Option<Leftovers<T>>) {
        // Weighed before the lock: the weigher is user code.
        let heap = match &done {
            Done::Failed(s) => self.weigh_back(s),
            _ => 0,
        };
        // New entries under an enforced bound count the buffered ones too: the
        // callers' lock first, as everywhere.
        let intake = match &done {
            Done::Failed(s) if !s.fresh.is_empty() && self.config.enforced() => {
                Some(self.intake.lock())
            }
            _ => None,
        };
        let mut st = self.lock();
        let buffered = intake.as_ref().map_or(0, |i| i.len());
        let (gen, stuck) = match st.slots.get(w) {
            Some(Slot::Run(run)) => (run.gen, run.reported.then_some(*run)),
            _ => (st.gen, None),
        };
        st.end_run(w, Slot::Free);
        let sampled = match (took, st.aimd.as_mut()) {
            (Some(took), Some(aimd)) => Some(aimd.sample(took, matches!(done, Done::Ok(_)))),
            _ => None,
        };
        if let Some(limit) = sampled {
            let grew = limit > st.limit;
            st.limit = limit;
            if grew {
                self.wake_workers(&mut st); // room for more runs
            }
        }
        let mut leftovers = match done {
            Done::Nothing => None,
            Done::Ok(n) => {
                st.counters.processed += n;
                None
            }
            Done::Failed(s) => Some(self.apply(&mut st, *s, heap, buffered, gen)),
        };
        if let Some(run) = stuck {
            let line = self.stuck_returned(run, took);
            leftovers.get_or_insert_with(Leftovers::empty).stuck = Some(line);
        }
        (st, leftovers)
    }

    /// The line that says a run the watchdog reported has returned.
    fn stuck_returned(&self, run: Run, took: Option<Duration>) -> String {
        let age = match took {
            Some(took) => took,
            None => self.clock().now().saturating_duration_since(run.started),
        };
        format!(
            "{}: a stuck run of {} entries returned after {age:?}",
            self.config.name, run.entries
        )
    }

    /// Nothing to take now: looks again for a moment without the lock (more
    /// work usually follows at once under load, and a sleep and a wake-up cost
    /// two system calls), then sleeps until woken.
    fn wait_for_job(&self, st: Guard<'_, T>, w: usize) -> Option<Job<T>> {
        let seen = self.work_added.load(Ordering::Acquire);
        drop(st);
        self.spin_for_work(seen);
        let mut st = self.lock();
        loop {
            if let Some(job) = self.start_next(&mut st, w) {
                return Some(job);
            }
            if st.phase == Phase::Finished {
                return None;
            }
            self.set_idle(&mut st, 1);
            self.work.wait(st.raw());
            self.set_idle(&mut st, -1);
        }
    }

    /// Spins, then yields, a few microseconds at most, until work is added.
    fn spin_for_work(&self, seen: u64) {
        for step in 0..SPIN_STEPS {
            if self.work_added.load(Ordering::Acquire) != seen {
                return;
            }
            if step < SPIN_DOUBLINGS {
                for _ in 0..1u32 << step {
                    std::hint::spin_loop();
                }
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Takes a batch for worker `w` if one may start now.
    fn start_next(&self, st: &mut State<T>, w: usize) -> Option<Job<T>> {
        if st.phase >= Phase::Halted || st.running >= st.limit {
            return None;
        }
        let (job, gen) = self.next_batch(st)?;
        let started = match self.config.run_deadline {
            Some(_) => self.clock().now(),
            None => self.born,
        };
        st.start_run(w, job.entries.len(), started, gen);
        st.idle_since = None; // work runs: the idle poll counts afresh later
        Some(job)
    }

    /// Retries that are due first, then the head of the queue; with the
    /// batch's generation.
    fn next_batch(&self, st: &mut State<T>) -> Option<(Job<T>, u64)> {
        let batch = self.config.max_batch_size;
        if let Some(retries) = &mut st.retries {
            if retries.len() > 0 {
                let now = self.clock().now();
                retries.wake(now);
                if let Some(group) = retries.pop_ready(batch) {
                    let job = Job {
                        entries: group.entries,
                        attempts: Some(group.attempts),
                        since: now,
                    };
                    return Some((job, group.gen));
                }
            }
        }
        let taken = st.queue.take_batch(batch)?;
        let job = Job {
            entries: taken.entries,
            attempts: None,
            since: taken.since,
        };
        Some((job, taken.gen))
    }

    /// Heap bytes of the entries a failed run sends back in.
    fn weigh_back(&self, s: &Settled<T>) -> i64 {
        self.weigh(&s.requeue) + self.weigh(&s.later.entries) + self.weigh(&s.fresh)
    }

    /// Applies what [`retry::settle`](crate::retry::settle) decided for a failed
    /// run (whose entries weigh `heap`); returns what to report.
    fn apply(
        &self,
        st: &mut State<T>,
        mut s: Settled<T>,
        heap: i64,
        buffered: usize,
        gen: u64,
    ) -> Leftovers<T> {
        let logs = self.failure_logs(&s);
        let unsettled = s.unsettled;
        self.add_heap(heap);
        let c = &mut st.counters;
        c.processed += s.processed;
        c.retried += s.retried() as u64;
        c.panicked += u64::from(s.panic.is_some());
        c.dead_lettered += s.dead.len() as u64;
        c.accepted += s.fresh.len() as u64;
        let (overflow, reason) = if st.phase == Phase::Finished {
            (
                late(st, s.requeue, s.later.entries, s.fresh),
                OverflowReason::Shutdown,
            )
        } else {
            let now = self.clock().now();
            // A batch's own entries, whatever the bound, as a batch of their own
            // (of their batch's generation).
            st.queue.push_back_sealed(s.requeue, now, gen);
            s.later.gen = gen;
            if let Some(retries) = &mut st.retries {
                if !s.later.entries.is_empty() {
                    retries.delay(s.later, now);
                    self.nudge(); // a new timer
                }
            }
            (
                self.admit_fresh(st, s.fresh, now, buffered),
                OverflowReason::Full,
            )
        };
        self.release_unsettled(unsettled); // refused ones are counted as overflow now
        self.wake_workers(st);
        Leftovers {
            overflow,
            reason: Some(reason),
            dead: s.dead,
            dead_reason: Some(s.reason),
            spent: s.spent,
            logs,
            stuck: None,
            gen,
        }
    }

    /// What a failed run is logged with (later, outside the lock).
    fn failure_logs(&self, s: &Settled<T>) -> Vec<(Trouble, usize)> {
        let mut logs = Vec::new();
        let failed = s.retried() + s.dead.len();
        if let Some(msg) = &s.panic {
            logs.push((Trouble::Panicked(msg.clone()), failed));
        }
        if let Some(error) = &s.error {
            logs.push((Trouble::Failed(error.clone()), failed));
        }
        logs
    }

    /// Reports a failed run's overflow and dead letters, and drops its batch,
    /// outside the lock.
    fn report_leftovers(&self, l: Leftovers<T>) {
        if let Some(line) = &l.stuck {
            log::warn!("{line}");
        }
        for (trouble, n) in &l.logs {
            self.reporter.run_trouble(trouble, *n);
        }
        if let Some(reason) = l.reason {
            self.report_unheld(l.overflow, reason);
        }
        if let (false, Some(reason)) = (l.dead.is_empty(), l.dead_reason) {
            self.unweigh(&l.dead);
            self.reporter.dead_letter(l.dead, reason);
        }
        drop_quietly("a batch", l.spent);
    }

    /// New entries a run returned: as many as there is room for; the rest
    /// overflow (counted). A worker neither waits nor has a caller to hand back to.
    fn admit_fresh(
        &self,
        st: &mut State<T>,
        mut fresh: Vec<T>,
        now: Instant,
        buffered: usize,
    ) -> Vec<T> {
        let overflow = if self.config.enforced() {
            let bound = st.queue.max_len().unwrap_or(usize::MAX);
            let room = bound.saturating_sub(buffered + st.held());
            let over = if fresh.len() > room {
                fresh.split_off(room)
            } else {
                Vec::new()
            };
            st.queue.push_back_unbounded(fresh, now);
            over
        } else {
            st.queue.push_back(fresh, now)
        };
        st.count_overflow(overflow.len(), OverflowReason::Full);
        overflow
    }

    /// A worker is unwinding from a panic outside `run` with a batch in hand:
    /// the batch goes back to the front of the queue (or, once the engine has
    /// finished, to the overflow handler). Taking it had unweighed it and
    /// unmarked its keys: it is waiting again, so both are put back first
    /// (a front admission, which drops nothing), outside the lock.
    pub(crate) fn orphan(&self, w: usize, entries: Vec<T>) {
        self.add_heap(self.weigh(&entries));
        if let Some(table) = &self.dedup {
            table.admit(&entries, true, 0);
        }
        let mut st = self.lock();
        st.end_run(w, Slot::Free);
        let late = if st.phase == Phase::Finished {
            st.count_overflow(entries.len(), OverflowReason::Shutdown);
            entries
        } else {
            let now = self.clock().now();
            st.queue.push_front_unbounded(entries, now);
            Vec::new()
        };
        self.wake_watchers(&mut st);
        drop(st);
        self.report_unheld(late, OverflowReason::Shutdown);
    }
}

/// What a run hands back after the engine has finished: nowhere to go but the
/// overflow handler (counted as `Shutdown`).
fn late<T>(st: &mut State<T>, mut a: Vec<T>, b: Vec<T>, c: Vec<T>) -> Vec<T> {
    a.extend(b);
    a.extend(c);
    st.count_overflow(a.len(), OverflowReason::Shutdown);
    a
}

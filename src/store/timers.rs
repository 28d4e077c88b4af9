//! The coordinator's side of the store: the flush tick, due retries, the run
//! watchdog, and when `init` runs.

use super::{Phase, Slot, Store};
use crate::clock::sooner;
use crate::overflow::OverflowReason;
use std::time::{Duration, Instant};

/// What the coordinator should do about `init`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InitDecision {
    /// Start it now (it is marked running).
    Start,
    /// The engine is idle and the last `init` found nothing: run it again once
    /// the idle poll delay has passed since this instant (when it went idle).
    Arm(Instant),
    /// Not idle (or stopping): no poll is due.
    Disarm,
}

impl<T: Send + 'static> Store<T> {
    /// The flush tick: the buffers join the queue.
    pub(crate) fn tick(&self) {
        let (intake, mut st) = self.lock_both();
        if st.phase == Phase::Finished {
            return;
        }
        let overflow = self.queue_intake(intake, &mut st);
        if overflow.is_empty() {
            return;
        }
        st.coordinator_busy = true; // the handler is user code
        drop(st);
        self.report(overflow, OverflowReason::Full);
        let mut st = self.lock();
        st.coordinator_busy = false;
        self.wake_watchers(&mut st); // a shutdown may wait for it
    }

    /// Moves retries whose backoff has passed to the ready list and wakes
    /// workers for them; returns when the next is due.
    pub(crate) fn wake_retries(&self, now: Instant) -> Option<Instant> {
        let mut st = self.lock();
        let retries = st.retries.as_mut()?;
        retries.wake(now);
        let due = retries.next_due();
        if retries.ready_groups() > 0 {
            self.wake_workers(&mut st);
        }
        due
    }

    /// Marks runs older than `deadline` as stuck (once each) and returns them
    /// (entries, age), with the time the next run may pass the deadline.
    pub(crate) fn watch(
        &self,
        now: Instant,
        deadline: Duration,
    ) -> (Vec<(usize, Duration)>, Option<Instant>) {
        let mut st = self.lock();
        let mut stuck = Vec::new();
        let mut soonest = None;
        for slot in st.slots.iter_mut() {
            let Slot::Run(run) = slot else { continue };
            if run.reported {
                continue;
            }
            let due = crate::clock::after(run.started, deadline);
            if due <= now {
                run.reported = true;
                stuck.push((run.entries, now.saturating_duration_since(run.started)));
            } else {
                soonest = sooner(soonest, Some(due));
            }
        }
        st.counters.stuck += stuck.len() as u64;
        (stuck, soonest)
    }

    /// Decides about `init`: start it if someone asked, or if the engine is idle
    /// with polling on and there is reason to look (the last run found entries,
    /// a shrink shed some, or the idle poll delay has passed: `poll_due`).
    pub(crate) fn init_decision(&self, poll_due: bool) -> InitDecision {
        let mut st = self.lock();
        if st.phase != Phase::Open {
            return InitDecision::Disarm;
        }
        if st.init.running {
            if std::mem::take(&mut st.init.requested) {
                st.init.again = true; // it may have looked before the new work
            }
            return InitDecision::Disarm;
        }
        let idle = self.config.poll && st.is_idle();
        let reason = st.init.last_produced > 0 || st.init.shed || poll_due;
        if st.init.requested || (idle && reason) {
            st.init.running = true;
            st.init.requested = false;
            st.init.shed = false;
            st.idle_since = None;
            return InitDecision::Start;
        }
        match (idle, st.idle_since) {
            (true, Some(since)) => InitDecision::Arm(since),
            _ => InitDecision::Disarm,
        }
    }

    /// The first `init` run, at start: marked running before any shutdown can
    /// begin, so a shutdown waits for it (and a drain runs what it streams).
    /// `requests` reaches the init thread; `finish` drops it, which ends that
    /// thread whoever else is stuck.
    pub(crate) fn first_init(&self, requests: crossbeam_channel::Sender<()>) {
        let mut st = self.lock();
        st.init.running = true;
        st.idle_since = None;
        drop(st);
        if requests.send(()).is_err() {
            log::error!("{}: the init thread is gone", self.config.name);
        }
        *self.init_requests.lock() = Some(requests);
    }

    /// Asks the init thread for a run (marked running by `init_decision`).
    pub(crate) fn request_init(&self) {
        let sent = match &*self.init_requests.lock() {
            Some(requests) => requests.send(()).is_ok(),
            None => false,
        };
        if !sent {
            // Finished (or the thread is gone): the run will not happen.
            let mut st = self.lock();
            st.init.running = false;
            self.wake_watchers(&mut st);
        }
    }

    /// The coordinator finished a round at clock time `now`.
    pub(crate) fn round_done(&self, now: Instant) {
        let mut st = self.lock();
        st.seen = Some(now);
        self.rounds.notify_all();
    }

    /// Gives the queue's spare memory back when the engine is idle.
    pub(crate) fn release_if_idle(&self) {
        let mut st = self.lock();
        if st.is_idle() {
            st.queue.release_memory();
        }
    }

    /// The init thread's run returned (or panicked) after `produced` entries.
    pub(crate) fn init_done(&self, produced: u64) {
        let mut st = self.lock();
        st.init.running = false;
        st.init.runs += 1;
        st.init.last_produced = produced;
        if std::mem::take(&mut st.init.again) {
            st.init.requested = true;
        }
        self.wake_watchers(&mut st);
        drop(st);
        self.nudge();
    }
}

//! The store's side of stopping: close, wait to settle, finish (take every
//! entry out), and fail (an engine thread panicked outside user code).

use super::{Overflow, Phase, Slot, State, Store};
use crate::error::{ControlError, IdleError};
use crate::overflow::OverflowReason;
use crate::threads::{self, Role};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

impl<T> State<T> {
    /// Entries of generation `gen` or earlier still in the engine: queued,
    /// retrying, running, or on their way to a handler (see `handing`).
    fn left_upto(&self, gen: u64) -> usize {
        let running: usize = self
            .slots
            .iter()
            .map(|slot| match slot {
                Slot::Run(run) if run.gen <= gen => run.entries,
                Slot::Reporting { gen: g, entries } if *g <= gen => *entries,
                _ => 0,
            })
            .sum();
        let retrying = self.retries.as_ref().map_or(0, |r| r.count_upto(gen));
        self.queue.count_upto(gen) + retrying + running + self.handing_upto(gen)
    }
}

/// How a shutdown treats work that has not started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// Run everything left.
    Drain,
    /// Start nothing more; wait for what runs.
    Return,
}

/// What `finish` took out.
pub(crate) struct Finish<T> {
    /// Entries not processed, in queue order: front buffer, queue, retries, back
    /// buffer.
    pub(crate) unprocessed: Vec<T>,
    /// Entries in runs still going.
    pub(crate) running: usize,
    /// Threads inside user code at that moment.
    busy: Vec<Role>,
}

impl<T> Finish<T> {
    /// Whether thread `role` was inside user code when the engine finished.
    pub(crate) fn busy(&self, role: Role) -> bool {
        self.busy.contains(&role)
    }
}

impl<T: Send + 'static> Store<T> {
    /// Begins a shutdown: hand-overs fail from now on, `init` is told to stop;
    /// to drain, the buffers join the queue (what a bounded queue cannot take
    /// comes back, counted, for the caller to report once the shutdown is
    /// done); to hand back, they stay where they are for `finish`. Fails if a
    /// shutdown already began.
    pub(crate) fn close(&self, how: Close) -> Result<Overflow<T>, ControlError> {
        let (mut intake, mut st) = self.lock_both();
        if st.shut || st.phase == Phase::Finished {
            return Err(ControlError::Stopped);
        }
        st.shut = true;
        if st.phase == Phase::Open {
            st.phase = match how {
                Close::Drain => Phase::Draining,
                Close::Return => Phase::Halted,
            };
        }
        intake.closed = true;
        self.stopping.store(true, Ordering::Release);
        let overflow = match how {
            Close::Drain => self.queue_intake(intake, &mut st),
            Close::Return => Overflow::none(),
        };
        drop(st);
        self.room.bump(); // waiting hand-overs fail now
        self.nudge();
        Ok(overflow)
    }

    /// Reports what a drain's `close` could not queue.
    pub(crate) fn report_closed(&self, overflow: Overflow<T>) {
        self.report(overflow, OverflowReason::Full);
    }

    /// Waits until nothing runs (and, to drain, nothing waits), or until
    /// `deadline`, when it halts the engine. Returns whether the deadline passed
    /// first. A failed engine does not drain: it only waits for what runs.
    pub(crate) fn wait_settled(&self, how: Close, deadline: Option<Instant>) -> bool {
        let mut st = self.lock();
        st.watchers += 1;
        let passed = loop {
            // Nothing runs, and no thread of the engine is in a handler.
            let quiet = st.running == 0
                && !st.init.running
                && !st.coordinator_busy
                && !st.slots.iter().any(|s| matches!(s, Slot::Reporting { .. }));
            // (The buffers were emptied by `close` and take nothing more.)
            let empty = st.held() == 0;
            let done = match how {
                Close::Drain => quiet && (empty || st.failed.is_some()),
                Close::Return => quiet,
            };
            if done {
                break false;
            }
            if self.clock().wait(&self.settled, st.raw(), deadline) {
                st.phase = st.phase.max(Phase::Halted);
                break true;
            }
        };
        st.watchers -= 1;
        passed
    }

    /// Waits until every entry handed over before the call has left the engine
    /// (processed, dead-lettered, overflowed or handed back), or until
    /// `timeout` passes. The buffers join the queue first; entries handed over
    /// afterwards belong to a later generation and are not waited for.
    pub(crate) fn wait_idle(&self, timeout: Duration) -> Result<(), IdleError> {
        if threads::role_in(self.id).is_some() || threads::in_handler_of(self.id) {
            return Err(IdleError::WouldDeadlock);
        }
        let deadline = self.clock().deadline(timeout);
        let (intake, mut st) = self.lock_both();
        let overflow = self.queue_intake(intake, &mut st);
        let gen = st.gen;
        st.gen += 1;
        let next = st.gen;
        st.queue.set_gen(next);
        drop(st);
        self.report(overflow, OverflowReason::Full);
        let mut st = self.lock();
        st.watchers += 1;
        let result = loop {
            let left = st.left_upto(gen);
            if left == 0 || st.phase == Phase::Finished {
                break Ok(());
            }
            if self.clock().wait(&self.settled, st.raw(), Some(deadline)) {
                let left = st.left_upto(gen);
                break if left == 0 {
                    Ok(())
                } else {
                    Err(IdleError::Timeout { left })
                };
            }
        };
        st.watchers -= 1;
        result
    }

    /// Ends the engine's life: takes every waiting entry out, tells every thread
    /// to exit, and says who is still inside user code.
    pub(crate) fn finish(&self) -> Finish<T> {
        let (mut intake, mut st) = self.lock_both();
        st.phase = Phase::Finished;
        intake.closed = true;
        self.stopping.store(true, Ordering::Release);
        let (front, back) = intake.take();
        drop(intake);
        let mut unprocessed: Vec<T> = front.into_iter().flatten().collect();
        unprocessed.extend(st.queue.drain_all());
        if let Some(retries) = &mut st.retries {
            unprocessed.extend(retries.drain_all());
        }
        unprocessed.extend(back.into_iter().flatten());
        st.queue.release_memory();
        // The init thread ends once its run (if any) returns.
        drop(self.init_requests.lock().take());
        let mut running = 0;
        let mut busy = Vec::new();
        for (w, slot) in st.slots.iter().enumerate() {
            match slot {
                Slot::Free => {}
                Slot::Run(run) => {
                    running += run.entries;
                    busy.push(Role::Worker(w));
                }
                Slot::Reporting { .. } => busy.push(Role::Worker(w)),
            }
        }
        if st.init.running {
            busy.push(Role::Init);
        }
        if st.coordinator_busy {
            busy.push(Role::Coordinator);
        }
        self.heap.store(0, Ordering::Relaxed);
        self.work.notify_all();
        self.settled.notify_all();
        self.rounds.notify_all();
        drop(st);
        if let Some(table) = &self.dedup {
            table.clear(); // keys are user values: dropped outside the lock
        }
        self.room.bump();
        self.nudge();
        Finish {
            unprocessed,
            running,
            busy,
        }
    }

    /// Entries the engine stops without (the last handle dropped): counted and
    /// handed to the overflow handler as `Shutdown`.
    pub(crate) fn abandon(&self, entries: Vec<T>) {
        self.lock().counters.overflow_shutdown += entries.len() as u64;
        self.reporter.overflow(entries, OverflowReason::Shutdown);
    }

    /// An engine thread panicked outside user code: the engine stops taking
    /// work. Its entries stay in the store for the shutdown (or the last drop)
    /// to hand back; calls that hand entries over fail from now on.
    pub(crate) fn fail(&self, role: Role, msg: &str) {
        log::error!(
            "{}: internal failure on the {role:?} thread, the engine stops: {msg}",
            self.config.name
        );
        let (mut intake, mut st) = self.lock_both();
        intake.closed = true;
        drop(intake);
        match role {
            Role::Worker(w) => st.end_run(w, Slot::Free),
            Role::Init => st.init.running = false,
            Role::Coordinator => st.coordinator_busy = false,
            Role::Monitor => {}
        }
        st.failed.get_or_insert_with(|| msg.to_string());
        st.phase = st.phase.max(Phase::Halted);
        self.stopping.store(true, Ordering::Release);
        self.work.notify_all();
        self.settled.notify_all();
        self.rounds.notify_all();
        drop(st);
        self.room.bump();
        self.nudge();
    }

    /// Whether the engine has finished (every thread should exit).
    pub(crate) fn is_finished(&self) -> bool {
        self.lock().phase == Phase::Finished
    }
}

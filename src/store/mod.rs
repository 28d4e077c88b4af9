//! The store: every entry the engine holds while it waits, every counter, and
//! the engine's phase, under one lock. It is the one owner of that state; every
//! thread talks to it through the methods here, each a short critical section
//! that never calls user code (the one exception: a dedup key's `Eq`, see
//! `dedup`).
//!
//! # The hand-out protocol
//!
//! ```text
//!  callers ──buffer──▶ intake (back, front) ──flush──▶ queue ◀──push── callers, init
//!          (the callers' lock)│ full batch (ticker on):  │ (the state lock)
//!                         └── flushed by the caller ─────┤
//!  coordinator ──tick──▶ flush                           │ take (one lock per batch)
//!             ──timers─▶ retries due, watchdog, poll     ▼
//!                                               workers (max_concurrency)
//!  workers ──settle──▶ queue / retries / overflow / dead letters
//! ```
//!
//! - **Batches are pulled, not pushed.** A worker takes its next batch from the
//!   store under the lock (retries that are due first, then the queue), in the
//!   same critical section that accounts the batch it finished (a failed batch's
//!   leftovers are reported between the two, with its slot `Reporting`). There
//!   is no job channel: nothing is ever handed out ahead, so nothing needs
//!   recalling, and front entries, shrinks and shutdowns act on everything that
//!   has not started. Under natural batching, a worker with nothing queued takes
//!   the buffers too.
//! - **Wake-ups.** A worker with nothing to take spins a moment on `work_added`,
//!   then counts itself `idle` and waits on `work`. Whoever adds entries wakes
//!   `min(idle, batches now available)` workers; a woken worker that finds
//!   nothing waits again. No batch can be missed: a worker looks at the store
//!   before it waits, under the lock.
//! - **Two locks.** The buffers have their own lock, the callers' lock: a
//!   hand-over takes it (and the state lock too when it moves the buffers into
//!   the queue, pushes straight into it, or checks a bound). Everything else is
//!   under the state lock. When both are needed (a flush, a count, a stop, a
//!   natural-batching worker taking the buffers, a failed run's new entries
//!   under a bound) the callers' lock is taken first.
//! - **Flushes.** `flush()`, the coordinator's tick and (with a ticker) a
//!   hand-over that fills a batch move the buffers into the queue, on the calling
//!   thread, holding both locks. What a bounded queue cannot take is counted
//!   under the lock and reported after it. Workers owed a wake-up are woken
//!   after the locks are released (see `guard`).
//! - **Room.** Under `Reject`/`Block`, a hand-over is admitted when buffered +
//!   queued + retrying entries leave room under the bound; `Block` waits at the
//!   room gate (see `room`), opened when a worker takes a batch, on `expand` and
//!   on stop.
//! - **Settling.** A failed run's entries are sorted by [`retry::settle`] outside
//!   the lock; the store then requeues the batch's own (bound or not), admits new
//!   ones under the bound, and counts; the worker reports overflow and dead
//!   letters after the lock is released, then takes its next batch.
//! - **The coordinator** owns no entries: it flushes on ticks, wakes due retries,
//!   watches run deadlines and decides when `init` runs, all through this store.
//!   Anyone who changes what it must look at nudges it (a `bounded(1)` channel:
//!   a nudge already pending is enough).
//!
//! # Phases
//!
//! `Open` → (`shutdown_drain`) `Draining` → `Finished`, or `Open` → (a shutdown
//! that hands back, a deadline, an internal failure) `Halted` → `Finished`. Once
//! not `Open`, hand-overs fail and hand their entries back. `Halted`: no batch
//! starts. `Finished`: the shutdown took every entry out; threads exit; entries
//! that arrive later (a run that outlived a shutdown deadline, a late `init`)
//! go to the overflow handler as `Shutdown`.
//!
//! # Invariants (under the lock, after every method)
//!
//! - Every entry the engine holds is in exactly one place: the intake, the
//!   queue, the retries, a worker's batch (its slot is `Run`), or on its way to
//!   a handler (counted already). The counters move in the same step. An entry
//!   moves from the intake to the queue with both locks held, so a count that
//!   holds both sees it once.
//! - `running` equals the number of `Run` slots, and never exceeds
//!   `max_concurrency` (one slot per worker thread).
//!
//! Some values are also readable without the lock: `stopping` (set with
//! `closed`, read by `Sink::is_stopping` on every push and by `is_stopped`),
//! `heap` (heap bytes the weigher reports for waiting entries, added by the
//! thread that hands entries in and subtracted by the one that takes them
//! out; approximate while entries move, clamped at zero), and two hints that
//! are always checked again under the lock: `idle_workers` and `work_added`.

mod guard;
mod handout;
mod keys;
mod life;
mod room;
mod timers;

pub(crate) use handout::{Done, Job};
pub(crate) use life::Close;
pub(crate) use timers::InitDecision;

use crate::adaptive::Aimd;
use crate::clock::{Clock, Listener};
use crate::dedup::{Table, Unsettled};
use crate::error::{ControlError, ShrinkError};
use crate::intake::{admit, Admit, Entries, Intake};
use crate::observe::{BatchObserver, BatchRecord};
use crate::overflow::{OverflowReason, Reporter, Weigher};
use crate::queue::Queue;
use crate::retry::{Retries, Rules};
use crate::settings::Config;
use crate::stats::{Counters, DebugCount, Stats};
use crate::task::{Feed, Priority};
use crate::threads::{self, Role, WorkerHooks};
use crate::unwind::{catch, drop_quietly};
use crossbeam_channel::Sender;
use guard::Guard;
use parking_lot::{Condvar, Mutex, MutexGuard};
use room::Room;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a hand-over may wait for room under `Block`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wait {
    /// As long as it takes.
    Forever,
    /// Until this clock time (then `Timeout`).
    Until(Instant),
    /// Not at all (`Full` at once).
    Never,
}

/// Why a hand-over was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Stopped,
    Full,
    Timeout,
}

/// Overflow taken out under the state lock, on its way to the handler, with
/// the generation it holds back (see `State::handing`).
pub(crate) struct Overflow<T> {
    entries: Vec<T>,
    gen: u64,
}

impl<T> Overflow<T> {
    fn none() -> Self {
        Overflow {
            entries: Vec::new(),
            gen: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Where the engine is in its life (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Open,
    Draining,
    Halted,
    Finished,
}

/// What a worker's slot is doing.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Waiting for, or taking, a batch.
    Free,
    /// Running a batch.
    Run(Run),
    /// Reporting a settled batch's leftovers to the handlers (user code):
    /// `entries` of them, from a batch of generation `gen`, have not yet
    /// reached their handler (`wait_idle` counts them).
    Reporting { gen: u64, entries: usize },
}

/// A run in progress.
#[derive(Debug, Clone, Copy)]
struct Run {
    started: Instant,
    entries: usize,
    /// The watchdog has reported it.
    reported: bool,
    /// The batch's generation (see `queue`).
    gen: u64,
}

/// When `init` runs.
#[derive(Debug, Default)]
struct InitState {
    running: bool,
    /// Someone asked for a run (`poll_now`).
    requested: bool,
    /// `poll_now` came while it ran: run again when it returns.
    again: bool,
    last_produced: u64,
    /// A shrink shed work since it last started.
    shed: bool,
    /// Runs that have returned.
    runs: u64,
}

/// Everything under the state lock.
struct State<T> {
    queue: Queue<T>,
    retries: Option<Retries<T>>,
    slots: Vec<Slot>,
    running: usize,
    counters: Counters,
    /// Entries taken out as overflow and not yet through `Store::report`
    /// (their handler may be running), by the generation they hold back:
    /// `wait_idle` waits for those of its generation or earlier.
    handing: BTreeMap<u64, usize>,
    phase: Phase,
    /// A shutdown call (or the last handle's drop) owns the stop.
    shut: bool,
    failed: Option<String>,
    init: InitState,
    /// The coordinator is inside a handler.
    coordinator_busy: bool,
    /// Workers waiting on `work`.
    idle: usize,
    /// Threads waiting on `settled`.
    watchers: usize,
    /// Workers to wake once the lock is released (see `guard`).
    to_wake: usize,
    /// The clock time of the coordinator's last finished round.
    seen: Option<Instant>,
    /// Since when the engine has been idle (the idle poll counts from here).
    idle_since: Option<Instant>,
    /// The generation new entries join (`wait_idle` moves it on).
    gen: u64,
    /// How many batches may run at once now (`max_concurrency`, or what
    /// adaptive concurrency says).
    limit: usize,
    aimd: Option<Aimd>,
    /// Where entries leaving the waiting set are told to the key table, if
    /// there is one (see `dedup::Unsettled`).
    unsettled: Option<Arc<Unsettled>>,
}

impl<T> State<T> {
    /// Queued and retrying entries (the buffered ones are counted apart).
    fn held(&self) -> usize {
        self.queue.len() + self.retrying()
    }

    fn retrying(&self) -> usize {
        self.retries.as_ref().map_or(0, Retries::len)
    }

    /// Entries taken out as overflow for `reason`, from the current
    /// generation: see [`State::overflowed_from`].
    fn overflowed(&mut self, entries: Vec<T>, reason: OverflowReason) -> Overflow<T> {
        let gen = self.gen;
        self.overflowed_from(entries, reason, gen)
    }

    /// Entries taken out as overflow for `reason`, the oldest of generation
    /// `gen`: counted now, and holding back `wait_idle` calls of that
    /// generation or later until [`Store::report`] has handed them over.
    fn overflowed_from(
        &mut self,
        entries: Vec<T>,
        reason: OverflowReason,
        gen: u64,
    ) -> Overflow<T> {
        self.count_overflow(entries.len(), reason);
        if !entries.is_empty() {
            *self.handing.entry(gen).or_insert(0) += entries.len();
        }
        Overflow { entries, gen }
    }

    /// Counts overflow. Every overflow passes here, under the state lock (but
    /// what `abandon` counts once the engine has finished); a failed run's
    /// leftovers only here, as their worker's reporting slot holds
    /// `wait_idle` back meanwhile. The entries leave the waiting set now:
    /// the key table is told when they are reported
    /// (`Store::report_unheld`), and they count as unsettled until then.
    fn count_overflow(&mut self, n: usize, reason: OverflowReason) {
        if let (Some(d), false) = (&self.unsettled, n == 0) {
            d.hold(n);
        }
        let c = &mut self.counters;
        let counter = match reason {
            OverflowReason::Full => &mut c.overflow_full,
            OverflowReason::Shrink => &mut c.overflow_shrink,
            OverflowReason::Shutdown => &mut c.overflow_shutdown,
            OverflowReason::Duplicate => return, // counted by the key table
        };
        *counter += n as u64;
    }

    /// Overflow of generation `gen` or earlier on its way to the handler.
    fn handing_upto(&self, gen: u64) -> usize {
        self.handing.range(..=gen).map(|(_, n)| n).sum()
    }

    /// Nothing queued or retrying, nothing running, `init` not running.
    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.retrying() == 0 && self.running == 0 && !self.init.running
    }
}

/// The store; see the module doc.
pub(crate) struct Store<T> {
    /// The callers' lock: taken before `state` when both are needed.
    intake: Padded<Mutex<Intake<T>>>,
    state: Padded<Mutex<State<T>>>,
    // What other threads write (condition variables, counters) sits on cache
    // lines of its own, away from the settings every hand-over reads: sharing a
    // line with them made each `buffer_one` wait for another core's write.
    /// Workers wait here for batches.
    work: Padded<Condvar>,
    /// Shutdowns wait here for the engine to settle.
    settled: Padded<Condvar>,
    /// A manual clock's `advance` waits here for the coordinator's round.
    rounds: Padded<Condvar>,
    /// `Block` hand-overs and `init` chunks wait here for room.
    room: Padded<Room>,
    stopping: Arc<AtomicBool>,
    heap: Padded<AtomicI64>,
    /// The number of idle workers (`State::idle`), written under the state lock,
    /// read under the callers' lock by natural batching: a hand-over that sees
    /// an idle worker moves the buffers into the queue at once. A worker counts
    /// itself idle while it still holds the callers' lock (see `handout`), so a
    /// hand-over either sees it idle or comes after it looked at the buffers.
    idle_workers: Padded<AtomicUsize>,
    /// Moves on whenever work is added (under the state lock); an idle worker
    /// spins on it a moment before it sleeps (see `handout`). Only a hint: the
    /// worker then looks under the lock.
    work_added: Padded<AtomicU64>,
    nudge: Sender<()>,
    pub(crate) config: Config,
    pub(crate) id: u64,
    /// When the store was made: the start recorded for runs when no watchdog
    /// needs the real one.
    born: Instant,
    pub(crate) reporter: Reporter<T>,
    rules: Option<Rules<T>>,
    weigher: Option<Weigher<T>>,
    observer: Option<BatchObserver>,
    pub(crate) workers: WorkerHooks,
    /// Key de-duplication, if asked for (see `dedup`).
    dedup: Option<Box<dyn Table<T>>>,
    /// Its count of entries not settled yet (see `dedup::Unsettled`; the
    /// state has it too, for overflow).
    unsettled: Option<Arc<Unsettled>>,
    /// Requests to the init thread; dropped by `finish`, which ends it.
    init_requests: Mutex<Option<Sender<()>>>,
}

/// A value on cache lines of its own: the callers' lock and the workers' lock
/// must not share one (each unlock would then wait for the other side's core),
/// nor what other threads write share one with what a hand-over reads.
#[repr(align(128))]
struct Padded<L>(L);

impl<L> std::ops::Deref for Padded<L> {
    type Target = L;
    fn deref(&self) -> &L {
        &self.0
    }
}

/// What the store is built from besides the settings.
pub(crate) struct Parts<T> {
    pub(crate) reporter: Reporter<T>,
    pub(crate) rules: Option<Rules<T>>,
    pub(crate) weigher: Option<Weigher<T>>,
    pub(crate) observer: Option<BatchObserver>,
    pub(crate) workers: WorkerHooks,
    pub(crate) dedup: Option<Box<dyn Table<T>>>,
}

impl<T: Send + 'static> Store<T> {
    /// A store for an engine; `nudge` wakes its coordinator.
    pub(crate) fn new(config: Config, id: u64, parts: Parts<T>, nudge: Sender<()>) -> Self {
        let state = State {
            queue: Queue::new(config.max_queue_len, config.max_batch_size),
            retries: parts.rules.as_ref().map(|r| Retries::new(r.policy)),
            slots: vec![Slot::Free; config.max_concurrency],
            running: 0,
            counters: Counters::default(),
            handing: BTreeMap::new(),
            phase: Phase::Open,
            shut: false,
            failed: None,
            init: InitState::default(),
            coordinator_busy: false,
            idle: 0,
            watchers: 0,
            to_wake: 0,
            seen: None,
            idle_since: None,
            gen: 0,
            limit: config.adaptive_min.unwrap_or(config.max_concurrency),
            aimd: config.adaptive().map(|(min, max)| Aimd::new(min, max)),
            unsettled: parts.dedup.as_ref().map(|t| t.unsettled()),
        };
        let unsettled = state.unsettled.clone();
        Store {
            born: config.clock.now(),
            intake: Padded(Mutex::new(Intake::new())),
            state: Padded(Mutex::new(state)),
            work: Padded(Condvar::new()),
            settled: Padded(Condvar::new()),
            rounds: Padded(Condvar::new()),
            room: Padded(Room::default()),
            stopping: Arc::new(AtomicBool::new(false)),
            heap: Padded(AtomicI64::new(0)),
            work_added: Padded(AtomicU64::new(0)),
            idle_workers: Padded(AtomicUsize::new(0)),
            nudge,
            config,
            id,
            reporter: parts.reporter,
            rules: parts.rules,
            weigher: parts.weigher,
            observer: parts.observer,
            workers: parts.workers,
            dedup: parts.dedup,
            unsettled,
            init_requests: Mutex::new(None),
        }
    }

    /// Whether runs are timed for adaptive concurrency.
    pub(crate) fn adaptive(&self) -> bool {
        self.config.adaptive_min.is_some()
    }

    /// Whether a batch's record is looked at (an observer, or a feature).
    pub(crate) fn watched(&self) -> bool {
        self.observer.is_some() || cfg!(feature = "metrics") || cfg!(feature = "tracing")
    }

    /// Shows a batch's record to the observers (user code: contained).
    pub(crate) fn observe(&self, record: BatchRecord) {
        #[cfg(feature = "metrics")]
        crate::observe::record_metrics(&record);
        if let Some(observer) = &self.observer {
            if let Err(msg) = catch(|| observer(&record)) {
                log::error!("{}: batch observer panicked: {msg}", self.config.name);
            }
        }
    }

    pub(crate) fn clock(&self) -> &Clock {
        &self.config.clock
    }

    /// The flag a `Sink` reads to tell `init` to stop.
    pub(crate) fn stopping_flag(&self) -> Arc<AtomicBool> {
        self.stopping.clone()
    }

    pub(crate) fn rules(&self) -> Option<&Rules<T>> {
        self.rules.as_ref()
    }

    /// The state lock.
    fn lock(&self) -> Guard<'_, T> {
        Guard::new(self, self.state.lock())
    }

    /// Both locks, in order.
    fn lock_both(&self) -> (MutexGuard<'_, Intake<T>>, Guard<'_, T>) {
        let intake = self.intake.lock();
        (intake, self.lock())
    }

    /// Wakes the coordinator (a nudge already pending is enough).
    fn nudge(&self) {
        let _ = self.nudge.try_send(());
    }

    /// Owes a wake-up to as many idle workers as there are batches to take
    /// (paid when the lock is released).
    fn wake_workers(&self, st: &mut State<T>) {
        self.work_added.fetch_add(1, Ordering::Release);
        st.idle_since = None; // work came: the idle poll counts afresh later
        if st.idle == 0 {
            return;
        }
        let ready = st.retries.as_ref().map_or(0, Retries::ready_groups);
        let batches = st
            .queue
            .len()
            .div_ceil(self.config.max_batch_size)
            .saturating_add(ready);
        st.to_wake = st.to_wake.max(batches.min(st.idle));
    }

    /// Wakes `n` idle workers (after the locks are released).
    fn notify(&self, n: usize) {
        for _ in 0..n {
            if !self.work.notify_one() {
                break;
            }
        }
    }

    /// After something a shutdown or the poll may wait for changed: wakes
    /// them, and notes when the engine went idle (the idle poll counts from
    /// then).
    fn wake_watchers(&self, st: &mut State<T>) {
        if st.watchers > 0 {
            self.settled.notify_all();
        }
        if st.is_idle() {
            if st.idle_since.is_none() {
                st.idle_since = Some(self.clock().now());
            }
            if self.config.poll {
                self.nudge();
            }
        } else {
            st.idle_since = None;
        }
    }

    // ---- heap accounting (the weigher) -------------------------------------

    fn weigh(&self, entries: &[T]) -> i64 {
        let Some(weigher) = &self.weigher else {
            return 0;
        };
        match catch(|| {
            entries
                .iter()
                .map(weigher)
                .fold(0usize, usize::saturating_add)
        }) {
            Ok(bytes) => i64::try_from(bytes).unwrap_or(i64::MAX),
            Err(msg) => {
                log::error!("{}: weigher panicked: {msg}", self.config.name);
                0
            }
        }
    }

    /// Entries came in (`+`) or went out (`-`).
    fn add_heap(&self, bytes: i64) {
        if bytes != 0 {
            self.heap.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Entries left the waiting set: their weight goes.
    pub(crate) fn unweigh(&self, entries: &[T]) {
        if self.weigher.is_some() {
            self.add_heap(-self.weigh(entries));
        }
    }

    /// Overflow taken out under the lock (`State::overflowed`), reported
    /// outside the locks; then it no longer holds `wait_idle` back.
    fn report(&self, overflow: Overflow<T>, reason: OverflowReason) {
        let Overflow { entries, gen } = overflow;
        let n = entries.len();
        if n == 0 {
            return;
        }
        self.report_unheld(entries, reason);
        self.handed(gen, n);
    }

    /// `n` entries of generation `gen` counted in `State::handing` have
    /// reached their handler: they no longer hold `wait_idle` back.
    fn handed(&self, gen: u64, n: usize) {
        let mut st = self.lock();
        if let Some(count) = st.handing.get_mut(&gen) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                st.handing.remove(&gen);
            }
        }
        self.wake_watchers(&mut st);
    }

    /// Counted overflow that holds no `wait_idle` back itself (a failed run's:
    /// see `State::count_overflow`), reported outside the locks.
    fn report_unheld(&self, entries: Vec<T>, reason: OverflowReason) {
        if entries.is_empty() {
            return;
        }
        // The weigher, the key function and the keys' drops below are user
        // code on this thread too: `wait_idle` in any of them fails.
        let _mark = threads::handling(self.id);
        self.unweigh(&entries);
        if let Some(table) = &self.dedup {
            table.left(&entries);
        }
        self.reporter.overflow(entries, reason);
    }

    // ---- hand-overs --------------------------------------------------------

    #[inline]
    /// Whether `n` more entries may be handed over now: refused once closed;
    /// under an enforced bound, fails or (`Block`) waits for room, until
    /// `deadline`. Holds the callers' lock except while it waits.
    fn admit(
        &self,
        intake: &mut MutexGuard<'_, Intake<T>>,
        n: usize,
        wait: Wait,
    ) -> Result<(), Refusal> {
        if intake.closed {
            return Err(Refusal::Stopped);
        }
        if !self.config.enforced() {
            return Ok(()); // the common case: nothing more to look at
        }
        let mut timed_out = false;
        loop {
            let ticket = self.room.ticket(); // registered before looking
            let decision = self.admission(intake, n);
            match decision {
                Admit::Now => return Ok(()),
                Admit::Full => return Err(Refusal::Full),
                Admit::Wait if timed_out => return Err(Refusal::Timeout),
                Admit::Wait => {
                    // A worker or the coordinator must not wait for the workers.
                    let engine = threads::on_monitor()
                        || matches!(
                            threads::role_in(self.id),
                            Some(Role::Worker(_) | Role::Coordinator)
                        );
                    let deadline = match wait {
                        _ if engine => return Err(Refusal::Full),
                        Wait::Never => return Err(Refusal::Full),
                        Wait::Forever => None,
                        Wait::Until(at) => Some(at),
                    };
                    let clock = self.clock();
                    timed_out = MutexGuard::unlocked(intake, || ticket.wait(clock, deadline));
                    if intake.closed {
                        return Err(Refusal::Stopped);
                    }
                }
            }
        }
    }

    /// The admission rule, for `n` entries, now.
    fn admission(&self, intake: &Intake<T>, n: usize) -> Admit {
        let st = self.state.lock();
        let c = &self.config;
        let waiting = intake.len() + st.held();
        admit(
            c.overflow_policy,
            c.max_queue_len,
            st.queue.max_len(),
            waiting,
            n,
        )
    }

    /// Moves the buffers into the queue and owes workers a wake-up; returns
    /// what a bounded queue could not take (already counted).
    ///
    /// Hand over hand: called with both locks held, it releases the callers'
    /// lock as soon as the buffers are taken, so hand-overs go on while the
    /// queue takes them. Order holds (the next flush needs the state lock this
    /// one holds), and so do counts (a count takes both locks, so it sees the
    /// entries either buffered or queued).
    fn queue_intake(
        &self,
        mut intake: MutexGuard<'_, Intake<T>>,
        st: &mut State<T>,
    ) -> Overflow<T> {
        // Once halted (`shutdown_return`, a passed deadline, a failure), the
        // buffers stay where they are, for `finish` to hand back in order.
        if intake.is_empty() || st.phase >= Phase::Halted {
            return Overflow::none();
        }
        let now = self.clock().now();
        let (front, back) = intake.take();
        let at_risk = st.queue.max_len().is_some() && !self.config.enforced();
        let held = self.hold_unsettled(at_risk, || chunks_len(&front) + chunks_len(&back));
        drop(intake);
        let mut overflow = Vec::new();
        if !at_risk {
            // Admitted at hand-over, or no bound: it all goes in.
            for chunk in front.into_iter().rev() {
                st.queue.push_front_unbounded(chunk, now);
            }
            for chunk in back {
                st.queue.push_back_unbounded(chunk, now);
            }
        } else {
            if !front.is_empty() {
                overflow = st.queue.push_front_chunks(front, now);
            }
            for chunk in back {
                overflow.extend(st.queue.push_back(chunk, now));
            }
        }
        let overflow = st.overflowed(overflow, OverflowReason::Full);
        self.release_unsettled(held);
        self.wake_workers(st);
        overflow
    }

    /// `buffer` and friends: into the back or front buffer (after the key
    /// table, if any, has dropped duplicates: see `keys`).
    #[inline]
    fn hand_over_kept(
        &self,
        entries: Entries<T>,
        priority: Priority,
        wait: Wait,
    ) -> Result<(), (Refusal, Entries<T>)> {
        let heap = match (&self.weigher, &entries) {
            (None, _) => 0,
            (Some(_), Entries::One(e)) => self.weigh(std::slice::from_ref(e)),
            (Some(_), Entries::Many(v)) => self.weigh(v),
        };
        let mut intake = self.intake.lock();
        if let Err(refusal) = self.admit(&mut intake, entries.len(), wait) {
            return Err((refusal, entries));
        }
        self.buffer_admitted(intake, entries, priority, heap);
        Ok(())
    }

    /// An admitted hand-over into the buffers (the callers' lock held), and
    /// on into the queue if a batch is full or a worker is free.
    #[inline]
    fn buffer_admitted(
        &self,
        mut intake: MutexGuard<'_, Intake<T>>,
        entries: Entries<T>,
        priority: Priority,
        heap: i64,
    ) {
        let batch = self.config.max_batch_size;
        intake.put(entries, priority, batch, || self.clock().now());
        self.add_heap(heap);
        let now = if self.config.natural() {
            // A free worker takes whatever there is, or a full batch is ready.
            intake.len() >= batch || self.idle_workers.load(Ordering::SeqCst) > 0
        } else {
            self.config.auto_flush() && intake.len() >= batch
        };
        if !now {
            return;
        }
        // Into the queue now, from this thread.
        let mut st = self.lock();
        let overflow = self.queue_intake(intake, &mut st);
        drop(st); // wakes the workers owed a wake-up (see `guard`)
        self.report(overflow, OverflowReason::Full);
    }

    /// `push_back` / `push_front`: straight into the queue (after the key
    /// table: see `keys`).
    fn push_kept(
        &self,
        entries: Vec<T>,
        priority: Priority,
        wait: Wait,
    ) -> Result<(), (Refusal, Vec<T>)> {
        let heap = self.weigh(&entries);
        let mut intake = self.intake.lock();
        if let Err(refusal) = self.admit(&mut intake, entries.len(), wait) {
            return Err((refusal, entries));
        }
        self.queue_admitted(intake, entries, priority, heap, 0);
        Ok(())
    }

    /// An admitted `push_back` / `push_front` into the queue (the callers'
    /// lock held until the state lock is taken).
    fn queue_admitted(
        &self,
        intake: MutexGuard<'_, Intake<T>>,
        entries: Vec<T>,
        priority: Priority,
        heap: i64,
        held: usize,
    ) {
        self.add_heap(heap);
        let mut st = self.lock();
        drop(intake); // admitted: the state lock is enough now
        st.counters.accepted += entries.len() as u64;
        self.enqueue(st, entries, priority, held);
    }

    /// Queues accepted entries (under an enforced bound they were admitted
    /// already: all go in; otherwise what the bound cannot take overflows),
    /// wakes workers for them, then lets go of the lock and reports the
    /// overflow.
    /// `held`: entries held unsettled for this call (see `hold_unsettled`),
    /// released once the bound has looked (what it refused is held again as
    /// overflow), before the overflow handler runs.
    fn enqueue(&self, mut st: Guard<'_, T>, entries: Vec<T>, priority: Priority, held: usize) {
        let now = self.clock().now();
        let overflow = match (self.config.enforced(), priority) {
            (true, Priority::Back) => {
                st.queue.push_back_unbounded(entries, now);
                Vec::new()
            }
            (true, Priority::Front) => {
                st.queue.push_front_unbounded(entries, now);
                Vec::new()
            }
            (false, Priority::Back) => st.queue.push_back(entries, now),
            (false, Priority::Front) => st.queue.push_front(entries, now),
        };
        let overflow = st.overflowed(overflow, OverflowReason::Full);
        self.release_unsettled(held);
        self.wake_workers(&mut st);
        drop(st);
        self.report(overflow, OverflowReason::Full);
    }

    // ---- control calls -------------------------------------------------------

    /// Moves the buffers into the queue and wakes idle workers; `wait`
    /// bounds the wait for the callers' lock.
    pub(crate) fn flush(&self, wait: Option<Duration>) -> Result<(), ControlError> {
        let intake = match wait {
            None => self.intake.lock(),
            Some(d) => self
                .intake
                .try_lock_for(d.min(crate::clock::FAR))
                .ok_or(ControlError::Timeout)?,
        };
        let mut st = self.lock();
        if st.phase == Phase::Finished {
            return Err(ControlError::Stopped);
        }
        let overflow = self.queue_intake(intake, &mut st);
        self.wake_watchers(&mut st);
        drop(st); // wakes the workers owed a wake-up (see `guard`)
        self.report(overflow, OverflowReason::Full);
        Ok(())
    }

    /// The state lock for a control call: fails once the engine has finished.
    fn control(&self) -> Result<Guard<'_, T>, ControlError> {
        let st = self.lock();
        if st.phase == Phase::Finished {
            return Err(ControlError::Stopped);
        }
        Ok(st)
    }

    pub(crate) fn debug_count(&self) -> Result<DebugCount, ControlError> {
        let intake = self.intake.lock();
        let st = self.control()?;
        Ok(DebugCount {
            waiting: intake.len() + st.held(),
            running: st.running,
        })
    }

    /// Every counter, at one instant. Works after the engine stopped too.
    pub(crate) fn stats(&self) -> Stats {
        let (intake, st) = self.lock_both();
        let now = self.clock().now();
        let oldest = [intake.since(), st.queue.head_since()]
            .into_iter()
            .flatten()
            .min()
            .map(|t| now.saturating_duration_since(t));
        let c = &st.counters;
        Stats {
            buffered: intake.len(),
            queued: st.held(),
            running: st.running,
            processed: c.processed,
            retried: c.retried,
            panicked: c.panicked,
            overflowed_full: c.overflow_full,
            overflowed_shrink: c.overflow_shrink,
            overflowed_shutdown: c.overflow_shutdown,
            dead_lettered: c.dead_lettered,
            oldest_wait: oldest,
            stuck_runs: c.stuck,
            init_runs: st.init.runs,
            concurrency_limit: st.limit,
            deduplicated: self.dedup.as_ref().map_or(0, |t| t.dropped()),
            accepted: intake.accepted + c.accepted,
            blocked_callers: self.room.waiting(),
        }
    }

    /// Sheds the back half of the queue (to the overflow handler) and bounds it.
    /// Refused once a shutdown has begun: what is left is the shutdown's.
    pub(crate) fn shrink(&self) -> Result<(), ShrinkError> {
        let mut st = self.control()?;
        if st.phase != Phase::Open {
            return Err(ShrinkError::Stopped);
        }
        // The shed entries may be of any generation still queued.
        let oldest = st.queue.oldest_gen().unwrap_or(st.gen);
        let shed = st.queue.shrink().map_err(|_| ShrinkError::MinimumSize)?;
        let shed = st.overflowed_from(shed, OverflowReason::Shrink, oldest);
        st.init.shed = true;
        self.wake_watchers(&mut st);
        drop(st);
        self.report(shed, OverflowReason::Shrink);
        Ok(())
    }

    pub(crate) fn expand(&self) -> Result<(), ControlError> {
        self.control()?.queue.expand();
        self.room.open();
        Ok(())
    }

    pub(crate) fn is_shrunk(&self) -> Result<bool, ControlError> {
        Ok(self.control()?.queue.is_shrunk())
    }

    /// Bytes the waiting entries occupy: entries × size plus the weigher's bytes.
    pub(crate) fn memory_usage(&self) -> Result<usize, ControlError> {
        let intake = self.intake.lock();
        let waiting = intake.len() + self.control()?.held();
        let heap = usize::try_from(self.heap.load(Ordering::Relaxed).max(0)).unwrap_or(usize::MAX);
        Ok(waiting
            .saturating_mul(std::mem::size_of::<T>())
            .saturating_add(heap))
    }

    /// Whether hand-overs are refused (a shutdown began, or the engine failed).
    pub(crate) fn is_stopped(&self) -> bool {
        // Set with `closed`, under the callers' lock: no need to take it.
        self.stopping.load(Ordering::Acquire)
    }

    /// Asks for an `init` run now (or once more, if one is running).
    pub(crate) fn poll_now(&self) -> Result<(), ControlError> {
        let mut st = self.lock();
        if st.phase != Phase::Open {
            return Err(ControlError::Stopped);
        }
        st.init.requested = true;
        drop(st);
        self.nudge();
        Ok(())
    }

    /// A name for log lines and the monitor.
    pub(crate) fn name(&self) -> &str {
        &self.config.name
    }
}

impl<T> Drop for Store<T> {
    /// The user's closures are user values: their drops run contained.
    fn drop(&mut self) {
        drop_quietly("the weigher", self.weigher.take());
        drop_quietly("the batch observer", self.observer.take());
        drop_quietly("the dedup key function", self.dedup.take());
        let hooks = std::mem::take(&mut self.workers);
        drop_quietly("the worker hooks", hooks);
    }
}

impl<T: Send + 'static> Feed<T> for Store<T> {
    /// An `init` chunk: into the back of the queue. Under an enforced bound
    /// (`Reject` or `Block`) it goes in as room appears, in pieces if it is
    /// larger than the room, waiting in between (unless the engine is
    /// stopping); it is never refused.
    fn feed(&self, chunk: Vec<T>) {
        // Without an enforced bound, a bounded queue may refuse the chunk:
        // held until the bound has looked at it (released by `enqueue`,
        // before any handler runs; the duplicates are reported after).
        let mut held = self.hold_unsettled(!self.config.enforced(), || chunk.len());
        let (mut chunk, dups) = self.split_duplicates(chunk, Priority::Back, held);
        // The duplicates are reported once the kept entries are queued (the
        // hold is released by then): on their way to the handler until then,
        // for `wait_idle`, counted before any of the chunk is queued, so a
        // call that waits for those waits for these too.
        let dup_gen = (!dups.is_empty()).then(|| {
            let mut st = self.lock();
            let gen = st.gen;
            *st.handing.entry(gen).or_insert(0) += dups.len();
            gen
        });
        // Weighed whole, before any lock (the weigher is user code); the heap
        // count is approximate while the pieces go in.
        self.add_heap(self.weigh(&chunk));
        while !chunk.is_empty() {
            let mut intake = self.intake.lock();
            let room = if self.config.enforced() {
                self.wait_room(&mut intake)
            } else {
                usize::MAX
            };
            let piece = if chunk.len() > room {
                let rest = chunk.split_off(room);
                std::mem::replace(&mut chunk, rest)
            } else {
                std::mem::take(&mut chunk)
            };
            let st = self.lock();
            drop(intake);
            self.queue_piece(st, piece, std::mem::take(&mut held));
        }
        self.release_unsettled(held);
        let n = dups.len();
        self.duplicates(dups);
        if let Some(gen) = dup_gen {
            self.handed(gen, n);
        }
    }
}

impl<T: Send + 'static> Store<T> {
    /// Under an enforced bound, waits until there is room for at least one
    /// entry; returns how much (all of it once the engine is stopping).
    fn wait_room(&self, intake: &mut MutexGuard<'_, Intake<T>>) -> usize {
        loop {
            let ticket = self.room.ticket(); // registered before looking
            if intake.closed {
                return usize::MAX;
            }
            let room = {
                let st = self.state.lock();
                let bound = st.queue.max_len().unwrap_or(usize::MAX);
                bound.saturating_sub(intake.len() + st.held())
            };
            if room > 0 {
                return room;
            }
            let clock = self.clock();
            MutexGuard::unlocked(intake, || ticket.wait(clock, None));
        }
    }

    /// Queues a piece of an `init` chunk (the state lock held).
    fn queue_piece(&self, mut st: Guard<'_, T>, piece: Vec<T>, held: usize) {
        st.counters.accepted += piece.len() as u64;
        if st.phase == Phase::Finished {
            let piece = st.overflowed(piece, OverflowReason::Shutdown);
            self.release_unsettled(held);
            drop(st);
            self.report(piece, OverflowReason::Shutdown);
            return;
        }
        self.enqueue(st, piece, Priority::Back, held);
    }
}

impl<T: Send + 'static> Listener for Store<T> {
    /// A manual clock moved: waiters look at the time again, and the caller
    /// waits until the coordinator has finished a round at the new time (so
    /// every timer now due has fired when `advance` returns).
    fn advanced(&self) {
        let target = self.clock().now();
        self.room.bump();
        let mut st = self.lock();
        self.settled.notify_all();
        self.nudge();
        if threads::role_in(self.id) == Some(Role::Coordinator) {
            return; // moved from a handler on the coordinator itself
        }
        let give_up = Instant::now() + ROUND_WAIT;
        while !st.seen.is_some_and(|seen| seen >= target)
            && st.phase != Phase::Finished
            && st.failed.is_none()
        {
            if self.rounds.wait_until(st.raw(), give_up).timed_out() {
                log::warn!(
                    "{}: the coordinator did not look at the new time",
                    self.config.name
                );
                break;
            }
        }
    }
}

/// Entries in a list of chunks.
fn chunks_len<T>(chunks: &[Vec<T>]) -> usize {
    chunks.iter().map(Vec::len).sum()
}

/// How long a manual clock's `advance` waits for a coordinator that may be
/// stuck in a handler (real time; a safety net, never reached in a healthy run).
const ROUND_WAIT: Duration = Duration::from_secs(10);

//! The coordinator: one thread that owns the queue and all batching state.
//!
//! ```text
//!  Handle::buffer ──lock──▶ Shared.buffers (back, front)
//!        │                        ▲  taken on every flush
//!        │ Flush (full batch)     │
//!        ▼                        │
//!  commands ─────────────▶ ┌──────────────┐ ── jobs (≤ max_concurrency) ──▶ workers
//!  (flush, push, shrink,   │ coordinator  │                                   │
//!   count, shutdown,       │ queue, state │ ◀── completions ───────────────────┘
//!   init chunks)           └──────────────┘
//!        ▲                        │ init requests
//!        └── Sink (init thread) ◀─┘
//!  ticker ──▶ flush; poll timer ──▶ init
//! ```
//!
//! The loop waits on completions first (they free capacity), then commands, then
//! the flush ticker and the poll timer. The rules it keeps true after every event:
//!
//! - at most `max_concurrency` batches run, and no slot stays free while the queue
//!   holds entries (unless a shutdown hands entries back);
//! - every entry is in exactly one place: a buffer, the queue, a running batch, an
//!   in-flight command, or handed out (processed, overflowed, or returned);
//! - user code (overflow handler, weigher) is never called under a lock.

use crate::config::{
    join_all, Config, FlushInterval, OverflowHandler, OverflowPolicy, OverflowReason, Weigher,
};
use crate::error::ShrinkError;
use crate::handle::{DebugCount, ShutdownMode, ShutdownReport};
use crate::pool::{Completion, Job, Progress};
use crate::queue::{Pile, Queue};
use crate::retry::{DeadLetterHandler, DeadLetterReason, Group, Retries};
use crate::task::{Priority, Task};
use crate::unwind::catch;
use crossbeam_channel::{at, never, select_biased, tick, Receiver, Sender};
use parking_lot::{Condvar, Mutex, MutexGuard};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A message to the coordinator.
pub(crate) enum Command<T> {
    /// Move the buffers into the queue and dispatch; answer when done (if asked).
    Flush(Option<Sender<()>>),
    /// Put entries straight into the queue and dispatch.
    Push(Vec<T>, Priority),
    /// A full (or final) chunk streamed by `init`.
    InitChunk(Vec<T>),
    /// The running `init` returned (or panicked) after producing this many entries.
    InitDone {
        produced: u64,
    },
    Count(Sender<DebugCount>),
    Shrink(Sender<Result<(), ShrinkError>>),
    Expand(Sender<()>),
    IsShrunk(Sender<bool>),
    /// Run `init` now if it is not running (new work is known to exist).
    PollNow,
    /// Bytes the queued entries occupy (entries × size + weigher).
    Memory(Sender<usize>),
    Shutdown(ShutdownMode, Sender<ShutdownReport<T>>),
}

/// What `buffer` writes into and the coordinator takes on each flush.
pub(crate) struct Buffers<T> {
    pub(crate) back: Pile<T>,
    pub(crate) front: Pile<T>,
    /// Set once by a shutdown; a hand-over that sees it gives the entries back.
    pub(crate) closed: bool,
    /// A full-batch flush has been asked for and not yet done.
    pub(crate) flush_requested: bool,
    /// The job channel, for a hand-over that finds a full batch buffered and the
    /// engine idle: it hands that batch to a worker itself, saving the wake-up of
    /// the coordinator. Taken away when the engine stops.
    pub(crate) direct: Option<Sender<Job<T>>>,
    /// When the oldest buffered entry arrived (`None`: the buffers are empty).
    pub(crate) since: Option<Instant>,
}

impl<T> Buffers<T> {
    pub(crate) fn len(&self) -> usize {
        self.back.len() + self.front.len()
    }
}

/// State shared by the handles, the coordinator and the init sink.
pub(crate) struct Shared<T> {
    pub(crate) buffers: Mutex<Buffers<T>>,
    /// Set when a shutdown begins; `init` sees it through its sink.
    pub(crate) stopping: Arc<AtomicBool>,
    /// Set by a shutdown that hands entries back: no new batch starts from then on.
    pub(crate) halt: AtomicBool,
    /// Batches handed to the workers (see [`Progress`]).
    pub(crate) progress: Mutex<Progress>,
    /// Batches done (and not retried) since the coordinator last looked.
    pub(crate) done_batches: AtomicUsize,
    /// Batches handed to workers by `buffer` itself since the coordinator last looked.
    pub(crate) direct_batches: AtomicUsize,
    /// A `Completion::Refill` is on its way and not handled yet.
    pub(crate) refill_asked: AtomicBool,
    /// Counters behind [`Handle::stats`](crate::Handle::stats).
    pub(crate) counters: Counters,
    /// The overflow policy in force (`DropNewest` when the queue is unbounded).
    pub(crate) policy: OverflowPolicy,
    /// The configured bound (`usize::MAX`: none).
    pub(crate) configured_max: usize,
    /// The bound in force, lowered by a shrink (published by the coordinator).
    pub(crate) bound: AtomicUsize,
    /// Entries sent to the coordinator in commands it has not handled yet.
    pub(crate) pending: AtomicUsize,
    /// Signalled (with `buffers` locked) when room may have appeared, or on stop.
    pub(crate) room: Condvar,
    /// A retry policy is in force: failed batches go back with their entries.
    pub(crate) tracks_attempts: bool,
    /// When the engine started: the origin of `head_since`.
    pub(crate) born: Instant,
    /// Nanoseconds after `born` at which the queue's head chunk was queued, plus
    /// one (0: the queue is empty). Published by the coordinator.
    pub(crate) head_since: AtomicU64,
}

/// Monotonic counters, written by the coordinator and the workers, read by anyone.
#[derive(Default)]
pub(crate) struct Counters {
    /// Entries in the queue (set by the coordinator after every event).
    pub(crate) queued: AtomicUsize,
    pub(crate) processed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) panicked: AtomicU64,
    pub(crate) overflow_full: AtomicU64,
    pub(crate) overflow_shrink: AtomicU64,
    pub(crate) overflow_shutdown: AtomicU64,
    pub(crate) stuck: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
}

impl<T> Shared<T> {
    /// Entries that count against the bound: buffered (given), queued, in commands
    /// on their way, and handed to workers but not started.
    pub(crate) fn waiting(&self, buffered: usize) -> usize {
        buffered
            + self.counters.queued.load(Ordering::SeqCst)
            + self.pending.load(Ordering::SeqCst)
            + self.progress.lock().prefetched
    }

    /// Whether hand-overs are held to the bound (the `Reject` and `Block` policies).
    pub(crate) fn admits(&self) -> bool {
        self.policy != OverflowPolicy::DropNewest
    }

    /// For `init` chunks: under an enforced bound, waits until `n` more entries fit
    /// (or the engine stops), then counts them as pending. The guard is held while
    /// the caller sends, so the count and the message go together.
    pub(crate) fn wait_for_room(&self, n: usize) -> Option<MutexGuard<'_, Buffers<T>>> {
        if !self.admits() {
            self.pending.fetch_add(n, Ordering::SeqCst);
            return None;
        }
        let mut guard = self.buffers.lock();
        while !guard.closed
            && !self.stopping.load(Ordering::SeqCst)
            && n <= self.configured_max
            && self.waiting(guard.len()) + n > self.bound.load(Ordering::SeqCst)
        {
            self.room.wait(&mut guard);
        }
        self.pending.fetch_add(n, Ordering::SeqCst);
        Some(guard)
    }

    /// Wakes the coordinator to account done batches and hand out more, unless a
    /// wake-up is already on its way.
    pub(crate) fn ask_refill(&self, done: &Sender<Completion<T>>) {
        if !self.refill_asked.swap(true, Ordering::SeqCst) {
            let _ = done.send(Completion::Refill);
        }
    }
}

impl<T> Shared<T> {
    pub(crate) fn new(policy: OverflowPolicy, max: Option<usize>, tracks_attempts: bool) -> Self {
        Shared {
            buffers: Mutex::new(Buffers {
                back: Pile::new(),
                front: Pile::new(),
                closed: false,
                flush_requested: false,
                direct: None,
                since: None,
            }),
            stopping: Arc::new(AtomicBool::new(false)),
            halt: AtomicBool::new(false),
            progress: Mutex::new(Progress::default()),
            done_batches: AtomicUsize::new(0),
            direct_batches: AtomicUsize::new(0),
            refill_asked: AtomicBool::new(false),
            counters: Counters::default(),
            policy,
            configured_max: max.unwrap_or(usize::MAX),
            bound: AtomicUsize::new(max.unwrap_or(usize::MAX)),
            pending: AtomicUsize::new(0),
            room: Condvar::new(),
            tracks_attempts,
            born: Instant::now(),
            head_since: AtomicU64::new(0),
        }
    }
}

/// The threads the coordinator owns; dropping this closes their channels and joins
/// them, on every exit path.
struct Crew<T> {
    jobs: Option<Sender<Job<T>>>,
    init: Option<Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

impl<T> Drop for Crew<T> {
    fn drop(&mut self) {
        self.jobs = None;
        self.init = None;
        join_all(std::mem::take(&mut self.threads));
    }
}

pub(crate) struct Coordinator<K: Task> {
    config: Config,
    shared: Arc<Shared<K::Entry>>,
    queue: Queue<K::Entry>,
    commands: Receiver<Command<K::Entry>>,
    done: Receiver<Completion<K::Entry>>,
    /// A receiving end of the job channel, to recall batches not started yet.
    recall: Receiver<Job<K::Entry>>,
    crew: Crew<K::Entry>,
    /// Batches handed out (waiting in the job channel or running).
    in_flight: usize,
    overflow: Option<OverflowHandler<K::Entry>>,
    weigher: Option<Weigher<K::Entry>>,
    retries: Option<Retries<K::Entry>>,
    dead_letter: Option<DeadLetterHandler<K::Entry>>,
    init_running: bool,
    /// `poll_now` came while `init` ran: run it again when it returns.
    poll_again: bool,
    last_init_produced: u64,
    /// A shrink shed work since `init` last started: poll again without delay.
    shed_since_init: bool,
    poll_at: Option<Instant>,
    shutdown: Option<(ShutdownMode, Sender<ShutdownReport<K::Entry>>)>,
    overflowed: u64,
    _task: PhantomData<fn() -> K>,
}

impl<K: Task> Coordinator<K> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        config: Config,
        shared: Arc<Shared<K::Entry>>,
        commands: Receiver<Command<K::Entry>>,
        jobs: Sender<Job<K::Entry>>,
        recall: Receiver<Job<K::Entry>>,
        done: Receiver<Completion<K::Entry>>,
        init: Sender<()>,
        threads: Vec<JoinHandle<()>>,
        overflow: Option<OverflowHandler<K::Entry>>,
        weigher: Option<Weigher<K::Entry>>,
        retries: Option<Retries<K::Entry>>,
        dead_letter: Option<DeadLetterHandler<K::Entry>>,
    ) -> Self {
        Coordinator {
            queue: Queue::new(config.max_queue_len, config.max_batch_size),
            config,
            shared,
            commands,
            done,
            recall,
            in_flight: 0,
            crew: Crew {
                jobs: Some(jobs),
                init: Some(init),
                threads,
            },
            overflow,
            weigher,
            retries,
            dead_letter,
            init_running: false,
            poll_again: false,
            last_init_produced: 0,
            shed_since_init: false,
            poll_at: None,
            shutdown: None,
            overflowed: 0,
            _task: PhantomData,
        }
    }

    /// The coordinator thread's body.
    pub(crate) fn run(mut self) {
        let ticker = match self.config.flush_interval {
            FlushInterval::Every(period) => tick(period),
            FlushInterval::Never => never(),
        };
        let watchdog = match self.config.run_deadline {
            Some(deadline) => {
                tick((deadline / 4).clamp(Duration::from_millis(1), Duration::from_secs(1)))
            }
            None => never(),
        };
        self.start_init();
        loop {
            let poll_timer = match self.poll_at {
                Some(when) => at(when),
                None => never(),
            };
            let retry_timer = match self.retries.as_ref().and_then(Retries::next_due) {
                Some(when) => at(when),
                None => never(),
            };
            let deadline = match self.shutdown {
                Some((ShutdownMode::DrainUntil(when), _)) => at(when),
                _ => never(),
            };
            select_biased! {
                recv(self.done) -> msg => match msg {
                    Ok(completion) => {
                        // Each completion frees capacity at once (so a retried batch
                        // is not merged with one that completes just after it).
                        self.complete(completion);
                        self.dispatch();
                        while let Ok(more) = self.done.try_recv() {
                            self.complete(more);
                            self.dispatch();
                        }
                        self.idle_check();
                    }
                    Err(_) => {
                        // Only if every worker thread died, which catch_unwind prevents.
                        log::error!("{}: all workers are gone; stopping", self.config.name);
                        return self.finish(ShutdownMode::Abandon, None);
                    }
                },
                recv(self.commands) -> msg => match msg {
                    Ok(cmd) => self.command(cmd),
                    // Every handle and the init thread are gone without a shutdown.
                    Err(_) => return self.finish(ShutdownMode::Abandon, None),
                },
                recv(ticker) -> _ => self.flush(),
                recv(watchdog) -> _ => self.watch(),
                recv(retry_timer) -> _ => {
                    self.dispatch();
                    self.idle_check();
                }
                recv(deadline) -> _ => {
                    // Drained as far as time allowed: hand back the rest.
                    self.shared.halt.store(true, Ordering::SeqCst);
                    self.recall();
                    if let Some((mode, _)) = &mut self.shutdown {
                        *mode = ShutdownMode::Return;
                    }
                }
                recv(poll_timer) -> _ => {
                    self.poll_at = None;
                    if self.is_idle() && self.shutdown.is_none() {
                        self.start_init();
                    }
                }
            }
            self.absorb_done();
            self.publish();
            if let Some(mode) = self.shutdown.as_ref().map(|s| s.0) {
                if self.shutdown_complete(mode) {
                    let reply = self.shutdown.take().map(|s| s.1);
                    return self.finish(mode, reply);
                }
            }
        }
    }

    fn command(&mut self, cmd: Command<K::Entry>) {
        match cmd {
            Command::Flush(reply) => {
                self.flush();
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            }
            Command::Push(entries, priority) => {
                self.shared
                    .pending
                    .fetch_sub(entries.len(), Ordering::SeqCst);
                self.push(entries, priority);
                self.dispatch();
            }
            Command::InitChunk(chunk) => {
                self.shared.pending.fetch_sub(chunk.len(), Ordering::SeqCst);
                self.push(chunk, Priority::Back);
                self.dispatch();
            }
            Command::InitDone { produced } => {
                self.init_running = false;
                self.last_init_produced = produced;
                if std::mem::take(&mut self.poll_again) && self.shutdown.is_none() {
                    self.start_init();
                } else {
                    self.idle_check();
                }
            }
            Command::Count(reply) => {
                let buffered = self.shared.buffers.lock().len();
                let (prefetched, running) = {
                    let p = self.shared.progress.lock();
                    (p.prefetched, p.running)
                };
                let _ = reply.send(DebugCount {
                    waiting: buffered + self.queue.len() + self.retrying() + prefetched,
                    running,
                });
            }
            Command::Shrink(reply) => {
                self.recall();
                let result = match self.queue.shrink() {
                    Ok(shed) => {
                        // Logged (with the new bound) by `overflow`.
                        self.shed_since_init = true;
                        self.overflow(shed, OverflowReason::Shrink);
                        Ok(())
                    }
                    Err(_) => Err(ShrinkError::MinimumSize),
                };
                let _ = reply.send(result);
                self.dispatch();
            }
            Command::PollNow => {
                if self.shutdown.is_none() {
                    if self.init_running {
                        // The running init may have looked before the new work
                        // arrived: run it again when it returns.
                        self.poll_again = true;
                    } else {
                        self.start_init();
                    }
                }
            }
            Command::Expand(reply) => {
                self.queue.expand();
                let _ = reply.send(());
            }
            Command::IsShrunk(reply) => {
                let _ = reply.send(self.queue.is_shrunk());
            }
            Command::Memory(reply) => {
                // Batches handed out but not started are weighed as queued.
                self.recall();
                let per = std::mem::size_of::<K::Entry>();
                let mut bytes = self.queue.len() * per;
                if let Some(weigh) = &self.weigher {
                    match catch(|| self.queue.iter().map(weigh).sum::<usize>()) {
                        Ok(heap) => bytes += heap,
                        Err(msg) => log::error!("{}: weigher panicked: {msg}", self.config.name),
                    }
                }
                let _ = reply.send(bytes);
                self.dispatch();
            }
            Command::Shutdown(mode, reply) => {
                self.shared.stopping.store(true, Ordering::Relaxed);
                self.poll_at = None;
                let mode = match mode {
                    ShutdownMode::DrainUntil(when) if when <= Instant::now() => {
                        self.shared.halt.store(true, Ordering::SeqCst);
                        ShutdownMode::Return
                    }
                    other => other,
                };
                self.shutdown = Some((mode, reply));
                if self.shared.halt.load(Ordering::Relaxed) {
                    self.recall();
                }
                // Everything buffered before the close joins the queue now.
                self.flush();
            }
        }
    }

    /// Moves both buffers into the queue (front entries ahead of everything), fills
    /// the free slots, and checks for idleness.
    fn flush(&mut self) {
        let (back, front) = {
            let mut buffers = self.shared.buffers.lock();
            buffers.flush_requested = false;
            let taken = buffers.len();
            // Still counted against the bound while they move into the queue.
            self.shared
                .counters
                .queued
                .fetch_add(taken, Ordering::SeqCst);
            buffers.since = None;
            (buffers.back.take(), buffers.front.take())
        };
        if !front.is_empty() {
            // Front entries go ahead of batches handed out but not started, too.
            self.recall();
            if self.shared.admits() {
                for chunk in front.into_iter().rev() {
                    self.queue.push_front_unbounded(chunk);
                }
            } else {
                self.sync_bound();
                let overflow = self.queue.push_front_chunks(front);
                self.overflow(overflow, OverflowReason::Full);
            }
        }
        if self.shared.admits() {
            for chunk in back {
                self.queue.push_back_unbounded(chunk);
            }
        } else {
            self.sync_bound();
            let mut overflow = Vec::new();
            for chunk in back {
                overflow.extend(self.queue.push_back(chunk));
            }
            self.overflow(overflow, OverflowReason::Full);
        }
        self.dispatch();
        self.idle_check();
    }

    /// Publishes how many entries wait in the queue (and under a retry policy).
    fn publish_queued(&self) {
        self.shared
            .counters
            .queued
            .store(self.queue.len() + self.retrying(), Ordering::SeqCst);
    }

    /// Publishes the queue's length and bound for hand-overs and stats; under an
    /// enforced bound, wakes whoever waits for room.
    fn publish(&mut self) {
        self.publish_queued();
        let head = self.queue.head_since().map_or(0, |t| {
            t.saturating_duration_since(self.shared.born).as_nanos() as u64 + 1
        });
        self.shared.head_since.store(head, Ordering::Relaxed);
        if self.shared.admits() {
            let bound = self.queue.max_len().unwrap_or(usize::MAX);
            self.shared.bound.store(bound, Ordering::SeqCst);
            // Taking the lock orders this after any waiter's check.
            drop(self.shared.buffers.lock());
            self.shared.room.notify_all();
        }
    }

    /// Before a bounded push: batches handed out but not started count as queued.
    fn sync_bound(&mut self) {
        if self.queue.is_bounded() {
            let prefetched = self.shared.progress.lock().prefetched;
            self.queue.set_outside(prefetched);
        }
    }

    fn push(&mut self, entries: Vec<K::Entry>, priority: Priority) {
        if priority == Priority::Front {
            self.recall();
        }
        if self.shared.admits() {
            // Admitted at hand-over (or a retry of admitted entries): never dropped.
            match priority {
                Priority::Back => self.queue.push_back_unbounded(entries),
                Priority::Front => self.queue.push_front_unbounded(entries),
            }
            return;
        }
        self.sync_bound();
        let overflow = match priority {
            Priority::Back => self.queue.push_back(entries),
            Priority::Front => self.queue.push_front(entries),
        };
        self.overflow(overflow, OverflowReason::Full);
    }

    /// Hands batches to the workers until `HAND_OUT` per worker are out.
    fn dispatch(&mut self) {
        self.absorb_done();
        if self.shared.halt.load(Ordering::Relaxed) {
            return;
        }
        let Some(jobs) = &self.crew.jobs else { return };
        let limit = crate::pool::HAND_OUT * self.config.max_concurrency;
        if self.in_flight >= limit || (self.queue.is_empty() && self.retrying() == 0) {
            return;
        }
        let mut batches: Vec<Job<K::Entry>> = Vec::new();
        let mut times = Vec::new();
        let now = Instant::now();
        if let Some(retries) = &mut self.retries {
            retries.wake(now);
            while self.in_flight + batches.len() < limit {
                match retries.pop_ready(self.config.max_batch_size) {
                    Some(group) => {
                        times.push(now);
                        batches.push(Job {
                            batch: group.entries,
                            attempts: Some(group.attempts),
                        })
                    }
                    None => break,
                }
            }
        }
        while self.in_flight + batches.len() < limit {
            let since = self.queue.head_since();
            match self.queue.pop_batch(self.config.max_batch_size) {
                Some(batch) => {
                    times.push(since.unwrap_or(now));
                    batches.push(Job {
                        batch,
                        attempts: None,
                    })
                }
                None => break,
            }
        }
        // Counted before they are sent: a worker may start one at once. (Handed
        // out first, then no longer queued: a reader may count them twice for an
        // instant, never not at all.)
        {
            let mut p = self.shared.progress.lock();
            p.prefetched += batches.iter().map(|j| j.batch.len()).sum::<usize>();
            p.handed.extend(times);
        }
        self.publish_queued();
        let mut unsent = Vec::new();
        for job in batches {
            // Never blocks: `buffer` may have handed out batches this count has
            // not seen yet, so a full channel just keeps the rest queued.
            match jobs.try_send(job) {
                Ok(()) => self.in_flight += 1,
                Err(err) => unsent.push(err.into_inner()),
            }
        }
        for Job { batch, attempts } in unsent.into_iter().rev() {
            {
                let mut p = self.shared.progress.lock();
                p.prefetched -= batch.len();
                p.handed.pop_back();
            }
            self.put_back(batch, attempts);
        }
    }

    /// Takes batches that no worker has started back into the queue, in order.
    fn recall(&mut self) {
        let recalled: Vec<Job<K::Entry>> = self.recall.try_iter().collect();
        if recalled.is_empty() {
            return;
        }
        let entries: usize = recalled.iter().map(|j| j.batch.len()).sum();
        let jobs = recalled.len();
        self.in_flight -= jobs;
        for Job { batch, attempts } in recalled.into_iter().rev() {
            self.put_back(batch, attempts);
        }
        // Queued again first, then no longer handed out: a reader may count them
        // twice for an instant, never not at all.
        self.publish_queued();
        let mut p = self.shared.progress.lock();
        p.prefetched -= entries;
        let keep = p.handed.len().saturating_sub(jobs);
        p.handed.truncate(keep);
    }

    /// Reports runs older than the run deadline, once each.
    fn watch(&mut self) {
        let Some(deadline) = self.config.run_deadline else {
            return;
        };
        let mut stuck = Vec::new();
        {
            let mut p = self.shared.progress.lock();
            for slot in p.runs.iter_mut().flatten() {
                if !slot.reported && slot.started.elapsed() >= deadline {
                    slot.reported = true;
                    stuck.push((slot.entries, slot.started.elapsed()));
                }
            }
        }
        for (entries, age) in stuck {
            self.shared.counters.stuck.fetch_add(1, Ordering::Relaxed);
            log::warn!(
                "{}: a run of {entries} entries has not returned after {age:?} (deadline {deadline:?})",
                self.config.name
            );
        }
    }

    /// Accounts batches the workers finished without reporting them one by one.
    fn absorb_done(&mut self) {
        // Done first: every batch counted done was counted handed out before it
        // was sent, so reading the hand-outs second never finds fewer.
        let done = self.shared.done_batches.swap(0, Ordering::SeqCst);
        let direct = self.shared.direct_batches.swap(0, Ordering::SeqCst);
        self.in_flight += direct;
        self.in_flight -= done;
    }

    fn complete(&mut self, completion: Completion<K::Entry>) {
        self.absorb_done();
        match completion {
            Completion::Refill => {
                // Cleared before the count is read: a batch done after this read
                // asks again.
                self.shared.refill_asked.store(false, Ordering::SeqCst);
                self.absorb_done();
            }
            Completion::Skipped(batch, attempts) => {
                // Handed back unrun by a halting worker: it was never started.
                self.in_flight -= 1;
                self.shared.progress.lock().prefetched -= batch.len();
                self.put_back(batch, attempts);
            }
            Completion::Failed {
                batch,
                attempts,
                again,
                panic,
            } => {
                self.in_flight -= 1;
                self.shared.progress.lock().running -= 1;
                if let Some(msg) = &panic {
                    self.shared
                        .counters
                        .panicked
                        .fetch_add(1, Ordering::Relaxed);
                    log::error!(
                        "{}: run panicked on a batch of {} entries, retrying it: {msg}",
                        self.config.name,
                        batch.len()
                    );
                }
                self.retry(batch, attempts, again, panic);
            }
        }
    }

    /// A batch recalled or skipped: back where it came from, at the front.
    fn put_back(&mut self, batch: Vec<K::Entry>, attempts: Option<Vec<u32>>) {
        match (attempts, &mut self.retries) {
            (Some(attempts), Some(retries)) => retries.push_ready_front(Group {
                entries: batch,
                attempts,
            }),
            _ => self.queue.push_front_unbounded(batch),
        }
    }

    /// Sends failed entries back: to the queue, or under a retry policy to the
    /// backoff timer or the dead-letter handler.
    fn retry(
        &mut self,
        batch: Vec<K::Entry>,
        attempts: Option<Vec<u32>>,
        again: Option<Vec<K::Entry>>,
        panic: Option<String>,
    ) {
        let Some(retries) = &mut self.retries else {
            let entries = again.unwrap_or(batch);
            self.requeue(entries);
            return;
        };
        let attempts = attempts.unwrap_or_else(|| vec![0; batch.len()]);
        let (known, fresh) = match again {
            None => (
                Group {
                    attempts: attempts.iter().map(|a| a + 1).collect(),
                    entries: batch,
                },
                Vec::new(),
            ),
            Some(again) => retries.match_attempts(&batch, &attempts, again),
        };
        let max = retries.policy.max_attempts;
        let mut dead = Vec::new();
        let mut later = Group {
            entries: Vec::new(),
            attempts: Vec::new(),
        };
        for (entry, n) in known.entries.into_iter().zip(known.attempts) {
            if n >= max {
                dead.push(entry);
            } else {
                later.entries.push(entry);
                later.attempts.push(n);
            }
        }
        if !later.entries.is_empty() {
            self.shared
                .counters
                .retried
                .fetch_add(later.entries.len() as u64, Ordering::Relaxed);
            retries.delay(later, Instant::now());
        }
        self.requeue(fresh);
        if !dead.is_empty() {
            let reason = match panic {
                Some(msg) => DeadLetterReason::Panicked(msg),
                None => DeadLetterReason::RetryRequested,
            };
            self.dead_letter(dead, reason);
        }
    }

    fn requeue(&mut self, entries: Vec<K::Entry>) {
        if entries.is_empty() {
            return;
        }
        self.shared
            .counters
            .retried
            .fetch_add(entries.len() as u64, Ordering::Relaxed);
        log::debug!("{}: retrying {} entries", self.config.name, entries.len());
        self.push(entries, Priority::Back);
    }

    fn dead_letter(&mut self, entries: Vec<K::Entry>, reason: DeadLetterReason) {
        let n = entries.len();
        self.shared
            .counters
            .dead_lettered
            .fetch_add(n as u64, Ordering::Relaxed);
        log::warn!(
            "{}: {n} entries dead-lettered after {} attempts ({reason})",
            self.config.name,
            self.retries.as_ref().map_or(0, |r| r.policy.max_attempts)
        );
        if let Some(handler) = &self.dead_letter {
            if let Err(msg) = catch(|| handler(entries, reason)) {
                log::error!("{}: dead-letter handler panicked: {msg}", self.config.name);
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.retrying() == 0 && self.in_flight == 0 && !self.init_running
    }

    /// Entries waiting under the retry policy (backoff or ready).
    fn retrying(&self) -> usize {
        self.retries.as_ref().map_or(0, Retries::len)
    }

    /// With `poll` on and nothing to do: re-run `init` now, or arm the poll timer.
    /// When idle, also give back the queue's spare memory.
    fn idle_check(&mut self) {
        self.absorb_done();
        if !self.is_idle() || self.shutdown.is_some() {
            return;
        }
        self.queue.release_memory();
        if !self.config.poll {
            return;
        }
        if self.last_init_produced > 0 || self.shed_since_init {
            self.start_init();
        } else if self.poll_at.is_none() {
            self.poll_at = Some(Instant::now() + self.config.idle_poll_delay);
        }
    }

    fn start_init(&mut self) {
        if self.init_running {
            return;
        }
        if let Some(init) = &self.crew.init {
            if init.send(()).is_ok() {
                self.init_running = true;
                self.shed_since_init = false;
                self.poll_at = None;
            }
        }
    }

    fn shutdown_complete(&self, mode: ShutdownMode) -> bool {
        let settled = self.in_flight == 0 && !self.init_running;
        match mode {
            ShutdownMode::Drain | ShutdownMode::DrainUntil(_) => {
                settled && self.queue.is_empty() && self.retrying() == 0
            }
            ShutdownMode::Return | ShutdownMode::Abandon => settled,
        }
    }

    /// Collects what is left, hands it out as `mode` says, stops the threads.
    fn finish(mut self, mode: ShutdownMode, reply: Option<Sender<ShutdownReport<K::Entry>>>) {
        {
            let mut buffers = self.shared.buffers.lock();
            buffers.closed = true;
            buffers.direct = None;
        }
        self.shared.stopping.store(true, Ordering::Relaxed);
        // Stop the workers and the init thread, so nothing more arrives from them.
        drop(std::mem::replace(
            &mut self.crew,
            Crew {
                jobs: None,
                init: None,
                threads: Vec::new(),
            },
        ));
        // Completions and init chunks that raced the stop.
        while let Ok(completion) = self.done.try_recv() {
            match completion {
                Completion::Refill => {}
                Completion::Failed { batch, again, .. } => {
                    self.queue.push_back_unbounded(again.unwrap_or(batch))
                }
                Completion::Skipped(v, _) => self.queue.push_front_unbounded(v),
            }
        }
        while let Ok(cmd) = self.commands.try_recv() {
            match cmd {
                Command::Push(v, _) | Command::InitChunk(v) => self.queue.push_back_unbounded(v),
                Command::Shutdown(_, other) => drop(other),
                _ => {}
            }
        }
        let mut left = self.queue.drain_all();
        if let Some(retries) = &mut self.retries {
            left.extend(retries.drain_all());
        }
        {
            let mut buffers = self.shared.buffers.lock();
            let front: Vec<K::Entry> = buffers.front.take().into_iter().flatten().collect();
            left.splice(0..0, front);
            left.extend(buffers.back.take().into_iter().flatten());
        }
        let report = ShutdownReport {
            unprocessed: Vec::new(),
            overflowed: self.overflowed,
            drained: 0,
        };
        match mode {
            ShutdownMode::Abandon => {
                if !left.is_empty() {
                    self.overflow(left, OverflowReason::Shutdown);
                }
                let report = ShutdownReport {
                    overflowed: self.overflowed,
                    ..report
                };
                if let Some(reply) = reply {
                    let _ = reply.send(report);
                }
            }
            ShutdownMode::Drain | ShutdownMode::DrainUntil(_) | ShutdownMode::Return => {
                if let Some(reply) = reply {
                    let _ = reply.send(ShutdownReport {
                        unprocessed: left,
                        ..report
                    });
                }
            }
        }
        log::debug!("{}: stopped", self.config.name);
    }

    /// Counts, logs and hands out entries that leave unprocessed.
    fn overflow(&mut self, entries: Vec<K::Entry>, reason: OverflowReason) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len();
        self.overflowed += n as u64;
        let counter = match reason {
            OverflowReason::Full => &self.shared.counters.overflow_full,
            OverflowReason::Shrink => &self.shared.counters.overflow_shrink,
            OverflowReason::Shutdown => &self.shared.counters.overflow_shutdown,
        };
        counter.fetch_add(n as u64, Ordering::Relaxed);
        log::warn!(
            "{}: {n} entries left the queue unprocessed ({reason}; bound {:?}; {} in all)",
            self.config.name,
            self.queue.max_len(),
            self.overflowed
        );
        if let Some(handler) = &self.overflow {
            if let Err(msg) = catch(|| handler(entries, reason)) {
                log::error!("{}: overflow handler panicked: {msg}", self.config.name);
            }
        }
    }
}

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

use crate::config::{join_all, Config, FlushInterval, OverflowHandler, OverflowReason, Weigher};
use crate::error::ShrinkError;
use crate::handle::{DebugCount, ShutdownMode, ShutdownReport};
use crate::pool::{Completion, Job};
use crate::queue::Queue;
use crate::task::{Outcome, Priority, Task};
use crate::unwind::catch;
use crossbeam_channel::{at, never, select_biased, tick, Receiver, Sender};
use parking_lot::Mutex;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

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
    /// Bytes the queued entries occupy (entries × size + weigher).
    Memory(Sender<usize>),
    Shutdown(ShutdownMode, Sender<ShutdownReport<T>>),
}

/// What `buffer` writes into and the coordinator takes on each flush.
pub(crate) struct Buffers<T> {
    pub(crate) back: Vec<T>,
    pub(crate) front: Vec<T>,
    /// Set once by a shutdown; a hand-over that sees it gives the entries back.
    pub(crate) closed: bool,
    /// A full-batch flush has been asked for and not yet done.
    pub(crate) flush_requested: bool,
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
}

impl<T> Shared<T> {
    pub(crate) fn new() -> Self {
        Shared {
            buffers: Mutex::new(Buffers {
                back: Vec::new(),
                front: Vec::new(),
                closed: false,
                flush_requested: false,
            }),
            stopping: Arc::new(AtomicBool::new(false)),
            halt: AtomicBool::new(false),
        }
    }
}

/// The threads the coordinator owns; dropping this closes their channels and joins
/// them, on every exit path.
struct Crew<T, S> {
    jobs: Option<Sender<Job<T, S>>>,
    init: Option<Sender<Arc<S>>>,
    threads: Vec<JoinHandle<()>>,
}

impl<T, S> Drop for Crew<T, S> {
    fn drop(&mut self) {
        self.jobs = None;
        self.init = None;
        join_all(std::mem::take(&mut self.threads));
    }
}

pub(crate) struct Coordinator<K: Task> {
    config: Config,
    state: Arc<K::State>,
    shared: Arc<Shared<K::Entry>>,
    queue: Queue<K::Entry>,
    commands: Receiver<Command<K::Entry>>,
    done: Receiver<Completion<K::Entry, K::State>>,
    crew: Crew<K::Entry, K::State>,
    overflow: Option<OverflowHandler<K::Entry>>,
    weigher: Option<Weigher<K::Entry>>,
    running: usize,
    init_running: bool,
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
        state: Arc<K::State>,
        shared: Arc<Shared<K::Entry>>,
        commands: Receiver<Command<K::Entry>>,
        jobs: Sender<Job<K::Entry, K::State>>,
        done: Receiver<Completion<K::Entry, K::State>>,
        init: Sender<Arc<K::State>>,
        threads: Vec<JoinHandle<()>>,
        overflow: Option<OverflowHandler<K::Entry>>,
        weigher: Option<Weigher<K::Entry>>,
    ) -> Self {
        Coordinator {
            queue: Queue::new(config.max_queue_len),
            config,
            state,
            shared,
            commands,
            done,
            crew: Crew {
                jobs: Some(jobs),
                init: Some(init),
                threads,
            },
            overflow,
            weigher,
            running: 0,
            init_running: false,
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
        self.start_init();
        loop {
            let poll_timer = match self.poll_at {
                Some(when) => at(when),
                None => never(),
            };
            select_biased! {
                recv(self.done) -> msg => match msg {
                    Ok(completion) => self.complete(completion),
                    Err(_) => unreachable!("the coordinator holds the job sender, so workers live"),
                },
                recv(self.commands) -> msg => match msg {
                    Ok(cmd) => self.command(cmd),
                    // Every handle and the init thread are gone without a shutdown.
                    Err(_) => return self.finish(ShutdownMode::Abandon, None),
                },
                recv(ticker) -> _ => self.flush(),
                recv(poll_timer) -> _ => {
                    self.poll_at = None;
                    if self.is_idle() && self.shutdown.is_none() {
                        self.start_init();
                    }
                }
            }
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
                self.push(entries, priority);
                self.dispatch();
            }
            Command::InitChunk(chunk) => {
                self.push(chunk, Priority::Back);
                self.dispatch();
            }
            Command::InitDone { produced } => {
                self.init_running = false;
                self.last_init_produced = produced;
                self.idle_check();
            }
            Command::Count(reply) => {
                let buffered = self.shared.buffers.lock().len();
                let _ = reply.send(DebugCount {
                    waiting: buffered + self.queue.len(),
                    running: self.running,
                });
            }
            Command::Shrink(reply) => {
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
            }
            Command::Expand(reply) => {
                self.queue.expand();
                let _ = reply.send(());
            }
            Command::IsShrunk(reply) => {
                let _ = reply.send(self.queue.is_shrunk());
            }
            Command::Memory(reply) => {
                let per = std::mem::size_of::<K::Entry>();
                let mut bytes = self.queue.len() * per;
                if let Some(weigh) = &self.weigher {
                    match catch(|| self.queue.iter().map(weigh).sum::<usize>()) {
                        Ok(heap) => bytes += heap,
                        Err(msg) => log::error!("{}: weigher panicked: {msg}", self.config.name),
                    }
                }
                let _ = reply.send(bytes);
            }
            Command::Shutdown(mode, reply) => {
                self.shared.stopping.store(true, Ordering::Relaxed);
                self.poll_at = None;
                self.shutdown = Some((mode, reply));
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
            (
                std::mem::take(&mut buffers.back),
                std::mem::take(&mut buffers.front),
            )
        };
        if !front.is_empty() {
            self.push(front, Priority::Front);
        }
        if !back.is_empty() {
            self.push(back, Priority::Back);
        }
        self.dispatch();
        self.idle_check();
    }

    fn push(&mut self, entries: Vec<K::Entry>, priority: Priority) {
        let overflow = match priority {
            Priority::Back => self.queue.push_back(entries),
            Priority::Front => self.queue.push_front(entries),
        };
        self.overflow(overflow, OverflowReason::Full);
    }

    /// Fills every free slot from the queue.
    fn dispatch(&mut self) {
        if self.shared.halt.load(Ordering::Relaxed) {
            return;
        }
        let Some(jobs) = &self.crew.jobs else { return };
        while self.running < self.config.max_concurrency {
            let Some(batch) = self.queue.pop_batch(self.config.max_batch_size) else {
                break;
            };
            let job = Job {
                batch,
                state: self.state.clone(),
            };
            // The channel holds max_concurrency jobs and fewer are out, so this never
            // blocks; the workers outlive the sender, so it never fails.
            if let Err(err) = jobs.send(job) {
                self.queue.push_front(err.0.batch);
                break;
            }
            self.running += 1;
        }
    }

    fn complete(&mut self, completion: Completion<K::Entry, K::State>) {
        self.running -= 1;
        let Completion { batch, outcome } = completion;
        let retry = match outcome {
            Ok(Outcome::Ok) => None,
            Ok(Outcome::OkWithState(state)) => {
                self.state = Arc::new(state);
                None
            }
            Ok(Outcome::Retry) => Some(batch),
            Ok(Outcome::RetryEntries(entries)) => Some(entries),
            Ok(Outcome::RetryEntriesWithState(entries, state)) => {
                self.state = Arc::new(state);
                Some(entries)
            }
            Err(msg) => {
                log::error!(
                    "{}: run panicked on a batch of {} entries, retrying it: {msg}",
                    self.config.name,
                    batch.len()
                );
                Some(batch)
            }
        };
        if let Some(entries) = retry {
            if !entries.is_empty() {
                log::debug!("{}: retrying {} entries", self.config.name, entries.len());
                self.push(entries, Priority::Back);
            }
        }
        self.dispatch();
        if self.running == 0 {
            self.idle_check();
        }
    }

    fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.running == 0 && !self.init_running
    }

    /// With `poll` on and nothing to do: re-run `init` now, or arm the poll timer.
    /// When idle, also give back the queue's spare memory.
    fn idle_check(&mut self) {
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
            if init.send(self.state.clone()).is_ok() {
                self.init_running = true;
                self.shed_since_init = false;
                self.poll_at = None;
            }
        }
    }

    fn shutdown_complete(&self, mode: ShutdownMode) -> bool {
        let settled = self.running == 0 && !self.init_running;
        match mode {
            ShutdownMode::Drain => settled && self.queue.is_empty(),
            ShutdownMode::Return | ShutdownMode::Abandon => settled,
        }
    }

    /// Collects what is left, hands it out as `mode` says, stops the threads.
    fn finish(mut self, mode: ShutdownMode, reply: Option<Sender<ShutdownReport<K::Entry>>>) {
        {
            let mut buffers = self.shared.buffers.lock();
            buffers.closed = true;
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
        while let Ok(Completion { batch, outcome }) = self.done.try_recv() {
            match outcome {
                Ok(Outcome::Retry) | Err(_) => self.queue.push_back_unbounded(batch),
                Ok(Outcome::RetryEntries(v)) | Ok(Outcome::RetryEntriesWithState(v, _)) => {
                    self.queue.push_back_unbounded(v)
                }
                Ok(_) => {}
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
        {
            let mut buffers = self.shared.buffers.lock();
            let front = std::mem::take(&mut buffers.front);
            let back = std::mem::take(&mut buffers.back);
            left.splice(0..0, front);
            left.extend(back);
        }
        let report = ShutdownReport {
            unprocessed: Vec::new(),
            overflowed: self.overflowed,
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
            ShutdownMode::Drain | ShutdownMode::Return => {
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

//! The builder: every option with its documented default, validated at start.

use crate::clock::{Clock, ManualClock};
use crate::dedup::{KeyTable, Table};
use crate::engine;
use crate::error::BuildError;
use crate::handle::Handle;
use crate::monitor::MemoryMonitor;
use crate::observe::{BatchObserver, BatchRecord};
use crate::overflow::{OverflowHandler, OverflowPolicy, OverflowReason, Reporter, Weigher};
use crate::retry::{DeadLetterHandler, DeadLetterReason, RetryPolicy, Rules, Same};
use crate::settings::{Batching, Config, FlushInterval, MAX_CONCURRENCY};
use crate::store::Parts;
use crate::task::Task;
use crate::threads::WorkerHooks;
use std::time::Duration;

/// Builds and starts an engine for a [`Task`].
///
/// ```
/// use buffered_task::{Builder, FlushInterval, Outcome, Priority, Task};
/// use std::time::Duration;
///
/// struct Print;
/// impl Task for Print {
///     type Entry = u32;
///     type State = ();
///     fn run(&self, batch: &[u32], _: &()) -> Outcome<u32, ()> {
///         assert!(batch.len() <= 10);
///         Outcome::Ok
///     }
/// }
///
/// let handle = Builder::new(Print, ())
///     .name("printer")
///     .max_batch_size(10)
///     .max_concurrency(2)
///     .flush_interval(Duration::from_millis(50))
///     .poll(false)
///     .start()?;
/// handle.buffer(vec![1, 2, 3], Priority::Back)?;
/// handle.shutdown_drain()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[must_use = "a builder does nothing until `start`"]
pub struct Builder<K: Task> {
    task: K,
    state: K::State,
    config: Config,
    overflow: Option<OverflowHandler<K::Entry>>,
    weigher: Option<Weigher<K::Entry>>,
    monitor: Option<MemoryMonitor>,
    retry: Option<(RetryPolicy, Same<K::Entry>)>,
    dead_letter: Option<DeadLetterHandler<K::Entry>>,
    observer: Option<BatchObserver>,
    workers: WorkerHooks,
    dedup: Option<Box<dyn Table<K::Entry>>>,
}

impl<K: Task> Builder<K> {
    /// A builder for `task`, starting from `state`, with every option at its default.
    pub fn new(task: K, state: K::State) -> Self {
        Builder {
            task,
            state,
            config: Config {
                name: "buffered-task".to_string(),
                max_batch_size: 100,
                max_concurrency: 1,
                flush_interval: FlushInterval::Every(Duration::from_millis(100)),
                poll: true,
                idle_poll_delay: Duration::from_secs(600),
                max_queue_len: None,
                overflow_policy: OverflowPolicy::DropNewest,
                run_deadline: None,
                clock: Clock::System,
                batching: Batching::Ticked,
                adaptive_min: None,
            },
            overflow: None,
            weigher: None,
            monitor: None,
            retry: None,
            dead_letter: None,
            observer: None,
            workers: WorkerHooks::default(),
            dedup: None,
        }
    }

    /// Lets the number of batches running at once follow the backend, between
    /// `range.start()` and `range.end()` (which becomes `max_concurrency`: one
    /// worker thread per slot). It starts at the minimum and grows while runs
    /// succeed and take no more than twice the best run time seen; it shrinks
    /// by 10% when runs get slower than that, and by half when runs fail
    /// (retry, error or panic). [`Stats::concurrency_limit`](crate::Stats::concurrency_limit)
    /// shows where it stands. Default: off (`max_concurrency` batches may run).
    /// An empty range or a zero minimum is rejected by `start`. The range's top
    /// is `max_concurrency`: a later `.max_concurrency(n)` moves it (and a
    /// minimum above it is rejected).
    ///
    /// ```
    /// use buffered_task::{Builder, Outcome, Task};
    /// # struct T; impl Task for T { type Entry = u8; type State = ();
    /// #   fn run(&self, _: &[u8], _: &()) -> Outcome<u8, ()> { Outcome::Ok } }
    /// let handle = Builder::new(T, ())
    ///     .max_batch_size(1)
    ///     .adaptive_concurrency(2..=16) // 16 worker threads, 2 slots to start
    ///     .start()?;
    /// assert_eq!(handle.stats().concurrency_limit, 2);
    /// handle.push_back((0..100).collect())?;
    /// handle.shutdown_drain()?;
    /// assert!(handle.stats().concurrency_limit > 2); // 100 quick successes
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn adaptive_concurrency(mut self, range: std::ops::RangeInclusive<usize>) -> Self {
        let (min, max) = range.into_inner();
        self.config.adaptive_min = Some(min);
        self.config.max_concurrency = max; // the ceiling: a later `max_concurrency` moves it
        self
    }

    /// Most entries per `run` call. Default 100; 0 is rejected by `start`. Any
    /// larger value works (`usize::MAX` means "everything waiting"): nothing is
    /// allocated in proportion to it.
    pub fn max_batch_size(mut self, n: usize) -> Self {
        self.config.max_batch_size = n;
        self
    }

    /// Most `run` calls at once, which is also the number of worker threads.
    /// Default 1; 0 is rejected by `start`.
    pub fn max_concurrency(mut self, n: usize) -> Self {
        self.config.max_concurrency = n;
        self
    }

    /// Period of the flush ticker (a `Duration`), or [`FlushInterval::Never`] to
    /// flush only on [`Handle::flush`](crate::Handle::flush). Default 100 ms; a zero
    /// period is rejected by `start`.
    pub fn flush_interval(mut self, interval: impl Into<FlushInterval>) -> Self {
        self.config.flush_interval = interval.into();
        self
    }

    /// How buffered entries become batches: [`Batching::Ticked`] (the default:
    /// partial batches wait for the flush tick) or [`Batching::Natural`] (a free
    /// worker takes whatever is buffered at once; under load, batches fill by
    /// themselves).
    ///
    /// ```
    /// use buffered_task::{Batching, Builder, FlushInterval, Outcome, Priority, Task};
    /// # use std::sync::mpsc;
    /// # struct T(std::sync::Mutex<mpsc::Sender<Vec<u8>>>);
    /// # impl Task for T { type Entry = u8; type State = ();
    /// #   fn run(&self, b: &[u8], _: &()) -> Outcome<u8, ()> {
    /// #     self.0.lock().unwrap().send(b.to_vec()).unwrap(); Outcome::Ok } }
    /// # let (tx, ran) = mpsc::channel();
    /// let handle = Builder::new(T(tx.into()), ())
    ///     .flush_interval(FlushInterval::Never) // no tick at all
    ///     .batching(Batching::Natural)
    ///     .start()?;
    /// handle.buffer(vec![1], Priority::Back)?; // an idle worker takes it at once
    /// assert_eq!(ran.recv()?, vec![1]);
    /// handle.shutdown_drain()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn batching(mut self, batching: Batching) -> Self {
        self.config.batching = batching;
        self
    }

    /// Re-run `init` when the engine goes idle, to find new work. Default `true`.
    pub fn poll(mut self, poll: bool) -> Self {
        self.config.poll = poll;
        self
    }

    /// With `poll` on: how long to wait before re-running an `init` whose last run
    /// produced nothing. Default 10 minutes; zero re-runs at once. An `init` that
    /// produced entries is re-run as soon as the engine is idle again.
    pub fn idle_poll_delay(mut self, delay: Duration) -> Self {
        self.config.idle_poll_delay = delay;
        self
    }

    /// Bound on the queue's length. Default: unbounded. What does not fit is
    /// overflow (counted, logged at warn, handed to the overflow handler); 0 is
    /// rejected by `start`.
    pub fn max_queue_len(mut self, n: usize) -> Self {
        self.config.max_queue_len = Some(n);
        self
    }

    /// What a full bounded queue does with new entries (see [`OverflowPolicy`]).
    /// Default [`OverflowPolicy::DropNewest`]. Without `max_queue_len` it has no
    /// effect.
    pub fn overflow_policy(mut self, policy: OverflowPolicy) -> Self {
        self.config.overflow_policy = policy;
        self
    }

    /// Bounds retries (see [`RetryPolicy`]): each entry carries an attempt count
    /// through retries (entries handed back by `RetryEntries` that were in the batch
    /// keep theirs, matched by `==`; new ones start at zero); a failed entry waits
    /// its backoff in a timer (no thread sleeps), then runs ahead of the queue; an
    /// entry that has used its attempts goes to the
    /// [`dead_letter_handler`](Builder::dead_letter_handler) with the reason.
    /// Default: none, i.e. retry for ever, at once, as the original does.
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self
    where
        K::Entry: PartialEq,
    {
        self.retry = Some((policy, |a, b| a == b));
        self
    }

    /// Receives entries whose attempts are spent under the retry policy, with the
    /// reason (the last panic message, or a requested retry). Called on the
    /// worker whose run spent them, never under a lock; it may call the engine's
    /// handle. Default: none (they are counted in
    /// [`Stats::dead_lettered`](crate::Stats::dead_lettered) and logged at warn,
    /// then dropped).
    pub fn dead_letter_handler(
        mut self,
        handler: impl Fn(Vec<K::Entry>, DeadLetterReason) + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Some(Box::new(handler));
        self
    }

    /// A watchdog for `run` calls that do not return: a run older than `deadline`
    /// is logged at warn (batch size and age) once, counted in
    /// [`Stats::stuck_runs`](crate::Stats::stuck_runs), and logged again if it
    /// ever returns. Threads cannot be killed, so a stuck run keeps its worker
    /// and the engine runs with one slot fewer until it returns. Default: none;
    /// zero is rejected by `start`.
    pub fn run_deadline(mut self, deadline: Duration) -> Self {
        self.config.run_deadline = Some(deadline);
        self
    }

    /// Name used in thread names (`<name>-coordinator`, `<name>-worker-N`,
    /// `<name>-init`) and log lines. Default `buffered-task`; a NUL byte is rejected.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.config.name = name.into();
        self
    }

    /// Receives entries that leave the engine unprocessed: queue overflow, shrink,
    /// and the engine's stop without them (see [`OverflowReason`]). Called on the
    /// thread that holds them (a caller whose hand-over or flush overflowed, a
    /// worker, the coordinator's tick, the thread that drops the last handle),
    /// never under a lock; it may call the engine's handle. Default: none (they
    /// are counted and logged at warn, then dropped).
    pub fn overflow_handler(
        mut self,
        handler: impl Fn(Vec<K::Entry>, OverflowReason) + Send + Sync + 'static,
    ) -> Self {
        self.overflow = Some(Box::new(handler));
        self
    }

    /// Reports the heap bytes one entry owns, added to `size_of::<Entry>()` when the
    /// memory monitor weighs this task. Default: none (entries own no heap memory).
    pub fn weigher(mut self, weigher: impl Fn(&K::Entry) -> usize + Send + Sync + 'static) -> Self {
        self.weigher = Some(Box::new(weigher));
        self
    }

    /// Registers the task with a memory monitor, which may shrink and expand its
    /// queue. Default: none.
    pub fn memory_monitor(mut self, monitor: &MemoryMonitor) -> Self {
        self.monitor = Some(monitor.clone());
        self
    }

    /// Drops an entry whose key is already waiting (buffered, queued or
    /// retrying): it is not queued again. The dropped entry is counted in
    /// [`Stats::deduplicated`](crate::Stats::deduplicated) and handed to the
    /// overflow handler as [`OverflowReason::Duplicate`].
    ///
    /// The promise: **every entry runs, or is dropped as the duplicate of a
    /// run of its key that begins after it was handed over**, or shares the
    /// fate of the twin it waited behind (that twin overflowed, was shed, was
    /// handed back by a shutdown or after an internal failure, or failed for
    /// good). Nothing is dropped as the duplicate of nothing, or of a run
    /// that had already begun. The entries themselves are your
    /// values, which the engine cannot tell apart: of twins, whichever a
    /// worker takes first runs, so the value that runs is the older one for
    /// back entries, and usually the front one otherwise:
    ///
    /// - A back hand-over (and an `init` entry) whose key waits is dropped
    ///   at once. A buffered twin counts as waiting: if a bounded queue
    ///   refuses it at the flush (`DropNewest`), what was dropped against it
    ///   shares its fate. Where the engine cannot be sure the twin still
    ///   waits (it is leaving as overflow, or it is on its way straight into
    ///   a bounded queue: a push, an `init` chunk, a run's new entries), the
    ///   entry is kept instead, and dropped if a worker reaches it after a
    ///   twin's run has begun. So is a failed run's retry, unless the bound
    ///   is enforced (`Reject`, `Block`: nothing admitted is refused).
    /// - A front hand-over is never dropped at once: it goes to the front,
    ///   so a waiting twin's work **moves to the front**. The twin stays
    ///   where it was, and is dropped as a duplicate when a worker reaches it
    ///   (counted and reported then). If the twin reaches a worker first (it
    ///   was queued while the front entry was still buffered, or it is a due
    ///   retry, which goes first), the twin runs and the front entry is the
    ///   one dropped.
    /// - An entry handed over while one with its key *runs* is queued again
    ///   (the running one may have read old data).
    ///
    /// A refused hand-over (`Stopped`, `Full`, `Timeout`) hands its
    /// duplicates back with the rest and counts none; a bound is checked
    /// against the whole hand-over, duplicates included (they are found once
    /// it is admitted).
    ///
    /// The key function is called outside every lock, as an entry comes in
    /// and again as it leaves, and **must give the same answer for an entry
    /// each time**: the same key, or a panic every time (the promise above
    /// rests on it; a key that changes into another waiting key, or a panic
    /// only now and then, can go unnoticed: nothing then panics, hangs or
    /// leaves unreported, but an entry of that key may be dropped as a
    /// duplicate wrongly); a panic in it keeps the entry, as if it had no
    /// key. Keys are hashed
    /// with std's SipHash, keyed at random (keys from outside cannot be
    /// chosen to collide), and dropped, outside every lock too; the key
    /// type's `Eq` runs under the key table's own lock (and, for a
    /// hand-over, the callers' lock) and must not call into the engine (a
    /// panic in it is caught there). If an entry's key cannot be computed as
    /// it leaves while other keys are recorded, the engine cannot tell which
    /// entry left, and from then on drops twins only as workers reach them
    /// (logged at warn). Where the table is seen to be wrong (a panic in
    /// `Eq`, a record found missing), de-duplication turns off for the rest
    /// of the engine's life, logged at error level: every entry is kept from
    /// then on, none is lost. Default: no de-duplication.
    ///
    /// ```
    /// use buffered_task::{Builder, FlushInterval, Outcome, Priority, Task};
    /// # struct T; impl Task for T { type Entry = (u64, String); type State = ();
    /// #   fn run(&self, _: &[(u64, String)], _: &()) -> Outcome<(u64, String), ()> { Outcome::Ok } }
    /// let handle = Builder::new(T, ())
    ///     .flush_interval(FlushInterval::Never)
    ///     .dedup_by_key(|(block, _source): &(u64, String)| *block)
    ///     .start()?;
    /// handle.buffer(vec![(7, "head".into()), (7, "reorg".into())], Priority::Back)?;
    /// assert_eq!(handle.stats().buffered, 1);
    /// assert_eq!(handle.stats().deduplicated, 1); // "reorg": at once
    /// handle.buffer(vec![(7, "urgent".into())], Priority::Front)?; // "head"'s place
    /// assert_eq!(handle.stats().buffered, 2);
    /// handle.shutdown_drain()?;
    /// assert_eq!(handle.stats().processed, 1); // one run for block 7: "urgent"
    /// assert_eq!(handle.stats().deduplicated, 2); // "head", as a worker reached it
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn dedup_by_key<Q>(mut self, key: impl Fn(&K::Entry) -> Q + Send + Sync + 'static) -> Self
    where
        Q: std::hash::Hash + Eq + Send + Sync + 'static,
    {
        self.dedup = Some(Box::new(KeyTable::new(Box::new(key))));
        self
    }

    /// Runs `hook` with the worker's index (0-based) on each worker thread
    /// before its first batch: e.g. to open one database connection per worker,
    /// kept where `run` finds it by [`worker_index`](crate::worker_index).
    /// Contained: a panic is logged and the worker runs on. Default: none.
    ///
    /// ```
    /// use buffered_task::{worker_index, Builder, Outcome, Task};
    /// use std::sync::{Arc, Mutex};
    ///
    /// /// One "connection" per worker.
    /// struct PerWorker(Arc<Vec<Mutex<Option<String>>>>);
    /// impl Task for PerWorker {
    ///     type Entry = u8;
    ///     type State = ();
    ///     fn run(&self, _: &[u8], _: &()) -> Outcome<u8, ()> {
    ///         let w = worker_index().expect("runs on a worker");
    ///         let conn = self.0[w].lock().unwrap();
    ///         assert_eq!(conn.as_deref(), Some(format!("conn-{w}").as_str()));
    ///         Outcome::Ok
    ///     }
    /// }
    /// let conns: Arc<Vec<_>> = Arc::new((0..2).map(|_| Mutex::new(None)).collect());
    /// let opener = conns.clone();
    /// let handle = Builder::new(PerWorker(conns), ())
    ///     .max_concurrency(2)
    ///     .on_worker_start(move |w| *opener[w].lock().unwrap() = Some(format!("conn-{w}")))
    ///     .on_worker_stop(|w| println!("worker {w} closes its connection"))
    ///     .start()?;
    /// handle.push_back(vec![1, 2, 3])?;
    /// handle.shutdown_drain()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn on_worker_start(mut self, hook: impl Fn(usize) + Send + Sync + 'static) -> Self {
        self.workers.start = Some(Box::new(hook));
        self
    }

    /// Runs `hook` with the worker's index on each worker thread after its last
    /// batch, when the engine stops (not for a thread let go at a shutdown
    /// deadline). Contained. Default: none.
    pub fn on_worker_stop(mut self, hook: impl Fn(usize) + Send + Sync + 'static) -> Self {
        self.workers.stop = Some(Box::new(hook));
        self
    }

    /// Names worker threads: `name(index)`. Default `<name>-worker-<index>`.
    pub fn worker_name(mut self, name: impl Fn(usize) -> String + Send + Sync + 'static) -> Self {
        self.workers.name = Some(Box::new(name));
        self
    }

    /// Stack size of each worker thread, in bytes. Default: the platform's
    /// (Rust's default, 2 MiB, unless `RUST_MIN_STACK` says otherwise).
    pub fn worker_stack_size(mut self, bytes: usize) -> Self {
        self.workers.stack_size = Some(bytes);
        self
    }

    /// Shows every batch's [`BatchRecord`] (size, wait, run time, how it ended,
    /// attempt, worker) to `observer`, called on the worker that ran it, after
    /// the run, outside every lock; a panic in it is caught and logged. With no
    /// observer (and neither the `metrics` nor the `tracing` feature), no
    /// record is made at all. Default: none.
    ///
    /// ```
    /// use buffered_task::{BatchKind, Builder, Outcome, Task};
    /// use std::sync::mpsc;
    /// # struct T; impl Task for T { type Entry = u8; type State = ();
    /// #   fn run(&self, _: &[u8], _: &()) -> Outcome<u8, ()> { Outcome::Ok } }
    /// let (tx, records) = mpsc::channel();
    /// let handle = Builder::new(T, ())
    ///     .on_batch(move |record| tx.send(record.clone()).unwrap())
    ///     .start()?;
    /// handle.push_back(vec![1, 2, 3])?;
    /// let record = records.recv()?;
    /// assert_eq!((record.size, record.kind, record.processed), (3, BatchKind::Ok, 3));
    /// handle.shutdown_drain()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn on_batch(mut self, observer: impl Fn(&BatchRecord) + Send + Sync + 'static) -> Self {
        self.observer = Some(Box::new(observer));
        self
    }

    /// Reads every timer (flush tick, idle poll, backoff, run deadline, shutdown
    /// and hand-over deadlines) from `clock`, which only moves when advanced:
    /// for tests that see timers fire without real waiting. Default: the
    /// system's monotonic clock.
    pub fn clock(mut self, clock: &ManualClock) -> Self {
        self.config.clock = Clock::Manual(clock.clone());
        self
    }

    fn validate(&self) -> Result<(), BuildError> {
        let c = &self.config;
        if c.max_batch_size == 0 {
            return Err(BuildError::ZeroBatchSize);
        }
        if c.max_concurrency == 0 {
            return Err(BuildError::ZeroConcurrency);
        }
        if c.max_concurrency > MAX_CONCURRENCY {
            return Err(BuildError::TooManyWorkers(c.max_concurrency));
        }
        if let Some((min, max)) = c.adaptive() {
            if min == 0 || min > max {
                return Err(BuildError::ConcurrencyRange(min, max));
            }
        }
        if c.flush_interval == FlushInterval::Every(Duration::ZERO) {
            return Err(BuildError::ZeroFlushInterval);
        }
        if c.run_deadline == Some(Duration::ZERO) {
            return Err(BuildError::ZeroRunDeadline);
        }
        if c.max_queue_len == Some(0) {
            return Err(BuildError::ZeroQueueLen);
        }
        if c.name.contains('\0') {
            return Err(BuildError::InvalidName(c.name.clone()));
        }
        Ok(())
    }

    /// Validates the settings and starts the engine's threads.
    ///
    /// # Errors
    ///
    /// A [`BuildError`] for an invalid setting, or when a thread cannot be started;
    /// then every thread already started is stopped and joined.
    pub fn start(self) -> Result<Handle<K::Entry>, BuildError> {
        self.validate()?;
        let Builder {
            task,
            state,
            mut config,
            overflow,
            weigher,
            monitor,
            retry,
            dead_letter,
            observer,
            workers,
            dedup,
        } = self;
        if config.max_queue_len.is_none() {
            config.overflow_policy = OverflowPolicy::DropNewest;
        }
        let parts = Parts {
            reporter: Reporter::new(
                config.name.clone(),
                overflow,
                dead_letter,
                config.clock.clone(),
            ),
            rules: retry.map(|(policy, same)| Rules { policy, same }),
            weigher,
            observer,
            workers,
            dedup: dedup.map(|mut table| {
                table.set_name(&config.name);
                table
            }),
        };
        let handle = Handle::new(engine::start(task, state, config, parts)?);
        if let Some(monitor) = monitor {
            monitor.register(&handle);
        }
        Ok(handle)
    }
}

impl<K: Task> std::fmt::Debug for Builder<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

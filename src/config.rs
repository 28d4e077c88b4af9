//! The builder: every option with its documented default, validated at start.

use crate::coordinator::{Coordinator, Shared};
use crate::error::BuildError;
use crate::handle::Handle;
use crate::pool::{self, Completion, Job, StateSlot};
use crate::retry::{DeadLetterHandler, DeadLetterReason, Retries, RetryPolicy, Same};
use crate::task::Task;
use crossbeam_channel::{bounded, unbounded};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often buffered entries are moved into the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushInterval {
    /// A ticker flushes every period (deadline-based: it does not drift), and a
    /// full batch's worth of buffered entries is flushed at once.
    Every(Duration),
    /// No ticker: only [`Handle::flush`](crate::Handle::flush) moves buffered entries.
    Never,
}

impl From<Duration> for FlushInterval {
    fn from(period: Duration) -> Self {
        FlushInterval::Every(period)
    }
}

/// Why entries left the engine without being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OverflowReason {
    /// The queue was at its maximum length.
    Full,
    /// A shrink (by hand or by the memory monitor) shed them.
    Shrink,
    /// The last handle was dropped without a shutdown, so they could not be run.
    Shutdown,
}

impl std::fmt::Display for OverflowReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverflowReason::Full => "queue full",
            OverflowReason::Shrink => "shrink",
            OverflowReason::Shutdown => "dropped without shutdown",
        })
    }
}

/// What happens when entries arrive for a bounded queue that is full.
///
/// Under `Reject` and `Block` the bound is enforced when entries are handed over
/// (counting buffered, queued and handed-out entries), so nothing already accepted
/// overflows: retried entries and buffered entries always reach the queue. A shrink
/// still sheds (to the overflow handler), and lowers the bound callers wait for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OverflowPolicy {
    /// Take what fits, hand the rest to the overflow handler (counted and logged):
    /// the original's behaviour, made visible. The default.
    #[default]
    DropNewest,
    /// A hand-over that does not fit fails at once with
    /// [`BufferError::Full`](crate::BufferError::Full), carrying its entries back.
    /// `init` streaming waits for room instead (there is no caller to hand back to).
    Reject,
    /// A hand-over waits until there is room (`buffer_timeout` gives up after its
    /// timeout with [`BufferError::Timeout`](crate::BufferError::Timeout)); `init`
    /// streaming waits too, so a huge source never overflows. With
    /// [`FlushInterval::Never`] buffered entries count until a `flush`, so a waiting
    /// caller needs another thread to flush. A call with more entries than the
    /// configured bound can never fit and fails with `Full`.
    Block,
}

/// Receives entries that leave the engine unprocessed (see [`OverflowReason`]).
/// Called on the coordinator thread, never under a lock; a panic in it is caught
/// and logged.
pub type OverflowHandler<T> = Box<dyn Fn(Vec<T>, OverflowReason) + Send + 'static>;

/// Reports how many heap bytes one entry owns, for memory accounting.
pub type Weigher<T> = Box<dyn Fn(&T) -> usize + Send + 'static>;

/// The validated settings the engine runs with.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) max_batch_size: usize,
    pub(crate) max_concurrency: usize,
    pub(crate) flush_interval: FlushInterval,
    pub(crate) poll: bool,
    pub(crate) idle_poll_delay: Duration,
    pub(crate) max_queue_len: Option<usize>,
    pub(crate) overflow_policy: OverflowPolicy,
    pub(crate) run_deadline: Option<Duration>,
}

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
pub struct Builder<K: Task> {
    task: K,
    state: K::State,
    config: Config,
    overflow: Option<OverflowHandler<K::Entry>>,
    weigher: Option<Weigher<K::Entry>>,
    monitor: Option<crate::monitor::MemoryMonitor>,
    retry: Option<(RetryPolicy, Same<K::Entry>)>,
    dead_letter: Option<DeadLetterHandler<K::Entry>>,
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
            },
            overflow: None,
            weigher: None,
            monitor: None,
            retry: None,
            dead_letter: None,
        }
    }

    /// Most entries per `run` call. Default 100; 0 is rejected by `start`.
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
    /// reason (the last panic message, or a requested retry). Default: none (they
    /// are counted in [`Stats::dead_lettered`](crate::Stats::dead_lettered) and
    /// logged at warn, then dropped).
    pub fn dead_letter_handler(
        mut self,
        handler: impl Fn(Vec<K::Entry>, DeadLetterReason) + Send + 'static,
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
    /// and the last handle dropped without a shutdown. Default: none (they are
    /// counted and logged at warn, then dropped).
    pub fn overflow_handler(
        mut self,
        handler: impl Fn(Vec<K::Entry>, OverflowReason) + Send + 'static,
    ) -> Self {
        self.overflow = Some(Box::new(handler));
        self
    }

    /// Reports the heap bytes one entry owns, added to `size_of::<Entry>()` when the
    /// memory monitor weighs this task. Default: none (entries own no heap memory).
    pub fn weigher(mut self, weigher: impl Fn(&K::Entry) -> usize + Send + 'static) -> Self {
        self.weigher = Some(Box::new(weigher));
        self
    }

    /// Registers the task with a memory monitor, which may shrink and expand its
    /// queue. Default: none.
    pub fn memory_monitor(mut self, monitor: &crate::monitor::MemoryMonitor) -> Self {
        self.monitor = Some(monitor.clone());
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
            config,
            overflow,
            weigher,
            monitor,
            retry,
            dead_letter,
        } = self;
        let task = Arc::new(task);
        let name = config.name.clone();
        let policy = match config.max_queue_len {
            Some(_) => config.overflow_policy,
            None => OverflowPolicy::DropNewest,
        };
        let shared = Arc::new(Shared::new(policy, config.max_queue_len, retry.is_some()));
        let (cmd_tx, cmd_rx) = unbounded();
        let state = Arc::new(StateSlot::new(state));
        // At most HAND_OUT batches per worker handed out (see `pool`).
        let (job_tx, job_rx) = bounded::<Job<K::Entry>>(pool::HAND_OUT * config.max_concurrency);
        let (done_tx, done_rx) = unbounded::<Completion<K::Entry>>();
        let (init_tx, init_rx) = bounded::<()>(1);

        let mut threads: Vec<JoinHandle<()>> = Vec::with_capacity(config.max_concurrency + 1);
        let started = (|| -> std::io::Result<()> {
            for i in 0..config.max_concurrency {
                let (task, state, shared) = (task.clone(), state.clone(), shared.clone());
                let (jobs, done) = (job_rx.clone(), done_tx.clone());
                threads.push(pool::spawn(format!("{name}-worker-{i}"), move || {
                    pool::worker(i, task, state, shared, jobs, done)
                })?);
            }
            let (task, state, commands) = (task.clone(), state.clone(), cmd_tx.clone());
            let shared = shared.clone();
            let chunk = config.max_batch_size;
            threads.push(pool::spawn(format!("{name}-init"), move || {
                pool::init_runner(task, state, init_rx, commands, chunk, shared)
            })?);
            Ok(())
        })();
        drop(done_tx);
        shared.buffers.lock().direct = Some(job_tx.clone());
        if let Err(err) = started {
            shared.buffers.lock().direct = None;
            drop((job_tx, job_rx, init_tx));
            join_all(threads);
            return Err(BuildError::Spawn(err));
        }

        let coordinator = Coordinator::<K>::new(
            config.clone(),
            shared.clone(),
            cmd_rx,
            job_tx,
            job_rx,
            done_rx,
            init_tx,
            threads,
            overflow,
            weigher,
            retry.map(|(policy, same)| Retries::new(policy, same)),
            dead_letter,
        );
        let handle = pool::spawn(format!("{name}-coordinator"), move || coordinator.run())
            .map_err(BuildError::Spawn)?;
        // (If that spawn failed, the closure and so the coordinator were dropped,
        // which closed its channels and joined the threads it owned.)
        let handle = Handle::new(shared, cmd_tx, handle, &config);
        if let Some(monitor) = monitor {
            monitor.register(&handle);
        }
        Ok(handle)
    }
}

pub(crate) fn join_all(threads: Vec<JoinHandle<()>>) {
    for t in threads {
        if t.join().is_err() {
            log::error!("an engine thread ended with a panic");
        }
    }
}

impl<K: Task> std::fmt::Debug for Builder<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

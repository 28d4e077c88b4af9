//! A thread-based batching work engine: any thread hands entries over, a fixed
//! pool of worker threads takes them in batches and runs them, retrying what
//! fails, and a coordinator thread keeps the timers. No async runtime.
//!
//! It is a port, made stricter, of blockscout's `Indexer.BufferedTask` (Elixir); the
//! README lists every deliberate difference.
//!
//! # Quick start
//!
//! Implement [`Task`]: `run` processes one batch, `init` (optional) streams the
//! work that exists at start. Then build an engine and hand it entries from any
//! thread through its [`Handle`].
//!
//! ```
//! use buffered_task::{Builder, Outcome, Priority, Sink, Task};
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::time::Duration;
//!
//! struct SumBlocks {
//!     total: AtomicU64,
//! }
//!
//! impl Task for SumBlocks {
//!     type Entry = u64; // a block number
//!     type State = ();
//!
//!     fn init(&self, sink: &mut Sink<u64>, _state: &()) {
//!         sink.extend(0..1_000); // the backlog known at start
//!     }
//!
//!     fn run(&self, blocks: &[u64], _state: &()) -> Outcome<u64, ()> {
//!         self.total.fetch_add(blocks.iter().sum::<u64>(), Ordering::Relaxed);
//!         Outcome::Ok
//!     }
//! }
//!
//! let handle = Builder::new(SumBlocks { total: AtomicU64::new(0) }, ())
//!     .name("blocks")
//!     .max_batch_size(100)
//!     .max_concurrency(4)
//!     .flush_interval(Duration::from_millis(50))
//!     .poll(false)
//!     .start()?;
//!
//! handle.buffer(vec![1_000, 1_001], Priority::Back)?; // from any thread
//! let report = handle.shutdown_drain()?; // run everything, then stop
//! assert!(report.unprocessed.is_empty());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Batching and flushing
//!
//! [`Handle::buffer`] puts entries into a *back* or *front* buffer and returns at
//! once: it never waits for the engine. A flush moves the buffers into the queue
//! and fills every free worker slot with a batch of at most `max_batch_size`.
//! Flushes happen:
//!
//! - on every tick of the flush interval (deadline-based, it does not drift);
//! - at once, when the buffers hold a full batch (a full batch never waits for the
//!   tick; partial batches do, so batching is kept);
//! - on [`Handle::flush`], which returns when the flush is done. With
//!   [`FlushInterval::Never`] this is the only way.
//!
//! [`Handle::push_back`] and [`Handle::push_front`] skip the buffers and go straight
//! into the queue.
//!
//! # Priority
//!
//! [`Priority::Back`] entries queue behind everything, first in first out across
//! calls. [`Priority::Front`] entries go ahead of everything already queued; the
//! front calls of one flush window keep their call order, and each call its own.
//!
//! ```
//! use buffered_task::{Builder, FlushInterval, Outcome, Priority, Task};
//! use std::sync::{Arc, Mutex};
//!
//! /// Records every batch it runs, in order.
//! struct Record(Arc<Mutex<Vec<u32>>>);
//! impl Task for Record {
//!     type Entry = u32;
//!     type State = ();
//!     fn run(&self, batch: &[u32], _: &()) -> Outcome<u32, ()> {
//!         self.0.lock().unwrap().extend_from_slice(batch);
//!         Outcome::Ok
//!     }
//! }
//!
//! let seen = Arc::new(Mutex::new(Vec::new()));
//! let handle = Builder::new(Record(seen.clone()), ())
//!     .flush_interval(FlushInterval::Never)
//!     .start()?;
//! handle.buffer(vec![3, 4], Priority::Back)?;
//! handle.buffer(vec![1, 2], Priority::Front)?;
//! handle.flush()?;
//! handle.shutdown_drain()?;
//! assert_eq!(*seen.lock().unwrap(), vec![1, 2, 3, 4]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Retries, state and panics
//!
//! `run` returns an [`Outcome`]: [`Outcome::Ok`], [`Outcome::OkWithState`] (the new
//! state is seen by batches dispatched afterwards), [`Outcome::Retry`] (the whole
//! batch), [`Outcome::RetryEntries`] (any list: a subset, or new entries) and
//! [`Outcome::RetryEntriesWithState`]. Retried entries go to the back of the queue.
//! A panic in `run` is caught, logged at error level with its message, and means
//! *retry the whole batch*; the worker thread lives on.
//!
//! # Bounded queue and memory limit
//!
//! [`Builder::max_queue_len`] bounds the queue. What does not fit is *overflow*:
//! never silent, it is counted, logged at warn, and handed to
//! [`Builder::overflow_handler`]. [`Handle::shrink`] sheds the back half of the
//! queue and bounds it there until [`Handle::expand`]; with `poll` on, `init` runs
//! again once the queue is empty, so shed work is found again at its source.
//!
//! A [`MemoryMonitor`] does this for you: it watches the process's memory and,
//! over its limit, shrinks the registered task holding the most queued memory
//! (then the next, while one is at its minimum size); back under 40% of the limit,
//! it expands them all.
//!
//! ```
//! use buffered_task::{Builder, MemoryMonitor, Outcome, Task};
//! use std::time::Duration;
//! # struct T; impl Task for T { type Entry = String; type State = ();
//! #   fn run(&self, _: &[String], _: &()) -> Outcome<String, ()> { Outcome::Ok } }
//!
//! let monitor = MemoryMonitor::builder()
//!     .limit_bytes(512 * 1024 * 1024)
//!     .check_interval(Duration::from_secs(60))
//!     .start()?;
//! let handle = Builder::new(T, ())
//!     .memory_monitor(&monitor)
//!     .weigher(|s: &String| s.capacity()) // heap bytes an entry owns
//!     .start()?;
//! assert_eq!(monitor.task_count(), 1);
//! drop(handle);
//! assert_eq!(monitor.task_count(), 0); // stopped tasks are forgotten
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Reliability: retry budgets, overflow policies, watchdog, stats
//!
//! By default a failing batch is retried for ever, at once, as in the original.
//! A [`RetryPolicy`] bounds that: attempt counts follow each entry, failed entries
//! wait an exponential backoff (with jitter) in a timer, and an entry out of
//! attempts goes to the dead-letter handler with the reason. An
//! [`OverflowPolicy`] chooses what a full bounded queue does: drop the newest
//! (reported), reject the hand-over (entries come back), or block the caller.
//! [`Builder::run_deadline`] reports `run` calls that do not return, and
//! [`Handle::stats`] is a cheap snapshot of every counter.
//!
//! ```
//! use buffered_task::{Builder, DeadLetterReason, OverflowPolicy, Outcome, RetryPolicy, Task};
//! use std::sync::mpsc;
//! use std::time::Duration;
//!
//! struct Flaky;
//! impl Task for Flaky {
//!     type Entry = u32;
//!     type State = ();
//!     fn run(&self, batch: &[u32], _: &()) -> Outcome<u32, ()> {
//!         // Odd entries never succeed.
//!         Outcome::RetryEntries(batch.iter().copied().filter(|e| e % 2 == 1).collect())
//!     }
//! }
//!
//! let (dead_tx, dead) = mpsc::channel();
//! let handle = Builder::new(Flaky, ())
//!     .max_queue_len(10_000)
//!     .overflow_policy(OverflowPolicy::Block)
//!     .retry_policy(RetryPolicy::new(3).backoff(Duration::from_millis(1), Duration::from_millis(10)))
//!     .dead_letter_handler(move |entries, reason| dead_tx.send((entries, reason)).unwrap())
//!     .run_deadline(Duration::from_secs(30))
//!     .start()?;
//! handle.push_back(vec![1, 2])?;
//! let (entries, reason) = dead.recv()?; // 1 ran three times
//! assert_eq!((entries, reason), (vec![1], DeadLetterReason::RetryRequested));
//! handle.shutdown_drain()?;
//! let stats = handle.stats();
//! assert_eq!((stats.processed, stats.dead_lettered), (1, 1)); // 2 was let go at once
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Shutdown
//!
//! [`Handle::shutdown_drain`] runs everything left and stops;
//! [`Handle::shutdown_return`] waits for the running batches and hands every
//! unprocessed entry back; [`Handle::shutdown_timeout`] drains until a deadline,
//! then hands back everything not started and returns by that deadline even if
//! a `run` never returns (the report counts the entries still running; see its
//! docs for what happens to them). Either way, a call made afterwards fails with
//! an error that carries its entries back, and [`Handle::stats`] shows the final
//! figures. Dropping the last handle stops the engine too, handing what is left
//! to the overflow handler (or counting and logging it). Every thread the engine
//! started is joined, except one still inside a `run` or an `init` when a
//! shutdown deadline passes, which is let go.
//!
//! # Options for busy services
//!
//! Each has a runnable example on its method:
//!
//! - [`Builder::batching`] with [`Batching::Natural`]: a free worker takes
//!   whatever is buffered at once; under load, batches fill by themselves.
//! - [`Handle::wait_idle`]: wait until everything handed over so far has left
//!   the engine (a "force flush"), without stopping it.
//! - [`Builder::on_batch`]: a [`BatchRecord`] per run (size, wait, run time,
//!   how it ended, the error); with the `metrics` feature, counters, gauges and
//!   histograms through the `metrics` facade; with `tracing`, a span per run;
//!   with `serde`, the stats and records serialize.
//! - [`Outcome::Fail`] and [`Outcome::FailEntries`]: failures that carry an
//!   error to the logs, the observer and the dead-letter handler
//!   ([`DeadLetterReason::Failed`]); `Result<(), E>` converts into an outcome.
//! - [`Builder::on_worker_start`] / [`Builder::on_worker_stop`] (with
//!   [`worker_index`]), [`Builder::worker_name`], [`Builder::worker_stack_size`].
//! - `par_each` (the `rayon` feature, on by default): per-entry CPU work inside
//!   a batch on a rayon pool, retrying only the entries that fail.
//! - [`Builder::dedup_by_key`]: an entry whose key already waits is not queued
//!   again; a front one moves the work to the front.
//! - [`Builder::adaptive_concurrency`]: how many batches run at once follows
//!   the backend (AIMD).
//!
//! # Calls from inside the engine
//!
//! `run`, `init` and the handlers may call any method of the engine's own
//! [`Handle`] (hold a [`WeakHandle`] in the task, so that the engine can be
//! dropped). A call that would have to wait for the very thread it runs on fails
//! at once instead: the shutdowns with [`ControlError::WouldDeadlock`], and a
//! hand-over that would wait for room under [`OverflowPolicy::Block`] with
//! [`BufferError::Full`].
//!
//! ```
//! use buffered_task::{Builder, ControlError, Outcome, Task, WeakHandle};
//! use std::sync::{mpsc, Arc, Mutex};
//!
//! /// Tries to shut its own engine down from inside `run`.
//! struct Impatient {
//!     /// Filled once the engine exists.
//!     me: Arc<Mutex<Option<WeakHandle<u32>>>>,
//!     answers: Mutex<mpsc::Sender<Option<ControlError>>>,
//! }
//! impl Task for Impatient {
//!     type Entry = u32;
//!     type State = ();
//!     fn run(&self, _: &[u32], _: &()) -> Outcome<u32, ()> {
//!         let me = self.me.lock().unwrap().as_ref().and_then(WeakHandle::upgrade);
//!         if let Some(me) = me {
//!             let answer = me.shutdown_drain().err(); // it would wait for itself
//!             self.answers.lock().unwrap().send(answer).unwrap();
//!         }
//!         Outcome::Ok
//!     }
//! }
//! let (tx, answers) = mpsc::channel();
//! let me = Arc::new(Mutex::new(None));
//! let task = Impatient { me: me.clone(), answers: Mutex::new(tx) };
//! let handle = Builder::new(task, ()).start()?;
//! *me.lock().unwrap() = Some(handle.downgrade());
//! handle.push_back(vec![1])?;
//! assert_eq!(answers.recv()?, Some(ControlError::WouldDeadlock));
//! handle.shutdown_drain()?; // from outside, it works
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # When the engine itself fails
//!
//! User code is contained: a panic in `run`, `init`, a handler, a weigher, a
//! memory probe or the drop of an entry or a state is caught and logged, and the
//! thread lives on. If an engine thread panics anyway (a bug in this crate), the
//! engine stops taking work: later hand-overs fail with their entries, the
//! entries it held go back in the next shutdown's report (or to the overflow
//! handler when the last handle is dropped), the panic is logged at error level,
//! and every shutdown and drop returns.
//!
//! # Time in tests
//!
//! Every timer (the flush tick, the idle poll, retry backoff, the run deadline,
//! the shutdown deadline, the memory monitor's interval) reads the engine's
//! clock. A [`ManualClock`] moves only when a test advances it, and
//! [`ManualClock::advance`] returns once the engine has acted on the new time:
//!
//! ```
//! use buffered_task::{Builder, ManualClock, Outcome, Priority, Task};
//! use std::sync::mpsc;
//! use std::time::Duration;
//!
//! struct Send(std::sync::Mutex<mpsc::Sender<Vec<u8>>>);
//! impl Task for Send {
//!     type Entry = u8;
//!     type State = ();
//!     fn run(&self, batch: &[u8], _: &()) -> Outcome<u8, ()> {
//!         self.0.lock().unwrap().send(batch.to_vec()).unwrap();
//!         Outcome::Ok
//!     }
//! }
//! let clock = ManualClock::new();
//! let (tx, ran) = mpsc::channel();
//! let handle = Builder::new(Send(std::sync::Mutex::new(tx)), ())
//!     .flush_interval(Duration::from_secs(60))
//!     .clock(&clock)
//!     .start()?;
//! handle.buffer(vec![7], Priority::Back)?; // a partial batch waits for the tick
//! clock.advance(Duration::from_secs(59));
//! assert_eq!(handle.stats().buffered, 1); // not yet
//! clock.advance(Duration::from_secs(1)); // the tick: flushed, at once
//! assert_eq!(ran.recv()?, vec![7]);
//! handle.shutdown_drain()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # More in the README
//!
//! - [How it works](https://github.com/buffered-task/buffered-task/blob/main/README.md#how-it-works): buffers, queue, workers and the
//!   coordinator, step by step.
//! - [Guarantees](https://github.com/buffered-task/buffered-task/blob/main/README.md#guarantees): each promise with the tests that prove it.
//! - [Performance](https://github.com/buffered-task/buffered-task/blob/main/README.md#performance): measured figures against baselines in
//!   the same run, what the time goes to, and
//!   [how it scales with workers](https://github.com/buffered-task/buffered-task/blob/main/README.md#scaling-with-workers).
//! - [Memory limit](https://github.com/buffered-task/buffered-task/blob/main/README.md#memory-limit): the monitor, the default probe and
//!   the cgroup-aware default limit.
//! - [Scaling out](https://github.com/buffered-task/buffered-task/blob/main/README.md#scaling-out): `buffered-task-pg`, a PostgreSQL queue
//!   that many processes share.
//! - [Differences from the original](https://github.com/buffered-task/buffered-task/blob/main/README.md#differences-from-the-original).
//! - [Examples](https://github.com/buffered-task/buffered-task/blob/main/README.md#quick-start): the demo, a JSON-RPC indexer, a scheduler.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

/// Every code block of the README runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

mod adaptive;
mod clock;
mod config;
mod coordinator;
mod dedup;
mod engine;
mod error;
mod fault;
mod handle;
mod intake;
mod monitor;
mod observe;
mod overflow;
#[cfg(feature = "rayon")]
mod par;
mod pool;
mod queue;
mod retry;
mod settings;
mod shutdown;
mod stats;
mod store;
mod task;
mod threads;
mod unwind;

#[cfg(test)]
mod tests;

pub use clock::ManualClock;
pub use config::Builder;
pub use error::{BufferError, BuildError, ControlError, IdleError, ShrinkError};
pub use handle::{Handle, WeakHandle};
pub use monitor::{
    cgroup_memory_limit, total_memory, CheckOutcome, MemoryMonitor, MemoryProbe, MonitorBuilder,
    ProcessRss, Shrinkable, FALLBACK_LIMIT,
};
pub use observe::{BatchKind, BatchObserver, BatchRecord};
pub use overflow::{OverflowHandler, OverflowPolicy, OverflowReason, Weigher};
#[cfg(feature = "rayon")]
pub use par::{par_each, par_each_in};
/// The rayon this crate's `par_each` uses (the `rayon` feature, on by default).
#[cfg(feature = "rayon")]
pub use rayon;
pub use retry::{DeadLetterHandler, DeadLetterReason, RetryPolicy};
pub use settings::{Batching, FlushInterval, MAX_CONCURRENCY};
pub use shutdown::ShutdownReport;
pub use stats::{DebugCount, Stats};
pub use task::{Outcome, Priority, RunError, Sink, Task};
pub use threads::{worker_index, WorkerHook};

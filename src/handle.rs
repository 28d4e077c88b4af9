//! The cloneable handle: hand entries over, flush, inspect, shrink, shut down.

use crate::config::{Config, FlushInterval, OverflowPolicy};
use crate::coordinator::{Command, Shared};
use crate::error::{BufferError, ControlError, ShrinkError};
use crate::pool;
use crate::task::Priority;
use crossbeam_channel::{bounded, Receiver, Sender};
use parking_lot::Mutex;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Exact counts of the work inside an engine, from [`Handle::debug_count`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct DebugCount {
    /// Entries waiting: both buffers plus the queue.
    pub waiting: usize,
    /// Batches running now.
    pub running: usize,
}

/// A snapshot of an engine's counters, from [`Handle::stats`]. Cheap: read from
/// atomics and two short locks, without asking the coordinator, so the figures are
/// each exact but not taken at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Stats {
    /// Entries in the buffers, waiting for a flush.
    pub buffered: usize,
    /// Entries in the queue, or handed to a worker and not started.
    pub queued: usize,
    /// Batches running now.
    pub running: usize,
    /// Entries done: those of batches whose `run` returned `Ok` or
    /// `OkWithState`, and those a `RetryEntries` let go (counted as the batch's
    /// size less the entries handed back, exact when those come from the batch).
    pub processed: u64,
    /// Entries sent back to the queue by a retry outcome or a panic.
    pub retried: u64,
    /// `run` calls that panicked.
    pub panicked: u64,
    /// Entries dropped because the queue was full.
    pub overflowed_full: u64,
    /// Entries shed by a shrink.
    pub overflowed_shrink: u64,
    /// Entries handed to the overflow handler because the last handle was dropped.
    pub overflowed_shutdown: u64,
    /// Entries whose attempts were spent under the retry policy.
    pub dead_lettered: u64,
    /// How long the oldest waiting entry has waited (`None`: nothing waits): the
    /// oldest of the buffered entries, the batches handed to workers and not
    /// started, and the batch at the head of the queue. The head is the oldest
    /// queued entry except where front entries, retries or recalled batches were
    /// put ahead of older ones (their wait counts from when they were put back).
    pub oldest_wait: Option<Duration>,
    /// Runs that passed the run deadline (see
    /// [`Builder::run_deadline`](crate::Builder::run_deadline)), counted once each.
    pub stuck_runs: u64,
}

/// How a shutdown treats work that has not run yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShutdownMode {
    /// Run everything left, then stop.
    Drain,
    /// Run what can be run before the deadline, then hand back the rest.
    DrainUntil(Instant),
    /// Wait for running batches, then hand every unprocessed entry back.
    Return,
    /// The last handle was dropped: hand what is left to the overflow handler.
    Abandon,
}

/// What a shutdown hands back.
#[derive(Debug)]
#[non_exhaustive]
pub struct ShutdownReport<T> {
    /// Entries that were not processed, in queue order (front buffer, queue, back
    /// buffer). Empty after a completed drain.
    pub unprocessed: Vec<T>,
    /// Entries that overflowed (queue full or shed by a shrink) over the engine's life.
    pub overflowed: u64,
    /// Entries processed (their `run` returned `Ok`) between the shutdown call and
    /// the end.
    pub drained: u64,
}

struct Inner<T> {
    shared: Arc<Shared<T>>,
    commands: Sender<Command<T>>,
    coordinator: Mutex<Option<JoinHandle<()>>>,
    /// Whether a full batch in the buffers triggers a flush at once.
    auto_flush: bool,
    max_batch_size: usize,
    name: String,
}

/// A handle to a running engine. Cheap to clone; every clone may be used from any
/// thread. Dropping the last one shuts the engine down (see [`Handle::shutdown_return`]
/// for what happens to the work left).
pub struct Handle<T> {
    inner: Arc<Inner<T>>,
}

impl<T> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Handle {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

/// A handle that does not keep the engine alive: for a task that buffers into its
/// own engine, which would otherwise never be dropped.
pub struct WeakHandle<T> {
    inner: Weak<Inner<T>>,
}

impl<T> WeakHandle<T> {
    /// The handle, while some strong handle still exists.
    pub fn upgrade(&self) -> Option<Handle<T>> {
        self.inner.upgrade().map(|inner| Handle { inner })
    }
}

impl<T> Clone for WeakHandle<T> {
    fn clone(&self) -> Self {
        WeakHandle {
            inner: self.inner.clone(),
        }
    }
}

impl<T> fmt::Debug for WeakHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakHandle")
    }
}

impl<T: Send + 'static> Handle<T> {
    pub(crate) fn new(
        shared: Arc<Shared<T>>,
        commands: Sender<Command<T>>,
        coordinator: JoinHandle<()>,
        config: &Config,
    ) -> Self {
        Handle {
            inner: Arc::new(Inner {
                shared,
                commands,
                coordinator: Mutex::new(Some(coordinator)),
                auto_flush: matches!(config.flush_interval, FlushInterval::Every(_)),
                max_batch_size: config.max_batch_size,
                name: config.name.clone(),
            }),
        }
    }

    /// A [`WeakHandle`] to this engine.
    pub fn downgrade(&self) -> WeakHandle<T> {
        WeakHandle {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// The name given at build time.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Hands `entries` to the engine: they wait in the back or front buffer until the
    /// next flush. Returns as soon as the engine owns them; it never waits for the
    /// coordinator. With a flush ticker, a full batch's worth of buffered entries is
    /// flushed at once; partial batches wait for the tick. An empty list is a no-op.
    ///
    /// # Errors
    ///
    /// [`BufferError::Stopped`] with the entries when the engine has shut down.
    ///
    /// # Examples
    ///
    /// ```
    /// # use buffered_task::{Builder, FlushInterval, Outcome, Priority, Task};
    /// # struct T; impl Task for T { type Entry = u8; type State = ();
    /// #   fn run(&self, _: &[u8], _: &()) -> Outcome<u8, ()> { Outcome::Ok } }
    /// let handle = Builder::new(T, ()).flush_interval(FlushInterval::Never).start()?;
    /// handle.buffer(vec![1, 2], Priority::Back)?;
    /// handle.buffer(vec![0], Priority::Front)?; // runs before 1 and 2
    /// handle.flush()?;
    /// let report = handle.shutdown_return()?;
    /// assert!(report.unprocessed.len() <= 3);
    /// assert!(handle.buffer(vec![3], Priority::Back).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn buffer(&self, entries: Vec<T>, priority: Priority) -> Result<(), BufferError<T>> {
        if entries.is_empty() {
            return Ok(());
        }
        let buffers = self.inner.shared.buffers.lock();
        self.buffer_locked(buffers, Entries::Many(entries), priority, None)
    }

    /// Hands one entry to the engine, without allocating a `Vec` for it. Otherwise as
    /// [`Handle::buffer`].
    ///
    /// # Errors
    ///
    /// [`BufferError::Stopped`] with the entry when the engine has shut down.
    pub fn buffer_one(&self, entry: T, priority: Priority) -> Result<(), BufferError<T>> {
        let buffers = self.inner.shared.buffers.lock();
        self.buffer_locked(buffers, Entries::One(entry), priority, None)
    }

    /// As [`Handle::buffer`], but gives up after `timeout` if the buffers cannot be
    /// reached (another thread holds them).
    ///
    /// # Errors
    ///
    /// [`BufferError::Timeout`] or [`BufferError::Stopped`], each with the entries.
    pub fn buffer_timeout(
        &self,
        entries: Vec<T>,
        priority: Priority,
        timeout: Duration,
    ) -> Result<(), BufferError<T>> {
        if entries.is_empty() {
            return Ok(());
        }
        let deadline = Instant::now() + timeout;
        match self.inner.shared.buffers.try_lock_until(deadline) {
            Some(buffers) => {
                self.buffer_locked(buffers, Entries::Many(entries), priority, Some(deadline))
            }
            None => Err(BufferError::Timeout(entries)),
        }
    }

    fn buffer_locked(
        &self,
        mut buffers: parking_lot::MutexGuard<'_, crate::coordinator::Buffers<T>>,
        entries: Entries<T>,
        priority: Priority,
        deadline: Option<Instant>,
    ) -> Result<(), BufferError<T>> {
        if let Err(refusal) = self.inner.admit(&mut buffers, entries.len(), deadline) {
            return Err(refusal.with(entries.into_vec()));
        }
        if buffers.since.is_none() {
            buffers.since = Some(Instant::now());
        }
        let target = match priority {
            Priority::Back => &mut buffers.back,
            Priority::Front => &mut buffers.front,
        };
        let batch = self.inner.max_batch_size;
        match entries {
            Entries::One(entry) => target.push_one(entry, batch),
            Entries::Many(v) => target.push_vec(v, batch),
        }
        if self.inner.auto_flush {
            self.hand_out_directly(&mut buffers);
        }
        let notify = self.inner.auto_flush
            && !buffers.flush_requested
            && buffers.len() >= self.inner.max_batch_size;
        if notify {
            buffers.flush_requested = true;
        }
        drop(buffers);
        if notify {
            // The coordinator only stops after `closed` is set, which we saw unset.
            let _ = self.inner.commands.send(Command::Flush(None));
        }
        Ok(())
    }

    /// With a full batch buffered while the engine has nothing queued, hands that
    /// batch to a worker at once: the coordinator would only take it from the
    /// buffers and pass it on, a thread wake-up later. The coordinator learns of it
    /// from a counter, and can recall it like any batch it handed out itself.
    fn hand_out_directly(
        &self,
        buffers: &mut parking_lot::MutexGuard<'_, crate::coordinator::Buffers<T>>,
    ) {
        let shared = &self.inner.shared;
        let n = self.inner.max_batch_size;
        if !buffers.front.is_empty()
            || buffers.back.len() < n
            || buffers.direct.is_none()
            || shared.counters.queued.load(Ordering::SeqCst) != 0
            || shared.pending.load(Ordering::SeqCst) != 0
            || shared.halt.load(Ordering::SeqCst)
        {
            return;
        }
        let since = buffers.since.unwrap_or_else(Instant::now);
        let Some(batch) = buffers.back.take_batch(n) else {
            return;
        };
        if buffers.len() == 0 {
            buffers.since = None;
        }
        {
            let mut p = shared.progress.lock();
            p.prefetched += n;
            p.handed.push_back(since);
        }
        shared.direct_batches.fetch_add(1, Ordering::SeqCst);
        let sent = match &buffers.direct {
            Some(jobs) => jobs.try_send(crate::pool::Job {
                batch,
                attempts: None,
            }),
            None => return,
        };
        if let Err(err) = sent {
            // No room in the hand-out channel: leave it to the coordinator. The
            // hand-out is already counted (the coordinator may have seen it), so
            // count it done as well.
            shared.done_batches.fetch_add(1, Ordering::SeqCst);
            {
                let mut p = shared.progress.lock();
                p.prefetched -= n;
                p.handed.pop_back();
            }
            buffers.back.put_front(err.into_inner().batch);
            if buffers.since.is_none() {
                buffers.since = Some(since);
            }
        }
    }

    /// Puts entries straight at the back of the queue (skipping the buffers) and
    /// dispatches. Does not wait for the engine.
    ///
    /// # Errors
    ///
    /// [`BufferError::Stopped`] with the entries when the engine has shut down.
    pub fn push_back(&self, entries: Vec<T>) -> Result<(), BufferError<T>> {
        self.push(entries, Priority::Back)
    }

    /// Puts entries straight at the front of the queue, in their order, and
    /// dispatches. Does not wait for the engine.
    ///
    /// # Errors
    ///
    /// [`BufferError::Stopped`] with the entries when the engine has shut down.
    pub fn push_front(&self, entries: Vec<T>) -> Result<(), BufferError<T>> {
        self.push(entries, Priority::Front)
    }

    fn push(&self, entries: Vec<T>, priority: Priority) -> Result<(), BufferError<T>> {
        if entries.is_empty() {
            return Ok(());
        }
        // Sent under the lock, so a shutdown (which closes under it) finds every
        // accepted push already in its channel.
        let mut buffers = self.inner.shared.buffers.lock();
        if let Err(refusal) = self.inner.admit(&mut buffers, entries.len(), None) {
            return Err(refusal.with(entries));
        }
        let n = entries.len();
        self.inner.shared.pending.fetch_add(n, Ordering::SeqCst);
        match self.inner.commands.send(Command::Push(entries, priority)) {
            Ok(()) => Ok(()),
            Err(err) => {
                self.inner.shared.pending.fetch_sub(n, Ordering::SeqCst);
                match err.0 {
                    Command::Push(v, _) => Err(BufferError::Stopped(v)),
                    _ => unreachable!("sent a push"),
                }
            }
        }
    }

    /// Moves the buffered entries into the queue and fills the free slots; returns
    /// once the engine has done so.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine has shut down.
    pub fn flush(&self) -> Result<(), ControlError> {
        self.ask(|reply| Command::Flush(Some(reply)), None)
    }

    /// As [`Handle::flush`], giving up after `timeout`.
    ///
    /// # Errors
    ///
    /// [`ControlError::Timeout`] or [`ControlError::Stopped`].
    pub fn flush_timeout(&self, timeout: Duration) -> Result<(), ControlError> {
        self.ask(|reply| Command::Flush(Some(reply)), Some(timeout))
    }

    /// Runs `init` now: for a source that learns of new work, e.g. a database
    /// notification, instead of waiting for the next poll. If `init` is running,
    /// it runs once more when it returns (it may have looked before the new work
    /// arrived). Does not wait for the engine.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine has shut down.
    pub fn poll_now(&self) -> Result<(), ControlError> {
        if self.inner.shared.buffers.lock().closed {
            return Err(ControlError::Stopped);
        }
        self.inner
            .commands
            .send(Command::PollNow)
            .map_err(|_| ControlError::Stopped)
    }

    /// Exact counts: entries waiting (buffers and queue) and batches running.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine has shut down.
    pub fn debug_count(&self) -> Result<DebugCount, ControlError> {
        self.ask(Command::Count, None)
    }

    /// Sheds the back half of the queue (to the overflow handler) and bounds the
    /// queue at the half kept, until [`Handle::expand`].
    ///
    /// # Errors
    ///
    /// [`ShrinkError::MinimumSize`] when 0 or 1 entries are queued;
    /// [`ShrinkError::Stopped`] when the engine has shut down.
    pub fn shrink(&self) -> Result<(), ShrinkError> {
        self.ask(Command::Shrink, None)?
    }

    /// Lifts a shrink: the queue's bound goes back to the configured one (or none).
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine has shut down.
    pub fn expand(&self) -> Result<(), ControlError> {
        self.ask(Command::Expand, None)
    }

    /// Whether a shrink is in force.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine has shut down.
    pub fn is_shrunk(&self) -> Result<bool, ControlError> {
        self.ask(Command::IsShrunk, None)
    }

    /// Bytes the queued entries occupy: entries × `size_of::<T>()` plus what the
    /// weigher reports.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine has shut down.
    pub fn memory_usage(&self) -> Result<usize, ControlError> {
        self.ask(Command::Memory, None)
    }

    /// Whether the engine has been shut down (or a shutdown has begun).
    pub fn is_stopped(&self) -> bool {
        self.inner.shared.buffers.lock().closed
    }

    /// Stops taking entries, runs everything left (buffered, queued, retried, and
    /// what a running `init` still streams), waits for it, and stops the threads.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine was already shut down.
    pub fn shutdown_drain(&self) -> Result<ShutdownReport<T>, ControlError> {
        self.inner.shutdown(ShutdownMode::Drain)
    }

    /// Stops taking entries, waits for the running batches (and a running `init`,
    /// which is told to stop through [`Sink::is_stopping`](crate::Sink::is_stopping)),
    /// then hands every unprocessed entry back in the report.
    ///
    /// Dropping the last handle does the same, but hands the entries to the overflow
    /// handler (reason [`OverflowReason::Shutdown`](crate::OverflowReason::Shutdown)),
    /// or counts and logs them at warn when there is none.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine was already shut down.
    pub fn shutdown_return(&self) -> Result<ShutdownReport<T>, ControlError> {
        self.inner.shutdown(ShutdownMode::Return)
    }

    /// Runs what it can until `timeout` has passed, then waits for the running
    /// batches and hands every entry not processed back in the report, which also
    /// says how many were processed during the shutdown (`drained`).
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when the engine was already shut down.
    pub fn shutdown_timeout(&self, timeout: Duration) -> Result<ShutdownReport<T>, ControlError> {
        self.inner
            .shutdown(ShutdownMode::DrainUntil(Instant::now() + timeout))
    }

    /// A snapshot of the engine's counters; cheap enough for a metrics scrape.
    /// Still answers after a shutdown (the final figures).
    pub fn stats(&self) -> Stats {
        let shared = &self.inner.shared;
        let (buffered, buffered_since) = {
            let b = shared.buffers.lock();
            (b.len(), b.since)
        };
        let now = Instant::now();
        let head = match shared.head_since.load(Ordering::Relaxed) {
            0 => None,
            n => Some(now.saturating_duration_since(shared.born + Duration::from_nanos(n - 1))),
        };
        let (prefetched, running, handed_since) = {
            let p = shared.progress.lock();
            (p.prefetched, p.running, p.handed.front().copied())
        };
        let oldest_wait = [
            buffered_since.map(|t| now.saturating_duration_since(t)),
            head,
            handed_since.map(|t| now.saturating_duration_since(t)),
        ]
        .into_iter()
        .flatten()
        .max();
        let c = &shared.counters;
        Stats {
            buffered,
            queued: c.queued.load(Ordering::Relaxed) + prefetched,
            running,
            processed: c.processed.load(Ordering::Relaxed),
            retried: c.retried.load(Ordering::Relaxed),
            panicked: c.panicked.load(Ordering::Relaxed),
            overflowed_full: c.overflow_full.load(Ordering::Relaxed),
            overflowed_shrink: c.overflow_shrink.load(Ordering::Relaxed),
            overflowed_shutdown: c.overflow_shutdown.load(Ordering::Relaxed),
            stuck_runs: c.stuck.load(Ordering::Relaxed),
            oldest_wait,
            dead_lettered: c.dead_lettered.load(Ordering::Relaxed),
        }
    }

    fn ask<R>(
        &self,
        make: impl FnOnce(Sender<R>) -> Command<T>,
        timeout: Option<Duration>,
    ) -> Result<R, ControlError> {
        let (tx, rx) = bounded(1);
        self.inner
            .commands
            .send(make(tx))
            .map_err(|_| ControlError::Stopped)?;
        wait(&rx, timeout)
    }
}

fn wait<R>(rx: &Receiver<R>, timeout: Option<Duration>) -> Result<R, ControlError> {
    match timeout {
        None => rx.recv().map_err(|_| ControlError::Stopped),
        Some(t) => rx.recv_deadline(Instant::now() + t).map_err(|e| match e {
            crossbeam_channel::RecvTimeoutError::Timeout => ControlError::Timeout,
            crossbeam_channel::RecvTimeoutError::Disconnected => ControlError::Stopped,
        }),
    }
}

/// Why a hand-over was refused.
enum Refusal {
    Stopped,
    Full,
    Timeout,
}

impl<T> Inner<T> {
    /// Under an enforced bound (`Reject`, `Block`): whether `n` more entries may be
    /// handed over now; `Block` waits for room, until `deadline` if one is given.
    fn admit(
        &self,
        buffers: &mut parking_lot::MutexGuard<'_, crate::coordinator::Buffers<T>>,
        n: usize,
        deadline: Option<Instant>,
    ) -> Result<(), Refusal> {
        let shared = &self.shared;
        if buffers.closed {
            return Err(Refusal::Stopped);
        }
        if !shared.admits() {
            return Ok(());
        }
        if n > shared.configured_max {
            return Err(Refusal::Full);
        }
        loop {
            if buffers.closed {
                return Err(Refusal::Stopped);
            }
            if shared.waiting(buffers.len()) + n <= shared.bound.load(Ordering::SeqCst) {
                return Ok(());
            }
            if shared.policy == OverflowPolicy::Reject {
                return Err(Refusal::Full);
            }
            match deadline {
                None => shared.room.wait(buffers),
                Some(when) => {
                    if shared.room.wait_until(buffers, when).timed_out()
                        && shared.waiting(buffers.len()) + n > shared.bound.load(Ordering::SeqCst)
                    {
                        return Err(Refusal::Timeout);
                    }
                }
            }
        }
    }
}

enum Entries<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Entries<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            Entries::One(e) => vec![e],
            Entries::Many(v) => v,
        }
    }

    fn len(&self) -> usize {
        match self {
            Entries::One(_) => 1,
            Entries::Many(v) => v.len(),
        }
    }
}

impl Refusal {
    fn with<T>(self, entries: Vec<T>) -> BufferError<T> {
        match self {
            Refusal::Stopped => BufferError::Stopped(entries),
            Refusal::Full => BufferError::Full(entries),
            Refusal::Timeout => BufferError::Timeout(entries),
        }
    }
}

impl<T> Inner<T> {
    fn shutdown(&self, mode: ShutdownMode) -> Result<ShutdownReport<T>, ControlError> {
        let processed_before = self.shared.counters.processed.load(Ordering::SeqCst);
        let (tx, rx) = bounded(1);
        {
            let mut buffers = self.shared.buffers.lock();
            if buffers.closed {
                return Err(ControlError::Stopped);
            }
            if matches!(mode, ShutdownMode::Return | ShutdownMode::Abandon) {
                self.shared.halt.store(true, Ordering::Relaxed);
            }
            buffers.closed = true;
            self.shared.room.notify_all();
            // Under the lock, so every push accepted before the close is ahead of it.
            self.commands
                .send(Command::Shutdown(mode, tx))
                .map_err(|_| ControlError::Stopped)?;
        }
        let report = rx
            .recv()
            .map_err(|_| ControlError::Stopped)
            .map(|r| ShutdownReport {
                drained: self
                    .shared
                    .counters
                    .processed
                    .load(Ordering::SeqCst)
                    .saturating_sub(processed_before),
                ..r
            });
        if let Some(thread) = self.coordinator.lock().take() {
            if thread.join().is_err() {
                log::error!("{}: the coordinator thread panicked", self.name);
            }
        }
        report
    }
}

impl<T> Drop for Inner<T> {
    fn drop(&mut self) {
        let Some(thread) = self.coordinator.get_mut().take() else {
            return;
        };
        let (tx, rx) = bounded(1);
        {
            let mut buffers = self.shared.buffers.lock();
            if !buffers.closed {
                self.shared.halt.store(true, Ordering::Relaxed);
                buffers.closed = true;
                self.shared.room.notify_all();
                let _ = self
                    .commands
                    .send(Command::Shutdown(ShutdownMode::Abandon, tx));
            }
        }
        if pool::on_engine_thread() {
            // Dropped by the engine's own code (a task holding its last handle): the
            // coordinator may be waiting for this very thread, so joining here would
            // deadlock. It stops on its own; its handle is let go.
            log::warn!(
                "{}: last handle dropped on an engine thread; the engine stops without being joined",
                self.name
            );
            drop(thread);
            return;
        }
        let _ = rx.recv();
        if thread.join().is_err() {
            log::error!("{}: the coordinator thread panicked", self.name);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::{Builder, FlushInterval, Outcome, Task};

    struct Nop;
    impl Task for Nop {
        type Entry = u32;
        type State = ();
        fn run(&self, _: &[u32], _: &()) -> Outcome<u32, ()> {
            Outcome::Ok
        }
    }

    #[test]
    fn a_buffer_timeout_hands_the_entries_back() {
        let handle = Builder::new(Nop, ())
            .flush_interval(FlushInterval::Never)
            .start()
            .unwrap();
        let held = handle.inner.shared.buffers.lock();
        let other = handle.clone();
        let err = std::thread::spawn(move || {
            other
                .buffer_timeout(vec![1, 2], Priority::Back, Duration::from_millis(1))
                .unwrap_err()
        })
        .join()
        .unwrap();
        drop(held);
        assert!(matches!(err, BufferError::Timeout(_)));
        assert_eq!(
            err.to_string(),
            "timed out handing over entries; 2 entries handed back"
        );
        assert_eq!(err.into_entries(), vec![1, 2]);
        handle
            .buffer_timeout(vec![3], Priority::Back, Duration::from_secs(1))
            .unwrap();
        assert_eq!(handle.shutdown_return().unwrap().unprocessed, vec![3]);
    }
}

//! The cloneable handle: hand entries over, flush, inspect, shrink, shut down.
//! Each call is a short lock on the engine's store, on the calling thread; none
//! waits for the coordinator.

use crate::engine::Engine;
use crate::error::{BufferError, ControlError, IdleError, ShrinkError};
use crate::intake::Entries;
use crate::shutdown::{Mode, ShutdownReport};
use crate::stats::{DebugCount, Stats};
use crate::store::{Refusal, Store, Wait};
use crate::task::Priority;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// A handle to a running engine. Cheap to clone; every clone may be used from any
/// thread. Dropping the last one shuts the engine down (see [`Handle::shutdown_return`]
/// for what happens to the work left).
///
/// # Calls from the engine's own threads
///
/// `run`, `init` and the handlers may call any method. The calls that would wait
/// for the engine's own threads fail at once instead of hanging: the shutdowns
/// with [`ControlError::WouldDeadlock`], and a hand-over that would wait for room
/// under [`OverflowPolicy::Block`](crate::OverflowPolicy::Block) with
/// [`BufferError::Full`] (from `init` it waits, like `init`'s own sink).
#[must_use = "dropping the last handle stops the engine"]
pub struct Handle<T: Send + 'static> {
    engine: Arc<Engine<T>>,
}

impl<T: Send + 'static> Clone for Handle<T> {
    fn clone(&self) -> Self {
        Handle {
            engine: self.engine.clone(),
        }
    }
}

impl<T: Send + 'static> fmt::Debug for Handle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

/// A handle that does not keep the engine alive: for a task that buffers into its
/// own engine, which would otherwise never be dropped.
pub struct WeakHandle<T: Send + 'static> {
    engine: Weak<Engine<T>>,
    /// Set once hand-overs are refused (read without keeping the engine alive).
    stopping: Arc<AtomicBool>,
}

impl<T: Send + 'static> WeakHandle<T> {
    /// The handle, while some strong handle still exists.
    ///
    /// The handle returned keeps the engine alive while it is held: if every
    /// other handle is dropped meanwhile, dropping this one stops the engine,
    /// on this thread (waiting for running batches). To watch for an engine
    /// to stop, use [`is_stopped`](Self::is_stopped), which never does.
    pub fn upgrade(&self) -> Option<Handle<T>> {
        self.engine.upgrade().map(|engine| Handle { engine })
    }

    /// Whether the engine has stopped taking entries: a shutdown began, it
    /// failed, or its last handle was dropped. Does not keep it alive.
    pub fn is_stopped(&self) -> bool {
        self.engine.strong_count() == 0 || self.stopping.load(Ordering::Acquire)
    }
}

impl<T: Send + 'static> Clone for WeakHandle<T> {
    fn clone(&self) -> Self {
        WeakHandle {
            engine: self.engine.clone(),
            stopping: self.stopping.clone(),
        }
    }
}

impl<T: Send + 'static> fmt::Debug for WeakHandle<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WeakHandle")
    }
}

fn refused<T>(refusal: Refusal, entries: Vec<T>) -> BufferError<T> {
    match refusal {
        Refusal::Stopped => BufferError::Stopped(entries),
        Refusal::Full => BufferError::Full(entries),
        Refusal::Timeout => BufferError::Timeout(entries),
    }
}

impl<T: Send + 'static> Handle<T> {
    pub(crate) fn new(engine: Engine<T>) -> Self {
        Handle {
            engine: Arc::new(engine),
        }
    }

    fn store(&self) -> &Store<T> {
        &self.engine.store
    }

    /// The store, without keeping the engine alive (for the memory monitor).
    pub(crate) fn store_weak(&self) -> Weak<Store<T>> {
        Arc::downgrade(&self.engine.store)
    }

    /// A [`WeakHandle`] to this engine.
    pub fn downgrade(&self) -> WeakHandle<T> {
        WeakHandle {
            engine: Arc::downgrade(&self.engine),
            stopping: self.store().stopping_flag(),
        }
    }

    /// The name given at build time.
    pub fn name(&self) -> &str {
        self.store().name()
    }

    /// Hands `entries` to the engine: they wait in the back or front buffer until the
    /// next flush. Returns as soon as the engine owns them; it never waits for the
    /// coordinator. With a flush ticker, a full batch's worth of buffered entries is
    /// flushed at once (on this thread); partial batches wait for the tick. An
    /// empty list is a no-op.
    ///
    /// Under [`OverflowPolicy::Block`](crate::OverflowPolicy::Block) with a full
    /// bounded queue, it waits for room (see [`Handle::buffer_timeout`] and
    /// [`Handle::try_buffer`]); it waits for nothing else.
    ///
    /// # Errors
    ///
    /// Each hands the entries back, in their order:
    /// - [`BufferError::Stopped`] once a shutdown has begun (or the engine
    ///   failed);
    /// - [`BufferError::Full`] when a bounded queue has no room under
    ///   [`OverflowPolicy::Reject`](crate::OverflowPolicy::Reject), when the call
    ///   holds more entries than the bound, or under `Block` from one of the
    ///   engine's own worker threads (which must not wait for the workers).
    ///
    /// Under the default `DropNewest`, entries that a full bounded queue cannot
    /// take are not an error: they go to the overflow handler.
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
        self.hand_over(entries, priority, Wait::Forever)
    }

    /// As [`Handle::buffer`], but never waits: under `Block` with no room it
    /// fails at once with [`BufferError::Full`].
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer`], with `Full` where a `Reject` or `Block` bound has
    /// no room (under `DropNewest` the excess overflows, as with `buffer`).
    pub fn try_buffer(&self, entries: Vec<T>, priority: Priority) -> Result<(), BufferError<T>> {
        self.hand_over(entries, priority, Wait::Never)
    }

    /// As [`Handle::buffer`], but under `Block` waits at most `timeout` (on the
    /// engine's clock) for room. `Duration::MAX` waits without limit.
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer`], and [`BufferError::Timeout`] when no room came in
    /// time; each with the entries.
    pub fn buffer_timeout(
        &self,
        entries: Vec<T>,
        priority: Priority,
        timeout: Duration,
    ) -> Result<(), BufferError<T>> {
        let deadline = self.store().clock().deadline(timeout);
        self.hand_over(entries, priority, Wait::Until(deadline))
    }

    /// Hands one entry to the engine, without allocating a `Vec` for it. Otherwise as
    /// [`Handle::buffer`].
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer`], with the entry.
    #[inline]
    pub fn buffer_one(&self, entry: T, priority: Priority) -> Result<(), BufferError<T>> {
        self.hand_over_one(entry, priority, Wait::Forever)
    }

    /// As [`Handle::buffer_one`], but never waits (see [`Handle::try_buffer`]).
    ///
    /// # Errors
    ///
    /// As [`Handle::try_buffer`], with the entry.
    pub fn try_buffer_one(&self, entry: T, priority: Priority) -> Result<(), BufferError<T>> {
        self.hand_over_one(entry, priority, Wait::Never)
    }

    /// As [`Handle::buffer_one`], waiting at most `timeout` for room (see
    /// [`Handle::buffer_timeout`]).
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer_timeout`], with the entry.
    pub fn buffer_one_timeout(
        &self,
        entry: T,
        priority: Priority,
        timeout: Duration,
    ) -> Result<(), BufferError<T>> {
        let deadline = self.store().clock().deadline(timeout);
        self.hand_over_one(entry, priority, Wait::Until(deadline))
    }

    #[inline(always)]
    fn hand_over_one(
        &self,
        entry: T,
        priority: Priority,
        wait: Wait,
    ) -> Result<(), BufferError<T>> {
        self.store()
            .hand_over(Entries::One(entry), priority, wait)
            .map_err(|(refusal, e)| refused(refusal, e.into_vec()))
    }

    fn hand_over(
        &self,
        entries: Vec<T>,
        priority: Priority,
        wait: Wait,
    ) -> Result<(), BufferError<T>> {
        if entries.is_empty() {
            return Ok(());
        }
        self.store()
            .hand_over(Entries::Many(entries), priority, wait)
            .map_err(|(refusal, e)| refused(refusal, e.into_vec()))
    }

    /// Puts entries straight at the back of the queue (skipping the buffers) and
    /// wakes idle workers for them. Waits only for room under `Block` (see
    /// [`Handle::push_back_timeout`]).
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer`].
    pub fn push_back(&self, entries: Vec<T>) -> Result<(), BufferError<T>> {
        self.push(entries, Priority::Back, Wait::Forever)
    }

    /// As [`Handle::push_back`], waiting at most `timeout` for room under
    /// `Block` (on the engine's clock; `Duration::MAX`: no limit).
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer_timeout`].
    pub fn push_back_timeout(
        &self,
        entries: Vec<T>,
        timeout: Duration,
    ) -> Result<(), BufferError<T>> {
        let deadline = self.store().clock().deadline(timeout);
        self.push(entries, Priority::Back, Wait::Until(deadline))
    }

    /// Puts entries straight at the front of the queue, in their order, and
    /// wakes idle workers for them. Waits only for room under `Block` (see
    /// [`Handle::push_front_timeout`]).
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer`].
    pub fn push_front(&self, entries: Vec<T>) -> Result<(), BufferError<T>> {
        self.push(entries, Priority::Front, Wait::Forever)
    }

    /// As [`Handle::push_front`], waiting at most `timeout` for room under
    /// `Block`.
    ///
    /// # Errors
    ///
    /// As [`Handle::buffer_timeout`].
    pub fn push_front_timeout(
        &self,
        entries: Vec<T>,
        timeout: Duration,
    ) -> Result<(), BufferError<T>> {
        let deadline = self.store().clock().deadline(timeout);
        self.push(entries, Priority::Front, Wait::Until(deadline))
    }

    fn push(&self, entries: Vec<T>, priority: Priority, wait: Wait) -> Result<(), BufferError<T>> {
        if entries.is_empty() {
            return Ok(());
        }
        self.store()
            .push(entries, priority, wait)
            .map_err(|(refusal, e)| refused(refusal, e))
    }

    /// Moves the buffered entries into the queue and wakes idle workers for
    /// them, on this thread; returns when that is done (once a shutdown that
    /// hands entries back has begun, the buffers stay for its report).
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] once the engine has stopped.
    pub fn flush(&self) -> Result<(), ControlError> {
        self.store().flush(None)
    }

    /// As [`Handle::flush`], giving up after `timeout` (real time) if the engine's
    /// lock cannot be had.
    ///
    /// # Errors
    ///
    /// [`ControlError::Timeout`] or [`ControlError::Stopped`].
    pub fn flush_timeout(&self, timeout: Duration) -> Result<(), ControlError> {
        self.store().flush(Some(timeout))
    }

    /// Runs `init` now: for a source that learns of new work, e.g. a database
    /// notification, instead of waiting for the next poll. If `init` is running,
    /// it runs once more when it returns (it may have looked before the new work
    /// arrived). Does not wait for the engine.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] once a shutdown has begun.
    pub fn poll_now(&self) -> Result<(), ControlError> {
        self.store().poll_now()
    }

    /// Exact counts: entries waiting (buffers, queue, retries) and batches
    /// running, at one instant.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] once the engine has stopped.
    pub fn debug_count(&self) -> Result<DebugCount, ControlError> {
        self.store().debug_count()
    }

    /// Sheds the back half of the queue (to the overflow handler) and bounds the
    /// queue at the half kept, until [`Handle::expand`].
    ///
    /// # Errors
    ///
    /// [`ShrinkError::MinimumSize`] when 0 or 1 entries are queued;
    /// [`ShrinkError::Stopped`] once the engine has stopped.
    pub fn shrink(&self) -> Result<(), ShrinkError> {
        self.store().shrink()
    }

    /// Lifts a shrink: the queue's bound goes back to the configured one (or none).
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] once the engine has stopped.
    pub fn expand(&self) -> Result<(), ControlError> {
        self.store().expand()
    }

    /// Whether a shrink is in force.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] once the engine has stopped.
    pub fn is_shrunk(&self) -> Result<bool, ControlError> {
        self.store().is_shrunk()
    }

    /// Bytes the waiting entries occupy: entries × `size_of::<T>()` plus what the
    /// weigher reports.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] once the engine has stopped.
    pub fn memory_usage(&self) -> Result<usize, ControlError> {
        self.store().memory_usage()
    }

    /// Waits until every entry handed over before this call has left the
    /// engine: processed, dead-lettered, overflowed or handed back (what
    /// OpenTelemetry calls `force_flush`); dead-lettered and overflowed
    /// entries count as gone once their handler has returned. The buffers are
    /// flushed first.
    /// Entries handed over after the call are not waited for, nor are new
    /// entries a run returns; a retried entry is (it was handed over before).
    /// `timeout` is on the engine's clock; `Duration::MAX` waits without limit.
    /// Returns `Ok` at once once the engine has finished (a shutdown has taken
    /// every entry out).
    ///
    /// # Errors
    ///
    /// [`IdleError::Timeout`] with how many of those entries are left;
    /// [`IdleError::WouldDeadlock`] from one of the engine's own threads, or
    /// from inside its overflow handler (which it would wait for).
    ///
    /// # Examples
    ///
    /// ```
    /// # use buffered_task::{Builder, Outcome, Priority, Task};
    /// # use std::sync::atomic::{AtomicUsize, Ordering};
    /// # use std::sync::Arc;
    /// # use std::time::Duration;
    /// # struct Count(Arc<AtomicUsize>);
    /// # impl Task for Count { type Entry = u32; type State = ();
    /// #   fn run(&self, b: &[u32], _: &()) -> Outcome<u32, ()> {
    /// #     self.0.fetch_add(b.len(), Ordering::SeqCst); Outcome::Ok } }
    /// let done = Arc::new(AtomicUsize::new(0));
    /// let handle = Builder::new(Count(done.clone()), ())
    ///     .flush_interval(Duration::from_secs(3600)) // no tick will come
    ///     .start()?;
    /// handle.buffer((0..250).collect(), Priority::Back)?;
    /// handle.wait_idle(Duration::from_secs(10))?;
    /// assert_eq!(done.load(Ordering::SeqCst), 250); // and the engine runs on
    /// handle.buffer(vec![1], Priority::Back)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), IdleError> {
        self.store().wait_idle(timeout)
    }

    /// Whether the engine takes no more entries: a shutdown has begun, or it
    /// stopped after an internal failure.
    pub fn is_stopped(&self) -> bool {
        self.store().is_stopped()
    }

    /// Stops taking entries, runs everything left (buffered, queued, retried, and
    /// what a running `init` still streams), waits for it, and joins the threads.
    ///
    /// # Errors
    ///
    /// [`ControlError::Stopped`] when a shutdown already began;
    /// [`ControlError::WouldDeadlock`] from one of the engine's own threads.
    pub fn shutdown_drain(&self) -> Result<ShutdownReport<T>, ControlError> {
        self.engine.shutdown(Mode::Drain)
    }

    /// Stops taking entries, waits for the running batches (and a running `init`,
    /// which is told to stop through [`Sink::is_stopping`](crate::Sink::is_stopping)),
    /// then hands every unprocessed entry back in the report.
    ///
    /// Dropping the last handle does the same, but hands the entries to the overflow
    /// handler (reason [`OverflowReason::Shutdown`](crate::OverflowReason::Shutdown)),
    /// or counts and logs them at warn when there is none. It waits for running
    /// batches without limit: to bound the wait, call [`Handle::shutdown_timeout`]
    /// first.
    ///
    /// # Errors
    ///
    /// As [`Handle::shutdown_drain`].
    #[must_use = "the report holds the entries that were not processed"]
    pub fn shutdown_return(&self) -> Result<ShutdownReport<T>, ControlError> {
        self.engine.shutdown(Mode::Return)
    }

    /// Drains until `timeout` has passed (on the engine's clock), then hands back
    /// every entry not started, and returns by the deadline even if a `run` (or
    /// `init`) never returns: such threads are let go, not waited for (the one
    /// case where the engine does not join a thread). The report says how many
    /// entries were still running ([`ShutdownReport::still_running`]); when such a
    /// run returns, its entries count as processed in [`Handle::stats`] if it
    /// succeeded, and anything it hands back goes to the overflow handler as
    /// [`OverflowReason::Shutdown`](crate::OverflowReason::Shutdown). A batch that
    /// finishes before the deadline is waited for as in a drain.
    ///
    /// # Errors
    ///
    /// As [`Handle::shutdown_drain`].
    #[must_use = "the report holds the entries that were not processed"]
    pub fn shutdown_timeout(&self, timeout: Duration) -> Result<ShutdownReport<T>, ControlError> {
        self.engine.shutdown(Mode::DrainFor(timeout))
    }

    /// A snapshot of every counter, at one instant; cheap enough for a metrics
    /// scrape (one short lock). Still answers after a shutdown (the final figures).
    pub fn stats(&self) -> Stats {
        self.store().stats()
    }
}

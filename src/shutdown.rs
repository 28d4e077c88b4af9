//! Stopping an engine: the modes, the report, and the steps (close, wait,
//! finish, join), run on the calling thread.

use crate::error::ControlError;
use crate::store::{Close, Store};
use crate::threads::{self, Crew};
use parking_lot::Mutex;
use std::time::Duration;

/// How a shutdown treats work that has not run yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Run everything left, then stop.
    Drain,
    /// Run what can be run within the duration, then hand back the rest.
    DrainFor(Duration),
    /// Wait for running batches, then hand every unprocessed entry back.
    Return,
}

/// What a shutdown hands back.
#[derive(Debug)]
#[non_exhaustive]
pub struct ShutdownReport<T> {
    /// Entries that were not processed, in queue order (front buffer, queue,
    /// retries, back buffer). Empty after a completed drain.
    pub unprocessed: Vec<T>,
    /// Entries that overflowed (queue full, shed by a shrink, or dropped by the
    /// engine's stop) over the engine's life.
    pub overflowed: u64,
    /// Entries processed (their `run` returned `Ok`) between the shutdown call and
    /// its return.
    pub drained: u64,
    /// Entries in runs still going when a shutdown deadline passed (only
    /// [`Handle::shutdown_timeout`](crate::Handle::shutdown_timeout)): their
    /// threads were let go. When such a run returns, its entries count as
    /// processed if it succeeded, and anything it hands back goes to the overflow
    /// handler as [`OverflowReason::Shutdown`](crate::OverflowReason::Shutdown).
    pub still_running: usize,
}

/// Stops the engine as `mode` says and joins its threads.
pub(crate) fn stop<T: Send + 'static>(
    store: &Store<T>,
    crew: &Mutex<Option<Crew>>,
    mode: Mode,
) -> Result<ShutdownReport<T>, ControlError> {
    if threads::role_in(store.id).is_some() {
        // It would wait for the very thread it runs on.
        return Err(ControlError::WouldDeadlock);
    }
    // The deadline counts from the call.
    let deadline = match mode {
        Mode::DrainFor(d) => Some(store.clock().deadline(d)),
        _ => None,
    };
    let before = store.stats().processed;
    let close = match mode {
        Mode::Drain | Mode::DrainFor(_) => Close::Drain,
        Mode::Return => Close::Return,
    };
    let unqueued = store.close(close)?;
    store.wait_settled(close, deadline);
    let finish = store.finish();
    if let Some(crew) = crew.lock().take() {
        let let_go = crew.join_unless(|role| finish.busy(role));
        if let_go > 0 {
            log::warn!(
                "{}: shutdown deadline passed with {let_go} threads still in user code; they were let go",
                store.name()
            );
        }
    }
    store.report_closed(unqueued);
    store.reporter.flush_logs();
    let stats = store.stats();
    #[cfg(feature = "metrics")]
    crate::observe::record_stats(store.name(), &stats);
    Ok(ShutdownReport {
        unprocessed: finish.unprocessed,
        overflowed: stats.overflowed_full + stats.overflowed_shrink + stats.overflowed_shutdown,
        drained: stats.processed.saturating_sub(before),
        still_running: finish.running,
    })
}

/// The last handle is gone: stop without a caller to hand entries back to.
/// Waits for running batches (and `init`), hands what is left to the overflow
/// handler, and joins every thread, unless it runs on one of the engine's own
/// threads, which it cannot wait for: then it stops the engine at once and lets
/// the threads end on their own.
pub(crate) fn abandon<T: Send + 'static>(store: &Store<T>, crew: &Mutex<Option<Crew>>) {
    let Some(crew) = crew.lock().take() else {
        return; // a shutdown already joined everything
    };
    let own_thread = threads::role_in(store.id).is_some();
    // Fails only if the engine already finished; hands nothing back (Return).
    let _ = store.close(Close::Return);
    if !own_thread {
        store.wait_settled(Close::Return, None);
    }
    let finish = store.finish();
    store.abandon(finish.unprocessed);
    store.reporter.flush_logs();
    if own_thread {
        log::warn!(
            "{}: last handle dropped on one of the engine's own threads; its threads end on their own",
            store.name()
        );
        drop(crew);
    } else {
        crew.join();
    }
}

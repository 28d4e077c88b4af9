//! The engine's counters and the two views of them: [`Stats`] (everything) and
//! [`DebugCount`] (what waits, what runs).
//!
//! The counters are plain integers inside the store's state, changed only under
//! its lock in the same step as the entries they count, so every snapshot is
//! exact and taken at one instant (one exception: `Stats::deduplicated`,
//! counted by the key table as duplicates are reported).

use std::time::Duration;

/// Exact counts of the work inside an engine, from
/// [`Handle::debug_count`](crate::Handle::debug_count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct DebugCount {
    /// Entries waiting: both buffers, the queue, and retries waiting their backoff.
    pub waiting: usize,
    /// Batches running now.
    pub running: usize,
}

/// A snapshot of an engine's counters, from [`Handle::stats`](crate::Handle::stats),
/// taken at one instant under the engine's lock (no message to any thread;
/// only `deduplicated` is counted outside it).
///
/// After a shutdown it holds the final figures: nothing buffered, queued or
/// waiting. Only a run still going when a shutdown deadline passed can change
/// them later (see [`Handle::shutdown_timeout`](crate::Handle::shutdown_timeout)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct Stats {
    /// Entries in the buffers, waiting for a flush.
    pub buffered: usize,
    /// Entries in the queue, and retries waiting their backoff.
    pub queued: usize,
    /// Batches running now.
    pub running: usize,
    /// Entries done: those of batches whose `run` returned `Ok` or
    /// `OkWithState`, and those a `RetryEntries` let go.
    pub processed: u64,
    /// Entries sent back to run again by a retry outcome or a panic.
    pub retried: u64,
    /// `run` calls that panicked.
    pub panicked: u64,
    /// Entries dropped because the queue was full.
    pub overflowed_full: u64,
    /// Entries shed by a shrink.
    pub overflowed_shrink: u64,
    /// Entries handed to the overflow handler because the engine stopped without
    /// them: the last handle was dropped, a run that outlived a shutdown deadline
    /// handed them back, or the engine failed.
    pub overflowed_shutdown: u64,
    /// Entries whose attempts were spent under the retry policy.
    pub dead_lettered: u64,
    /// How long the oldest waiting entry has waited (`None`: nothing waits): the
    /// oldest of the buffered entries and the batch at the head of the queue.
    /// The head is the oldest queued entry except where front entries or retries
    /// were put ahead of older ones (their wait counts from then).
    pub oldest_wait: Option<Duration>,
    /// Runs that passed the run deadline (see
    /// [`Builder::run_deadline`](crate::Builder::run_deadline)), counted once each.
    pub stuck_runs: u64,
    /// `init` runs that have returned (the first, and each poll).
    pub init_runs: u64,
    /// How many batches may run at once now: `max_concurrency`, or under
    /// [`adaptive_concurrency`](crate::Builder::adaptive_concurrency) the limit
    /// it has found.
    pub concurrency_limit: usize,
    /// Entries dropped as duplicates under
    /// [`dedup_by_key`](crate::Builder::dedup_by_key): as they came in (a
    /// waiting entry had the same key), or as a worker reached them (a twin
    /// whose run had begun since). Counted as they are reported, outside the
    /// engine's lock: the one counter that may trail the others by the
    /// hand-overs in progress.
    pub deduplicated: u64,
    /// Entries the engine has taken: hand-overs, pushes, `init` chunks, and
    /// new entries returned by runs (not those dropped as duplicates as they
    /// came in; those dropped as a worker reached them count here, and in
    /// `deduplicated`).
    pub accepted: u64,
    /// Hand-overs (and `init` chunks) waiting for room under
    /// [`OverflowPolicy::Block`](crate::OverflowPolicy::Block) now.
    pub blocked_callers: usize,
}

/// The counters, kept inside the store's state.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    /// Entries taken straight into the queue (pushes, `init`, new from runs);
    /// hand-overs into the buffers are counted by the buffers.
    pub(crate) accepted: u64,
    pub(crate) processed: u64,
    pub(crate) retried: u64,
    pub(crate) panicked: u64,
    pub(crate) overflow_full: u64,
    pub(crate) overflow_shrink: u64,
    pub(crate) overflow_shutdown: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) stuck: u64,
}

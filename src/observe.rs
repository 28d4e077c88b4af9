//! A view into every batch: the record of each run, the user's observer, and
//! (with the `metrics` and `tracing` features) the built-in exporters.
//!
//! A worker builds the record after the run, outside every lock, and only when
//! something looks at it: with no observer and neither feature, no clock is
//! read and nothing is built.

use std::time::Duration;

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub enum BatchKind {
    /// `Ok` or `OkWithState`.
    Ok,
    /// A retry outcome (`Retry`, `RetryEntries`, with or without a state).
    Retry,
    /// `Fail` or `FailEntries`: a retry that carries an error.
    Error,
    /// The run panicked.
    Panic,
}

/// What happened to one batch, handed to [`Builder::on_batch`](crate::Builder::on_batch).
#[derive(Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
#[non_exhaustive]
pub struct BatchRecord {
    /// The engine's name.
    pub engine: String,
    /// The worker that ran it (0-based).
    pub worker: usize,
    /// Entries in the batch.
    pub size: usize,
    /// How the run ended.
    pub kind: BatchKind,
    /// Under a retry policy, the highest attempt among the batch's entries
    /// (1 for entries run for the first time); `None` without a policy.
    pub attempt: Option<u32>,
    /// How long the batch's oldest entry waited in the queue (or its retries
    /// waited since they came due) before the run started.
    pub waited: Duration,
    /// How long the run took.
    pub run_time: Duration,
    /// Entries done.
    pub processed: usize,
    /// Entries sent to run again.
    pub retried: usize,
    /// Entries whose attempts were spent (handed to the dead-letter handler).
    pub dead_lettered: usize,
    /// The panic message, or the error's text, when the run did not succeed
    /// that way.
    pub error: Option<String>,
}

/// Called with every batch's record, on the worker that ran it, outside every
/// lock; a panic in it is caught and logged.
pub type BatchObserver = Box<dyn Fn(&BatchRecord) + Send + Sync + 'static>;

/// Metrics through the `metrics` facade: per batch, counters of entries
/// processed, retried and dead-lettered, and histograms of batch size, wait
/// and run time, each labelled `engine`.
#[cfg(feature = "metrics")]
pub(crate) fn record_metrics(r: &BatchRecord) {
    let engine = r.engine.clone();
    metrics::counter!("buffered_task_entries_processed_total", "engine" => engine.clone())
        .increment(r.processed as u64);
    metrics::counter!("buffered_task_entries_retried_total", "engine" => engine.clone())
        .increment(r.retried as u64);
    metrics::counter!("buffered_task_entries_dead_lettered_total", "engine" => engine.clone())
        .increment(r.dead_lettered as u64);
    metrics::counter!("buffered_task_batches_total", "engine" => engine.clone(), "kind" => kind_label(r.kind))
        .increment(1);
    metrics::histogram!("buffered_task_batch_size", "engine" => engine.clone())
        .record(r.size as f64);
    metrics::histogram!("buffered_task_wait_seconds", "engine" => engine.clone())
        .record(r.waited.as_secs_f64());
    metrics::histogram!("buffered_task_run_seconds", "engine" => engine)
        .record(r.run_time.as_secs_f64());
}

/// Gauges and running totals from a stats snapshot (published by the
/// coordinator): entries handed over, overflowed (full, shrink, shutdown),
/// dropped as duplicates, buffered, queued, running, and the concurrency
/// limit.
#[cfg(feature = "metrics")]
pub(crate) fn record_stats(engine: &str, s: &crate::stats::Stats) {
    let e = engine.to_string();
    metrics::counter!("buffered_task_entries_accepted_total", "engine" => e.clone())
        .absolute(s.accepted);
    let overflowed = s.overflowed_full + s.overflowed_shrink + s.overflowed_shutdown;
    metrics::counter!("buffered_task_entries_overflowed_total", "engine" => e.clone())
        .absolute(overflowed);
    metrics::counter!("buffered_task_entries_deduplicated_total", "engine" => e.clone())
        .absolute(s.deduplicated);
    metrics::gauge!("buffered_task_concurrency_limit", "engine" => e.clone())
        .set(s.concurrency_limit as f64);
    metrics::gauge!("buffered_task_buffered", "engine" => e.clone()).set(s.buffered as f64);
    metrics::gauge!("buffered_task_queue_depth", "engine" => e.clone()).set(s.queued as f64);
    metrics::gauge!("buffered_task_running", "engine" => e).set(s.running as f64);
}

#[cfg(feature = "metrics")]
fn kind_label(kind: BatchKind) -> &'static str {
    match kind {
        BatchKind::Ok => "ok",
        BatchKind::Retry => "retry",
        BatchKind::Error => "error",
        BatchKind::Panic => "panic",
    }
}

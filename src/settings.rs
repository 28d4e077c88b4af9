//! The validated settings an engine runs with (built by
//! [`Builder`](crate::Builder), read by every part of the engine).

use crate::clock::Clock;
use crate::overflow::OverflowPolicy;
use std::time::Duration;

/// Most worker threads an engine may have: each slot is a thread started with
/// the engine, so a larger `max_concurrency` is a
/// [`BuildError::TooManyWorkers`](crate::BuildError::TooManyWorkers).
pub const MAX_CONCURRENCY: usize = 4096;

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

/// How buffered entries become batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Batching {
    /// As the original: buffered entries wait for the flush tick (or a full
    /// batch's worth, or [`Handle::flush`](crate::Handle::flush)), so partial
    /// batches wait up to one interval. The default.
    #[default]
    Ticked,
    /// "Smart batching": a free worker takes whatever is buffered at once, a
    /// partial batch if that is all there is; while every worker is busy,
    /// entries pile up and batches grow to `max_batch_size` by themselves. A
    /// lone entry into an idle engine starts at once; under load batches are
    /// full. The flush tick still moves entries that no free worker took.
    Natural,
}

/// The validated settings.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: String,
    pub(crate) max_batch_size: usize,
    pub(crate) max_concurrency: usize,
    pub(crate) flush_interval: FlushInterval,
    pub(crate) poll: bool,
    pub(crate) idle_poll_delay: Duration,
    pub(crate) max_queue_len: Option<usize>,
    /// The policy in force: `DropNewest` when the queue is unbounded.
    pub(crate) overflow_policy: OverflowPolicy,
    pub(crate) run_deadline: Option<Duration>,
    pub(crate) clock: Clock,
    pub(crate) batching: Batching,
    /// Adaptive concurrency from this minimum up to `max_concurrency`.
    pub(crate) adaptive_min: Option<usize>,
}

impl Config {
    /// The adaptive range, if any: (min, `max_concurrency`).
    pub(crate) fn adaptive(&self) -> Option<(usize, usize)> {
        self.adaptive_min.map(|min| (min, self.max_concurrency))
    }

    /// Whether a full batch in the buffers is flushed at once (only with a ticker).
    pub(crate) fn auto_flush(&self) -> bool {
        matches!(self.flush_interval, FlushInterval::Every(_))
    }

    /// Whether a free worker takes partial batches from the buffers.
    pub(crate) fn natural(&self) -> bool {
        self.batching == Batching::Natural
    }

    /// Whether hand-overs are held to the bound (the `Reject` and `Block` policies).
    pub(crate) fn enforced(&self) -> bool {
        self.max_queue_len.is_some() && self.overflow_policy != OverflowPolicy::DropNewest
    }
}

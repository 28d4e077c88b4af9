//! Every error type of the crate.
//!
//! Errors that stand for a failed hand-over carry the caller's entries back, so a
//! failed call never loses work: take them with `into_entries()`.

use std::fmt;

/// Why [`Builder::start`](crate::Builder::start) refused to start an engine.
#[derive(Debug)]
#[non_exhaustive]
pub enum BuildError {
    /// `max_batch_size` was 0; a batch must hold at least one entry.
    ZeroBatchSize,
    /// `max_concurrency` was 0; at least one worker is needed.
    ZeroConcurrency,
    /// The flush interval was zero; use [`FlushInterval::Never`](crate::FlushInterval::Never)
    /// to flush only on demand.
    ZeroFlushInterval,
    /// `max_queue_len` was 0; a queue that can hold nothing would shed everything.
    ZeroQueueLen,
    /// The run deadline was zero: every run would be stuck at once.
    ZeroRunDeadline,
    /// The name contains a NUL byte, which a thread name cannot hold.
    InvalidName(String),
    /// `max_concurrency` was above [`MAX_CONCURRENCY`](crate::MAX_CONCURRENCY):
    /// each slot is a thread, started at once.
    TooManyWorkers(usize),
    /// The range given to `adaptive_concurrency` was empty or started at zero.
    ConcurrencyRange(usize, usize),
    /// The operating system refused to start one of the engine's threads.
    Spawn(std::io::Error),
    /// A memory monitor setting was out of range (see [`MonitorBuilder`](crate::MonitorBuilder)).
    Monitor(&'static str),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::ZeroBatchSize => f.write_str("max_batch_size must be at least 1"),
            BuildError::ZeroConcurrency => f.write_str("max_concurrency must be at least 1"),
            BuildError::ZeroFlushInterval => {
                f.write_str("flush interval must be longer than zero (use FlushInterval::Never for manual flushing)")
            }
            BuildError::ZeroQueueLen => f.write_str("max_queue_len must be at least 1"),
            BuildError::ZeroRunDeadline => f.write_str("run_deadline must be longer than zero"),
            BuildError::InvalidName(name) => {
                write!(f, "task name {name:?} contains a NUL byte")
            }
            BuildError::TooManyWorkers(n) => write!(
                f,
                "max_concurrency {n} is above the maximum of {}",
                crate::MAX_CONCURRENCY
            ),
            BuildError::ConcurrencyRange(min, max) => write!(
                f,
                "adaptive concurrency range {min}..={max} must start at 1 or more and not be empty"
            ),
            BuildError::Spawn(err) => write!(f, "could not start a thread: {err}"),
            BuildError::Monitor(what) => write!(f, "invalid memory monitor setting: {what}"),
        }
    }
}

impl std::error::Error for BuildError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BuildError::Spawn(err) => Some(err),
            _ => None,
        }
    }
}

/// Why a hand-over of entries (`buffer`, `push_back`, `push_front`) failed.
///
/// The entries come back inside the error.
#[non_exhaustive]
pub enum BufferError<T> {
    /// The engine has been shut down (or is shutting down) and takes no new entries.
    Stopped(Vec<T>),
    /// The call could not hand the entries over before its timeout.
    Timeout(Vec<T>),
    /// The queue is bounded and full, and the call may not wait for room: the
    /// policy is [`OverflowPolicy::Reject`](crate::OverflowPolicy::Reject), the
    /// call hands over more entries than the bound can ever hold, or, under
    /// [`OverflowPolicy::Block`](crate::OverflowPolicy::Block), it was made from
    /// one of the engine's own worker threads, where waiting could deadlock.
    Full(Vec<T>),
}

impl<T> BufferError<T> {
    /// The entries the failed call was given, in their original order.
    pub fn into_entries(self) -> Vec<T> {
        match self {
            BufferError::Stopped(v) | BufferError::Timeout(v) | BufferError::Full(v) => v,
        }
    }

    /// How many entries came back.
    pub fn len(&self) -> usize {
        match self {
            BufferError::Stopped(v) | BufferError::Timeout(v) | BufferError::Full(v) => v.len(),
        }
    }

    /// Whether no entries came back (the call was given none).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> fmt::Debug for BufferError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            BufferError::Stopped(_) => "Stopped",
            BufferError::Timeout(_) => "Timeout",
            BufferError::Full(_) => "Full",
        };
        write!(f, "{name}(<{} entries>)", self.len())
    }
}

impl<T> fmt::Display for BufferError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BufferError::Stopped(v) => {
                write!(f, "the engine has stopped; {} entries handed back", v.len())
            }
            BufferError::Timeout(v) => {
                write!(
                    f,
                    "timed out handing over entries; {} entries handed back",
                    v.len()
                )
            }
            BufferError::Full(v) => {
                write!(f, "the queue is full; {} entries handed back", v.len())
            }
        }
    }
}

impl<T> std::error::Error for BufferError<T> {}

/// Why a control call (`flush`, `shrink`, `expand`, `debug_count`, `shutdown`, …) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ControlError {
    /// The engine has been shut down.
    Stopped,
    /// The call did not complete before its timeout.
    Timeout,
    /// The call was made from one of the engine's own threads (inside `run`,
    /// `init` or a handler) and would have to wait for that very thread: it fails
    /// at once instead of hanging.
    WouldDeadlock,
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::Stopped => f.write_str("the engine has stopped"),
            ControlError::Timeout => f.write_str("the call timed out"),
            ControlError::WouldDeadlock => f.write_str(
                "called from one of the engine's own threads, which the call would wait for",
            ),
        }
    }
}

impl std::error::Error for ControlError {}

/// Why [`Handle::shrink`](crate::Handle::shrink) did not shrink the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShrinkError {
    /// The queue holds 0 or 1 entries: there is nothing left to shed.
    MinimumSize,
    /// The engine has stopped.
    Stopped,
}

impl fmt::Display for ShrinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ShrinkError::MinimumSize => {
                f.write_str("the queue is at its minimum size and cannot shrink")
            }
            ShrinkError::Stopped => f.write_str("the engine has stopped"),
        }
    }
}

impl std::error::Error for ShrinkError {}

impl From<ControlError> for ShrinkError {
    fn from(_: ControlError) -> Self {
        ShrinkError::Stopped
    }
}

/// Why [`Handle::wait_idle`](crate::Handle::wait_idle) returned before every
/// entry handed over before the call had left the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdleError {
    /// The timeout passed with this many of those entries still in the engine
    /// (buffered, queued, retrying, running, or on their way to a handler).
    Timeout {
        /// Entries handed over before the call and still in the engine.
        left: usize,
    },
    /// The call was made from one of the engine's own threads, or from inside
    /// one of its overflow handlers, which it would wait for.
    WouldDeadlock,
}

impl fmt::Display for IdleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdleError::Timeout { left } => {
                write!(f, "timed out with {left} entries still in the engine")
            }
            IdleError::WouldDeadlock => f.write_str(
                "called from one of the engine's own threads or handlers, which the call would wait for",
            ),
        }
    }
}

impl std::error::Error for IdleError {}

//! Entries that leave the engine unprocessed: the overflow policy, the reason,
//! and the one reporter that logs them and hands them to the user's handlers.
//!
//! The reporter is called by whichever thread holds such entries (a caller
//! whose flush overflowed, a worker whose run spent its attempts, the thread that
//! stops the engine), always after the store's lock is released. Counting is
//! done by the store, in the same step that takes the entries out.

use crate::retry::{DeadLetterHandler, DeadLetterReason};
use crate::unwind::{catch, drop_quietly};

/// Why entries left the engine without being processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OverflowReason {
    /// The queue was at its maximum length.
    Full,
    /// A shrink (by hand or by the memory monitor) shed them.
    Shrink,
    /// The engine stopped without running them: the last handle was dropped
    /// without a shutdown, a run that outlived a shutdown deadline handed them
    /// back, or the engine stopped after an internal failure.
    Shutdown,
    /// Under [`Builder::dedup_by_key`](crate::Builder::dedup_by_key), an entry
    /// with the same key was already waiting.
    Duplicate,
}

impl std::fmt::Display for OverflowReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OverflowReason::Full => "queue full",
            OverflowReason::Shrink => "shrink",
            OverflowReason::Shutdown => "engine stopped",
            OverflowReason::Duplicate => "duplicate key",
        })
    }
}

/// What happens when entries arrive for a bounded queue that is full.
///
/// Under `Reject` and `Block` the bound is enforced when entries are handed over
/// (counting buffered, queued and retrying entries), so nothing already accepted
/// overflows: retried entries of a batch and buffered entries always reach the
/// queue. A shrink still sheds (to the overflow handler), and lowers the bound
/// callers wait for. New entries a `run` returns (beyond its batch's size) are
/// admitted as far as there is room; the rest overflow, whatever the policy (a
/// worker neither waits nor has a caller to hand them back to).
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
    /// [`FlushInterval::Never`](crate::FlushInterval::Never) buffered entries count
    /// until a `flush`, so a waiting caller needs another thread to flush. A call
    /// with more entries than the configured bound can never fit and fails with
    /// `Full`, and so does a call from inside `run`, which must not wait for the
    /// workers.
    Block,
}

/// Receives entries that leave the engine unprocessed (see [`OverflowReason`]).
/// Called on the thread that holds them (see [`Builder::overflow_handler`]),
/// never under a lock; a panic in it is caught and logged.
///
/// [`Builder::overflow_handler`]: crate::Builder::overflow_handler
pub type OverflowHandler<T> = Box<dyn Fn(Vec<T>, OverflowReason) + Send + Sync + 'static>;

/// Reports how many heap bytes one entry owns, for memory accounting.
pub type Weigher<T> = Box<dyn Fn(&T) -> usize + Send + Sync + 'static>;

/// Logs entries that leave unprocessed and hands them to the handlers.
pub(crate) struct Reporter<T> {
    name: String,
    overflow: Option<OverflowHandler<T>>,
    dead_letter: Option<DeadLetterHandler<T>>,
}

impl<T> Reporter<T> {
    pub(crate) fn new(
        name: String,
        overflow: Option<OverflowHandler<T>>,
        dead_letter: Option<DeadLetterHandler<T>>,
    ) -> Self {
        Reporter {
            name,
            overflow,
            dead_letter,
        }
    }

    /// Entries that overflowed (already counted): logged at warn, then handed to
    /// the overflow handler, or dropped.
    pub(crate) fn overflow(&self, entries: Vec<T>, reason: OverflowReason) {
        if entries.is_empty() {
            return;
        }
        log::warn!(
            "{}: {} entries left the engine unprocessed ({reason})",
            self.name,
            entries.len()
        );
        match &self.overflow {
            Some(handler) => {
                if let Err(msg) = catch(|| handler(entries, reason)) {
                    log::error!("{}: overflow handler panicked: {msg}", self.name);
                }
            }
            None => drop_quietly("overflowed entries", entries),
        }
    }

    /// Entries whose attempts are spent (already counted): logged at warn, then
    /// handed to the dead-letter handler, or dropped.
    pub(crate) fn dead_letter(&self, entries: Vec<T>, reason: DeadLetterReason) {
        if entries.is_empty() {
            return;
        }
        log::warn!(
            "{}: {} entries dead-lettered ({reason})",
            self.name,
            entries.len()
        );
        match &self.dead_letter {
            Some(handler) => {
                if let Err(msg) = catch(|| handler(entries, reason)) {
                    log::error!("{}: dead-letter handler panicked: {msg}", self.name);
                }
            }
            None => drop_quietly("dead-lettered entries", entries),
        }
    }
}

impl<T> Drop for Reporter<T> {
    /// The handlers are user values: their drops run contained.
    fn drop(&mut self) {
        drop_quietly("the overflow handler", self.overflow.take());
        drop_quietly("the dead-letter handler", self.dead_letter.take());
    }
}

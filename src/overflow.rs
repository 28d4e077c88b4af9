//! Entries that leave the engine unprocessed: the overflow policy, the reason,
//! and the one reporter that logs them and hands them to the user's handlers.
//!
//! The reporter is called by whichever thread holds such entries (a caller
//! whose flush overflowed, a worker whose run spent its attempts, the thread that
//! stops the engine), always after the store's lock is released. Counting is
//! done by the store, in the same step that takes the entries out. Its warn
//! lines are rate-limited: under a sustained overload, one line a second per
//! engine and kind, saying how many entries went since the last.

use crate::clock::Clock;
use crate::retry::{DeadLetterHandler, DeadLetterReason};
use crate::unwind::{catch, drop_quietly};
use parking_lot::Mutex;
use std::time::{Duration, Instant};

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
    /// with the same key was already waiting: a run of that key begins after
    /// this entry came in (reported as it comes in, or, for a twin a front
    /// entry took the place of, when a worker reaches it).
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

/// At most one line per this long per engine and kind (overflow, dead letters,
/// failed runs, panicked runs); the next says how many entries went since.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(1);

/// A rate limit for one kind of warn line: the first goes out, then one per
/// `LOG_EVERY` with the count of entries since the last.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    /// Entries (and events) not logged since the last line.
    quiet_entries: u64,
    quiet_events: u64,
}

impl Throttle {
    /// Counts `n` entries; returns the (entries, events) a line should report
    /// now, or `None` to keep quiet.
    fn note(&mut self, n: usize, now: Instant) -> Option<(u64, u64)> {
        self.quiet_entries += n as u64;
        self.quiet_events += 1;
        if self
            .last
            .is_some_and(|at| now.saturating_duration_since(at) < LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        self.take_quiet()
    }

    /// The (entries, events) not logged since the last line, if any; counted
    /// afresh from here.
    fn take_quiet(&mut self) -> Option<(u64, u64)> {
        let said = (self.quiet_entries, self.quiet_events);
        (self.quiet_entries, self.quiet_events) = (0, 0);
        (said.1 > 0).then_some(said)
    }
}

/// Logs entries that leave unprocessed (rate-limited) and hands them to the
/// handlers.
pub(crate) struct Reporter<T> {
    name: String,
    overflow: Option<OverflowHandler<T>>,
    dead_letter: Option<DeadLetterHandler<T>>,
    clock: Clock,
    overflow_log: Mutex<Throttle>,
    dead_log: Mutex<Throttle>,
    failed_log: Mutex<Throttle>,
    panicked_log: Mutex<Throttle>,
}

/// A run that did not succeed, for its (rate-limited) log line.
pub(crate) enum Trouble {
    /// It panicked, with this message.
    Panicked(String),
    /// It failed with this error.
    Failed(crate::task::RunError),
}

impl<T> Reporter<T> {
    pub(crate) fn new(
        name: String,
        overflow: Option<OverflowHandler<T>>,
        dead_letter: Option<DeadLetterHandler<T>>,
        clock: Clock,
    ) -> Self {
        Reporter {
            name,
            overflow,
            dead_letter,
            clock,
            overflow_log: Mutex::new(Throttle::default()),
            dead_log: Mutex::new(Throttle::default()),
            failed_log: Mutex::new(Throttle::default()),
            panicked_log: Mutex::new(Throttle::default()),
        }
    }

    /// A warn line, at most one per `LOG_EVERY` for this kind.
    fn warn(&self, throttle: &Mutex<Throttle>, n: usize, what: std::fmt::Arguments<'_>) {
        self.say(log::Level::Warn, throttle, n, what);
    }

    /// A line at `level`, at most one per `LOG_EVERY` for this kind.
    fn say(
        &self,
        level: log::Level,
        throttle: &Mutex<Throttle>,
        n: usize,
        what: std::fmt::Arguments<'_>,
    ) {
        if !log::log_enabled!(level) {
            return;
        }
        let said = throttle.lock().note(n, self.clock.now());
        if let Some((entries, events)) = said {
            if events > 1 {
                log::log!(
                    level,
                    "{}: {what} ({entries} entries in {events} events since the last such line)",
                    self.name
                );
            } else {
                log::log!(level, "{}: {what}", self.name);
            }
        }
    }

    /// Logs what the rate limit kept quiet since each kind's last line, so no
    /// count is lost when the engine stops (no later line would carry it).
    pub(crate) fn flush_logs(&self) {
        let kinds = [
            (
                log::Level::Warn,
                &self.overflow_log,
                "left the engine unprocessed",
            ),
            (log::Level::Warn, &self.dead_log, "dead-lettered"),
            (log::Level::Warn, &self.failed_log, "in failed runs"),
            (log::Level::Error, &self.panicked_log, "in panicked runs"),
        ];
        for (level, throttle, what) in kinds {
            if !log::log_enabled!(level) {
                continue;
            }
            let quiet = throttle.lock().take_quiet();
            if let Some((entries, events)) = quiet {
                log::log!(
                    level,
                    "{}: {entries} more entries {what} in {events} events since the last such line",
                    self.name
                );
            }
        }
    }

    /// A run that did not succeed, on `n` entries (retried or dead-lettered; the
    /// dead letters have their own line): a panic at error, a failure at warn,
    /// each kind rate-limited.
    pub(crate) fn run_trouble(&self, trouble: &Trouble, n: usize) {
        match trouble {
            Trouble::Panicked(msg) => self.say(
                log::Level::Error,
                &self.panicked_log,
                n,
                format_args!("run panicked on a batch of {n}: {msg}"),
            ),
            Trouble::Failed(error) => self.say(
                log::Level::Warn,
                &self.failed_log,
                n,
                format_args!("run failed on {n} entries: {error}"),
            ),
        }
    }

    /// Entries that overflowed (already counted): logged at warn, then handed to
    /// the overflow handler, or dropped.
    pub(crate) fn overflow(&self, entries: Vec<T>, reason: OverflowReason) {
        if entries.is_empty() {
            return;
        }
        let n = entries.len();
        self.warn(
            &self.overflow_log,
            n,
            format_args!("{n} entries left the engine unprocessed ({reason})"),
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
        let n = entries.len();
        self.warn(
            &self.dead_log,
            n,
            format_args!("{n} entries dead-lettered ({reason})"),
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
        self.flush_logs();
        drop_quietly("the overflow handler", self.overflow.take());
        drop_quietly("the dead-letter handler", self.dead_letter.take());
    }
}

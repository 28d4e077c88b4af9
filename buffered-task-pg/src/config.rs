//! A queue's settings and the values that cross the API: new rows, claimed rows,
//! leases and the outcome of each call.

use crate::error::PgError;
use std::time::Duration;

/// Longest queue name, in bytes.
pub const MAX_QUEUE_NAME: usize = 255;
/// Longest lease and backoff (longer ones are cut to this): 10 years.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Settings of one logical queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub(crate) queue: String,
    pub(crate) lease: Duration,
    pub(crate) max_attempts: i32,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) archive: bool,
    pub(crate) relaxed_settles: bool,
    pub(crate) statement_timeout: Duration,
}

impl QueueConfig {
    /// A queue named `queue`, with defaults: lease 60 s, 25 attempts, backoff
    /// from 1 s doubling to at most 1 h (with jitter), durable settles, a 60 s
    /// statement timeout.
    pub fn new(queue: impl Into<String>) -> Self {
        QueueConfig {
            queue: queue.into(),
            lease: Duration::from_secs(60),
            max_attempts: 25,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(3600),
            archive: false,
            relaxed_settles: false,
            statement_timeout: Duration::from_secs(60),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.queue
    }

    /// How long a claim holds its rows before they come back (an expired lease
    /// counts as an attempt: the row backs off, or goes to `dead` once its
    /// attempts are spent). At most 10 years.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.min(MAX_DURATION);
        self
    }

    /// Attempts before a row goes to `dead` (at least 1).
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = n.max(1);
        self
    }

    /// Keep acknowledged rows in `buffered_task_jobs_archive` (with the time they
    /// were done) instead of deleting them. Default: off.
    pub fn archive(mut self, archive: bool) -> Self {
        self.archive = archive;
        self
    }

    /// The backoff after the first failed attempt, doubling up to `cap`; each wait
    /// is drawn between half and all of that. Both at most 10 years.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff_base = base.min(MAX_DURATION);
        self.backoff_cap = cap.max(base).min(MAX_DURATION);
        self
    }

    /// Relaxed durability for claims and settles (`synchronous_commit = off`):
    /// they return before their commit reaches the disk, so a server crash can
    /// undo the last ones, each whole (an acknowledged row runs again, together
    /// with any effect written in its transaction; a claim is forgotten).
    /// Enqueues, and every operation on dead rows, stay durable: an `Ok` from
    /// them is on disk. Default: off (every commit waits for the disk).
    pub fn relaxed_settles(mut self, relaxed: bool) -> Self {
        self.relaxed_settles = relaxed;
        self
    }

    /// The server cancels any statement of this queue's connections that runs
    /// longer (it bounds waits for locks, too). Default 60 s; zero means none.
    pub fn statement_timeout(mut self, timeout: Duration) -> Self {
        self.statement_timeout = timeout.min(Duration::from_secs(i32::MAX as u64 / 1000));
        self
    }

    /// Checks the settings.
    ///
    /// # Errors
    ///
    /// [`PgError::BadConfig`] for an empty queue name, one over
    /// [`MAX_QUEUE_NAME`] bytes, or one with a NUL character.
    pub fn validate(&self) -> Result<(), PgError> {
        if self.queue.is_empty() {
            return Err(PgError::BadConfig("the queue name is empty".into()));
        }
        if self.queue.len() > MAX_QUEUE_NAME {
            return Err(PgError::BadConfig(format!(
                "the queue name is {} bytes long; at most {MAX_QUEUE_NAME}",
                self.queue.len()
            )));
        }
        if self.queue.contains('\0') {
            return Err(PgError::BadConfig(
                "the queue name contains a NUL character".into(),
            ));
        }
        Ok(())
    }

    /// Seconds, as the SQL takes them.
    pub(crate) fn lease_secs(&self) -> f64 {
        self.lease.as_secs_f64()
    }
}

/// A row to enqueue: a payload, an optional dedup key, a priority.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NewRow {
    /// The payload, handed to the handler as is.
    pub payload: Vec<u8>,
    /// While a row with this key is `ready` or `leased` in the queue, another
    /// with the same key is skipped (and reported). Dead rows do not hold their
    /// key. `None`: never deduplicated.
    pub dedup_key: Option<String>,
    /// Lower runs first (claims take the lowest priority, then the oldest).
    /// Default 0.
    pub priority: i16,
}

impl NewRow {
    /// A row with this payload, no key, priority 0.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        NewRow {
            payload: payload.into(),
            dedup_key: None,
            priority: 0,
        }
    }

    /// With this dedup key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.dedup_key = Some(key.into());
        self
    }

    /// With this priority (lower runs first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }
}

impl From<(Vec<u8>, Option<String>)> for NewRow {
    fn from((payload, dedup_key): (Vec<u8>, Option<String>)) -> Self {
        NewRow {
            payload,
            dedup_key,
            priority: 0,
        }
    }
}

impl From<Vec<u8>> for NewRow {
    fn from(payload: Vec<u8>) -> Self {
        NewRow::new(payload)
    }
}

/// What one enqueue did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Enqueued {
    /// Rows inserted.
    pub inserted: u64,
    /// Indexes (into the rows given) of the rows skipped because a row with
    /// their dedup key is already `ready` or `leased` (or came earlier in the
    /// same call).
    pub skipped: Vec<usize>,
    /// [`PgQueue::enqueue_request`](crate::PgQueue::enqueue_request) only: this
    /// request id had already been committed, so nothing was inserted now.
    pub duplicate_request: bool,
}

/// One claim of one row: the row's id and the claim's token. Every settle is
/// fenced by both, so a settle from an older claim of the same row (a stale
/// batch, even in the same process) touches nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lease {
    /// The row's id.
    pub id: i64,
    /// The claim's token: the row's claim count when it was claimed.
    pub token: i32,
}

/// A claimed row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    /// The row's id.
    pub id: i64,
    /// The payload, as enqueued.
    pub payload: Vec<u8>,
    /// Attempts so far, this one included.
    pub attempts: i32,
    /// This claim's lease, which settles it.
    pub lease: Lease,
}

/// The leases of claimed rows, to settle them.
pub fn leases(rows: &[Claimed]) -> Vec<Lease> {
    rows.iter().map(|r| r.lease).collect()
}

/// How a settling call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// Rows written.
    pub rows: u64,
    /// Leases given whose row was not written: the lease was lost (it expired
    /// and the row came back, possibly to another claim), or the row was
    /// settled already (by an earlier attempt of this call whose answer was
    /// lost with its connection).
    pub lost: u64,
}

/// The NOTIFY channel of a queue: at most 63 bytes (PostgreSQL's identifier
/// length), the same in every process. Long names keep a prefix and add a hash
/// of the whole name.
pub(crate) fn notify_channel(queue: &str) -> String {
    let plain = format!("buffered_task_{queue}");
    if plain.len() <= 63 {
        return plain;
    }
    let mut prefix = String::new();
    for c in queue.chars() {
        if prefix.len() + c.len_utf8() > 30 {
            break;
        }
        prefix.push(c);
    }
    format!("buffered_task_{prefix}_{:016x}", fnv1a(queue.as_bytes()))
}

/// FNV-1a, 64 bits: stable across processes and versions (unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_fit_an_identifier_and_tell_long_names_apart() {
        assert_eq!(notify_channel("blocks"), "buffered_task_blocks");
        let a = "a".repeat(64);
        let b = format!("{}b", "a".repeat(63));
        let (ca, cb) = (notify_channel(&a), notify_channel(&b));
        assert!(ca.len() <= 63 && cb.len() <= 63);
        assert_ne!(ca, cb);
        let wide = "é".repeat(200);
        assert!(notify_channel(&wide).len() <= 63);
        assert_eq!(notify_channel(&wide), notify_channel(&wide));
    }

    #[test]
    fn bad_names_are_refused() {
        assert!(QueueConfig::new("").validate().is_err());
        assert!(QueueConfig::new("x".repeat(256)).validate().is_err());
        assert!(QueueConfig::new("a\0b").validate().is_err());
        assert!(QueueConfig::new("x".repeat(255)).validate().is_ok());
    }
}

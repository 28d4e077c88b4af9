//! The engine adapter: a [`Task`] whose `init` streams claims from the table and
//! whose `run` settles every row in SQL.

use crate::queue::{Claimed, PgError, PgQueue, QueueConfig};
use buffered_task::{Outcome, Sink, Task};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

/// What the user's handler says about a batch of decoded rows.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RowOutcome {
    /// Every row is done: delete them.
    Done,
    /// Run every row again later (backoff), keeping this error.
    Retry(String),
    /// These row ids failed (backoff, this error); the others are done.
    RetryRows(Vec<i64>, String),
    /// As `RetryRows`, and these new rows (payload, optional dedup key) are
    /// enqueued in the same transaction.
    RetryRowsAndAdd {
        /// Rows of the batch that failed.
        retry: Vec<i64>,
        /// Their error.
        error: String,
        /// New rows to enqueue.
        add: Vec<(Vec<u8>, Option<String>)>,
    },
}

/// Processes rows of a shared queue: decode a payload, run a batch.
pub trait RowHandler: Send + Sync + 'static {
    /// The decoded form of a payload.
    type Item: Send + 'static;

    /// Decodes a payload; an error sends the row to `dead` with the message.
    ///
    /// # Errors
    ///
    /// The decode error, as text.
    fn decode(&self, payload: &[u8]) -> Result<Self::Item, String>;

    /// Runs a batch of (row id, item). A panic here counts as an attempt: the
    /// rows are retried with the panic message as their error.
    fn run(&self, rows: &[(i64, Self::Item)]) -> RowOutcome;
}

/// A [`Task`] over a shared PostgreSQL queue. Build an engine with it, `poll` on:
/// each `init` run claims one chunk of rows (about `claim_chunk`), so leases do not
/// expire while rows wait in memory, and the engine polls again as soon as that
/// chunk is done.
pub struct PgTask<H> {
    url: String,
    config: QueueConfig,
    handler: H,
    claim_chunk: i64,
    /// Idle connections (one is taken per call, never held across user code by
    /// the lock). They share one owner token, so any of them settles any claim.
    pool: Mutex<Vec<PgQueue>>,
    owner: String,
}

impl<H: RowHandler> PgTask<H> {
    /// A task for the queue in `config` on the server at `url`, claiming
    /// `claim_chunk` rows per `init` run (say 2 × max_concurrency × max_batch_size).
    ///
    /// # Errors
    ///
    /// A [`PgError`] when the first connection cannot be made (which also checks
    /// the table exists).
    pub fn new(
        url: &str,
        config: QueueConfig,
        handler: H,
        claim_chunk: i64,
    ) -> Result<Self, PgError> {
        let mut first = PgQueue::connect(url, config.clone())?;
        first.counts()?; // the table is there
        let owner = first.owner().to_string();
        Ok(PgTask {
            url: url.to_string(),
            config,
            handler,
            claim_chunk: claim_chunk.max(1),
            pool: Mutex::new(vec![first]),
            owner,
        })
    }

    fn with_connection<R>(
        &self,
        f: impl FnOnce(&mut PgQueue) -> Result<R, PgError>,
    ) -> Result<R, PgError> {
        let taken = self.pool.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut conn = match taken {
            Some(c) => c,
            None => PgQueue::connect(&self.url, self.config.clone())?.with_owner(&self.owner),
        };
        let result = f(&mut conn);
        // A connection that failed is dropped; the next call opens a new one.
        if result.is_ok() {
            self.pool
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
        }
        result
    }

    /// The owner token the task's claims carry (for a [`PgHeartbeat`]).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// For the engine's overflow handler: rows shed under memory pressure go back
    /// to `ready` at once.
    pub fn release(&self, rows: &[Claimed]) {
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        if let Err(e) = self.with_connection(|q| q.release(&ids)) {
            log::warn!(
                "release of {} shed rows failed ({e}); they return after their lease",
                ids.len()
            );
        }
    }

    fn settle(&self, batch: &[Claimed]) -> Result<(), PgError> {
        let mut items = Vec::with_capacity(batch.len());
        let mut undecodable = Vec::new();
        for row in batch {
            match self.handler.decode(&row.payload) {
                Ok(item) => items.push((row.id, item)),
                Err(e) => undecodable.push((row.id, e)),
            }
        }
        for (id, error) in &undecodable {
            self.with_connection(|q| q.bury(&[*id], &format!("decode: {error}")))?;
        }
        if items.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.handler.run(&items)))
                .unwrap_or_else(|payload| {
                    let msg = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "<non-string panic payload>".to_string());
                    RowOutcome::Retry(format!("panicked: {msg}"))
                });
        self.with_connection(|q| match &outcome {
            RowOutcome::Done => q.ack(&ids).map(drop),
            RowOutcome::Retry(error) => q.retry(&ids, error).map(drop),
            RowOutcome::RetryRows(retry, error) => {
                let done: Vec<i64> = ids
                    .iter()
                    .copied()
                    .filter(|id| !retry.contains(id))
                    .collect();
                q.settle_mixed(&done, retry, error, &[]).map(drop)
            }
            RowOutcome::RetryRowsAndAdd { retry, error, add } => {
                let done: Vec<i64> = ids
                    .iter()
                    .copied()
                    .filter(|id| !retry.contains(id))
                    .collect();
                q.settle_mixed(&done, retry, error, add).map(drop)
            }
        })
    }
}

impl<H: RowHandler> Task for PgTask<H> {
    type Entry = Claimed;
    type State = ();

    fn init(&self, sink: &mut Sink<Claimed>, _: &()) {
        match self.with_connection(|q| q.claim(self.claim_chunk)) {
            Ok(rows) => {
                sink.extend(rows);
            }
            Err(e) => log::warn!("claim failed ({e}); polling again later"),
        }
    }

    fn run(&self, batch: &[Claimed], _: &()) -> Outcome<Claimed, ()> {
        // The table owns retries: whatever happens here, the engine is done with
        // the batch. A failed settle leaves the rows leased; they come back when
        // the lease expires, so nothing is lost.
        if let Err(e) = self.settle(batch) {
            log::warn!(
                "settling {} rows failed ({e}); they return after their lease",
                batch.len()
            );
        }
        Outcome::Ok
    }
}

/// Keeps the leases of a task's claimed rows alive while long batches run: every
/// `interval` it extends them by the full lease. The lease must be at least three
/// intervals, so one missed beat never loses a lease. Dropping it stops the
/// thread and joins it.
pub struct PgHeartbeat {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for PgHeartbeat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgHeartbeat")
    }
}

impl PgHeartbeat {
    /// Starts beating for the rows `owner` holds in the queue of `config`.
    ///
    /// # Errors
    ///
    /// [`PgError::HeartbeatTooSlow`] when the lease is under three intervals;
    /// connection errors as [`PgQueue::connect`].
    pub fn start(
        url: &str,
        config: QueueConfig,
        owner: &str,
        interval: Duration,
    ) -> Result<Self, PgError> {
        if config.lease < interval * 3 {
            return Err(PgError::HeartbeatTooSlow);
        }
        let mut conn = PgQueue::connect(url, config.clone())?.with_owner(owner);
        let url = url.to_string();
        let owner = owner.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("lease-heartbeat".to_string())
            .spawn(move || {
                while !s.load(Ordering::SeqCst) {
                    if let Err(e) = conn.extend_leases() {
                        log::warn!("heartbeat failed ({e}); reconnecting");
                        match PgQueue::connect(&url, config.clone()) {
                            Ok(c) => conn = c.with_owner(&owner),
                            Err(e) => log::warn!("heartbeat reconnect failed ({e})"),
                        }
                    }
                    // Sleep in short steps so a stop is seen quickly.
                    let mut left = interval;
                    while !left.is_zero() && !s.load(Ordering::SeqCst) {
                        let step = left.min(Duration::from_millis(50));
                        std::thread::sleep(step);
                        left -= step;
                    }
                }
            })
            .map_err(|e| PgError::Io(e.to_string()))?;
        Ok(PgHeartbeat {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PgHeartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the heartbeat thread panicked");
            }
        }
    }
}

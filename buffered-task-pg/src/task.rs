//! The engine adapter: a [`Task`] whose `init` claims rows from the table and
//! whose `run` settles each batch in one SQL statement, on a connection of its
//! own worker.

use crate::config::{Claimed, Lease, NewRow, QueueConfig};
use crate::error::PgError;
use crate::leases::{Leases, PgHeartbeat};
use crate::ops::QueueStats;
use crate::queue::{parse_url, PgQueue, Settle, SettleReport};
use crate::throttle::Throttle;
use buffered_task::{worker_index, Builder, Outcome, OverflowReason, Sink, Task};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

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
    /// As `RetryRows`, and these new rows are enqueued in the same transaction.
    RetryRowsAndAdd {
        /// Rows of the batch that failed.
        retry: Vec<i64>,
        /// Their error.
        error: String,
        /// New rows to enqueue.
        add: Vec<NewRow>,
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

/// A claimed row inside an engine: the engine's entry type for [`PgTask`].
/// While it exists, its lease is in flight (a [`PgHeartbeat`] of the task keeps
/// it alive); dropping it (the engine settled, shed or dropped it) forgets the
/// lease, so a row the engine let go comes back when its lease ends.
pub struct PgRow {
    row: Claimed,
    leases: Leases,
}

impl PgRow {
    /// The claimed row.
    pub fn claimed(&self) -> &Claimed {
        &self.row
    }

    /// The row's id.
    pub fn id(&self) -> i64 {
        self.row.id
    }

    /// This claim's lease.
    pub fn lease(&self) -> Lease {
        self.row.lease
    }
}

impl std::fmt::Debug for PgRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgRow")
            .field("id", &self.row.id)
            .field("token", &self.row.lease.token)
            .field("attempts", &self.row.attempts)
            .finish_non_exhaustive()
    }
}

impl Drop for PgRow {
    fn drop(&mut self) {
        self.leases.forget([self.row.lease]);
    }
}

/// What a batch's settle writes.
#[derive(Default)]
struct Decided {
    done: Vec<Lease>,
    again: Vec<Lease>,
    error: String,
    bury: Vec<(Lease, String)>,
    add: Vec<NewRow>,
}

/// A [`PgTask`]'s counters, from [`PgProbe::counters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct TaskCounters {
    /// Rows claimed.
    pub claimed: u64,
    /// Rows deleted as done.
    pub done: u64,
    /// Rows sent back to run again (or to `dead`, attempts spent).
    pub retried: u64,
    /// Rows sent to `dead` (undecodable).
    pub buried: u64,
    /// Rows released (shed by the engine).
    pub released: u64,
    /// Rows whose settle found the lease lost (a stale claim: the row was
    /// taken back and is another claim's now).
    pub lost: u64,
    /// Batches whose settle failed for good (their rows come back after their
    /// lease).
    pub settle_failures: u64,
    /// Claims that failed.
    pub claim_failures: u64,
}

#[derive(Default)]
struct Counters {
    claimed: AtomicU64,
    done: AtomicU64,
    retried: AtomicU64,
    buried: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    settle_failures: AtomicU64,
    claim_failures: AtomicU64,
}

/// What the hooks, the probe and the task share: connections, leases,
/// counters.
struct Core {
    pg: postgres::Config,
    config: QueueConfig,
    /// For `init`'s claims, releases and probes (never used from inside
    /// another use: the lock is not held across user code).
    other: Arc<Mutex<PgQueue>>,
    /// One connection per worker, opened by `on_worker_start` (or on first
    /// use), used by that worker's `run` only.
    workers: RwLock<Vec<Arc<Mutex<PgQueue>>>>,
    leases: Leases,
    counters: Counters,
    throttle: Mutex<Throttle>,
    next_check: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How often the task checks the table's health (and logs its warnings).
const HEALTH_EVERY: Duration = Duration::from_secs(60);
/// Enqueue request records older than this are pruned by the task.
const REQUEST_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl Core {
    fn warn(&self, message: impl FnOnce() -> String) {
        lock(&self.throttle).warn(message);
    }

    fn worker(&self, w: usize) -> Arc<Mutex<PgQueue>> {
        if let Some(slot) = self
            .workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(w)
        {
            return slot.clone();
        }
        let mut slots = self.workers.write().unwrap_or_else(|p| p.into_inner());
        while slots.len() <= w {
            let q = PgQueue::lazy_valid(self.pg.clone(), self.config.clone());
            slots.push(Arc::new(Mutex::new(q)));
        }
        slots[w].clone()
    }

    fn open_worker(&self, w: usize) {
        if let Err(e) = lock(&self.worker(w)).ensure_connected() {
            self.warn(|| format!("worker {w}: cannot connect yet ({e}); its first run will retry"));
        }
    }

    fn close_worker(&self, w: usize) {
        lock(&self.worker(w)).disconnect();
    }

    fn release(&self, rows: &[PgRow]) {
        let leases: Vec<Lease> = rows.iter().map(PgRow::lease).collect();
        match lock(&self.other).release(&leases) {
            Ok(s) => {
                self.counters.released.fetch_add(s.rows, Ordering::Relaxed);
            }
            Err(e) => self.warn(|| {
                format!(
                    "release of {} shed rows failed ({e}); they come back after their lease",
                    leases.len()
                )
            }),
        }
    }

    /// Checks the table's health now and then, and logs what needs doing.
    fn maintain(&self) {
        let now = Instant::now();
        {
            let mut next = lock(&self.next_check);
            if next.is_some_and(|t| now < t) {
                return;
            }
            *next = Some(now + HEALTH_EVERY);
        }
        let mut q = lock(&self.other);
        match q.health() {
            Ok(h) => {
                for w in &h.warnings {
                    log::warn!("{}: {w}", self.config.queue);
                }
            }
            Err(e) => self.warn(|| format!("health check failed ({e})")),
        }
        if let Err(e) = q.prune_requests(REQUEST_RETENTION) {
            self.warn(|| format!("pruning old enqueue requests failed ({e})"));
        }
    }

    fn count(&self, r: &SettleReport) {
        let c = &self.counters;
        c.done.fetch_add(r.done, Ordering::Relaxed);
        c.retried.fetch_add(r.retried, Ordering::Relaxed);
        c.buried.fetch_add(r.buried, Ordering::Relaxed);
        c.lost.fetch_add(r.lost, Ordering::Relaxed);
    }
}

/// A [`Task`] over a shared PostgreSQL queue. Build its engine with
/// [`PgTask::builder`] (which opens one connection per worker in
/// `on_worker_start` and releases shed rows), and `poll` on: each `init` run
/// claims one chunk of rows (about `claim_chunk`), so leases do not expire while
/// rows wait in memory, and the engine polls again as soon as that chunk is
/// done. Each batch is settled in one statement on its worker's connection.
pub struct PgTask<H> {
    core: Arc<Core>,
    handler: H,
    claim_chunk: i64,
    patience: Duration,
    heartbeat: Option<PgHeartbeat>,
}

impl<H> std::fmt::Debug for PgTask<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTask")
            .field("queue", &self.core.config.queue)
            .field("claim_chunk", &self.claim_chunk)
            .finish_non_exhaustive()
    }
}

impl<H: RowHandler> PgTask<H> {
    /// A task for the queue in `config` on the server at `url`, claiming
    /// `claim_chunk` rows per `init` run (say 2 × max_concurrency × max_batch_size).
    ///
    /// # Errors
    ///
    /// A [`PgError`] when the settings are invalid or the first connection
    /// cannot be made (which also checks the table exists).
    pub fn new(
        url: &str,
        config: QueueConfig,
        handler: H,
        claim_chunk: i64,
    ) -> Result<Self, PgError> {
        let pg = parse_url(url)?;
        let mut first = PgQueue::connect_with(pg.clone(), config.clone())?;
        first.counts()?; // the table is there
        let patience = (config.lease / 2).min(Duration::from_secs(30));
        Ok(PgTask {
            core: Arc::new(Core {
                pg,
                config,
                other: Arc::new(Mutex::new(first)),
                workers: RwLock::new(Vec::new()),
                leases: Leases::new(),
                counters: Counters::default(),
                throttle: Mutex::new(Throttle::new(Duration::from_secs(10))),
                next_check: Mutex::new(None),
            }),
            handler,
            claim_chunk: claim_chunk.max(1),
            patience,
            heartbeat: None,
        })
    }

    /// Starts a heartbeat that extends the leases of the rows this task holds
    /// in flight (claimed, in the engine, not yet settled) every `interval`;
    /// the lease must be at least three intervals. Stopped with the task.
    ///
    /// # Errors
    ///
    /// [`PgError::HeartbeatTooSlow`], [`PgError::Io`].
    pub fn heartbeat(mut self, interval: Duration) -> Result<Self, PgError> {
        self.heartbeat = Some(PgHeartbeat::start_with(
            self.core.pg.clone(),
            self.core.config.clone(),
            &self.core.leases,
            interval,
        )?);
        Ok(self)
    }

    /// How long a settle that fails on a lost connection is retried (on a new
    /// connection, with backoff) before its rows are left to come back after
    /// their lease. Default: half the lease, at most 30 s.
    pub fn settle_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// A builder for this task's engine with the per-worker hooks wired (each
    /// worker opens its own connection in `on_worker_start` and closes it in
    /// `on_worker_stop`) and an overflow handler that releases shed rows at
    /// once. Setting those options again on the builder replaces them.
    pub fn builder(self) -> Builder<Self> {
        let (start, stop, shed) = (self.core.clone(), self.core.clone(), self.core.clone());
        Builder::new(self, ())
            .on_worker_start(move |w| start.open_worker(w))
            .on_worker_stop(move |w| stop.close_worker(w))
            .overflow_handler(move |rows: Vec<PgRow>, reason: OverflowReason| {
                log::debug!("{} rows shed ({reason}): released", rows.len());
                shed.release(&rows);
            })
    }

    /// Counters and queue metrics of this task, readable while the engine runs.
    pub fn probe(&self) -> PgProbe {
        PgProbe {
            core: self.core.clone(),
        }
    }

    /// The leases this task holds in flight.
    pub fn leases(&self) -> &Leases {
        &self.core.leases
    }

    /// For an overflow handler wired by hand: rows shed go back to `ready` at
    /// once (see [`PgTask::builder`], which does it).
    pub fn release(&self, rows: &[PgRow]) {
        self.core.release(rows);
    }

    fn connection(&self) -> Arc<Mutex<PgQueue>> {
        match worker_index() {
            Some(w) => self.core.worker(w),
            None => self.core.other.clone(),
        }
    }

    fn decide(&self, batch: &[PgRow]) -> Decided {
        let mut items = Vec::with_capacity(batch.len());
        let mut decoded = Vec::with_capacity(batch.len());
        let mut bury = Vec::new();
        for row in batch {
            match self.handler.decode(&row.row.payload) {
                Ok(item) => {
                    items.push((row.row.id, item));
                    decoded.push(row.row.lease);
                }
                Err(e) => bury.push((row.row.lease, format!("decode: {e}"))),
            }
        }
        if items.is_empty() {
            return Decided {
                bury,
                ..Decided::default()
            };
        }
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
        let split = |retry: &[i64]| -> (Vec<Lease>, Vec<Lease>) {
            let retry: HashSet<i64> = retry.iter().copied().collect();
            decoded.iter().partition(|l| !retry.contains(&l.id))
        };
        let mut d = Decided {
            bury,
            ..Decided::default()
        };
        match outcome {
            RowOutcome::Done => d.done = decoded,
            RowOutcome::Retry(error) => {
                d.again = decoded;
                d.error = error;
            }
            RowOutcome::RetryRows(retry, error) => {
                (d.done, d.again) = split(&retry);
                d.error = error;
            }
            RowOutcome::RetryRowsAndAdd { retry, error, add } => {
                (d.done, d.again) = split(&retry);
                d.error = error;
                d.add = add;
            }
        }
        d
    }

    /// Settles on this worker's connection; a lost connection is retried (each
    /// attempt reconnects, with backoff) for up to the patience.
    fn settle(&self, s: &Settle<'_>) {
        let start = Instant::now();
        let conn = self.connection();
        let mut q = lock(&conn);
        let rows = s.done.len() + s.again.len() + s.bury.len();
        loop {
            match q.settle(s) {
                Ok(report) => return self.core.count(&report),
                Err(e)
                    if e.is_connection()
                        && !matches!(e, PgError::CommitUnknown(_))
                        && start.elapsed() < self.patience =>
                {
                    self.core
                        .warn(|| format!("settling {rows} rows: connection lost ({e}); retrying"));
                }
                Err(e) => {
                    self.core
                        .counters
                        .settle_failures
                        .fetch_add(1, Ordering::Relaxed);
                    self.core.warn(|| {
                        format!(
                            "settling {rows} rows failed ({e}); they come back after their lease"
                        )
                    });
                    return;
                }
            }
        }
    }
}

impl<H: RowHandler> Task for PgTask<H> {
    type Entry = PgRow;
    type State = ();

    fn init(&self, sink: &mut Sink<PgRow>, _: &()) {
        self.core.maintain();
        let claimed = {
            let mut q = lock(&self.core.other);
            match q.claim(self.claim_chunk) {
                // Most often a connection that broke while idle (a server
                // restart): nothing was claimed, and the next poll may be far
                // off, so claim again at once on a new connection. (Had the
                // claim committed, its rows come back after their lease.)
                Err(e) if e.is_connection() => q.claim(self.claim_chunk),
                other => other,
            }
        };
        match claimed {
            Ok(rows) => {
                self.core
                    .counters
                    .claimed
                    .fetch_add(rows.len() as u64, Ordering::Relaxed);
                self.core.leases.hold(rows.iter().map(|r| r.lease));
                let leases = &self.core.leases;
                sink.extend(rows.into_iter().map(|row| PgRow {
                    row,
                    leases: leases.clone(),
                }));
            }
            Err(e) => {
                self.core
                    .counters
                    .claim_failures
                    .fetch_add(1, Ordering::Relaxed);
                self.core
                    .warn(|| format!("claim failed ({e}); polling again later"));
            }
        }
    }

    fn run(&self, batch: &[PgRow], _: &()) -> Outcome<PgRow, ()> {
        // The table owns retries: whatever happens here, the engine is done with
        // the batch. A failed settle leaves the rows leased; once the engine
        // drops them their leases are no longer extended, and they come back
        // when the lease expires, so nothing is lost.
        let d = self.decide(batch);
        self.settle(&Settle {
            done: &d.done,
            again: &d.again,
            error: &d.error,
            bury: &d.bury,
            add: &d.add,
        });
        Outcome::Ok
    }
}

/// Reads a [`PgTask`]'s counters and its queue's metrics while its engine runs.
#[derive(Clone)]
pub struct PgProbe {
    core: Arc<Core>,
}

impl std::fmt::Debug for PgProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgProbe")
            .field("queue", &self.core.config.queue)
            .finish_non_exhaustive()
    }
}

impl PgProbe {
    /// The task's counters.
    pub fn counters(&self) -> TaskCounters {
        let c = &self.core.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TaskCounters {
            claimed: get(&c.claimed),
            done: get(&c.done),
            retried: get(&c.retried),
            buried: get(&c.buried),
            released: get(&c.released),
            lost: get(&c.lost),
            settle_failures: get(&c.settle_failures),
            claim_failures: get(&c.claim_failures),
        }
    }

    /// Leases in flight (claimed and held by the engine).
    pub fn in_flight(&self) -> usize {
        self.core.leases.len()
    }

    /// The queue's metrics ([`PgQueue::stats`]), on the task's claiming
    /// connection.
    ///
    /// # Errors
    ///
    /// [`PgError`] from the query.
    pub fn queue_stats(&self) -> Result<QueueStats, PgError> {
        lock(&self.core.other).stats()
    }
}

//! The table, and the SQL for each step of a row's life.

use postgres::{Client, NoTls};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What went wrong talking to PostgreSQL.
#[derive(Debug)]
#[non_exhaustive]
pub enum PgError {
    /// The connection string could not be parsed.
    BadConnectionString(String),
    /// A blocking client cannot run inside a tokio runtime.
    InsideTokioRuntime,
    /// The queue's table is missing: call [`PgQueue::install`] first.
    NotInstalled,
    /// An error from the server or the connection (a lost connection included):
    /// nothing was settled by the failed call, so no row is lost; retry it.
    Db(postgres::Error),
    /// The operating system refused to start a thread.
    Io(String),
    /// A heartbeat must beat at least three times per lease.
    HeartbeatTooSlow,
}

impl fmt::Display for PgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PgError::BadConnectionString(e) => write!(f, "bad connection string: {e}"),
            PgError::InsideTokioRuntime => f.write_str(
                "the blocking PostgreSQL client cannot be used inside a tokio runtime; \
                 call it from a plain thread (e.g. tokio::task::spawn_blocking)",
            ),
            PgError::NotInstalled => {
                f.write_str("the queue table does not exist; call PgQueue::install() first")
            }
            PgError::Db(e) => write!(f, "database error: {e}"),
            PgError::Io(e) => write!(f, "could not start a thread: {e}"),
            PgError::HeartbeatTooSlow => {
                f.write_str("the lease must be at least three heartbeat intervals")
            }
        }
    }
}

impl std::error::Error for PgError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PgError::Db(e) => Some(e),
            _ => None,
        }
    }
}

impl From<postgres::Error> for PgError {
    fn from(e: postgres::Error) -> Self {
        // 42P01: undefined_table.
        if e.code().map(|c| c.code()) == Some("42P01") {
            PgError::NotInstalled
        } else {
            PgError::Db(e)
        }
    }
}

/// Settings of one logical queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    pub(crate) queue: String,
    pub(crate) lease: Duration,
    pub(crate) max_attempts: i32,
    pub(crate) backoff_base: Duration,
    pub(crate) backoff_cap: Duration,
    pub(crate) archive: bool,
}

impl QueueConfig {
    /// A queue named `queue`, with defaults: lease 60 s, 25 attempts, backoff
    /// from 1 s doubling to at most 1 h (with jitter).
    pub fn new(queue: impl Into<String>) -> Self {
        QueueConfig {
            queue: queue.into(),
            lease: Duration::from_secs(60),
            max_attempts: 25,
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(3600),
            archive: false,
        }
    }

    /// How long a claim holds its rows before another process may take them.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
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
    /// is drawn between half and all of that.
    pub fn backoff(mut self, base: Duration, cap: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_cap = cap.max(base);
        self
    }
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
}

/// How a settling call went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Settled {
    /// Rows written.
    pub rows: u64,
    /// Rows asked for whose lease was lost (another process holds them now).
    pub lost: u64,
}

/// One connection to a shared queue, with its own owner token.
pub struct PgQueue {
    client: Client,
    config: QueueConfig,
    owner: String,
}

impl fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgQueue")
            .field("queue", &self.config.queue)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

static TOKENS: AtomicU64 = AtomicU64::new(0);

fn new_owner() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{:x}-{:x}-{:x}",
        std::process::id(),
        nanos,
        TOKENS.fetch_add(1, Ordering::Relaxed)
    )
}

const TABLE: &str = "buffered_task_jobs";

impl PgQueue {
    /// Connects (without TLS) and takes a fresh owner token.
    ///
    /// # Errors
    ///
    /// [`PgError::InsideTokioRuntime`] when called inside a tokio runtime;
    /// [`PgError::BadConnectionString`]; [`PgError::Db`] when the server cannot be
    /// reached.
    pub fn connect(url: &str, config: QueueConfig) -> Result<Self, PgError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(PgError::InsideTokioRuntime);
        }
        let parsed: postgres::Config = url
            .parse()
            .map_err(|e: postgres::Error| PgError::BadConnectionString(e.to_string()))?;
        let mut client = parsed.connect(NoTls)?;
        // A commit lost in a server crash loses the whole transaction - a claim
        // (the row stays ready), or an ack with the effects written in it (the row
        // runs again, the effects are written once) - so waiting for the WAL flush
        // buys nothing here.
        client.batch_execute("SET synchronous_commit = off")?;
        Ok(PgQueue {
            client,
            config,
            owner: new_owner(),
        })
    }

    /// This connection's owner token (written into the rows it claims).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Uses `owner` as the token, so several connections of one process can
    /// settle each other's claims.
    pub fn with_owner(mut self, owner: &str) -> Self {
        self.owner = owner.to_string();
        self
    }

    /// Creates the table and its indexes if they do not exist. Idempotent, and safe
    /// to run from many processes at once (serialised by an advisory lock).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn install(&mut self) -> Result<(), PgError> {
        let mut tx = self.client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock(7384512093)", &[])?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {TABLE} (
                id bigserial PRIMARY KEY,
                queue text NOT NULL,
                payload bytea NOT NULL,
                dedup_key text,
                state text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'leased', 'dead')),
                attempts int NOT NULL DEFAULT 0,
                max_attempts int NOT NULL,
                run_after timestamptz NOT NULL DEFAULT now(),
                lease_until timestamptz,
                owner text,
                last_error text,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now()
            );
            CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_dedup
                ON {TABLE} (queue, dedup_key) WHERE dedup_key IS NOT NULL;
            CREATE INDEX IF NOT EXISTS {TABLE}_ready
                ON {TABLE} (queue, run_after, id) WHERE state = 'ready';
            CREATE INDEX IF NOT EXISTS {TABLE}_leased
                ON {TABLE} (queue, lease_until) WHERE state = 'leased';
            -- Every row is written twice and deleted: vacuum early and often, or
            -- dead tuples pile up ahead of the ready rows and every claim wades
            -- through them (seen here: 6.6 M dead tuples, claims 5x slower).
            ALTER TABLE {TABLE} SET (autovacuum_vacuum_scale_factor = 0.01,
                                     autovacuum_vacuum_threshold = 1000,
                                     autovacuum_vacuum_cost_delay = 0);
            CREATE TABLE IF NOT EXISTS {TABLE}_archive (
                id bigint PRIMARY KEY,
                queue text NOT NULL,
                payload bytea NOT NULL,
                dedup_key text,
                attempts int NOT NULL,
                created_at timestamptz NOT NULL,
                done_at timestamptz NOT NULL DEFAULT now()
            );"
        ))?;
        tx.commit()?;
        Ok(())
    }

    /// Inserts rows (payload, optional dedup key; a key already in the queue is
    /// skipped) and notifies listeners, in one transaction. Returns how many rows
    /// were inserted.
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`]: then nothing was inserted.
    pub fn enqueue(&mut self, rows: &[(Vec<u8>, Option<String>)]) -> Result<u64, PgError> {
        let mut tx = self.client.transaction()?;
        let inserted = insert(&mut tx, &self.config, rows)?;
        tx.commit()?;
        Ok(inserted)
    }

    /// Claims up to `n` rows: ready rows whose backoff has passed, and leased rows
    /// whose lease expired (a crashed or stalled process's work comes back). Each
    /// claim counts as an attempt.
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`]: then nothing was claimed.
    pub fn claim(&mut self, n: i64) -> Result<Vec<Claimed>, PgError> {
        let rows = self.client.query(
            &format!(
                "WITH ready AS (
                    SELECT id FROM {TABLE}
                    WHERE queue = $1 AND state = 'ready' AND run_after <= now()
                    ORDER BY run_after, id
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                 ), expired AS (
                    SELECT id FROM {TABLE}
                    WHERE queue = $1 AND state = 'leased' AND lease_until < now()
                    ORDER BY lease_until
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED
                 ), picked AS (
                    SELECT id FROM (SELECT id FROM expired UNION ALL SELECT id FROM ready) u
                    LIMIT $2
                 )
                 UPDATE {TABLE} j
                 SET state = 'leased', owner = $3, attempts = j.attempts + 1,
                     lease_until = now() + make_interval(secs => $4), updated_at = now()
                 FROM picked WHERE j.id = picked.id
                 RETURNING j.id, j.payload, j.attempts"
            ),
            &[
                &self.config.queue,
                &n,
                &self.owner,
                &self.config.lease.as_secs_f64(),
            ],
        )?;
        let mut claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                payload: r.get(1),
                attempts: r.get(2),
            })
            .collect();
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    fn settled(&self, asked: usize, rows: u64, what: &str) -> Settled {
        let lost = (asked as u64).saturating_sub(rows);
        if lost > 0 {
            log::warn!(
                "{}: {lost} of {asked} rows not {what}: their lease was lost",
                self.config.queue
            );
        }
        Settled { rows, lost }
    }

    /// Deletes done rows this connection still holds.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn ack(&mut self, ids: &[i64]) -> Result<Settled, PgError> {
        let rows = self
            .client
            .execute(&ack_sql(self.config.archive), &[&ids, &self.owner])?;
        Ok(self.settled(ids.len(), rows, "acknowledged"))
    }

    /// Deletes done rows this connection still holds and, in the same transaction,
    /// lets `effects` write the results for exactly the rows that were deleted:
    /// a row whose lease was lost is not passed, so its effect is never written
    /// twice (exactly-once effect).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`] from the delete or from `effects`: the transaction rolls
    /// back, nothing is settled, the rows come back after their lease.
    pub fn ack_with(
        &mut self,
        ids: &[i64],
        effects: impl FnOnce(&mut postgres::Transaction<'_>, &[i64]) -> Result<(), postgres::Error>,
    ) -> Result<Settled, PgError> {
        let owner = self.owner.clone();
        let archive = self.config.archive;
        let mut tx = self.client.transaction()?;
        let owned: Vec<i64> = tx
            .query(&ack_sql(archive), &[&ids, &owner])?
            .iter()
            .map(|r| r.get(0))
            .collect();
        effects(&mut tx, &owned)?;
        tx.commit()?;
        Ok(self.settled(ids.len(), owned.len() as u64, "acknowledged"))
    }

    /// Sends failed rows back to `ready` after a backoff, or to `dead` once their
    /// attempts are spent, keeping `error` as their last error.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn retry(&mut self, ids: &[i64], error: &str) -> Result<Settled, PgError> {
        let rows = self.client.execute(
            &retry_sql(),
            &[
                &ids,
                &self.owner,
                &self.config.backoff_base.as_secs_f64(),
                &self.config.backoff_cap.as_secs_f64(),
                &error,
            ],
        )?;
        Ok(self.settled(ids.len(), rows, "retried"))
    }

    /// Sends rows straight to `dead` with this error (a payload that cannot be
    /// decoded will never succeed).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn bury(&mut self, ids: &[i64], error: &str) -> Result<Settled, PgError> {
        let rows = self.client.execute(
            &format!(
                "UPDATE {TABLE} SET state = 'dead', last_error = $3, owner = NULL,
                     lease_until = NULL, updated_at = now()
                 WHERE id = ANY($1) AND owner = $2 AND state = 'leased'"
            ),
            &[&ids, &self.owner, &error],
        )?;
        Ok(self.settled(ids.len(), rows, "buried"))
    }

    /// Acknowledges `done`, retries `again` and enqueues `add` in one transaction
    /// ("retry these entries": the batch is settled all at once or not at all).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn settle_mixed(
        &mut self,
        done: &[i64],
        again: &[i64],
        error: &str,
        add: &[(Vec<u8>, Option<String>)],
    ) -> Result<Settled, PgError> {
        let owner = self.owner.clone();
        let config = self.config.clone();
        let mut tx = self.client.transaction()?;
        insert(&mut tx, &config, add)?;
        let deleted = tx.execute(&ack_sql(config.archive), &[&done, &owner])?;
        let retried = tx.execute(
            &retry_sql(),
            &[
                &again,
                &owner,
                &config.backoff_base.as_secs_f64(),
                &config.backoff_cap.as_secs_f64(),
                &error,
            ],
        )?;
        tx.commit()?;
        Ok(self.settled(done.len() + again.len(), deleted + retried, "settled"))
    }

    /// Releases rows at once (shed under memory pressure): back to `ready`, and the
    /// claim does not count as an attempt.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn release(&mut self, ids: &[i64]) -> Result<Settled, PgError> {
        let rows = self.client.execute(
            &format!(
                "UPDATE {TABLE}
                 SET state = 'ready', attempts = greatest(attempts - 1, 0), owner = NULL,
                     lease_until = NULL, run_after = now(), updated_at = now()
                 WHERE id = ANY($1) AND owner = $2 AND state = 'leased'"
            ),
            &[&ids, &self.owner],
        )?;
        Ok(self.settled(ids.len(), rows, "released"))
    }

    /// Extends the lease of every row this owner holds in this queue by the full
    /// lease from now (the heartbeat of long batches). Returns the rows extended.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn extend_leases(&mut self) -> Result<u64, PgError> {
        Ok(self.client.execute(
            &format!(
                "UPDATE {TABLE} SET lease_until = now() + make_interval(secs => $3)
                 WHERE queue = $1 AND owner = $2 AND state = 'leased'"
            ),
            &[
                &self.config.queue,
                &self.owner,
                &self.config.lease.as_secs_f64(),
            ],
        )?)
    }

    /// Seconds until a row's lease runs out, by the database's clock (`None`: the
    /// row is not leased).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn lease_left(&mut self, id: i64) -> Result<Option<f64>, PgError> {
        let row = self.client.query_opt(
            &format!(
                "SELECT extract(epoch FROM lease_until - now())::float8 FROM {TABLE}
                 WHERE id = $1 AND state = 'leased'"
            ),
            &[&id],
        )?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Rows of this queue by state: (ready, leased, dead).
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`].
    pub fn counts(&mut self) -> Result<(i64, i64, i64), PgError> {
        let row = self.client.query_one(
            &format!(
                "SELECT count(*) FILTER (WHERE state = 'ready'),
                        count(*) FILTER (WHERE state = 'leased'),
                        count(*) FILTER (WHERE state = 'dead')
                 FROM {TABLE} WHERE queue = $1"
            ),
            &[&self.config.queue],
        )?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// The last error stored for a row, if the row exists.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn last_error(&mut self, id: i64) -> Result<Option<String>, PgError> {
        let row = self.client.query_opt(
            &format!("SELECT last_error FROM {TABLE} WHERE id = $1"),
            &[&id],
        )?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Removes every row of this queue, archived ones too (for tests and tools).
    /// Returns the live rows removed.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn purge(&mut self) -> Result<u64, PgError> {
        self.client.execute(
            &format!("DELETE FROM {TABLE}_archive WHERE queue = $1"),
            &[&self.config.queue],
        )?;
        Ok(self.client.execute(
            &format!("DELETE FROM {TABLE} WHERE queue = $1"),
            &[&self.config.queue],
        )?)
    }

    /// Archived rows of this queue (with [`QueueConfig::archive`]).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn archived(&mut self) -> Result<i64, PgError> {
        Ok(self
            .client
            .query_one(
                &format!("SELECT count(*) FROM {TABLE}_archive WHERE queue = $1"),
                &[&self.config.queue],
            )?
            .get(0))
    }
}

/// Inserts rows (a dedup key already in the queue is skipped) and notifies
/// listeners, inside the caller's transaction. Returns the rows inserted.
fn insert(
    tx: &mut postgres::Transaction<'_>,
    config: &QueueConfig,
    rows: &[(Vec<u8>, Option<String>)],
) -> Result<u64, postgres::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let payloads: Vec<&[u8]> = rows.iter().map(|(p, _)| p.as_slice()).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|(_, k)| k.as_deref()).collect();
    let inserted = tx.execute(
        &format!(
            "INSERT INTO {TABLE} (queue, payload, dedup_key, max_attempts)
             SELECT $1, p, k, $4 FROM unnest($2::bytea[], $3::text[]) AS u(p, k)
             ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL DO NOTHING"
        ),
        &[&config.queue, &payloads, &keys, &config.max_attempts],
    )?;
    if inserted > 0 {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&notify_channel(&config.queue), &config.queue],
        )?;
    }
    Ok(inserted)
}

/// Deletes the rows (ids $1) the owner ($2) still holds, returning their ids; with
/// `archive`, copies them into the archive table in the same statement.
fn ack_sql(archive: bool) -> String {
    let delete =
        format!("DELETE FROM {TABLE} WHERE id = ANY($1) AND owner = $2 AND state = 'leased'");
    if archive {
        format!(
            "WITH gone AS ({delete} RETURNING id, queue, payload, dedup_key, attempts, created_at)
             INSERT INTO {TABLE}_archive (id, queue, payload, dedup_key, attempts, created_at)
             SELECT id, queue, payload, dedup_key, attempts, created_at FROM gone
             RETURNING id"
        )
    } else {
        format!("{delete} RETURNING id")
    }
}

/// Back to `ready` after a backoff (exponential, capped, with jitter: between half
/// and all of it), or to `dead` once the attempts are spent; keeps the last error.
/// Parameters: ids, owner, backoff base (s), cap (s), error.
fn retry_sql() -> String {
    format!(
        "UPDATE {TABLE}
         SET state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'ready' END,
             run_after = now() + make_interval(secs =>
                 least($4::float8, $3::float8 * power(2, greatest(attempts - 1, 0)))
                 * (0.5 + random() / 2)),
             last_error = $5, owner = NULL, lease_until = NULL, updated_at = now()
         WHERE id = ANY($1) AND owner = $2 AND state = 'leased'"
    )
}

/// The NOTIFY channel of a queue.
pub(crate) fn notify_channel(queue: &str) -> String {
    format!("buffered_task_{queue}")
}

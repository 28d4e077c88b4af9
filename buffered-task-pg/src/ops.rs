//! Operations: dead rows (list, requeue, discard), queue metrics, and the
//! table's health (dead tuples, the xmin horizon, autovacuum).

use crate::error::PgError;
use crate::queue::PgQueue;
use crate::sql::TABLE;
use std::time::{Duration, SystemTime};

/// A dead row, as [`PgQueue::dead_rows`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadRow {
    /// The row's id.
    pub id: i64,
    /// Its payload.
    pub payload: Vec<u8>,
    /// Its dedup key.
    pub dedup_key: Option<String>,
    /// Its priority.
    pub priority: i16,
    /// Attempts made.
    pub attempts: i32,
    /// The attempts it was allowed.
    pub max_attempts: i32,
    /// Why it died: the handler's last error, the decode error, or the expired
    /// leases that spent its attempts.
    pub last_error: Option<String>,
    /// When it was enqueued.
    pub created_at: SystemTime,
    /// When it died.
    pub died_at: SystemTime,
}

/// Which dead rows an operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Select<'a> {
    /// These ids (ids of rows that are not dead in this queue are ignored).
    Ids(&'a [i64]),
    /// Every dead row of the queue.
    All,
}

/// What [`PgQueue::requeue_dead`] did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Requeued {
    /// Rows sent back to `ready`, with their attempts reset.
    pub requeued: u64,
    /// Dead rows left dead because a live row holds their dedup key (or a
    /// newer dead row with the same key was requeued instead).
    pub key_taken: Vec<i64>,
}

/// A queue's metrics, from [`PgQueue::stats`].
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct QueueStats {
    /// Rows ready to be claimed now.
    pub ready: i64,
    /// Rows ready after a backoff that has not passed yet.
    pub scheduled: i64,
    /// Rows leased (claimed and not settled).
    pub leased: i64,
    /// Leased rows whose lease has expired (the next claim takes them back).
    pub expired: i64,
    /// Dead rows.
    pub dead: i64,
    /// How long the oldest row ready now has been ready (`None`: none is).
    pub oldest_ready_age: Option<Duration>,
    /// Leases that expired and were taken back, since the queue's first one.
    pub lost_leases: i64,
    /// (attempts, rows) for the queue's live and dead rows, by attempts.
    pub attempts: Vec<(i32, i64)>,
    /// The table's health.
    pub health: Health,
}

/// The queue table's health: what makes claims slow down over time.
///
/// Every row is written twice and then deleted, so the table piles up dead
/// tuples that only VACUUM removes; a claim passes every one that lies ahead of
/// the ready rows. VACUUM cannot remove tuples that a transaction open anywhere
/// on the server may still see (the xmin horizon): one long transaction, an
/// abandoned replication slot or a forgotten prepared transaction lets them
/// pile up whatever autovacuum does.
#[derive(Debug, Clone, PartialEq, Default)]
#[non_exhaustive]
pub struct Health {
    /// Dead tuples in the table (the server's statistics, updated within a
    /// second or so).
    pub dead_tuples: i64,
    /// Live tuples in the table (all queues).
    pub live_tuples: i64,
    /// The last VACUUM of the table, by hand or by autovacuum.
    pub last_vacuum: Option<SystemTime>,
    /// Whether autovacuum runs on this table (server setting and table option).
    pub autovacuum: bool,
    /// The oldest open transaction holding a snapshot, other than this
    /// connection's: how long it has been open, and its process id.
    pub oldest_transaction: Option<(Duration, i32)>,
    /// The age (in transactions) of the oldest xmin held by a session, a
    /// replication slot or a prepared transaction.
    pub xmin_age: Option<i32>,
    /// What needs doing, in words (empty: nothing).
    pub warnings: Vec<String>,
}

/// Dead tuples past which (and past the live ones) a warning is given.
const DEAD_TUPLES_WARN: i64 = 100_000;
/// A transaction open longer holds the horizon back: warned.
const LONG_TRANSACTION: Duration = Duration::from_secs(60);
/// An xmin older than this many transactions: warned.
const OLD_XMIN: i32 = 10_000_000;

impl Health {
    fn judge(&mut self) {
        let mut w = Vec::new();
        if !self.autovacuum {
            w.push(format!(
                "autovacuum is off for {TABLE}: nothing removes the dead tuples that claims \
                 and acks leave, and claims slow down as they pile up; turn it on, or VACUUM \
                 the table regularly (PgQueue::vacuum)"
            ));
        }
        if self.dead_tuples > DEAD_TUPLES_WARN && self.dead_tuples > self.live_tuples {
            w.push(format!(
                "{} dead tuples in {TABLE} ({} live): claims pass them and slow down; VACUUM it",
                self.dead_tuples, self.live_tuples
            ));
        }
        if let Some((age, pid)) = self.oldest_transaction {
            if age > LONG_TRANSACTION {
                w.push(format!(
                    "a transaction (pid {pid}) has been open for {}s: it holds back the xmin \
                     horizon, so VACUUM cannot remove dead tuples and claims slow down",
                    age.as_secs()
                ));
            }
        }
        if let Some(age) = self.xmin_age {
            if age > OLD_XMIN {
                w.push(format!(
                    "the oldest xmin is {age} transactions old (a long transaction, a \
                     replication slot or a prepared transaction): dead tuples cannot be removed"
                ));
            }
        }
        self.warnings = w;
    }
}

impl PgQueue {
    /// Up to `limit` dead rows of this queue with ids above `after_id`, by id
    /// (page with the last id seen).
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`].
    pub fn dead_rows(&mut self, after_id: i64, limit: i64) -> Result<Vec<DeadRow>, PgError> {
        let queue = self.config().queue.clone();
        let rows = self.with_client(|c| {
            c.query(
                &format!(
                    "SELECT id, payload, dedup_key, priority, attempts, max_attempts, last_error,
                            created_at, updated_at
                     FROM {TABLE} WHERE queue = $1 AND state = 'dead' AND id > $2
                     ORDER BY id LIMIT $3"
                ),
                &[&queue, &after_id, &limit.max(0)],
            )
        })?;
        Ok(rows
            .iter()
            .map(|r| DeadRow {
                id: r.get(0),
                payload: r.get(1),
                dedup_key: r.get(2),
                priority: r.get(3),
                attempts: r.get(4),
                max_attempts: r.get(5),
                last_error: r.get(6),
                created_at: r.get(7),
                died_at: r.get(8),
            })
            .collect())
    }

    /// Sends dead rows back to `ready` with their attempts reset (their last
    /// error is kept), and notifies listeners. A row whose dedup key a live row
    /// holds stays dead and is reported. Durable even under relaxed settles.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`] (nothing was requeued); SQLSTATE 23505 if a row with the
    /// same key was enqueued at the same moment: call again.
    pub fn requeue_dead(&mut self, which: Select<'_>) -> Result<Requeued, PgError> {
        let (all, ids) = select(which);
        let queue = self.config().queue.clone();
        let channel = crate::config::notify_channel(&queue);
        self.with_durable_tx(|tx| {
            let row = tx.query_one(
                &format!(
                    "WITH cand AS (
                        SELECT id, dedup_key FROM {TABLE}
                        WHERE queue = $1 AND state = 'dead' AND ($2 OR id = ANY($3))
                        FOR UPDATE),
                     newest AS (
                        SELECT id FROM (
                            SELECT id, row_number() OVER (PARTITION BY dedup_key ORDER BY id DESC) AS n
                            FROM cand WHERE dedup_key IS NOT NULL) x
                        WHERE n > 1),
                     blocked AS (
                        SELECT c.id FROM cand c
                        WHERE c.dedup_key IS NOT NULL AND EXISTS (
                            SELECT 1 FROM {TABLE} l
                            WHERE l.queue = $1 AND l.dedup_key = c.dedup_key AND l.state <> 'dead')
                        UNION SELECT id FROM newest),
                     up AS (
                        UPDATE {TABLE} j
                        SET state = 'ready', attempts = 0, run_after = now(), owner = NULL,
                            lease_until = NULL, updated_at = now()
                        FROM cand
                        WHERE j.id = cand.id AND cand.id NOT IN (SELECT id FROM blocked)
                        RETURNING j.id)
                     SELECT (SELECT count(*) FROM up),
                            ARRAY(SELECT id FROM blocked ORDER BY id),
                            CASE WHEN EXISTS (SELECT 1 FROM up) THEN pg_notify($4, '') END"
                ),
                &[&queue, &all, &ids, &channel],
            )?;
            let n: i64 = row.get(0);
            Ok(Requeued {
                requeued: n as u64,
                key_taken: row.get(1),
            })
        })
    }

    /// Deletes dead rows. Returns how many. Durable even under relaxed settles.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was deleted.
    pub fn discard_dead(&mut self, which: Select<'_>) -> Result<u64, PgError> {
        let (all, ids) = select(which);
        let queue = self.config().queue.clone();
        self.with_durable_tx(|tx| {
            tx.execute(
                &format!(
                    "DELETE FROM {TABLE} WHERE queue = $1 AND state = 'dead' AND ($2 OR id = ANY($3))"
                ),
                &[&queue, &all, &ids],
            )
        })
    }

    /// The queue's metrics: depth per state, the oldest ready row's age, lost
    /// leases, the attempts histogram, and the table's [`Health`].
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`].
    pub fn stats(&mut self) -> Result<QueueStats, PgError> {
        let queue = self.config().queue.clone();
        let mut stats = self.with_client(|c| {
            let r = c.query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE state = 'ready' AND run_after <= now()),
                            count(*) FILTER (WHERE state = 'ready' AND run_after > now()),
                            count(*) FILTER (WHERE state = 'leased'),
                            count(*) FILTER (WHERE state = 'leased' AND lease_until < now()),
                            count(*) FILTER (WHERE state = 'dead'),
                            extract(epoch FROM now() - min(run_after)
                                FILTER (WHERE state = 'ready' AND run_after <= now()))::float8,
                            coalesce((SELECT leases_expired FROM buffered_task_counters
                                      WHERE queue = $1), 0)
                     FROM {TABLE} WHERE queue = $1"
                ),
                &[&queue],
            )?;
            let attempts = c
                .query(
                    &format!(
                        "SELECT attempts, count(*) FROM {TABLE} WHERE queue = $1
                         GROUP BY attempts ORDER BY attempts"
                    ),
                    &[&queue],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            let age: Option<f64> = r.get(5);
            Ok(QueueStats {
                ready: r.get(0),
                scheduled: r.get(1),
                leased: r.get(2),
                expired: r.get(3),
                dead: r.get(4),
                oldest_ready_age: age.and_then(|s| Duration::try_from_secs_f64(s.max(0.0)).ok()),
                lost_leases: r.get(6),
                attempts,
                health: Health::default(),
            })
        })?;
        stats.health = self.health()?;
        Ok(stats)
    }

    /// The table's [`Health`], with warnings.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn health(&mut self) -> Result<Health, PgError> {
        let mut h = self.with_client(|c| {
            let r = c.query_one(
                &format!(
                    "WITH t AS (SELECT to_regclass('{TABLE}') AS oid),
                     s AS (SELECT n_dead_tup, n_live_tup,
                                  greatest(last_vacuum, last_autovacuum) AS vacuumed
                           FROM pg_stat_user_tables WHERE relid = (SELECT oid FROM t)),
                     oldest AS (SELECT pid, extract(epoch FROM now() - xact_start)::float8 AS secs
                                FROM pg_stat_activity
                                WHERE backend_xmin IS NOT NULL AND pid <> pg_backend_pid()
                                  AND xact_start IS NOT NULL
                                ORDER BY xact_start LIMIT 1)
                     SELECT coalesce((SELECT n_dead_tup FROM s), 0),
                            coalesce((SELECT n_live_tup FROM s), 0),
                            (SELECT vacuumed FROM s),
                            current_setting('autovacuum') = 'on' AND coalesce((
                                SELECT option_value FROM pg_options_to_table(
                                    (SELECT reloptions FROM pg_class WHERE oid = (SELECT oid FROM t)))
                                WHERE option_name = 'autovacuum_enabled'), 'true')
                                NOT IN ('false', 'off', 'no', '0'),
                            (SELECT secs FROM oldest), (SELECT pid FROM oldest),
                            greatest(
                                (SELECT max(age(backend_xmin)) FROM pg_stat_activity
                                 WHERE pid <> pg_backend_pid()),
                                (SELECT max(age(xmin)) FROM pg_replication_slots),
                                (SELECT max(age(transaction)) FROM pg_prepared_xacts))"
                ),
                &[],
            )?;
            let secs: Option<f64> = r.get(4);
            let pid: Option<i32> = r.get(5);
            Ok(Health {
                dead_tuples: r.get(0),
                live_tuples: r.get(1),
                last_vacuum: r.get(2),
                autovacuum: r.get(3),
                oldest_transaction: secs
                    .zip(pid)
                    .and_then(|(s, p)| Some((Duration::try_from_secs_f64(s.max(0.0)).ok()?, p))),
                xmin_age: r.get(6),
                warnings: Vec::new(),
            })
        })?;
        h.judge();
        Ok(h)
    }

    /// Runs `VACUUM (ANALYZE)` on the queue table (for servers where autovacuum
    /// is off or cannot keep up). It waits for nothing but the vacuum itself,
    /// and is not bounded by the statement timeout.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn vacuum(&mut self) -> Result<(), PgError> {
        let timeout_ms = self.config().statement_timeout.as_millis();
        self.with_client(|c| {
            // One statement per call: VACUUM cannot run in a multi-statement
            // (implicit transaction) batch.
            c.batch_execute("SET statement_timeout = 0")?;
            let vacuumed = c.batch_execute(&format!("VACUUM (ANALYZE) {TABLE}"));
            c.batch_execute(&format!("SET statement_timeout = {timeout_ms}"))?;
            vacuumed
        })
    }
}

fn select(which: Select<'_>) -> (bool, Vec<i64>) {
    match which {
        Select::All => (true, Vec::new()),
        Select::Ids(ids) => (false, ids.to_vec()),
    }
}

#[cfg(feature = "metrics")]
impl QueueStats {
    /// Sets gauges through the `metrics` facade, labelled with the queue:
    /// `buffered_task_pg_rows{state}`, `buffered_task_pg_oldest_ready_seconds`,
    /// `buffered_task_pg_lost_leases`, `buffered_task_pg_attempts_rows{attempts}`,
    /// `buffered_task_pg_dead_tuples`, `buffered_task_pg_oldest_transaction_seconds`.
    pub fn publish(&self, queue: &str) {
        let q = queue.to_string();
        for (state, n) in [
            ("ready", self.ready),
            ("scheduled", self.scheduled),
            ("leased", self.leased),
            ("expired", self.expired),
            ("dead", self.dead),
        ] {
            metrics::gauge!("buffered_task_pg_rows", "queue" => q.clone(), "state" => state)
                .set(n as f64);
        }
        metrics::gauge!("buffered_task_pg_oldest_ready_seconds", "queue" => q.clone())
            .set(self.oldest_ready_age.map_or(0.0, |d| d.as_secs_f64()));
        metrics::gauge!("buffered_task_pg_lost_leases", "queue" => q.clone())
            .set(self.lost_leases as f64);
        for (attempts, n) in &self.attempts {
            metrics::gauge!("buffered_task_pg_attempts_rows", "queue" => q.clone(),
                "attempts" => attempts.to_string())
            .set(*n as f64);
        }
        metrics::gauge!("buffered_task_pg_dead_tuples", "queue" => q.clone())
            .set(self.health.dead_tuples as f64);
        metrics::gauge!("buffered_task_pg_oldest_transaction_seconds", "queue" => q).set(
            self.health
                .oldest_transaction
                .map_or(0.0, |(d, _)| d.as_secs_f64()),
        );
    }
}

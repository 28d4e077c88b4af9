//! One connection to a shared queue: it reconnects by itself, prepares each
//! statement once, and runs each step of a row's life.

use crate::config::{notify_channel, Claimed, Enqueued, Lease, NewRow, QueueConfig, Settled};
use crate::error::{is_connection_error, PgError};
use crate::sql::{install_sql, Sql, SCHEMA_CHECK, SCHEMA_VERSION, TABLE};
use crate::throttle::Throttle;
use postgres::{Client, NoTls, Statement};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// First wait before a reconnection after a failed one; it doubles up to
/// [`MAX_RECONNECT_WAIT`].
const FIRST_RECONNECT_WAIT: Duration = Duration::from_millis(50);
/// Longest wait before a reconnection: a call never waits longer than this
/// (plus the connect timeout) for a connection.
const MAX_RECONNECT_WAIT: Duration = Duration::from_secs(2);
/// Connect timeout when the connection string sets none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// An open connection and the statements prepared on it.
struct Conn {
    client: Client,
    prepared: HashMap<Sql, Statement>,
}

impl Conn {
    fn statement(&mut self, sql: Sql) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.prepared.get(&sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(&sql.text())?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }
}

/// A connection to a shared queue, with its own owner name (written into the
/// rows it claims, for diagnostics; the fence of every settle is the claim's
/// token, see [`Lease`]).
///
/// It reconnects by itself: a call that finds the connection broken (the server
/// restarted, crashed, or dropped it) reconnects first, waiting between failed
/// attempts (from 50 ms, doubling to 2 s) so that a caller in a loop is paced,
/// and logging at most one warning per 10 s. Settles (acks, retries, burials,
/// releases, extensions) are repeated once on a fresh connection when the
/// connection breaks under them: they are fenced, so repeating one is safe.
pub struct PgQueue {
    conn: Option<Conn>,
    pg: postgres::Config,
    config: QueueConfig,
    owner: String,
    channel: String,
    /// The `synchronous_commit` level an enqueue commits with.
    durable_level: String,
    failures: u32,
    next_try: Option<Instant>,
    throttle: Throttle,
    reap_due: Option<Instant>,
    reconnects: u64,
    ever_connected: bool,
    lost: u64,
}

impl fmt::Debug for PgQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgQueue")
            .field("queue", &self.config.queue)
            .field("owner", &self.owner)
            .field("connected", &self.conn.is_some())
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

/// Parses a connection string: key=value pairs or a `postgres://` URL.
pub(crate) fn parse_url(url: &str) -> Result<postgres::Config, PgError> {
    url.parse()
        .map_err(|e: postgres::Error| PgError::BadConnectionString(e.to_string()))
}

/// Fills in what a connection string left unset: a connect timeout and TCP
/// keepalives, so that no connection attempt or dead peer blocks for ever.
pub(crate) fn harden(mut pg: postgres::Config) -> postgres::Config {
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(CONNECT_TIMEOUT);
    }
    pg.keepalives(true);
    pg.keepalives_idle(Duration::from_secs(30));
    pg
}

impl PgQueue {
    /// Connects (without TLS); `url` is a `key=value` string or a
    /// `postgres://` URL.
    ///
    /// # Errors
    ///
    /// [`PgError::InsideTokioRuntime`] when called inside a tokio runtime;
    /// [`PgError::BadConnectionString`]; [`PgError::BadConfig`];
    /// [`PgError::Db`] when the server cannot be reached.
    pub fn connect(url: &str, config: QueueConfig) -> Result<Self, PgError> {
        Self::connect_with(parse_url(url)?, config)
    }

    /// Connects with a parsed configuration (e.g. one with extra `options`).
    ///
    /// # Errors
    ///
    /// As [`PgQueue::connect`].
    pub fn connect_with(pg: postgres::Config, config: QueueConfig) -> Result<Self, PgError> {
        let mut q = Self::lazy(pg, config)?;
        q.open()?;
        Ok(q)
    }

    /// A queue handle that connects on its first call (no I/O here).
    ///
    /// # Errors
    ///
    /// [`PgError::BadConnectionString`], [`PgError::BadConfig`].
    pub fn connect_lazily(url: &str, config: QueueConfig) -> Result<Self, PgError> {
        Self::lazy(parse_url(url)?, config)
    }

    pub(crate) fn lazy(pg: postgres::Config, config: QueueConfig) -> Result<Self, PgError> {
        config.validate()?;
        Ok(Self::lazy_valid(pg, config))
    }

    /// As `lazy`, for settings already validated.
    pub(crate) fn lazy_valid(pg: postgres::Config, config: QueueConfig) -> Self {
        PgQueue {
            conn: None,
            pg: harden(pg),
            channel: notify_channel(&config.queue),
            config,
            owner: new_owner(),
            durable_level: "on".to_string(),
            failures: 0,
            next_try: None,
            throttle: Throttle::new(Duration::from_secs(10)),
            reap_due: None,
            reconnects: 0,
            ever_connected: false,
            lost: 0,
        }
    }

    /// This connection's owner name (written into the rows it claims).
    pub fn owner(&self) -> &str {
        &self.owner
    }

    /// Uses `owner` as the name written into claimed rows.
    pub fn with_owner(mut self, owner: &str) -> Self {
        self.owner = owner.to_string();
        self
    }

    /// The queue's settings.
    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Reconnections made since this handle was created.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Leases given to settles of this handle that found their row gone or
    /// taken (see [`Settled::lost`]), in total.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Closes the connection; the next call opens a new one.
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    /// Opens the connection now if none is open (waiting out the backoff after
    /// a failed attempt).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`] when the server cannot be reached.
    pub fn ensure_connected(&mut self) -> Result<(), PgError> {
        self.open().map(drop)
    }

    /// The server process of the current connection (connecting first if
    /// needed): for diagnostics, e.g. its CPU time or `pg_stat_activity`.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn backend_pid(&mut self) -> Result<i32, PgError> {
        let row = self.run_repeatable(|c| c.client.query_one("SELECT pg_backend_pid()", &[]))?;
        Ok(row.get(0))
    }

    /// Whether a connection is open (it may still turn out broken).
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.client.is_closed())
    }

    /// Opens the connection if there is none, waiting out the backoff after a
    /// failed attempt.
    fn open(&mut self) -> Result<&mut Conn, PgError> {
        if self.conn.as_ref().is_some_and(|c| c.client.is_closed()) {
            self.conn = None;
        }
        if self.conn.is_none() {
            if tokio::runtime::Handle::try_current().is_ok() {
                return Err(PgError::InsideTokioRuntime);
            }
            if let Some(at) = self.next_try {
                let now = Instant::now();
                if at > now {
                    std::thread::sleep(at - now); // at most MAX_RECONNECT_WAIT
                }
            }
            match self.new_connection() {
                Ok(conn) => {
                    if self.failures > 0 {
                        log::info!(
                            "{}: reconnected after {} failed attempts",
                            self.config.queue,
                            self.failures
                        );
                    }
                    if self.ever_connected {
                        self.reconnects += 1;
                    }
                    self.ever_connected = true;
                    self.failures = 0;
                    self.next_try = None;
                    self.conn = Some(conn);
                }
                Err(e) => {
                    self.failures = self.failures.saturating_add(1);
                    let wait = FIRST_RECONNECT_WAIT
                        .saturating_mul(1 << self.failures.min(10))
                        .min(MAX_RECONNECT_WAIT);
                    self.next_try = Some(Instant::now() + wait);
                    let (queue, failures) = (self.config.queue.clone(), self.failures);
                    self.throttle.warn(|| {
                        format!("{queue}: cannot connect ({e}); attempt {failures}, retrying")
                    });
                    return Err(e);
                }
            }
        }
        Ok(self.conn.as_mut().expect("just opened"))
    }

    fn new_connection(&mut self) -> Result<Conn, PgError> {
        let mut client = self.pg.connect(NoTls)?;
        let current = match client.simple_query("SHOW synchronous_commit")?.first() {
            Some(postgres::SimpleQueryMessage::Row(r)) => r.get(0).unwrap_or("on").to_string(),
            _ => "on".to_string(),
        };
        let timeout_ms = self.config.statement_timeout.as_millis();
        let mut setup = format!("SET statement_timeout = {timeout_ms};");
        self.durable_level = if current == "off" {
            "on".to_string()
        } else {
            current.clone()
        };
        if self.config.relaxed_settles {
            setup.push_str("SET synchronous_commit = off;");
        } else if current == "off" {
            // An enqueue that returned Ok must be on disk, whatever the server's
            // default says.
            setup.push_str("SET synchronous_commit = on;");
        }
        client.batch_execute(&setup)?;
        Ok(Conn {
            client,
            prepared: HashMap::new(),
        })
    }

    /// Runs `f` on the connection; a broken connection is dropped (the next call
    /// reconnects).
    fn run<R>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<R, postgres::Error>,
    ) -> Result<R, PgError> {
        let conn = self.open()?;
        match f(conn) {
            Ok(r) => Ok(r),
            Err(e) => {
                if is_connection_error(&e) {
                    self.conn = None;
                    // Reconnect at once the first time (the server may be
                    // back already); the backoff starts with a failed attempt.
                    self.next_try = None;
                }
                Err(e.into())
            }
        }
    }

    /// As `run`, for a call whose last statement commits: a connection lost
    /// under it leaves the outcome unknown.
    fn run_commit<R>(
        &mut self,
        f: impl FnOnce(&mut Conn) -> Result<R, postgres::Error>,
    ) -> Result<R, PgError> {
        self.open()?; // a failure here sent nothing
        match self.run(f) {
            Err(PgError::Db(e)) if e.as_db_error().is_none() => Err(PgError::CommitUnknown(e)),
            other => other,
        }
    }

    /// As `run`, for calls that are safe to repeat (fenced settles, reads):
    /// repeated once on a fresh connection when the connection broke under the
    /// first attempt.
    fn run_repeatable<R>(
        &mut self,
        mut f: impl FnMut(&mut Conn) -> Result<R, postgres::Error>,
    ) -> Result<R, PgError> {
        match self.run(&mut f) {
            Err(e) if e.is_connection() => self.run(f),
            other => other,
        }
    }

    /// Creates the tables and indexes if they do not exist, or brings an older
    /// schema up to date. Idempotent, and safe to run from many processes at once
    /// (serialised by an advisory lock); with the schema in place it writes and
    /// locks nothing.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn install(&mut self) -> Result<(), PgError> {
        self.run(|c| {
            let row = c.client.query_one(SCHEMA_CHECK, &[])?;
            let (version, no_old_index): (Option<String>, bool) = (row.get(0), row.get(1));
            if version.as_deref() == Some(SCHEMA_VERSION) && no_old_index {
                return Ok(());
            }
            let mut tx = c.client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock(7384512093)", &[])?;
            tx.batch_execute(&install_sql())?;
            tx.commit()
        })?;
        // Statements prepared before a schema change may be stale.
        if let Some(c) = self.conn.as_mut() {
            c.prepared.clear();
        }
        Ok(())
    }

    /// Inserts rows and notifies listeners, in one statement. A row whose dedup
    /// key a `ready` or `leased` row holds is skipped, and reported in
    /// [`Enqueued::skipped`]; dead rows do not hold their key.
    ///
    /// An `Ok` means the rows are on disk (the commit waits for it, even with
    /// [`QueueConfig::relaxed_settles`] or a server whose default does not).
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`]; [`PgError::Db`]: nothing was inserted;
    /// [`PgError::CommitUnknown`]: the connection broke with the commit in
    /// flight, so the rows may be there. Repeating an enqueue is safe with
    /// dedup keys (a row already there is skipped), or through
    /// [`PgQueue::enqueue_request`].
    pub fn enqueue(&mut self, rows: &[NewRow]) -> Result<Enqueued, PgError> {
        self.insert_rows(rows, None)
    }

    /// As [`PgQueue::enqueue`], idempotent by `request`: the request id is
    /// recorded with the rows in the same transaction, and a request id already
    /// recorded for this queue inserts nothing ([`Enqueued::duplicate_request`]).
    /// So after any error, [`PgError::CommitUnknown`] included, repeating the
    /// call with the same id inserts the rows exactly once. Request ids are kept
    /// until [`PgQueue::prune_requests`] removes them.
    ///
    /// # Errors
    ///
    /// As [`PgQueue::enqueue`].
    pub fn enqueue_request(&mut self, request: &str, rows: &[NewRow]) -> Result<Enqueued, PgError> {
        self.insert_rows(rows, Some(request))
    }

    fn insert_rows(&mut self, rows: &[NewRow], request: Option<&str>) -> Result<Enqueued, PgError> {
        if rows.is_empty() && request.is_none() {
            return Ok(Enqueued::default());
        }
        let payloads: Vec<&[u8]> = rows.iter().map(|r| r.payload.as_slice()).collect();
        let keys: Vec<Option<&str>> = rows.iter().map(|r| r.dedup_key.as_deref()).collect();
        let prios: Vec<i16> = rows.iter().map(|r| r.priority).collect();
        let queue = self.config.queue.clone();
        let channel = self.channel.clone();
        let max = self.config.max_attempts;
        let relaxed = self.config.relaxed_settles;
        let level = self.durable_level.clone();
        let (n, inserted_keys, duplicate) = self.run_commit(|c| {
            let sql = if request.is_some() {
                Sql::EnqueueRequest
            } else {
                Sql::Enqueue
            };
            let st = c.statement(sql)?;
            if relaxed {
                // The session commits asynchronously; this transaction must not.
                c.client
                    .batch_execute(&format!("BEGIN; SET LOCAL synchronous_commit = '{level}'"))?;
            }
            let result = match request {
                Some(r) => c
                    .client
                    .query_one(&st, &[&queue, &payloads, &keys, &prios, &max, &channel, &r]),
                None => c
                    .client
                    .query_one(&st, &[&queue, &payloads, &keys, &prios, &max, &channel]),
            };
            let row = match result {
                Ok(row) => row,
                Err(e) => {
                    if relaxed && !c.client.is_closed() {
                        let _ = c.client.batch_execute("ROLLBACK");
                    }
                    return Err(e);
                }
            };
            if relaxed {
                c.client.batch_execute("COMMIT")?;
            }
            let n: i64 = row.get(0);
            let keys: Option<Vec<String>> = row.get(1);
            let duplicate = request.is_some() && row.get::<_, bool>(2);
            Ok((n, keys.unwrap_or_default(), duplicate))
        })?;
        Ok(Enqueued {
            inserted: n as u64,
            skipped: skipped(rows, &inserted_keys, duplicate),
            duplicate_request: duplicate,
        })
    }

    /// Removes the records of enqueue requests older than `older_than` (after
    /// that, repeating such a request inserts its rows again).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn prune_requests(&mut self, older_than: Duration) -> Result<u64, PgError> {
        let queue = self.config.queue.clone();
        let secs = older_than.as_secs_f64().min(1e10);
        self.run(|c| {
            c.client.execute(
                "DELETE FROM buffered_task_requests
                 WHERE queue = $1 AND created_at < now() - make_interval(secs => $2)",
                &[&queue, &secs],
            )
        })
    }

    /// Claims up to `n` rows: ready rows whose backoff has passed, lowest
    /// priority first, then oldest. Each claim counts as an attempt and gets a
    /// new token (see [`Lease`]).
    ///
    /// Before claiming (at most every quarter lease, from 50 ms to 5 s), rows
    /// whose lease expired are taken back: an expired lease counts as an
    /// attempt, so such a row backs off like a failed one, or goes to `dead`
    /// with a reason saying so once its attempts are spent (a row that crashes
    /// its worker cannot take down worker after worker).
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`]: then nothing was claimed.
    pub fn claim(&mut self, n: i64) -> Result<Vec<Claimed>, PgError> {
        let now = Instant::now();
        if self.reap_due.is_none_or(|due| now >= due) {
            self.reap()?;
            let every =
                (self.config.lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
            self.reap_due = Some(now + every);
        }
        let queue = self.config.queue.clone();
        let owner = self.owner.clone();
        let lease = self.config.lease_secs();
        let n = n.max(0);
        let rows = self.run(|c| {
            let st = c.statement(Sql::Claim)?;
            c.client.query(&st, &[&queue, &n, &owner, &lease])
        })?;
        let mut claimed: Vec<Claimed> = rows
            .iter()
            .map(|r| {
                let id = r.get(0);
                Claimed {
                    id,
                    payload: r.get(1),
                    attempts: r.get(2),
                    lease: Lease {
                        id,
                        token: r.get(3),
                    },
                }
            })
            .collect();
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    /// Takes back rows whose lease expired (see [`PgQueue::claim`], which calls
    /// this). Returns (rows back to `ready`, rows gone to `dead`).
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`].
    pub fn reap(&mut self) -> Result<(u64, u64), PgError> {
        let queue = self.config.queue.clone();
        let (base, cap) = self.backoff_secs();
        let (ready, dead): (i64, i64) = self.run(|c| {
            let st = c.statement(Sql::Reap)?;
            let row = c.client.query_one(&st, &[&queue, &base, &cap])?;
            Ok((row.get(0), row.get(1)))
        })?;
        if ready + dead > 0 {
            let q = self.config.queue.clone();
            self.throttle.warn(|| {
                format!("{q}: {ready} rows came back after their lease expired, {dead} went dead")
            });
        }
        Ok((ready as u64, dead as u64))
    }

    fn backoff_secs(&self) -> (f64, f64) {
        (
            self.config.backoff_base.as_secs_f64(),
            self.config.backoff_cap.as_secs_f64(),
        )
    }

    fn settled(&mut self, asked: usize, rows: u64, what: &str) -> Settled {
        let lost = (asked as u64).saturating_sub(rows);
        if lost > 0 {
            self.lost += lost;
            let q = self.config.queue.clone();
            self.throttle
                .warn(|| format!("{q}: {lost} of {asked} rows not {what}: their lease was lost"));
        }
        Settled { rows, lost }
    }

    /// Deletes done rows, fenced by their leases.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn ack(&mut self, leases: &[Lease]) -> Result<Settled, PgError> {
        if leases.is_empty() {
            return Ok(Settled::default());
        }
        let (ids, tokens) = split(leases);
        let queue = self.config.queue.clone();
        let archive = self.config.archive;
        let rows = self.run_repeatable(|c| {
            let st = c.statement(Sql::Ack { archive })?;
            c.client.execute(&st, &[&queue, &ids, &tokens])
        })?;
        Ok(self.settled(leases.len(), rows, "acknowledged"))
    }

    /// Deletes done rows and, in the same transaction, lets `effects` write the
    /// results for exactly the rows that were deleted: a row whose lease was lost
    /// is not passed, so its effect is never written twice (exactly-once effect).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`] from the delete or from `effects`: the transaction rolls
    /// back, nothing is settled, the rows come back after their lease;
    /// [`PgError::CommitUnknown`]: repeat the call (it is fenced).
    pub fn ack_with(
        &mut self,
        leases: &[Lease],
        effects: impl FnOnce(&mut postgres::Transaction<'_>, &[i64]) -> Result<(), postgres::Error>,
    ) -> Result<Settled, PgError> {
        let (ids, tokens) = split(leases);
        let queue = self.config.queue.clone();
        let archive = self.config.archive;
        let owned = self.run_commit(|c| {
            let st = c.statement(Sql::Ack { archive })?;
            let mut tx = c.client.transaction()?;
            let owned: Vec<i64> = tx
                .query(&st, &[&queue, &ids, &tokens])?
                .iter()
                .map(|r| r.get(0))
                .collect();
            effects(&mut tx, &owned)?;
            tx.commit()?;
            Ok(owned)
        })?;
        Ok(self.settled(leases.len(), owned.len() as u64, "acknowledged"))
    }

    /// Sends failed rows back to `ready` after a backoff, or to `dead` once their
    /// attempts are spent, keeping `error` as their last error.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn retry(&mut self, leases: &[Lease], error: &str) -> Result<Settled, PgError> {
        let s = self.settle(&Settle {
            again: leases,
            error,
            ..Settle::default()
        })?;
        Ok(Settled {
            rows: s.retried,
            lost: s.lost,
        })
    }

    /// Sends rows straight to `dead` with this error (a payload that cannot be
    /// decoded will never succeed).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn bury(&mut self, leases: &[Lease], error: &str) -> Result<Settled, PgError> {
        let buried: Vec<(Lease, String)> = leases.iter().map(|l| (*l, error.to_string())).collect();
        let s = self.settle(&Settle {
            bury: &buried,
            ..Settle::default()
        })?;
        Ok(Settled {
            rows: s.buried,
            lost: s.lost,
        })
    }

    /// Acknowledges `done`, retries `again` and enqueues `add` in one transaction
    /// ("retry these entries": the batch is settled all at once or not at all).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn settle_mixed(
        &mut self,
        done: &[Lease],
        again: &[Lease],
        error: &str,
        add: &[NewRow],
    ) -> Result<Settled, PgError> {
        let s = self.settle(&Settle {
            done,
            again,
            error,
            add,
            ..Settle::default()
        })?;
        Ok(Settled {
            rows: s.done + s.retried,
            lost: s.lost,
        })
    }

    /// Settles a whole batch in one statement (one round trip, one commit):
    /// see [`Settle`].
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their
    /// lease. Without new rows, a settle is repeated once on a new connection
    /// when the connection broke under it (it is fenced, so that is safe); with
    /// new rows it is not, and a connection lost during its commit is
    /// [`PgError::CommitUnknown`].
    pub fn settle(&mut self, s: &Settle<'_>) -> Result<SettleReport, PgError> {
        let (done_ids, done_tokens) = split(s.done);
        let (again_ids, again_tokens) = split(s.again);
        let bury_leases: Vec<Lease> = s.bury.iter().map(|(l, _)| *l).collect();
        let (bury_ids, bury_tokens) = split(&bury_leases);
        let bury_errors: Vec<&str> = s.bury.iter().map(|(_, e)| e.as_str()).collect();
        let payloads: Vec<&[u8]> = s.add.iter().map(|r| r.payload.as_slice()).collect();
        let keys: Vec<Option<&str>> = s.add.iter().map(|r| r.dedup_key.as_deref()).collect();
        let prios: Vec<i16> = s.add.iter().map(|r| r.priority).collect();
        let queue = self.config.queue.clone();
        let archive = self.config.archive;
        let (base, cap) = self.backoff_secs();
        let max = self.config.max_attempts;
        let channel = self.channel.clone();
        let error = s.error;
        let add_rows = !s.add.is_empty();
        let f = |c: &mut Conn| {
            let st = c.statement(Sql::Settle { archive })?;
            let row = c.client.query_one(
                &st,
                &[
                    &queue,
                    &done_ids,
                    &done_tokens,
                    &again_ids,
                    &again_tokens,
                    &error,
                    &base,
                    &cap,
                    &bury_ids,
                    &bury_tokens,
                    &bury_errors,
                    &payloads,
                    &keys,
                    &prios,
                    &max,
                    &channel,
                ],
            )?;
            let counts: (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
            let keys: Option<Vec<String>> = row.get(4);
            Ok((counts, keys.unwrap_or_default()))
        };
        // New rows make a repeat unsafe (they are not fenced): no automatic
        // repeat then, and a broken commit is reported as unknown.
        let ((done, retried, buried, inserted), inserted_keys) = if add_rows {
            self.run_commit(f)?
        } else {
            self.run_repeatable(f)?
        };
        let asked = s.done.len() + s.again.len() + s.bury.len();
        let settled = self.settled(asked, (done + retried + buried) as u64, "settled");
        Ok(SettleReport {
            done: done as u64,
            retried: retried as u64,
            buried: buried as u64,
            lost: settled.lost,
            added: Enqueued {
                inserted: inserted as u64,
                skipped: skipped(s.add, &inserted_keys, false),
                duplicate_request: false,
            },
        })
    }

    /// Releases rows at once (shed under memory pressure): back to `ready`, and the
    /// claim does not count as an attempt.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`]: nothing was settled; the rows come back after their lease.
    pub fn release(&mut self, leases: &[Lease]) -> Result<Settled, PgError> {
        if leases.is_empty() {
            return Ok(Settled::default());
        }
        let (ids, tokens) = split(leases);
        let queue = self.config.queue.clone();
        let rows = self.run_repeatable(|c| {
            let st = c.statement(Sql::Release)?;
            c.client.execute(&st, &[&queue, &ids, &tokens])
        })?;
        Ok(self.settled(leases.len(), rows, "released"))
    }

    /// Extends these leases by the full lease from now (the heartbeat of long
    /// batches): only rows still held under these very claims. Returns the rows
    /// extended.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn extend(&mut self, leases: &[Lease]) -> Result<u64, PgError> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, tokens) = split(leases);
        let queue = self.config.queue.clone();
        let lease = self.config.lease_secs();
        self.run_repeatable(|c| {
            let st = c.statement(Sql::Extend)?;
            c.client.execute(&st, &[&queue, &ids, &tokens, &lease])
        })
    }

    /// Seconds until a row's lease runs out, by the database's clock (`None`: the
    /// row is not leased).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn lease_left(&mut self, id: i64) -> Result<Option<f64>, PgError> {
        let row = self.run_repeatable(|c| {
            c.client.query_opt(
                &format!(
                    "SELECT extract(epoch FROM lease_until - now())::float8 FROM {TABLE}
                     WHERE id = $1 AND state = 'leased'"
                ),
                &[&id],
            )
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Rows of this queue by state: (ready, leased, dead); `ready` counts rows
    /// still in their backoff too.
    ///
    /// # Errors
    ///
    /// [`PgError::NotInstalled`], [`PgError::Db`].
    pub fn counts(&mut self) -> Result<(i64, i64, i64), PgError> {
        let queue = self.config.queue.clone();
        let row = self.run_repeatable(|c| {
            c.client.query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE state = 'ready'),
                            count(*) FILTER (WHERE state = 'leased'),
                            count(*) FILTER (WHERE state = 'dead')
                     FROM {TABLE} WHERE queue = $1"
                ),
                &[&queue],
            )
        })?;
        Ok((row.get(0), row.get(1), row.get(2)))
    }

    /// The last error stored for a row, if the row exists.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn last_error(&mut self, id: i64) -> Result<Option<String>, PgError> {
        let row = self.run_repeatable(|c| {
            c.client.query_opt(
                &format!("SELECT last_error FROM {TABLE} WHERE id = $1"),
                &[&id],
            )
        })?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// Removes every row of this queue, archived ones, its counters and request
    /// records too (for tests and tools). Returns the live rows removed.
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn purge(&mut self) -> Result<u64, PgError> {
        let queue = self.config.queue.clone();
        self.run(|c| {
            c.client.execute(
                &format!("DELETE FROM {TABLE}_archive WHERE queue = $1"),
                &[&queue],
            )?;
            c.client.execute(
                "DELETE FROM buffered_task_counters WHERE queue = $1",
                &[&queue],
            )?;
            c.client.execute(
                "DELETE FROM buffered_task_requests WHERE queue = $1",
                &[&queue],
            )?;
            c.client
                .execute(&format!("DELETE FROM {TABLE} WHERE queue = $1"), &[&queue])
        })
    }

    /// Archived rows of this queue (with [`QueueConfig::archive`]).
    ///
    /// # Errors
    ///
    /// [`PgError::Db`].
    pub fn archived(&mut self) -> Result<i64, PgError> {
        let queue = self.config.queue.clone();
        let row = self.run_repeatable(|c| {
            c.client.query_one(
                &format!("SELECT count(*) FROM {TABLE}_archive WHERE queue = $1"),
                &[&queue],
            )
        })?;
        Ok(row.get(0))
    }

    /// Runs `f` (a read, or a statement safe to repeat) with the connection's
    /// client, reconnecting first if needed, for the operations in `ops`.
    pub(crate) fn with_client<R>(
        &mut self,
        mut f: impl FnMut(&mut Client) -> Result<R, postgres::Error>,
    ) -> Result<R, PgError> {
        self.run_repeatable(|c| f(&mut c.client))
    }

    /// As `with_client`, for a call that commits durably even under relaxed
    /// settles.
    pub(crate) fn with_durable_tx<R>(
        &mut self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<R, postgres::Error>,
    ) -> Result<R, PgError> {
        let level = self.durable_level.clone();
        self.run_commit(|c| {
            let mut tx = c.client.transaction()?;
            tx.batch_execute(&format!("SET LOCAL synchronous_commit = '{level}'"))?;
            let r = f(&mut tx)?;
            tx.commit()?;
            Ok(r)
        })
    }
}

/// A batch's settlement, for [`PgQueue::settle`]: every part may be empty.
#[derive(Debug, Clone, Copy, Default)]
pub struct Settle<'a> {
    /// Rows done: deleted (or archived).
    pub done: &'a [Lease],
    /// Rows to run again after a backoff (or `dead` once their attempts are
    /// spent), with `error`.
    pub again: &'a [Lease],
    /// The error kept for the `again` rows.
    pub error: &'a str,
    /// Rows to send to `dead` at once, each with its error.
    pub bury: &'a [(Lease, String)],
    /// New rows to enqueue in the same transaction.
    pub add: &'a [NewRow],
}

/// What [`PgQueue::settle`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct SettleReport {
    /// Rows deleted (or archived).
    pub done: u64,
    /// Rows sent back to `ready` (or to `dead`, attempts spent).
    pub retried: u64,
    /// Rows sent to `dead`.
    pub buried: u64,
    /// Leases whose row was not written (see [`Settled::lost`]).
    pub lost: u64,
    /// The new rows.
    pub added: Enqueued,
}

fn split(leases: &[Lease]) -> (Vec<i64>, Vec<i32>) {
    leases.iter().map(|l| (l.id, l.token)).unzip()
}

/// Indexes of rows that were not inserted: keyed rows whose key is not among
/// the inserted keys (or came again after the inserted one); every row of a
/// duplicate request.
fn skipped(rows: &[NewRow], inserted_keys: &[String], duplicate: bool) -> Vec<usize> {
    if duplicate {
        return (0..rows.len()).collect();
    }
    let mut fresh: HashSet<&str> = inserted_keys.iter().map(String::as_str).collect();
    rows.iter()
        .enumerate()
        .filter(|(_, r)| match r.dedup_key.as_deref() {
            Some(k) => !fresh.remove(k),
            None => false,
        })
        .map(|(i, _)| i)
        .collect()
}

//! The schema, and the SQL of each step of a row's life.
//!
//! Every statement that settles a claimed row is fenced by its lease: the row's
//! id *and* the claim's token (the row's claim count, which every claim raises),
//! and the row must still be `leased`. A settle from an older claim of the same
//! row touches nothing, whichever process or connection sends it.

/// The table of rows.
pub(crate) const TABLE: &str = "buffered_task_jobs";

/// Written as the table's comment once the schema is complete; `install` with
/// the comment in place does nothing (no DDL, no lock).
pub(crate) const SCHEMA_VERSION: &str = "buffered-task-pg schema 2";

/// The comment, and whether an index of schema 1 is there (an older version's
/// `install` re-creates them: its dedup index counts dead rows).
pub(crate) const SCHEMA_CHECK: &str =
    "SELECT obj_description(to_regclass('buffered_task_jobs'), 'pg_class'),
            to_regclass('buffered_task_jobs_dedup') IS NULL
                AND to_regclass('buffered_task_jobs_ready') IS NULL";

/// Creates, or brings up to date, every table and index. Runs under an
/// advisory lock, in one transaction.
pub(crate) fn install_sql() -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {TABLE} (
            id bigserial PRIMARY KEY,
            queue text NOT NULL,
            payload bytea NOT NULL,
            dedup_key text,
            state text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'leased', 'dead')),
            priority smallint NOT NULL DEFAULT 0,
            attempts int NOT NULL DEFAULT 0,
            max_attempts int NOT NULL,
            claims int NOT NULL DEFAULT 0,
            run_after timestamptz NOT NULL DEFAULT now(),
            lease_until timestamptz,
            owner text,
            last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        -- Schema 1 had neither a priority nor a claim count.
        ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 0;
        ALTER TABLE {TABLE} ADD COLUMN IF NOT EXISTS claims int NOT NULL DEFAULT 0;
        -- Schema 1's dedup index counted dead rows; its ready index had no priority.
        DROP INDEX IF EXISTS {TABLE}_dedup;
        DROP INDEX IF EXISTS {TABLE}_ready;
        CREATE UNIQUE INDEX IF NOT EXISTS {TABLE}_dedup_live
            ON {TABLE} (queue, dedup_key) WHERE dedup_key IS NOT NULL AND state <> 'dead';
        CREATE INDEX IF NOT EXISTS {TABLE}_ready_by_priority
            ON {TABLE} (queue, priority, run_after, id) WHERE state = 'ready';
        CREATE INDEX IF NOT EXISTS {TABLE}_leased
            ON {TABLE} (queue, lease_until) WHERE state = 'leased';
        CREATE INDEX IF NOT EXISTS {TABLE}_dead
            ON {TABLE} (queue, id) WHERE state = 'dead';
        -- Every row is written twice and deleted: vacuum early and often, or
        -- dead tuples pile up ahead of the ready rows and every claim wades
        -- through them. (Only where autovacuum runs at all: see Health.)
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
        );
        -- Counters kept by the server: leases that expired (reaped rows).
        CREATE TABLE IF NOT EXISTS buffered_task_counters (
            queue text PRIMARY KEY,
            leases_expired bigint NOT NULL DEFAULT 0
        );
        -- Committed enqueue requests (PgQueue::enqueue_request), for idempotence.
        CREATE TABLE IF NOT EXISTS buffered_task_requests (
            queue text NOT NULL,
            request text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (queue, request)
        );
        COMMENT ON TABLE {TABLE} IS '{SCHEMA_VERSION}';"
    )
}

/// The fence of every settle: the row (`j`) is the one of the lease (`l`: id and
/// token) and is still leased. Written so that no partial index can serve it
/// (`coalesce` hides the state from the planner's predicate proof): the way in
/// is the primary key, one lookup per lease. Left to itself the planner took
/// the leased index and read every leased row of the queue (and every dead
/// index entry) for each settle: 2 to 12 ms per 500 rows instead of 1.5.
pub(crate) const FENCE: &str =
    "j.id = l.id AND j.claims = l.token AND coalesce(j.state = 'leased', false) AND j.queue = $1";

/// Exponential backoff from the row's attempts: base $b, cap $c (seconds),
/// drawn between half and all of it. The exponent is capped, so no attempt
/// count overflows it.
fn backoff(base: &str, cap: &str) -> String {
    format!(
        "make_interval(secs => least({cap}::float8,
             {base}::float8 * power(2::float8, least(greatest(j.attempts - 1, 0), 62)))
             * (0.5 + random() / 2))"
    )
}

/// The statements, each prepared once per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Sql {
    /// $1 queue, $2 limit, $3 owner, $4 lease (s) → id, payload, attempts, claims.
    /// The locked rows are updated through their `ctid` (the lock holds it
    /// still): no second descent of the primary key per row.
    Claim,
    /// $1 queue, $2 backoff base, $3 cap → (back to ready, to dead).
    Reap,
    /// $1 queue, $2 ids, $3 tokens → deleted ids.
    Ack { archive: bool },
    /// See [`settle_sql`].
    Settle { archive: bool },
    /// $1 queue, $2 ids, $3 tokens → rows released.
    Release,
    /// $1 queue, $2 ids, $3 tokens, $4 lease (s) → rows extended.
    Extend,
    /// $1 queue, $2 payloads, $3 keys, $4 priorities, $5 max attempts,
    /// $6 channel → inserted, inserted keys.
    Enqueue,
    /// As `Enqueue`, with $7 the request id → inserted, keys, duplicate.
    EnqueueRequest,
}

impl Sql {
    pub(crate) fn text(self) -> String {
        match self {
            Sql::Claim => format!(
                "WITH picked AS (
                    SELECT ctid FROM {TABLE}
                    WHERE queue = $1 AND state = 'ready' AND run_after <= now()
                    ORDER BY priority, run_after, id
                    LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                 UPDATE {TABLE} j
                 SET state = 'leased', owner = $3, attempts = j.attempts + 1,
                     claims = j.claims % 2147483647 + 1,
                     lease_until = now() + make_interval(secs => $4), updated_at = now()
                 FROM picked WHERE j.ctid = picked.ctid
                 RETURNING j.id, j.payload, j.attempts, j.claims"
            ),
            Sql::Reap => format!(
                "WITH expired AS (
                    SELECT id FROM {TABLE}
                    WHERE queue = $1 AND state = 'leased' AND lease_until < now()
                    ORDER BY lease_until
                    LIMIT 1000
                    FOR UPDATE SKIP LOCKED),
                 back AS (
                    UPDATE {TABLE} j
                    SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'ready' END,
                        run_after = now() + {backoff},
                        last_error = format(
                            'lease expired on attempt %s of %s (held by %s: it crashed, stalled or lost its connection)%s',
                            j.attempts, j.max_attempts, coalesce(j.owner, '?'),
                            CASE WHEN j.attempts >= j.max_attempts THEN '; attempts spent' ELSE '' END),
                        owner = NULL, lease_until = NULL, updated_at = now()
                    FROM expired WHERE j.id = expired.id
                    RETURNING j.state),
                 counted AS (
                    INSERT INTO buffered_task_counters (queue, leases_expired)
                    SELECT $1, count(*) FROM back HAVING count(*) > 0
                    ON CONFLICT (queue) DO UPDATE
                    SET leases_expired = buffered_task_counters.leases_expired + excluded.leases_expired)
                 SELECT count(*) FILTER (WHERE state = 'ready'), count(*) FILTER (WHERE state = 'dead')
                 FROM back",
                backoff = backoff("$2", "$3")
            ),
            Sql::Ack { archive } => {
                let delete = format!(
                    "DELETE FROM {TABLE} j USING unnest($2::int8[], $3::int4[]) AS l(id, token)
                     WHERE {FENCE}"
                );
                if archive {
                    format!(
                        "WITH gone AS ({delete}
                            RETURNING j.id, j.queue, j.payload, j.dedup_key, j.attempts, j.created_at)
                         INSERT INTO {TABLE}_archive (id, queue, payload, dedup_key, attempts, created_at)
                         SELECT id, queue, payload, dedup_key, attempts, created_at FROM gone
                         RETURNING id"
                    )
                } else {
                    format!("{delete} RETURNING j.id")
                }
            }
            Sql::Settle { archive } => settle_sql(archive),
            Sql::Release => format!(
                "UPDATE {TABLE} j
                 SET state = 'ready', attempts = greatest(j.attempts - 1, 0), owner = NULL,
                     lease_until = NULL, run_after = now(), updated_at = now()
                 FROM unnest($2::int8[], $3::int4[]) AS l(id, token)
                 WHERE {FENCE}"
            ),
            Sql::Extend => format!(
                "UPDATE {TABLE} j SET lease_until = now() + make_interval(secs => $4)
                 FROM unnest($2::int8[], $3::int4[]) AS l(id, token)
                 WHERE {FENCE}"
            ),
            Sql::Enqueue => format!(
                "WITH ins AS ({insert}),
                 s AS ({summary})
                 SELECT s.n, s.keys, CASE WHEN s.n > 0 THEN pg_notify($6, '') END FROM s",
                insert = insert_sql("$1", "$2", "$3", "$4", "$5", ""),
                summary = SUMMARY,
            ),
            Sql::EnqueueRequest => format!(
                "WITH req AS (
                    INSERT INTO buffered_task_requests (queue, request) VALUES ($1, $7)
                    ON CONFLICT DO NOTHING RETURNING 1),
                 ins AS ({insert}),
                 s AS ({summary})
                 SELECT s.n, s.keys, NOT EXISTS (SELECT 1 FROM req),
                        CASE WHEN s.n > 0 THEN pg_notify($6, '') END
                 FROM s",
                insert = insert_sql(
                    "$1",
                    "$2",
                    "$3",
                    "$4",
                    "$5",
                    "WHERE EXISTS (SELECT 1 FROM req)"
                ),
                summary = SUMMARY,
            ),
        }
    }
}

const SUMMARY: &str = "SELECT count(*) AS n,
    array_agg(dedup_key) FILTER (WHERE dedup_key IS NOT NULL) AS keys FROM ins";

/// Inserts rows from arrays; a key held by a live row is skipped.
fn insert_sql(
    queue: &str,
    payloads: &str,
    keys: &str,
    prio: &str,
    max: &str,
    filter: &str,
) -> String {
    format!(
        "INSERT INTO {TABLE} (queue, payload, dedup_key, priority, max_attempts)
         SELECT {queue}, u.p, u.k, u.pr, {max}
         FROM unnest({payloads}::bytea[], {keys}::text[], {prio}::int2[]) AS u(p, k, pr)
         {filter}
         ON CONFLICT (queue, dedup_key) WHERE dedup_key IS NOT NULL AND state <> 'dead' DO NOTHING
         RETURNING dedup_key"
    )
}

/// One statement (so one round trip, one commit) that settles a whole batch:
/// $1 queue; done: $2 ids, $3 tokens; again: $4 ids, $5 tokens, $6 error,
/// $7 backoff base, $8 cap; buried: $9 ids, $10 tokens, $11 errors; new rows:
/// $12 payloads, $13 keys, $14 priorities, $15 max attempts, $16 channel.
/// Returns the counts done, again, buried, inserted, and the inserted keys.
fn settle_sql(archive: bool) -> String {
    let fence = FENCE;
    let done = if archive {
        format!(
            "gone AS (DELETE FROM {TABLE} j USING unnest($2::int8[], $3::int4[]) AS l(id, token)
                      WHERE {fence}
                      RETURNING j.id, j.queue, j.payload, j.dedup_key, j.attempts, j.created_at),
             done AS (INSERT INTO {TABLE}_archive (id, queue, payload, dedup_key, attempts, created_at)
                      SELECT id, queue, payload, dedup_key, attempts, created_at FROM gone
                      RETURNING id)"
        )
    } else {
        format!(
            "done AS (DELETE FROM {TABLE} j USING unnest($2::int8[], $3::int4[]) AS l(id, token)
                      WHERE {fence} RETURNING j.id)"
        )
    };
    format!(
        "WITH {done},
         again AS (
            UPDATE {TABLE} j
            SET state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'ready' END,
                run_after = now() + {backoff},
                last_error = $6, owner = NULL, lease_until = NULL, updated_at = now()
            FROM unnest($4::int8[], $5::int4[]) AS l(id, token)
            WHERE {fence} RETURNING j.id),
         buried AS (
            UPDATE {TABLE} j
            SET state = 'dead', last_error = l.error, owner = NULL, lease_until = NULL,
                updated_at = now()
            FROM unnest($9::int8[], $10::int4[], $11::text[]) AS l(id, token, error)
            WHERE {fence} RETURNING j.id),
         ins AS ({insert}),
         s AS ({SUMMARY})
         SELECT (SELECT count(*) FROM done), (SELECT count(*) FROM again),
                (SELECT count(*) FROM buried), s.n, s.keys,
                CASE WHEN s.n > 0 THEN pg_notify($16, '') END
         FROM s",
        backoff = backoff("$7", "$8"),
        insert = insert_sql("$1", "$12", "$13", "$14", "$15", ""),
    )
}

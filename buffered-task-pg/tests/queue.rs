//! Against a real server. They need `DATABASE_URL`, e.g.
//! `DATABASE_URL="host=127.0.0.1 user=postgres dbname=test" cargo test -p buffered-task-pg`
//! (a `postgres://` URL works too). `.ci/run` exports it for the local server.
//! Each test has a queue of its own, so they run in parallel.

mod common;

use buffered_task_pg::{
    leases, Lease, Leases, NewRow, PgError, PgHeartbeat, PgQueue, QueueConfig, Select,
};
use common::{name, queue, rows, sql, url, wait_for};
use std::collections::HashSet;
use std::time::Duration;

fn keyed(k: &str) -> NewRow {
    NewRow::new(k.as_bytes().to_vec()).key(k)
}

#[test]
fn install_is_idempotent_and_enqueue_reports_skipped_keys() {
    let mut q = queue("dedup", |c| c);
    q.install().unwrap();
    q.install().unwrap();
    let first = q.enqueue(&[keyed("a"), keyed("b"), keyed("a")]).unwrap();
    assert_eq!((first.inserted, first.skipped), (2, vec![2]));
    let second = q.enqueue(&[keyed("b"), keyed("c")]).unwrap();
    assert_eq!((second.inserted, second.skipped), (1, vec![0]));
    assert_eq!(q.enqueue(&rows(3)).unwrap().inserted, 3); // no key: never deduplicated
    assert_eq!(q.counts().unwrap(), (6, 0, 0));
    q.purge().unwrap();
}

#[test]
fn claims_from_two_connections_never_overlap_and_acks_delete() {
    let mut a = queue("claims", |c| c);
    let mut b = PgQueue::connect(&url(), QueueConfig::new(name("claims"))).unwrap();
    a.enqueue(&rows(100)).unwrap();
    let ca = a.claim(60).unwrap();
    let cb = b.claim(60).unwrap();
    assert_eq!((ca.len(), cb.len()), (60, 40));
    let ia: HashSet<i64> = ca.iter().map(|c| c.id).collect();
    assert!(cb.iter().all(|c| !ia.contains(&c.id)));
    assert!(ca.iter().chain(&cb).all(|c| c.attempts == 1));
    assert_eq!(a.counts().unwrap(), (0, 100, 0));
    // A lease with the wrong token settles nothing.
    let forged: Vec<Lease> = cb
        .iter()
        .map(|c| Lease {
            id: c.id,
            token: c.lease.token + 1,
        })
        .collect();
    let wrong = a.ack(&forged).unwrap();
    assert_eq!((wrong.rows, wrong.lost), (0, 40));
    assert_eq!(b.ack(&leases(&cb)).unwrap().rows, 40);
    assert_eq!(a.ack(&leases(&ca)).unwrap().rows, 60);
    assert_eq!(a.counts().unwrap(), (0, 0, 0));
}

#[test]
fn retries_back_off_then_go_dead_keeping_the_last_error() {
    let mut q = queue("retry", |c| {
        c.max_attempts(3).backoff(Duration::ZERO, Duration::ZERO)
    });
    q.enqueue(&rows(1)).unwrap();
    let mut id = 0;
    for attempt in 1..=3 {
        let c = q.claim(10).unwrap();
        assert_eq!(c.len(), 1, "attempt {attempt}");
        assert_eq!(c[0].attempts, attempt);
        id = c[0].id;
        q.retry(&leases(&c), &format!("failure {attempt}")).unwrap();
    }
    assert_eq!(q.counts().unwrap(), (0, 0, 1));
    assert!(
        q.claim(10).unwrap().is_empty(),
        "dead rows are never claimed"
    );
    assert_eq!(q.last_error(id).unwrap().as_deref(), Some("failure 3"));
    q.purge().unwrap();
}

#[test]
fn a_backoff_keeps_the_row_out_of_claims_until_it_passes() {
    let mut q = queue("backoff", |c| {
        c.backoff(Duration::from_secs(3600), Duration::from_secs(3600))
    });
    q.enqueue(&rows(1)).unwrap();
    let c = q.claim(1).unwrap();
    q.retry(&leases(&c), "later").unwrap();
    assert_eq!(q.last_error(c[0].id).unwrap().as_deref(), Some("later"));
    assert!(
        q.claim(1).unwrap().is_empty(),
        "an hour's backoff has not passed"
    );
    assert_eq!(q.counts().unwrap(), (1, 0, 0));
    q.purge().unwrap();
}

/// Defect 9: `power(2, attempts - 1)` overflowed past ~1,025 attempts.
#[test]
fn the_backoff_is_capped_at_any_attempt_count() {
    let mut q = queue("backoff-cap", |c| {
        c.max_attempts(i32::MAX)
            .backoff(Duration::from_secs(1), Duration::from_secs(10))
            .lease(Duration::ZERO)
    });
    q.enqueue(&rows(2)).unwrap();
    let mut s = sql();
    s.execute(
        "UPDATE buffered_task_jobs SET attempts = 5000 WHERE queue = $1",
        &[&name("backoff-cap")],
    )
    .unwrap();
    let c = q.claim(2).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].attempts, 5001);
    // The settle path...
    assert_eq!(q.retry(&leases(&c[..1]), "again").unwrap().rows, 1);
    // ...and the expired-lease path (the lease was zero).
    assert_eq!(q.reap().unwrap(), (1, 0));
    let waits: Vec<f64> = s
        .query(
            "SELECT extract(epoch FROM run_after - now())::float8 FROM buffered_task_jobs
             WHERE queue = $1",
            &[&name("backoff-cap")],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(waits.len(), 2);
    assert!(waits.iter().all(|w| (4.0..=10.5).contains(w)), "{waits:?}");
    q.purge().unwrap();
}

/// Defect 2 (in one process): an expired lease is an attempt; past the limit
/// the row goes dead, with a reason that says so.
#[test]
fn a_row_whose_leases_keep_expiring_goes_dead_with_the_reason() {
    let mut q = queue("poison", |c| {
        c.max_attempts(2)
            .lease(Duration::from_millis(200))
            .backoff(Duration::ZERO, Duration::ZERO)
    });
    q.enqueue(&rows(1)).unwrap();
    let first = q.claim(1).unwrap(); // its worker "crashes": never settled
    assert_eq!(first[0].attempts, 1);
    std::thread::sleep(Duration::from_millis(300)); // letting the lease expire
    let mut other = PgQueue::connect(
        &url(),
        QueueConfig::new(name("poison"))
            .max_attempts(2)
            .lease(Duration::from_millis(200))
            .backoff(Duration::ZERO, Duration::ZERO),
    )
    .unwrap();
    let second = other.claim(1).unwrap();
    assert_eq!(second.len(), 1, "the expired row came back");
    assert_eq!(second[0].attempts, 2);
    assert!(q
        .last_error(second[0].id)
        .unwrap()
        .unwrap()
        .contains("lease expired on attempt 1 of 2"));
    std::thread::sleep(Duration::from_millis(300)); // the second lease expires too
    assert!(other.claim(1).unwrap().is_empty(), "attempts spent");
    assert_eq!(q.counts().unwrap(), (0, 0, 1));
    let reason = q.last_error(second[0].id).unwrap().unwrap();
    assert!(
        reason.contains("lease expired on attempt 2 of 2") && reason.contains("attempts spent"),
        "{reason}"
    );
    let stats = q.stats().unwrap();
    assert_eq!(stats.lost_leases, 2);
    // The late settles of both crashed claims touch nothing.
    assert_eq!(q.ack(&leases(&first)).unwrap().rows, 0);
    assert_eq!(other.ack(&leases(&second)).unwrap().rows, 0);
    q.purge().unwrap();
}

/// Defect 3: one owner, two claims of the same row; the stale batch's settles
/// are fenced, the live one's goes through.
#[test]
fn a_stale_batch_of_the_same_connection_is_fenced() {
    let mut q = queue("stale", |c| {
        c.max_attempts(2)
            .lease(Duration::from_millis(200))
            .backoff(Duration::ZERO, Duration::ZERO)
    });
    q.enqueue(&rows(3)).unwrap();
    let stale = q.claim(3).unwrap();
    std::thread::sleep(Duration::from_millis(300)); // letting the lease expire
    let live = q.claim(3).unwrap(); // the same connection re-takes the rows
    assert_eq!(leases(&live).len(), 3);
    assert!(live
        .iter()
        .zip(&stale)
        .all(|(l, s)| l.id == s.id && l.lease.token != s.lease.token));
    // Every kind of stale settle is refused...
    let r = q.retry(&leases(&stale[..1]), "stale retry").unwrap();
    assert_eq!((r.rows, r.lost), (0, 1));
    assert_eq!(q.bury(&leases(&stale[1..2]), "stale bury").unwrap().rows, 0);
    assert_eq!(q.ack(&leases(&stale[2..])).unwrap().rows, 0);
    assert_eq!(q.release(&leases(&stale)).unwrap().rows, 0);
    assert_eq!(q.extend(&leases(&stale)).unwrap(), 0);
    assert_eq!(q.counts().unwrap(), (0, 3, 0));
    // ...and the live batch's ack is the one that counts: nothing is dead.
    assert_eq!(q.ack(&leases(&live)).unwrap().rows, 3);
    assert_eq!(q.counts().unwrap(), (0, 0, 0));
    // Lost: the retry, the burial, the ack and three releases (an extension
    // that touches nothing is not a settle).
    assert_eq!(q.lost(), 6);
}

#[test]
fn an_expired_lease_comes_back_and_the_late_ack_touches_nothing() {
    let config = |c: QueueConfig| {
        c.lease(Duration::ZERO)
            .backoff(Duration::ZERO, Duration::ZERO)
    };
    let mut slow = queue("lease", config);
    let mut other = PgQueue::connect(&url(), config(QueueConfig::new(name("lease")))).unwrap();
    slow.enqueue(&rows(1)).unwrap();
    let first = slow.claim(1).unwrap();
    // The lease (zero) has expired: another process takes the row.
    let second = other.claim(1).unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].attempts, 2);
    let late = slow.ack(&leases(&first)).unwrap();
    assert_eq!((late.rows, late.lost), (0, 1));
    assert_eq!(other.ack(&leases(&second)).unwrap().rows, 1);
    assert_eq!(slow.counts().unwrap(), (0, 0, 0));
}

#[test]
fn released_rows_are_ready_at_once_and_do_not_spend_an_attempt() {
    let mut q = queue("release", |c| c);
    q.enqueue(&rows(2)).unwrap();
    let c = q.claim(2).unwrap();
    assert_eq!(q.release(&leases(&c)).unwrap().rows, 2);
    let again = q.claim(2).unwrap();
    assert!(again.iter().all(|c| c.attempts == 1));
    q.purge().unwrap();
}

/// Defects 7 and 12: errors name the server's reason; both forms of
/// `DATABASE_URL` work.
#[test]
fn bad_input_is_a_clear_error() {
    match PgQueue::connect("port=notanumber", QueueConfig::new("x")) {
        Err(PgError::BadConnectionString(_)) => {}
        other => panic!("{other:?}"),
    }
    for bad in ["", "a\0b"] {
        assert!(matches!(
            PgQueue::connect(&url(), QueueConfig::new(bad)),
            Err(PgError::BadConfig(_))
        ));
    }
    let long = "q".repeat(buffered_task_pg::MAX_QUEUE_NAME + 1);
    let e = PgQueue::connect(&url(), QueueConfig::new(long)).unwrap_err();
    assert!(e.to_string().contains("at most 255"), "{e}");
    // A missing table (here: a search path where it is not) is named as such.
    let mut elsewhere = common::pg_config();
    elsewhere.options("-c search_path=no_such_schema");
    let mut q = PgQueue::connect_with(elsewhere, QueueConfig::new("x")).unwrap();
    assert!(matches!(q.claim(1), Err(PgError::NotInstalled)));
    assert!(q.counts().unwrap_err().to_string().contains("install()"));
    // A server error shows its SQLSTATE and message.
    let mut missing = common::pg_config();
    missing.dbname("no_such_database_here");
    let e = PgQueue::connect_with(missing, QueueConfig::new("x")).unwrap_err();
    assert_eq!(e.sqlstate(), Some("3D000"));
    let text = e.to_string();
    assert!(
        text.contains("3D000") && text.contains("\"no_such_database_here\" does not exist"),
        "{text}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let inside = rt.block_on(async { PgQueue::connect(&url(), QueueConfig::new("x")).err() });
    assert!(matches!(inside, Some(PgError::InsideTokioRuntime)));
}

#[test]
fn four_connections_drain_a_shared_backlog_each_row_exactly_once() {
    let name = name("shared");
    let mut seed = queue("shared", |c| c);
    seed.enqueue(&rows(5_000)).unwrap();
    let done: Vec<Vec<i64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                let name = name.clone();
                s.spawn(move || {
                    let mut q = PgQueue::connect(&url(), QueueConfig::new(name)).unwrap();
                    let mut mine = Vec::new();
                    loop {
                        let claimed = q.claim(100).unwrap();
                        if claimed.is_empty() {
                            return mine;
                        }
                        let l = leases(&claimed);
                        assert_eq!(q.ack(&l).unwrap().rows, l.len() as u64);
                        mine.extend(l.iter().map(|l| l.id));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let all: Vec<i64> = done.into_iter().flatten().collect();
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!((all.len(), unique.len()), (5_000, 5_000));
    assert_eq!(seed.counts().unwrap(), (0, 0, 0));
}

/// Defect 1: the heartbeat extends the leases in flight and no others: a row
/// whose settle failed (forgotten) comes back after its lease.
#[test]
fn the_heartbeat_extends_only_the_leases_in_flight() {
    let config = |c: QueueConfig| {
        c.lease(Duration::from_secs(1))
            .backoff(Duration::ZERO, Duration::ZERO)
    };
    let mut q = queue("heartbeat", config);
    q.enqueue(&rows(3)).unwrap();
    let claimed = q.claim(3).unwrap();
    let in_flight = Leases::new();
    in_flight.hold(leases(&claimed));
    in_flight.forget([claimed[2].lease]); // its settle failed: given up
    let too_slow = PgHeartbeat::start(
        &url(),
        config(QueueConfig::new(name("heartbeat"))),
        &in_flight,
        Duration::from_millis(400),
    );
    assert!(matches!(too_slow, Err(PgError::HeartbeatTooSlow)));
    let absurd = PgHeartbeat::start(&url(), QueueConfig::new("x"), &in_flight, Duration::MAX);
    assert!(matches!(absurd, Err(PgError::HeartbeatTooSlow)));
    let beat = PgHeartbeat::start(
        &url(),
        config(QueueConfig::new(name("heartbeat"))),
        &in_flight,
        Duration::from_millis(100),
    )
    .unwrap();
    let mut other = PgQueue::connect(&url(), config(QueueConfig::new(name("heartbeat")))).unwrap();
    // The given-up row comes back after its lease; the two in flight do not.
    let mut back = Vec::new();
    wait_for(Duration::from_secs(10), "the given-up row", || {
        back.extend(other.claim(3).unwrap());
        !back.is_empty()
    });
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].id, claimed[2].id);
    assert_eq!(other.ack(&leases(&back)).unwrap().rows, 1);
    std::thread::sleep(Duration::from_millis(1500)); // past the original lease
    assert!(
        other.claim(3).unwrap().is_empty(),
        "a lease in flight ran out"
    );
    drop(beat);
    assert_eq!(q.ack(&leases(&claimed[..2])).unwrap().rows, 2);
    assert_eq!(q.counts().unwrap(), (0, 0, 0));
}

#[test]
fn with_archive_on_done_rows_are_kept_in_the_archive() {
    let mut q = queue("archive", |c| c.archive(true));
    q.enqueue(&rows(3)).unwrap();
    let c = q.claim(3).unwrap();
    let l = leases(&c);
    assert_eq!(q.ack(&l[..2]).unwrap().rows, 2);
    let settled = q
        .ack_with(&l[2..], |_, owned| {
            assert_eq!(owned, &[l[2].id]);
            Ok(())
        })
        .unwrap();
    assert_eq!(settled.rows, 1);
    assert_eq!(q.counts().unwrap(), (0, 0, 0));
    assert_eq!(q.archived().unwrap(), 3);
    q.purge().unwrap();
    assert_eq!(q.archived().unwrap(), 0);
}

/// Defect 10: a dead row does not hold its key; a live one does, and the skip
/// is reported.
#[test]
fn dead_rows_give_up_their_dedup_key_and_skips_are_reported() {
    let mut q = queue("dead-key", |c| c);
    assert_eq!(q.enqueue(&[keyed("k")]).unwrap().inserted, 1);
    let skipped = q.enqueue(&[keyed("k")]).unwrap();
    assert_eq!((skipped.inserted, skipped.skipped), (0, vec![0]));
    let c = q.claim(1).unwrap();
    assert_eq!(q.enqueue(&[keyed("k")]).unwrap().skipped, vec![0]); // leased holds it too
    assert_eq!(q.bury(&leases(&c), "broken").unwrap().rows, 1);
    let again = q.enqueue(&[keyed("k")]).unwrap();
    assert_eq!((again.inserted, again.skipped), (1, vec![]));
    assert_eq!(q.counts().unwrap(), (1, 0, 1));
    // Requeueing the dead one while the new one is live is refused, by id.
    let r = q.requeue_dead(Select::All).unwrap();
    assert_eq!((r.requeued, r.key_taken), (0, vec![c[0].id]));
    q.purge().unwrap();
}

/// Defect 5: a repeated request inserts nothing.
#[test]
fn an_enqueue_request_is_idempotent() {
    let mut q = queue("request", |c| c);
    let first = q.enqueue_request("batch-7", &rows(3)).unwrap();
    assert_eq!((first.inserted, first.duplicate_request), (3, false));
    let again = q.enqueue_request("batch-7", &rows(3)).unwrap();
    assert_eq!(
        (again.inserted, again.duplicate_request, again.skipped),
        (0, true, vec![0, 1, 2])
    );
    assert_eq!(q.enqueue_request("batch-8", &rows(1)).unwrap().inserted, 1);
    assert_eq!(q.counts().unwrap(), (4, 0, 0));
    assert_eq!(q.prune_requests(Duration::ZERO).unwrap(), 2);
    q.purge().unwrap();
}

#[test]
fn dead_rows_are_listed_requeued_and_discarded() {
    let mut q = queue("ops", |c| c.max_attempts(1));
    q.enqueue(&rows(5)).unwrap();
    let c = q.claim(5).unwrap();
    q.retry(&leases(&c), "boom").unwrap();
    assert_eq!(q.counts().unwrap(), (0, 0, 5));
    let page = q.dead_rows(0, 3).unwrap();
    assert_eq!(page.len(), 3);
    assert_eq!(page[0].last_error.as_deref(), Some("boom"));
    assert_eq!(page[0].attempts, 1);
    let rest = q.dead_rows(page[2].id, 10).unwrap();
    assert_eq!(rest.len(), 2);
    let r = q
        .requeue_dead(Select::Ids(&[page[0].id, page[1].id]))
        .unwrap();
    assert_eq!(r.requeued, 2);
    assert_eq!(q.discard_dead(Select::Ids(&[page[2].id])).unwrap(), 1);
    assert_eq!(q.counts().unwrap(), (2, 0, 2));
    let again = q.claim(5).unwrap();
    assert!(again.iter().all(|c| c.attempts == 1), "attempts reset");
    assert_eq!(q.discard_dead(Select::All).unwrap(), 2);
    q.ack(&leases(&again)).unwrap();
    assert_eq!(q.counts().unwrap(), (0, 0, 0));
}

#[test]
fn stats_show_depth_age_lost_leases_and_attempts() {
    let mut q = queue("stats", |c| {
        c.lease(Duration::ZERO)
            .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
    });
    q.enqueue(&rows(4)).unwrap();
    let c = q.claim(2).unwrap(); // both expire at once (zero lease)
    assert_eq!(q.reap().unwrap(), (2, 0)); // back, an hour's backoff
    let s = q.stats().unwrap();
    assert_eq!((s.ready, s.scheduled, s.leased, s.dead), (2, 2, 0, 0));
    assert_eq!(s.lost_leases, 2);
    assert_eq!(s.attempts, vec![(0, 2), (1, 2)]);
    assert!(s.oldest_ready_age.is_some());
    drop(c);
    q.purge().unwrap();
}

#[test]
fn lower_priority_numbers_are_claimed_first() {
    let mut q = queue("priority", |c| c);
    let rows: Vec<NewRow> = [5i16, -3, 0, 9, -3]
        .iter()
        .enumerate()
        .map(|(i, p)| NewRow::new(vec![i as u8]).priority(*p))
        .collect();
    q.enqueue(&rows).unwrap();
    let order: Vec<u8> = (0..5)
        .map(|_| {
            let c = q.claim(1).unwrap();
            q.ack(&leases(&c)).unwrap();
            c[0].payload[0]
        })
        .collect();
    assert_eq!(order, vec![1, 4, 2, 0, 3]);
}

/// Defect 11: a long transaction holding the xmin horizon is reported.
#[test]
fn health_reports_an_open_transaction_holding_the_horizon() {
    let mut q = queue("health", |c| c);
    let mut holder = sql();
    let mut tx = holder.transaction().unwrap();
    tx.query_one("SELECT txid_current()", &[]).unwrap();
    let pid: i32 = tx.query_one("SELECT pg_backend_pid()", &[]).unwrap().get(0);
    let h = q.health().unwrap();
    let (_, oldest) = h.oldest_transaction.expect("an open transaction");
    // Another test's transaction may be older; ours is there or an older one is.
    let mut s = sql();
    let ours: bool = s
        .query_one(
            "SELECT count(*) > 0 FROM pg_stat_activity WHERE pid = $1 AND backend_xmin IS NOT NULL",
            &[&pid],
        )
        .unwrap()
        .get(0);
    assert!(ours && oldest > 0);
    assert!(h.xmin_age.is_some());
    let autovacuum: String = s.query_one("SHOW autovacuum", &[]).unwrap().get(0);
    assert_eq!(h.autovacuum, autovacuum == "on");
    if !h.autovacuum {
        assert!(h.warnings.iter().any(|w| w.contains("autovacuum is off")));
    }
    tx.rollback().unwrap();
}

/// Defect 8: names whose channel would pass 63 bytes.
#[test]
fn a_64_character_queue_name_enqueues_and_claims() {
    let long = format!("{}-{}", "q".repeat(50), std::process::id());
    let long = format!("{long}{}", "x".repeat(64 - long.len()));
    assert_eq!(long.len(), 64);
    let mut q = PgQueue::connect(&url(), QueueConfig::new(long.clone())).unwrap();
    q.install().unwrap();
    q.purge().unwrap();
    // Every enqueue NOTIFYs on a channel derived from the name (a listener on it
    // is tested in tests/engine.rs).
    assert_eq!(q.enqueue(&rows(2)).unwrap().inserted, 2);
    let c = q.claim(5).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(q.ack(&leases(&c)).unwrap().rows, 2);
    q.purge().unwrap();
}

/// A table of schema 1 (no priority, no claim count, a dedup index that counts
/// dead rows) is brought up to date by `install`, rows kept; an older
/// version's `install` re-creating its indexes is undone by the next one.
#[test]
fn install_migrates_a_schema_1_table() {
    let schema = format!("bt_migrate_{}", std::process::id());
    let mut s = sql();
    s.batch_execute(&format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE; CREATE SCHEMA {schema};
         CREATE TABLE {schema}.buffered_task_jobs (
            id bigserial PRIMARY KEY, queue text NOT NULL, payload bytea NOT NULL,
            dedup_key text,
            state text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'leased', 'dead')),
            attempts int NOT NULL DEFAULT 0, max_attempts int NOT NULL,
            run_after timestamptz NOT NULL DEFAULT now(), lease_until timestamptz,
            owner text, last_error text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now());
         CREATE UNIQUE INDEX buffered_task_jobs_dedup ON {schema}.buffered_task_jobs
            (queue, dedup_key) WHERE dedup_key IS NOT NULL;
         CREATE INDEX buffered_task_jobs_ready ON {schema}.buffered_task_jobs
            (queue, run_after, id) WHERE state = 'ready';
         INSERT INTO {schema}.buffered_task_jobs (queue, payload, dedup_key, state, max_attempts)
            VALUES ('m', 'x', 'k', 'dead', 3), ('m', 'y', NULL, 'ready', 3);"
    ))
    .unwrap();
    let mut config = common::pg_config();
    config.options(&format!("-c search_path={schema}"));
    let mut q = PgQueue::connect_with(config, QueueConfig::new("m")).unwrap();
    q.install().unwrap();
    assert_eq!(q.counts().unwrap(), (1, 0, 1), "rows kept");
    // The dead row no longer holds its key.
    assert_eq!(q.enqueue(&[keyed("k")]).unwrap().inserted, 1);
    let c = q.claim(5).unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(q.ack(&leases(&c)).unwrap().rows, 2);
    // An older version's install puts its dedup index back; ours removes it.
    s.batch_execute(&format!(
        "CREATE UNIQUE INDEX buffered_task_jobs_dedup ON {schema}.buffered_task_jobs
            (queue, dedup_key) WHERE dedup_key IS NOT NULL"
    ))
    .unwrap();
    q.install().unwrap();
    let old: bool = s
        .query_one(
            &format!("SELECT to_regclass('{schema}.buffered_task_jobs_dedup') IS NOT NULL"),
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!old);
    drop(q);
    s.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
        .unwrap();
}

/// Defect 6 (without a restart): a connection the server dropped is replaced
/// on the next call; a settle on it does not fail, it is repeated once on the
/// new connection (it is fenced); a claim's error says what happened.
#[test]
fn a_dropped_connection_is_replaced_and_a_settle_on_it_goes_through() {
    let mut q = queue("reconnect", |c| c);
    q.enqueue(&rows(4)).unwrap();
    let c = q.claim(4).unwrap();
    let mut killer = sql();
    let kill = |killer: &mut postgres::Client, pid: i32| {
        killer
            .execute("SELECT pg_terminate_backend($1)", &[&pid])
            .unwrap();
        wait_for(Duration::from_secs(30), "the backend to go", || {
            killer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                    &[&pid],
                )
                .unwrap()
                .get::<_, i64>(0)
                == 0
        });
    };
    let pid = q.backend_pid().unwrap();
    kill(&mut killer, pid);
    assert_eq!(q.ack(&leases(&c[..2])).unwrap().rows, 2);
    assert_eq!(q.reconnects(), 1);
    assert_ne!(q.backend_pid().unwrap(), pid);
    // A claim is not repeated (it is not fenced): its error names the cause,
    // and the next call reconnects.
    let pid = q.backend_pid().unwrap();
    kill(&mut killer, pid);
    let e = q.claim(1).unwrap_err();
    assert!(e.is_connection(), "{e}");
    assert_eq!(q.ack(&leases(&c[2..])).unwrap().rows, 2);
    assert_eq!(q.reconnects(), 2);
    assert_eq!(q.counts().unwrap(), (0, 0, 0));
}

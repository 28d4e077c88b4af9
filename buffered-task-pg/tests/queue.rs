//! Against a real server. They need `DATABASE_URL`, e.g.
//! `DATABASE_URL="host=127.0.0.1 user=postgres dbname=test" cargo test -p buffered-task-pg`.
//! `.ci/run` exports it for the local server.

use buffered_task_pg::{PgError, PgQueue, QueueConfig};
use std::collections::HashSet;
use std::time::Duration;

fn url() -> String {
    std::env::var("DATABASE_URL").expect(
        "these tests need a PostgreSQL server: set DATABASE_URL, e.g. \
         DATABASE_URL=\"host=127.0.0.1 user=postgres dbname=test\"",
    )
}

/// A queue of its own for each test, emptied first.
fn queue(name: &str, config: impl Fn(QueueConfig) -> QueueConfig) -> PgQueue {
    let name = format!("{name}-{}", std::process::id());
    let mut q = PgQueue::connect(&url(), config(QueueConfig::new(name))).expect("connect");
    q.install().expect("install");
    q.purge().unwrap();
    q
}

fn rows(n: usize) -> Vec<(Vec<u8>, Option<String>)> {
    (0..n).map(|i| (i.to_le_bytes().to_vec(), None)).collect()
}

#[test]
fn install_is_idempotent_and_enqueue_deduplicates() {
    let mut q = queue("dedup", |c| c);
    q.install().unwrap();
    q.install().unwrap();
    let keyed = |k: &str| (k.as_bytes().to_vec(), Some(k.to_string()));
    assert_eq!(q.enqueue(&[keyed("a"), keyed("b"), keyed("a")]).unwrap(), 2);
    assert_eq!(q.enqueue(&[keyed("b"), keyed("c")]).unwrap(), 1);
    assert_eq!(q.enqueue(&rows(3)).unwrap(), 3); // no key: never deduplicated
    assert_eq!(q.counts().unwrap(), (6, 0, 0));
    q.purge().unwrap();
}

#[test]
fn claims_from_two_connections_never_overlap_and_acks_delete() {
    let mut a = queue("claims", |c| c);
    let mut b = PgQueue::connect(
        &url(),
        QueueConfig::new(format!("claims-{}", std::process::id())),
    )
    .unwrap();
    a.enqueue(&rows(100)).unwrap();
    let ca = a.claim(60).unwrap();
    let cb = b.claim(60).unwrap();
    assert_eq!((ca.len(), cb.len()), (60, 40));
    let ia: HashSet<i64> = ca.iter().map(|c| c.id).collect();
    assert!(cb.iter().all(|c| !ia.contains(&c.id)));
    assert!(ca.iter().chain(&cb).all(|c| c.attempts == 1));
    assert_eq!(a.counts().unwrap(), (0, 100, 0));
    // Each connection settles only what it holds.
    let ids_b: Vec<i64> = cb.iter().map(|c| c.id).collect();
    let wrong = a.ack(&ids_b).unwrap();
    assert_eq!((wrong.rows, wrong.lost), (0, 40));
    assert_eq!(b.ack(&ids_b).unwrap().rows, 40);
    assert_eq!(a.ack(&ia.into_iter().collect::<Vec<_>>()).unwrap().rows, 60);
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
        q.retry(&[id], &format!("failure {attempt}")).unwrap();
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
    q.retry(&[c[0].id], "later").unwrap();
    assert_eq!(q.last_error(c[0].id).unwrap().as_deref(), Some("later"));
    assert!(
        q.claim(1).unwrap().is_empty(),
        "an hour's backoff has not passed"
    );
    assert_eq!(q.counts().unwrap(), (1, 0, 0));
    q.purge().unwrap();
}

#[test]
fn an_expired_lease_comes_back_and_the_late_ack_touches_nothing() {
    let name = format!("lease-{}", std::process::id());
    let mut slow = queue("lease", |c| c.lease(Duration::ZERO));
    let mut other = PgQueue::connect(&url(), QueueConfig::new(name)).unwrap();
    slow.enqueue(&rows(1)).unwrap();
    let first = slow.claim(1).unwrap();
    // The lease (zero) has expired: another process takes the row.
    let second = other.claim(1).unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].id, first[0].id);
    assert_eq!(second[0].attempts, 2);
    let late = slow.ack(&[first[0].id]).unwrap();
    assert_eq!((late.rows, late.lost), (0, 1));
    assert_eq!(other.ack(&[second[0].id]).unwrap().rows, 1);
    assert_eq!(slow.counts().unwrap(), (0, 0, 0));
}

#[test]
fn released_rows_are_ready_at_once_and_do_not_spend_an_attempt() {
    let mut q = queue("release", |c| c);
    q.enqueue(&rows(2)).unwrap();
    let c = q.claim(2).unwrap();
    let ids: Vec<i64> = c.iter().map(|c| c.id).collect();
    assert_eq!(q.release(&ids).unwrap().rows, 2);
    let again = q.claim(2).unwrap();
    assert!(again.iter().all(|c| c.attempts == 1));
    q.purge().unwrap();
}

#[test]
fn bad_input_is_a_clear_error() {
    match PgQueue::connect("port=notanumber", QueueConfig::new("x")) {
        Err(PgError::BadConnectionString(_)) => {}
        other => panic!("{other:?}"),
    }
    // A missing table (here: a search path where it is not) is named as such.
    let elsewhere = format!("{} options='-c search_path=no_such_schema'", url());
    let mut q = PgQueue::connect(&elsewhere, QueueConfig::new("x")).unwrap();
    assert!(matches!(q.claim(1), Err(PgError::NotInstalled)));
    assert!(q.counts().unwrap_err().to_string().contains("install()"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let inside = rt.block_on(async { PgQueue::connect(&url(), QueueConfig::new("x")).err() });
    assert!(matches!(inside, Some(PgError::InsideTokioRuntime)));
}

#[test]
fn four_connections_drain_a_shared_backlog_each_row_exactly_once() {
    let name = format!("shared-{}", std::process::id());
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
                        let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
                        assert_eq!(q.ack(&ids).unwrap().rows, ids.len() as u64);
                        mine.extend(ids);
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

#[test]
fn the_heartbeat_keeps_leases_alive_and_must_beat_three_times_per_lease() {
    let mut q = queue("heartbeat", |c| c.lease(Duration::from_secs(2)));
    let name = format!("heartbeat-{}", std::process::id());
    q.enqueue(&rows(3)).unwrap();
    let claimed = q.claim(3).unwrap();
    let id = claimed[0].id;
    let before = q.lease_left(id).unwrap().expect("leased");
    assert!(before <= 2.0);

    // A direct extension renews every row this owner holds, by the full lease.
    assert_eq!(q.extend_leases().unwrap(), 3);

    // The heartbeat thread does the same on its own.
    let too_slow = buffered_task_pg::PgHeartbeat::start(
        &url(),
        QueueConfig::new(name.clone()).lease(Duration::from_secs(2)),
        q.owner(),
        Duration::from_secs(1),
    );
    assert!(matches!(too_slow, Err(PgError::HeartbeatTooSlow)));
    let beat = buffered_task_pg::PgHeartbeat::start(
        &url(),
        QueueConfig::new(name).lease(Duration::from_secs(2)),
        q.owner(),
        Duration::from_millis(100),
    )
    .unwrap();
    // Past the original lease, the rows are still held (no other claim gets them).
    let mut other = PgQueue::connect(
        &url(),
        QueueConfig::new(format!("heartbeat-{}", std::process::id())),
    )
    .unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        assert!(other.claim(3).unwrap().is_empty(), "a lease ran out");
        std::thread::sleep(Duration::from_millis(100)); // letting the lease clock run
    }
    drop(beat);
    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
    assert_eq!(q.ack(&ids).unwrap().rows, 3);
}

#[test]
fn with_archive_on_done_rows_are_kept_in_the_archive() {
    let mut q = queue("archive", |c| c.archive(true));
    q.enqueue(&rows(3)).unwrap();
    let ids: Vec<i64> = q.claim(3).unwrap().iter().map(|c| c.id).collect();
    assert_eq!(q.ack(&ids[..2]).unwrap().rows, 2);
    let settled = q
        .ack_with(&ids[2..], |_, owned| {
            assert_eq!(owned, &ids[2..]);
            Ok(())
        })
        .unwrap();
    assert_eq!(settled.rows, 1);
    assert_eq!(q.counts().unwrap(), (0, 0, 0));
    assert_eq!(q.archived().unwrap(), 3);
    q.purge().unwrap();
    assert_eq!(q.archived().unwrap(), 0);
}

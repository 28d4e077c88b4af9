//! The engine over a shared table: claims streamed by `init`, outcomes settled
//! in SQL. Needs `DATABASE_URL` (see `tests/queue.rs`).

mod common;

use buffered_task::FlushInterval;
use buffered_task_pg::{NewRow, PgListener, PgQueue, PgTask, QueueConfig, RowHandler, RowOutcome};
use common::{decode_u64, url, wait_for};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Keeps the default panic report for every panic but the tests' deliberate ones.
fn quiet_deliberate_panics() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let deliberate = info
            .payload()
            .downcast_ref::<String>()
            .is_some_and(|m| m.starts_with("deliberate"));
        if !deliberate {
            default(info);
        }
    }));
}

/// Payloads are u64s; every 7th fails its first attempt, every 11th panics on
/// its first attempt, payload 13 cannot be decoded.
struct Flaky {
    done: Arc<Mutex<HashMap<u64, u32>>>,
    seen: Mutex<HashMap<u64, u32>>,
}

impl RowHandler for Flaky {
    type Item = u64;
    fn decode(&self, payload: &[u8]) -> Result<u64, String> {
        let v = decode_u64(payload)?;
        if v == 13 {
            return Err("13 is unlucky".to_string());
        }
        Ok(v)
    }
    fn run(&self, rows: &[(i64, u64)]) -> RowOutcome {
        let mut seen = self.seen.lock().unwrap();
        let mut again = Vec::new();
        for (id, v) in rows {
            let n = seen.entry(*v).or_insert(0);
            *n += 1;
            if *v % 11 == 0 && *n == 1 {
                drop(seen);
                std::panic::panic_any(format!("deliberate: {v}"));
            }
            if *v % 7 == 0 && *n == 1 {
                again.push(*id);
            }
        }
        let mut done = self.done.lock().unwrap();
        for (id, v) in rows {
            if !again.contains(id) {
                *done.entry(*v).or_insert(0) += 1;
            }
        }
        if again.is_empty() {
            RowOutcome::Done
        } else {
            RowOutcome::RetryRows(again, "first try fails".to_string())
        }
    }
}

#[test]
fn the_engine_drains_the_table_every_row_done_once() {
    quiet_deliberate_panics();
    let queue = format!("engine-{}", std::process::id());
    let config = QueueConfig::new(queue.clone()).backoff(Duration::ZERO, Duration::ZERO);
    let mut admin = PgQueue::connect(&url(), config.clone()).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    let rows: Vec<NewRow> = (0..2_000u64)
        .map(|v| NewRow::new(v.to_le_bytes().to_vec()).key(v.to_string()))
        .collect();
    assert_eq!(admin.enqueue(&rows).unwrap().inserted, 2_000);

    let done = Arc::new(Mutex::new(HashMap::new()));
    let handler = Flaky {
        done: done.clone(),
        seen: Mutex::new(HashMap::new()),
    };
    let task = PgTask::new(&url(), config, handler, 2 * 2 * 50).unwrap();
    let probe = task.probe();
    let handle = task
        .builder()
        .max_batch_size(50)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_millis(20))
        .start()
        .unwrap();
    // The table is the source of truth: wait until only the dead row is left.
    wait_for(Duration::from_secs(60), "only the dead row left", || {
        admin.counts().unwrap() == (0, 0, 1)
    });
    handle.shutdown_drain().unwrap();
    let c = probe.counters();
    assert_eq!(
        (c.done, c.buried, c.lost, c.settle_failures),
        (1_999, 1, 0, 0)
    );
    assert_eq!(probe.in_flight(), 0);
    // Every decodable row was done exactly once (failed and panicking attempts
    // were retried through the table); 13 is dead.
    let done = done.lock().unwrap();
    assert_eq!(done.len(), 1_999);
    assert!(done.iter().all(|(v, n)| *v != 13 && *n == 1));
    assert_eq!(admin.counts().unwrap(), (0, 0, 1));
    admin.purge().unwrap();
}

/// Reports every row it runs.
struct Report(crossbeam_channel::Sender<u64>);

impl RowHandler for Report {
    type Item = u64;
    fn decode(&self, payload: &[u8]) -> Result<u64, String> {
        decode_u64(payload)
    }
    fn run(&self, rows: &[(i64, u64)]) -> RowOutcome {
        for (_, v) in rows {
            let _ = self.0.send(*v);
        }
        RowOutcome::Done
    }
}

#[test]
fn notify_wakes_an_idle_engine_and_a_lost_listener_reconnects_and_claims() {
    let queue = format!("notify-{}", std::process::id());
    let config = QueueConfig::new(queue.clone());
    let mut admin = PgQueue::connect(&url(), config.clone()).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    let (tx, ran) = crossbeam_channel::unbounded();
    let task = PgTask::new(&url(), config, Report(tx), 100).unwrap();
    // Polling an hour apart: only a notification (or a reconnection) can start a
    // claim once the first, empty one is done.
    let handle = task
        .builder()
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    let listener = PgListener::start(&url(), &queue, handle.downgrade()).unwrap();
    let hang = Duration::from_secs(30);

    admin
        .enqueue(&[NewRow::new(7u64.to_le_bytes().to_vec())])
        .unwrap();
    assert_eq!(ran.recv_timeout(hang).expect("woken by NOTIFY"), 7);

    // Kill the listener's server process: the next row is enqueued while it is
    // away; the reconnection claims it.
    let start = std::time::Instant::now();
    while listener.backend_pid() == 0 {
        assert!(start.elapsed() < hang);
        std::thread::yield_now();
    }
    let pid = listener.backend_pid();
    let mut killer = common::sql();
    killer
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    // Termination is asynchronous: wait until that backend is gone, so the next
    // notification cannot reach it.
    while killer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
            &[&pid],
        )
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(start.elapsed() < hang);
        std::thread::yield_now();
    }
    admin
        .enqueue(&[NewRow::new(8u64.to_le_bytes().to_vec())])
        .unwrap();
    assert_eq!(
        ran.recv_timeout(hang)
            .expect("found after the reconnection"),
        8
    );
    assert_ne!(listener.backend_pid(), pid);

    drop(listener);
    handle.shutdown_drain().unwrap();
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));
    admin.purge().unwrap();
}

/// Row 1 spawns a new row (100) while being done; row 2 always panics.
struct Spawner(crossbeam_channel::Sender<u64>);

impl RowHandler for Spawner {
    type Item = u64;
    fn decode(&self, payload: &[u8]) -> Result<u64, String> {
        decode_u64(payload)
    }
    fn run(&self, rows: &[(i64, u64)]) -> RowOutcome {
        for (_, v) in rows {
            if *v == 2 {
                std::panic::panic_any("deliberate: row 2".to_string());
            }
        }
        for (_, v) in rows {
            let _ = self.0.send(*v);
        }
        if rows.iter().any(|(_, v)| *v == 1) {
            RowOutcome::RetryRowsAndAdd {
                retry: Vec::new(),
                error: String::new(),
                add: vec![NewRow::new(100u64.to_le_bytes().to_vec())],
            }
        } else {
            RowOutcome::Done
        }
    }
}

#[test]
fn new_rows_are_enqueued_with_the_settlement_and_a_panic_spends_an_attempt() {
    quiet_deliberate_panics();
    let queue = format!("spawn-{}", std::process::id());
    let config = QueueConfig::new(queue.clone())
        .max_attempts(2)
        .backoff(Duration::ZERO, Duration::ZERO);
    let mut admin = PgQueue::connect(&url(), config.clone()).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    admin
        .enqueue(&[NewRow::new(1u64.to_le_bytes().to_vec())])
        .unwrap();
    admin
        .enqueue(&[NewRow::new(2u64.to_le_bytes().to_vec())])
        .unwrap();
    let (tx, ran) = crossbeam_channel::unbounded();
    let task = PgTask::new(&url(), config, Spawner(tx), 10).unwrap();
    let handle = task
        .builder()
        .max_batch_size(1)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_millis(10))
        .start()
        .unwrap();
    let hang = Duration::from_secs(30);
    let mut seen = vec![
        ran.recv_timeout(hang).unwrap(),
        ran.recv_timeout(hang).unwrap(),
    ];
    seen.sort();
    assert_eq!(seen, vec![1, 100]);
    // Row 2 panicked on both of its attempts: dead, with the panic as its error.
    wait_for(hang, "row 2 dead", || admin.counts().unwrap() == (0, 0, 1));
    handle.shutdown_drain().unwrap();
    let mut sql = common::sql();
    let error: String = sql
        .query_one(
            "SELECT last_error FROM buffered_task_jobs WHERE queue = $1 AND state = 'dead'",
            &[&queue],
        )
        .unwrap()
        .get(0);
    assert_eq!(error, "panicked: deliberate: row 2");
    admin.purge().unwrap();
}

/// Defect 8: a 64-character queue name; its listener wakes the engine.
#[test]
fn a_64_character_queue_name_is_woken_by_its_listener() {
    let base = format!("{}-{}", "w".repeat(40), std::process::id());
    let queue = format!("{base}{}", "z".repeat(64 - base.len()));
    assert_eq!(queue.len(), 64);
    let config = QueueConfig::new(queue.clone());
    let mut admin = PgQueue::connect(&url(), config.clone()).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    let (tx, ran) = crossbeam_channel::unbounded();
    let task = PgTask::new(&url(), config, Report(tx), 100).unwrap();
    let handle = task
        .builder()
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    let listener = PgListener::start(&url(), &queue, handle.downgrade()).unwrap();
    wait_for(Duration::from_secs(30), "the listener", || {
        listener.backend_pid() != 0
    });
    // The first claim (at start) found nothing; an hour's poll: only NOTIFY
    // can start the next one.
    admin
        .enqueue(&[NewRow::new(64u64.to_le_bytes().to_vec())])
        .unwrap();
    assert_eq!(
        ran.recv_timeout(Duration::from_secs(30))
            .expect("woken by NOTIFY"),
        64
    );
    drop(listener);
    handle.shutdown_drain().unwrap();
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));
    admin.purge().unwrap();
}

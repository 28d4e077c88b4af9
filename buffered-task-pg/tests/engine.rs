//! The engine over a shared table: claims streamed by `init`, outcomes settled
//! in SQL. Needs `DATABASE_URL` (see `tests/queue.rs`).

use buffered_task::{Builder, FlushInterval};
use buffered_task_pg::{PgQueue, PgTask, QueueConfig, RowHandler, RowOutcome};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Payloads here are little-endian u64s.
fn decode_u64(payload: &[u8]) -> Result<u64, String> {
    Ok(u64::from_le_bytes(
        payload.try_into().map_err(|_| "not 8 bytes".to_string())?,
    ))
}

fn url() -> String {
    std::env::var("DATABASE_URL").expect(
        "these tests need a PostgreSQL server: set DATABASE_URL, e.g. \
         DATABASE_URL=\"host=127.0.0.1 user=postgres dbname=test\"",
    )
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
    let rows: Vec<(Vec<u8>, Option<String>)> = (0..2_000u64)
        .map(|v| (v.to_le_bytes().to_vec(), Some(v.to_string())))
        .collect();
    assert_eq!(admin.enqueue(&rows).unwrap(), 2_000);

    let done = Arc::new(Mutex::new(HashMap::new()));
    let handler = Flaky {
        done: done.clone(),
        seen: Mutex::new(HashMap::new()),
    };
    let task = PgTask::new(&url(), config, handler, 2 * 2 * 50).unwrap();
    let handle = Builder::new(task, ())
        .max_batch_size(50)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_millis(20))
        .start()
        .unwrap();
    // The table is the source of truth: wait until only the dead row is left.
    let start = Instant::now();
    while admin.counts().unwrap() != (0, 0, 1) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{:?}",
            admin.counts()
        );
        std::thread::sleep(Duration::from_millis(20)); // polling a database, not syncing threads
    }
    handle.shutdown_drain().unwrap();
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
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    let listener = buffered_task_pg::PgListener::start(&url(), &queue, handle.downgrade()).unwrap();
    let hang = Duration::from_secs(30);

    admin
        .enqueue(&[(7u64.to_le_bytes().to_vec(), None)])
        .unwrap();
    assert_eq!(ran.recv_timeout(hang).expect("woken by NOTIFY"), 7);

    // Kill the listener's server process: the next row is enqueued while it is
    // away; the reconnection claims it.
    let start = Instant::now();
    while listener.backend_pid() == 0 {
        assert!(start.elapsed() < hang);
        std::thread::yield_now();
    }
    let pid = listener.backend_pid();
    let mut killer = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
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
        .enqueue(&[(8u64.to_le_bytes().to_vec(), None)])
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
                add: vec![(100u64.to_le_bytes().to_vec(), None)],
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
        .enqueue(&[(1u64.to_le_bytes().to_vec(), None)])
        .unwrap();
    admin
        .enqueue(&[(2u64.to_le_bytes().to_vec(), None)])
        .unwrap();
    let (tx, ran) = crossbeam_channel::unbounded();
    let task = PgTask::new(&url(), config, Spawner(tx), 10).unwrap();
    let handle = Builder::new(task, ())
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
    let start = Instant::now();
    while admin.counts().unwrap() != (0, 0, 1) {
        assert!(start.elapsed() < hang, "{:?}", admin.counts());
        std::thread::sleep(Duration::from_millis(10)); // polling a database
    }
    handle.shutdown_drain().unwrap();
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
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

//! Throughput of a shared PostgreSQL queue: 4 worker processes claim rows as the
//! engine does (2 × concurrency 2 × batch 500 at a time), run (a trivial sum) and
//! acknowledge them in batches of 500, against a naive loop measured in the same
//! run (one row per transaction with SKIP LOCKED).
//!
//! `cargo run --release -p buffered-task-pg --example pg_bench`
//! (uses DATABASE_URL, default `host=127.0.0.1 user=postgres dbname=test`).

use buffered_task::{Builder, FlushInterval};
use buffered_task_pg::{PgListener, PgQueue, PgTask, QueueConfig, RowHandler, RowOutcome};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PROCESSES: usize = 4;

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 4 && args[1] == "--worker" {
        return worker(&args[2], &args[3]);
    }
    let rows: usize = std::env::var("PG_BENCH_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let naive_rows = rows / 10;
    let batched = run("batched", rows);
    let naive = run("naive", naive_rows);
    let (p50, p99) = wake_latency(100);
    println!("{:<28} {:>12}", "workload (4 processes)", "rows/s");
    println!("{:<28} {:>12.0}", "claim 2000, run+ack by 500", batched);
    println!("{:<28} {:>12.0}", "naive: 1 row per transaction", naive);
    println!("ratio {:.1}x", batched / naive);
    println!("idle engine, 60 s poll: enqueue to run p50 {p50:.1} ms, p99 {p99:.1} ms (NOTIFY)");
    println!(
        "{{\"pg\":{{\"batched_rows_per_s\":{batched:.0},\"naive_rows_per_s\":{naive:.0},\"ratio\":{:.2},\"notify_p50_ms\":{p50:.2},\"notify_p99_ms\":{p99:.2}}}}}",
        batched / naive
    );
}

/// Seeds `rows`, starts the processes, returns rows per second.
fn run(mode: &str, rows: usize) -> f64 {
    let queue = format!("bench-{mode}-{}", std::process::id());
    let mut admin = PgQueue::connect(&url(), QueueConfig::new(queue.clone())).expect("connect");
    admin.install().unwrap();
    admin.purge().unwrap();
    let payloads: Vec<(Vec<u8>, Option<String>)> = (0..rows as u64)
        .map(|i| (i.to_le_bytes().to_vec(), None))
        .collect();
    for chunk in payloads.chunks(20_000) {
        admin.enqueue(chunk).unwrap();
    }
    // Start every run from a table without dead tuples left by earlier runs.
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
    sql.batch_execute("VACUUM (ANALYZE) buffered_task_jobs")
        .unwrap();
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut children: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .args(["--worker", mode, &queue])
                .spawn()
                .unwrap()
        })
        .collect();
    for c in &mut children {
        assert!(c.wait().unwrap().success());
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(admin.counts().unwrap(), (0, 0, 0), "{mode}: rows left");
    rows as f64 / secs
}

fn worker(mode: &str, queue: &str) {
    let mut q = PgQueue::connect(&url(), QueueConfig::new(queue)).expect("connect");
    let mut sum = 0u64;
    match mode {
        "batched" => loop {
            // As the engine does: claim 2 x concurrency (2) x batch (500) rows,
            // run and acknowledge them a batch of 500 at a time.
            let chunk: i64 = std::env::var("PG_BENCH_CLAIM")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(2 * 2 * 500);
            let claimed = q.claim(chunk).unwrap();
            if claimed.is_empty() {
                break;
            }
            for batch in claimed.chunks(500) {
                for c in batch {
                    sum = sum.wrapping_add(c.payload[0] as u64);
                }
                let ids: Vec<i64> = batch.iter().map(|c| c.id).collect();
                q.ack(&ids).unwrap();
            }
        },
        _ => {
            let mut sql = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
            loop {
                let mut tx = sql.transaction().unwrap();
                let row = tx
                    .query_opt(
                        "SELECT id, payload FROM buffered_task_jobs WHERE queue = $1 AND state = 'ready'
                         ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
                        &[&queue],
                    )
                    .unwrap();
                let Some(row) = row else { break };
                let (id, payload): (i64, Vec<u8>) = (row.get(0), row.get(1));
                sum = sum.wrapping_add(payload[0] as u64);
                tx.execute("DELETE FROM buffered_task_jobs WHERE id = $1", &[&id])
                    .unwrap();
                tx.commit().unwrap();
            }
        }
    }
    std::hint::black_box(sum);
}

struct Signal(Mutex<mpsc::Sender<Instant>>);

impl RowHandler for Signal {
    type Item = ();
    fn decode(&self, _: &[u8]) -> Result<(), String> {
        Ok(())
    }
    fn run(&self, _: &[(i64, ())]) -> RowOutcome {
        let _ = self.0.lock().unwrap().send(Instant::now());
        RowOutcome::Done
    }
}

/// From `enqueue` to `run` starting, in an idle engine polling once a minute:
/// only the notification can be that quick.
fn wake_latency(samples: usize) -> (f64, f64) {
    let queue = format!("bench-notify-{}", std::process::id());
    let config = QueueConfig::new(queue.clone());
    let mut admin = PgQueue::connect(&url(), config.clone()).expect("connect");
    admin.install().unwrap();
    admin.purge().unwrap();
    let (tx, rx) = mpsc::channel();
    let task = PgTask::new(&url(), config, Signal(Mutex::new(tx)), 100).unwrap();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(60))
        .start()
        .unwrap();
    let listener = PgListener::start(&url(), &queue, handle.downgrade()).unwrap();
    while listener.backend_pid() == 0 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(Duration::from_millis(20)); // idle again
        let t0 = Instant::now();
        admin.enqueue(&[(vec![0], None)]).unwrap();
        let t1 = rx.recv_timeout(Duration::from_secs(30)).expect("woken");
        ms.push(t1.duration_since(t0).as_secs_f64() * 1e3);
    }
    drop(listener);
    handle.shutdown_drain().unwrap();
    admin.purge().unwrap();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (
        ms[ms.len() / 2],
        ms[(ms.len() * 99 / 100).min(ms.len() - 1)],
    )
}

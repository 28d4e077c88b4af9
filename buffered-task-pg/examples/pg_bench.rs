//! Throughput of a shared PostgreSQL queue, claim + ack with no-op work: 4
//! worker processes claim rows as the engine does (2 × concurrency 2 × batch 500
//! at a time) and acknowledge them in batches of 500, against a naive loop (one
//! row per transaction: SELECT … FOR UPDATE SKIP LOCKED LIMIT 1, DELETE,
//! COMMIT), both with the same commit setting, in the same run. Every round
//! starts from a VACUUMed table; the medians of the rounds are reported.
//!
//! `cargo run --release -p buffered-task-pg --example pg_bench`
//!
//! Environment: DATABASE_URL (default `host=127.0.0.1 user=postgres dbname=test`),
//! PG_BENCH_ROWS (batched rows per round, default 200000), PG_BENCH_NAIVE_ROWS
//! (default 4000), PG_BENCH_ROUNDS (default 3), PG_BENCH_COMMIT (`sync`, `async`
//! or `both`, default `both`), PG_BENCH_CLAIM (rows per claim, default 2000),
//! PG_BENCH_ACK (rows per ack, default 500).

use buffered_task::FlushInterval;
use buffered_task_pg::{
    leases, NewRow, PgListener, PgQueue, PgTask, QueueConfig, RowHandler, RowOutcome,
};
use std::process::Command;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Worker processes (PG_BENCH_PROCESSES, default 4).
fn processes() -> usize {
    env("PG_BENCH_PROCESSES", 4).max(1)
}

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 5 && args[1] == "--worker" {
        return worker(&args[2], &args[3], args[4] == "async");
    }
    let rows = env("PG_BENCH_ROWS", 200_000);
    let naive_rows = env("PG_BENCH_NAIVE_ROWS", 4_000);
    let rounds = env("PG_BENCH_ROUNDS", 3).max(1);
    let commits: Vec<&str> = match std::env::var("PG_BENCH_COMMIT").as_deref() {
        Ok("sync") => vec!["sync"],
        Ok("async") => vec!["async"],
        _ => vec!["sync", "async"],
    };
    println!(
        "{} processes; batched: claim {} rows, ack by {}; {rows} rows a round \
         (naive: {naive_rows}); {rounds} rounds, medians",
        processes(),
        env("PG_BENCH_CLAIM", 2000),
        env("PG_BENCH_ACK", 500)
    );
    let mut json = Vec::new();
    for commit in &commits {
        let mut batched = Vec::new();
        let mut naive = Vec::new();
        for round in 0..rounds {
            let b = run("batched", commit, rows);
            let n = run("naive", commit, naive_rows);
            println!("  {commit} round {round}: batched {b:>9.0} rows/s, naive {n:>7.0} rows/s");
            batched.push(b);
            naive.push(n);
        }
        let (b, n) = (median(&mut batched), median(&mut naive));
        println!(
            "{commit:>5} commit: batched {b:>9.0} rows/s   naive {n:>7.0} rows/s   ratio {:.1}x",
            b / n
        );
        json.push(format!(
            "\"{commit}\":{{\"batched_rows_per_s\":{b:.0},\"naive_rows_per_s\":{n:.0},\"ratio\":{:.2}}}",
            b / n
        ));
    }
    let (p50, p99) = wake_latency(100);
    println!("idle engine, 60 s poll: enqueue to run p50 {p50:.1} ms, p99 {p99:.1} ms (NOTIFY)");
    println!(
        "{{\"pg\":{{{},\"notify_p50_ms\":{p50:.2},\"notify_p99_ms\":{p99:.2}}}}}",
        json.join(",")
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Seeds `rows`, VACUUMs, starts the processes, returns rows per second.
fn run(mode: &str, commit: &str, rows: usize) -> f64 {
    let queue = format!("bench-{mode}-{}", std::process::id());
    let mut admin = PgQueue::connect(&url(), QueueConfig::new(queue.clone())).expect("connect");
    admin.install().unwrap();
    admin.purge().unwrap();
    let payloads: Vec<NewRow> = (0..rows as u64)
        .map(|i| NewRow::new(i.to_le_bytes().to_vec()))
        .collect();
    for chunk in payloads.chunks(20_000) {
        admin.enqueue(chunk).unwrap();
    }
    // Every round starts from a table without dead tuples left by earlier ones.
    admin.vacuum().unwrap();
    let exe = std::env::current_exe().unwrap();
    let start = Instant::now();
    let mut children: Vec<_> = (0..processes())
        .map(|_| {
            Command::new(&exe)
                .args(["--worker", mode, &queue, commit])
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

fn worker(mode: &str, queue: &str, relaxed: bool) {
    let mut sum = 0u64;
    match mode {
        "batched" => {
            let config = QueueConfig::new(queue).relaxed_settles(relaxed);
            let mut q = PgQueue::connect(&url(), config).expect("connect");
            let chunk = env("PG_BENCH_CLAIM", 2000) as i64;
            let ack = env("PG_BENCH_ACK", 500).max(1);
            let (mut claiming, mut acking) = (Duration::ZERO, Duration::ZERO);
            // The server process's CPU time (same machine), to see where the
            // time goes whatever else runs.
            let backend = q.backend_pid().unwrap();
            let server_before = cpu_secs(&format!("/proc/{backend}/stat"));
            let client_before = cpu_secs("/proc/self/stat");
            let mut rows = 0usize;
            let start = Instant::now();
            loop {
                let t = Instant::now();
                let claimed = q.claim(chunk).unwrap();
                claiming += t.elapsed();
                if claimed.is_empty() {
                    break;
                }
                rows += claimed.len();
                for batch in claimed.chunks(ack) {
                    for c in batch {
                        sum = sum.wrapping_add(c.payload[0] as u64);
                    }
                    let t = Instant::now();
                    q.ack(&leases(batch)).unwrap();
                    acking += t.elapsed();
                }
            }
            if std::env::var("PG_BENCH_PROFILE").is_ok() {
                let server = cpu_secs(&format!("/proc/{backend}/stat")) - server_before;
                let client = cpu_secs("/proc/self/stat") - client_before;
                eprintln!(
                    "worker: {rows} rows in {:.2}s (claims {:.2}s, acks {:.2}s); CPU per row: \
                     server {:.1} µs, client {:.1} µs",
                    start.elapsed().as_secs_f64(),
                    claiming.as_secs_f64(),
                    acking.as_secs_f64(),
                    server * 1e6 / rows.max(1) as f64,
                    client * 1e6 / rows.max(1) as f64,
                );
            }
        }
        _ => {
            let mut sql = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
            if relaxed {
                sql.batch_execute("SET synchronous_commit = off").unwrap();
            }
            let select = sql
                .prepare(
                    "SELECT id, payload FROM buffered_task_jobs
                     WHERE queue = $1 AND state = 'ready' AND run_after <= now()
                     ORDER BY priority, run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED",
                )
                .unwrap();
            let delete = sql
                .prepare("DELETE FROM buffered_task_jobs WHERE id = $1")
                .unwrap();
            loop {
                let mut tx = sql.transaction().unwrap();
                let Some(row) = tx.query_opt(&select, &[&queue]).unwrap() else {
                    break;
                };
                let (id, payload): (i64, Vec<u8>) = (row.get(0), row.get(1));
                sum = sum.wrapping_add(payload[0] as u64);
                tx.execute(&delete, &[&id]).unwrap();
                tx.commit().unwrap();
            }
        }
    }
    std::hint::black_box(sum);
}

/// User + system CPU seconds of a process, from its `/proc/<pid>/stat` (0 when
/// unreadable: another machine, another system).
fn cpu_secs(stat: &str) -> f64 {
    let Ok(text) = std::fs::read_to_string(stat) else {
        return 0.0;
    };
    // Fields after the command name (which is in parentheses): utime and stime
    // are the 12th and 13th, in clock ticks (100 per second on Linux).
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields
        .get(11..13)
        .map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    ticks as f64 / 100.0
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
    let handle = task
        .builder()
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(60))
        .start()
        .unwrap();
    let listener = PgListener::start(&url(), &queue, handle.downgrade()).unwrap();
    let start = Instant::now();
    while listener.backend_pid() == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "no listener");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut ms = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(Duration::from_millis(20)); // idle again
        let t0 = Instant::now();
        admin.enqueue(&[NewRow::new(vec![0])]).unwrap();
        let t1 = rx.recv_timeout(Duration::from_secs(30)).expect("woken");
        ms.push(t1.duration_since(t0).as_secs_f64() * 1e3);
    }
    drop(listener);
    handle.shutdown_drain().unwrap();
    admin.purge().unwrap();
    ms.sort_by(|a, b| a.total_cmp(b));
    (
        ms[ms.len() / 2],
        ms[(ms.len() * 99 / 100).min(ms.len() - 1)],
    )
}

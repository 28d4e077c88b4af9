//! A small cluster on the local server: N worker processes share one queue, each
//! running a buffered-task engine over it (`PgTask`), and write `done(id)` for
//! every row. Progress is printed as it goes; at the end the example checks that
//! every row was done exactly once.
//!
//! `cargo run --release -p buffered-task-pg --example pg_cluster -- [processes] [rows]`
//! (uses DATABASE_URL, default `host=127.0.0.1 user=postgres dbname=test`).

use buffered_task::FlushInterval;
use buffered_task_pg::{NewRow, PgListener, PgQueue, PgTask, QueueConfig, RowHandler, RowOutcome};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into())
}

/// Records each row's id in the done table (with how many times it ran).
struct Record {
    sql: Mutex<postgres::Client>,
    done_table: String,
}

impl RowHandler for Record {
    type Item = u64;
    fn decode(&self, payload: &[u8]) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            payload.try_into().map_err(|_| "not 8 bytes".to_string())?,
        ))
    }
    fn run(&self, rows: &[(i64, u64)]) -> RowOutcome {
        let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
        let mut sql = self.sql.lock().unwrap();
        // ON CONFLICT: a row can run twice (at-least-once: a lease ran out), but
        // its id is recorded once; the count of runs is kept separately.
        let r = sql.execute(
            &format!(
                "INSERT INTO {} (id, runs) SELECT unnest($1::bigint[]), 1
                 ON CONFLICT (id) DO UPDATE SET runs = {}.runs + 1",
                self.done_table, self.done_table
            ),
            &[&ids],
        );
        match r {
            Ok(_) => RowOutcome::Done,
            Err(e) => RowOutcome::Retry(e.to_string()),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() == 3 && args[1] == "--worker" {
        return worker(&args[2]);
    }
    let processes: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let rows: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(50_000);
    let queue = format!("cluster-{}", std::process::id());
    let done = format!("done_cluster_{}", std::process::id());

    let mut admin = PgQueue::connect(&url(), QueueConfig::new(queue.clone()))?;
    admin.install()?;
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls)?;
    sql.batch_execute(&format!(
        "CREATE TABLE {done} (id bigint PRIMARY KEY, runs int NOT NULL)"
    ))?;

    println!("seeding {rows} rows into queue {queue}");
    let payloads: Vec<NewRow> = (0..rows)
        .map(|i| NewRow::new(i.to_le_bytes().to_vec()))
        .collect();
    for chunk in payloads.chunks(20_000) {
        admin.enqueue(chunk)?;
    }
    let exe = std::env::current_exe()?;
    let start = Instant::now();
    let mut children: Vec<_> = (0..processes)
        .map(|_| Command::new(&exe).args(["--worker", &queue]).spawn())
        .collect::<Result<_, _>>()?;
    println!("started {processes} worker processes");
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let (ready, leased, dead) = admin.counts()?;
        let finished: i64 = sql
            .query_one(&format!("SELECT count(*) FROM {done}"), &[])?
            .get(0);
        println!(
            "{:>6.1}s  done {finished:>7}  ready {ready:>7}  leased {leased:>5}  dead {dead}",
            start.elapsed().as_secs_f64()
        );
        if ready + leased == 0 {
            break;
        }
    }
    for c in &mut children {
        c.kill()?; // the workers poll for ever; the queue is empty
        c.wait()?;
    }
    let row = sql.query_one(
        &format!("SELECT count(*), coalesce(sum(runs), 0) FROM {done}"),
        &[],
    )?;
    let (count, runs): (i64, i64) = (row.get(0), row.get(1));
    println!();
    println!("rows enqueued       {rows}");
    println!("rows done (once)    {count}");
    println!("runs (at least once) {runs}");
    println!(
        "elapsed             {:.1}s ({:.0} rows/s)",
        start.elapsed().as_secs_f64(),
        count as f64 / start.elapsed().as_secs_f64()
    );
    sql.batch_execute(&format!("DROP TABLE {done}"))?;
    admin.purge()?;
    if count as u64 != rows {
        return Err(format!("{count} of {rows} rows done").into());
    }
    println!("every row was done exactly once");
    Ok(())
}

fn worker(queue: &str) -> Result<(), Box<dyn std::error::Error>> {
    let pid = queue.trim_start_matches("cluster-");
    let handler = Record {
        sql: Mutex::new(postgres::Client::connect(&url(), postgres::NoTls)?),
        done_table: format!("done_cluster_{pid}"),
    };
    let config =
        QueueConfig::new(queue).backoff(Duration::from_millis(100), Duration::from_secs(1));
    let task = PgTask::new(&url(), config, handler, 2 * 2 * 200)?;
    let handle = task
        .builder()
        .name("cluster")
        .max_batch_size(200)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_millis(200))
        .start()?;
    let _listener = PgListener::start(&url(), queue, handle.downgrade())?;
    loop {
        std::thread::sleep(Duration::from_secs(3600)); // until the parent stops us
    }
}

//! Real processes against a real server (needs `DATABASE_URL`): workers are
//! killed with SIGKILL at random and respawned; every row is still done exactly
//! once (`done(id)` is written in the transaction that deletes the row).

use buffered_task_pg::{PgQueue, QueueConfig};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

fn url() -> String {
    std::env::var("DATABASE_URL").expect(
        "these tests need a PostgreSQL server: set DATABASE_URL, e.g. \
         DATABASE_URL=\"host=127.0.0.1 user=postgres dbname=test\"",
    )
}

fn spawn(queue: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pg_worker"))
        .args([url().as_str(), queue, "4", "1000"])
        .spawn()
        .expect("start a worker")
}

#[test]
fn killing_workers_at_random_loses_nothing_and_doubles_nothing() {
    let queue = format!("kill-{}", std::process::id());
    let done = format!("done_kill_{}", std::process::id());
    let mut admin = PgQueue::connect(&url(), QueueConfig::new(queue.clone())).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
    sql.batch_execute(&format!(
        "DROP TABLE IF EXISTS {done}; CREATE TABLE {done} (id bigint PRIMARY KEY)"
    ))
    .unwrap();
    const ROWS: usize = 100_000;
    let rows: Vec<(Vec<u8>, Option<String>)> = (0..ROWS)
        .map(|i| (i.to_le_bytes().to_vec(), None))
        .collect();
    for chunk in rows.chunks(10_000) {
        admin.enqueue(chunk).unwrap();
    }
    let ids: Vec<i64> = sql
        .query(
            "SELECT id FROM buffered_task_jobs WHERE queue = $1 ORDER BY id",
            &[&queue],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids.len(), ROWS);

    let mut workers: Vec<Child> = (0..4).map(|_| spawn(&queue)).collect();
    let start = Instant::now();
    let mut kills = 0;
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D ^ u64::from(std::process::id());
    loop {
        std::thread::sleep(Duration::from_millis(200)); // the kill cadence
        let (ready, leased, dead) = admin.counts().unwrap();
        assert_eq!(dead, 0);
        if ready + leased == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "stuck at {ready} ready, {leased} leased"
        );
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let victim = (seed % workers.len() as u64) as usize;
        workers[victim].kill().unwrap(); // SIGKILL
        workers[victim].wait().unwrap();
        kills += 1;
        workers[victim] = spawn(&queue);
    }
    for w in &mut workers {
        w.wait().unwrap(); // they exit once the queue is empty
    }
    let row = sql
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id) FROM {done}"),
            &[],
        )
        .unwrap();
    let (count, distinct): (i64, i64) = (row.get(0), row.get(1));
    println!("{kills} workers killed; {count} rows done");
    assert!(kills > 0);
    assert_eq!((count, distinct), (ROWS as i64, ROWS as i64));
    let missing = sql
        .query_one(
            &format!("SELECT count(*) FROM unnest($1::bigint[]) AS g(id) WHERE id NOT IN (SELECT id FROM {done})"),
            &[&ids],
        )
        .unwrap();
    assert_eq!(missing.get::<_, i64>(0), 0);
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));
    sql.batch_execute(&format!("DROP TABLE {done}")).unwrap();
}

#[test]
fn a_stopped_worker_past_its_lease_finds_its_rows_done_by_another() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let queue = format!("stop-{}", std::process::id());
    let done = format!("done_stop_{}", std::process::id());
    let mut admin = PgQueue::connect(&url(), QueueConfig::new(queue.clone())).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    let mut sql = postgres::Client::connect(&url(), postgres::NoTls).unwrap();
    sql.batch_execute(&format!(
        "DROP TABLE IF EXISTS {done}; CREATE TABLE {done} (id bigint PRIMARY KEY)"
    ))
    .unwrap();
    let rows: Vec<(Vec<u8>, Option<String>)> = (0..50u64)
        .map(|i| (i.to_le_bytes().to_vec(), None))
        .collect();
    admin.enqueue(&rows).unwrap();

    // A claims everything with a short lease and is stopped before it can ack.
    let mut a = Command::new(env!("CARGO_BIN_EXE_pg_worker"))
        .args([url().as_str(), &queue, "once", "500"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "claimed 50");
    let pid = a.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());

    // Past A's lease, B takes the rows and finishes them.
    std::thread::sleep(Duration::from_millis(800)); // letting A's lease run out
    let mut b = spawn(&queue);
    assert!(b.wait().unwrap().success());
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));

    // A wakes up: its late ack touches no row, and writes no effect.
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "acked 0");
    assert!(a.wait().unwrap().success());
    let row = sql
        .query_one(
            &format!("SELECT count(*), count(DISTINCT id) FROM {done}"),
            &[],
        )
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (50, 50));
    sql.batch_execute(&format!("DROP TABLE {done}")).unwrap();
}

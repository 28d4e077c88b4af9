//! Real processes against a real server (needs `DATABASE_URL`): workers killed
//! with SIGKILL at random, stopped with SIGSTOP, crashed by a poison row; the
//! server restarted and crashed (immediate stop) in the middle of work. Every
//! row is done exactly once (`done` is written in the transaction that deletes
//! the row), or dead with a reason.
//!
//! This binary has its own `main` (`harness = false`): run with `--worker …`
//! it is a worker process (so the crate ships no helper binary); otherwise it
//! runs the tests one after another (those that stop the server must not
//! overlap), each under a guard that starts the server again if it is down.
//! Arguments that do not start with `-` filter tests by name.

mod common;

use buffered_task::FlushInterval;
use buffered_task_pg::{
    leases, NewRow, PgListener, PgQueue, PgTask, QueueConfig, RowHandler, RowOutcome,
};
use common::{decode_u64, sql, url, wait_for};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The payload that crashes any worker that claims it.
const POISON: u64 = u64::MAX;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--worker") {
        return worker(&args[1..]);
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in TESTS {
            println!("{name}: test");
        }
        return;
    }
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in TESTS {
        if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let start = Instant::now();
        println!("test {name} ...");
        match std::panic::catch_unwind(test) {
            Ok(()) => {
                passed += 1;
                println!("test {name} ... ok ({:.1}s)", start.elapsed().as_secs_f64());
            }
            Err(_) => {
                failed += 1;
                println!("test {name} ... FAILED");
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(101);
    }
}

type Test = (&'static str, fn());

const TESTS: &[Test] = &[
    (
        "killing_workers_at_random_loses_nothing_and_doubles_nothing",
        killing_workers_at_random_loses_nothing_and_doubles_nothing,
    ),
    (
        "a_stopped_worker_past_its_lease_finds_its_rows_done_by_another",
        a_stopped_worker_past_its_lease_finds_its_rows_done_by_another,
    ),
    (
        "a_poison_row_that_crashes_its_workers_goes_dead_with_the_reason",
        a_poison_row_that_crashes_its_workers_goes_dead_with_the_reason,
    ),
    (
        "a_server_restart_mid_run_loses_nothing_and_strands_nothing",
        a_server_restart_mid_run_loses_nothing_and_strands_nothing,
    ),
    (
        "a_server_crash_mid_work_loses_no_acknowledged_row",
        a_server_crash_mid_work_loses_no_acknowledged_row,
    ),
];

// ---------------------------------------------------------------- the tests

fn killing_workers_at_random_loses_nothing_and_doubles_nothing() {
    let queue = format!("kill-{}", std::process::id());
    let done = done_table(&queue);
    let mut admin = fresh_queue(&queue, &done);
    const ROWS: usize = 60_000;
    for chunk in payloads(0, ROWS as u64).chunks(10_000) {
        admin.enqueue(chunk).unwrap();
    }
    let spawn = || drain_worker(&queue, &["4", "50", "1000", "0"]);
    let mut workers: Vec<Child> = (0..4).map(|_| spawn()).collect();
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
        workers[victim] = spawn();
    }
    for w in &mut workers {
        assert!(w.wait().unwrap().success()); // they exit once the queue is empty
    }
    println!("  {kills} workers killed");
    assert!(kills > 0);
    assert_exactly_once(&done, 0, ROWS as u64);
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));
    drop_table(&done);
}

fn a_stopped_worker_past_its_lease_finds_its_rows_done_by_another() {
    let queue = format!("stop-{}", std::process::id());
    let done = done_table(&queue);
    let mut admin = fresh_queue(&queue, &done);
    admin.enqueue(&payloads(0, 50)).unwrap();

    // A claims everything with a short lease and is stopped before it can ack.
    let mut a = worker_command(&["once", &url(), &queue, "500"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut go = a.stdin.take().unwrap();
    let mut out = BufReader::new(a.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "claimed 50");
    signal(&a, "STOP");

    // Past A's lease, B takes the rows and finishes them.
    std::thread::sleep(Duration::from_millis(800)); // letting A's lease run out
    let mut b = drain_worker(&queue, &["4", "50", "1000", "0"]);
    assert!(b.wait().unwrap().success());
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));

    // A wakes up: its late ack touches no row, and writes no effect.
    signal(&a, "CONT");
    writeln!(go, "ack").unwrap(); // its run ends now
    drop(go);
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "acked 0");
    assert!(a.wait().unwrap().success());
    assert_exactly_once(&done, 0, 50);
    drop_table(&done);
}

/// Defect 2, with real processes: the poison row aborts every worker that
/// claims it; after `max_attempts` expired leases it is dead, with the reason,
/// and every other row is done exactly once.
fn a_poison_row_that_crashes_its_workers_goes_dead_with_the_reason() {
    let queue = format!("poison-{}", std::process::id());
    let done = done_table(&queue);
    let mut admin = fresh_queue(&queue, &done);
    // A row's attempts are set when it is enqueued.
    let mut admin3 = PgQueue::connect(&url(), QueueConfig::new(&queue).max_attempts(3)).unwrap();
    let mut rows = payloads(0, 20);
    rows.insert(7, NewRow::new(POISON.to_le_bytes().to_vec()));
    admin3.enqueue(&rows).unwrap();
    // One row per claim (so the poison row's crashes spend no other row's
    // attempts), 3 attempts, 300 ms leases, no backoff.
    let start = Instant::now();
    let mut crashes = 0;
    loop {
        let mut w = drain_worker(&queue, &["1", "1", "300", "3"]);
        let status = w.wait().unwrap();
        if status.success() {
            break; // the queue is empty of ready and leased rows
        }
        crashes += 1;
        assert!(crashes <= 3, "the poison row crashed a 4th worker");
        assert!(start.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(350)); // letting its lease expire
    }
    assert_eq!(crashes, 3);
    assert_eq!(admin.counts().unwrap(), (0, 0, 1));
    let dead = admin.dead_rows(0, 10).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(decode_u64(&dead[0].payload), Ok(POISON));
    let reason = dead[0].last_error.clone().unwrap();
    assert!(
        reason.contains("lease expired on attempt 3 of 3") && reason.contains("attempts spent"),
        "{reason}"
    );
    assert_eq!(admin.stats().unwrap().lost_leases, 3);
    assert_exactly_once(&done, 0, 20);
    admin.purge().unwrap();
    drop_table(&done);
}

/// Defects 1 and 6: a restart in the middle of a run; worker processes (plain
/// queue loops, and an engine with per-worker connections, a heartbeat and a
/// listener) reconnect quietly, every row is done and none is left leased.
fn a_server_restart_mid_run_loses_nothing_and_strands_nothing() {
    let Some(server) = Server::lock() else { return };
    let queue = format!("restart-{}", std::process::id());
    let engine_queue = format!("restart-engine-{}", std::process::id());
    let done = done_table(&queue);
    let engine_done = done_table(&engine_queue);
    let mut admin = fresh_queue(&queue, &done);
    let mut engine_admin = fresh_queue(&engine_queue, &engine_done);
    sql()
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {engine_done}; \
             CREATE TABLE {engine_done} (value bigint PRIMARY KEY, runs int NOT NULL)"
        ))
        .unwrap();
    const ROWS: u64 = 30_000;
    for chunk in payloads(0, ROWS).chunks(10_000) {
        admin.enqueue(chunk).unwrap();
        engine_admin.enqueue(chunk).unwrap();
    }
    let logs = LogDir::new("restart");
    let mut workers: Vec<Child> = (0..2)
        .map(|i| {
            worker_command(&["drain", &url(), &queue, "2", "50", "2000", "0", "0"])
                .stderr(logs.file(&format!("drain-{i}")))
                .spawn()
                .unwrap()
        })
        .collect();
    let mut engine = worker_command(&["engine", &url(), &engine_queue, "2000"])
        .stdin(Stdio::piped())
        .stderr(logs.file("engine"))
        .spawn()
        .unwrap();
    // Restart once both queues are partly done.
    wait_for(Duration::from_secs(60), "work to start", || {
        let (r1, _, _) = admin.counts().unwrap();
        let (r2, _, _) = engine_admin.counts().unwrap();
        r1 < ROWS as i64 * 9 / 10 && r2 < ROWS as i64 * 9 / 10
    });
    server.restart();
    wait_for(Duration::from_secs(120), "both queues empty", || {
        let a = admin.counts();
        let b = engine_admin.counts();
        matches!((a, b), (Ok((0, 0, 0)), Ok((0, 0, 0))))
    });
    for w in &mut workers {
        assert!(w.wait().unwrap().success());
    }
    drop(engine.stdin.take()); // the engine worker stops when its stdin closes
    assert!(engine.wait().unwrap().success());
    assert_exactly_once(&done, 0, ROWS);
    let (count, runs): (i64, i64) = {
        let r = sql()
            .query_one(
                &format!("SELECT count(*), coalesce(sum(runs), 0)::int8 FROM {engine_done}"),
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    println!("  engine: {count} rows done in {runs} runs");
    assert_eq!(count, ROWS as i64, "every row ran at least once");
    // Quietly: the logs of a restart are a few lines, not a flood.
    let bytes = logs.total_bytes();
    println!("  worker logs: {bytes} bytes");
    if std::env::var("SHOW_WORKER_LOGS").is_ok() {
        logs.print();
    }
    assert!(bytes < 64 * 1024, "{bytes} bytes of worker logs");
    drop_table(&done);
    drop_table(&engine_done);
    admin.purge().unwrap();
    engine_admin.purge().unwrap();
}

/// Defects 4, 5 and 6: an immediate stop (a crash: no shutdown checkpoint)
/// while a process enqueues rows one at a time and workers drain them. Every
/// enqueue that returned `Ok` survives; one that failed is repeated under the
/// same request id, so each row is inserted once; every row is done exactly
/// once.
fn a_server_crash_mid_work_loses_no_acknowledged_row() {
    let Some(server) = Server::lock() else { return };
    let queue = format!("crash-{}", std::process::id());
    let done = done_table(&queue);
    let mut admin = fresh_queue(&queue, &done);
    const ROWS: u64 = 3_000;
    let logs = LogDir::new("crash");
    let mut enqueuer = worker_command(&["enqueue", &url(), &queue, &ROWS.to_string()])
        .stdout(Stdio::piped())
        .stderr(logs.file("enqueue"))
        .spawn()
        .unwrap();
    let out = enqueuer.stdout.take().unwrap();
    let acknowledged = std::thread::spawn(move || {
        let mut ok = Vec::new();
        for line in BufReader::new(out).lines() {
            let line = line.unwrap();
            if let Some(v) = line.strip_prefix("ok ") {
                ok.push(v.parse::<u64>().unwrap());
            }
        }
        ok
    });
    let mut workers: Vec<Child> = (0..2)
        .map(|i| {
            worker_command(&["drain", &url(), &queue, "2", "20", "2000", "0", "1"])
                .stderr(logs.file(&format!("drain-{i}")))
                .spawn()
                .unwrap()
        })
        .collect();
    wait_for(Duration::from_secs(60), "some rows done", || {
        count_done(&done).is_ok_and(|n| n > 300)
    });
    server.crash_and_start();
    assert!(
        wait_child(&mut enqueuer, Duration::from_secs(180)).success(),
        "the enqueuer failed"
    );
    let acknowledged = acknowledged.join().unwrap();
    assert_eq!(
        acknowledged.len() as u64,
        ROWS,
        "every row acknowledged in the end"
    );
    wait_for(Duration::from_secs(120), "every row done", || {
        count_done(&done).is_ok_and(|n| n >= ROWS as i64)
    });
    for w in &mut workers {
        w.kill().unwrap();
        w.wait().unwrap();
    }
    assert_exactly_once(&done, 0, ROWS);
    assert_eq!(admin.counts().unwrap(), (0, 0, 0));
    println!("  worker logs: {} bytes", logs.total_bytes());
    drop_table(&done);
    admin.purge().unwrap();
}

// ------------------------------------------------------------ test helpers

fn payloads(from: u64, to: u64) -> Vec<NewRow> {
    (from..to)
        .map(|i| NewRow::new(i.to_le_bytes().to_vec()))
        .collect()
}

/// The table where workers record the payloads they finished.
fn done_table(queue: &str) -> String {
    format!(
        "done_{}",
        queue
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
    )
}

/// An installed, empty queue, and an empty done table without a key (so a
/// second effect for a value would show).
fn fresh_queue(queue: &str, done: &str) -> PgQueue {
    let mut admin = PgQueue::connect(&url(), QueueConfig::new(queue)).unwrap();
    admin.install().unwrap();
    admin.purge().unwrap();
    sql()
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {done}; CREATE TABLE {done} (value bigint NOT NULL)"
        ))
        .unwrap();
    admin
}

fn drop_table(table: &str) {
    sql()
        .batch_execute(&format!("DROP TABLE IF EXISTS {table}"))
        .unwrap();
}

fn count_done(done: &str) -> Result<i64, postgres::Error> {
    let mut c = common::pg_config().connect(postgres::NoTls)?;
    Ok(c.query_one(&format!("SELECT count(*) FROM {done}"), &[])?
        .get(0))
}

/// Every value in `from..to` is in `done` exactly once, and nothing else is.
fn assert_exactly_once(done: &str, from: u64, to: u64) {
    let r = sql()
        .query_one(
            &format!(
                "SELECT count(*), count(DISTINCT value),
                        count(*) FILTER (WHERE value < $1 OR value >= $2)
                 FROM {done}"
            ),
            &[&(from as i64), &(to as i64)],
        )
        .unwrap();
    let (count, distinct, outside): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
    let n = (to - from) as i64;
    assert_eq!(
        (count, distinct, outside),
        (n, n, 0),
        "done: rows, distinct, strays"
    );
}

fn worker_command(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.arg("--worker").args(args);
    c
}

/// `drain` worker: threads, claim size, lease (ms), max attempts (0: default).
fn drain_worker(queue: &str, args: &[&str]) -> Child {
    let url = url();
    let mut all = vec!["drain", url.as_str(), queue];
    all.extend_from_slice(args);
    all.push("0"); // exit once the queue has no ready or leased row
    worker_command(&all).spawn().expect("start a worker")
}

fn signal(child: &Child, sig: &str) {
    assert!(Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .status()
        .unwrap()
        .success());
}

fn wait_child(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("a worker ran past {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50)); // polling a process
    }
}

/// Where worker processes write their logs, to measure them.
struct LogDir(std::path::PathBuf);

impl LogDir {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("buffered-task-pg-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        LogDir(dir)
    }

    fn file(&self, name: &str) -> std::fs::File {
        std::fs::File::create(self.0.join(name)).unwrap()
    }

    fn print(&self) {
        for e in std::fs::read_dir(&self.0).unwrap() {
            let path = e.unwrap().path();
            println!("--- {}", path.display());
            println!("{}", std::fs::read_to_string(&path).unwrap_or_default());
        }
    }

    fn total_bytes(&self) -> u64 {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum()
    }
}

impl Drop for LogDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Control of the local server (`pg_ctlcluster`), held under a file lock
/// (`flock`) that every run of these tests takes before stopping the server (the
/// tests of one run already go one after another); dropping it
/// (a failed test included) starts the server again if it is down.
struct Server {
    cluster: (String, String),
    lock: Child,
    _stdin: ChildStdin,
}

impl Server {
    /// `None` (the test is skipped, with a note) when there is no local
    /// cluster to control.
    fn lock() -> Option<Server> {
        let cluster = match std::env::var("PG_CLUSTER") {
            Ok(v) => {
                let mut it = v.split_whitespace();
                (
                    it.next()?.to_string(),
                    it.next().unwrap_or("main").to_string(),
                )
            }
            Err(_) => {
                let version = std::fs::read_dir("/etc/postgresql")
                    .ok()?
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .max()?;
                (version, "main".to_string())
            }
        };
        if Command::new("pg_ctlcluster")
            .arg("--help")
            .output()
            .is_err()
        {
            println!("  skipped: no pg_ctlcluster to restart the server with");
            return None;
        }
        let mut lock = Command::new("flock")
            .args([
                "-w",
                "600",
                "/tmp/buffered-task-pg-server.lock",
                "-c",
                "echo locked; read _",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("flock");
        let mut line = String::new();
        BufReader::new(lock.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked", "could not take the server lock");
        let stdin = lock.stdin.take().unwrap();
        Some(Server {
            cluster,
            lock,
            _stdin: stdin,
        })
    }

    fn ctl(&self, args: &[&str]) {
        let out = Command::new("pg_ctlcluster")
            .arg("--skip-systemctl-redirect")
            .args([self.cluster.0.as_str(), self.cluster.1.as_str()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctlcluster {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn wait_ready(&self) {
        wait_for(Duration::from_secs(60), "the server", || {
            Command::new("pg_isready")
                .args(["-h", "127.0.0.1", "-q"])
                .status()
                .is_ok_and(|s| s.success())
        });
    }

    /// A fast restart: sessions are terminated, the server checkpoints.
    fn restart(&self) {
        self.ctl(&["restart", "-m", "fast"]);
        self.wait_ready();
    }

    /// A crash: an immediate stop (no checkpoint; recovery from the WAL at
    /// start), a second down, then a start.
    fn crash_and_start(&self) {
        self.ctl(&["stop", "-m", "immediate"]);
        std::thread::sleep(Duration::from_secs(1)); // the server stays down a while
        self.ctl(&["start"]);
        self.wait_ready();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let up = Command::new("pg_isready")
            .args(["-h", "127.0.0.1", "-q"])
            .status()
            .is_ok_and(|s| s.success());
        if !up {
            let _ = Command::new("pg_ctlcluster")
                .arg("--skip-systemctl-redirect")
                .args([self.cluster.0.as_str(), self.cluster.1.as_str(), "start"])
                .status();
            self.wait_ready();
        }
        // Closing its stdin ends the lock holder.
        let _ = self.lock.kill();
        let _ = self.lock.wait();
    }
}

// ------------------------------------------------------------- the workers

fn worker(args: &[String]) {
    // The crate's own warnings go to the worker's stderr (the restart test
    // measures them: rate-limited, they stay small).
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    match a.as_slice() {
        ["drain", url, queue, threads, claim, lease, max, forever] => drain(
            url,
            queue,
            threads.parse().unwrap(),
            claim.parse().unwrap(),
            Duration::from_millis(lease.parse().unwrap()),
            max.parse().unwrap(),
            *forever == "1",
        ),
        ["once", url, queue, lease] => {
            once(url, queue, Duration::from_millis(lease.parse().unwrap()))
        }
        ["engine", url, queue, lease] => {
            engine(url, queue, Duration::from_millis(lease.parse().unwrap()))
        }
        ["enqueue", url, queue, n] => enqueue(url, queue, n.parse().unwrap()),
        other => {
            eprintln!("unknown worker arguments {other:?}");
            std::process::exit(2);
        }
    }
}

fn config(queue: &str, lease: Duration, max: i32) -> QueueConfig {
    let c = QueueConfig::new(queue)
        .lease(lease)
        .backoff(Duration::from_millis(50), Duration::from_millis(500));
    if max > 0 {
        c.max_attempts(max)
    } else {
        c
    }
}

/// Claims chunks on each thread and, in the transaction that deletes them,
/// records their payloads in the done table. Aborts (a crash) on the poison
/// payload. Exits when the queue has no ready or leased row left (unless
/// `forever`); gives up after 5 minutes.
fn drain(
    url: &str,
    queue: &str,
    threads: usize,
    claim: i64,
    lease: Duration,
    max: i32,
    forever: bool,
) {
    let done = done_table(queue);
    let deadline = Instant::now() + Duration::from_secs(300);
    std::thread::scope(|s| {
        for _ in 0..threads {
            let done = done.clone();
            s.spawn(move || {
                let mut q = PgQueue::connect_lazily(url, config(queue, lease, max)).unwrap();
                let mut errors = 0u64;
                while Instant::now() < deadline {
                    let claimed = match q.claim(claim) {
                        Ok(c) => c,
                        Err(_) => {
                            errors += 1; // the queue paces its reconnections
                            continue;
                        }
                    };
                    if claimed.is_empty() {
                        if !forever && matches!(q.counts(), Ok((0, 0, _))) {
                            if errors > 0 {
                                eprintln!("{errors} errors while the server was away");
                            }
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20)); // rows in someone's lease
                        continue;
                    }
                    if claimed.iter().any(|c| decode_u64(&c.payload) == Ok(POISON)) {
                        std::process::abort();
                    }
                    let values: Vec<i64> = claimed
                        .iter()
                        .map(|c| decode_u64(&c.payload).unwrap() as i64)
                        .collect();
                    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
                    let result = q.ack_with(&leases(&claimed), |tx, owned| {
                        let mine: Vec<i64> = ids
                            .iter()
                            .zip(&values)
                            .filter(|(id, _)| owned.contains(id))
                            .map(|(_, v)| *v)
                            .collect();
                        tx.execute(
                            &format!("INSERT INTO {done} (value) SELECT unnest($1::bigint[])"),
                            &[&mine],
                        )
                        .map(drop)
                    });
                    if result.is_err() {
                        errors += 1;
                    }
                }
                eprintln!("gave up: the queue was not drained in time");
                std::process::exit(3);
            });
        }
    });
}

/// Claims one chunk, prints `claimed <n>`, runs until a line comes on stdin
/// (the test decides when the run ends, so it can stop the process first),
/// acknowledges, prints `acked <rows>` and exits.
fn once(url: &str, queue: &str, lease: Duration) {
    let done = done_table(queue);
    let mut q = PgQueue::connect(url, QueueConfig::new(queue).lease(lease)).expect("connect");
    let claimed = q.claim(50).expect("claim");
    println!("claimed {}", claimed.len());
    let mut go = String::new();
    std::io::stdin()
        .read_line(&mut go)
        .expect("the test's go-ahead"); // the run
    let values: Vec<i64> = claimed
        .iter()
        .map(|c| decode_u64(&c.payload).unwrap() as i64)
        .collect();
    let settled = q
        .ack_with(&leases(&claimed), |tx, owned| {
            let mine: Vec<i64> = claimed
                .iter()
                .zip(&values)
                .filter(|(c, _)| owned.contains(&c.id))
                .map(|(_, v)| *v)
                .collect();
            tx.execute(
                &format!("INSERT INTO {done} (value) SELECT unnest($1::bigint[])"),
                &[&mine],
            )
            .map(drop)
        })
        .expect("ack");
    println!("acked {}", settled.rows);
}

/// Records each row's payload in the done table (with how many times it ran),
/// on its own connection; an error retries the batch through the table.
struct Record {
    sql: Mutex<Option<postgres::Client>>,
    done: String,
}

impl RowHandler for Record {
    type Item = u64;
    fn decode(&self, payload: &[u8]) -> Result<u64, String> {
        decode_u64(payload)
    }
    fn run(&self, rows: &[(i64, u64)]) -> RowOutcome {
        let values: Vec<i64> = rows.iter().map(|(_, v)| *v as i64).collect();
        let mut sql = self.sql.lock().unwrap();
        if sql.as_ref().is_none_or(|c| c.is_closed()) {
            *sql = common::pg_config().connect(postgres::NoTls).ok();
        }
        let Some(c) = sql.as_mut() else {
            return RowOutcome::Retry("no connection".into());
        };
        let r = c.execute(
            &format!(
                "INSERT INTO {done} (value, runs) SELECT unnest($1::bigint[]), 1
                 ON CONFLICT (value) DO UPDATE SET runs = {done}.runs + 1",
                done = self.done
            ),
            &[&values],
        );
        match r {
            Ok(_) => RowOutcome::Done,
            Err(e) => {
                *sql = None;
                RowOutcome::Retry(e.to_string())
            }
        }
    }
}

/// An engine over the queue (per-worker connections, a heartbeat, a listener)
/// until its stdin closes.
fn engine(url: &str, queue: &str, lease: Duration) {
    let handler = Record {
        sql: Mutex::new(None),
        done: done_table(queue),
    };
    let task = PgTask::new(url, config(queue, lease, 0), handler, 2 * 2 * 100)
        .unwrap()
        .heartbeat(lease / 4)
        .unwrap();
    let handle = task
        .builder()
        .max_batch_size(100)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_millis(100))
        .start()
        .unwrap();
    let listener = PgListener::start(url, queue, handle.downgrade()).unwrap();
    let mut buf = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut buf); // until the parent closes it
    drop(listener);
    handle.shutdown_timeout(Duration::from_secs(30)).unwrap();
}

/// Enqueues rows 0..n one per call, each under request id `r<i>`; prints
/// `ok <i>` once a call returned Ok. A failed call is repeated (same id) until
/// it succeeds; gives up after 3 minutes.
fn enqueue(url: &str, queue: &str, n: u64) {
    let mut q = PgQueue::connect_lazily(url, QueueConfig::new(queue)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(170);
    let mut out = std::io::stdout().lock();
    let mut errors = 0u64;
    for i in 0..n {
        let row = [NewRow::new(i.to_le_bytes().to_vec())];
        loop {
            match q.enqueue_request(&format!("r{i}"), &row) {
                Ok(_) => break,
                Err(_) if Instant::now() < deadline => errors += 1, // paced by the queue
                Err(e) => {
                    eprintln!("gave up on row {i}: {e}");
                    std::process::exit(3);
                }
            }
        }
        writeln!(out, "ok {i}").unwrap();
        out.flush().unwrap();
    }
    eprintln!("{errors} failed enqueue calls, each repeated");
}

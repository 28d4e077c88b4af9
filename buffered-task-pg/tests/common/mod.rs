//! Helpers shared by the test binaries (each uses some of them).
#![allow(dead_code)]

use buffered_task_pg::{NewRow, PgQueue, QueueConfig};
use std::time::{Duration, Instant};

/// The server: `DATABASE_URL`, either a `key=value` string or a `postgres://`
/// URL.
pub fn url() -> String {
    std::env::var("DATABASE_URL").expect(
        "these tests need a PostgreSQL server: set DATABASE_URL, e.g. \
         DATABASE_URL=\"host=127.0.0.1 user=postgres dbname=test\"",
    )
}

/// `url()` parsed, whichever form it has.
pub fn pg_config() -> postgres::Config {
    url().parse().expect("DATABASE_URL parses")
}

/// A plain client, for checks the crate does not offer.
pub fn sql() -> postgres::Client {
    pg_config().connect(postgres::NoTls).expect("connect")
}

/// A queue name of its own for a test (distinct per process and test).
pub fn name(test: &str) -> String {
    format!("{test}-{}", std::process::id())
}

/// A queue of its own for each test, installed and emptied first.
pub fn queue(test: &str, config: impl Fn(QueueConfig) -> QueueConfig) -> PgQueue {
    let mut q = PgQueue::connect(&url(), config(QueueConfig::new(name(test)))).expect("connect");
    q.install().expect("install");
    q.purge().unwrap();
    q
}

/// `n` rows whose payloads are 0..n as little-endian u64s, without keys.
pub fn rows(n: usize) -> Vec<NewRow> {
    (0..n as u64)
        .map(|i| NewRow::new(i.to_le_bytes().to_vec()))
        .collect()
}

/// Waits until `f` holds, polling the database every 20 ms, for at most
/// `limit`; panics with `what` after that.
pub fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20)); // polling a database, not syncing threads
    }
}

/// Payloads here are little-endian u64s.
pub fn decode_u64(payload: &[u8]) -> Result<u64, String> {
    Ok(u64::from_le_bytes(
        payload.try_into().map_err(|_| "not 8 bytes".to_string())?,
    ))
}

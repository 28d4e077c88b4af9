//! A worker process for the multi-process tests:
//! `pg_worker <url> <queue> <threads> <lease-ms>`. Each thread claims chunks and,
//! in the transaction that deletes them, records `done(id)`; it exits when the
//! queue has no ready or leased rows left.
//!
//! `pg_worker <url> <queue> once <lease-ms>` claims one chunk, prints
//! `claimed <n>`, waits 300 ms (a run), acknowledges, prints `acked <rows>` and
//! exits: the tests stop it between the two with SIGSTOP.

use buffered_task_pg::{PgQueue, QueueConfig};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: pg_worker <url> <queue> <threads> <lease-ms>");
        std::process::exit(2);
    }
    let (url, queue) = (args[1].clone(), args[2].clone());
    let lease = Duration::from_millis(args[4].parse().expect("lease-ms"));
    let done_table = done_table(&queue);
    if args[3] == "once" {
        return once(&url, &queue, lease, &done_table);
    }
    let threads: usize = args[3].parse().expect("threads");
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (url, queue, done_table) = (url.clone(), queue.clone(), done_table.clone());
            s.spawn(move || {
                let config = QueueConfig::new(queue).lease(lease);
                let mut q = PgQueue::connect(&url, config).expect("connect");
                loop {
                    let claimed = match q.claim(50) {
                        Ok(c) => c,
                        Err(e) => {
                            eprintln!("claim: {e}");
                            continue;
                        }
                    };
                    if claimed.is_empty() {
                        let (ready, leased, _) = q.counts().expect("counts");
                        if ready + leased == 0 {
                            return;
                        }
                        std::thread::sleep(Duration::from_millis(20)); // rows in someone's lease
                        continue;
                    }
                    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
                    let result = q.ack_with(&ids, |tx, owned| {
                        tx.execute(
                            &format!("INSERT INTO {done_table} (id) SELECT unnest($1::bigint[])"),
                            &[&owned],
                        )
                        .map(drop)
                    });
                    if let Err(e) = result {
                        eprintln!("ack: {e}");
                    }
                }
            });
        }
    });
}

fn once(url: &str, queue: &str, lease: Duration, done_table: &str) {
    let mut q = PgQueue::connect(url, QueueConfig::new(queue).lease(lease)).expect("connect");
    let claimed = q.claim(50).expect("claim");
    println!("claimed {}", claimed.len());
    std::thread::sleep(Duration::from_millis(300)); // the run
    let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
    let settled = q
        .ack_with(&ids, |tx, owned| {
            tx.execute(
                &format!("INSERT INTO {done_table} (id) SELECT unnest($1::bigint[])"),
                &[&owned],
            )
            .map(drop)
        })
        .expect("ack");
    println!("acked {}", settled.rows);
}

/// The table where workers record finished row ids.
fn done_table(queue: &str) -> String {
    format!(
        "done_{}",
        queue
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
    )
}

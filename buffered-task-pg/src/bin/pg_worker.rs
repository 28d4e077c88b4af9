//! A worker process for the multi-process tests and the cluster example:
//! `pg_worker <url> <queue> <threads> <lease-ms>`. Each thread claims chunks and,
//! in the transaction that deletes them, records `done(id)`; it exits when the
//! queue has no ready or leased rows left.

use buffered_task_pg::{PgQueue, QueueConfig};
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: pg_worker <url> <queue> <threads> <lease-ms>");
        std::process::exit(2);
    }
    let (url, queue) = (args[1].clone(), args[2].clone());
    let threads: usize = args[3].parse().expect("threads");
    let lease = Duration::from_millis(args[4].parse().expect("lease-ms"));
    let done_table = done_table(&queue);
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

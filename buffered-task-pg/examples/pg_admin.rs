//! Operations on a queue from the command line: metrics, and dead rows.
//!
//! ```text
//! cargo run -p buffered-task-pg --example pg_admin -- <queue> stats
//! cargo run -p buffered-task-pg --example pg_admin -- <queue> dead [after-id] [limit]
//! cargo run -p buffered-task-pg --example pg_admin -- <queue> requeue <id>... | all
//! cargo run -p buffered-task-pg --example pg_admin -- <queue> discard <id>... | all
//! cargo run -p buffered-task-pg --example pg_admin -- <queue> vacuum
//! ```
//!
//! Uses DATABASE_URL (default `host=127.0.0.1 user=postgres dbname=test`).

use buffered_task_pg::{PgQueue, QueueConfig, Select};
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let usage = "usage: pg_admin <queue> stats | dead [after-id] [limit] | \
                 requeue <id>...|all | discard <id>...|all | vacuum";
    let (queue, command) = match args {
        [q, c, ..] => (q, c.as_str()),
        _ => return Err(usage.into()),
    };
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "host=127.0.0.1 user=postgres dbname=test".into());
    let mut q = PgQueue::connect(&url, QueueConfig::new(queue.as_str()))?;
    let rest = &args[2..];
    let ids: Vec<i64> = if rest.first().map(String::as_str) == Some("all") {
        Vec::new()
    } else {
        rest.iter()
            .map(|s| s.parse().map_err(|_| format!("not a row id: {s}")))
            .collect::<Result<_, _>>()?
    };
    let which = if rest.first().map(String::as_str) == Some("all") {
        Select::All
    } else {
        Select::Ids(&ids)
    };
    match command {
        "stats" => {
            let s = q.stats()?;
            println!("ready      {}", s.ready);
            println!("scheduled  {}", s.scheduled);
            println!("leased     {} ({} expired)", s.leased, s.expired);
            println!("dead       {}", s.dead);
            match s.oldest_ready_age {
                Some(age) => println!("oldest ready {:.1}s", age.as_secs_f64()),
                None => println!("oldest ready -"),
            }
            println!("lost leases {}", s.lost_leases);
            println!("attempts   {:?}", s.attempts);
            let h = &s.health;
            println!(
                "table      {} live, {} dead tuples; autovacuum {}",
                h.live_tuples,
                h.dead_tuples,
                if h.autovacuum { "on" } else { "off" }
            );
            for w in &h.warnings {
                println!("warning: {w}");
            }
        }
        "dead" => {
            let after = rest.first().map_or(Ok(0), |s| s.parse())?;
            let limit = rest.get(1).map_or(Ok(50), |s| s.parse())?;
            for r in q.dead_rows(after, limit)? {
                println!(
                    "{}\tattempts {}/{}\tkey {}\t{} bytes\t{}",
                    r.id,
                    r.attempts,
                    r.max_attempts,
                    r.dedup_key.as_deref().unwrap_or("-"),
                    r.payload.len(),
                    r.last_error.as_deref().unwrap_or("")
                );
            }
        }
        "requeue" if !rest.is_empty() => {
            let r = q.requeue_dead(which)?;
            println!("requeued {}", r.requeued);
            if !r.key_taken.is_empty() {
                println!("left dead (their key is live): {:?}", r.key_taken);
            }
        }
        "discard" if !rest.is_empty() => {
            println!("discarded {}", q.discard_dead(which)?);
        }
        "vacuum" => {
            q.vacuum()?;
            println!("vacuumed");
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}

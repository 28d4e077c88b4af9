//! The original module's second example, in Rust: a scheduler whose entries are
//! jobs due at a given time. `run` executes the due ones, retries failures up to
//! `max_retries`, and hands the not-yet-due ones back with `RetryEntries`.
//!
//! `cargo run --example task_scheduler`

use buffered_task::{Builder, Outcome, Priority, Task};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Shared, so a job can be handed back for a retry by cloning it.
type JobFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Job {
    at: Instant,
    name: &'static str,
    run: JobFn,
    retries: u32,
}

struct Scheduler {
    finished: mpsc::SyncSender<&'static str>,
}

struct Limits {
    max_retries: u32,
}

impl Task for Scheduler {
    type Entry = Job;
    type State = Limits;

    fn run(&self, jobs: &[Job], limits: &Limits) -> Outcome<Job, Limits> {
        // `run` sees the batch by reference; a job that must run again is cloned
        // (cheap: the closure is shared) and handed back with `RetryEntries`.
        let now = Instant::now();
        let mut again = Vec::new();
        for job in jobs {
            if job.at > now {
                again.push(job.clone());
                continue;
            }
            match (job.run)() {
                Ok(()) => {
                    let _ = self.finished.send(job.name);
                }
                Err(err) if job.retries < limits.max_retries => {
                    println!("{}: failed ({err}), retry {}", job.name, job.retries + 1);
                    again.push(Job {
                        retries: job.retries + 1,
                        ..job.clone()
                    });
                }
                Err(err) => {
                    println!("{}: failed ({err}), giving up", job.name);
                    let _ = self.finished.send(job.name);
                }
            }
        }
        if again.is_empty() {
            Outcome::Ok
        } else {
            // Nothing here is due yet: wait a little instead of spinning.
            if again.len() == jobs.len() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Outcome::RetryEntries(again)
        }
    }
}

fn hello() -> Result<(), String> {
    println!("Hello from the future!");
    Ok(())
}

fn flaky() -> Result<(), String> {
    Err("the remote end is down".to_string())
}

fn report() -> Result<(), String> {
    println!("Report sent.");
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (finished, done) = mpsc::sync_channel(16);
    let handle = Builder::new(Scheduler { finished }, Limits { max_retries: 3 })
        .name("task-scheduler")
        .poll(false)
        .flush_interval(Duration::from_millis(100))
        .max_batch_size(10)
        .max_concurrency(5)
        .start()?;

    let start = Instant::now();
    let schedule = |after_ms: u64, name: &'static str, f: fn() -> Result<(), String>| {
        let job = Job {
            at: start + Duration::from_millis(after_ms),
            name,
            run: Arc::new(f),
            retries: 0,
        };
        handle
            .buffer(vec![job], Priority::Back)
            .map_err(|e| e.to_string())
    };
    schedule(300, "hello", hello)?;
    schedule(100, "flaky", flaky)?;
    schedule(500, "report", report)?;

    for _ in 0..3 {
        let name = done.recv_timeout(Duration::from_secs(10))?;
        println!("finished: {name} after {:?}", start.elapsed());
    }
    handle.shutdown_drain()?;
    Ok(())
}

//! The original module's second example, in Rust: a scheduler of jobs due at given
//! times. A timer thread holds the jobs that are not due yet and buffers each one
//! when its time comes (it waits on a channel with a deadline, so a new job that is
//! due sooner is seen at once; `run` never waits for anything). The engine runs the
//! due jobs; a job that fails is retried by the [`RetryPolicy`] with a growing
//! backoff, and after its last attempt goes to the dead-letter handler.
//!
//! `cargo run --example task_scheduler`

use buffered_task::{Builder, DeadLetterReason, Handle, Outcome, Priority, RetryPolicy, Task};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A job's work: `Err` asks for another attempt.
type JobFn = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A job, compared by id (the retry policy matches retried entries by equality).
#[derive(Clone)]
struct Job {
    id: u64,
    name: &'static str,
    work: JobFn,
}

impl PartialEq for Job {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

/// How each job ended, for `main` to wait on.
enum Ended {
    Done(&'static str),
    GaveUp(&'static str, DeadLetterReason),
}

struct Scheduler {
    ended: Sender<Ended>,
}

impl Task for Scheduler {
    type Entry = Job;
    type State = ();

    fn run(&self, jobs: &[Job], _: &()) -> Outcome<Job, ()> {
        // One job per batch (`max_batch_size(1)`), so an error is that job's.
        let job = &jobs[0];
        match (job.work)() {
            Ok(()) => {
                let _ = self.ended.send(Ended::Done(job.name));
                Outcome::Ok
            }
            Err(error) => {
                println!(
                    "{}: failed ({error}); the retry policy will try again",
                    job.name
                );
                Outcome::fail(error)
            }
        }
    }
}

/// Holds the jobs that are not due and buffers each when its time comes. Ends
/// when `incoming` is closed and every job has been handed over.
fn timer(incoming: Receiver<(Instant, Job)>, engine: Handle<Job>) {
    let mut waiting: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut jobs = HashMap::new();
    let mut open = true;
    loop {
        let next = waiting.peek().map(|Reverse((at, _))| *at);
        let received = match (next, open) {
            (None, false) => return,
            (None, true) => incoming.recv().map_err(|_| RecvTimeoutError::Disconnected),
            (Some(at), true) => incoming.recv_deadline(at),
            (Some(at), false) => {
                // No job can come any more: just wait for the next due time.
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                Err(RecvTimeoutError::Timeout)
            }
        };
        match received {
            Ok((at, job)) => {
                waiting.push(Reverse((at, job.id)));
                jobs.insert(job.id, job);
            }
            Err(RecvTimeoutError::Disconnected) => open = false,
            Err(RecvTimeoutError::Timeout) => {}
        }
        // Everything due now goes to the engine, at the front of its queue.
        let now = Instant::now();
        while let Some(Reverse((at, id))) = waiting.peek().copied() {
            if at > now {
                break;
            }
            waiting.pop();
            let job = jobs.remove(&id).expect("every waiting id has its job");
            if engine.buffer_one(job, Priority::Front).is_err() {
                return; // the engine stopped
            }
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (ended_tx, ended) = crossbeam_channel::unbounded();
    let gave_up = ended_tx.clone();
    let handle = Builder::new(Scheduler { ended: ended_tx }, ())
        .name("task-scheduler")
        .poll(false)
        .flush_interval(Duration::from_millis(10))
        .max_batch_size(1)
        .max_concurrency(4)
        // At most 4 attempts per job, 50 ms before the second, doubling.
        .retry_policy(
            RetryPolicy::new(4).backoff(Duration::from_millis(50), Duration::from_secs(1)),
        )
        .dead_letter_handler(move |jobs: Vec<Job>, reason| {
            for job in jobs {
                let _ = gave_up.send(Ended::GaveUp(job.name, reason.clone()));
            }
        })
        .start()?;

    let (schedule, incoming) = crossbeam_channel::unbounded();
    let timer_thread = std::thread::spawn({
        let engine = handle.clone();
        move || timer(incoming, engine)
    });

    // A job that works on its third try.
    let tries = Arc::new(AtomicU32::new(0));
    let warming_up: JobFn = Arc::new(move || match tries.fetch_add(1, Ordering::Relaxed) {
        0 | 1 => Err("the cache is still warming up".to_string()),
        _ => {
            println!("warm-up: cache ready");
            Ok(())
        }
    });
    let start = Instant::now();
    let jobs: [(u64, &'static str, JobFn); 4] = [
        (
            300,
            "hello",
            Arc::new(|| {
                println!("hello: Hello from the future!");
                Ok(())
            }),
        ),
        (
            100,
            "flaky",
            Arc::new(|| Err("the remote end is down".to_string())),
        ),
        (50, "warm-up", warming_up),
        (
            500,
            "report",
            Arc::new(|| {
                println!("report: sent");
                Ok(())
            }),
        ),
    ];
    for (id, (after_ms, name, work)) in (0u64..).zip(jobs) {
        schedule.send((
            start + Duration::from_millis(after_ms),
            Job { id, name, work },
        ))?;
    }
    drop(schedule); // no more jobs: the timer ends once it has handed all over

    for _ in 0..4 {
        match ended.recv_timeout(Duration::from_secs(10))? {
            Ended::Done(name) => println!("finished: {name} at {:?}", start.elapsed()),
            Ended::GaveUp(name, reason) => {
                println!("gave up: {name} at {:?} ({reason})", start.elapsed())
            }
        }
    }
    timer_thread
        .join()
        .map_err(|_| "the timer thread panicked")?;
    let report = handle.shutdown_drain()?;
    let stats = handle.stats();
    println!(
        "processed {}, retried {}, dead-lettered {}, unprocessed {}",
        stats.processed,
        stats.retried,
        stats.dead_lettered,
        report.unprocessed.len()
    );
    assert_eq!((stats.processed, stats.dead_lettered), (3, 1));
    Ok(())
}

//! A view into every batch (`on_batch`), failures that carry an error, and the
//! worker lifecycle hooks.

mod common;
use buffered_task::{
    worker_index, BatchKind, BatchRecord, Builder, DeadLetterReason, FlushInterval, ManualClock,
    Outcome, RetryPolicy, RunError,
};
use common::*;
use crossbeam_channel::unbounded;
use parking_lot::Mutex;
use std::sync::Arc;
use std::time::Duration;

#[test]
fn every_batch_is_recorded_with_its_wait_run_time_and_outcome() {
    quiet_panics();
    let clock = ManualClock::new();
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        match b[0] {
            1 => {
                held.wait();
                Outcome::Ok
            }
            2 => Outcome::RetryEntries(vec![2]),
            3 => Outcome::fail(std::io::Error::other("disk on fire")),
            4 => panic!("deliberate: observed"),
            _ => Outcome::Ok,
        }
    });
    let (tx, records) = unbounded::<BatchRecord>();
    let handle = Builder::new(task, ())
        .name("observed")
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .retry_policy(RetryPolicy::new(1))
        .on_batch(move |r| tx.send(r.clone()).unwrap())
        .start()
        .unwrap();
    handle.push_back(vec![1]).unwrap();
    recv(&started); // [1] runs from t = 0, held
    handle.push_back(vec![2, 3, 4]).unwrap(); // queued at t = 0
    clock.advance(Duration::from_secs(5));
    gate.open();
    let r = recv(&records);
    assert_eq!((r.engine.as_str(), r.worker, r.size), ("observed", 0, 1));
    assert_eq!(
        (r.kind, r.processed, r.attempt),
        (BatchKind::Ok, 1, Some(1))
    );
    assert_eq!(r.run_time, Duration::from_secs(5));
    let r = recv(&records);
    assert_eq!(r.waited, Duration::from_secs(5)); // [2] queued at 0, started at 5
    assert_eq!(
        (r.kind, r.retried, r.dead_lettered),
        (BatchKind::Retry, 0, 1)
    );
    let r = recv(&records);
    assert_eq!(
        (r.kind, r.error.as_deref()),
        (BatchKind::Error, Some("disk on fire"))
    );
    let r = recv(&records);
    assert_eq!(
        (r.kind, r.error.as_deref()),
        (BatchKind::Panic, Some("deliberate: observed"))
    );
    handle.shutdown_drain().unwrap();
}

#[test]
fn a_failure_carries_its_error_to_the_dead_letter_handler() {
    #[derive(Debug)]
    struct Timeout(u32);
    impl std::fmt::Display for Timeout {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "timed out after {} ms", self.0)
        }
    }
    impl std::error::Error for Timeout {}
    fn fetch(batch: &[u32]) -> Result<(), Timeout> {
        match batch.iter().find(|e| **e > 10) {
            Some(_) => Err(Timeout(250)),
            None => Ok(()),
        }
    }
    let (tx, dead) = unbounded();
    let mut task = Script::new(|b: &[u32], _: &()| fetch(b).into());
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(2).backoff(Duration::ZERO, Duration::ZERO))
        .dead_letter_handler(move |v, reason| {
            b.dead_lettered(&v);
            tx.send((v, reason)).unwrap()
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2, 11, 12]).unwrap();
    let (entries, reason) = recv(&dead);
    assert_eq!(entries, vec![11, 12]);
    let DeadLetterReason::Failed(error) = reason else {
        panic!("{reason:?}")
    };
    assert_eq!(error.to_string(), "timed out after 250 ms");
    assert!(error.get().downcast_ref::<Timeout>().is_some());
    assert_eq!(error, RunError::new("timed out after 250 ms")); // compared by text
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().processed, 2);
}

#[test]
fn a_panicking_observer_is_contained() {
    quiet_panics();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok);
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .on_batch(|_| panic!("deliberate: observer"))
        .start()
        .unwrap();
    for i in 0..5 {
        books.push_back(&handle, vec![i]).unwrap();
    }
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().processed, 5);
}

#[test]
fn worker_hooks_run_once_per_worker_on_its_own_thread() {
    let events: Arc<Mutex<Vec<String>>> = Default::default();
    let (e1, e2, e3) = (events.clone(), events.clone(), events.clone());
    let mut task = Script::new(move |_: &[u32], _: &()| {
        let w = worker_index().expect("a worker");
        let name = std::thread::current().name().unwrap_or("").to_string();
        e1.lock().push(format!("run {w} on {name}"));
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .worker_name(|w| format!("fetcher-{w}"))
        .worker_stack_size(256 * 1024)
        .on_worker_start(move |w| e2.lock().push(format!("start {w} {:?}", worker_index())))
        .on_worker_stop(move |w| e3.lock().push(format!("stop {w}")))
        .start()
        .unwrap();
    books.push_back(&handle, (0..30).collect()).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(worker_index(), None);
    let events = events.lock().clone();
    for w in 0..3 {
        let at = |prefix: &str| events.iter().position(|e| e.starts_with(prefix));
        let start = at(&format!("start {w} Some({w})")).expect("started");
        let stop = at(&format!("stop {w}")).expect("stopped");
        assert!(start < stop);
        let runs = events
            .iter()
            .enumerate()
            .filter(|(_, e)| e.starts_with(&format!("run {w} ")));
        for (i, run) in runs {
            assert!(start < i && i < stop, "{events:?}");
            assert!(run.ends_with(&format!("on fetcher-{w}")), "{run}");
        }
    }
    assert_eq!(events.iter().filter(|e| e.starts_with("run")).count(), 30);
}

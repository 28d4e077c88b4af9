//! The stats snapshot and the shutdown with a deadline.

mod common;
use buffered_task::{Builder, FlushInterval, ManualClock, Outcome, Priority, Stats};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn stats_count_what_happened() {
    quiet_panics();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        match c.fetch_add(1, Ordering::SeqCst) {
            0 => panic!("deliberate: stats"),       // [1,2] again
            1 => Outcome::RetryEntries(vec![b[0]]), // one entry again
            _ => Outcome::Ok,
        }
    });
    let books = task.books();
    let (of_tx, overflow) = unbounded();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .max_queue_len(4)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler({
            let b = books.clone();
            move |e, r| {
                b.overflowed(&e);
                of_tx.send((e, r)).unwrap()
            }
        })
        .start()
        .unwrap();
    let mut fresh = Stats::default();
    fresh.concurrency_limit = 1;
    fresh.init_runs = handle.stats().init_runs; // the first init may have run
    assert_eq!(handle.stats(), fresh);
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap();
    assert_eq!(handle.stats().buffered, 2);
    handle.flush().unwrap();
    wait_until(|| handle.stats().processed == 2); // 2 let go by the retry, then [1]
    books
        .push_back(&handle, vec![10, 11, 12, 13, 14, 15])
        .unwrap(); // 2 overflow
    recv(&overflow);
    let report = books.finish(handle.shutdown_drain().unwrap());
    assert!(report.unprocessed.is_empty());
    let stats = handle.stats();
    assert_eq!(stats.panicked, 1);
    assert_eq!(stats.retried, 2 + 1);
    assert_eq!(stats.processed, 2 + 4);
    assert_eq!(stats.overflowed_full, 2);
    assert_eq!((stats.buffered, stats.queued, stats.running), (0, 0, 0));
}

#[test]
fn shutdown_timeout_with_time_to_spare_drains_everything() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.len()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books
        .buffer(&handle, (0..1000).collect(), Priority::Back)
        .unwrap();
    let report = books.finish(handle.shutdown_timeout(Duration::from_secs(3600)).unwrap());
    assert!(report.unprocessed.is_empty());
    assert_eq!(report.drained, 1000);
    assert_eq!(rx.try_iter().sum::<usize>(), 1000);
}

#[test]
fn shutdown_timeout_past_its_deadline_hands_back_the_rest_at_once() {
    let (
        task,
        Held {
            gate,
            started,
            ran,
            books,
        },
    ) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![0, 1]).unwrap();
    recv(&started);
    books.push_back(&handle, (2..10).collect()).unwrap();
    // Returns while [0, 1] is still held: the deadline has passed at once.
    let report = handle.shutdown_timeout(Duration::ZERO).unwrap();
    assert_eq!(report.unprocessed, (2..10).collect::<Vec<u32>>());
    assert_eq!((report.drained, report.still_running), (0, 2));
    books.handed_back(&report.unprocessed);
    gate.open();
    assert_eq!(recv(&ran), vec![0, 1]);
    wait_until(|| handle.stats().processed == 2); // counted when it returns
    books.check();
}

#[test]
fn stats_after_a_shutdown_are_final() {
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![1]).unwrap();
    recv(&held.started);
    held.books.push_back(&handle, vec![2, 3]).unwrap();
    held.books.buffer(&handle, vec![4], Priority::Back).unwrap();
    assert!(handle.stats().oldest_wait.is_some());
    let stopper = {
        let (handle, books) = (handle.clone(), held.books.clone());
        std::thread::spawn(move || books.finish(handle.shutdown_return().unwrap()))
    };
    wait_until(|| handle.is_stopped());
    held.gate.open();
    assert_eq!(stopper.join().unwrap().unprocessed, vec![2, 3, 4]);
    let stats = handle.stats();
    assert_eq!((stats.buffered, stats.queued, stats.running), (0, 0, 0));
    assert_eq!(stats.oldest_wait, None);
    assert_eq!(stats.processed, 1);
    assert_eq!(handle.stats(), stats, "and they stay so");
}

#[test]
fn a_run_past_its_deadline_is_reported_once_and_counted() {
    let clock = ManualClock::new();
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |_: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(5)
        .max_concurrency(2)
        .run_deadline(Duration::from_millis(2))
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2, 3]).unwrap();
    recv(&started);
    clock.advance(Duration::from_millis(2));
    assert_eq!(handle.stats().stuck_runs, 1);
    // Still stuck, still counted once, and the other slot keeps working.
    clock.advance(Duration::from_secs(1));
    let count = handle.debug_count().unwrap();
    assert_eq!(count.running, 1);
    assert_eq!(handle.stats().stuck_runs, 1);
    gate.open();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().stuck_runs, 1);
    assert_eq!(handle.stats().processed, 3);
}

#[test]
fn a_zero_run_deadline_is_rejected() {
    let err = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .run_deadline(Duration::ZERO)
        .start()
        .unwrap_err();
    assert!(
        matches!(err, buffered_task::BuildError::ZeroRunDeadline),
        "{err}"
    );
}

#[test]
fn oldest_wait_follows_the_entries_that_wait() {
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |_: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    assert_eq!(handle.stats().oldest_wait, None);
    books.buffer(&handle, vec![1], Priority::Back).unwrap();
    let first = handle.stats().oldest_wait.expect("a buffered entry waits");
    assert!(handle.stats().oldest_wait.unwrap() >= first);
    handle.flush().unwrap();
    recv(&started); // 1 runs; nothing waits
    assert_eq!(handle.stats().oldest_wait, None);
    books.push_back(&handle, vec![2, 3]).unwrap();
    // 2 and 3 wait in the queue behind the held run.
    assert!(handle.stats().oldest_wait.is_some());
    gate.open();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().oldest_wait, None);
}

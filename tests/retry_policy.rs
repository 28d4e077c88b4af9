//! The opt-in retry policy: attempt counts, backoff that blocks nobody, and the
//! dead-letter handler.

mod common;
use buffered_task::{Builder, DeadLetterReason, FlushInterval, Outcome, Priority, RetryPolicy};
use common::*;
use crossbeam_channel::unbounded;
use std::time::Duration;

fn no_wait(max: u32) -> RetryPolicy {
    RetryPolicy::new(max).backoff(Duration::ZERO, Duration::ZERO)
}

#[test]
fn an_entry_runs_at_most_max_attempts_then_is_dead_lettered() {
    let (ran_tx, ran) = unbounded();
    let (dead_tx, dead) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Retry
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(no_wait(3))
        .dead_letter_handler({
            let b = books.clone();
            move |e, reason| {
                b.dead_lettered(&e);
                dead_tx.send((e, reason)).unwrap()
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2]).unwrap();
    assert_eq!(recv(&dead), (vec![1, 2], DeadLetterReason::RetryRequested));
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(ran.try_iter().count(), 3);
    let stats = handle.stats();
    assert_eq!((stats.dead_lettered, stats.retried), (2, 4));
}

#[test]
fn the_reason_carries_the_last_panic_message() {
    quiet_panics();
    let (dead_tx, dead) = unbounded();
    let mut task = Script::new(|b: &[u32], _: &()| panic!("deliberate: entry {}", b[0]));
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(no_wait(2))
        .dead_letter_handler({
            let b = books.clone();
            move |e, reason| {
                b.dead_lettered(&e);
                dead_tx.send((e, reason)).unwrap()
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![7]).unwrap();
    let (entries, reason) = recv(&dead);
    assert_eq!(entries, vec![7]);
    assert_eq!(
        reason,
        DeadLetterReason::Panicked("deliberate: entry 7".to_string())
    );
    assert_eq!(reason.to_string(), "panicked: deliberate: entry 7");
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().panicked, 2);
}

#[test]
fn handed_back_entries_keep_their_count_and_new_ones_start_at_zero() {
    let (ran_tx, ran) = unbounded();
    let (dead_tx, dead) = unbounded();
    // 1 always fails; on its first run it also spawns 100, which fails twice then
    // succeeds (a fresh entry gets the full budget of 3 runs).
    let first = std::sync::atomic::AtomicBool::new(true);
    let mut task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        let mut again = Vec::new();
        for &e in b {
            match e {
                1 => again.push(1),
                100 | 101 => again.push(e + 1),
                _ => {}
            }
        }
        if b == [1] && first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            again.push(100);
        }
        Outcome::RetryEntries(again)
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(no_wait(3))
        .dead_letter_handler({
            let b = books.clone();
            move |e, reason| {
                b.dead_lettered(&e);
                dead_tx.send((e, reason)).unwrap()
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    assert_eq!(recv(&dead), (vec![1], DeadLetterReason::RetryRequested));
    books.finish(handle.shutdown_drain().unwrap());
    let runs: Vec<Vec<u32>> = ran.try_iter().collect();
    assert_eq!(runs.iter().filter(|b| **b == [1]).count(), 3);
    // 100 was new (not in [1]), so it ran as a fresh entry; 101 and 102 were new too.
    assert!(runs.contains(&vec![100]) && runs.contains(&vec![101]) && runs.contains(&vec![102]));
    assert_empty(&dead);
}

#[test]
fn a_backoff_blocks_no_worker_and_a_shutdown_hands_the_waiting_entries_back() {
    let (ran_tx, ran) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        if b == [1] {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(
            RetryPolicy::new(5).backoff(Duration::from_secs(3600), Duration::from_secs(3600)),
        )
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    assert_eq!(recv(&ran), vec![1]);
    // 1 now waits an hour; the only worker is free for other work.
    books.buffer(&handle, vec![2], Priority::Back).unwrap();
    handle.flush().unwrap();
    assert_eq!(recv(&ran), vec![2]);
    // 2's run has returned; 1 waits in the backoff timer.
    wait_until(|| {
        let c = handle.debug_count().unwrap();
        (c.running, c.waiting) == (0, 1)
    });
    let report = books.finish(handle.shutdown_return().unwrap());
    assert_eq!(report.unprocessed, vec![1]);
}

#[test]
fn after_its_backoff_an_entry_runs_again() {
    let (ran_tx, ran) = unbounded();
    let calls = std::sync::atomic::AtomicU32::new(0);
    let mut task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(
            RetryPolicy::new(3).backoff(Duration::from_millis(2), Duration::from_millis(2)),
        )
        .start()
        .unwrap();
    books.push_back(&handle, vec![5]).unwrap();
    assert_eq!(recv_n(&ran, 2), vec![vec![5], vec![5]]);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().processed, 1);
    assert_eq!(handle.stats().retried, 1);
}

#[test]
fn a_panicking_dead_letter_handler_is_contained() {
    quiet_panics();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Retry);
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(no_wait(1))
        .dead_letter_handler(move |e, _| {
            b.dead_lettered(&e); // recorded, then the handler fails
            panic!("deliberate: dead-letter handler")
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    wait_until(|| handle.stats().dead_lettered == 1);
    // The engine lives on.
    books.push_back(&handle, vec![2]).unwrap();
    wait_until(|| handle.stats().dead_lettered == 2);
    books.finish(handle.shutdown_drain().unwrap());
}

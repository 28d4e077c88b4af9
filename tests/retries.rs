//! Outcomes: state replacement, retries of all or some entries, panics (SPEC §3).

mod common;
use buffered_task::{Builder, FlushInterval, Outcome, Priority};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

fn builder<T: Send + 'static, S: Send + Sync + 'static>(
    task: Script<T, S>,
    state: S,
) -> Builder<Script<T, S>> {
    Builder::new(task, state)
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
}

#[test]
fn a_new_state_is_seen_by_batches_dispatched_afterwards() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], state: &u32| {
        tx.send((b.to_vec(), *state)).unwrap();
        Outcome::OkWithState(state + 1)
    });
    let books = task.books();
    let handle = builder(task, 0).start().unwrap();
    books.push_back(&handle, vec![1, 2, 3, 4, 5]).unwrap();
    let seen = recv_n(&rx, 3);
    assert_eq!(seen, vec![(vec![1, 2], 0), (vec![3, 4], 1), (vec![5], 2)]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn retry_of_a_subset_runs_only_those_entries_again_at_the_back() {
    let (tx, rx) = unbounded();
    let first = Arc::new(AtomicU32::new(0));
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        if b == [1, 2] && first.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::RetryEntries(vec![2])
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = builder(task, ()).start().unwrap();
    books.push_back(&handle, vec![1, 2, 3, 4]).unwrap();
    // [1,2] is done but 2; 2 goes behind [3,4].
    assert_eq!(recv_n(&rx, 3), vec![vec![1, 2], vec![3, 4], vec![2]]);
    handle.flush().unwrap();
    assert_eq!(handle.debug_count().unwrap().waiting, 0);
    books.finish(handle.shutdown_drain().unwrap());
    assert_empty(&rx);
}

#[test]
fn retry_with_new_entries_and_a_new_state() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], state: &&'static str| {
        tx.send((b.to_vec(), *state)).unwrap();
        if *state == "first" {
            Outcome::RetryEntriesWithState(vec![b[0] * 10], "second")
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = builder(task, "first").start().unwrap();
    books.push_back(&handle, vec![7]).unwrap();
    assert_eq!(
        recv_n(&rx, 2),
        vec![(vec![7], "first"), (vec![70], "second")]
    );
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn retry_all_then_ok() {
    let (tx, rx) = unbounded();
    let calls = Arc::new(AtomicU32::new(0));
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        if calls.fetch_add(1, Ordering::SeqCst) < 2 {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = builder(task, ()).start().unwrap();
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap();
    handle.flush().unwrap();
    assert_eq!(recv_n(&rx, 3), vec![vec![1, 2]; 3]);
    books.finish(handle.shutdown_drain().unwrap());
    assert_empty(&rx);
}

#[test]
fn a_panic_is_retried_and_the_worker_lives_on() {
    quiet_panics();
    let (tx, rx) = unbounded();
    let calls = Arc::new(AtomicU32::new(0));
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send((b.to_vec(), std::thread::current().id())).unwrap();
        match calls.fetch_add(1, Ordering::SeqCst) {
            0 => panic!("deliberate: string payload"),
            1 => std::panic::panic_any(17_u64), // not a string
            _ => Outcome::Ok,
        }
    });
    let books = task.books();
    let handle = builder(task, ()).start().unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    let runs = recv_n(&rx, 3);
    assert!(runs.iter().all(|(b, _)| *b == vec![1]));
    // The one worker thread ran all three: it survived both panics.
    assert!(runs.iter().all(|(_, id)| *id == runs[0].1));
    books.push_back(&handle, vec![2]).unwrap();
    assert_eq!(recv(&rx).0, vec![2]);
    books.finish(handle.shutdown_drain().unwrap());
}

//! Dispatch: never more than `max_concurrency` batches, every free slot filled at
//! once (SPEC §5).

mod common;
use buffered_task::{Builder, FlushInterval, Outcome, Priority};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[test]
fn concurrency_never_exceeds_the_maximum() {
    let running = Arc::new(AtomicUsize::new(0));
    let high = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let (r, h, d) = (running.clone(), high.clone(), done.clone());
    let mut task = Script::new(move |b: &[u32], _: &()| {
        let now = r.fetch_add(1, Ordering::SeqCst) + 1;
        h.fetch_max(now, Ordering::SeqCst);
        for _ in 0..100 {
            std::thread::yield_now();
        }
        r.fetch_sub(1, Ordering::SeqCst);
        d.fetch_add(b.len(), Ordering::SeqCst);
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(3)
        .max_concurrency(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (handle, books) = (handle.clone(), books.clone());
            s.spawn(move || {
                for i in 0..500 {
                    books.push_back(&handle, vec![t, i, i + 1]).unwrap();
                }
            });
        }
    });
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(done.load(Ordering::SeqCst), 4 * 500 * 3);
    let high = high.load(Ordering::SeqCst);
    assert!((1..=3).contains(&high), "high-water mark {high}");
}

#[test]
fn one_push_fills_every_free_slot_at_once() {
    // No ticker and no completions: only the push itself can start batches.
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        held.wait();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(4)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, (0..10).collect()).unwrap();
    let mut first: Vec<Vec<u32>> = recv_n(&started, 4);
    first.sort();
    assert_eq!(first, vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (2, 4));
    gate.open();
    assert_eq!(recv(&started), vec![8, 9]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn a_flush_fills_every_free_slot_at_once() {
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        held.wait();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books
        .buffer(&handle, vec![1, 2, 3, 4], Priority::Back)
        .unwrap();
    handle.flush().unwrap();
    let mut first = recv_n(&started, 3);
    first.sort();
    assert_eq!(first, vec![vec![1], vec![2], vec![3]]);
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (1, 3));
    gate.open();
    assert_eq!(recv(&started), vec![4]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn a_completion_fills_the_slot_it_frees_without_a_tick() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
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
    books.push_back(&handle, vec![1, 2, 3]).unwrap();
    assert_eq!(recv_n(&rx, 3), vec![vec![1], vec![2], vec![3]]);
    books.finish(handle.shutdown_drain().unwrap());
}

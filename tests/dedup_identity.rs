//! Key de-duplication against entries it cannot tell apart (found by a
//! hostile review): the table marks keys, not entries, so whenever two entries
//! with one key wait, a rule that drops one must not guess which. Each test
//! checks that nothing is dropped as the duplicate of nothing, and that every
//! entry runs or is accounted for.
mod common;
use buffered_task::{Builder, FlushInterval, Outcome, OverflowReason};
use common::*;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::Arc;

type Entry = (u32, u32);
type Permitted = (
    Script<Entry, ()>,
    Receiver<Vec<Entry>>,
    Sender<()>,
    Arc<Books<Entry>>,
);

fn permitted(retry: impl Fn(&[Entry]) -> bool + Send + Sync + 'static) -> Permitted {
    let (started_tx, started) = unbounded();
    let (permit_tx, permits) = unbounded::<()>();
    let mut task = Script::new(move |b: &[Entry], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        permits.recv_timeout(HANG).expect("no permit");
        if retry(b) {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    (task, started, permit_tx, books)
}

/// A (back) waits; B (front) comes in and runs first; D (back) is handed over
/// while B runs. D must not be dropped for a mark of A's: A and D both run.
#[test]
fn a_front_duplicate_leaves_no_mark_for_a_later_entry_to_hit() {
    let (task, started, permit, books) = permitted(|_| false);
    let (reason_tx, reasons) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v, r| {
            b.overflowed(&v);
            for e in v {
                reason_tx.send((e, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // worker busy
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A
    books.push_front(&handle, vec![(5, 1)]).unwrap(); // B, urgent
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(5, 1)]); // B runs
    books.push_back(&handle, vec![(5, 2)]).unwrap(); // D: queued again
    assert!(reasons.try_recv().is_err(), "D accepted");
    for _ in 0..10 {
        permit.send(()).unwrap(); // enough for every run left
    }
    handle.wait_idle(HANG).unwrap();
    let mut ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(dropped.is_empty(), "{dropped:?}");
    ran.sort();
    assert_eq!(ran, vec![vec![(5, 0)], vec![(5, 2)]], "A and D both run");
}

/// The engine, its starts, its permits, its books, what overflowed and why.
type Rig = (
    buffered_task::Handle<Entry>,
    Receiver<Vec<Entry>>,
    Sender<()>,
    Arc<Books<Entry>>,
    Receiver<(Entry, OverflowReason)>,
);

fn engine(builder: impl FnOnce(Builder<Script<Entry, ()>>) -> Builder<Script<Entry, ()>>) -> Rig {
    engine_with(|_| false, builder)
}

fn engine_with(
    retry: impl Fn(&[Entry]) -> bool + Send + Sync + 'static,
    builder: impl FnOnce(Builder<Script<Entry, ()>>) -> Builder<Script<Entry, ()>>,
) -> Rig {
    let (task, started, permit, books) = permitted(retry);
    let (reason_tx, reasons) = unbounded();
    let b = books.clone();
    let handle = builder(
        Builder::new(task, ())
            .max_batch_size(1)
            .max_concurrency(1)
            .flush_interval(FlushInterval::Never)
            .poll(false)
            .dedup_by_key(|e: &Entry| e.0),
    )
    .overflow_handler(move |v, r| {
        b.overflowed(&v);
        for e in v {
            reason_tx.send((e, r)).unwrap();
        }
    })
    .start()
    .unwrap();
    (handle, started, permit, books, reasons)
}

/// A (back) is queued; B (front) is buffered. A worker takes A (queued)
/// before B is flushed: B, the newer one, must still run.
#[test]
fn a_buffered_front_duplicate_runs_after_the_queued_one() {
    let (handle, started, permit, books, reasons) = engine(|b| b);
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // worker busy
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A, queued
    books
        .buffer(&handle, vec![(5, 1)], buffered_task::Priority::Front)
        .unwrap(); // B, buffered
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(5, 0)]); // A runs (B is not queued yet)
                                              // (`wait_idle` flushes B into the queue.)
    for _ in 0..10 {
        permit.send(()).unwrap(); // enough for every run left
    }
    handle.wait_idle(HANG).unwrap();
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(ran, vec![vec![(5, 1)]], "B runs after A");
    assert!(
        dropped.is_empty(),
        "B dropped as a Duplicate of A, which had already run: {dropped:?}"
    );
}

/// B (front) runs first and fails into a retry backoff while A (back) waits:
/// A runs, and B's retry must run too.
#[test]
fn a_retry_of_a_front_entry_runs_after_its_twin() {
    let clock = buffered_task::ManualClock::new();
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = first.clone();
    let (handle, started, permit, books, reasons) = engine_with(
        move |b| b == [(5, 1)] && f.swap(false, std::sync::atomic::Ordering::SeqCst),
        |b| {
            b.clock(&clock)
                .retry_policy(buffered_task::RetryPolicy::new(5).backoff(
                    std::time::Duration::from_secs(10),
                    std::time::Duration::from_secs(10),
                ))
        },
    );
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]);
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A
    books.push_front(&handle, vec![(5, 1)]).unwrap(); // B
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(5, 1)]);
    permit.send(()).unwrap(); // B fails: backoff
    let second = recv(&started);
    clock.advance(std::time::Duration::from_secs(60));
    permit.send(()).unwrap();
    for _ in 0..10 {
        permit.send(()).unwrap(); // enough for every run left
    }
    handle.wait_idle(HANG).unwrap();
    let mut ran = vec![second];
    ran.extend(started.try_iter());
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    ran.sort();
    assert_eq!(
        ran,
        vec![vec![(5, 0)], vec![(5, 1)]],
        "A runs, and B's retry"
    );
    assert!(
        dropped.is_empty(),
        "B's retry dropped as a Duplicate after A ran: {dropped:?}"
    );
}

/// The worker marks a batch as taken after it left the queue, outside the
/// store's lock: a front hand-over in between must not be dropped. Made
/// deterministic by a key function that pauses on its second call for (5, 0)
/// (the worker's).
#[test]
fn a_front_hand_over_while_the_worker_is_taking_its_twin() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let calls = Arc::new(AtomicUsize::new(0));
    let (in_taken_tx, in_taken) = unbounded::<()>();
    let (go_tx, go) = unbounded::<()>();
    let c = calls.clone();
    let (task, started, permit, books) = permitted(|_| false);
    let (reason_tx, reasons) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(move |e: &Entry| {
            if *e == (5, 0) && c.fetch_add(1, Ordering::SeqCst) == 1 {
                in_taken_tx.send(()).unwrap();
                go.recv_timeout(HANG).unwrap();
            }
            e.0
        })
        .overflow_handler(move |v, r| {
            b.overflowed(&v);
            for e in v {
                reason_tx.send((e, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // taken at once
    recv(&in_taken); // the worker has it out of the queue, not yet marked taken
    books.push_front(&handle, vec![(5, 1)]).unwrap();
    go_tx.send(()).unwrap();
    for _ in 0..10 {
        permit.send(()).unwrap(); // enough for every run left
    }
    handle.wait_idle(HANG).unwrap();
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(ran, vec![vec![(5, 0)], vec![(5, 1)]]);
    assert!(
        dropped.is_empty(),
        "(5, 1) dropped as the Duplicate of (5, 0), which was already running: {dropped:?}"
    );
}

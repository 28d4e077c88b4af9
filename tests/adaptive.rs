//! Adaptive concurrency in the engine: the limit starts at the minimum, grows
//! while runs succeed, halves when they fail, and no more batches than the
//! limit run at once. (The controller's settling against a simulated backend
//! is tested in `src/adaptive.rs`, in counted rounds.)

mod common;
use buffered_task::{BuildError, Builder, FlushInterval, ManualClock, Outcome};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

#[test]
fn the_limit_follows_success_and_failure_and_bounds_the_runs() {
    // A manual clock that never moves: every run takes "no time", so only
    // success and failure move the limit.
    let clock = ManualClock::new();
    let gate = Gate::new();
    let hold = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicU32::new(0));
    let (started_tx, started) = unbounded();
    let (g, h, f) = (gate.clone(), hold.clone(), failures.clone());
    let mut task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        if h.load(Ordering::SeqCst) {
            g.wait();
        }
        // Entry 100 fails on its first run only.
        if b[0] == 100 && f.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .adaptive_concurrency(1..=4)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    assert_eq!(handle.stats().concurrency_limit, 1);
    // Successes: +1 per `limit` of them, up to the maximum.
    for i in 0..20 {
        books.push_back(&handle, vec![i]).unwrap();
        recv(&started);
        wait_until(|| handle.stats().processed == u64::from(i) + 1);
    }
    assert_eq!(handle.stats().concurrency_limit, 4);
    // One failure halves it; the retry's success adds 1/2: 2.5, used rounded.
    books.push_back(&handle, vec![100]).unwrap();
    recv_n(&started, 2); // the failure and the retry
    wait_until(|| handle.stats().processed == 21);
    assert_eq!(handle.stats().retried, 1);
    let limit = handle.stats().concurrency_limit;
    assert_eq!(limit, 3);
    // No more than the limit run at once, whatever the workers (four here).
    hold.store(true, Ordering::SeqCst);
    books.push_back(&handle, vec![200, 201, 202, 203]).unwrap();
    recv_n(&started, limit);
    let count = handle.debug_count().unwrap();
    assert_eq!((count.running, count.waiting), (3, 1));
    gate.open();
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn an_empty_or_zero_range_is_rejected() {
    for (min, max) in [(0, 4), (5, 4)] {
        let err = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
            .adaptive_concurrency(min..=max)
            .start()
            .unwrap_err();
        assert!(
            matches!(err, BuildError::ConcurrencyRange(a, b) if (a, b) == (min, max)),
            "{err}"
        );
    }
}

/// The range's top is `max_concurrency`: a later `.max_concurrency(n)` moves
/// it (the limit never passes the worker count), and one below the minimum
/// is rejected.
#[test]
fn max_concurrency_after_the_range_is_its_top() {
    let clock = ManualClock::new(); // never moves: every run is as fast as the best
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .max_batch_size(1)
        .adaptive_concurrency(2..=16)
        .max_concurrency(4)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    handle.push_back((0..200).collect()).unwrap();
    handle.wait_idle(HANG).unwrap();
    assert_eq!(
        handle.stats().concurrency_limit,
        4,
        "grew to the top, not past it"
    );
    handle.shutdown_drain().unwrap();
    let refused = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .adaptive_concurrency(2..=16)
        .max_concurrency(1)
        .start();
    assert!(
        matches!(refused, Err(BuildError::ConcurrencyRange(2, 1))),
        "{:?}",
        refused.err()
    );
}

//! Adaptive concurrency in the engine: the limit starts at the minimum, grows
//! while runs succeed, halves when they fail, and no more batches than the
//! limit run at once; against a simulated backend it settles between the
//! backend's knee and its failures, and recovers with it (in counted rounds
//! on a manual clock, here through the engine and in `src/adaptive.rs` for
//! the controller alone).

mod common;
use buffered_task::{BuildError, Builder, FlushInterval, ManualClock, Outcome};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

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

/// The backend, through the engine: each round hands over exactly
/// `limit` entries (batch 1), waits until they all run at once, lets the
/// backend's latency for that many concurrent calls pass on a manual clock
/// (1 ms up to the knee, 4 ms past it), and lets them return: all fail past
/// `fails_above` concurrent calls. The limit settles within [N, 2N) for a
/// knee at N and failures past 2N, follows a degraded backend down, and
/// recovers with it.
#[test]
fn the_limit_settles_against_a_simulated_backend_and_recovers() {
    let n = 4;
    let clock = ManualClock::new();
    let (started_tx, started) = unbounded::<()>();
    let (answer_tx, answer) = unbounded::<bool>(); // true: the call succeeds
    let task = Script::new(move |_: &[u64], _: &()| {
        started_tx.send(()).unwrap();
        if answer.recv_timeout(HANG).unwrap() {
            Outcome::Ok
        } else {
            Outcome::RetryEntries(Vec::new()) // a failed call, nothing to retry
        }
    });
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(4 * n)
        .adaptive_concurrency(1..=4 * n)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    let mut next = 0u64;
    let mut rounds = |count: usize, knee: usize, fails_above: usize| -> Vec<usize> {
        (0..count)
            .map(|_| {
                let at_once = handle.stats().concurrency_limit;
                let entries: Vec<u64> = (next..next + at_once as u64).collect();
                next += at_once as u64;
                handle.push_back(entries).unwrap();
                recv_n(&started, at_once); // all of them at once
                let latency = if at_once <= knee { 1 } else { 4 };
                clock.advance(Duration::from_millis(latency));
                for _ in 0..at_once {
                    answer_tx.send(at_once <= fails_above).unwrap();
                }
                eventually(|| {
                    let s = handle.stats();
                    let busy = s.running + s.queued;
                    (busy > 0).then(|| format!("round not over: {s:?}"))
                });
                handle.stats().concurrency_limit
            })
            .collect()
    };
    let warm = rounds(100, n, 2 * n);
    assert!(warm.iter().any(|&l| l >= n), "it grows: {warm:?}");
    let settled = rounds(300, n, 2 * n);
    assert!(
        settled.iter().all(|&l| (n..2 * n).contains(&l)),
        "{settled:?}"
    );
    // The backend degrades (knee at 1, failures past 2), then recovers.
    let degraded = rounds(200, 1, 2);
    assert!(
        degraded[100..].iter().all(|&l| (1..=2).contains(&l)),
        "{degraded:?}"
    );
    let recovered = rounds(400, n, 2 * n);
    assert!(
        recovered[200..].iter().all(|&l| (n..2 * n).contains(&l)),
        "{recovered:?}"
    );
    let stats = handle.stats();
    handle.shutdown_drain().unwrap();
    assert!(stats.retried == 0 && stats.processed > 0, "{stats:?}");
}

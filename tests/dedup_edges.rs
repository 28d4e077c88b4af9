//! Key de-duplication at its edges (found by a hostile review): a refused
//! front hand-over, a front duplicate of a waiting retry, an entry without a
//! key, and the counts under concurrent load. No mark may outlive its
//! entries: a later entry would be dropped as the duplicate of nothing.

mod common;
use buffered_task::{
    BufferError, Builder, FlushInterval, ManualClock, Outcome, OverflowPolicy, OverflowReason,
    Priority, RetryPolicy,
};
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

type Entry = (u32, u32);

/// A front hand-over that is refused (here: `Timeout` under `Block`) after the
/// entry it superseded was taken by a worker must take its mark back with it;
/// left behind, the next entry of that key to leave unrun (a shrink) would eat
/// it instead of its own, and the key would stay "waiting" for ever: every
/// later back hand-over of it dropped as a duplicate of nothing.
#[test]
fn a_refused_front_hand_over_leaves_no_phantom_waiting_key() {
    let (task, started, permit, books) = permitted(|_| false);
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(2)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]);
    books.push_back(&handle, vec![(5, 0), (6, 0)]).unwrap(); // full
    let (h, bk) = (handle.clone(), books.clone());
    let front = std::thread::spawn(move || {
        bk.buffer_timeout(
            &h,
            vec![(5, 1), (7, 0)],
            Priority::Front,
            Duration::from_millis(500),
        )
    });
    wait_until(|| handle.stats().blocked_callers == 1);
    permit.send(()).unwrap(); // (0, 0) done; (5, 0) is taken: room for 1, not 2
    assert_eq!(recv(&started), vec![(5, 0)]);
    let refused = front.join().unwrap();
    assert!(
        matches!(refused, Err(BufferError::Timeout(_))),
        "{refused:?}"
    );
    permit.send(()).unwrap(); // (5, 0) done
    assert_eq!(recv(&started), vec![(6, 0)]);
    permit.send(()).unwrap();
    handle.wait_idle(HANG).unwrap();
    // Nothing with key 5 is in the engine now.
    books.push_back(&handle, vec![(1, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(1, 0)]); // the worker is busy
    books.push_back(&handle, vec![(8, 0), (5, 2)]).unwrap();
    handle.shrink().unwrap(); // sheds (5, 2)
    assert_eq!(recv(&reasons), ((5, 2), OverflowReason::Shrink));
    handle.expand().unwrap();
    // Again nothing with key 5 is waiting: (5, 3) must be queued.
    books.push_back(&handle, vec![(5, 3)]).unwrap();
    for _ in 0..10 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let dups: Vec<_> = reasons.try_iter().collect();
    assert!(
        dups.is_empty(),
        "(5, 3) was dropped as a duplicate although no entry with key 5 was waiting: {dups:?}"
    );
    books.finish(handle.shutdown_drain().unwrap());
}

/// A front hand-over whose key waits in a retry backoff: due retries are
/// taken before the queue, so the retry is the first twin a worker reaches,
/// and it runs (after the front one came in); the front one is then dropped
/// as its duplicate. Never both dropped, never both run.
#[test]
fn a_front_duplicate_of_a_waiting_retry_is_covered_by_the_retry() {
    let clock = ManualClock::new();
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let (task, started, permit, books) =
        permitted(move |b| b == [(5, 0)] && f.swap(false, Ordering::SeqCst));
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .retry_policy(RetryPolicy::new(5).backoff(Duration::from_secs(10), Duration::from_secs(10)))
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(5, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(5, 0)]);
    permit.send(()).unwrap(); // asks for a retry: (5, 0) waits its backoff
    wait_until(|| handle.stats().retried == 1 && handle.stats().running == 0);
    books.push_back(&handle, vec![(9, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(9, 0)]); // the worker is busy
    books.push_front(&handle, vec![(5, 1)]).unwrap(); // (5, 0) waits as a retry
    assert!(
        reasons.try_recv().is_err(),
        "a front entry is kept as it comes in"
    );
    clock.advance(Duration::from_secs(60)); // the retry is due
    permit.send(()).unwrap(); // (9, 0) done
    assert_eq!(recv(&started), vec![(5, 0)], "the due retry first");
    permit.send(()).unwrap();
    handle.wait_idle(HANG).unwrap();
    let dropped: Vec<_> = reasons.try_iter().collect();
    assert_empty(&started);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(dropped, vec![((5, 1), OverflowReason::Duplicate)]);
    assert_eq!(handle.stats().deduplicated, 1);
}

/// A key function that panics for one entry (deterministically) keeps that
/// entry as if it had no key; when a worker takes it, its key cannot be
/// computed again, and that must not turn de-duplication off for the others.
/// (The table cannot tell that entry from one whose key panics only now and
/// then, whose record would stay behind: from then on twins are dropped as
/// workers reach them, not as they come in. Either way only one runs.)
#[test]
fn one_entry_without_a_key_leaves_dedup_on() {
    quiet_panics();
    let (ran_tx, ran) = crossbeam_channel::unbounded();
    let mut task = Script::new(move |b: &[Entry], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v, _| b.overflowed(&v))
        .dedup_by_key(|e: &Entry| {
            if e.1 == 666 {
                panic!("deliberate: key");
            }
            e.0
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(1, 666)]).unwrap();
    handle.wait_idle(HANG).unwrap();
    books
        .buffer(&handle, vec![(2, 0), (2, 1)], Priority::Back)
        .unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    let ran: Vec<Entry> = ran.try_iter().flatten().collect();
    assert_eq!(ran, vec![(1, 666), (2, 0)], "one run of key 2");
    assert_eq!(
        handle.stats().deduplicated,
        1,
        "(2, 1) duplicates (2, 0), but de-duplication is off"
    );
}

/// Concurrent producers, front and back, retries, a bounded queue that
/// overflows: every entry leaves once, and `deduplicated` equals what the
/// overflow handler got as `Duplicate`.
#[test]
fn dedup_accounting_under_load() {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::AtomicU64;
    for round in 0..60u64 {
        let books = Books::<Entry>::new();
        let tries = Arc::new(parking_lot::Mutex::new(std::collections::HashSet::new()));
        let t = tries.clone();
        let task = Script::new(move |b: &[Entry], _: &()| {
            let again: Vec<Entry> = b
                .iter()
                .filter(|e| e.1 % 5 == 0 && t.lock().insert(**e))
                .copied()
                .collect();
            if again.is_empty() {
                Outcome::Ok
            } else {
                Outcome::RetryEntries(again)
            }
        })
        .with_books(&books);
        let dups = Arc::new(AtomicU64::new(0));
        let (d, b) = (dups.clone(), books.clone());
        let mut builder = Builder::new(task, ())
            .max_batch_size(1 + round as usize % 3)
            .max_concurrency(1 + round as usize % 3)
            .max_queue_len(20)
            .flush_interval(Duration::from_millis(1))
            .poll(false)
            .dedup_by_key(|e: &Entry| e.0)
            .overflow_handler(move |v, r| {
                if r == OverflowReason::Duplicate {
                    d.fetch_add(v.len() as u64, Ordering::SeqCst);
                }
                b.overflowed(&v);
            });
        if round % 2 == 0 {
            builder = builder.batching(buffered_task::Batching::Natural);
        }
        if round % 3 == 0 {
            builder =
                builder.retry_policy(RetryPolicy::new(3).backoff(Duration::ZERO, Duration::ZERO));
        }
        let handle = builder.start().unwrap();
        let mut threads = Vec::new();
        for p in 0..3u32 {
            let (h, bk) = (handle.clone(), books.clone());
            threads.push(std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(round * 10 + p as u64);
                for i in 0..400u32 {
                    let e = (rng.gen_range(0..8u32), p << 20 | i);
                    let r = match rng.gen_range(0..4) {
                        0 => bk.push_front(&h, vec![e]),
                        1 => bk.push_back(&h, vec![e]),
                        2 => bk.buffer_one(&h, e, Priority::Front),
                        _ => bk.buffer_one(&h, e, Priority::Back),
                    };
                    r.unwrap();
                    if i % 97 == 0 {
                        let _ = h.shrink();
                        let _ = h.expand();
                    }
                }
            }));
        }
        for t in threads {
            t.join().unwrap();
        }
        handle.wait_idle(HANG).unwrap();
        books.finish(handle.shutdown_drain().unwrap());
        assert_eq!(
            handle.stats().deduplicated,
            dups.load(Ordering::SeqCst),
            "round {round}"
        );
    }
}

/// Control for the phantom-key test: the same steps without the refused
/// front hand-over pass.
#[test]
fn control_without_the_refused_front_hand_over() {
    let (task, started, permit, books) = permitted(|_| false);
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(2)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]);
    books.push_back(&handle, vec![(5, 0), (6, 0)]).unwrap();
    for _ in 0..3 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.push_back(&handle, vec![(1, 0)]).unwrap();
    assert_eq!(recv_n(&started, 3)[2], vec![(1, 0)]);
    books.push_back(&handle, vec![(8, 0), (5, 2)]).unwrap();
    handle.shrink().unwrap();
    assert_eq!(recv(&reasons), ((5, 2), OverflowReason::Shrink));
    handle.expand().unwrap();
    books.push_back(&handle, vec![(5, 3)]).unwrap();
    for _ in 0..10 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let dups: Vec<_> = reasons.try_iter().collect();
    assert!(dups.is_empty(), "{dups:?}");
    books.finish(handle.shutdown_drain().unwrap());
}

//! Key de-duplication against entries it cannot tell apart (found by a
//! hostile review): the table marks keys, not entries, so whenever two entries
//! with one key wait, a rule that drops one must not guess which. Each test
//! checks that nothing is dropped as the duplicate of nothing, and that every
//! entry runs or is accounted for.
mod common;
use buffered_task::{Builder, FlushInterval, Outcome, OverflowPolicy, OverflowReason, Priority};
use common::*;
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

type Entry = (u32, u32);

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

/// A back hand-over must not be dropped as the duplicate of a twin whose
/// hand-over is refused (Reject, Full) a moment later: no entry with the key
/// ever waited.
/// The window was held open by the weigher (user code, which ran after the
/// key table marked the key and before the bound was checked); keys are now
/// marked only once a hand-over is admitted.
#[test]
fn no_duplicate_of_a_hand_over_that_is_then_refused() {
    let (task, held) = held::<Entry>();
    let wgate = Gate::new();
    let wg = wgate.clone();
    let (in_weigher_tx, in_weigher) = unbounded();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let (reason_tx, reasons) = unbounded();
    let b = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::Reject)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .weigher(move |e: &Entry| {
            if e.1 == 99 && a.swap(false, Ordering::SeqCst) {
                in_weigher_tx.send(()).unwrap();
                wg.wait();
            }
            8
        })
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            for e in v {
                reason_tx.send((e, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![(0, 0)]).unwrap();
    recv(&held.started); // worker busy
    held.books.push_back(&handle, vec![(1, 0)]).unwrap(); // queue full
    let h = handle.clone();
    let books = held.books.clone();
    let e = std::thread::spawn(move || books.push_back(&h, vec![(5, 99)]));
    recv(&in_weigher); // (5, 99) is being weighed: not admitted yet
                       // Its twin meets the same full queue: refused too, not a duplicate.
    let twin = held.books.push_back(&handle, vec![(5, 1)]);
    assert!(
        matches!(twin, Err(buffered_task::BufferError::Full(_))),
        "{twin:?}"
    );
    wgate.open();
    let refused = e.join().unwrap();
    held.gate.open();
    handle.wait_idle(HANG).unwrap();
    let dropped: Vec<_> = reasons.try_iter().collect();
    held.books.finish(handle.shutdown_drain().unwrap());
    assert!(refused.is_err(), "(5,99) was refused Full");
    assert!(
        dropped.is_empty(),
        "dropped as the duplicate of a refused hand-over: {dropped:?}"
    );
}

/// Mixed load: many keys, back and front hand-overs from several threads,
/// retries, a bounded queue that overflows, shrinks. After wait_idle, one
/// back entry per key must be kept (no mark outlives its entries), and the
/// books balance.
#[test]
fn no_mark_survives_a_mixed_load() {
    for round in 0..20u32 {
        let fails = Arc::new(AtomicUsize::new(0));
        let f = fails.clone();
        let mut task = Script::new(move |b: &[Entry], _: &()| {
            if b.iter().any(|e| e.1 % 7 == 3) && f.fetch_add(1, Ordering::Relaxed) % 2 == 0 {
                // retry some, add a new one sometimes
                let mut v: Vec<Entry> = b.iter().copied().filter(|e| e.1 % 2 == 1).collect();
                if b[0].1 % 5 == 0 {
                    v.push((b[0].0, 1_000_000 + b[0].1));
                }
                Outcome::RetryEntries(v)
            } else {
                Outcome::Ok
            }
        });
        let books = task.books();
        let (reason_tx, reasons) = unbounded();
        let bk = books.clone();
        let handle = Builder::new(task, ())
            .max_batch_size(3)
            .max_concurrency(2)
            .max_queue_len(16)
            .flush_interval(FlushInterval::Never)
            .poll(false)
            .dedup_by_key(|e: &Entry| e.0)
            .overflow_handler(move |v: Vec<Entry>, r| {
                bk.overflowed(&v);
                for e in v {
                    reason_tx.send((e, r)).unwrap();
                }
            })
            .start()
            .unwrap();
        let mut ts = Vec::new();
        for t in 0..3u32 {
            let h = handle.clone();
            let books = books.clone();
            ts.push(std::thread::spawn(move || {
                for i in 0..400u32 {
                    let e = ((i * 7 + t * 13 + round) % 11, t * 10_000 + i);
                    let p = if i % 4 == 0 {
                        Priority::Front
                    } else {
                        Priority::Back
                    };
                    match i % 3 {
                        0 => {
                            let _ = books.buffer(&h, vec![e], p);
                        }
                        1 if p == Priority::Front => {
                            let _ = books.push_front(&h, vec![e]);
                        }
                        1 => {
                            let _ = books.push_back(&h, vec![e]);
                        }
                        _ => {
                            let _ = books.buffer(&h, vec![e], p);
                            let _ = h.flush();
                        }
                    }
                    if i % 50 == 49 {
                        let _ = h.shrink();
                        let _ = h.expand();
                    }
                }
            }));
        }
        for t in ts {
            t.join().unwrap();
        }
        handle.wait_idle(HANG).unwrap();
        let _: Vec<_> = reasons.try_iter().collect();
        let probe: Vec<Entry> = (0..11).map(|k| (k, 9_000_000 + k)).collect();
        for e in &probe {
            books.push_back(&handle, vec![*e]).unwrap();
        }
        let dropped: Vec<_> = reasons
            .try_iter()
            .filter(|(e, r)| *r == OverflowReason::Duplicate && e.1 >= 9_000_000)
            .collect();
        handle.wait_idle(HANG).unwrap();
        books.finish(handle.shutdown_drain().unwrap());
        assert!(
            dropped.is_empty(),
            "round {round}: probe dropped: {dropped:?}"
        );
    }
}

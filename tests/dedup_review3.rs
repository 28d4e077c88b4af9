//! Key de-duplication, found by a third hostile review (after
//! `tests/dedup_refused.rs` and `tests/dedup_review.rs`): `wait_idle` before
//! a worker's duplicates reached their handler, an entry whose key panicked
//! on the way in dropped for a run already begun, a retry yielding to a
//! buffered twin the bound then refuses, and a push's hold outliving its
//! overflow report. Each test forces one order of events with gates,
//! channels and pausing user code (no sleeps), and states the promise it
//! holds the engine to. (A push dropped at once against a buffered twin
//! that the flush then refuses shares that twin's fate, as documented.)
mod common;
use buffered_task::{Builder, FlushInterval, IdleError, OverflowPolicy, OverflowReason, Priority};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

type Entry = (u32, u32);

// ---------------------------------------------------------------------------
// 1. `wait_idle` returns while a worker is still handing a batch's
//    duplicates to the overflow handler (the batch was all duplicates).
// ---------------------------------------------------------------------------

/// `Store::taken`'s doc: a duplicate dropped from a worker's batch is
/// "counted and reported (with the worker's run slot still held, so
/// `wait_idle` waits for its handler)"; `wait_idle`: it returns once every
/// entry handed over before the call has *left* (for overflow: once its
/// handler has returned, see `State::handing`). The second review's fix
/// (`run_shrank`) takes the duplicates off the slot's count *before* their
/// handler is called, so a batch made only of duplicates leaves a `Run`
/// slot counting 0 entries while its handler runs.
///
/// Order (batch 1, one worker): (0, 0) runs; A = (5, 0) is pushed back,
/// F = (5, 1) pushed front; F runs (A is now covered by F's run); F
/// returns; the worker takes [A], drops it as F's duplicate and calls the
/// overflow handler, which waits at a gate. Meanwhile `wait_idle(300 ms)`
/// from the test thread: A was handed over before it and has not left (its
/// handler has not returned), so it must time out; it returns `Ok` at once.
#[test]
fn wait_idle_waits_for_the_handler_of_a_batch_that_was_all_duplicates() {
    let (task, started, permit, books) = permitted(|_| false);
    let (in_handler_tx, in_handler) = unbounded::<()>();
    let gate = Gate::new();
    let g = gate.clone();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            if r == OverflowReason::Duplicate && v == [(5, 0)] {
                in_handler_tx.send(()).unwrap();
                g.wait();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A
    books.push_front(&handle, vec![(5, 1)]).unwrap(); // F
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(5, 1)]); // F runs
    permit.send(()).unwrap(); // F returns; the worker takes [A]
    recv(&in_handler); // A's handler is running (A has not left yet)
    let early = handle.wait_idle(Duration::from_millis(300));
    gate.open();
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        matches!(early, Err(IdleError::Timeout { .. })),
        "wait_idle returned {early:?} while A = (5, 0), handed over before the call, \
         was still in its overflow handler (dropped as a duplicate by a worker)"
    );
}

// ---------------------------------------------------------------------------
// 2. An entry whose key could not be computed on the way in is dropped, as
//    it leaves, as the duplicate of a run that had already begun.
// ---------------------------------------------------------------------------

/// `dedup_by_key`: "a panic in it keeps the entry, as if it had no key";
/// `KeyTable`: "A key that cannot be computed on the way in keeps its
/// entry, as if it had no duplicate". The promise: nothing is dropped as
/// the duplicate of a run already begun. The key function may panic now
/// and then (the first review made the *leaving* side of that safe:
/// `Marks::suspect`), but the *arriving* side is not: a keyless arrival
/// does not mark its key owed, and when the entry leaves with its key
/// computed, `leaving` takes the record of a twin as its own.
///
/// Order (batch 1, one worker): (0, 0) runs. Y = (2, 0) and A = (5, 0) are
/// pushed back, F = (5, 1) front (key 5: two waiting, owed). F runs (key 5:
/// A waits, *not* owed: F's run covers A). While F runs, X = (1, 0) and
/// then Q = (5, 2) are pushed front; Q's key panics this once (Q is kept,
/// keyless). F returns; the worker takes [Q]: its key is 5 now, the record
/// says "not owed", so Q is dropped as a duplicate, of F's run, which
/// began before Q was handed over. (The worker then takes X, whose run
/// waits; a shrink sheds A, which finds key 5's record gone and turns
/// de-duplication off.) No run of key 5 begins after Q came in.
#[test]
fn an_entry_whose_key_panicked_on_the_way_in_is_not_dropped_for_a_run_already_begun() {
    quiet_panics();
    // Panics this many more times for Q (the table tries a batch whole, then
    // each entry on its own: two calls as Q comes in).
    let armed = Arc::new(AtomicU32::new(0));
    let a = armed.clone();
    let (task, started, permit, books) = permitted(|_| false);
    let (reason_tx, reasons) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(move |e: &Entry| {
            if *e == (5, 2) && a.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
                panic!("deliberate: no key this once");
            }
            e.0
        })
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            for e in v {
                reason_tx.send((e, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(2, 0)]).unwrap(); // Y
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A
    books.push_front(&handle, vec![(5, 1)]).unwrap(); // F
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(5, 1)]); // F's run has begun
    books.push_front(&handle, vec![(1, 0)]).unwrap(); // X
    armed.store(2, SeqCst);
    books.push_front(&handle, vec![(5, 2)]).unwrap(); // Q: no key as it comes in
    assert_eq!(armed.load(SeqCst), 0, "Q's key panicked on both tries");
    let mut ran_after_q: Vec<Vec<Entry>> = Vec::new();
    permit.send(()).unwrap(); // F returns; the worker takes [Q], then [X]
    let next = recv(&started);
    ran_after_q.push(next.clone());
    let mut q_dropped = reasons
        .try_iter()
        .any(|x| x == ((5, 2), OverflowReason::Duplicate));
    if next == vec![(1, 0)] {
        // X runs; Y and A wait. Shed the back half (A).
        handle.shrink().unwrap();
    }
    for _ in 0..6 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    ran_after_q.extend(started.try_iter());
    q_dropped |= reasons
        .try_iter()
        .any(|x| x == ((5, 2), OverflowReason::Duplicate));
    books.finish(handle.shutdown_drain().unwrap());
    let key5_ran = ran_after_q.iter().any(|b| b.iter().any(|e| e.0 == 5));
    assert!(
        !q_dropped || key5_ran,
        "Q = (5, 2), handed over while F = (5, 1) ran, was dropped as a duplicate of F's \
         run, which began before it; no run of key 5 began after Q (runs after Q: \
         {ran_after_q:?})"
    );
}

// ---------------------------------------------------------------------------
// 3. A failed run's retry yields to a buffered twin that the bound then
//    refuses at the flush.
// ---------------------------------------------------------------------------

/// README: "A failed run's retry yields to a waiting entry with its key
/// (never to one a bound may still refuse: the run's own new entries, a
/// push on its way into a bounded queue)"; `Store::readmit`: "they go back
/// whatever the bound, so a retry never yields to a new entry the bound then
/// refuses"; `dedup_by_key`: where "a bound has yet to take" the twin, the
/// back duplicate "is kept instead". Under `DropNewest` with a bounded queue,
/// a *buffered* entry has not been looked at by the bound yet: the flush
/// that moves it into the queue may refuse it. The fix for pushes
/// (`hold_unsettled` in `admit_keyed`) does not cover the buffers: they are
/// held only for the moment of `queue_intake`.
///
/// Order (DropNewest, queue bound 1, batch 1, one worker, no retry policy,
/// flush Never): R = (5, 0) runs; P = (1, 0) is queued (the queue is full);
/// A = (5, 1) is buffered (key 5: one waiting, owed; nothing unsettled).
/// R's run returns `Retry`: `readmit` admits R back, sees key 5 owed and
/// nothing unsettled, and drops R at once as A's duplicate. The worker
/// takes P; Q = (2, 0) fills the queue again; `flush()` moves A to the
/// queue, which refuses it (Full). R, which would have gone back whatever
/// the bound, was dropped as the duplicate of an entry that never ran; no
/// run of key 5 begins after R came back.
#[test]
fn a_retry_does_not_yield_to_a_buffered_twin_the_bound_then_refuses() {
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let (task, started, permit, books) =
        permitted(move |b: &[Entry]| b == [(5, 0)] && f.swap(false, SeqCst));
    let (reason_tx, reasons) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::DropNewest)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            for e in v {
                reason_tx.send((e, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // R
    assert_eq!(recv(&started), vec![(5, 0)]); // R runs
    books.push_back(&handle, vec![(1, 0)]).unwrap(); // P: the queue is full
    books.buffer(&handle, vec![(5, 1)], Priority::Back).unwrap(); // A, buffered
    permit.send(()).unwrap(); // R's run asks for a retry
    let next = recv(&started); // the worker has settled R and taken P
    assert_eq!(next, vec![(1, 0)]);
    books.push_back(&handle, vec![(2, 0)]).unwrap(); // Q: the queue is full again
    handle.flush().unwrap(); // A meets the bound
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let why: Vec<(Entry, OverflowReason)> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    let r_dup = why.contains(&((5, 0), OverflowReason::Duplicate));
    let key5_ran = ran.iter().any(|b| b.iter().any(|e| e.0 == 5));
    assert!(
        !r_dup || key5_ran,
        "R's retry was dropped as the duplicate of the buffered A, which the bound then \
         refused at the flush; no run of key 5 began after R came back (runs after: \
         {ran:?}, overflow: {why:?})"
    );
}

// ---------------------------------------------------------------------------
// 4. A push's own overflow handler keeps every other thread's duplicates
//    from being dropped at once (the push's hold outlives its settling).
// ---------------------------------------------------------------------------

/// `dedup.rs`: "A back hand-over ... whose key is owed is dropped at once,
/// where the table is sure a twin still waits"; `Departures`: the store
/// releases its hold "only once it is settled: admitted, or, if refused,
/// held again as overflow first". `push` releases its hold only after
/// `queue_admitted` has *reported* the overflow, i.e. after the user's
/// overflow handler returns (and `feed` likewise after its whole loop,
/// handlers included). For as long as that handler runs (it may block,
/// call the engine, or log), every back duplicate on every thread is kept
/// though its twin surely waits.
///
/// Order (DropNewest, queue bound 2, batch 1, one worker, flush Never):
/// (0, 0) runs; W = (7, 0) is queued and settled (key 7: owed). Thread T
/// pushes [(1, 0), (2, 0)]: (1, 0) is queued, (2, 0) overflows; T's
/// overflow handler waits at a gate. The test thread buffers B = (7, 1)
/// back: W surely waits (queued, nothing else in flight), so B must be
/// dropped at once; it is buffered instead.
#[test]
fn a_push_in_its_overflow_handler_does_not_keep_others_duplicates() {
    let (task, started, permit, books) = permitted(|_| false);
    let (in_handler_tx, in_handler) = unbounded::<()>();
    let gate = Gate::new();
    let g = gate.clone();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(2)
        .overflow_policy(OverflowPolicy::DropNewest)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            if r == OverflowReason::Full && v == [(2, 0)] {
                in_handler_tx.send(()).unwrap();
                g.wait();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(7, 0)]).unwrap(); // W: queued, settled
    let (h, bk) = (handle.clone(), books.clone());
    let t = std::thread::spawn(move || bk.push_back(&h, vec![(1, 0), (2, 0)]));
    recv(&in_handler); // (1, 0) queued, (2, 0) overflowed: T is in its handler
    books.buffer(&handle, vec![(7, 1)], Priority::Back).unwrap(); // B
    let stats = handle.stats();
    gate.open();
    t.join().unwrap().unwrap();
    for _ in 0..6 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(
        (stats.buffered, stats.deduplicated),
        (0, 1),
        "B = (7, 1) was kept (buffered) though its twin W = (7, 0) surely waits: another \
         caller's push still held its entries unsettled while its overflow handler ran"
    );
}

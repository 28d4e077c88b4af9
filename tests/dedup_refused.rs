//! Key de-duplication against twins that never wait (found by a hostile
//! review of the per-key counts): a run's retry or new entry, an `init`
//! entry, whose keys are marked before a bound decides; a key function that
//! panics only now and then; keys dropped under the callers' lock. Each test
//! states the order of events it forces.
mod common;
use buffered_task::{
    Builder, ControlError, FlushInterval, Outcome, OverflowPolicy, OverflowReason, Priority,
    RetryPolicy, WeakHandle,
};
use common::*;
use crossbeam_channel::{unbounded, Sender};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

type Entry = (u32, u32);

/// Under a retry policy, a run asks for its own entry X = (5, 0) again and
/// returns a new entry N = (5, 1) with the same key, while the bounded queue
/// (Reject) is full. `readmit` marks the *fresh* entries before the batch's
/// own (`later`): N takes the key, X's retry is dropped at once as N's
/// duplicate, and then the bound refuses N (Full). X's retry would have gone
/// in whatever the bound (retries always do); N never waited. Key 5 never
/// runs again: X was dropped as the duplicate of nothing.
#[test]
fn a_retry_is_not_dropped_as_the_duplicate_of_a_new_entry_the_bound_refuses() {
    let first = Arc::new(AtomicBool::new(true));
    let f = first.clone();
    let (started_tx, started) = unbounded::<Vec<Entry>>();
    let (permit, permits) = unbounded::<()>();
    let mut task = Script::new(move |b: &[Entry], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        permits.recv_timeout(HANG).expect("no permit");
        if b == [(5, 0)] && f.swap(false, SeqCst) {
            Outcome::RetryEntries(vec![(5, 0), (5, 1)]) // X again, and a new N
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::Reject)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(5).backoff(Duration::ZERO, Duration::ZERO))
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(5, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(5, 0)]); // X runs
    books.push_back(&handle, vec![(1, 0)]).unwrap(); // the queue is full
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    let key5_runs_after = ran.iter().filter(|b| b.iter().any(|e| e.0 == 5)).count();
    assert!(
        !dropped.contains(&((5, 0), OverflowReason::Duplicate)) || key5_runs_after > 0,
        "X's retry was dropped as a duplicate, yet no run of key 5 began after it \
         (its 'twin' N was refused by the bound): ran after {ran:?}, dropped {dropped:?}"
    );
}

/// The same root cause, with a user's hand-over as the victim. A run returns
/// new entries N = (7, 0) and M = (5, 1) under `Reject` with room for one:
/// `readmit` marks both keys, then the worker weighs the batch (user code,
/// paused here) before the store applies the bound, which will refuse M. A
/// back hand-over B = (5, 2) in that window is admitted (there is room) and
/// dropped at once as M's duplicate; then M is refused (Full). M never
/// waited, and no run of key 5 begins after B: B is dropped as the duplicate
/// of nothing. (The hand-over path was fixed for exactly this: see
/// `no_duplicate_of_a_hand_over_that_is_then_refused`.)
#[test]
fn a_hand_over_is_not_dropped_as_the_duplicate_of_a_new_entry_the_bound_refuses() {
    let once = Arc::new(AtomicBool::new(true));
    let o = once.clone();
    let (started_tx, started) = unbounded::<Vec<Entry>>();
    let (permit, permits) = unbounded::<()>();
    let mut task = Script::new(move |b: &[Entry], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        permits.recv_timeout(HANG).expect("no permit");
        if b == [(0, 0)] && o.swap(false, SeqCst) {
            Outcome::RetryEntries(vec![(7, 0), (5, 1)]) // N and M, both new
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let (in_weigher_tx, in_weigher) = unbounded::<()>();
    let wgate = Gate::new();
    let wg = wgate.clone();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(2)
        .overflow_policy(OverflowPolicy::Reject)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(5).backoff(Duration::ZERO, Duration::ZERO))
        .dedup_by_key(|e: &Entry| e.0)
        .weigher(move |e: &Entry| {
            if *e == (5, 1) && a.swap(false, SeqCst) {
                in_weigher_tx.send(()).unwrap();
                wg.wait();
            }
            8
        })
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]);
    books.push_back(&handle, vec![(1, 0)]).unwrap(); // room for one more
    permit.send(()).unwrap(); // (0, 0)'s run returns N and M
    recv(&in_weigher); // N and M are marked; the bound has not looked at them
    books.push_back(&handle, vec![(5, 2)]).unwrap(); // B: admitted
    let b_dropped = reasons
        .try_iter()
        .any(|x| x == ((5, 2), OverflowReason::Duplicate));
    wgate.open(); // the bound takes N, refuses M
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    let key5_ran = ran.iter().any(|b| b.iter().any(|e| e.0 == 5));
    assert!(
        !b_dropped || key5_ran,
        "B = (5, 2) was dropped as the duplicate of M = (5, 1), which the bound then \
         refused; no run of key 5 began after B (ran {ran:?}, then dropped {dropped:?})"
    );
}

/// A key function that panics now and then. A = (3, 99) is admitted without
/// a key (its key panics: `keyless` = 1). D = (7, 1) was admitted with key 7;
/// when a worker takes it, its key panics: the table takes A's `keyless`
/// count for D's and leaves key 7's record (one waiting, owed) in place,
/// though D has left and runs. The doc promises that a key that cannot be
/// computed again when its entry leaves turns de-duplication off; instead
/// E = (7, 2), handed over while D *runs*, is dropped at once as the
/// duplicate of nothing (it should be queued again), and so is every back
/// entry of key 7 until A leaves.
#[test]
fn a_key_that_cannot_be_computed_as_its_entry_leaves_is_not_left_owed() {
    quiet_panics();
    let calls_d = Arc::new(AtomicUsize::new(0));
    let c = calls_d.clone();
    let (task, started, permit, books) = permitted(|_| false);
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(move |e: &Entry| {
            if *e == (3, 99) {
                panic!("deliberate: a malformed entry has no key");
            }
            if *e == (7, 1) && c.fetch_add(1, SeqCst) >= 1 {
                panic!("deliberate: the key could not be computed this time");
            }
            e.0
        })
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(7, 1)]).unwrap(); // D, key 7
    books.push_back(&handle, vec![(3, 99)]).unwrap(); // A, no key
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(7, 1)]); // D runs (its key panicked as it left)
    books.push_back(&handle, vec![(7, 2)]).unwrap(); // E, while D runs
    let early: Vec<_> = reasons.try_iter().collect();
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        early.is_empty(),
        "E = (7, 2), handed over while D = (7, 1) ran, was dropped at once: {early:?} \
         (then ran {ran:?})"
    );
}

/// What a probing key saw when it was dropped: whether the callers' lock was
/// held at that moment (`flush_timeout` could not take it).
struct Probe {
    handle: OnceLock<WeakHandle<Entry>>,
    saw: Sender<bool>,
}

/// A key whose `Eq` panics when either side is poisoned, and whose `Drop`
/// (for probing keys) looks whether the engine's callers' lock is held.
struct ProbeKey {
    id: u32,
    poisoned: bool,
    probe: Option<Arc<Probe>>,
}

impl PartialEq for ProbeKey {
    fn eq(&self, other: &Self) -> bool {
        if self.poisoned || other.poisoned {
            panic!("deliberate: a key's Eq panicked");
        }
        self.id == other.id
    }
}

impl Eq for ProbeKey {}

impl std::hash::Hash for ProbeKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl Drop for ProbeKey {
    fn drop(&mut self) {
        let Some(p) = &self.probe else { return };
        let Some(h) = p.handle.get().and_then(|w| w.upgrade()) else {
            return;
        };
        let held = matches!(
            h.flush_timeout(Duration::from_millis(50)),
            Err(ControlError::Timeout)
        );
        let _ = p.saw.send(held);
    }
}

/// The docs say a key's `Eq` is the only user code run under the engine's
/// locks, and that keys are dropped outside them (a key's `Drop` may call
/// into the engine). When `Eq` panics during a hand-over, the table breaks
/// down and `forget_all` drops every key in it while the hand-over still
/// holds the callers' lock (and the unwinding drops the hand-over's own keys
/// under the table's lock too). A `Drop` that called `buffer` there would
/// deadlock; this one only looks, with `flush_timeout`.
#[test]
fn keys_are_never_dropped_under_the_callers_lock() {
    quiet_panics();
    let (saw_tx, saw) = unbounded();
    let probe = Arc::new(Probe {
        handle: OnceLock::new(),
        saw: saw_tx,
    });
    let p = probe.clone();
    let (task, started, permit, books) = permitted(|_| false);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(move |e: &Entry| ProbeKey {
            id: e.0,
            poisoned: e.1 == 99,
            probe: (*e == (1, 0)).then(|| p.clone()),
        })
        .start()
        .unwrap();
    let _ = probe.handle.set(handle.downgrade());
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.buffer(&handle, vec![(1, 0)], Priority::Back).unwrap(); // its key waits
    books
        .buffer(&handle, vec![(1, 99)], Priority::Back)
        .unwrap(); // Eq panics
    let under_lock = recv(&saw);
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !under_lock,
        "a key's Drop ran while the callers' lock was held (break_down under a hand-over)"
    );
}

/// The same root cause through `init`: `feed` marks an `init` chunk's keys,
/// then weighs it (user code, paused here), then queues it, where a bounded
/// queue under `DropNewest` refuses it (Full). A back hand-over B = (5, 1)
/// buffered in that window is dropped at once as the duplicate of
/// I = (5, 0), which never waited. Kept, B would have waited in the buffer
/// and run once the queue had room.
#[test]
fn a_hand_over_is_not_dropped_as_the_duplicate_of_an_init_entry_the_queue_refuses() {
    let armed_init = Arc::new(AtomicBool::new(false));
    let ai = armed_init.clone();
    let (started_tx, started) = unbounded::<Vec<Entry>>();
    let (permit, permits) = unbounded::<()>();
    let books = Books::<Entry>::new();
    let given = books.clone();
    let task = Script::new(move |b: &[Entry], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        permits.recv_timeout(HANG).expect("no permit");
        Outcome::Ok
    })
    .with_init(move |sink, _: &()| {
        if ai.swap(false, SeqCst) {
            given.given(&[(5, 0)]);
            sink.push((5, 0));
        }
    })
    .with_books(&books);
    let (in_weigher_tx, in_weigher) = unbounded::<()>();
    let wgate = Gate::new();
    let wg = wgate.clone();
    let armed = Arc::new(AtomicBool::new(true));
    let a = armed.clone();
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::DropNewest)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .weigher(move |e: &Entry| {
            if *e == (5, 0) && a.swap(false, SeqCst) {
                in_weigher_tx.send(()).unwrap();
                wg.wait();
            }
            8
        })
        .overflow_handler(handler)
        .start()
        .unwrap();
    wait_until(|| handle.stats().init_runs >= 1); // the first init: nothing
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(1, 0)]).unwrap(); // the queue is full
    armed_init.store(true, SeqCst);
    handle.poll_now().unwrap();
    recv(&in_weigher); // I = (5, 0) is marked, not yet queued
    books.buffer(&handle, vec![(5, 1)], Priority::Back).unwrap(); // B
    let b_dropped = reasons
        .try_iter()
        .any(|x| x == ((5, 1), OverflowReason::Duplicate));
    wgate.open(); // I meets the full queue: Full
    wait_until(|| handle.stats().overflowed_full == 1);
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap(); // flushes the buffer (B, if it was kept)
    let ran: Vec<Vec<Entry>> = started.try_iter().collect();
    let dropped: Vec<_> = reasons.try_iter().collect();
    books.finish(handle.shutdown_drain().unwrap());
    let key5_ran = ran.iter().any(|b| b.iter().any(|e| e.0 == 5));
    assert!(
        !b_dropped || key5_ran,
        "B = (5, 1) was dropped as the duplicate of the init entry (5, 0), which the \
         queue then refused; no run of key 5 began after B (ran {ran:?}, then {dropped:?})"
    );
}

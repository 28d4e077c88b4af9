//! Key de-duplication: a key already waiting takes no second entry; a front
//! entry takes the place of a waiting twin (it runs first, the twin is
//! dropped as its duplicate); a key that is running is queued again; the
//! dropped entries are counted and reported.

mod common;
use buffered_task::{Builder, FlushInterval, Outcome, OverflowReason, Priority};
use common::*;
use crossbeam_channel::{unbounded, Receiver};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Entries are (key, tag); the key is the block number.
type Entry = (u32, u32);

/// An engine with one held worker, batch 1, de-duplicating by key; the
/// duplicates land in the books as overflow.
fn rig(
    held: &Held<Entry>,
    task: Script<Entry, ()>,
) -> (
    buffered_task::Handle<Entry>,
    Receiver<(Vec<Entry>, OverflowReason)>,
) {
    let (tx, reasons) = unbounded();
    let books = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v, r| {
            books.overflowed(&v);
            tx.send((v, r)).unwrap();
        })
        .start()
        .unwrap();
    (handle, reasons)
}

#[test]
fn a_waiting_key_takes_no_second_entry() {
    let (task, held) = held::<Entry>();
    let (handle, reasons) = rig(&held, task);
    let books = &held.books;
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    recv(&held.started); // the worker is busy
    books
        .buffer(&handle, vec![(1, 0), (2, 0), (1, 1)], Priority::Back)
        .unwrap(); // buffered
    books.push_back(&handle, vec![(2, 1)]).unwrap(); // 2 waits in the buffers
    handle.flush().unwrap();
    books.push_back(&handle, vec![(1, 2), (3, 0)]).unwrap(); // 1 waits in the queue
    assert_eq!(
        recv_n(&reasons, 3),
        vec![
            (vec![(1, 1)], OverflowReason::Duplicate),
            (vec![(2, 1)], OverflowReason::Duplicate),
            (vec![(1, 2)], OverflowReason::Duplicate)
        ]
    );
    assert_eq!(handle.stats().deduplicated, 3);
    held.gate.open();
    let ran: Vec<Vec<Entry>> = recv_n(&held.ran, 4);
    assert_eq!(
        ran,
        vec![vec![(0, 0)], vec![(1, 0)], vec![(2, 0)], vec![(3, 0)]]
    );
    books.finish(handle.shutdown_drain().unwrap());
}

/// A front duplicate takes the place of its waiting twin: it is never
/// dropped as it comes in, goes to the front and runs first; the twin, which
/// waited from before that run started, is dropped as its duplicate when the
/// worker reaches it (counted and reported then). A back twin that comes in
/// while both wait is dropped at once.
#[test]
fn a_front_duplicate_moves_the_work_to_the_front() {
    let (task, held) = held::<Entry>();
    let (handle, reasons) = rig(&held, task);
    let books = &held.books;
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    recv(&held.started);
    books
        .push_back(&handle, vec![(1, 0), (2, 0), (3, 0)])
        .unwrap();
    books.push_front(&handle, vec![(3, 1)]).unwrap();
    books.push_back(&handle, vec![(3, 2)]).unwrap(); // (3, 0) and (3, 1) wait
    assert_eq!(
        recv(&reasons),
        (vec![(3, 2)], OverflowReason::Duplicate),
        "dropped at once"
    );
    assert_eq!(handle.stats().deduplicated, 1);
    held.gate.open();
    let ran: Vec<Vec<Entry>> = recv_n(&held.ran, 4);
    assert_eq!(
        ran,
        vec![vec![(0, 0)], vec![(3, 1)], vec![(1, 0)], vec![(2, 0)]]
    );
    handle.wait_idle(HANG).unwrap();
    assert_eq!(
        recv(&reasons),
        (vec![(3, 0)], OverflowReason::Duplicate),
        "the twin is dropped when the worker reaches it"
    );
    assert_empty(&held.ran);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().deduplicated, 2);
}

#[test]
fn a_key_that_is_running_is_queued_again() {
    let (task, held) = held::<Entry>();
    let (handle, _reasons) = rig(&held, task);
    let books = &held.books;
    books.push_back(&handle, vec![(5, 0)]).unwrap();
    recv(&held.started); // (5, 0) runs: it may have read old data
    books.push_back(&handle, vec![(5, 1)]).unwrap();
    books.push_back(&handle, vec![(5, 2)]).unwrap(); // waits behind (5, 1): dropped
    held.gate.open();
    assert_eq!(recv_n(&held.ran, 2), vec![vec![(5, 0)], vec![(5, 1)]]);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().deduplicated, 1);
}

#[test]
fn a_retry_yields_to_a_newer_waiting_entry() {
    let first = Arc::new(AtomicBool::new(true));
    let gate = Gate::new();
    let (g, f) = (gate.clone(), first.clone());
    let (started_tx, started) = unbounded();
    let (ran_tx, ran) = unbounded();
    let mut task = Script::new(move |b: &[Entry], _: &()| {
        started_tx.send(()).unwrap();
        g.wait();
        ran_tx.send(b.to_vec()).unwrap();
        if f.swap(false, Ordering::SeqCst) {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v, _| b.overflowed(&v))
        .start()
        .unwrap();
    books.push_back(&handle, vec![(9, 0)]).unwrap();
    recv(&started);
    books.push_back(&handle, vec![(9, 1)]).unwrap(); // queued: (9, 0) is running
    gate.open();
    // (9, 0) asks for a retry, but (9, 1) waits: the retry is dropped.
    assert_eq!(recv_n(&ran, 2), vec![vec![(9, 0)], vec![(9, 1)]]);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().deduplicated, 1);
}

#[test]
fn a_refused_hand_over_hands_back_every_entry_in_order() {
    let handle = Builder::new(Script::new(|_: &[Entry], _: &()| Outcome::Ok), ())
        .flush_interval(FlushInterval::Never)
        .dedup_by_key(|e: &Entry| e.0)
        .start()
        .unwrap();
    let other = handle.clone();
    handle.shutdown_drain().unwrap();
    let err = other
        .buffer(vec![(1, 0), (1, 1), (2, 0)], Priority::Back)
        .unwrap_err();
    assert_eq!(err.into_entries(), vec![(1, 0), (1, 1), (2, 0)]);
    // And a live engine takes (1, _) again after the refusal.
    let handle = Builder::new(Script::new(|_: &[Entry], _: &()| Outcome::Ok), ())
        .max_queue_len(1)
        .overflow_policy(buffered_task::OverflowPolicy::Reject)
        .flush_interval(FlushInterval::Never)
        .dedup_by_key(|e: &Entry| e.0)
        .start()
        .unwrap();
    let err = handle
        .buffer(vec![(1, 0), (2, 0)], Priority::Back)
        .unwrap_err();
    assert_eq!(err.into_entries(), vec![(1, 0), (2, 0)]);
    handle.buffer(vec![(1, 1)], Priority::Back).unwrap();
    assert_eq!(handle.stats().deduplicated, 0);
    handle.shutdown_drain().unwrap();
}

#[test]
fn a_key_function_that_panics_keeps_the_entry() {
    quiet_panics();
    let mut task = Script::new(|_: &[Entry], _: &()| Outcome::Ok);
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
    books
        .buffer(&handle, vec![(1, 0), (1, 666), (1, 1)], Priority::Back)
        .unwrap();
    // (1, 666) has no key: kept; (1, 1) duplicates (1, 0).
    assert_eq!(handle.stats().buffered, 2);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().processed, 2);
}

/// A refused hand-over hands its duplicates back with the rest: they were not
/// dropped, so `deduplicated` does not count them (after a shutdown, and when
/// the bound refuses).
#[test]
fn a_refused_hand_over_counts_no_duplicates() {
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(2)
        .overflow_policy(buffered_task::OverflowPolicy::Reject)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &u32| *e)
        .start()
        .unwrap();
    handle.push_back(vec![10, 11]).unwrap();
    recv(&held.started); // 10 runs, 11 waits
    handle.push_back(vec![12]).unwrap(); // the queue is full
    match handle.push_back(vec![5, 5]) {
        Err(buffered_task::BufferError::Full(v)) => assert_eq!(v, vec![5, 5]),
        other => panic!("{other:?}"),
    }
    match handle.buffer(vec![6, 6, 7], Priority::Back) {
        Err(buffered_task::BufferError::Full(v)) => assert_eq!(v, vec![6, 6, 7]),
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.stats().deduplicated, 0);
    held.gate.open();
    handle.shutdown_drain().unwrap();
    match handle.buffer(vec![1, 1, 1], Priority::Back) {
        Err(buffered_task::BufferError::Stopped(v)) => assert_eq!(v, vec![1, 1, 1]),
        other => panic!("{other:?}"),
    }
    assert_eq!(handle.stats().deduplicated, 0);
}

/// Once a shutdown has begun, a hand-over whose every key is still waiting is
/// refused with `Stopped` like any other, not taken as a duplicate.
#[test]
fn a_hand_over_of_waiting_keys_during_a_drain_is_refused() {
    let (task, held) = held::<u32>();
    let handle = Arc::new(
        Builder::new(task, ())
            .max_batch_size(1)
            .max_concurrency(1)
            .flush_interval(FlushInterval::Never)
            .poll(false)
            .dedup_by_key(|e: &u32| *e)
            .start()
            .unwrap(),
    );
    handle.push_back(vec![1, 2]).unwrap();
    recv(&held.started); // 1 runs, 2 waits
    let h = handle.clone();
    let drain = std::thread::spawn(move || h.shutdown_drain().map(|r| r.unprocessed.len()));
    wait_until(|| handle.is_stopped());
    let buffered = handle.buffer(vec![2], Priority::Back);
    let pushed = handle.push_back(vec![2]);
    held.gate.open();
    assert_eq!(drain.join().unwrap().unwrap(), 0);
    assert!(
        matches!(&buffered, Err(buffered_task::BufferError::Stopped(v)) if v == &[2]),
        "{buffered:?}"
    );
    assert!(
        matches!(&pushed, Err(buffered_task::BufferError::Stopped(v)) if v == &[2]),
        "{pushed:?}"
    );
    assert_eq!(handle.stats().deduplicated, 0);
}

static HASH_PANICS: AtomicBool = AtomicBool::new(false);

/// A key whose `Hash` panics while `HASH_PANICS` is set (key 2 only).
#[derive(PartialEq, Eq)]
struct Touchy(u32);
impl std::hash::Hash for Touchy {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        if self.0 == 2 && HASH_PANICS.load(Ordering::SeqCst) {
            panic!("deliberate hash panic");
        }
        self.0.hash(h)
    }
}

/// A key whose `Hash` panics on the way in (user code, run outside the
/// table's lock) keeps its entry, as if it had no key; nothing panics out and
/// de-duplication goes on for the other keys.
#[test]
fn a_key_hash_that_panics_on_the_way_in_keeps_the_entry() {
    quiet_panics();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok);
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v, _| b.overflowed(&v))
        .dedup_by_key(|e: &u32| Touchy(*e))
        .start()
        .unwrap();
    HASH_PANICS.store(true, Ordering::SeqCst);
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap();
    HASH_PANICS.store(false, Ordering::SeqCst);
    books
        .buffer(&handle, vec![1, 3, 3], Priority::Back)
        .unwrap();
    assert_eq!(handle.stats().deduplicated, 2, "the second 1 and 3");
    handle.wait_idle(HANG).unwrap();
    assert!(!handle.is_stopped());
    assert_eq!(handle.stats().processed, 3);
    books.finish(handle.shutdown_drain().unwrap());
}

static EQ_PANICS: AtomicBool = AtomicBool::new(false);

/// A key whose `Eq` panics while `EQ_PANICS` is set.
struct Prickly(u32);
impl std::hash::Hash for Prickly {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.0.hash(h)
    }
}
impl PartialEq for Prickly {
    fn eq(&self, other: &Self) -> bool {
        if EQ_PANICS.load(Ordering::SeqCst) {
            panic!("deliberate eq panic");
        }
        self.0 == other.0
    }
}
impl Eq for Prickly {}

/// A key whose `Eq` panics (under the table's lock) is contained: the table
/// is emptied and de-duplication is off from then on; no entry is lost or
/// wrongly dropped, and the engine runs on.
#[test]
fn a_key_eq_that_panics_turns_dedup_off_and_loses_nothing() {
    quiet_panics();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok);
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v, _| b.overflowed(&v))
        .dedup_by_key(|e: &u32| Prickly(*e))
        .start()
        .unwrap();
    books.buffer(&handle, vec![1], Priority::Back).unwrap();
    EQ_PANICS.store(true, Ordering::SeqCst);
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap(); // Eq of 1 panics
    EQ_PANICS.store(false, Ordering::SeqCst);
    books.buffer(&handle, vec![2], Priority::Back).unwrap(); // no table: kept
    handle.wait_idle(HANG).unwrap();
    assert!(!handle.is_stopped());
    let stats = handle.stats();
    assert_eq!((stats.processed, stats.deduplicated), (4, 0));
    books.finish(handle.shutdown_drain().unwrap());
}

/// The same panic on a worker (as it takes the batch) stops nothing either.
#[test]
fn a_key_hash_that_panics_on_a_worker_stops_nothing() {
    quiet_panics();
    static ON_WORKER: AtomicBool = AtomicBool::new(false);
    #[derive(PartialEq, Eq)]
    struct WorkerTouchy(u32);
    impl std::hash::Hash for WorkerTouchy {
        fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
            let worker = buffered_task::worker_index().is_some();
            if worker && ON_WORKER.load(Ordering::SeqCst) {
                panic!("deliberate hash panic on a worker");
            }
            self.0.hash(h)
        }
    }
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok);
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &u32| WorkerTouchy(*e))
        .start()
        .unwrap();
    ON_WORKER.store(true, Ordering::SeqCst);
    books.push_back(&handle, vec![7, 8]).unwrap();
    handle.wait_idle(HANG).unwrap();
    ON_WORKER.store(false, Ordering::SeqCst);
    assert!(!handle.is_stopped(), "the engine stopped");
    books.push_back(&handle, vec![7]).unwrap();
    let report = books.finish(handle.shutdown_drain().unwrap());
    assert!(report.unprocessed.is_empty());
    assert_eq!(handle.stats().processed, 3);
}

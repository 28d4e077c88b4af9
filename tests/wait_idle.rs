//! `wait_idle`: waits until every entry handed over before the call has left
//! the engine, and no longer (OpenTelemetry's `force_flush`).

mod common;
use buffered_task::{
    Builder, FlushInterval, IdleError, ManualClock, Outcome, Priority, RetryPolicy, WeakHandle,
};
use common::*;
use crossbeam_channel::unbounded;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Entries below 100 wait at `early`, the others at `late`.
fn two_gates() -> (
    Script<u32, ()>,
    Gate,
    Gate,
    crossbeam_channel::Receiver<Vec<u32>>,
) {
    let (early, late) = (Gate::new(), Gate::new());
    let (e, l) = (early.clone(), late.clone());
    let (tx, started) = unbounded();
    let task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        if b[0] < 100 {
            e.wait()
        } else {
            l.wait()
        }
        Outcome::Ok
    });
    (task, early, late, started)
}

#[test]
fn it_waits_for_what_came_before_and_not_for_what_came_after() {
    let (mut task, early, late, started) = two_gates();
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2]).unwrap();
    assert_eq!(recv(&started), vec![1, 2]); // running, held
    books.buffer(&handle, vec![3], Priority::Back).unwrap(); // buffered
    let waiter = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.wait_idle(Duration::MAX))
    };
    wait_until(|| handle.stats().buffered == 0); // the call flushed [3]
    assert_eq!(recv(&started), vec![3]);
    books.push_back(&handle, vec![100]).unwrap(); // after the call
    early.open();
    assert_eq!(recv(&started), vec![100]); // held at the late gate
                                           // [1, 2] and [3] are done; [100] still runs, and is not waited for.
    assert_eq!(waiter.join().unwrap(), Ok(()));
    assert_eq!(handle.debug_count().unwrap().running, 1);
    late.open();
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn a_timeout_says_how_many_are_left() {
    let clock = ManualClock::new();
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![1, 2]).unwrap();
    recv(&held.started);
    held.books.push_back(&handle, vec![3, 4, 5]).unwrap();
    let waiter = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.wait_idle(Duration::from_secs(5)))
    };
    wait_until(|| handle.stats().queued == 3);
    // The waiter may not have started its wait yet: advance until it gives up.
    while !waiter.is_finished() {
        clock.advance(Duration::from_secs(5));
        std::thread::yield_now();
    }
    assert_eq!(waiter.join().unwrap(), Err(IdleError::Timeout { left: 5 }));
    held.gate.open();
    assert_eq!(handle.wait_idle(Duration::MAX), Ok(()));
    held.books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn retries_of_earlier_entries_are_waited_for() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let mut task = Script::new(move |_: &[u32], _: &()| {
        if c.fetch_add(1, Ordering::SeqCst) < 2 {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(5).backoff(Duration::from_secs(1), Duration::from_secs(1)))
        .clock(&clock)
        .start()
        .unwrap();
    books.push_back(&handle, vec![7]).unwrap();
    let waiter = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.wait_idle(Duration::MAX))
    };
    for retried in 1..=2 {
        wait_until(|| handle.stats().retried == retried);
        assert!(!waiter.is_finished());
        clock.advance(Duration::from_secs(1)); // the backoff passes
    }
    assert_eq!(waiter.join().unwrap(), Ok(()));
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn from_inside_a_run_it_fails_at_once_and_after_a_stop_it_returns() {
    let slot: Arc<Mutex<Option<WeakHandle<u32>>>> = Default::default();
    let (tx, answers) = unbounded();
    let s = slot.clone();
    let task = Script::new(move |_: &[u32], _: &()| {
        let handle = s.lock().as_ref().and_then(WeakHandle::upgrade).unwrap();
        tx.send(handle.wait_idle(Duration::MAX)).unwrap();
        Outcome::Ok
    });
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    *slot.lock() = Some(handle.downgrade());
    handle.push_back(vec![1]).unwrap();
    assert_eq!(recv(&answers), Err(IdleError::WouldDeadlock));
    handle.shutdown_drain().unwrap();
    assert_eq!(handle.wait_idle(Duration::MAX), Ok(()));
}

/// Dead-lettered entries have left the engine only when their handler has
/// them: `wait_idle` waits for the handler to return.
#[test]
fn wait_idle_waits_for_the_dead_letter_handler() {
    let gate = Gate::new();
    let g = gate.clone();
    let (entered_tx, entered) = unbounded();
    let (got_tx, got) = unbounded::<Vec<u32>>();
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Retry), ())
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(1))
        .dead_letter_handler(move |v: Vec<u32>, _| {
            entered_tx.send(()).unwrap();
            g.wait();
            got_tx.send(v).unwrap();
        })
        .start()
        .unwrap();
    handle.buffer(vec![1, 2, 3], Priority::Back).unwrap();
    handle.flush().unwrap();
    recv(&entered);
    assert_eq!(
        handle.wait_idle(Duration::ZERO),
        Err(IdleError::Timeout { left: 3 })
    );
    gate.open();
    handle.wait_idle(HANG).unwrap();
    assert_eq!(got.try_recv().ok(), Some(vec![1, 2, 3]));
    handle.shutdown_drain().unwrap();
}

/// Overflow taken out of the queue by a shrink has left the engine only when
/// its handler has it: `wait_idle` waits for the handler to return.
#[test]
fn wait_idle_waits_for_a_shrinks_overflow_handler() {
    let (task, held) = held::<u32>();
    let gate = Gate::new();
    let g = gate.clone();
    let (entered_tx, entered) = unbounded();
    let b = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v: Vec<u32>, _| {
            entered_tx.send(v.clone()).unwrap();
            g.wait();
            b.overflowed(&v);
        })
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![0]).unwrap();
    recv(&held.started);
    held.books.push_back(&handle, vec![1, 2, 3, 4]).unwrap();
    let h = handle.clone();
    let shrinker = std::thread::spawn(move || h.shrink().unwrap());
    assert_eq!(recv(&entered), vec![3, 4]); // in the handler
    held.gate.open();
    wait_until(|| handle.stats().processed == 3);
    assert_eq!(
        handle.wait_idle(Duration::ZERO),
        Err(IdleError::Timeout { left: 2 })
    );
    gate.open();
    shrinker.join().unwrap();
    handle.wait_idle(HANG).unwrap();
    held.books.finish(handle.shutdown_drain().unwrap());
}

/// `wait_idle` from inside an overflow handler, on a caller's thread (its
/// flush overflowed), would wait for itself: it fails at once.
#[test]
fn wait_idle_inside_an_overflow_handler_fails_at_once() {
    let (task, held) = held::<u32>();
    let slot: Arc<Mutex<Option<WeakHandle<u32>>>> = Default::default();
    let s = slot.clone();
    let (said_tx, said) = unbounded();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |_: Vec<u32>, _| {
            let weak = s.lock().clone();
            if let Some(handle) = weak.and_then(|w| w.upgrade()) {
                said_tx.send(handle.wait_idle(HANG)).unwrap();
            }
        })
        .start()
        .unwrap();
    *slot.lock() = Some(handle.downgrade());
    handle.push_back(vec![0]).unwrap();
    recv(&held.started);
    handle.buffer(vec![1, 2], Priority::Back).unwrap();
    handle.flush().unwrap(); // 2 does not fit: this thread runs the handler
    assert_eq!(recv(&said), Err(IdleError::WouldDeadlock));
    held.gate.open();
    handle.shutdown_drain().unwrap();
}

/// The overflow handler of a hand-over made after the call does not hold
/// `wait_idle` back (nor count in `Timeout::left`).
#[test]
fn wait_idle_does_not_wait_for_a_later_hand_overs_handler() {
    let (task, held) = held::<u32>();
    let gate2 = Gate::new();
    let g2 = gate2.clone();
    let (entered_tx, entered) = unbounded();
    let b = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v: Vec<u32>, _| {
            b.overflowed(&v);
            entered_tx.send(v.clone()).unwrap();
            g2.wait();
        })
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![0]).unwrap();
    recv(&held.started); // 0 runs (held)
    held.books.buffer(&handle, vec![1], Priority::Back).unwrap(); // buffered
    let h = handle.clone();
    let (res_tx, res) = unbounded();
    let waiter = std::thread::spawn(move || {
        res_tx.send(h.wait_idle(Duration::from_secs(3))).unwrap();
    });
    // wait_idle has flushed its generation into the queue: it is waiting now.
    wait_until(|| handle.stats().buffered == 0);
    // A LATER hand-over overflows (queue full); its handler blocks.
    let h = handle.clone();
    let books = held.books.clone();
    let later = std::thread::spawn(move || books.push_back(&h, vec![2]).unwrap());
    assert_eq!(recv(&entered), vec![2]);
    held.gate.open(); // 0 and 1 (the call's generation) run and finish
    let got = recv(&res);
    gate2.open();
    later.join().unwrap();
    waiter.join().unwrap();
    handle.wait_idle(HANG).unwrap();
    held.books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(
        got,
        Ok(()),
        "wait_idle held back by a later generation's handler"
    );
}

/// A failed run's overflow, on its way to the handler, counts once in
/// `Timeout::left` (its worker's reporting slot holds it).
#[test]
fn timeout_left_counts_a_failed_runs_overflow_once() {
    let once = Arc::new(AtomicBool::new(false));
    let o = once.clone();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        if b == [0] && !o.swap(true, Ordering::SeqCst) {
            // own: [0] (requeued), new: 101, 102, 103
            Outcome::RetryEntries(vec![0, 101, 102, 103])
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let gate = Gate::new();
    let g = gate.clone();
    let (entered_tx, entered) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v: Vec<u32>, _| {
            b.overflowed(&v);
            entered_tx.send(v.clone()).unwrap();
            g.wait();
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![0]).unwrap();
    assert_eq!(recv(&entered), vec![101, 102, 103]); // worker in the handler
    let got = handle.wait_idle(Duration::ZERO);
    gate.open();
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    // queued: [0] (1); in the handler: 3. Anything above 4 is double counting.
    assert_eq!(got, Err(IdleError::Timeout { left: 4 }));
}

/// Engine A's overflow handler hands over to engine B, whose overflow
/// handler (same thread) calls A.wait_idle: A's handler is still running on
/// this thread, so it fails with WouldDeadlock rather than wait for itself.
#[test]
fn wait_idle_inside_nested_handlers_of_two_engines_fails_at_once() {
    let (task_b, held_b) = held::<u32>();
    let slot_b: Arc<parking_lot::Mutex<Option<buffered_task::Handle<u32>>>> = Default::default();
    let slot_a: Arc<parking_lot::Mutex<Option<buffered_task::WeakHandle<u32>>>> =
        Default::default();
    let (said_tx, said) = unbounded();
    let sa = slot_a.clone();
    let b = Builder::new(task_b, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |_: Vec<u32>, _| {
            let a = sa.lock().clone().and_then(|w| w.upgrade());
            if let Some(a) = a {
                said_tx.send(a.wait_idle(Duration::from_secs(3))).unwrap();
            }
        })
        .start()
        .unwrap();
    b.push_back(vec![0]).unwrap();
    recv(&held_b.started);
    b.push_back(vec![1]).unwrap(); // B's queue full
    *slot_b.lock() = Some(b.clone());
    let (task_a, held_a) = held::<u32>();
    let sb = slot_b.clone();
    let a = Builder::new(task_a, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v: Vec<u32>, _| {
            let b = sb.lock().clone();
            if let Some(b) = b {
                let _ = b.push_back(v); // overflows in B: B's handler here
            }
        })
        .start()
        .unwrap();
    *slot_a.lock() = Some(a.downgrade());
    a.push_back(vec![10]).unwrap();
    recv(&held_a.started);
    a.push_back(vec![11]).unwrap();
    a.push_back(vec![12]).unwrap(); // overflows in A -> A's handler -> B
    let got = recv(&said);
    held_a.gate.open();
    held_b.gate.open();
    a.shutdown_drain().unwrap();
    slot_b.lock().take();
    b.shutdown_drain().unwrap();
    assert_eq!(got, Err(IdleError::WouldDeadlock));
}

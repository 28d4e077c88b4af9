//! `wait_idle`: waits until every entry handed over before the call has left
//! the engine, and no longer (OpenTelemetry's `force_flush`).

mod common;
use buffered_task::{
    Builder, FlushInterval, IdleError, ManualClock, Outcome, Priority, RetryPolicy, WeakHandle,
};
use common::*;
use crossbeam_channel::unbounded;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
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

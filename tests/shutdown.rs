//! Stopping: drain, hand back, drop; calls after shutdown hand entries back (SPEC §9).

mod common;
use buffered_task::{
    BufferError, Builder, ControlError, FlushInterval, Outcome, OverflowReason, Priority,
    ShrinkError,
};
use common::*;
use crossbeam_channel::unbounded;
use std::time::Duration;

fn ok_task() -> Script<u32, ()> {
    Script::new(|_: &[u32], _: &()| Outcome::Ok)
}

#[test]
fn every_call_after_shutdown_hands_the_entries_back() {
    let mut task = ok_task();
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .start()
        .unwrap();
    let other = handle.clone();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(other.is_stopped());

    match books.buffer(&other, vec![1, 2, 3], Priority::Back) {
        Err(BufferError::Stopped(v)) => assert_eq!(v, vec![1, 2, 3]),
        r => panic!("{r:?}"),
    }
    assert_eq!(
        books
            .buffer_one(&other, 4, Priority::Front)
            .unwrap_err()
            .into_entries(),
        vec![4]
    );
    assert_eq!(
        other
            .buffer_timeout(vec![5], Priority::Back, Duration::from_secs(1))
            .unwrap_err()
            .into_entries(),
        vec![5]
    );
    assert_eq!(
        books.push_back(&other, vec![6]).unwrap_err().into_entries(),
        vec![6]
    );
    assert_eq!(
        books
            .push_front(&other, vec![7])
            .unwrap_err()
            .into_entries(),
        vec![7]
    );
    assert_eq!(other.flush(), Err(ControlError::Stopped));
    assert_eq!(other.debug_count().unwrap_err(), ControlError::Stopped);
    assert_eq!(other.shrink(), Err(ShrinkError::Stopped));
    assert_eq!(other.expand(), Err(ControlError::Stopped));
    assert_eq!(other.is_shrunk(), Err(ControlError::Stopped));
    assert_eq!(other.shutdown_drain().unwrap_err(), ControlError::Stopped);
    assert_eq!(other.shutdown_return().unwrap_err(), ControlError::Stopped);
    // An empty call is still a no-op.
    assert!(books.buffer(&other, vec![], Priority::Back).is_ok());
    books.check();
}

#[test]
fn shutdown_drain_runs_everything_left() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(7)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books
        .buffer(&handle, (0..50).collect(), Priority::Back)
        .unwrap();
    books.push_back(&handle, (50..100).collect()).unwrap();
    books
        .buffer(&handle, (100..120).collect(), Priority::Front)
        .unwrap();
    let report = books.finish(handle.shutdown_drain().unwrap());
    assert!(report.unprocessed.is_empty());
    let mut ran: Vec<u32> = rx.try_iter().flatten().collect();
    ran.sort();
    assert_eq!(ran, (0..120).collect::<Vec<_>>());
}

#[test]
fn shutdown_return_hands_back_exactly_the_unprocessed_entries_in_order() {
    let (
        task,
        Held {
            gate,
            started,
            ran: rx,
            books,
        },
    ) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![0, 1]).unwrap(); // running, held
    recv(&started);
    books.push_back(&handle, vec![2, 3, 4]).unwrap(); // queued
    books.buffer(&handle, vec![5, 6], Priority::Back).unwrap(); // buffered
    books.buffer(&handle, vec![9], Priority::Front).unwrap(); // buffered, front
    assert_eq!(handle.debug_count().unwrap().running, 1);

    let stopper = {
        let handle = handle.clone();
        {
            let books = books.clone();
            std::thread::spawn(move || books.finish(handle.shutdown_return().unwrap()))
        }
    };
    // Once the shutdown has begun no new batch starts; let the held one finish.
    wait_until(|| handle.is_stopped());
    // Commands are handled in order: this answer comes after the shutdown's.
    handle.debug_count().unwrap();
    gate.open();
    let report = stopper.join().unwrap();
    assert_eq!(report.unprocessed, vec![9, 2, 3, 4, 5, 6]);
    assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![vec![0, 1]]);
}

#[test]
fn shutdown_return_keeps_retries_of_running_batches() {
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        Outcome::RetryEntries(b.iter().map(|v| v + 100).collect())
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2, 3]).unwrap();
    recv(&started);
    let stopper = {
        let handle = handle.clone();
        {
            let books = books.clone();
            std::thread::spawn(move || books.finish(handle.shutdown_return().unwrap()))
        }
    };
    wait_until(|| handle.is_stopped());
    handle.debug_count().unwrap(); // answered after the shutdown command
    gate.open();
    let report = stopper.join().unwrap();
    assert_eq!(report.unprocessed, vec![3, 101, 102]);
}

#[test]
fn dropping_the_last_handle_loses_nothing_silently() {
    let gate = Gate::new();
    let held = gate.clone();
    let (ran_tx, ran) = unbounded();
    let (of_tx, overflow) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        held.wait();
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler({
            let b = books.clone();
            move |entries, reason| {
                b.overflowed(&entries);
                of_tx.send((entries, reason)).unwrap()
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![0, 1]).unwrap();
    books.push_back(&handle, vec![2, 3, 4]).unwrap();
    books.buffer(&handle, vec![5], Priority::Back).unwrap();
    let weak = handle.downgrade();
    let dropper = std::thread::spawn(move || drop(handle));
    // Not `upgrade().is_none()`: a handle upgraded at the moment the dropper
    // drops its own is the last one, and its drop stops the engine here,
    // waiting for the run the gate holds.
    wait_until(|| weak.is_stopped());
    gate.open();
    dropper.join().unwrap();

    let mut accounted: Vec<u32> = ran.try_iter().flatten().collect();
    for (entries, reason) in overflow.try_iter() {
        assert_eq!(reason, OverflowReason::Shutdown);
        accounted.extend(entries);
    }
    accounted.sort();
    assert_eq!(accounted, vec![0, 1, 2, 3, 4, 5]);
    books.check();
}

#[test]
fn dropping_an_idle_engine_joins_its_threads() {
    let (tx, rx) = unbounded::<()>();
    struct Guarded(crossbeam_channel::Sender<()>);
    let guard = Guarded(tx);
    let task = Script::new(move |_: &[u32], _: &()| {
        let _ = guard.0.is_empty();
        Outcome::Ok
    });
    let handle = Builder::new(task, ()).start().unwrap();
    drop(handle);
    // Every thread holding the task was joined in the drop, so the task (and
    // its sender) is gone already.
    assert_eq!(
        rx.try_recv(),
        Err(crossbeam_channel::TryRecvError::Disconnected)
    );
}

/// Once `shutdown_return` has begun, the buffers stay where they are for its
/// report: a flush meanwhile (or the tick, or a free worker under natural
/// batching) does not move them into the queue, where the bound would send
/// the excess to the overflow handler instead.
#[test]
fn shutdown_return_hands_back_buffers_that_a_flush_meanwhile_would_move() {
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![0]).unwrap();
    recv(&held.started); // 0 runs, held
    held.books
        .buffer(&handle, vec![1, 2, 3], Priority::Back)
        .unwrap();
    let h = handle.clone();
    let stopping = std::thread::spawn(move || h.shutdown_return().unwrap());
    wait_until(|| handle.is_stopped());
    let _ = handle.flush();
    held.gate.open();
    let report = held.books.finish(stopping.join().unwrap());
    assert_eq!(report.unprocessed, vec![1, 2, 3]);
    assert_eq!(handle.stats().overflowed_full, 0);
}

/// A weak handle tells whether the engine stopped without keeping it alive:
/// after a shutdown (the handle still held), and after the last handle went.
#[test]
fn a_weak_handle_sees_the_engine_stop() {
    let build = || {
        Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
            .poll(false)
            .start()
            .unwrap()
    };
    let handle = build();
    let weak = handle.downgrade();
    assert!(!weak.is_stopped());
    handle.shutdown_return().unwrap();
    assert!(weak.is_stopped(), "shut down, handle still held");
    assert!(weak.upgrade().is_some());
    drop(handle);
    assert!(weak.is_stopped() && weak.upgrade().is_none());
    let handle = build();
    let weak = handle.downgrade();
    drop(handle);
    assert!(weak.is_stopped(), "the last handle went");
}

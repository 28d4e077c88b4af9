//! The bounded queue: overflow reported exactly, shrink, expand (SPEC §6).

mod common;
use buffered_task::{
    Builder, FlushInterval, Handle, Outcome, OverflowReason, Priority, ShrinkError,
};
use common::*;
use crossbeam_channel::{unbounded, Receiver};

struct Rig {
    handle: Handle<u32>,
    books: std::sync::Arc<Books<u32>>,
    gate: Gate,
    started: Receiver<()>,
    ran: Receiver<Vec<u32>>,
    overflow: Receiver<(Vec<u32>, OverflowReason)>,
}

/// One worker held at a gate, batch 1, an overflow handler that reports to a channel.
fn rig(max_queue_len: Option<usize>) -> Rig {
    let gate = Gate::new();
    let held = gate.clone();
    let (ran_tx, ran) = unbounded();
    let (of_tx, overflow) = unbounded();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let b = books.clone();
    let mut builder = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |entries, reason| {
            b.overflowed(&entries);
            of_tx.send((entries, reason)).unwrap()
        });
    if let Some(n) = max_queue_len {
        builder = builder.max_queue_len(n);
    }
    Rig {
        handle: builder.start().unwrap(),
        books,
        gate,
        started,
        ran,
        overflow,
    }
}

#[test]
fn overflow_reaches_the_handler_with_the_exact_entries() {
    let rig = rig(Some(3));
    rig.books.push_back(&rig.handle, vec![0]).unwrap(); // taken by the held worker
    recv(&rig.started);
    rig.books
        .push_back(&rig.handle, vec![1, 2, 3, 4, 5])
        .unwrap();
    assert_eq!(recv(&rig.overflow), (vec![4, 5], OverflowReason::Full));
    rig.books
        .buffer(&rig.handle, vec![6], Priority::Front)
        .unwrap();
    rig.handle.flush().unwrap();
    assert_eq!(recv(&rig.overflow), (vec![6], OverflowReason::Full));
    assert_eq!(rig.handle.debug_count().unwrap().waiting, 3);
    rig.gate.open();
    let ran: Vec<u32> = recv_n(&rig.ran, 4).into_iter().flatten().collect();
    assert_eq!(ran, vec![0, 1, 2, 3]);
    let report = rig.books.finish(rig.handle.shutdown_drain().unwrap());
    assert_eq!(report.overflowed, 3);
    assert_empty(&rig.overflow);
}

#[test]
fn shrink_with_zero_or_one_entry_fails_with_minimum_size() {
    let rig = rig(None);
    assert_eq!(rig.handle.shrink(), Err(ShrinkError::MinimumSize));
    rig.books.push_back(&rig.handle, vec![0]).unwrap(); // running, not queued
    recv(&rig.started);
    rig.books.push_back(&rig.handle, vec![1]).unwrap();
    assert_eq!(rig.handle.shrink(), Err(ShrinkError::MinimumSize));
    assert!(!rig.handle.is_shrunk().unwrap());
    rig.gate.open();
    rig.books.finish(rig.handle.shutdown_drain().unwrap());
    assert_empty(&rig.overflow);
}

#[test]
fn shrink_halves_the_queue_and_sets_the_bound_and_expand_lifts_it() {
    let rig = rig(None);
    rig.books.push_back(&rig.handle, vec![0]).unwrap();
    recv(&rig.started);
    rig.books
        .push_back(&rig.handle, vec![1, 2, 3, 4, 5])
        .unwrap();
    rig.handle.shrink().unwrap();
    assert!(rig.handle.is_shrunk().unwrap());
    // 5 / 2 = 2 kept; the back three shed.
    assert_eq!(recv(&rig.overflow), (vec![3, 4, 5], OverflowReason::Shrink));
    assert_eq!(rig.handle.debug_count().unwrap().waiting, 2);
    // The bound is now 2.
    rig.books.push_back(&rig.handle, vec![6]).unwrap();
    assert_eq!(recv(&rig.overflow), (vec![6], OverflowReason::Full));
    // Expand: unbounded again.
    rig.handle.expand().unwrap();
    assert!(!rig.handle.is_shrunk().unwrap());
    rig.books.push_back(&rig.handle, vec![7, 8, 9]).unwrap();
    assert_eq!(rig.handle.debug_count().unwrap().waiting, 5);
    rig.gate.open();
    let ran: Vec<u32> = recv_n(&rig.ran, 6).into_iter().flatten().collect();
    assert_eq!(ran, vec![0, 1, 2, 7, 8, 9]);
    rig.books.finish(rig.handle.shutdown_drain().unwrap());
    assert_empty(&rig.overflow);
}

#[test]
fn expand_returns_to_the_configured_bound() {
    let rig = rig(Some(4));
    rig.books.push_back(&rig.handle, vec![0]).unwrap();
    recv(&rig.started);
    rig.books.push_back(&rig.handle, vec![1, 2, 3, 4]).unwrap();
    rig.handle.shrink().unwrap();
    assert_eq!(recv(&rig.overflow), (vec![3, 4], OverflowReason::Shrink));
    rig.handle.expand().unwrap();
    rig.books.push_back(&rig.handle, vec![5, 6, 7]).unwrap();
    assert_eq!(recv(&rig.overflow), (vec![7], OverflowReason::Full));
    rig.gate.open();
    rig.books.finish(rig.handle.shutdown_drain().unwrap());
}

#[test]
fn a_panicking_overflow_handler_is_contained() {
    quiet_panics();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok);
    let books = task.books();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .max_queue_len(1)
        .max_concurrency(1)
        .overflow_handler(move |e, _| {
            b.overflowed(&e); // recorded, then the handler fails
            panic!("deliberate: handler")
        })
        .start()
        .unwrap();
    books
        .buffer(&handle, vec![1, 2, 3], Priority::Back)
        .unwrap();
    handle.flush().unwrap();
    // The engine lives on.
    wait_until(|| handle.debug_count().unwrap().waiting == 0);
    let report = books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(report.overflowed, 2);
}

#[test]
fn a_panicking_weigher_is_contained() {
    quiet_panics();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok);
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .weigher(|_| panic!("deliberate: weigher"))
        .start()
        .unwrap();
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap();
    handle.flush().unwrap();
    // Weighing fails (logged); the size part of the answer still comes back.
    assert!(handle.memory_usage().is_ok());
    books.finish(handle.shutdown_drain().unwrap());
}

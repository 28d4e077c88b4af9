//! Overflow policies for a bounded queue: drop-newest (the default, tested in
//! `bounded.rs`), reject, and block.

mod common;
use buffered_task::{
    BufferError, Builder, FlushInterval, Handle, Outcome, OverflowPolicy, Priority,
};
use common::*;
use crossbeam_channel::{unbounded, Receiver};
use std::sync::Arc;
use std::time::Duration;

struct Rig {
    handle: Handle<u64>,
    gate: Gate,
    ledger: Arc<Ledger>,
    started: Receiver<()>,
}

/// One worker held at a gate, batch 1, bound `max`, every entry into the ledger.
fn rig(policy: OverflowPolicy, max: usize, flush: FlushInterval) -> Rig {
    let gate = Gate::new();
    let held = gate.clone();
    let ledger = Arc::new(Ledger::default());
    let (l, o) = (ledger.clone(), ledger.clone());
    let (started_tx, started) = unbounded();
    let handle = Builder::new(
        Script::new(move |b: &[u64], _: &()| {
            let _ = started_tx.send(());
            held.wait();
            l.processed(b);
            Outcome::Ok
        }),
        (),
    )
    .max_batch_size(1)
    .max_concurrency(1)
    .max_queue_len(max)
    .overflow_policy(policy)
    .flush_interval(flush)
    .poll(false)
    .overflow_handler(move |e, _| o.overflowed(&e))
    .start()
    .unwrap();
    Rig {
        handle,
        gate,
        ledger,
        started,
    }
}

impl Rig {
    fn give(&self, ids: Vec<u64>) -> Result<(), BufferError<u64>> {
        self.ledger.given(&ids);
        let r = self.handle.buffer(ids, Priority::Back);
        if let Err(e) = &r {
            let back: Vec<u64> = match e {
                BufferError::Full(v) | BufferError::Timeout(v) | BufferError::Stopped(v) => {
                    v.clone()
                }
                _ => unreachable!(),
            };
            self.ledger.handed_back(&back);
        }
        r
    }
}

#[test]
fn reject_fails_fast_and_hands_the_entries_back() {
    let rig = rig(OverflowPolicy::Reject, 3, FlushInterval::Never);
    rig.give(vec![0]).unwrap();
    rig.handle.flush().unwrap();
    recv(&rig.started); // [0] runs, held
    rig.give(vec![1, 2, 3]).unwrap(); // exactly the bound
    match rig.give(vec![4]) {
        Err(BufferError::Full(v)) => assert_eq!(v, vec![4]),
        r => panic!("{r:?}"),
    }
    rig.handle.flush().unwrap();
    assert!(matches!(rig.give(vec![5]), Err(BufferError::Full(_))));
    // More than the bound can never fit.
    assert!(matches!(
        rig.give(vec![6, 7, 8, 9]),
        Err(BufferError::Full(_))
    ));
    assert!(matches!(
        rig.handle.push_back(vec![10]),
        Err(BufferError::Full(v)) if v == vec![10]
    ));
    rig.gate.open();
    rig.handle.shutdown_drain().unwrap();
    let (given, processed, back, over) = rig.ledger.check();
    assert_eq!((given, processed, back, over), (10, 4, 6, 0));
}

#[test]
fn block_waits_for_room_and_loses_nothing() {
    let rig = Arc::new(rig(
        OverflowPolicy::Block,
        2,
        FlushInterval::Every(Duration::from_millis(1)),
    ));
    rig.give(vec![0]).unwrap();
    recv(&rig.started); // [0] runs, held
    let (acked_tx, acked) = unbounded();
    let producer = {
        let rig = rig.clone();
        std::thread::spawn(move || {
            for id in 1..=10 {
                rig.give(vec![id]).unwrap();
                acked_tx.send(id).unwrap();
            }
        })
    };
    assert_eq!(recv_n(&acked, 2), vec![1, 2]);
    // The queue is at its bound: the third hand-over waits for room.
    wait_until(|| rig.handle.stats().blocked_callers == 1);
    assert!(acked.try_recv().is_err());
    assert_eq!(rig.handle.debug_count().unwrap().waiting, 2);
    // A timed hand-over gives up and hands its entries back.
    rig.ledger.given(&[100]);
    match rig
        .handle
        .buffer_timeout(vec![100], Priority::Back, Duration::from_millis(5))
    {
        Err(BufferError::Timeout(v)) => rig.ledger.handed_back(&v),
        r => panic!("{r:?}"),
    }
    assert!(acked.try_recv().is_err());
    rig.gate.open();
    producer.join().unwrap();
    assert_eq!(acked.try_iter().count(), 8);
    rig.handle.shutdown_drain().unwrap();
    let (given, processed, back, over) = rig.ledger.check();
    assert_eq!((given, processed, back, over), (12, 11, 1, 0));
}

#[test]
fn a_shutdown_wakes_blocked_callers_with_their_entries() {
    let rig = Arc::new(rig(OverflowPolicy::Block, 1, FlushInterval::Never));
    rig.give(vec![0]).unwrap();
    rig.handle.flush().unwrap();
    recv(&rig.started);
    rig.give(vec![1]).unwrap();
    let blocked = {
        let rig = rig.clone();
        std::thread::spawn(move || rig.give(vec![2]))
    };
    let stopper = {
        let rig = rig.clone();
        std::thread::spawn(move || rig.handle.shutdown_return().unwrap())
    };
    match blocked.join().unwrap() {
        Err(BufferError::Stopped(v)) => assert_eq!(v, vec![2]),
        r => panic!("{r:?}"),
    }
    rig.gate.open();
    let report = stopper.join().unwrap();
    rig.ledger.handed_back(&report.unprocessed);
    let (given, ..) = rig.ledger.check();
    assert_eq!(given, 3);
}

#[test]
fn block_makes_init_wait_so_a_large_source_never_overflows() {
    let ledger = Arc::new(Ledger::default());
    let (l, o, g) = (ledger.clone(), ledger.clone(), ledger.clone());
    let handle = Builder::new(
        Script::new(move |b: &[u64], _: &()| {
            l.processed(b);
            Outcome::Ok
        })
        .with_init(move |sink, _| {
            let ids: Vec<u64> = (0..20_000).collect();
            g.given(&ids);
            sink.extend(ids);
        }),
        (),
    )
    .max_batch_size(10)
    .max_concurrency(2)
    .max_queue_len(50)
    .overflow_policy(OverflowPolicy::Block)
    .flush_interval(FlushInterval::Never)
    .poll(false)
    .overflow_handler(move |e, _| o.overflowed(&e))
    .start()
    .unwrap();
    wait_until(|| handle.stats().processed == 20_000);
    let report = handle.shutdown_drain().unwrap();
    assert_eq!(report.overflowed, 0);
    assert_eq!(ledger.check(), (20_000, 20_000, 0, 0));
}

#[test]
fn try_and_timeout_forms_never_wait_longer_than_asked() {
    let clock = buffered_task::ManualClock::new();
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |_: &[u64], _: &()| {
        let _ = started_tx.send(());
        held.wait();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    books.push_back(&handle, vec![0]).unwrap();
    recv(&started); // running
    books.push_back(&handle, vec![1]).unwrap(); // the queue is at its bound
    books.given(&[2, 3, 4, 5]);
    for err in [
        handle.try_buffer(vec![2], Priority::Back).unwrap_err(),
        handle.try_buffer_one(3, Priority::Front).unwrap_err(),
    ] {
        assert!(matches!(err, BufferError::Full(_)), "{err:?}");
        books.handed_back(&err.into_entries());
    }
    let waiters = [
        (
            4,
            std::thread::spawn({
                let h = handle.clone();
                move || h.push_back_timeout(vec![4], Duration::from_secs(1))
            }),
        ),
        (
            5,
            std::thread::spawn({
                let h = handle.clone();
                move || h.buffer_one_timeout(5, Priority::Back, Duration::from_secs(1))
            }),
        ),
    ];
    wait_until(|| handle.stats().blocked_callers == 2);
    clock.advance(Duration::from_secs(1));
    for (id, waiter) in waiters {
        match waiter.join().unwrap() {
            Err(BufferError::Timeout(v)) => {
                assert_eq!(v, vec![id]);
                books.handed_back(&v);
            }
            other => panic!("{other:?}"),
        }
    }
    gate.open();
    books.finish(handle.shutdown_drain().unwrap());
}

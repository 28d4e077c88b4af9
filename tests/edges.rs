//! The promises at the edges (SPEC §9a), each a regression test for a defect
//! found by attacking the engine: extreme settings, re-entrant calls from the
//! engine's own threads, user code that panics where the engine drops it,
//! exact counts, and the bound on entries a run hands back.

mod common;
use buffered_task::{
    BufferError, BuildError, Builder, ControlError, DeadLetterReason, FlushInterval, Handle,
    Outcome, OverflowPolicy, Priority, RetryPolicy, WeakHandle, MAX_CONCURRENCY,
};
use common::*;
use crossbeam_channel::unbounded;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Defect 1: in a debug build, taking back batches a full-batch hand-over had
/// given out underflowed the coordinator's count.
#[test]
fn full_batches_buffered_behind_a_busy_worker_are_counted_and_handed_back() {
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(1)
        .flush_interval(Duration::from_millis(5))
        .poll(false)
        .start()
        .unwrap();
    let books = &held.books;
    books
        .buffer(&handle, (0..10).collect(), Priority::Back)
        .unwrap();
    recv(&held.started); // the only worker is busy
    books
        .buffer(&handle, (10..20).collect(), Priority::Back)
        .unwrap();
    books
        .buffer(&handle, (20..30).collect(), Priority::Back)
        .unwrap();
    books.push_front(&handle, vec![100]).unwrap();
    assert_eq!(handle.memory_usage().unwrap(), 21 * 4);
    assert_eq!(handle.debug_count().unwrap().waiting, 21);
    let stopper = {
        let (handle, books) = (handle.clone(), books.clone());
        std::thread::spawn(move || books.finish(handle.shutdown_return().unwrap()))
    };
    wait_until(|| handle.is_stopped());
    held.gate.open();
    let report = stopper.join().unwrap();
    let mut expected = vec![100];
    expected.extend(10..30);
    assert_eq!(report.unprocessed, expected);
}

/// Defect 4: every setting is an error or works; nothing panics or aborts.
#[test]
fn huge_batch_sizes_work_and_allocate_nothing_in_proportion() {
    for batch in [usize::MAX, 1 << 40] {
        let (tx, ran) = unbounded();
        let task = Script::new(move |b: &[u32], _: &()| {
            tx.send(b.len()).unwrap();
            Outcome::Ok
        })
        .with_init(|sink, _| {
            sink.extend(0..5);
        });
        let handle = Builder::new(task, ())
            .max_batch_size(batch)
            .flush_interval(Duration::from_millis(1))
            .poll(false)
            .start()
            .unwrap();
        handle.buffer((0..1000).collect(), Priority::Back).unwrap();
        handle.buffer_one(7, Priority::Front).unwrap();
        handle.shutdown_drain().unwrap();
        assert_eq!(ran.try_iter().sum::<usize>(), 1006);
    }
}

#[test]
fn too_many_workers_is_a_build_error() {
    for n in [usize::MAX, 1 << 40, MAX_CONCURRENCY + 1] {
        let err = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
            .max_concurrency(n)
            .start()
            .unwrap_err();
        assert!(
            matches!(err, BuildError::TooManyWorkers(m) if m == n),
            "{err}"
        );
    }
}

#[test]
fn the_longest_durations_mean_never_and_never_panic() {
    let (tx, ran) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        Outcome::Retry // every attempt fails: the backoff is "never"
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .flush_interval(Duration::MAX)
        .poll(true)
        .idle_poll_delay(Duration::MAX)
        .run_deadline(Duration::MAX)
        .retry_policy(RetryPolicy::new(u32::MAX).backoff(Duration::MAX, Duration::MAX))
        .max_queue_len(usize::MAX)
        .overflow_policy(OverflowPolicy::Block)
        .start()
        .unwrap();
    books
        .buffer_timeout(&handle, vec![1, 2], Priority::Back, Duration::MAX)
        .unwrap();
    handle.flush_timeout(Duration::MAX).unwrap();
    assert_eq!(recv(&ran), vec![1, 2]); // ran once; now waits "for ever"
    wait_until(|| handle.stats().retried == 2);
    let report = books.finish(handle.shutdown_timeout(Duration::ZERO).unwrap());
    assert_eq!(report.unprocessed, vec![1, 2]);
    let other = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .start()
        .unwrap();
    other.buffer(vec![1], Priority::Back).unwrap();
    assert!(other
        .shutdown_timeout(Duration::MAX)
        .unwrap()
        .unprocessed
        .is_empty());
}

/// Defect 5: a call from the engine's own threads works or fails at once.
#[test]
fn a_run_that_shuts_its_own_engine_down_gets_an_error_not_a_hang() {
    let slot: Arc<Mutex<Option<WeakHandle<u32>>>> = Default::default();
    let (tx, answers) = unbounded();
    let s = slot.clone();
    let task = Script::new(move |_: &[u32], _: &()| {
        let handle = s.lock().as_ref().and_then(WeakHandle::upgrade).unwrap();
        tx.send((
            handle.shutdown_drain().err(),
            handle.shutdown_return().err(),
            handle.shutdown_timeout(Duration::ZERO).err(),
            handle.flush().is_ok(),
            handle.debug_count().map(|c| c.running).ok(),
            handle.stats().running,
        ))
        .unwrap();
        Outcome::Ok
    });
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    *slot.lock() = Some(handle.downgrade());
    handle.push_back(vec![1]).unwrap();
    let deadlock = Some(ControlError::WouldDeadlock);
    assert_eq!(
        recv(&answers),
        (
            deadlock.clone(),
            deadlock.clone(),
            deadlock,
            true,
            Some(1),
            1
        )
    );
    handle.shutdown_drain().unwrap();
}

#[test]
fn an_init_that_shuts_its_own_engine_down_gets_an_error() {
    let slot: Arc<Mutex<Option<WeakHandle<u32>>>> = Default::default();
    let (tx, answers) = unbounded();
    let s = slot.clone();
    let (go_tx, go) = unbounded::<()>();
    let task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |sink, _| {
        go.recv().unwrap();
        let handle = s.lock().as_ref().and_then(WeakHandle::upgrade).unwrap();
        tx.send(handle.shutdown_drain().err()).unwrap();
        sink.push(1);
    });
    let handle = Builder::new(task, ()).poll(false).start().unwrap();
    *slot.lock() = Some(handle.downgrade());
    go_tx.send(()).unwrap();
    assert_eq!(recv(&answers), Some(ControlError::WouldDeadlock));
    handle.shutdown_drain().unwrap();
}

#[test]
fn handlers_may_call_their_engine() {
    let slot: Arc<Mutex<Option<WeakHandle<u32>>>> = Default::default();
    let (tx, answers) = unbounded();
    let (s1, s2, tx2) = (slot.clone(), slot.clone(), tx.clone());
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Retry), ())
        .max_batch_size(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(1))
        .dead_letter_handler(move |_, _| {
            let h = s1.lock().as_ref().and_then(WeakHandle::upgrade).unwrap();
            tx.send(("dead", h.debug_count().is_ok())).unwrap();
        })
        .overflow_handler(move |_, _| {
            let h = s2.lock().as_ref().and_then(WeakHandle::upgrade).unwrap();
            tx2.send(("overflow", h.flush().is_ok())).unwrap();
        })
        .start()
        .unwrap();
    *slot.lock() = Some(handle.downgrade());
    handle.push_back(vec![1]).unwrap();
    assert_eq!(recv(&answers), ("dead", true));
    handle.buffer(vec![2, 3], Priority::Back).unwrap();
    handle.flush().unwrap(); // 2 fits the bound of one, 3 overflows
    let mut got = recv_n(&answers, 2); // 2 dies as 3 overflows
    got.sort();
    assert_eq!(got, vec![("dead", true), ("overflow", true)]);
    handle.shutdown_drain().unwrap();
}

#[test]
fn a_run_under_block_never_waits_for_room() {
    let slot: Arc<Mutex<Option<WeakHandle<u32>>>> = Default::default();
    let (tx, answers) = unbounded();
    let s = slot.clone();
    let task = Script::new(move |b: &[u32], _: &()| {
        if b[0] == 0 {
            let handle = s.lock().as_ref().and_then(WeakHandle::upgrade).unwrap();
            let result = handle.buffer(vec![10, 11, 12], Priority::Back);
            tx.send(result.map_err(|e| e.into_entries())).unwrap();
        }
        Outcome::Ok
    });
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_queue_len(2)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    *slot.lock() = Some(handle.downgrade());
    handle.push_back(vec![0]).unwrap();
    assert_eq!(recv(&answers), Err(vec![10, 11, 12]));
    handle.shutdown_drain().unwrap();
}

#[test]
fn dropping_the_last_handle_inside_run_returns() {
    let slot: Arc<Mutex<Option<Handle<u32>>>> = Default::default();
    let (tx, done) = unbounded();
    let s = slot.clone();
    let task = Script::new(move |_: &[u32], _: &()| {
        let last = s.lock().take();
        drop(last); // the last strong handle, dropped on a worker
        tx.send(()).unwrap();
        Outcome::Ok
    });
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    let weak = handle.downgrade();
    handle.push_back(vec![1]).unwrap();
    *slot.lock() = Some(handle);
    recv(&done);
    assert!(weak.upgrade().is_none());
}

/// Defect 6: user values dropped by the engine may panic in `Drop`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Bomb(u32);
impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 % 2 == 1 && !std::thread::panicking() {
            panic!("deliberate: dropping {}", self.0);
        }
    }
}

#[test]
fn entries_states_and_payloads_whose_drop_panics_are_contained() {
    quiet_panics();
    struct NastyState(bool);
    impl Drop for NastyState {
        fn drop(&mut self) {
            if self.0 {
                panic!("deliberate: dropping a state");
            }
        }
    }
    struct NastyPayload;
    impl Drop for NastyPayload {
        fn drop(&mut self) {
            panic!("deliberate: dropping a payload");
        }
    }
    let panicked_once = Arc::new(AtomicBool::new(false));
    let p = panicked_once.clone();
    let task = Script::new(move |b: &[Bomb], _: &NastyState| {
        if b.iter().any(|e| e.0 == 3) && !p.swap(true, Ordering::SeqCst) {
            std::panic::panic_any(NastyPayload);
        }
        Outcome::OkWithState(NastyState(true))
    });
    let handle = Builder::new(task, NastyState(true))
        .max_batch_size(2)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    handle.push_back((0..20).map(Bomb).collect()).unwrap();
    handle.shutdown_drain().unwrap();
    let stats = handle.stats();
    assert_eq!((stats.processed, stats.panicked, stats.running), (20, 1, 0));
}

/// Defect 10: counts are exact at every observation.
#[test]
fn running_never_exceeds_max_concurrency_at_any_observation() {
    quiet_panics();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let task = Script::new(
        move |_: &[u32], _: &()| match c.fetch_add(1, Ordering::Relaxed) % 3 {
            0 => Outcome::Retry,
            1 => panic!("deliberate: counted"),
            _ => Outcome::Ok,
        },
    );
    let handle = Builder::new(task, ())
        .max_batch_size(3)
        .max_concurrency(8)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    let watcher = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let mut most = 0;
            while let Ok(count) = handle.debug_count() {
                assert!(count.running <= 8, "running {}", count.running);
                let stats = handle.stats();
                assert!(stats.running <= 8, "running {}", stats.running);
                most = most.max(count.running);
            }
            most
        })
    };
    for i in 0..300 {
        handle.push_back((i * 10..i * 10 + 10).collect()).unwrap();
    }
    handle.shutdown_drain().unwrap();
    assert!(watcher.join().unwrap() <= 8);
    assert_eq!(handle.stats().processed, 3000);
}

/// Defect 14: new entries a run returns are held to the bound.
#[test]
fn new_entries_from_a_run_are_admitted_under_the_bound() {
    let (of_tx, overflow) = unbounded();
    let books = Books::new();
    let b = books.clone();
    let task = Script::new(move |batch: &[u32], _: &()| {
        if batch[0] == 0 {
            // One of its own, and 10,000 new ones.
            Outcome::RetryEntries((1_000_000..1_010_001).collect())
        } else {
            Outcome::Ok
        }
    })
    .with_books(&b);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_queue_len(100)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler({
            let books = books.clone();
            move |v: Vec<u32>, r| {
                books.overflowed(&v);
                of_tx.send((v.len(), r)).unwrap();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![0]).unwrap();
    let (n, _) = recv(&overflow);
    assert!(n >= 10_001 - 101, "{n} overflowed");
    assert!(handle.stats().queued <= 101);
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(handle.stats().overflowed_full, n as u64);
}

#[test]
fn a_dead_lettered_entry_carries_its_reason() {
    let (tx, dead) = unbounded();
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Retry), ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(2).backoff(Duration::ZERO, Duration::ZERO))
        .dead_letter_handler(move |v, r| tx.send((v, r)).unwrap())
        .start()
        .unwrap();
    handle.push_back(vec![5]).unwrap();
    assert_eq!(recv(&dead), (vec![5], DeadLetterReason::RetryRequested));
    handle.shutdown_drain().unwrap();
}

/// Calls after a shutdown fail with their entries; a hand-over under `Block`
/// that can never fit fails at once.
#[test]
fn a_hand_over_larger_than_the_bound_fails_at_once() {
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .max_queue_len(3)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .start()
        .unwrap();
    match handle.buffer(vec![1, 2, 3, 4], Priority::Back) {
        Err(BufferError::Full(v)) => assert_eq!(v, vec![1, 2, 3, 4]),
        other => panic!("{other:?}"),
    }
    handle.shutdown_drain().unwrap();
}

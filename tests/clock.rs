//! Every timer on a manual clock: the flush tick (and that it does not drift),
//! the idle poll, retry backoff, the run watchdog, the shutdown deadline and the
//! monitor's interval fire when the clock is advanced past them, with no real
//! waiting. `ManualClock::advance` returns once the engine has acted on the new
//! time, so "not yet" is observable too.

mod common;
use buffered_task::{
    Builder, CheckOutcome, FlushInterval, ManualClock, MemoryMonitor, MemoryProbe, Outcome,
    OverflowReason, Priority, RetryPolicy,
};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const MS: Duration = Duration::from_millis(1);

/// A task that sends each batch to a channel.
fn recorder() -> (Script<u32, ()>, crossbeam_channel::Receiver<Vec<u32>>) {
    let (tx, rx) = unbounded();
    let task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    (task, rx)
}

#[test]
fn the_flush_tick_fires_on_schedule_and_does_not_drift() {
    let clock = ManualClock::new();
    let (mut task, ran) = recorder();
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(100)
        .flush_interval(10 * MS)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    books.buffer(&handle, vec![1], Priority::Back).unwrap();
    clock.advance(9 * MS);
    assert_eq!(handle.stats().buffered, 1, "no tick before 10 ms");
    clock.advance(MS); // t = 10: the first tick
    assert_eq!(recv(&ran), vec![1]);
    // Late by 5 ms (the engine looks at t = 15): the tick due at 10 ms fires,
    // and the next is due at 20 ms, not 25 ms.
    clock.advance(5 * MS);
    books.buffer(&handle, vec![2], Priority::Back).unwrap();
    clock.advance(4 * MS); // t = 19
    assert_eq!(handle.stats().buffered, 1);
    clock.advance(MS); // t = 20
    assert_eq!(recv(&ran), vec![2]);
    // Ticks missed while late are skipped, not bunched: one flush at t = 47,
    // the next at 50.
    books.buffer(&handle, vec![3], Priority::Back).unwrap();
    clock.advance(27 * MS); // t = 47
    assert_eq!(recv(&ran), vec![3]);
    books.buffer(&handle, vec![4], Priority::Back).unwrap();
    clock.advance(2 * MS); // t = 49
    assert_eq!(handle.stats().buffered, 1);
    clock.advance(MS); // t = 50
    assert_eq!(recv(&ran), vec![4]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn an_empty_init_is_polled_again_after_the_idle_delay() {
    let clock = ManualClock::new();
    let (polled_tx, polled) = unbounded();
    let task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |_, _| {
        polled_tx.send(()).unwrap();
    });
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(60 * MS)
        .clock(&clock)
        .start()
        .unwrap();
    recv(&polled); // at start
    wait_until(|| handle.stats().init_runs == 1); // idle from t = 0
    clock.advance(59 * MS);
    assert_empty(&polled);
    clock.advance(MS);
    recv(&polled); // the idle poll
    handle.shutdown_drain().unwrap();
}

#[test]
fn retries_wait_their_backoff_on_the_engine_clock() {
    let clock = ManualClock::new();
    let calls = Arc::new(AtomicU32::new(0));
    let (tx, ran) = unbounded();
    let c = calls.clone();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
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
        .retry_policy(RetryPolicy::new(5).backoff(100 * MS, 1000 * MS))
        .clock(&clock)
        .start()
        .unwrap();
    books.push_back(&handle, vec![7]).unwrap();
    assert_eq!(recv(&ran), vec![7]); // attempt 1 fails: waits 50–100 ms
    wait_until(|| handle.stats().retried == 1);
    clock.advance(49 * MS);
    assert_empty(&ran);
    clock.advance(51 * MS); // 100 ms: due whatever the jitter
    assert_eq!(recv(&ran), vec![7]); // attempt 2 fails: waits 100–200 ms
    wait_until(|| handle.stats().retried == 2);
    clock.advance(99 * MS);
    assert_empty(&ran);
    clock.advance(101 * MS);
    assert_eq!(recv(&ran), vec![7]); // attempt 3 succeeds
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[test]
fn the_watchdog_reports_a_run_once_its_deadline_passes() {
    let clock = ManualClock::new();
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .run_deadline(30 * MS)
        .clock(&clock)
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![1]).unwrap();
    recv(&held.started);
    clock.advance(29 * MS);
    assert_eq!(handle.stats().stuck_runs, 0);
    clock.advance(MS);
    assert_eq!(handle.stats().stuck_runs, 1);
    clock.advance(1000 * MS);
    assert_eq!(handle.stats().stuck_runs, 1, "reported once");
    held.gate.open();
    held.books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn shutdown_timeout_returns_at_its_deadline_while_a_run_never_returns() {
    let clock = ManualClock::new();
    let (task, held) = held::<u32>();
    let (of_tx, overflow) = unbounded();
    let books = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .overflow_handler(move |v, r| of_tx.send((v, r)).unwrap())
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2]).unwrap();
    recv(&held.started); // [1, 2] runs and will not return until the gate opens
    books.push_back(&handle, vec![3, 4, 5]).unwrap();
    let stopper = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.shutdown_timeout(100 * MS).unwrap())
    };
    wait_until(|| handle.is_stopped());
    clock.advance(100 * MS);
    let report = stopper.join().unwrap(); // returned with the run still held
    assert_eq!(report.unprocessed, vec![3, 4, 5]);
    assert_eq!(report.still_running, 2);
    assert_eq!(report.drained, 0);
    books.handed_back(&report.unprocessed);
    assert_eq!(handle.stats().processed, 0);
    // The run returns late: its entries count as processed.
    held.gate.open();
    assert_eq!(recv(&held.ran), vec![1, 2]);
    wait_until(|| handle.stats().processed == 2);
    books.check();
    assert!(overflow.try_iter().next().is_none());
}

#[test]
fn what_a_late_run_hands_back_goes_to_the_overflow_handler() {
    let clock = ManualClock::new();
    let gate = Gate::new();
    let held = gate.clone();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        Outcome::RetryEntries(b.to_vec())
    });
    let books = task.books();
    let (of_tx, overflow) = unbounded();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .overflow_handler({
            let books = books.clone();
            move |v: Vec<u32>, r| {
                books.overflowed(&v);
                of_tx.send(r).unwrap()
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![8, 9]).unwrap();
    recv(&started);
    let stopper = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.shutdown_timeout(10 * MS).unwrap())
    };
    wait_until(|| handle.is_stopped());
    clock.advance(10 * MS);
    let report = stopper.join().unwrap();
    assert_eq!((report.still_running, report.unprocessed.len()), (2, 0));
    gate.open();
    assert_eq!(recv(&overflow), OverflowReason::Shutdown);
    assert_eq!(handle.stats().overflowed_shutdown, 2);
    books.check();
}

#[test]
fn the_monitor_checks_on_its_interval() {
    struct Counting(Arc<AtomicU64>);
    impl MemoryProbe for Counting {
        fn used_bytes(&self) -> Option<u64> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Some(1)
        }
    }
    let clock = ManualClock::new();
    let reads = Arc::new(AtomicU64::new(0));
    let monitor = MemoryMonitor::builder()
        .limit_bytes(100)
        .check_interval(60_000 * MS)
        .probe(Counting(reads.clone()))
        .clock(&clock)
        .start()
        .unwrap();
    clock.advance(59_999 * MS);
    assert_eq!(reads.load(Ordering::SeqCst), 0);
    clock.advance(MS);
    assert_eq!(reads.load(Ordering::SeqCst), 1);
    clock.advance(60_000 * MS);
    assert_eq!(reads.load(Ordering::SeqCst), 2);
    assert_eq!(monitor.check_now(), CheckOutcome::Normal);
    assert_eq!(reads.load(Ordering::SeqCst), 3);
}

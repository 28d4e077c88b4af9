//! An engine thread that panics outside user code (injected here) stops the
//! engine cleanly: hand-overs fail with their entries, every entry the engine
//! held comes back (report or overflow handler), and every drop and shutdown
//! returns.

use crate::fault;
use crate::{
    BufferError, Builder, FlushInterval, ManualClock, MemoryMonitor, MemoryProbe, Outcome,
    OverflowReason, Priority, Sink, Task,
};
use crossbeam_channel::{unbounded, Receiver, Sender};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const HANG: Duration = Duration::from_secs(20);

/// Records each batch it runs; `init` streams `init_entries`.
struct Record {
    ran: Sender<Vec<u32>>,
    init_entries: u32,
}

impl Task for Record {
    type Entry = u32;
    type State = ();
    fn init(&self, sink: &mut Sink<u32>, _: &()) {
        sink.extend(1000..1000 + self.init_entries);
    }
    fn run(&self, batch: &[u32], _: &()) -> Outcome<u32, ()> {
        let _ = self.ran.send(batch.to_vec());
        Outcome::Ok
    }
}

fn record(init_entries: u32) -> (Record, Receiver<Vec<u32>>) {
    let (ran, rx) = unbounded();
    (Record { ran, init_entries }, rx)
}

fn sorted(mut v: Vec<u32>) -> Vec<u32> {
    v.sort_unstable();
    v
}

/// Waits until the engine notices the failure.
fn wait_stopped<T: Send + 'static>(h: &crate::Handle<T>) {
    let start = std::time::Instant::now();
    while !h.is_stopped() {
        assert!(start.elapsed() < HANG, "the failure was never noticed");
        std::thread::yield_now();
    }
}

#[test]
fn a_coordinator_failure_stops_the_engine_and_hands_entries_back() {
    super::capture_logs();
    let clock = ManualClock::new();
    let (task, ran) = record(0);
    let name = "fail-coordinator";
    let handle = Builder::new(task, ())
        .name(name)
        .max_batch_size(10)
        .flush_interval(Duration::from_millis(10))
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    handle.buffer(vec![1, 2, 3], Priority::Back).unwrap(); // waits for the tick
    fault::arm(name, "coordinator");
    clock.advance(Duration::from_millis(10)); // the coordinator wakes and fails
    wait_stopped(&handle);
    match handle.buffer(vec![4], Priority::Back) {
        Err(BufferError::Stopped(v)) => assert_eq!(v, vec![4]),
        other => panic!("{other:?}"),
    }
    let report = handle.shutdown_return().unwrap();
    let ran: Vec<u32> = ran.try_iter().flatten().collect();
    assert_eq!(sorted([report.unprocessed, ran].concat()), vec![1, 2, 3]);
    assert!(super::logged(
        log::Level::Error,
        &[name, "Coordinator", "injected fault at coordinator"]
    ));
}

#[test]
fn a_drop_after_a_worker_failure_returns_and_loses_nothing() {
    let (task, ran) = record(0);
    let name = "fail-worker-drop";
    let (of_tx, overflow) = unbounded();
    let handle = Builder::new(task, ())
        .name(name)
        .max_batch_size(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v, _| of_tx.send(v).unwrap())
        .start()
        .unwrap();
    fault::arm(name, "worker");
    handle.push_back((0..10).collect()).unwrap();
    wait_stopped(&handle);
    drop(handle);
    let out: Vec<u32> = ran
        .try_iter()
        .chain(overflow.try_iter())
        .flatten()
        .collect();
    assert_eq!(sorted(out), (0..10).collect::<Vec<_>>());
}

#[test]
fn a_worker_failure_gives_its_batch_back() {
    let (task, ran) = record(0);
    let name = "fail-worker";
    let handle = Builder::new(task, ())
        .name(name)
        .max_batch_size(2)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    fault::arm(name, "worker");
    handle.push_back(vec![1, 2, 3, 4, 5]).unwrap();
    wait_stopped(&handle);
    let report = handle.shutdown_return().unwrap();
    let ran: Vec<u32> = ran.try_iter().flatten().collect();
    assert_eq!(
        sorted([report.unprocessed, ran].concat()),
        vec![1, 2, 3, 4, 5]
    );
    assert_eq!(handle.stats().queued, 0);
}

/// The batch a failed worker gives back is waiting again, weighed again: the
/// heap the weigher reported for it counts in `memory_usage` once more.
#[test]
fn a_worker_failure_gives_its_batch_back_weighed() {
    let (task, _ran) = record(0);
    let name = "fail-worker-weighed";
    let handle = Builder::new(task, ())
        .name(name)
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .weigher(|_: &u32| 100)
        .dedup_by_key(|e: &u32| *e)
        .start()
        .unwrap();
    fault::arm(name, "worker");
    handle.push_back(vec![1, 2, 3, 4, 5]).unwrap();
    wait_stopped(&handle);
    let per_entry = std::mem::size_of::<u32>() + 100;
    assert_eq!(handle.memory_usage().unwrap(), 5 * per_entry);
    let report = handle.shutdown_return().unwrap();
    assert_eq!(sorted(report.unprocessed), vec![1, 2, 3, 4, 5]);
}

#[test]
fn an_init_failure_keeps_what_it_streamed_and_a_drop_returns() {
    let (task, ran) = record(25);
    let name = "fail-init";
    let (of_tx, overflow) = unbounded();
    fault::arm(name, "init");
    let handle = Builder::new(task, ())
        .name(name)
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v, reason| of_tx.send((v, reason)).unwrap())
        .start()
        .unwrap();
    wait_stopped(&handle);
    drop(handle); // returns: every thread joined
    let mut out: Vec<u32> = ran.try_iter().flatten().collect();
    for (v, reason) in overflow.try_iter() {
        assert_eq!(reason, OverflowReason::Shutdown);
        out.extend(v);
    }
    assert_eq!(sorted(out), (1000..1025).collect::<Vec<_>>());
}

#[test]
fn the_monitor_survives_its_own_failure() {
    struct Fixed(Arc<AtomicU64>);
    impl MemoryProbe for Fixed {
        fn used_bytes(&self) -> Option<u64> {
            Some(self.0.load(Ordering::Relaxed))
        }
    }
    let used = Arc::new(AtomicU64::new(10));
    let monitor = MemoryMonitor::builder()
        .limit_bytes(100)
        .check_interval(Duration::MAX)
        .probe(Fixed(used.clone()))
        .start()
        .unwrap();
    fault::arm("memory-monitor", "monitor");
    assert_eq!(monitor.check_now(), crate::CheckOutcome::ProbeFailed);
    assert_eq!(monitor.panics(), 1);
    assert_eq!(monitor.check_now(), crate::CheckOutcome::Normal);
}

//! Regression tests from the hostile review of the redesigned core: each one
//! reproduced a defect (H*) or checks a promise that held under attack (S*,
//! OK*), and states the promise it checks.

mod common;
use buffered_task::{
    Builder, CheckOutcome, FlushInterval, MemoryMonitor, MemoryProbe, Outcome, OverflowPolicy,
    OverflowReason, Priority, RetryPolicy, ShrinkError, Shrinkable, Sink, Task,
};
use common::*;
use crossbeam_channel::{unbounded, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a test watches for something that must NOT happen (a shutdown
/// that must still be waiting, a run that must not start). A bound on a
/// negative observation, never used to synchronise: a correct engine passes
/// whatever the machine's speed.
const PATIENCE: Duration = Duration::from_millis(300);

fn on_coordinator() -> bool {
    std::thread::current()
        .name()
        .is_some_and(|n| n.ends_with("-coordinator"))
}

// ---------------------------------------------------------------------------
// H1. shutdown_drain / shutdown_return do not wait for a worker that is inside
// the dead-letter (or overflow) handler: the thread is "let go" (not joined)
// and the report comes back while the handler still holds the entries.
// README: "Every thread is joined, except one still inside user code when a
// shutdown deadline passes." Handle::shutdown_drain: "runs everything left ...,
// waits for it, and joins the threads."
// ---------------------------------------------------------------------------
#[test]
fn h1_shutdown_drain_waits_for_a_dead_letter_handler_in_progress() {
    let gate = Gate::new();
    let (in_tx, in_handler) = unbounded();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Retry);
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(1)) // the first failure is the last
        .dead_letter_handler({
            let (books, gate) = (books.clone(), gate.clone());
            move |v: Vec<u32>, _| {
                in_tx.send(()).unwrap();
                gate.wait();
                books.dead_lettered(&v);
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2, 3]).unwrap();
    recv(&in_handler); // the worker is inside the handler with [1, 2, 3]
    let (done_tx, done) = unbounded();
    let stopper = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let report = handle.shutdown_drain().unwrap();
            done_tx.send(()).unwrap();
            report
        })
    };
    let returned_early = done.recv_timeout(PATIENCE).is_ok();
    let stats_then = handle.stats();
    gate.open();
    let report = stopper.join().unwrap();
    assert!(
        !returned_early,
        "shutdown_drain returned while the dead-letter handler still held the entries \
         (stats said dead_lettered = {}), its worker thread was not joined",
        stats_then.dead_lettered
    );
    books.finish(report);
}

// ---------------------------------------------------------------------------
// H2. shutdown_timeout does not return by its deadline while the coordinator
// is inside the overflow handler (a flush tick overflowed): `finish` marks the
// coordinator busy and lets it go, but then joins the init thread, which only
// ends when the coordinator drops the init request channel.
// README: "shutdown_timeout(d) ... returns by the deadline even if a run never
// returns"; Handle::shutdown_timeout: "returns by the deadline even if a run
// (or init) never returns: such threads are let go".
// ---------------------------------------------------------------------------
#[test]
fn h2_shutdown_timeout_returns_while_the_coordinator_is_in_a_handler() {
    let (task, held) = held::<u32>();
    let handler_gate = Gate::new();
    let (in_tx, in_handler) = unbounded();
    let books = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(Duration::from_millis(2))
        .poll(false)
        .overflow_handler({
            let (books, gate) = (books.clone(), handler_gate.clone());
            move |v: Vec<u32>, _| {
                books.overflowed(&v);
                if on_coordinator() {
                    in_tx.send(()).unwrap();
                    gate.wait();
                }
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    recv(&held.started); // the only worker is held
    books.push_back(&handle, vec![2]).unwrap(); // the queue is full
    books.buffer(&handle, vec![3], Priority::Back).unwrap(); // overflows at the tick
    recv(&in_handler); // the coordinator is inside the overflow handler
    let (done_tx, done) = unbounded();
    let stopper = {
        let handle = handle.clone();
        std::thread::spawn(move || {
            let report = handle.shutdown_timeout(Duration::from_millis(20)).unwrap();
            done_tx.send(()).unwrap();
            report
        })
    };
    let returned = done.recv_timeout(HANG).is_ok();
    handler_gate.open();
    held.gate.open();
    let report = stopper.join().unwrap();
    books.handed_back(&report.unprocessed);
    assert!(
        returned,
        "shutdown_timeout(20 ms) had not returned after {HANG:?}: it waits for the \
         coordinator's overflow handler"
    );
}

// ---------------------------------------------------------------------------
// H3. Under a retry policy, the entries' `PartialEq` (user code, called by
// retry::settle to match RetryEntries to the batch) is not contained: a panic
// there is an "internal failure" that stops the engine, and the batch the
// worker held is lost (not handed back by the shutdown, not overflowed).
// README: "All user code is contained"; "the next shutdown hands back every
// entry the engine held (the batch of a failed worker included)".
// ---------------------------------------------------------------------------
static TOUCHY_ARMED: AtomicBool = AtomicBool::new(false);

#[derive(Debug, Clone)]
struct Touchy(u64);
impl PartialEq for Touchy {
    fn eq(&self, other: &Self) -> bool {
        if TOUCHY_ARMED.load(Ordering::SeqCst) && (self.0 == 13 || other.0 == 13) {
            panic!("deliberate: PartialEq on 13");
        }
        self.0 == other.0
    }
}

struct TouchyTask(Arc<Ledger>);
impl Task for TouchyTask {
    type Entry = Touchy;
    type State = ();
    fn run(&self, batch: &[Touchy], _: &()) -> Outcome<Touchy, ()> {
        if batch.iter().any(|t| t.0 == 13) {
            let ok: Vec<u64> = batch.iter().map(|t| t.0).filter(|&i| i != 13).collect();
            self.0.processed(&ok);
            TOUCHY_ARMED.store(true, Ordering::SeqCst);
            return Outcome::RetryEntries(vec![Touchy(13)]);
        }
        let ids: Vec<u64> = batch.iter().map(|t| t.0).collect();
        self.0.processed(&ids);
        Outcome::Ok
    }
}

#[test]
fn h3_a_panicking_partial_eq_is_contained_and_loses_nothing() {
    quiet_panics();
    let ledger = Arc::new(Ledger::default());
    let (l_over, l_dead) = (ledger.clone(), ledger.clone());
    let handle = Builder::new(TouchyTask(ledger.clone()), ())
        .max_batch_size(10)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(3).backoff(Duration::ZERO, Duration::ZERO))
        .overflow_handler(move |v: Vec<Touchy>, _| {
            l_over.overflowed(&v.iter().map(|t| t.0).collect::<Vec<_>>())
        })
        .dead_letter_handler(move |v: Vec<Touchy>, _| {
            TOUCHY_ARMED.store(false, Ordering::SeqCst);
            l_dead.dead_lettered(&v.iter().map(|t| t.0).collect::<Vec<_>>())
        })
        .start()
        .unwrap();
    ledger.given(&[12, 13]);
    handle.push_back(vec![Touchy(12), Touchy(13)]).unwrap();
    // Either the engine carries on (and the entry is retried / dead-lettered) or
    // it stops; wait for one of the two.
    wait_until(|| {
        let s = handle.stats();
        handle.is_stopped()
            || (s.running == 0 && s.queued == 0 && s.processed + s.dead_lettered >= 2)
    });
    let stopped = handle.is_stopped();
    let report = handle.shutdown_return();
    TOUCHY_ARMED.store(false, Ordering::SeqCst);
    if let Ok(report) = report {
        ledger.handed_back(&report.unprocessed.iter().map(|t| t.0).collect::<Vec<_>>());
    }
    let lost = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| ledger.check()))
        .err()
        .map(|e| e.downcast_ref::<String>().cloned().unwrap_or_default());
    assert!(
        !stopped && lost.is_none(),
        "a panic in the entries' PartialEq: engine stopped = {stopped}; books: {lost:?}"
    );
}

// ---------------------------------------------------------------------------
// H4. Under OverflowPolicy::Reject, `init` does not wait for room: every chunk
// goes into the queue whatever the bound.
// README "The bound holds": "A bounded queue never takes more than its bound
// from hand-overs, `init` or new entries a run returns." OverflowPolicy::Reject:
// "`init` streaming waits for room instead".
// ---------------------------------------------------------------------------
#[test]
fn h4_reject_makes_init_wait_for_room() {
    let (task, held) = held::<u32>();
    let task = task.with_init(|sink: &mut Sink<u32>, _: &()| {
        sink.extend(0..100);
    });
    let books = held.books.clone();
    books.given(&(0..100).collect::<Vec<_>>());
    let handle = Builder::new(task, ())
        .max_batch_size(5)
        .max_concurrency(1)
        .max_queue_len(10)
        .overflow_policy(OverflowPolicy::Reject)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    recv(&held.started); // the only worker holds 0..5
                         // init either finished (bound ignored) or waits for room.
    wait_until(|| {
        let s = handle.stats();
        s.init_runs == 1 || s.blocked_callers > 0
    });
    let queued = handle.stats().queued;
    held.gate.open();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        queued <= 10,
        "the queue bounded at 10 took {queued} entries from init"
    );
}

/// H4b. The same under Block when a chunk (max_batch_size) is larger than the
/// bound: admission says "Full" and the chunk goes in whole.
#[test]
fn h4b_block_with_chunks_larger_than_the_bound_keeps_the_bound() {
    let (task, held) = held::<u32>();
    let (go_tx, go) = unbounded::<()>();
    let go = parking_lot::Mutex::new(go);
    let task = task.with_init(move |sink: &mut Sink<u32>, _: &()| {
        let _ = go.lock().recv();
        sink.extend(0..100);
    });
    let books = held.books.clone();
    books.given(&(0..100).collect::<Vec<_>>());
    let handle = Builder::new(task, ())
        .max_batch_size(100)
        .max_concurrency(1)
        .max_queue_len(10)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![1000]).unwrap();
    recv(&held.started); // the only worker is held
    go_tx.send(()).unwrap();
    wait_until(|| {
        let s = handle.stats();
        s.init_runs == 1 || s.blocked_callers > 0
    });
    let queued = handle.stats().queued;
    held.gate.open();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        queued <= 10,
        "the queue bounded at 10 took {queued} entries from init"
    );
}

// ---------------------------------------------------------------------------
// H5. The monitor's registry: two concurrent `live_tasks` calls (task_count()
// from a user thread, the monitor's own check) each compute a keep-mask by
// index and apply it to a list the other already compacted: a live task is
// unregistered, and never shrunk again.
// README: "Any other Shrinkable ... can register with register_shrinkable";
// MemoryMonitor::task_count: "dropped and stopped ones are forgotten" (only).
// ---------------------------------------------------------------------------
struct Fixed(u64);
impl MemoryProbe for Fixed {
    fn used_bytes(&self) -> Option<u64> {
        Some(self.0)
    }
}

struct Gated {
    first: AtomicBool,
    entered: Sender<()>,
    gate: Gate,
}
impl Shrinkable for Gated {
    fn name(&self) -> String {
        "gated".into()
    }
    fn memory_usage(&self) -> usize {
        0
    }
    fn shrink(&self) -> Result<(), ShrinkError> {
        Err(ShrinkError::MinimumSize)
    }
    fn expand(&self) {}
    fn is_shrunk(&self) -> bool {
        false
    }
    fn is_stopped(&self) -> bool {
        if self.first.swap(false, Ordering::SeqCst) {
            self.entered.send(()).unwrap();
            self.gate.wait();
        }
        false
    }
}

struct Plain;
impl Shrinkable for Plain {
    fn name(&self) -> String {
        "plain".into()
    }
    fn memory_usage(&self) -> usize {
        0
    }
    fn shrink(&self) -> Result<(), ShrinkError> {
        Err(ShrinkError::MinimumSize)
    }
    fn expand(&self) {}
    fn is_shrunk(&self) -> bool {
        false
    }
}

#[test]
fn h5_concurrent_registry_sweeps_do_not_unregister_a_live_task() {
    let monitor = MemoryMonitor::builder()
        .limit_bytes(1 << 40)
        .check_interval(Duration::MAX)
        .probe(Fixed(1))
        .start()
        .unwrap();
    let dead = Arc::new(Plain);
    monitor.register_shrinkable(&dead);
    drop(dead);
    let (entered_tx, entered) = unbounded();
    let gate = Gate::new();
    let gated = Arc::new(Gated {
        first: AtomicBool::new(true),
        entered: entered_tx,
        gate: gate.clone(),
    });
    monitor.register_shrinkable(&gated);
    let plain = Arc::new(Plain);
    monitor.register_shrinkable(&plain);
    let first = {
        let monitor = monitor.clone();
        std::thread::spawn(move || monitor.task_count())
    };
    recv(&entered); // the first sweep is between its two looks at the registry
    assert_eq!(monitor.task_count(), 2); // a second sweep compacts the registry
    gate.open();
    assert_eq!(first.join().unwrap(), 2);
    assert_eq!(
        monitor.task_count(),
        2,
        "a live, registered task was unregistered by a concurrent sweep"
    );
    drop((gated, plain));
}

// ---------------------------------------------------------------------------
// H6. MemoryMonitor::check_now from the monitor's own thread (here: an overflow
// handler run by the monitor's shrink, reason Shrink) hangs for ever, and with
// it every later check and the monitor's drop.
// README "Calls from inside the engine": "Handlers run on the thread that holds
// the entries ... A call that would wait for the very thread it runs on fails at
// once instead of hanging".
// ---------------------------------------------------------------------------
#[test]
fn h6_check_now_from_the_monitors_own_thread_does_not_hang() {
    let monitor = MemoryMonitor::builder()
        .limit_bytes(10)
        .check_interval(Duration::MAX)
        .probe(Fixed(1000)) // always over the limit
        .start()
        .unwrap();
    let (task, held) = held::<u32>();
    let books = held.books.clone();
    let (nested_tx, nested) = unbounded();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .memory_monitor(&monitor)
        .overflow_handler({
            let (books, monitor) = (books.clone(), monitor.clone());
            move |v: Vec<u32>, reason| {
                books.overflowed(&v);
                if reason == OverflowReason::Shrink {
                    // e.g. "shed work: check again whether that was enough"
                    nested_tx.send(monitor.check_now()).unwrap();
                }
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    recv(&held.started);
    books.push_back(&handle, vec![2, 3, 4, 5]).unwrap();
    let (outer_tx, outer) = unbounded();
    {
        let monitor = monitor.clone();
        std::thread::spawn(move || outer_tx.send(monitor.check_now()).unwrap());
    }
    let nested_result = nested.recv_timeout(HANG);
    let hung = nested_result.is_err();
    if hung {
        // The monitor thread is stuck for good: leak it rather than hang the
        // test binary in its drop.
        std::mem::forget(monitor);
    } else {
        assert!(matches!(recv(&outer), CheckOutcome::Shrunk(_)));
        assert_eq!(nested_result.unwrap(), CheckOutcome::NothingToShrink);
    }
    held.gate.open();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(!hung, "check_now from the monitor's own thread hung");
}

// ---------------------------------------------------------------------------
// H7. A worker whose failed batch has leftovers (dead letters, overflow) takes
// its NEXT batch before it calls the handler, and holds it while the handler
// runs. That batch has not started, yet front entries cannot pass it, and
// shutdown_timeout reports it as "still running" instead of handing it back.
// README "How it works": "Nothing is handed out ahead, so front entries,
// shrinks and shutdowns act on everything that has not started";
// "shutdown_timeout(d) drains until d has passed, then hands back everything
// not started".
// ---------------------------------------------------------------------------
/// The engine, its books, each batch as it runs, and a signal per handler call.
type DeadOnOne = (
    buffered_task::Handle<u32>,
    Arc<Books<u32>>,
    crossbeam_channel::Receiver<Vec<u32>>,
    crossbeam_channel::Receiver<()>,
);

fn dead_on_one(gate: &Gate) -> DeadOnOne {
    let (ran_tx, ran) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        if b == [1] {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let (in_tx, in_handler) = unbounded();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(RetryPolicy::new(1))
        .dead_letter_handler({
            let (books, gate) = (books.clone(), gate.clone());
            move |v: Vec<u32>, _| {
                books.dead_lettered(&v);
                in_tx.send(()).unwrap();
                gate.wait();
            }
        })
        .start()
        .unwrap();
    (handle, books, ran, in_handler)
}

#[test]
fn h7a_a_front_entry_goes_ahead_of_a_batch_that_has_not_started() {
    let gate = Gate::new();
    let (handle, books, ran, in_handler) = dead_on_one(&gate);
    books.push_back(&handle, vec![1, 2]).unwrap();
    assert_eq!(recv(&ran), vec![1]);
    recv(&in_handler); // [1] is dead; [2] has not started
    let during = handle.stats();
    books.push_front(&handle, vec![99]).unwrap();
    gate.open();
    let order = vec![recv(&ran), recv(&ran)];
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(
        (order, during.running, during.queued),
        (vec![vec![99], vec![2]], 0, 1),
        "(run order, stats.running and stats.queued while the handler ran)"
    );
}

#[test]
fn h7b_shutdown_timeout_hands_back_a_batch_that_has_not_started() {
    let gate = Gate::new();
    let (handle, books, ran, in_handler) = dead_on_one(&gate);
    books.push_back(&handle, vec![1, 2]).unwrap();
    assert_eq!(recv(&ran), vec![1]);
    recv(&in_handler);
    let report = handle.shutdown_timeout(Duration::from_millis(10)).unwrap();
    books.handed_back(&report.unprocessed);
    let got = (report.unprocessed.clone(), report.still_running);
    gate.open();
    let late = ran.recv_timeout(PATIENCE).ok();
    wait_until(|| handle.stats().processed == 1 || late.is_none());
    books.check();
    assert_eq!(
        (got, late),
        ((vec![2], 0), None),
        "((unprocessed, still_running), a run that began after shutdown_timeout returned)"
    );
}

// ---------------------------------------------------------------------------
// H8. The idle poll counts from a stale "went idle" instant: work handed to an
// idle engine (push/buffer + a worker taking it) does not clear `idle_since`,
// so after a run the next empty-init poll comes `idle_poll_delay` after the
// engine went idle the time BEFORE, not after it went idle now.
// README: "With poll, init runs again when the engine is idle: ... else once
// idle_poll_delay has passed since it went idle."
// ---------------------------------------------------------------------------
#[test]
fn h8_the_idle_poll_counts_from_when_the_engine_went_idle_last() {
    let clock = buffered_task::ManualClock::new();
    let gate = Gate::new();
    let (started_tx, started) = unbounded();
    let (ran_tx, ran) = unbounded();
    let (init_tx, inits) = unbounded();
    let waits = gate.clone();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        if b.contains(&1) {
            started_tx.send(()).unwrap();
            waits.wait();
        }
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    })
    .with_init(move |_: &mut Sink<u32>, _: &()| init_tx.send(()).unwrap());
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(10))
        .clock(&clock)
        .start()
        .unwrap();
    recv(&inits); // the first init, empty
    books.push_back(&handle, vec![0]).unwrap(); // warm-up: the worker has taken once
    assert_eq!(recv(&ran), vec![0]);
    wait_until(|| {
        let s = handle.stats();
        s.running == 0 && s.processed == 1 && s.init_runs == 1
    }); // idle from t0
    clock.advance(Duration::from_secs(1)); // the coordinator has armed the poll
    books.push_back(&handle, vec![1]).unwrap();
    recv(&started); // busy from t0+1 s
    clock.advance(Duration::from_secs(8));
    gate.open();
    assert_eq!(recv(&ran), vec![1]);
    wait_until(|| handle.stats().running == 0); // idle again at t0+9 s
    clock.advance(Duration::from_secs(1)); // t0+10 s: 1 s after it went idle
    let early = inits.recv_timeout(PATIENCE).is_ok();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !early,
        "init was polled 1 s after the engine went idle (idle_poll_delay 10 s)"
    );
}

// ---------------------------------------------------------------------------
// S1. Stress: under Block and Reject with every run succeeding (no retries, no
// shrink), buffered + queued never exceeds the bound and running never exceeds
// max_concurrency, at every observation; books balance.
// ---------------------------------------------------------------------------
#[test]
fn s1_the_bound_and_the_concurrency_hold_at_every_observation() {
    use rand::{Rng, SeedableRng};
    for (round, policy) in [
        OverflowPolicy::Block,
        OverflowPolicy::Reject,
        OverflowPolicy::Block,
    ]
    .into_iter()
    .enumerate()
    {
        let bound = 64;
        let conc = 3;
        // (init only under Block: under Reject it ignores the bound, see H4)
        let with_init = policy == OverflowPolicy::Block;
        let mut task = Script::new(|_: &[u64], _: &()| Outcome::Ok).with_init(move |sink, _| {
            if with_init {
                sink.extend(1_000_000..1_020_000u64);
            }
        });
        let books = task.books();
        if with_init {
            books.given(&(1_000_000..1_020_000u64).collect::<Vec<_>>());
        }
        let handle = Builder::new(task, ())
            .max_batch_size(7)
            .max_concurrency(conc)
            .max_queue_len(bound)
            .overflow_policy(policy)
            .flush_interval(Duration::from_millis(1))
            .poll(false)
            .start()
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..4u64)
            .map(|t| {
                let (handle, books) = (handle.clone(), books.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(round as u64 * 10 + t);
                    let mut next = (t + 1) * 1_000_000_000;
                    for _ in 0..5_000 {
                        let n = rng.gen_range(1..=9u64);
                        let ids: Vec<u64> = (next..next + n).collect();
                        next += n;
                        let p = if rng.gen_bool(0.3) {
                            Priority::Front
                        } else {
                            Priority::Back
                        };
                        let _ = match rng.gen_range(0..5) {
                            0 => books.push_front(&handle, ids),
                            1 => books.push_back(&handle, ids),
                            2 => books.buffer_timeout(&handle, ids, p, Duration::from_micros(50)),
                            _ => books.buffer(&handle, ids, p),
                        };
                    }
                })
            })
            .collect();
        let watcher = {
            let (handle, stop) = (handle.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut worst = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let st = handle.stats();
                    worst.0 = worst.0.max(st.buffered + st.queued);
                    worst.1 = worst.1.max(st.running);
                    if let Ok(c) = handle.debug_count() {
                        worst.1 = worst.1.max(c.running);
                    }
                }
                worst
            })
        };
        for p in producers {
            p.join().unwrap();
        }
        wait_until(|| handle.stats().init_runs == 1);
        stop.store(true, Ordering::Relaxed);
        let worst = watcher.join().unwrap();
        books.finish(handle.shutdown_drain().unwrap());
        assert!(
            worst.0 <= bound && worst.1 <= conc,
            "{policy:?}: worst buffered+queued {} (bound {bound}), worst running {} (max {conc})",
            worst.0,
            worst.1
        );
    }
}

// ---------------------------------------------------------------------------
// S2. Stress: shutdowns of every kind racing producers, init, retries with new
// entries and backoff, panics, shrink/expand/flush/poll_now and re-entrant
// handlers. Books must balance (eventually: late runs and handlers finish),
// no call may hang.
// ---------------------------------------------------------------------------
fn balanced<T: Clone + Ord + std::fmt::Debug + Send + 'static>(books: &Books<T>) -> Option<String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| books.check()))
        .err()
        .map(|e| e.downcast_ref::<String>().cloned().unwrap_or_default())
}

#[test]
fn s2_shutdowns_race_everything_and_books_balance() {
    use rand::{Rng, SeedableRng};
    quiet_panics();
    let rounds: u64 = std::env::var("S2_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base: u64 = std::env::var("S2_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for seed in base..base + rounds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let fresh_ids = Arc::new(AtomicU64::new(9_000_000_000));
        let weak: Arc<parking_lot::Mutex<Option<buffered_task::WeakHandle<u64>>>> =
            Default::default();
        let (f, w) = (fresh_ids.clone(), weak.clone());
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let mut task = Script::new(move |b: &[u64], _: &()| {
            let n = r.fetch_add(1, Ordering::Relaxed);
            let mut rng =
                rand::rngs::StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if rng.gen_ratio(1, 50) {
                let weak = w.lock().clone();
                if let Some(h) = weak.and_then(|w| w.upgrade()) {
                    let _ = h.flush();
                    let _ = h.debug_count();
                    let _ = h.poll_now();
                }
            }
            match rng.gen_range(0..100) {
                0..=2 => panic!("deliberate s2 panic"),
                3..=7 => Outcome::Retry,
                8..=14 => {
                    let mut again: Vec<u64> =
                        b.iter().copied().filter(|_| rng.gen_bool(0.5)).collect();
                    if rng.gen_bool(0.3) {
                        let k = rng.gen_range(1..=3);
                        let start = f.fetch_add(k, Ordering::Relaxed);
                        again.extend(start..start + k);
                    }
                    Outcome::RetryEntries(again)
                }
                _ => Outcome::Ok,
            }
        });
        let init_ids = Arc::new(AtomicU64::new(5_000_000_000));
        let ii = init_ids.clone();
        let books_for_init: Arc<parking_lot::Mutex<Option<Arc<Books<u64>>>>> = Default::default();
        let bi = books_for_init.clone();
        task = task.with_init(move |sink, _| {
            let n = 200;
            let start = ii.fetch_add(n, Ordering::Relaxed);
            let ids: Vec<u64> = (start..start + n).collect();
            if let Some(b) = bi.lock().as_ref() {
                b.given(&ids);
            }
            for id in ids {
                sink.push(id);
            }
        });
        let books = task.books();
        *books_for_init.lock() = Some(books.clone());
        let policy = match rng.gen_range(0..3) {
            0 => OverflowPolicy::DropNewest,
            1 => OverflowPolicy::Reject,
            _ => OverflowPolicy::Block,
        };
        let conc = rng.gen_range(1..=4);
        let mut builder = Builder::new(task, ())
            .name("s2")
            .max_batch_size(rng.gen_range(1..=16))
            .max_concurrency(conc)
            .max_queue_len(rng.gen_range(1..=300))
            .overflow_policy(policy)
            .flush_interval(Duration::from_millis(rng.gen_range(1..=3)))
            .poll(rng.gen_bool(0.5))
            .idle_poll_delay(Duration::from_millis(1));
        let with_policy = rng.gen_bool(0.5);
        if with_policy {
            let b = books.clone();
            builder = builder
                .retry_policy(RetryPolicy::new(rng.gen_range(1..=4)).backoff(
                    Duration::from_micros(rng.gen_range(0..300)),
                    Duration::from_millis(1),
                ))
                .dead_letter_handler(move |v, _| b.dead_lettered(&v));
        }
        let b = books.clone();
        let w2 = weak.clone();
        builder = builder.overflow_handler(move |v: Vec<u64>, _| {
            b.overflowed(&v);
            let weak = w2.lock().clone();
            if let Some(h) = weak.and_then(|w| w.upgrade()) {
                let _ = h.stats();
            }
        });
        let handle = builder.start().unwrap();
        *weak.lock() = Some(handle.downgrade());
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..3u64)
            .map(|t| {
                let (handle, books, stop) = (handle.clone(), books.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 100 + t);
                    let mut next = (t + 1) * 1_000_000_000;
                    while !stop.load(Ordering::Relaxed) {
                        let n = rng.gen_range(1..=9u64);
                        let ids: Vec<u64> = (next..next + n).collect();
                        next += n;
                        let p = if rng.gen_bool(0.3) {
                            Priority::Front
                        } else {
                            Priority::Back
                        };
                        let r = match rng.gen_range(0..6) {
                            0 => books.push_front(&handle, ids),
                            1 => books.push_back(&handle, ids),
                            2 => books.buffer_timeout(&handle, ids, p, Duration::from_micros(200)),
                            3 => books
                                .buffer_one(&handle, ids[0], p)
                                .and_then(|_| books.buffer(&handle, ids[1..].to_vec(), p)),
                            _ => books.buffer(&handle, ids, p),
                        };
                        if matches!(r, Err(buffered_task::BufferError::Stopped(_))) {
                            break;
                        }
                    }
                })
            })
            .collect();
        let chaos = {
            let (handle, stop) = (handle.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 7);
                let mut worst = 0;
                while !stop.load(Ordering::Relaxed) {
                    match rng.gen_range(0..40) {
                        0 => {
                            let _ = handle.shrink();
                        }
                        1..=4 => {
                            let _ = handle.expand();
                        }
                        5..=9 => {
                            let _ = handle.flush();
                        }
                        10 => {
                            let _ = handle.poll_now();
                        }
                        _ => {
                            if let Ok(c) = handle.debug_count() {
                                worst = worst.max(c.running);
                            }
                        }
                    }
                    std::thread::yield_now();
                }
                worst
            })
        };
        // Let it run for a while (measured in runs, not time).
        let target = rng.gen_range(10..400);
        eventually(|| {
            let done = runs.load(Ordering::Relaxed);
            (done < target && !handle.is_stopped()).then(|| {
                format!(
                    "seed {seed} (policy {policy:?}, retry policy {with_policy}): stalled after {done} runs: {:?}",
                    handle.stats()
                )
            })
        });
        let mode = rng.gen_range(0..3);
        let (done_tx, done) = unbounded();
        let stopper = {
            let handle = handle.clone();
            let d = Duration::from_millis(rng.gen_range(0..5));
            std::thread::spawn(move || {
                let r = match mode {
                    0 => handle.shutdown_drain(),
                    1 => handle.shutdown_return(),
                    _ => handle.shutdown_timeout(d),
                };
                let _ = done_tx.send(());
                r
            })
        };
        if done.recv_timeout(HANG).is_err() {
            panic!(
                "seed {seed}: shutdown mode {mode} hung ({:?})",
                handle.stats()
            );
        }
        let report = stopper.join().unwrap().unwrap();
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            p.join().unwrap();
        }
        let worst = chaos.join().unwrap();
        books.handed_back(&report.unprocessed);
        // Late runs and handlers may still be finishing.
        eventually(|| {
            balanced(&books).map(|problem| {
                format!("seed {seed} (policy {policy:?}, retry policy {with_policy}, mode {mode}): {problem}")
            })
        });
        assert!(worst <= conc, "seed {seed}: running {worst} > {conc}");
        drop(handle);
    }
}

// ---------------------------------------------------------------------------
// H10. shutdown_return under a bounded DropNewest queue: `close` first flushes
// the buffers into the full queue, so accepted, buffered entries go to the
// overflow handler as `Full` instead of coming back in the report.
// README: "shutdown_return() waits for running batches and hands back every
// unprocessed entry"; ShutdownReport::unprocessed: "in queue order (front
// buffer, queue, retries, back buffer)".
// ---------------------------------------------------------------------------
#[test]
fn h10_shutdown_return_hands_back_buffered_entries() {
    let (task, held) = held::<u32>();
    let books = held.books.clone();
    let (of_tx, overflowed) = unbounded();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(1)
        .max_queue_len(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler({
            let books = books.clone();
            move |v: Vec<u32>, r| {
                books.overflowed(&v);
                of_tx.send((v, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    recv(&held.started);
    books.push_back(&handle, vec![2, 3]).unwrap(); // the queue is at its bound
    books.buffer(&handle, vec![4, 5], Priority::Back).unwrap(); // accepted: Ok(())
    let stopper = {
        let (handle, books) = (handle.clone(), books.clone());
        std::thread::spawn(move || books.finish(handle.shutdown_return().unwrap()))
    };
    wait_until(|| handle.is_stopped());
    held.gate.open();
    let report = stopper.join().unwrap();
    let lost_to_overflow: Vec<_> = overflowed.try_iter().collect();
    assert_eq!(
        (report.unprocessed, lost_to_overflow),
        (vec![2, 3, 4, 5], vec![]),
        "(handed back, overflowed) by shutdown_return"
    );
}

// ---------------------------------------------------------------------------
// H11. Once a shutdown has begun (is_stopped() == true), shrink() still
// succeeds and sheds entries that shutdown_drain promised to run (the memory
// monitor can do the same during any drain).
// Handle::shrink: "ShrinkError::Stopped once the engine has stopped";
// Handle::is_stopped: "a shutdown has begun"; shutdown_drain: "runs everything
// left".
// ---------------------------------------------------------------------------
#[test]
fn h11_a_drain_in_progress_is_not_shed_by_shrink() {
    let (task, held) = held::<u32>();
    let books = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler({
            let books = books.clone();
            move |v: Vec<u32>, _| books.overflowed(&v)
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2, 3, 4, 5]).unwrap();
    recv(&held.started);
    let stopper = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.shutdown_drain().unwrap())
    };
    wait_until(|| handle.is_stopped());
    let shrink = handle.shrink();
    held.gate.open();
    let report = books.finish(stopper.join().unwrap());
    let ran: Vec<Vec<u32>> = held.ran.try_iter().collect();
    assert!(report.unprocessed.is_empty());
    assert_eq!(
        (shrink, ran.len()),
        (Err(ShrinkError::Stopped), 5),
        "(shrink during the drain, batches the drain ran)"
    );
}

// ---------------------------------------------------------------------------
// H12. The weigher is user code (README lists it among the handlers) but its
// Drop is not contained like the overflow / dead-letter handlers' are: a panic
// there escapes the user's `drop(handle)`.
// README: "All user code is contained"; overflow.rs Reporter::drop: "The
// handlers are user values: their drops run contained".
// ---------------------------------------------------------------------------
#[test]
fn h12_a_weigher_whose_drop_panics_is_contained() {
    quiet_panics();
    struct Bomb;
    impl Drop for Bomb {
        fn drop(&mut self) {
            panic!("deliberate: weigher capture dropped");
        }
    }
    let bomb = Bomb;
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Ok), ())
        .poll(false)
        .weigher(move |_: &u32| {
            let _ = &bomb;
            0
        })
        .start()
        .unwrap();
    let escaped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(handle))).is_err();
    assert!(
        !escaped,
        "a panic in the weigher's drop escaped drop(handle)"
    );
}

// ---------------------------------------------------------------------------
// H13. A run reported stuck by the watchdog is never "logged again if it ever
// returns" (nothing in the crate logs its return).
// Builder::run_deadline: "a run older than `deadline` is logged at warn (batch
// size and age) once, counted in Stats::stuck_runs, and logged again if it
// ever returns".
// ---------------------------------------------------------------------------
struct Capture(parking_lot::Mutex<Vec<String>>);
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        self.0
            .lock()
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}
static CAPTURE: Capture = Capture(parking_lot::Mutex::new(Vec::new()));

fn captured(engine: &str) -> Vec<String> {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        log::set_logger(&HookLogger).unwrap();
        log::set_max_level(log::LevelFilter::Trace);
    });
    CAPTURE
        .0
        .lock()
        .iter()
        .filter(|l| l.contains(engine))
        .cloned()
        .collect()
}

#[test]
fn h13_a_stuck_run_that_returns_is_logged_again() {
    let _ = captured("h13");
    let clock = buffered_task::ManualClock::new();
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .name("h13")
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .run_deadline(Duration::from_millis(10))
        .clock(&clock)
        .start()
        .unwrap();
    held.books.push_back(&handle, vec![1]).unwrap();
    recv(&held.started);
    clock.advance(Duration::from_millis(10));
    assert_eq!(handle.stats().stuck_runs, 1);
    let returned = |lines: &[String]| {
        lines
            .iter()
            .filter(|l| l.contains("a stuck run of 1 entries returned"))
            .count()
    };
    assert_eq!(returned(&captured("h13")), 0);
    held.gate.open();
    recv(&held.ran);
    held.books.finish(handle.shutdown_drain().unwrap());
    let after = captured("h13");
    assert_eq!(
        returned(&after),
        1,
        "no line said the stuck run returned; all lines: {after:?}"
    );
}

// ---------------------------------------------------------------------------
// S3. Stress: the last handle is dropped by whichever thread lets go last,
// often inside `run` (a WeakHandle upgraded there), while producers, retries
// and init are in flight. Books must balance once every thread is done.
// ---------------------------------------------------------------------------
#[test]
fn s3_the_last_handle_dropped_anywhere_loses_nothing() {
    use rand::{Rng, SeedableRng};
    quiet_panics();
    let rounds: u64 = std::env::var("S3_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    for seed in 0..rounds {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let weak: Arc<parking_lot::Mutex<Option<buffered_task::WeakHandle<u64>>>> =
            Default::default();
        let w = weak.clone();
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        let mut task = Script::new(move |b: &[u64], _: &()| {
            let n = r.fetch_add(1, Ordering::Relaxed);
            let weak = w.lock().clone();
            let h = weak.and_then(|w| w.upgrade()); // may become the last handle
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ n.wrapping_mul(31));
            std::thread::yield_now();
            drop(h);
            match rng.gen_range(0..10) {
                0 => panic!("deliberate s3"),
                1 => Outcome::Retry,
                2 => Outcome::RetryEntries(b.iter().copied().step_by(2).collect()),
                _ => Outcome::Ok,
            }
        });
        let books = task.books();
        let b = books.clone();
        let handle = Builder::new(task, ())
            .max_batch_size(rng.gen_range(1..=8))
            .max_concurrency(rng.gen_range(1..=4))
            .flush_interval(Duration::from_millis(1))
            .poll(false)
            .overflow_handler(move |v: Vec<u64>, _| b.overflowed(&v))
            .start()
            .unwrap();
        *weak.lock() = Some(handle.downgrade());
        let producer = {
            let (handle, books) = (handle.clone(), books.clone());
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let ids = vec![i * 2, i * 2 + 1];
                    if books.buffer(&handle, ids, Priority::Back).is_err() {
                        break;
                    }
                }
            })
        };
        let target = rng.gen_range(1..50);
        wait_until(|| runs.load(Ordering::Relaxed) >= target);
        drop(handle);
        producer.join().unwrap();
        eventually(|| balanced(&books).map(|problem| format!("seed {seed}: {problem}")));
    }
}

// ---------------------------------------------------------------------------
// H14. The user's logger (a `log::Log`, user code) is called under the engine's
// state lock: Store::apply logs "run panicked" while the lock is held
// (src/store/handout.rs:211). A logger that reads the engine (or is merely
// slow) blocks every worker, flush, count and stats for that long, and one
// that calls the engine from the same thread deadlocks it.
// src/store/mod.rs: "each a short critical section that never calls user code".
// ---------------------------------------------------------------------------
type Hook = Box<dyn Fn(&str) + Send + Sync>;
static LOG_HOOK: parking_lot::Mutex<Option<Hook>> = parking_lot::Mutex::new(None);
struct HookLogger;
impl log::Log for HookLogger {
    fn enabled(&self, _: &log::Metadata) -> bool {
        true
    }
    fn log(&self, record: &log::Record) {
        let line = format!("{}", record.args());
        CAPTURE
            .0
            .lock()
            .push(format!("{} {}", record.level(), line));
        let hook = LOG_HOOK.lock().take();
        if let Some(hook) = hook {
            hook(&line);
            *LOG_HOOK.lock() = Some(hook);
        }
    }
    fn flush(&self) {}
}

#[test]
fn h14_the_logger_is_not_called_under_the_engines_lock() {
    quiet_panics();
    let _ = captured("h14"); // installs the capturing, hookable logger
    let mut task = Script::new(|b: &[u32], _: &()| {
        if b.contains(&7) {
            panic!("deliberate h14");
        }
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .name("h14")
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    let (verdict_tx, verdict) = unbounded();
    let weak = handle.downgrade();
    *LOG_HOOK.lock() = Some(Box::new(move |line: &str| {
        if !(line.starts_with("h14:") && line.contains("run panicked")) {
            return;
        }
        // Another thread reads the engine while the logger runs.
        let (tx, rx) = unbounded();
        let weak = weak.clone();
        std::thread::spawn(move || {
            if let Some(h) = weak.upgrade() {
                let _ = h.stats();
            }
            let _ = tx.send(());
        });
        let _ = verdict_tx.send(rx.recv_timeout(HANG).is_ok());
    }));
    books.push_back(&handle, vec![7]).unwrap();
    let could_read = recv(&verdict);
    *LOG_HOOK.lock() = None;
    // Let the retried entry succeed and finish cleanly.
    books.finish(handle.shutdown_return().unwrap());
    assert!(
        could_read,
        "stats() could not complete while the logger was running: the logger runs under the state lock"
    );
}

// ---------------------------------------------------------------------------
// H9 (design hazard). After a shrink, a Block hand-over of more entries than
// the shrunk bound (but within the configured one) waits for `expand` even on
// an empty, idle engine: nothing else can ever make room. With the memory
// monitor, expand needs the RSS to fall to 40 % of the limit, which freed heap
// often does not do, so `buffer` hangs for good (and an overflow handler that
// re-buffers shed entries on the monitor's thread deadlocks the monitor).
// OverflowPolicy::Block: "A hand-over waits until there is room"; "A call with
// more entries than the configured bound can never fit and fails with Full".
// ---------------------------------------------------------------------------
#[test]
fn h9_block_after_a_shrink_on_an_empty_engine() {
    let (task, held) = held::<u32>();
    let books = held.books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(10)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler({
            let books = books.clone();
            move |v: Vec<u32>, _| books.overflowed(&v)
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![1, 2, 3, 4]).unwrap();
    recv(&held.started);
    handle.shrink().unwrap(); // queue [2, 3, 4] -> [2], bound 1
    held.gate.open();
    wait_until(|| {
        let c = handle.debug_count().unwrap();
        c.waiting == 0 && c.running == 0
    });
    let r = books.buffer_timeout(&handle, vec![10, 11], Priority::Back, HANG);
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        r.is_ok(),
        "a 2-entry hand-over under a 10-entry bound timed out on an empty engine: {r:?}"
    );
}

// ---------------------------------------------------------------------------
// S4. Exactness while entries move between the buffers and the queue (auto
// flush, ticks, flush()): with every run held, waiting + running entries must
// lie between what was accepted before a count and what was given after it,
// and never go down.
// ---------------------------------------------------------------------------
#[test]
fn s4_counts_are_exact_while_entries_are_in_transit() {
    use rand::{Rng, SeedableRng};
    let (task, held) = held::<u64>();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(Duration::from_millis(1))
        .poll(false)
        .start()
        .unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let given = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let producers: Vec<_> = (0..3u64)
        .map(|t| {
            let (handle, books, accepted, given) = (
                handle.clone(),
                held.books.clone(),
                accepted.clone(),
                given.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                let mut next = (t + 1) * 1_000_000_000;
                for _ in 0..20_000 {
                    let n = rng.gen_range(1..=5u64);
                    let ids: Vec<u64> = (next..next + n).collect();
                    next += n;
                    given.fetch_add(n, Ordering::SeqCst);
                    let p = if rng.gen_bool(0.3) {
                        Priority::Front
                    } else {
                        Priority::Back
                    };
                    match rng.gen_range(0..5) {
                        0 => books.push_front(&handle, ids).unwrap(),
                        1 => books.push_back(&handle, ids).unwrap(),
                        2 => {
                            for id in ids {
                                books.buffer_one(&handle, id, p).unwrap();
                            }
                        }
                        _ => books.buffer(&handle, ids, p).unwrap(),
                    }
                    accepted.fetch_add(n, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let flusher = {
        let (handle, stop) = (handle.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                handle.flush().unwrap();
            }
        })
    };
    let mut last = 0;
    let mut bad = None;
    let mut looks = 0u64;
    while producers.iter().any(|p| !p.is_finished()) {
        let lo = accepted.load(Ordering::SeqCst);
        let (a, b) = if looks % 2 == 0 {
            let c = handle.debug_count().unwrap();
            (c.waiting as u64, c.running as u64)
        } else {
            let s = handle.stats();
            (s.buffered as u64 + s.queued as u64, s.running as u64)
        };
        let hi = given.load(Ordering::SeqCst);
        let total = a + b; // batch size 1: one entry per running batch
        if total < lo || total > hi || total < last {
            bad = Some((lo, total, hi, last));
            break;
        }
        last = total;
        looks += 1;
    }
    for p in producers {
        p.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    flusher.join().unwrap();
    held.gate.open();
    held.books.finish(handle.shutdown_drain().unwrap());
    assert!(
        bad.is_none(),
        "(accepted before, counted, given after, previous count): {bad:?} after {looks} looks"
    );
}

// S5. Extremes: batch 1, 16 workers, a queue of 1, Block and Reject; nothing
// hangs, the bound holds, books balance.
#[test]
fn s5_batch_one_many_workers_queue_of_one() {
    for policy in [
        OverflowPolicy::Block,
        OverflowPolicy::Reject,
        OverflowPolicy::DropNewest,
    ] {
        let mut task = Script::new(|_: &[u64], _: &()| Outcome::Ok);
        let books = task.books();
        let b = books.clone();
        let handle = Builder::new(task, ())
            .max_batch_size(1)
            .max_concurrency(16)
            .max_queue_len(1)
            .overflow_policy(policy)
            .flush_interval(Duration::from_millis(1))
            .poll(false)
            .overflow_handler(move |v: Vec<u64>, _| b.overflowed(&v))
            .start()
            .unwrap();
        let producers: Vec<_> = (0..4u64)
            .map(|t| {
                let (handle, books) = (handle.clone(), books.clone());
                std::thread::spawn(move || {
                    let mut worst = 0;
                    for i in 0..5_000u64 {
                        let id = t * 1_000_000 + i;
                        let _ = if i % 3 == 0 {
                            books.push_front(&handle, vec![id])
                        } else {
                            books.buffer_one(&handle, id, Priority::Back)
                        };
                        let s = handle.stats();
                        worst = worst.max(s.buffered + s.queued);
                    }
                    worst
                })
            })
            .collect();
        let worst: usize = producers
            .into_iter()
            .map(|p| p.join().unwrap())
            .max()
            .unwrap();
        books.finish(handle.shutdown_drain().unwrap());
        if policy != OverflowPolicy::DropNewest {
            assert!(worst <= 1, "{policy:?}: buffered + queued reached {worst}");
        }
    }
}

// ---------------------------------------------------------------------------
// H6b. An overflow handler (allowed to call its engine's handle) that puts shed
// entries back with `buffer` under Block, on the monitor's thread: the shed
// half is larger than the shrunk bound, so the call waits for an `expand` that
// only this (now blocked) monitor thread would do. The monitor hangs for good.
// README "Calls from inside the engine": "A call that would wait for the very
// thread it runs on fails at once instead of hanging".
// ---------------------------------------------------------------------------
#[test]
fn h6b_a_block_hand_over_on_the_monitor_thread_does_not_hang_the_monitor() {
    let monitor = MemoryMonitor::builder()
        .limit_bytes(10)
        .check_interval(Duration::MAX)
        .probe(Fixed(1000))
        .start()
        .unwrap();
    let (task, held) = held::<u32>();
    let books = held.books.clone();
    let weak: Arc<parking_lot::Mutex<Option<buffered_task::WeakHandle<u32>>>> = Default::default();
    let w = weak.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(10)
        .overflow_policy(OverflowPolicy::Block)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .memory_monitor(&monitor)
        .overflow_handler({
            let books = books.clone();
            move |v: Vec<u32>, reason| {
                let weak = w.lock().clone();
                match (reason, weak.and_then(|w| w.upgrade())) {
                    // Shed by memory pressure: keep them, just later.
                    (OverflowReason::Shrink, Some(h)) => {
                        if let Err(e) = h.buffer(v, Priority::Back) {
                            books.overflowed(&e.into_entries());
                        }
                    }
                    _ => books.overflowed(&v),
                }
            }
        })
        .start()
        .unwrap();
    *weak.lock() = Some(handle.downgrade());
    books.push_back(&handle, vec![1, 2, 3, 4]).unwrap();
    recv(&held.started); // queue [2, 3, 4]
    let (tx, rx) = unbounded();
    {
        let monitor = monitor.clone();
        std::thread::spawn(move || tx.send(monitor.check_now()).unwrap());
    }
    wait_until(|| handle.is_shrunk().unwrap()); // [3, 4] shed, bound 1
    held.gate.open(); // the engine drains what it kept
    let outcome = rx.recv_timeout(HANG);
    let hung = outcome.is_err();
    if hung {
        std::mem::forget(monitor); // its thread is stuck for good
        let _ = handle.expand(); // lets the stuck hand-over in, to clean up
    }
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !hung,
        "the monitor thread hung in a Block hand-over after its own shrink"
    );
}

// OK1 (held up). shutdown_timeout returns while `init` is stuck, and what the
// late init streams goes to the overflow handler as Shutdown, once.
#[test]
fn ok1_shutdown_timeout_with_a_stuck_init() {
    let gate = Gate::new();
    let g = gate.clone();
    let (in_tx, in_init) = unbounded();
    let mut task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |sink, _| {
        sink.extend(0..3);
        in_tx.send(()).unwrap();
        g.wait();
        sink.extend(3..10);
    });
    let books = task.books();
    books.given(&(0..10).collect::<Vec<_>>());
    let (of_tx, of) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .overflow_handler(move |v: Vec<u32>, r| {
            b.overflowed(&v);
            of_tx.send(r).unwrap();
        })
        .start()
        .unwrap();
    recv(&in_init);
    let report = handle.shutdown_timeout(Duration::from_millis(20)).unwrap();
    books.handed_back(&report.unprocessed);
    gate.open();
    assert_eq!(recv(&of), OverflowReason::Shutdown);
    wait_until(|| handle.stats().init_runs == 1);
    books.check();
}

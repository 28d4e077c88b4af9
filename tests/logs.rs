//! Log hygiene: under a sustained overload, one line a second per engine for
//! overflow, dead letters, failed runs and panicked runs, each saying how many
//! went since.

mod common;
use buffered_task::{Builder, FlushInterval, ManualClock, Outcome, Priority, RetryPolicy};
use common::*;
use parking_lot::Mutex;
use std::time::Duration;

static LINES: Mutex<Vec<(log::Level, String)>> = Mutex::new(Vec::new());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        LINES
            .lock()
            .push((record.level(), record.args().to_string()));
    }
    fn flush(&self) {}
}

fn warns(engine: &str, about: &str) -> Vec<String> {
    lines(log::Level::Warn, engine, about)
}

fn lines(level: log::Level, engine: &str, about: &str) -> Vec<String> {
    LINES
        .lock()
        .iter()
        .filter(|(l, m)| *l == level && m.starts_with(engine) && m.contains(about))
        .map(|(_, m)| m.clone())
        .collect()
}

#[test]
fn overflow_and_dead_letter_lines_are_rate_limited() {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    let clock = ManualClock::new();
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .name("flooded")
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    handle.push_back(vec![0, 1]).unwrap(); // 0 runs (held), 1 fills the queue
    recv(&held.started);
    for i in 2..1002 {
        handle.push_back(vec![i]).unwrap(); // each overflows
    }
    assert_eq!(handle.stats().overflowed_full, 1000);
    assert_eq!(
        warns("flooded", "unprocessed").len(),
        1,
        "one line for 1000 events"
    );
    clock.advance(Duration::from_secs(1));
    handle.push_back(vec![5000]).unwrap();
    let lines = warns("flooded", "unprocessed");
    assert_eq!(lines.len(), 2);
    assert!(
        lines[1].contains("(1000 entries in 1000 events since the last such line)"),
        "{}",
        lines[1]
    );
    held.gate.open();
    handle.shutdown_drain().unwrap();

    let dead = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Retry), ())
        .name("doomed")
        .max_batch_size(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .retry_policy(RetryPolicy::new(1))
        .start()
        .unwrap();
    dead.buffer((0..200).collect(), Priority::Back).unwrap();
    dead.flush().unwrap();
    wait_until(|| dead.stats().dead_lettered == 200);
    assert_eq!(warns("doomed", "dead-lettered").len(), 1);
    dead.shutdown_drain().unwrap();
}

#[test]
fn failed_and_panicked_run_lines_are_rate_limited() {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    quiet_panics();
    let clock = ManualClock::new();
    let engine = |name: &str, run: fn(&[u32]) -> Outcome<u32, ()>| {
        Builder::new(Script::new(move |b: &[u32], _: &()| run(b)), ())
            .name(name)
            .max_batch_size(1)
            .max_concurrency(1)
            .flush_interval(FlushInterval::Never)
            .poll(false)
            .clock(&clock)
            .retry_policy(RetryPolicy::new(2).backoff(Duration::ZERO, Duration::ZERO))
            .start()
            .unwrap()
    };
    let failing = engine("failing", |_| Outcome::fail("the node is down"));
    let panicking = engine("panicking", |_| panic!("decoder bug"));
    for handle in [&failing, &panicking] {
        handle.buffer((0..100).collect(), Priority::Back).unwrap();
        handle.flush().unwrap();
        wait_until(|| handle.stats().dead_lettered == 100);
    }
    // 100 runs failed (and 100 more dead-lettered): one line each so far,
    // with the run's error and the panic's message.
    let failed = warns("failing", "run failed");
    assert_eq!(failed.len(), 1);
    assert!(failed[0].contains("the node is down"), "{}", failed[0]);
    let panicked = lines(log::Level::Error, "panicking", "run panicked");
    assert_eq!(panicked.len(), 1);
    assert!(panicked[0].contains("decoder bug"), "{}", panicked[0]);
    clock.advance(Duration::from_secs(1));
    failing.buffer(vec![7], Priority::Back).unwrap();
    failing.flush().unwrap();
    wait_until(|| failing.stats().dead_lettered == 101);
    let said = warns("failing", "run failed");
    assert_eq!(said.len(), 2, "{said:?}");
    // 99 more first attempts and 100 last ones, one entry each, then entry 7.
    assert!(
        said[1].contains("(200 entries in 200 events since"),
        "{}",
        said[1]
    );
    failing.shutdown_drain().unwrap();
    panicking.shutdown_drain().unwrap();
}

/// The entries a set of warn lines about `about` accounts for: a line's own
/// count, or, where it sums up quiet events, the sum it gives.
fn entries_logged(engine: &str, about: &str) -> u64 {
    let number = |text: &str| -> u64 {
        let digits: String = text.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("no count in {text:?}"))
    };
    warns(engine, about)
        .iter()
        .map(|line| {
            let rest = &line[engine.len() + 2..];
            match line.rfind(" (") {
                Some(at) if line.ends_with("since the last such line)") => number(&line[at + 2..]),
                _ => number(rest),
            }
        })
        .sum()
}

/// What the rate limit kept quiet is logged when the engine stops: no count
/// waits for a later line that never comes.
#[test]
fn quiet_counts_are_logged_when_the_engine_stops() {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    let clock = ManualClock::new();
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .name("hushed")
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    handle.push_back(vec![0, 1]).unwrap();
    recv(&held.started);
    for i in 2..12 {
        handle.push_back(vec![i]).unwrap(); // each overflows: one line
    }
    assert_eq!(warns("hushed", "unprocessed").len(), 1);
    held.gate.open();
    handle.shutdown_drain().unwrap();
    assert_eq!(handle.stats().overflowed_full, 10);
    assert_eq!(entries_logged("hushed", "unprocessed"), 10);
}

/// Entries dropped with the last handle are logged even right after another
/// overflow line (the rate limit would have kept them quiet for good: with
/// the handle gone, no later line and no `stats()` could tell of them). The
/// last handle is dropped inside a run, so that nothing else runs meanwhile.
#[test]
fn entries_dropped_with_the_last_handle_are_logged_after_a_recent_line() {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Trace);
    let clock = ManualClock::new();
    let slot: std::sync::Arc<Mutex<Option<buffered_task::Handle<u32>>>> = Default::default();
    let (go_tx, go) = crossbeam_channel::unbounded::<()>();
    let (started_tx, started) = crossbeam_channel::unbounded::<()>();
    let (done_tx, done) = crossbeam_channel::unbounded::<()>();
    let s = slot.clone();
    let task = Script::new(move |batch: &[u32], _: &()| {
        if batch == [0] {
            started_tx.send(()).unwrap();
            recv(&go);
            drop(s.lock().take()); // the last handle
            done_tx.send(()).unwrap();
        }
        Outcome::Ok
    });
    let handle = Builder::new(task, ())
        .name("orphaned")
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .start()
        .unwrap();
    handle.push_back(vec![0]).unwrap();
    recv(&started);
    handle.push_back(vec![1, 2, 3, 4]).unwrap(); // 4 overflows: a line
    assert_eq!(entries_logged("orphaned", "unprocessed"), 1);
    *slot.lock() = Some(handle);
    go_tx.send(()).unwrap();
    recv(&done);
    // 1 overflowed, 3 dropped with the handle (1, 2, 3 were queued).
    assert_eq!(entries_logged("orphaned", "unprocessed"), 4);
}

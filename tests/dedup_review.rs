//! Key de-duplication, found by a second hostile review (after the fixes in
//! `tests/dedup_refused.rs`): user code (the logger, a key's `Drop`, the
//! weigher) reached under a lock or waiting for itself, a push a bound then
//! refuses racing a retry, the table made wary for good, `init` entries never
//! dropped at once, `still_running` counting duplicates. Each test states the
//! order of events it forces and the promise it holds the engine to. (A key
//! function that changes an entry's key is a broken contract, documented on
//! `dedup_by_key`, and not tested as a promise.)
mod common;
use buffered_task::{
    Builder, ControlError, FlushInterval, IdleError, OverflowPolicy, OverflowReason, Priority,
    WeakHandle,
};
use common::*;
use crossbeam_channel::{unbounded, Sender};
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

type Entry = (u32, u32);

/// Whether the callers' lock is held right now, looked at from the thread
/// that may hold it: `flush_timeout` cannot take it (parking_lot's locks are
/// not re-entrant, so a `buffer` or `stats` here would deadlock instead).
fn callers_lock_held(h: &WeakHandle<Entry>) -> Option<bool> {
    let h = h.upgrade()?;
    Some(matches!(
        h.flush_timeout(Duration::from_millis(50)),
        Err(ControlError::Timeout)
    ))
}

// ---------------------------------------------------------------------------
// 1. The logger runs under the callers' lock when a key's Eq panics during a
//    hand-over.
// ---------------------------------------------------------------------------

/// Where the test logger reports: the engine to look at, and where to say
/// whether the callers' lock was held when the line was logged.
static LOG_PROBE: Mutex<Option<(WeakHandle<Entry>, Sender<bool>)>> = Mutex::new(None);

struct ProbingLogger;

impl log::Log for ProbingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let line = record.args().to_string();
        if !line.contains("deliberate-log-probe") {
            return;
        }
        let probe = LOG_PROBE.lock().clone();
        if let Some((h, tx)) = probe {
            if let Some(held) = callers_lock_held(&h) {
                let _ = tx.send(held);
            }
        }
    }
    fn flush(&self) {}
}

fn install_logger() {
    static LOGGER: ProbingLogger = ProbingLogger;
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let _ = log::set_logger(&LOGGER);
        log::set_max_level(log::LevelFilter::Warn);
    });
}

/// A key whose `Eq` panics when either side is tagged 99 (hashed by `id`).
struct LogKey {
    id: u32,
    poisoned: bool,
}

impl std::hash::Hash for LogKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialEq for LogKey {
    fn eq(&self, other: &Self) -> bool {
        if self.poisoned || other.poisoned {
            panic!("deliberate-log-probe: a key's Eq panicked");
        }
        self.id == other.id
    }
}
impl Eq for LogKey {}

/// The logger is user code: the engine's own rule is that it is "never
/// called under the lock" (`store/handout.rs`, `Leftovers::logs`), and the
/// docs name the key's `Eq` as the only user code run under the engine's
/// locks. Order: the worker is busy; (1, 0) is buffered (its key waits);
/// (1, 99) is buffered: under the callers' lock its `Eq` panics, is caught
/// in `Hashed::eq`, and `with_marks` calls `break_down`, which logs at error
/// level while the hand-over still holds the callers' lock. A logger that
/// called `stats()` or `buffer()` (say, to attach engine state to error
/// lines) would deadlock; this one only looks, with `flush_timeout`.
#[test]
fn an_eq_panic_in_a_hand_over_is_logged_outside_the_callers_lock() {
    quiet_panics();
    install_logger();
    let (task, started, permit, books) = permitted(|_| false);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| LogKey {
            id: e.0,
            poisoned: e.1 == 99,
        })
        .start()
        .unwrap();
    let (saw_tx, saw) = unbounded();
    *LOG_PROBE.lock() = Some((handle.downgrade(), saw_tx));
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.buffer(&handle, vec![(1, 0)], Priority::Back).unwrap();
    books
        .buffer(&handle, vec![(1, 99)], Priority::Back)
        .unwrap(); // Eq panics
    let under_lock = recv(&saw);
    *LOG_PROBE.lock() = None;
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !under_lock,
        "the dedup table's error line (Eq panicked) was logged while the hand-over \
         held the callers' lock"
    );
}

// ---------------------------------------------------------------------------
// 2. A key is dropped under the callers' lock (and the table's) when an Eq
//    panics once and then answers.
// ---------------------------------------------------------------------------

static FLAKY_ARMED: AtomicBool = AtomicBool::new(false);
static FLAKY_PROBE: Mutex<Option<(WeakHandle<Entry>, Sender<bool>)>> = Mutex::new(None);

/// A key whose `Eq` panics once (the first comparison after it is armed),
/// then answers normally; a probing key's `Drop` looks whether the callers'
/// lock is held (hashed by `id`).
struct FlakyKey {
    id: u32,
    probe: bool,
}

impl std::hash::Hash for FlakyKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialEq for FlakyKey {
    fn eq(&self, other: &Self) -> bool {
        if FLAKY_ARMED.swap(false, SeqCst) {
            panic!("deliberate: Eq failed this once");
        }
        self.id == other.id
    }
}
impl Eq for FlakyKey {}

impl Drop for FlakyKey {
    fn drop(&mut self) {
        if !self.probe {
            return;
        }
        let probe = FLAKY_PROBE.lock().take(); // the first probing drop only
        if let Some((h, tx)) = probe {
            if let Some(held) = callers_lock_held(&h) {
                let _ = tx.send(held);
            }
        }
    }
}

/// README: "a panic in it is caught there, and no key is dropped under a
/// lock even then". Order: the worker is busy; (1, 0) is buffered (its key
/// is in the table); `Eq` is armed to panic once; (1, 1) is buffered. Under
/// the callers' lock and the table's, `mark_keys` asks the set for (1, 1)'s
/// key: `Eq` panics, `Hashed::eq` catches it and answers "not equal", so the
/// key is inserted with `set.extend(slot.take())`; the insert compares again,
/// `Eq` now says equal, and std's `HashSet::insert` keeps the old element and
/// *drops the new one*, right there, under both locks. Its `Drop` (user
/// code) runs under the callers' lock.
#[test]
fn a_key_whose_eq_panics_once_is_not_dropped_under_the_callers_lock() {
    quiet_panics();
    let (task, started, permit, books) = permitted(|_| false);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| FlakyKey {
            id: e.0,
            probe: *e == (1, 1),
        })
        .start()
        .unwrap();
    let (saw_tx, saw) = unbounded();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.buffer(&handle, vec![(1, 0)], Priority::Back).unwrap();
    *FLAKY_PROBE.lock() = Some((handle.downgrade(), saw_tx));
    FLAKY_ARMED.store(true, SeqCst);
    books.buffer(&handle, vec![(1, 1)], Priority::Back).unwrap();
    let under_lock = recv(&saw);
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !under_lock,
        "a key's Drop ran under the callers' lock (HashSet::insert dropped the new key \
         after Eq panicked once)"
    );
}

// ---------------------------------------------------------------------------
// 3. A key's Drop that calls `wait_idle` while its entry is reported as
//    overflow waits for itself.
// ---------------------------------------------------------------------------

/// Where a probe reports what `wait_idle` said.
type IdleProbe = Mutex<Option<(WeakHandle<Entry>, Sender<Result<(), IdleError>>)>>;

static IDLE_PROBE: IdleProbe = Mutex::new(None);

/// A key whose `Drop`, for a probing key, calls `wait_idle` (once).
struct IdleKey {
    id: u32,
    probe: bool,
}

impl std::hash::Hash for IdleKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

impl PartialEq for IdleKey {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for IdleKey {}

impl Drop for IdleKey {
    fn drop(&mut self) {
        if !self.probe {
            return;
        }
        let probe = IDLE_PROBE.lock().take(); // the first probing drop only
        if let Some((h, tx)) = probe {
            if let Some(h) = h.upgrade() {
                let _ = tx.send(h.wait_idle(Duration::from_secs(3)));
            }
        }
    }
}

/// Keys are "dropped outside every lock" (so a key's `Drop` may call the
/// engine), and a call that would wait for the very thread it runs on "fails
/// at once instead of hanging" (`WouldDeadlock` from a handler). Order:
/// `push_back([(1, 0), (2, 0)])` into an idle engine whose queue holds one
/// (`DropNewest`): (2, 0) overflows; the caller reports it
/// (`Store::report` → `report_unheld`), which first has the key table record
/// its departure (`table.left`) and drops the keys there, *before* it marks
/// the thread as inside the overflow handler and before the overflow's
/// `handing` count is released. The probing key's `Drop` calls
/// `wait_idle(3s)`: it is not told it would deadlock, and waits for the
/// very overflow its own thread is reporting, until it times out (with no
/// timeout it would hang for ever).
#[test]
fn a_keys_drop_during_an_overflow_report_does_not_wait_for_itself() {
    let (task, _started, permit, books) = permitted(|_| false);
    let (res_tx, res) = unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::DropNewest)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| IdleKey {
            id: e.0,
            probe: *e == (2, 0),
        })
        .overflow_handler(move |v: Vec<Entry>, _| b.overflowed(&v))
        .start()
        .unwrap();
    *IDLE_PROBE.lock() = Some((handle.downgrade(), res_tx));
    permit.send(()).unwrap(); // (1, 0)'s run may finish at once
    books.push_back(&handle, vec![(1, 0), (2, 0)]).unwrap();
    let r = recv(&res);
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !matches!(r, Err(IdleError::Timeout { .. })),
        "wait_idle from a key's Drop, on the thread reporting that key's overflow, \
         waited for that very overflow and timed out: {r:?} (expected WouldDeadlock, \
         as from the overflow handler, or Ok)"
    );
}

// ---------------------------------------------------------------------------
// 4. One always-keyless entry makes the table wary for good, though nothing
//    could be stale.
// ---------------------------------------------------------------------------

/// The docs: "If an entry's key cannot be computed as it leaves *while
/// entries without a key wait*, the engine cannot tell which left, and from
/// then on drops twins only as workers reach them"; the log line says "an
/// entry without a dedup key left *while others waited*". Order: (1, 666),
/// whose key always panics, is the only entry handed over; it runs and
/// leaves; `wait_idle` returns (nothing waits, the key set is empty, so no
/// record can be stale). Yet `keyless_left` returned true, so `suspect` is
/// set for ever: (2, 0), (2, 1) handed over together keep both (the second
/// is not dropped at once, `deduplicated` stays 0 and both are buffered).
/// One malformed entry in an engine's life must not turn the "dropped at
/// once" rule off for good.
#[test]
fn one_keyless_entry_that_ran_alone_does_not_make_the_table_wary_for_good() {
    quiet_panics();
    let (task, started, permit, books) = permitted(|_| false);
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| {
            if e.1 == 666 {
                panic!("deliberate: a malformed entry has no key");
            }
            e.0
        })
        .overflow_handler(move |v: Vec<Entry>, _| b.overflowed(&v))
        .start()
        .unwrap();
    books.push_back(&handle, vec![(1, 666)]).unwrap();
    assert_eq!(recv(&started), vec![(1, 666)]);
    permit.send(()).unwrap();
    handle.wait_idle(HANG).unwrap(); // nothing waits, no key is recorded
    books
        .buffer(&handle, vec![(2, 0), (2, 1)], Priority::Back)
        .unwrap();
    let stats = handle.stats();
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(
        (stats.buffered, stats.deduplicated),
        (1, 1),
        "(2, 1) was not dropped at once: the table turned wary for good when the one \
         keyless entry left, with no other keyless entry and no record in the table"
    );
}

// ---------------------------------------------------------------------------
// 6. `still_running` counts entries a worker already dropped as duplicates.
// ---------------------------------------------------------------------------

/// Order: the worker is busy with (0, 0); A = (5, 0) is pushed back and
/// F = (5, 1) pushed to the front; batch size 2, so the worker next takes
/// [F, A] together: F runs (held by its permit) and A is dropped as its
/// duplicate (reported `Duplicate`) before `run` is called. Then
/// `shutdown_timeout(0)` lets the run go: the report says 2 entries are
/// still running, though only F is (A already left, reported to the
/// overflow handler). The slot's `Run::entries` is set before `taken`
/// drops duplicates and never corrected (`wait_idle`'s `Timeout { left }`
/// and the watchdog's "stuck run of N entries" count them too).
#[test]
fn still_running_does_not_count_entries_dropped_as_duplicates() {
    let (task, started, permit, books) = permitted(|_| false);
    let (handler, reasons) = overflow_log(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(handler)
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A
    books.push_front(&handle, vec![(5, 1)]).unwrap(); // F
    permit.send(()).unwrap();
    assert_eq!(recv(&started), vec![(5, 1)]); // F runs; A was taken with it
    let dropped: Vec<_> = reasons.try_iter().collect();
    let report = handle.shutdown_timeout(Duration::ZERO).unwrap();
    let still_running = report.still_running;
    permit.send(()).unwrap(); // the let-go run returns
    wait_until(|| handle.stats().processed == 2);
    books.finish(report);
    assert_eq!(dropped, vec![((5, 0), OverflowReason::Duplicate)]);
    assert_eq!(
        still_running, 1,
        "only F runs; A was dropped as its duplicate before the run began"
    );
}

// ---------------------------------------------------------------------------
// 7. A retry is dropped as the duplicate of a `push_back` entry the bound
//    then refuses (the mark-to-hold window of `queue_admitted`).
// ---------------------------------------------------------------------------

/// Steps of the race below (one engine, one iteration at a time).
static R_STAGE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static R_AT_LOCK: AtomicBool = AtomicBool::new(false);
static R_H_DONE: AtomicBool = AtomicBool::new(false);
static R_KEY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);
static R_EXTRA: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

thread_local! {
    /// The test's own thread: the hand-over H.
    static IS_H: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Spins (yielding) until `f` holds; panics after `HANG`.
fn spin_until(mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < HANG, "spun too long");
        std::hint::spin_loop();
    }
}

/// A key hashed by bucket (`id / 10`) and compared by `id`, so that a
/// hand-over of key `k` compares (calls `Eq`) with a waiting key `k + 1`:
/// that `Eq`, on the test's thread, is where H is seen inside its mark.
struct BucketKey {
    id: u32,
}

impl std::hash::Hash for BucketKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (self.id / 10).hash(state);
    }
}

impl PartialEq for BucketKey {
    fn eq(&self, other: &Self) -> bool {
        if IS_H.with(|h| h.get()) && R_STAGE.compare_exchange(1, 2, SeqCst, SeqCst).is_ok() {
            // H is marking its entry A (under the callers' lock and the
            // table's): wait until the worker is about to take the table's
            // lock for its retry, then a moment more so that it waits there.
            spin_until(|| R_AT_LOCK.load(SeqCst));
            for _ in 0..R_EXTRA.load(SeqCst) {
                std::hint::spin_loop();
            }
        }
        self.id == other.id
    }
}
impl Eq for BucketKey {}

/// README: "A failed run's retry yields to a waiting entry with its key
/// (never to one of the run's own new entries, which a bound may refuse)";
/// `dedup::Departures`: the store holds an entry a bound may refuse "before
/// any other hand-over could mark against them". `queue_admitted` marks a
/// `push_back`'s keys under the callers' lock (in `admit_keyed`) but holds
/// them unsettled only later, once it has the state lock. That keeps other
/// *hand-overs* out of the window (they need the callers' lock), but not a
/// worker's `readmit`, which marks a failed run's own entries without that
/// lock and with nothing held. Order (DropNewest, queue bound 1, no retry
/// policy):
/// 1. R = (k, 0) runs; P = (k + 1, 0) fills the queue.
/// 2. H: `push_back([A = (k, 1)])` marks A's key (record: one waiting, owed)
///    under the callers' lock; it has not yet taken the state lock.
/// 3. R's run returns `Retry`; `readmit` admits R as a back entry: key k is
///    owed and nothing is unsettled, so R is dropped at once as A's
///    duplicate (reported `Duplicate`).
/// 4. H takes the state lock, holds A, and the full queue refuses it (Full).
///
/// No run of key k begins after R came back: R, a retry that would have
/// gone back whatever the bound, is dropped as the duplicate of an entry
/// that never waited. The window between 2 and 4 has no user code in it,
/// so this test lines the threads up with a key whose `Eq` (H, inside its
/// mark) waits until the worker is about to lock the table, and tries
/// several times with a little more slack each time; it fails on the
/// first iteration the window is hit (on a 2-core machine: within a few).
#[test]
fn a_retry_is_not_dropped_as_the_duplicate_of_a_push_back_the_bound_refuses() {
    IS_H.with(|h| h.set(true));
    let (run_tx, runs) = unbounded::<Vec<Entry>>();
    let mut task = race_task(run_tx);
    let books = task.books();
    let (reason_tx, reasons) = unbounded::<(Entry, OverflowReason)>();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::DropNewest)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| {
            if buffered_task::worker_index().is_some()
                && e.0 == R_KEY.load(SeqCst)
                && e.1 == 0
                && R_STAGE.load(SeqCst) == 2
            {
                R_AT_LOCK.store(true, SeqCst); // readmit: about to lock the table
            }
            BucketKey { id: e.0 }
        })
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            for e in v {
                if r == OverflowReason::Duplicate
                    && e == (R_KEY.load(SeqCst), 0)
                    && buffered_task::worker_index().is_some()
                {
                    // R was dropped: let H finish its hand-over first, as
                    // it would have anyway (the worker goes on to take the
                    // state lock; H is already waiting for it).
                    spin_until(|| R_H_DONE.load(SeqCst));
                }
                reason_tx.send((e, r)).unwrap();
            }
        })
        .start()
        .unwrap();
    let mut found = None;
    for i in 0..200u32 {
        let k = 100 * (i + 1);
        R_STAGE.store(0, SeqCst);
        R_AT_LOCK.store(false, SeqCst);
        R_H_DONE.store(false, SeqCst);
        R_KEY.store(k, SeqCst);
        R_EXTRA.store((i % 40) * 25, SeqCst);
        books.push_back(&handle, vec![(k, 0)]).unwrap(); // R
        assert_eq!(recv(&runs), vec![(k, 0)]); // R runs, waits for stage 2
        books.push_back(&handle, vec![(k + 1, 0)]).unwrap(); // P: queue full
        R_STAGE.store(1, SeqCst);
        books.push_back(&handle, vec![(k, 1)]).unwrap(); // H: A
        R_H_DONE.store(true, SeqCst);
        handle.wait_idle(HANG).unwrap();
        let ran: Vec<Vec<Entry>> = runs.try_iter().collect();
        let why: Vec<(Entry, OverflowReason)> = reasons.try_iter().collect();
        let r_dup = why.contains(&((k, 0), OverflowReason::Duplicate));
        let k_ran_again = ran.iter().any(|b| b.iter().any(|e| e.0 == k));
        if r_dup && !k_ran_again {
            found = Some((i, ran, why));
            break;
        }
    }
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        found.is_none(),
        "R's retry was dropped as the duplicate of A, which the bound then refused; no \
         run of its key began after it (iteration, runs after, overflow): {found:?}"
    );
}

/// The task for the race: R's first run waits for stage 2 and asks for a
/// retry; every other run succeeds. Each batch is sent as its run begins.
fn race_task(run_tx: Sender<Vec<Entry>>) -> Script<Entry, ()> {
    let retried = Arc::new(Mutex::new(std::collections::HashSet::new()));
    Script::new(move |b: &[Entry], _: &()| {
        run_tx.send(b.to_vec()).unwrap();
        let first = b.len() == 1
            && b[0].1 == 0
            && b[0].0 == R_KEY.load(SeqCst)
            && retried.lock().insert(b[0]);
        if first {
            spin_until(|| R_STAGE.load(SeqCst) == 2);
            buffered_task::Outcome::Retry
        } else {
            buffered_task::Outcome::Ok
        }
    })
}

// ---------------------------------------------------------------------------
// 8. (Related, not the key table's own code) The weigher, called by the same
//    `report_unheld` before the handler mark, waits for itself too.
// ---------------------------------------------------------------------------

static WEIGH_PROBE: IdleProbe = Mutex::new(None);

/// README ("Calls from inside the engine"): the handlers, the weigher
/// included, may call the engine's own handle, and a call that would wait
/// for the very thread it runs on fails at once. Order: as in
/// `a_keys_drop_during_an_overflow_report_does_not_wait_for_itself`, with no
/// dedup: (2, 0) overflows on the caller's thread, and `report_unheld`
/// unweighs it (the weigher is called) before it marks the thread as in the
/// handler: `wait_idle` from the weigher waits for that overflow and times
/// out. (`report_unheld` also tells the key table before the mark; moving
/// the mark to the top fixes both.)
#[test]
fn the_weigher_during_an_overflow_report_does_not_wait_for_itself() {
    let (task, _started, permit, books) = permitted(|_| false);
    let (res_tx, res) = unbounded();
    let b = books.clone();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .overflow_policy(OverflowPolicy::DropNewest)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .weigher(move |e: &Entry| {
            // The second weigh of (2, 0): as its overflow is reported.
            if *e == (2, 0) && c.fetch_add(1, SeqCst) == 1 {
                let probe = WEIGH_PROBE.lock().take();
                if let Some((h, tx)) = probe {
                    if let Some(h) = h.upgrade() {
                        let _ = tx.send(h.wait_idle(Duration::from_secs(3)));
                    }
                }
            }
            8
        })
        .overflow_handler(move |v: Vec<Entry>, _| b.overflowed(&v))
        .start()
        .unwrap();
    *WEIGH_PROBE.lock() = Some((handle.downgrade(), res_tx));
    permit.send(()).unwrap(); // (1, 0)'s run may finish at once
    books.push_back(&handle, vec![(1, 0), (2, 0)]).unwrap();
    let r = recv(&res);
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        !matches!(r, Err(IdleError::Timeout { .. })),
        "wait_idle from the weigher, on the thread reporting that entry's overflow, \
         waited for that very overflow and timed out: {r:?}"
    );
}

// ---------------------------------------------------------------------------
// 9. An `init` entry whose twin waits is never dropped at once under
//    DropNewest, even with no bound at all.
// ---------------------------------------------------------------------------

/// `dedup_by_key`: "A back hand-over (and a retry, and an `init` entry)
/// whose key waits is dropped at once; where the engine cannot be sure the
/// twin still waits (one is leaving as overflow, or a bound has yet to take
/// it), it is kept instead". Order: default policy (DropNewest), no queue
/// bound; the worker is busy; (5, 0) is pushed (it waits in the queue);
/// `init` then streams (5, 1). `feed` holds its own chunk unsettled before it
/// marks it (`hold_unsettled(!enforced)`), so the table is never "sure" for
/// an `init` entry under DropNewest: (5, 1) is queued beside its twin, and
/// only a worker drops it later. (For as long as any `feed` runs, including
/// its own duplicate handler calls, every back hand-over on every thread is
/// kept the same way.)
#[test]
fn an_init_entry_whose_twin_waits_is_dropped_at_once_without_a_bound() {
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let (started_tx, started) = unbounded::<Vec<Entry>>();
    let (permit, permits) = unbounded::<()>();
    let books = Books::<Entry>::new();
    let given = books.clone();
    let task = Script::new(move |b: &[Entry], _: &()| {
        started_tx.send(b.to_vec()).unwrap();
        permits.recv_timeout(HANG).expect("no permit");
        buffered_task::Outcome::Ok
    })
    .with_init(move |sink, _: &()| {
        if a.swap(false, SeqCst) {
            given.given(&[(5, 1)]);
            sink.push((5, 1));
        }
    })
    .with_books(&books);
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, _| b.overflowed(&v))
        .start()
        .unwrap();
    wait_until(|| handle.stats().init_runs >= 1); // the first init: nothing
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // waits in the queue
    armed.store(true, SeqCst);
    handle.poll_now().unwrap();
    wait_until(|| handle.stats().init_runs >= 2);
    let stats = handle.stats();
    for _ in 0..4 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(
        (stats.queued, stats.deduplicated),
        (1, 1),
        "the init entry (5, 1) was queued beside its waiting twin (5, 0), not dropped \
         at once, though there is no bound"
    );
}

//! Key de-duplication against a seeded randomized oracle (written by a fifth
//! hostile review): every Duplicate report must be covered by a run of its
//! key that began after the entry came in, or by a twin (came in before the
//! report) that left unrun after it came in (overflowed, shed, handed back,
//! dead-lettered);
//! the books balance, `Stats::deduplicated` equals the reports, and once
//! quiet, twins pushed together are de-duplicated at once (no unsettled
//! count left behind). Each round draws keys, batch size, workers, the bound
//! and its policy, batching, flushes, retries and outcomes; two producers mix
//! buffer and push, back and front, flush, shrink, expand, `wait_idle` and
//! `init`. `SEED=<n>` reruns from a seed (printed), `ROUNDS=<n>` soaks. Also
//! deterministic checks of how an `init` chunk's duplicates are counted for
//! `wait_idle`.
mod common;
use buffered_task::{
    Batching, Builder, FlushInterval, Outcome, OverflowPolicy, OverflowReason, Priority,
    RetryPolicy,
};
use common::*;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

type Entry = (u32, u32); // (key, id)

#[derive(Debug, Clone)]
#[allow(dead_code)] // the reason is read through Debug, in a counterexample
enum Ev {
    In(Entry, u64),
    Begin(u32, u64),
    Dup(Entry, u64),
    Unrun(Entry, u64, &'static str),
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Log {
    seq: AtomicU64,
    evs: Mutex<Vec<Ev>>,
    ids: AtomicU32,
}
impl Log {
    fn tick(&self) -> u64 {
        self.seq.fetch_add(1, SeqCst)
    }
    fn push(&self, e: Ev) {
        self.evs.lock().push(e);
    }
    fn came_in(&self, v: &[Entry]) {
        for e in v {
            let s = self.tick();
            self.push(Ev::In(*e, s));
        }
    }
}

fn check(log: &Log, seed: u64) -> Result<(), String> {
    let evs = log.evs.lock().clone();
    let mut came: HashMap<u32, (u32, u64)> = HashMap::new();
    let mut begins: HashMap<u32, Vec<u64>> = HashMap::new();
    let mut unrun: HashMap<u32, Vec<(u32, u64)>> = HashMap::new();
    for e in &evs {
        match e {
            Ev::In((k, id), s) => {
                came.insert(*id, (*k, *s));
            }
            Ev::Begin(k, s) => begins.entry(*k).or_default().push(*s),
            Ev::Unrun((k, id), s, _) => unrun.entry(*k).or_default().push((*id, *s)),
            _ => {}
        }
    }
    for e in &evs {
        if let Ev::Dup((k, id), at) = e {
            let Some(&(_, c)) = came.get(id) else {
                return Err(format!("seed {seed}: dup {k},{id} never came in"));
            };
            let covered = begins.get(k).is_some_and(|b| b.iter().any(|s| *s > c));
            // A twin it waited behind: in the engine before this one was
            // dropped (its tick, taken before its hand-over call, may come
            // after this one's while its keys were marked first), and gone
            // unrun after this one came in.
            let fate = unrun.get(k).is_some_and(|u| {
                u.iter().any(|(tid, left)| {
                    *tid != *id && *left > c && came.get(tid).is_some_and(|(_, tc)| *tc < *at)
                })
            });
            if !covered && !fate {
                let mine: Vec<&Ev> = evs
                    .iter()
                    .filter(|e| match e {
                        Ev::In((kk, _), _) | Ev::Dup((kk, _), _) | Ev::Unrun((kk, _), _, _) => {
                            kk == k
                        }
                        Ev::Begin(kk, _) => kk == k,
                    })
                    .collect();
                return Err(format!(
                    "seed {seed}: ({k},{id}) came in at {c}, dropped as Duplicate at {at} with no \
                     run of key {k} beginning after it and no twin left unrun; key {k}'s events: {mine:?}"
                ));
            }
        }
    }
    Ok(())
}

fn round(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let log = Arc::new(Log {
        seq: AtomicU64::new(0),
        evs: Mutex::new(Vec::new()),
        ids: AtomicU32::new(0),
    });
    let keys = 1 + rng.below(6) as u32;
    let batch = 1 + rng.below(4) as usize;
    let conc = 1 + rng.below(3) as usize;
    let policy = match rng.below(4) {
        0 => None,
        1 => Some(OverflowPolicy::DropNewest),
        2 => Some(OverflowPolicy::Reject),
        _ => Some(OverflowPolicy::Block),
    };
    let natural = rng.below(2) == 0;
    let retries = rng.below(3);
    let run_rng = Arc::new(Mutex::new(Rng(seed.wrapping_add(77) | 1)));
    let l = log.clone();
    let rr = run_rng.clone();
    let task = Script::new(move |b: &[Entry], _: &()| {
        for (k, _) in b {
            let s = l.tick();
            l.push(Ev::Begin(*k, s));
        }
        let r = rr.lock().below(10);
        match r {
            0 if retries > 0 => Outcome::Retry,
            1 if retries > 0 => Outcome::RetryEntries(b[..1].to_vec()),
            2 => {
                let k = rr.lock().below(keys as u64) as u32;
                let id = l.ids.fetch_add(1, SeqCst);
                let e = (k, id);
                l.came_in(&[e]);
                Outcome::RetryEntries(vec![e])
            }
            _ => Outcome::Ok,
        }
    });
    let pending: Arc<Mutex<Vec<Entry>>> = Arc::new(Mutex::new(Vec::new()));
    let (pd, li) = (pending.clone(), log.clone());
    let mut task = task.with_init(move |sink, _: &()| {
        let v = std::mem::take(&mut *pd.lock());
        for e in v {
            li.came_in(&[e]);
            sink.push(e);
        }
    });
    let books = task.books();
    let l = log.clone();
    let b = books.clone();
    let l2 = log.clone();
    let b2 = books.clone();
    let mut builder = Builder::new(task, ())
        .max_batch_size(batch)
        .max_concurrency(conc)
        .flush_interval(if rng.below(2) == 0 {
            FlushInterval::Never
        } else {
            FlushInterval::Every(Duration::from_millis(1))
        })
        .poll(false)
        .batching(if natural {
            Batching::Natural
        } else {
            Batching::Ticked
        })
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            for e in v {
                let s = l.tick();
                l.push(if r == OverflowReason::Duplicate {
                    Ev::Dup(e, s)
                } else {
                    Ev::Unrun(e, s, "overflow")
                });
            }
        })
        .dead_letter_handler(move |v: Vec<Entry>, _| {
            b2.dead_lettered(&v);
            for e in v {
                let s = l2.tick();
                l2.push(Ev::Unrun(e, s, "dead"));
            }
        });
    if let Some(p) = policy {
        builder = builder
            .max_queue_len(2 + rng.below(6) as usize)
            .overflow_policy(p);
    }
    if retries == 2 {
        builder = builder.retry_policy(
            RetryPolicy::new(2).backoff(Duration::from_micros(200), Duration::from_millis(1)),
        );
    } else if retries == 1 {
        builder = builder.retry_policy(RetryPolicy::new(3));
    }
    let handle = builder.start().map_err(|e| format!("{e:?}"))?;
    let mut producers = Vec::new();
    for p in 0..2u64 {
        let h = handle.clone();
        let log = log.clone();
        let books = books.clone();
        let pending = pending.clone();
        let mut rng = Rng((seed ^ ((p + 1) * 0xABCD_1234)) | 1);
        producers.push(std::thread::spawn(move || {
            for _ in 0..60 {
                let op = rng.below(21);
                let n = 1 + rng.below(3) as usize;
                let v: Vec<Entry> = (0..n)
                    .map(|_| (rng.below(keys as u64) as u32, log.ids.fetch_add(1, SeqCst)))
                    .collect();
                match op {
                    0..=5 => {
                        log.came_in(&v);
                        let _ =
                            books.buffer_timeout(&h, v, Priority::Back, Duration::from_millis(5));
                    }
                    6..=8 => {
                        log.came_in(&v);
                        let _ =
                            books.buffer_timeout(&h, v, Priority::Front, Duration::from_millis(5));
                    }
                    9..=12 => {
                        log.came_in(&v);
                        books.given(&v);
                        if let Err(e) = h.push_back_timeout(v, Duration::from_millis(5)) {
                            books.handed_back(&into_vec(e));
                        }
                    }
                    13..=14 => {
                        log.came_in(&v);
                        books.given(&v);
                        if let Err(e) = h.push_front_timeout(v, Duration::from_millis(5)) {
                            books.handed_back(&into_vec(e));
                        }
                    }
                    15 => {
                        let _ = h.flush();
                    }
                    16 => {
                        let _ = h.shrink();
                    }
                    17 => {
                        let _ = h.expand();
                    }
                    18 => {
                        let _ = h.wait_idle(Duration::from_millis(2));
                    }
                    19 => {
                        books.given(&v);
                        pending.lock().extend(v);
                        let _ = h.poll_now();
                    }
                    _ => std::thread::yield_now(),
                }
            }
        }));
    }
    for p in producers {
        p.join().unwrap();
    }
    let _ = handle.poll_now();
    let _ = handle.wait_idle(HANG);
    {
        let left = std::mem::take(&mut *pending.lock());
        books.handed_back(&left);
    }
    // Quiet now: the unsettled count must be back to zero, so a push of two
    // twins drops the second at once.
    {
        let mut ok = false;
        for i in 0..5u32 {
            handle
                .wait_idle(HANG)
                .map_err(|e| format!("seed {seed}: {e:?}"))?;
            let before = handle.stats().deduplicated;
            let v = vec![
                (1000 + i, log.ids.fetch_add(1, SeqCst)),
                (1000 + i, log.ids.fetch_add(1, SeqCst)),
            ];
            log.came_in(&v);
            books.given(&v);
            if let Err(e) = handle.push_back(v) {
                books.handed_back(&into_vec(e));
                continue;
            }
            if handle.stats().deduplicated == before + 1 {
                ok = true;
                break;
            }
        }
        if !ok {
            return Err(format!("seed {seed}: quiet, yet twins pushed together are never de-duplicated (unsettled count stuck?)"));
        }
    }
    let report = handle.shutdown_drain().map_err(|e| format!("{e:?}"))?;
    for e in &report.unprocessed {
        let s = log.tick();
        log.push(Ev::Unrun(*e, s, "back"));
    }
    books.finish(report);
    let dups = log
        .evs
        .lock()
        .iter()
        .filter(|e| matches!(e, Ev::Dup(..)))
        .count() as u64;
    let st = handle.stats();
    if st.deduplicated != dups {
        return Err(format!(
            "seed {seed}: deduplicated {} != {dups} reports",
            st.deduplicated
        ));
    }
    check(&log, seed).map_err(|m| format!("{m}\nconfig: keys {keys} batch {batch} conc {conc} policy {policy:?} natural {natural} retries {retries}"))
}

fn into_vec(e: buffered_task::BufferError<Entry>) -> Vec<Entry> {
    match e {
        buffered_task::BufferError::Stopped(v)
        | buffered_task::BufferError::Full(v)
        | buffered_task::BufferError::Timeout(v) => v,
        _ => Vec::new(),
    }
}

#[test]
fn randomized_dedup_oracle() {
    quiet_panics();
    let rounds: u64 = std::env::var("ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if cfg!(debug_assertions) { 40 } else { 200 });
    let base: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::process::id() as u64 * 7919 % 1_000_000);
    println!("dedup oracle: seeds {base}.. (rerun with SEED={base})");
    for seed in base..base + rounds {
        if let Err(msg) = round(seed) {
            panic!("{msg}");
        }
    }
}

// ---------------------------------------------------------------------------
// Deterministic checks of `feed`'s `State::handing` count (1af2c38).
// ---------------------------------------------------------------------------

/// An init chunk's duplicate handler, on the init thread, calls
/// `wait_idle`: it must fail with WouldDeadlock (not wait for itself).
#[test]
fn wait_idle_in_an_init_duplicates_handler_fails_with_would_deadlock() {
    use buffered_task::IdleError;
    let (task, started, permit, books) = permitted(|_| false);
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arm = armed.clone();
    let task = task.with_init(move |sink, _: &()| {
        if !arm.load(SeqCst) {
            return;
        }
        sink.push((5, 1));
        sink.push((7, 0));
    });
    let weak: Arc<std::sync::OnceLock<buffered_task::WeakHandle<Entry>>> = Default::default();
    let w = weak.clone();
    let (answer_tx, answer) = crossbeam_channel::unbounded();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            if r == OverflowReason::Duplicate && v == [(5, 1)] {
                let h = w.get().and_then(|w| w.upgrade()).unwrap();
                answer_tx.send(h.wait_idle(Duration::from_secs(2))).unwrap();
            }
        })
        .start()
        .unwrap();
    weak.set(handle.downgrade()).ok();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]);
    books.push_back(&handle, vec![(5, 0)]).unwrap();
    wait_until(|| handle.stats().init_runs == 1);
    books.given(&[(5, 1), (7, 0)]);
    armed.store(true, SeqCst);
    handle.poll_now().unwrap();
    let got = recv(&answer);
    for _ in 0..3 {
        permit.send(()).unwrap();
    }
    handle.wait_idle(HANG).unwrap();
    let report = books.finish(handle.shutdown_drain().unwrap());
    assert!(report.unprocessed.is_empty());
    assert_eq!(handle.stats().deduplicated, 1);
    assert!(matches!(got, Err(IdleError::WouldDeadlock)), "got {got:?}");
}

/// A shutdown (with a deadline) while the init thread is inside an init
/// chunk's duplicate handler: no hang, books balance, the count matches.
#[test]
fn a_shutdown_while_an_init_duplicate_is_in_its_handler() {
    let (task, started, permit, books) = permitted(|_| false);
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let arm = armed.clone();
    let task = task.with_init(move |sink, _: &()| {
        if !arm.load(SeqCst) {
            return;
        }
        sink.push((5, 1));
        sink.push((7, 0));
    });
    let (in_tx, in_handler) = crossbeam_channel::unbounded::<()>();
    let gate = Gate::new();
    let g = gate.clone();
    let b = books.clone();
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &Entry| e.0)
        .overflow_handler(move |v: Vec<Entry>, r| {
            b.overflowed(&v);
            if r == OverflowReason::Duplicate && v == [(5, 1)] {
                in_tx.send(()).unwrap();
                g.wait();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]);
    books.push_back(&handle, vec![(5, 0)]).unwrap();
    wait_until(|| handle.stats().init_runs == 1);
    books.given(&[(5, 1), (7, 0)]);
    armed.store(true, SeqCst);
    handle.poll_now().unwrap();
    recv(&in_handler);
    // A wait_idle now (generation moves on) must not return while (5, 1)'s
    // handler runs.
    let early = handle.wait_idle(Duration::from_millis(200));
    assert!(early.is_err(), "{early:?}");
    for _ in 0..3 {
        permit.send(()).unwrap();
    }
    let report = handle.shutdown_timeout(Duration::from_millis(300)).unwrap();
    gate.open();
    books.finish(report);
    assert_eq!(handle.stats().deduplicated, 1);
}

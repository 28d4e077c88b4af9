//! Workloads shared by the criterion benches and `examples/bench_report.rs`: each
//! runs against the crate and against a hand-rolled baseline (an unbounded command
//! channel into a coordinator thread that cuts batches from a `VecDeque` for a
//! fixed set of workers, completions on a third channel).
#![allow(dead_code)]

use buffered_task::{Batching, Builder, Handle, Outcome, Priority, Sink, Task};
use crossbeam_channel::{bounded, select_biased, unbounded, Receiver, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Sums every batch into an atomic: trivial work.
pub struct Sum {
    pub total: Arc<AtomicU64>,
    pub count: Arc<AtomicU64>,
    /// `run` calls.
    pub batches: Arc<AtomicU64>,
    /// Entries `init` streams (0: none).
    pub init_entries: u64,
}

impl Sum {
    pub fn new(init_entries: u64) -> (Self, Arc<AtomicU64>) {
        let count = Arc::new(AtomicU64::new(0));
        (
            Sum {
                total: Arc::new(AtomicU64::new(0)),
                count: count.clone(),
                batches: Arc::new(AtomicU64::new(0)),
                init_entries,
            },
            count,
        )
    }
}

impl Task for Sum {
    type Entry = u64;
    type State = ();
    fn init(&self, sink: &mut Sink<u64>, _: &()) {
        for i in 0..self.init_entries {
            sink.push(i);
        }
    }
    fn run(&self, batch: &[u64], _: &()) -> Outcome<u64, ()> {
        self.total
            .fetch_add(batch.iter().sum::<u64>(), Ordering::Relaxed);
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        Outcome::Ok
    }
}

/// Retries each batch once (marking its entries), then succeeds.
pub struct RetryOnce {
    pub count: Arc<AtomicU64>,
}

pub const RETRIED: u64 = 1 << 63;

impl Task for RetryOnce {
    type Entry = u64;
    type State = ();
    fn run(&self, batch: &[u64], _: &()) -> Outcome<u64, ()> {
        if batch[0] & RETRIED == 0 {
            Outcome::RetryEntries(batch.iter().map(|e| e | RETRIED).collect())
        } else {
            self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
            Outcome::Ok
        }
    }
}

pub fn engine<K: Task>(task: K, batch: usize, conc: usize, state: K::State) -> Handle<K::Entry> {
    engine_with(task, batch, conc, state, Batching::Ticked)
}

pub fn engine_with<K: Task>(
    task: K,
    batch: usize,
    conc: usize,
    state: K::State,
    batching: Batching,
) -> Handle<K::Entry> {
    builder(task, batch, conc, state)
        .batching(batching)
        .start()
        .expect("valid settings")
}

pub fn builder<K: Task>(task: K, batch: usize, conc: usize, state: K::State) -> Builder<K> {
    Builder::new(task, state)
        .name("bench")
        .max_batch_size(batch)
        .max_concurrency(conc)
        .flush_interval(Duration::from_millis(10))
        .poll(false)
}

/// Bulk with key de-duplication on (every key distinct: all the cost, no drop).
pub fn bulk_dedup(total: u64, chunk: u64, batch: usize, conc: usize) -> Duration {
    let (task, count) = Sum::new(0);
    let handle = builder(task, batch, conc, ())
        .dedup_by_key(|e: &u64| *e)
        .start()
        .unwrap();
    let start = Instant::now();
    for entries in chunks(total, chunk) {
        handle.buffer(entries, Priority::Back).unwrap();
    }
    handle.shutdown_drain().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), total);
    elapsed
}

// ---------------------------------------------------------------------------
// The hand-rolled baseline.

pub enum Cmd {
    One(u64),
    Many(Vec<u64>),
    Stop,
}

pub struct Baseline {
    pub commands: Sender<Cmd>,
    coordinator: Option<thread::JoinHandle<()>>,
}

impl Baseline {
    /// `run` returns entries to retry (empty: done).
    pub fn start(
        batch: usize,
        conc: usize,
        run: impl Fn(&[u64]) -> Vec<u64> + Send + Sync + 'static,
    ) -> Self {
        let (commands, cmd_rx) = unbounded::<Cmd>();
        let coordinator = thread::spawn(move || baseline_coordinator(batch, conc, run, cmd_rx));
        Baseline {
            commands,
            coordinator: Some(coordinator),
        }
    }

    /// Waits for everything sent so far to be processed, then stops.
    pub fn finish(mut self) {
        self.commands.send(Cmd::Stop).unwrap();
        self.coordinator.take().unwrap().join().unwrap();
    }
}

fn baseline_coordinator(
    batch: usize,
    conc: usize,
    run: impl Fn(&[u64]) -> Vec<u64> + Send + Sync + 'static,
    commands: Receiver<Cmd>,
) {
    let run = Arc::new(run);
    let (job_tx, job_rx) = unbounded::<Vec<u64>>();
    let (done_tx, done_rx) = unbounded::<Vec<u64>>();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (jobs, done, run) = (job_rx.clone(), done_tx.clone(), run.clone());
            thread::spawn(move || {
                for job in jobs.iter() {
                    let retry = run(&job);
                    done.send(retry).unwrap();
                }
            })
        })
        .collect();
    let mut queue: VecDeque<u64> = VecDeque::new();
    let mut in_flight = 0;
    let mut stopping = false;
    loop {
        select_biased! {
            recv(done_rx) -> retry => {
                in_flight -= 1;
                queue.extend(retry.unwrap());
            }
            recv(commands) -> cmd => match cmd.unwrap() {
                Cmd::One(e) => queue.push_back(e),
                Cmd::Many(v) => queue.extend(v),
                Cmd::Stop => stopping = true,
            }
        }
        while in_flight < conc && !queue.is_empty() {
            let n = batch.min(queue.len());
            let job: Vec<u64> = queue.drain(..n).collect();
            job_tx.send(job).unwrap();
            in_flight += 1;
        }
        if stopping && in_flight == 0 && queue.is_empty() && commands.is_empty() {
            break;
        }
    }
    drop(job_tx);
    for w in workers {
        w.join().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Workloads. Each returns the wall time of the whole run.

/// The entries 0..total, in chunks of `chunk` (the last may be shorter).
pub fn chunks(total: u64, chunk: u64) -> impl Iterator<Item = Vec<u64>> {
    (0..total)
        .step_by(chunk as usize)
        .map(move |start| (start..(start + chunk).min(total)).collect())
}

pub fn bulk_crate(total: u64, chunk: u64, batch: usize, conc: usize) -> Duration {
    bulk_crate_with(total, chunk, batch, conc, Batching::Ticked).0
}

/// Wall time, and the mean batch size.
pub fn bulk_crate_with(
    total: u64,
    chunk: u64,
    batch: usize,
    conc: usize,
    batching: Batching,
) -> (Duration, f64) {
    let (task, count) = Sum::new(0);
    let batches = task.batches.clone();
    let handle = engine_with(task, batch, conc, (), batching);
    let start = Instant::now();
    for entries in chunks(total, chunk) {
        handle.buffer(entries, Priority::Back).unwrap();
    }
    handle.shutdown_drain().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), total);
    let mean = total as f64 / batches.load(Ordering::Relaxed).max(1) as f64;
    (elapsed, mean)
}

pub fn bulk_baseline(total: u64, chunk: u64, batch: usize, conc: usize) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let sum = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let base = Baseline::start(batch, conc, move |b| {
        sum.fetch_add(b.iter().sum::<u64>(), Ordering::Relaxed);
        c.fetch_add(b.len() as u64, Ordering::Relaxed);
        Vec::new()
    });
    let start = Instant::now();
    for entries in chunks(total, chunk) {
        base.commands.send(Cmd::Many(entries)).unwrap();
    }
    base.finish();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), total);
    elapsed
}

/// Wall time, and the producers' CPU nanoseconds per call (where measurable).
pub fn single_crate(
    total: u64,
    threads: u64,
    batch: usize,
    conc: usize,
) -> (Duration, Option<f64>) {
    let (task, count) = Sum::new(0);
    let handle = engine(task, batch, conc, ());
    let per = total / threads;
    let start = Instant::now();
    let cpu: Vec<Option<Duration>> = thread::scope(|s| {
        let joins: Vec<_> = (0..threads)
            .map(|t| {
                let handle = handle.clone();
                s.spawn(move || {
                    let cpu0 = thread_cpu();
                    for i in t * per..(t + 1) * per {
                        handle.buffer_one(i, Priority::Back).unwrap();
                    }
                    thread_cpu()?.checked_sub(cpu0?)
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    handle.shutdown_drain().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), per * threads);
    let cpu_ns: Option<f64> = cpu
        .into_iter()
        .try_fold(0.0, |acc, c| Some(acc + c?.as_nanos() as f64));
    (elapsed, cpu_ns.map(|ns| ns / (per * threads) as f64))
}

pub fn single_baseline(total: u64, threads: u64, batch: usize, conc: usize) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let base = Baseline::start(batch, conc, move |b| {
        c.fetch_add(b.len() as u64, Ordering::Relaxed);
        Vec::new()
    });
    let per = total / threads;
    let start = Instant::now();
    thread::scope(|s| {
        for t in 0..threads {
            let tx = base.commands.clone();
            s.spawn(move || {
                for i in t * per..(t + 1) * per {
                    tx.send(Cmd::One(i)).unwrap();
                }
            });
        }
    });
    base.finish();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), per * threads);
    elapsed
}

pub fn init_crate(total: u64, batch: usize, conc: usize) -> Duration {
    let (task, count) = Sum::new(total);
    let start = Instant::now();
    let handle = engine(task, batch, conc, ());
    // init runs at start; wait for all of it to be processed.
    while count.load(Ordering::Relaxed) < total {
        thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    handle.shutdown_drain().unwrap();
    elapsed
}

pub fn retry_crate(total: u64, batch: usize, conc: usize) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let handle = engine(
        RetryOnce {
            count: count.clone(),
        },
        batch,
        conc,
        (),
    );
    let start = Instant::now();
    for entries in chunks(total, batch as u64) {
        handle.buffer(entries, Priority::Back).unwrap();
    }
    handle.shutdown_drain().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), total);
    elapsed
}

pub fn retry_baseline(total: u64, batch: usize, conc: usize) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    let base = Baseline::start(batch, conc, move |b| {
        if b[0] & RETRIED == 0 {
            b.iter().map(|e| e | RETRIED).collect()
        } else {
            c.fetch_add(b.len() as u64, Ordering::Relaxed);
            Vec::new()
        }
    });
    let start = Instant::now();
    for entries in chunks(total, batch as u64) {
        base.commands.send(Cmd::Many(entries)).unwrap();
    }
    base.finish();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), total);
    elapsed
}

/// Records when each `run` starts.
pub struct Stamp {
    pub started: Sender<Instant>,
}

impl Task for Stamp {
    type Entry = u64;
    type State = ();
    fn run(&self, _: &[u64], _: &()) -> Outcome<u64, ()> {
        let _ = self.started.send(Instant::now());
        Outcome::Ok
    }
}

/// Latencies from `buffer` to `run` starting, in µs: full batches into an idle
/// engine, and single entries (partial batches, which wait for the tick).
pub fn latency_crate(samples: usize, interval: Duration, batch: usize) -> (Vec<f64>, Vec<f64>) {
    let (tx, started) = unbounded();
    let handle = Builder::new(Stamp { started: tx }, ())
        .name("latency")
        .max_batch_size(batch)
        .max_concurrency(2)
        .flush_interval(interval)
        .poll(false)
        .start()
        .unwrap();
    let mut full = Vec::with_capacity(samples);
    for _ in 0..samples {
        // Let every engine thread go to sleep first: an idle engine, not a warm one.
        thread::sleep(Duration::from_micros(300));
        let entries: Vec<u64> = (0..batch as u64).collect();
        let t0 = Instant::now();
        handle.buffer(entries, Priority::Back).unwrap();
        let t1 = started.recv().unwrap();
        full.push(t1.duration_since(t0).as_secs_f64() * 1e6);
    }
    let mut partial = Vec::with_capacity(samples / 10);
    for i in 0..samples / 10 {
        // Arrive at a varying point of the tick period.
        thread::sleep(Duration::from_micros(
            (i as u64 * 7919) % interval.as_micros() as u64,
        ));
        let t0 = Instant::now();
        handle.buffer_one(1, Priority::Back).unwrap();
        let t1 = started.recv().unwrap();
        partial.push(t1.duration_since(t0).as_secs_f64() * 1e6);
    }
    handle.shutdown_drain().unwrap();
    (full, partial)
}

/// Latencies from `buffer_one` to `run` starting, in µs, for a lone entry into
/// an idle engine under natural batching (no tick involved).
pub fn latency_natural(samples: usize) -> Vec<f64> {
    let (tx, started) = unbounded();
    let handle = Builder::new(Stamp { started: tx }, ())
        .name("latency-natural")
        .max_batch_size(500)
        .max_concurrency(2)
        .flush_interval(buffered_task::FlushInterval::Never)
        .batching(Batching::Natural)
        .poll(false)
        .start()
        .unwrap();
    let mut lone = Vec::with_capacity(samples);
    for _ in 0..samples {
        // Let every engine thread go to sleep first: an idle engine.
        thread::sleep(Duration::from_micros(300));
        let t0 = Instant::now();
        handle.buffer_one(1, Priority::Back).unwrap();
        let t1 = started.recv().unwrap();
        lone.push(t1.duration_since(t0).as_secs_f64() * 1e6);
    }
    handle.shutdown_drain().unwrap();
    lone
}

/// Resident bytes per queued u64 with `total` entries queued (measured from
/// RSS), with or without key de-duplication.
pub fn memory_crate(total: u64, chunk: u64) -> Option<f64> {
    memory_with(total, chunk, false)
}

pub fn memory_with(total: u64, chunk: u64, dedup: bool) -> Option<f64> {
    let (gate_tx, gate) = bounded::<()>(0);
    let (started_tx, started) = bounded::<()>(1);
    struct Held(Receiver<()>, Sender<()>);
    impl Task for Held {
        type Entry = u64;
        type State = ();
        fn run(&self, _: &[u64], _: &()) -> Outcome<u64, ()> {
            let _ = self.1.try_send(());
            let _ = self.0.recv();
            Outcome::Ok
        }
    }
    let mut builder = Builder::new(Held(gate, started_tx), ())
        .max_batch_size(500)
        .max_concurrency(1)
        .flush_interval(Duration::from_millis(10))
        .poll(false);
    if dedup {
        builder = builder.dedup_by_key(|e: &u64| *e);
    }
    let handle = builder.start().unwrap();
    handle.push_back(vec![0]).unwrap(); // hold the one worker
    started.recv().unwrap();
    let before = rss();
    for entries in chunks(total, chunk) {
        handle.buffer(entries, Priority::Back).unwrap();
    }
    handle.flush().unwrap();
    let queued = handle.debug_count().unwrap().waiting as u64;
    let after = rss();
    drop(gate_tx);
    let _ = handle.shutdown_return();
    assert_eq!(queued, total);
    Some((after?.saturating_sub(before?)) as f64 / total as f64)
}

pub fn rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line[6..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// This thread's CPU time (Linux: the first field of /proc/thread-self/schedstat,
/// in nanoseconds; where that is missing, utime + stime of
/// /proc/thread-self/stat, in clock ticks of 10 ms).
pub fn thread_cpu() -> Option<Duration> {
    if let Ok(stat) = std::fs::read_to_string("/proc/thread-self/schedstat") {
        if let Some(ns) = stat.split_whitespace().next().and_then(|f| f.parse().ok()) {
            return Some(Duration::from_nanos(ns));
        }
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// This process's CPU time, all threads (Linux: /proc/self/stat, 10 ms ticks).
pub fn process_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let idx = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[idx]
}

pub fn meps(entries: u64, d: Duration) -> f64 {
    entries as f64 / d.as_secs_f64() / 1e6
}

// ---------------------------------------------------------------------------
// CPU work inside batches: the engine alone, the engine with rayon inside each
// batch, and a plain rayon `par_iter` over the same entries (the limit).

/// About 2 µs of CPU work for one entry on the machine this was written on
/// (a mixing loop the optimiser cannot skip).
pub fn cpu_work(entry: u64) -> u64 {
    let mut h = entry ^ 0x9E37_79B9_7F4A_7C15;
    for i in 0..600u64 {
        h = (h ^ i).wrapping_mul(0x100_0000_01B3).rotate_left(17);
    }
    std::hint::black_box(h)
}

/// Runs `cpu_work` on every entry of each batch, on the worker or on rayon.
pub struct Crunch {
    pub count: Arc<AtomicU64>,
    pub rayon: bool,
}

impl Task for Crunch {
    type Entry = u64;
    type State = ();
    fn run(&self, batch: &[u64], _: &()) -> Outcome<u64, ()> {
        let outcome = if self.rayon {
            buffered_task::par_each(batch, |&e| {
                cpu_work(e);
                Ok::<(), std::convert::Infallible>(())
            })
        } else {
            for &e in batch {
                cpu_work(e);
            }
            Outcome::Ok
        };
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        outcome
    }
}

/// Entries with CPU work through an engine of `conc` workers, with or without
/// rayon inside the batches.
pub fn cpu_crate(total: u64, batch: usize, conc: usize, rayon: bool) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let task = Crunch {
        count: count.clone(),
        rayon,
    };
    feed_and_drain(engine(task, batch, conc, ()), total, batch, &count)
}

/// Hands `0..total` over in chunks of `batch`, drains, and checks that `count`
/// saw every entry; the wall time of it all.
fn feed_and_drain(handle: Handle<u64>, total: u64, batch: usize, count: &AtomicU64) -> Duration {
    let start = Instant::now();
    for entries in chunks(total, batch as u64) {
        handle.buffer(entries, Priority::Back).unwrap();
    }
    handle.shutdown_drain().unwrap();
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), total);
    elapsed
}

/// The same CPU work as a plain rayon `par_iter` over all the entries.
pub fn cpu_par_iter(total: u64) -> Duration {
    use buffered_task::rayon::prelude::*;
    let entries: Vec<u64> = (0..total).collect();
    let start = Instant::now();
    let sum: u64 = entries.par_iter().map(|&e| cpu_work(e)).sum();
    std::hint::black_box(sum);
    start.elapsed()
}

// ---------------------------------------------------------------------------
// A second baseline for single hand-overs: the least a buffer can be, a
// mutex-guarded `Vec` that producers push into and swap out whole when it holds
// a batch, sent over a channel to a fixed pool of workers.

/// Wall time, and the producers' CPU nanoseconds per push (where measurable).
pub fn single_mutex_vec(
    total: u64,
    threads: u64,
    batch: usize,
    conc: usize,
) -> (Duration, Option<f64>) {
    let buffer = parking_lot::Mutex::new(Vec::<u64>::with_capacity(batch));
    let (jobs, job_rx) = unbounded::<Vec<u64>>();
    let count = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (job_rx, count) = (job_rx.clone(), count.clone());
            thread::spawn(move || {
                for job in job_rx.iter() {
                    std::hint::black_box(job.iter().sum::<u64>());
                    count.fetch_add(job.len() as u64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let per = total / threads;
    let start = Instant::now();
    let cpu: Vec<Option<Duration>> = thread::scope(|s| {
        let joins: Vec<_> = (0..threads)
            .map(|t| {
                let (buffer, jobs) = (&buffer, jobs.clone());
                s.spawn(move || {
                    let cpu0 = thread_cpu();
                    for i in t * per..(t + 1) * per {
                        let mut b = buffer.lock();
                        b.push(i);
                        if b.len() >= batch {
                            let full = std::mem::replace(&mut *b, Vec::with_capacity(batch));
                            drop(b);
                            jobs.send(full).unwrap();
                        }
                    }
                    thread_cpu()?.checked_sub(cpu0?)
                })
            })
            .collect();
        joins.into_iter().map(|j| j.join().unwrap()).collect()
    });
    jobs.send(std::mem::take(&mut *buffer.lock())).unwrap();
    drop(jobs);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = start.elapsed();
    assert_eq!(count.load(Ordering::Relaxed), per * threads);
    let cpu_ns: Option<f64> = cpu
        .into_iter()
        .try_fold(0.0, |acc, c| Some(acc + c?.as_nanos() as f64));
    (elapsed, cpu_ns.map(|ns| ns / (per * threads) as f64))
}

// ---------------------------------------------------------------------------
// Scaling: a fixed busy cost per entry, 1..N workers, the engine against plain
// threads that share the same batches through one atomic index (no engine at
// all: the most the machine gives).

/// Busy work: `iters` rounds of a mixing loop the optimiser cannot skip.
pub fn busy(entry: u64, iters: u64) -> u64 {
    let mut h = entry ^ 0x9E37_79B9_7F4A_7C15;
    for i in 0..iters {
        h = (h ^ i).wrapping_mul(0x100_0000_01B3).rotate_left(17);
    }
    std::hint::black_box(h)
}

/// How many `busy` rounds take `us` microseconds on this machine (the best of
/// several timings, so a busy machine does not inflate it).
pub fn busy_rounds_for(us: f64) -> u64 {
    let rounds = 1_000_000;
    let best = (0..5)
        .map(|_| {
            let t = Instant::now();
            busy(1, rounds);
            t.elapsed()
        })
        .min()
        .unwrap();
    ((rounds as f64 * us * 1e-6 / best.as_secs_f64()) as u64).max(1)
}

/// Runs `busy(e, rounds)` on every entry of each batch.
pub struct Busy {
    pub rounds: u64,
    pub count: Arc<AtomicU64>,
}

impl Task for Busy {
    type Entry = u64;
    type State = ();
    fn run(&self, batch: &[u64], _: &()) -> Outcome<u64, ()> {
        for &e in batch {
            busy(e, self.rounds);
        }
        self.count.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Outcome::Ok
    }
}

/// `total` entries of `rounds` busy work through an engine of `workers`.
pub fn scaling_crate(total: u64, batch: usize, workers: usize, rounds: u64) -> Duration {
    let count = Arc::new(AtomicU64::new(0));
    let task = Busy {
        rounds,
        count: count.clone(),
    };
    feed_and_drain(engine(task, batch, workers, ()), total, batch, &count)
}

/// The same work on `workers` plain threads taking batches by an atomic index.
pub fn scaling_threads(total: u64, batch: usize, workers: usize, rounds: u64) -> Duration {
    let batches: Vec<Vec<u64>> = chunks(total, batch as u64).collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(b) = batches.get(i) else { return };
                for &e in b {
                    busy(e, rounds);
                }
            });
        }
    });
    start.elapsed()
}

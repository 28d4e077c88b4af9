//! Stress: 8 threads buffer 200,000 entries with random priorities while `run`
//! randomly retries (all or some) or panics; every entry succeeds exactly once.

mod common;
use buffered_task::{Builder, Outcome, Priority};
use common::*;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const THREADS: u32 = 8;
const PER_THREAD: u32 = 25_000;
const TOTAL: usize = (THREADS * PER_THREAD) as usize;

#[test]
fn every_entry_succeeds_exactly_once_under_retries_and_panics() {
    quiet_panics();
    let seed: u64 = std::env::var("STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("stress seed {seed} (rerun with STRESS_SEED={seed})");

    let successes: Arc<Vec<AtomicU32>> = Arc::new((0..TOTAL).map(|_| AtomicU32::new(0)).collect());
    let runs = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let panics = Arc::new(AtomicU64::new(0));
    let (s, r, rt, p) = (
        successes.clone(),
        runs.clone(),
        retried.clone(),
        panics.clone(),
    );
    let task = Script::new(move |batch: &[u32], _: &()| {
        let n = r.fetch_add(1, Ordering::Relaxed);
        let mut rng =
            rand::rngs::StdRng::seed_from_u64(seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        match rng.gen_range(0..100) {
            0..=4 => {
                p.fetch_add(1, Ordering::Relaxed);
                panic!("deliberate stress panic");
            }
            5..=14 => {
                rt.fetch_add(batch.len() as u64, Ordering::Relaxed);
                Outcome::Retry
            }
            15..=29 => {
                // Retry a random subset; the rest succeed.
                let mut again = Vec::new();
                for &e in batch {
                    if rng.gen_bool(0.5) {
                        again.push(e);
                    } else {
                        s[e as usize].fetch_add(1, Ordering::Relaxed);
                    }
                }
                rt.fetch_add(again.len() as u64, Ordering::Relaxed);
                Outcome::RetryEntries(again)
            }
            _ => {
                for &e in batch {
                    s[e as usize].fetch_add(1, Ordering::Relaxed);
                }
                Outcome::Ok
            }
        }
    });
    let handle = Builder::new(task, ())
        .name("stress")
        .max_batch_size(50)
        .max_concurrency(4)
        .flush_interval(Duration::from_millis(2))
        .poll(false)
        .start()
        .unwrap();

    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let handle = handle.clone();
            scope.spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(u64::from(t)));
                let mut next = t * PER_THREAD;
                let end = next + PER_THREAD;
                while next < end {
                    let n = rng.gen_range(1..=40).min(end - next);
                    let entries: Vec<u32> = (next..next + n).collect();
                    next += n;
                    let priority = if rng.gen_bool(0.3) {
                        Priority::Front
                    } else {
                        Priority::Back
                    };
                    if n == 1 && rng.gen_bool(0.5) {
                        handle.buffer_one(entries[0], priority).unwrap();
                    } else {
                        handle.buffer(entries, priority).unwrap();
                    }
                }
            });
        }
    });
    let report = handle.shutdown_drain().unwrap();
    assert!(report.unprocessed.is_empty());
    assert_eq!(report.overflowed, 0);

    let mut wrong = Vec::new();
    for (i, c) in successes.iter().enumerate() {
        if c.load(Ordering::Relaxed) != 1 {
            wrong.push((i, c.load(Ordering::Relaxed)));
        }
    }
    assert!(
        wrong.is_empty(),
        "seed {seed}: entries not run exactly once: {:?}",
        &wrong[..wrong.len().min(10)]
    );
    let total: u64 = successes
        .iter()
        .map(|c| u64::from(c.load(Ordering::Relaxed)))
        .sum();
    assert_eq!(total, TOTAL as u64);
    assert!(
        panics.load(Ordering::Relaxed) > 0,
        "seed {seed}: the panic path never ran"
    );
    assert!(
        retried.load(Ordering::Relaxed) > 0,
        "seed {seed}: the retry path never ran"
    );
}

//! A simulated block indexer: a backlog of blocks streamed by `init`, new blocks
//! arriving at the chain head (front priority), and a `run` that calls a slow,
//! unreliable "RPC node": some blocks fail and are retried, and now and then the
//! fetch code panics. Live progress every 250 ms, then a summary.
//!
//! `cargo run --release --example demo`

use buffered_task::{Builder, Outcome, Priority, Sink, Task};
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKLOG: u64 = 100_000;
const HEAD_BLOCKS: u64 = 2_000;

#[derive(Default)]
struct Counters {
    indexed: AtomicU64,
    retried: AtomicU64,
    panics: AtomicU64,
    calls: AtomicU64,
}

struct Indexer {
    counters: Arc<Counters>,
}

impl Task for Indexer {
    type Entry = u64; // a block number
    type State = ();

    fn init(&self, sink: &mut Sink<u64>, _: &()) {
        // The backlog: every block not indexed yet, oldest first.
        for block in 0..BACKLOG {
            if !sink.push(block) {
                return; // shutting down
            }
        }
    }

    fn run(&self, blocks: &[u64], _: &()) -> Outcome<u64, ()> {
        let mut rng = rand::thread_rng();
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        // One round trip to the node: 2–6 ms.
        std::thread::sleep(Duration::from_micros(rng.gen_range(2_000..6_000)));
        if rng.gen_ratio(1, 200) {
            self.counters.panics.fetch_add(1, Ordering::Relaxed);
            panic!("decoder bug on block {}", blocks[0]);
        }
        // About 2% of blocks come back with a "header not found" error.
        let failed: Vec<u64> = blocks
            .iter()
            .copied()
            .filter(|_| rng.gen_ratio(1, 50))
            .collect();
        let done = (blocks.len() - failed.len()) as u64;
        self.counters.indexed.fetch_add(done, Ordering::Relaxed);
        if failed.is_empty() {
            Outcome::Ok
        } else {
            self.counters
                .retried
                .fetch_add(failed.len() as u64, Ordering::Relaxed);
            Outcome::RetryEntries(failed)
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // One short line per panic instead of the default report.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        eprintln!("  (run panicked: {msg}; the batch will be retried)");
    }));

    let counters = Arc::new(Counters::default());
    let handle = Builder::new(
        Indexer {
            counters: counters.clone(),
        },
        (),
    )
    .name("indexer")
    .max_batch_size(25)
    .max_concurrency(8)
    .flush_interval(Duration::from_millis(100))
    .poll(false)
    .start()?;

    let start = Instant::now();
    let head_done = Arc::new(AtomicBool::new(false));
    std::thread::scope(|scope| -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // The chain head: new blocks every millisecond, indexed before the backlog.
        let head = handle.clone();
        let head_flag = head_done.clone();
        scope.spawn(move || {
            for block in BACKLOG..BACKLOG + HEAD_BLOCKS {
                if head.buffer_one(block, Priority::Front).is_err() {
                    break;
                }
                if block % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            head_flag.store(true, Ordering::Relaxed);
        });

        let total = BACKLOG + HEAD_BLOCKS;
        loop {
            std::thread::sleep(Duration::from_millis(250));
            let count = handle.debug_count()?;
            let indexed = counters.indexed.load(Ordering::Relaxed);
            println!(
                "{:>6.2}s  indexed {:>7}/{total}  retried {:>5}  panics {:>3}  waiting {:>7}  running {:>2}",
                start.elapsed().as_secs_f64(),
                indexed,
                counters.retried.load(Ordering::Relaxed),
                counters.panics.load(Ordering::Relaxed),
                count.waiting,
                count.running,
            );
            if indexed >= total && head_done.load(Ordering::Relaxed) {
                return Ok(());
            }
        }
    })
    .map_err(|e| e.to_string())?;

    let report = handle.shutdown_drain()?;
    let elapsed = start.elapsed();
    let indexed = counters.indexed.load(Ordering::Relaxed);
    println!();
    println!("summary");
    println!("  blocks indexed     {indexed}");
    println!(
        "  run calls          {}",
        counters.calls.load(Ordering::Relaxed)
    );
    println!(
        "  blocks retried     {}",
        counters.retried.load(Ordering::Relaxed)
    );
    println!(
        "  panics survived    {}",
        counters.panics.load(Ordering::Relaxed)
    );
    println!("  left unprocessed   {}", report.unprocessed.len());
    println!("  overflowed         {}", report.overflowed);
    println!(
        "  elapsed            {:.2}s ({:.0} blocks/s)",
        elapsed.as_secs_f64(),
        indexed as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(
        indexed,
        BACKLOG + HEAD_BLOCKS,
        "every block indexed exactly once"
    );
    Ok(())
}

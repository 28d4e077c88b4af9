//! A simulated block indexer: a backlog of old blocks streamed by `init`, new
//! blocks arriving at the chain head with front priority, and a `run` that calls a
//! slow, unreliable "RPC node": some blocks fail and are retried, and now and then
//! the fetch code panics (the engine catches it and retries the batch).
//!
//! Everything shown comes from `handle.stats()`, except the two domain counts the
//! engine cannot know: head blocks and backlog blocks are counted apart, with the
//! time each head block waited from arrival to indexed, so front priority is
//! visible: head blocks are indexed within a batch or two of arriving while the
//! backlog drains behind them.
//!
//! The engine's own log lines show through `env_logger` (`RUST_LOG` to change the
//! level). Ctrl-C (or SIGTERM) stops the engine with `shutdown_timeout`: it drains
//! for half a second, then hands back what did not start, and the summary counts it.
//!
//! `cargo run --release --example demo`

use buffered_task::{
    Builder, Handle, Outcome, Priority, RetryPolicy, ShutdownReport, Sink, Stats, Task,
};
use crossbeam_channel::{select, tick};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use rand::Rng;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BACKLOG: u64 = 100_000;
const HEAD_BLOCKS: u64 = 2_000;

/// A block to index: old (backlog) or new at the chain head, with when it arrived.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Block {
    Backlog(u64),
    Head(u64, Instant),
}

impl Block {
    fn number(&self) -> u64 {
        match self {
            Block::Backlog(number) | Block::Head(number, _) => *number,
        }
    }
}

/// What only the task knows: which kind of block was indexed, and how long head
/// blocks waited.
#[derive(Default)]
struct Progress {
    backlog: AtomicU64,
    head: AtomicU64,
    head_waits: Mutex<Vec<Duration>>,
}

struct Indexer {
    progress: Arc<Progress>,
}

impl Task for Indexer {
    type Entry = Block;
    type State = ();

    fn init(&self, sink: &mut Sink<Block>, _: &()) {
        // The backlog: every block not indexed yet, oldest first.
        for number in 0..BACKLOG {
            if !sink.push(Block::Backlog(number)) {
                return; // shutting down
            }
        }
    }

    fn run(&self, blocks: &[Block], _: &()) -> Outcome<Block, ()> {
        let mut rng = rand::thread_rng();
        // One round trip to the node: 2–6 ms.
        std::thread::sleep(Duration::from_micros(rng.gen_range(2_000..6_000)));
        if rng.gen_ratio(1, 200) {
            panic!("decoder bug on block {}", blocks[0].number());
        }
        // About 2% of blocks come back with a "header not found" error.
        let mut failed = Vec::new();
        for block in blocks {
            if rng.gen_ratio(1, 50) {
                failed.push(*block);
                continue;
            }
            match block {
                Block::Backlog(_) => {
                    self.progress.backlog.fetch_add(1, Ordering::Relaxed);
                }
                Block::Head(_, arrived) => {
                    self.progress.head.fetch_add(1, Ordering::Relaxed);
                    self.progress.head_waits.lock().push(arrived.elapsed());
                }
            }
        }
        if failed.is_empty() {
            Outcome::Ok
        } else {
            Outcome::RetryEntries(failed)
        }
    }
}

/// Lines from `env_logger`, written above the progress bars instead of through them.
struct AboveBars(MultiProgress);

impl Write for AboveBars {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.suspend(|| std::io::stderr().write_all(buf))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

struct Bars {
    backlog: ProgressBar,
    head: ProgressBar,
    engine: ProgressBar,
}

impl Bars {
    fn new(multi: &MultiProgress) -> Self {
        let style = ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos:>7}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        let bar = |len: u64, prefix: &'static str| {
            let bar = multi.add(ProgressBar::new(len));
            bar.set_style(style.clone());
            bar.set_prefix(prefix);
            bar
        };
        let engine = multi.add(ProgressBar::new_spinner());
        engine.set_style(
            ProgressStyle::with_template("{prefix:>8} {msg}").expect("a valid template"),
        );
        engine.set_prefix("engine");
        Bars {
            backlog: bar(BACKLOG, "backlog"),
            head: bar(HEAD_BLOCKS, "head"),
            engine,
        }
    }

    fn show(&self, progress: &Progress, stats: &Stats) {
        self.backlog
            .set_position(progress.backlog.load(Ordering::Relaxed));
        self.head
            .set_position(progress.head.load(Ordering::Relaxed));
        let waits = progress.head_waits.lock();
        if let Some(last) = waits.last() {
            self.head.set_message(format!("last waited {last:.1?}"));
        }
        drop(waits);
        self.engine.set_message(format!(
            "buffered {:>5}  queued {:>6}  running {}  processed {:>6}  retried {:>5}  panics {:>3}  oldest wait {:.0?}",
            stats.buffered,
            stats.queued,
            stats.running,
            stats.processed,
            stats.retried,
            stats.panicked,
            stats.oldest_wait.unwrap_or_default(),
        ));
    }

    fn finish(&self) {
        self.backlog.finish();
        self.head.finish();
        self.engine.finish();
    }
}

/// The chain head: a new block every half millisecond or so, at the front.
fn follow_head(handle: Handle<Block>) {
    for number in BACKLOG..BACKLOG + HEAD_BLOCKS {
        if handle
            .buffer_one(Block::Head(number, Instant::now()), Priority::Front)
            .is_err()
        {
            return; // the engine stopped (Ctrl-C)
        }
        if number % 10 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let multi = MultiProgress::new();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(AboveBars(multi.clone()))))
        .init();
    // The engine logs each panic it catches; the default hook would add a backtrace.
    std::panic::set_hook(Box::new(|_| {}));
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    ctrlc::set_handler(move || {
        let _ = stop_tx.try_send(());
    })?;

    let progress = Arc::new(Progress::default());
    let handle = Builder::new(
        Indexer {
            progress: progress.clone(),
        },
        (),
    )
    .name("indexer")
    .max_batch_size(25)
    .max_concurrency(8)
    .flush_interval(Duration::from_millis(50))
    .poll(false) // the backlog is streamed once
    // Failed blocks wait out a backoff, then go ahead of the queue: a head block
    // that failed does not wait behind the whole backlog.
    .retry_policy(RetryPolicy::new(10).backoff(Duration::from_millis(10), Duration::from_secs(1)))
    .dead_letter_handler(|blocks, reason| {
        log::error!("gave up on {} blocks: {reason}", blocks.len())
    })
    .start()?;

    let bars = Bars::new(&multi);
    let start = Instant::now();
    let head = std::thread::spawn({
        let handle = handle.clone();
        move || follow_head(handle)
    });
    let ticks = tick(Duration::from_millis(100));
    let total = BACKLOG + HEAD_BLOCKS;
    let interrupted = loop {
        select! {
            recv(ticks) -> _ => {
                let stats = handle.stats();
                bars.show(&progress, &stats);
                if stats.processed + stats.dead_lettered >= total {
                    break false;
                }
            }
            recv(stop_rx) -> _ => break true,
        }
    };
    let report = if interrupted {
        // Drain for half a second, then hand back what did not start: a real
        // indexer would find those blocks again through `init` on its next start.
        log::warn!("interrupted: draining for 500 ms, then stopping");
        handle.shutdown_timeout(Duration::from_millis(500))?
    } else {
        handle.shutdown_drain()?
    };
    head.join().map_err(|_| "the head thread panicked")?;
    bars.show(&progress, &handle.stats());
    bars.finish();
    summary(&progress, &handle.stats(), &report, start.elapsed());
    if !interrupted {
        let stats = handle.stats();
        assert_eq!(
            stats.processed + stats.dead_lettered,
            total,
            "every block accounted for"
        );
    }
    Ok(())
}

fn summary(progress: &Progress, stats: &Stats, report: &ShutdownReport<Block>, took: Duration) {
    let mut waits = progress.head_waits.lock().clone();
    waits.sort();
    let at = |q: f64| {
        waits
            .get(((waits.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    println!();
    println!("summary (from handle.stats())");
    println!("  blocks processed   {}", stats.processed);
    println!(
        "    backlog          {}",
        progress.backlog.load(Ordering::Relaxed)
    );
    println!(
        "    head             {}  (arrival to indexed: p50 {:.1?}, p99 {:.1?}, max {:.1?})",
        progress.head.load(Ordering::Relaxed),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    println!("  blocks retried     {}", stats.retried);
    println!("  panics caught      {}", stats.panicked);
    println!("  dead-lettered      {}", stats.dead_lettered);
    println!("  handed back        {}", report.unprocessed.len());
    println!("  still running      {}", report.still_running);
    println!("  overflowed         {}", report.overflowed);
    println!(
        "  elapsed            {:.2}s ({:.0} blocks/s)",
        took.as_secs_f64(),
        stats.processed as f64 / took.as_secs_f64()
    );
}

//! A task with a large backlog under a memory monitor with a low limit. Watch the
//! log: the monitor shrinks the queue (the shed rows stay pending at their source),
//! `init` finds them again once the queue has drained, and the monitor expands the
//! queue when memory falls back.
//!
//! `cargo run --release --example memory_pressure`
//!
//! The probe here reports the engine's queued memory (what a real process's
//! resident memory would track), so the run is the same on every machine.

use buffered_task::{Builder, Handle, MemoryMonitor, MemoryProbe, Outcome, Sink, Task, WeakHandle};
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const ROWS: u64 = 40_000;
const PAYLOAD: usize = 1024;
const LIMIT: u64 = 8 << 20; // 8 MiB; the backlog needs about 40 MiB

/// The source of truth: rows not processed yet (a table, in real life).
struct Source {
    pending: Mutex<BTreeSet<u64>>,
}

struct Row {
    id: u64,
    payload: Vec<u8>,
}

struct Exporter {
    source: Arc<Source>,
}

impl Task for Exporter {
    type Entry = Row;
    type State = ();

    fn init(&self, sink: &mut Sink<Row>, _: &()) {
        let pending: Vec<u64> = self.source.pending.lock().iter().copied().collect();
        log::info!(
            "init: streaming {} pending rows from the source",
            pending.len()
        );
        for id in pending {
            sink.push(Row {
                id,
                payload: vec![0; PAYLOAD],
            });
        }
    }

    fn run(&self, rows: &[Row], _: &()) -> Outcome<Row, ()> {
        std::thread::sleep(Duration::from_millis(4)); // the export round trip
        let mut pending = self.source.pending.lock();
        for row in rows {
            debug_assert_eq!(row.payload.len(), PAYLOAD);
            pending.remove(&row.id);
        }
        Outcome::Ok
    }
}

/// Reports the engine's queued memory plus a small base.
struct QueuedMemory(Arc<OnceLock<WeakHandle<Row>>>);

impl MemoryProbe for QueuedMemory {
    fn used_bytes(&self) -> Option<u64> {
        let handle = self.0.get()?.upgrade()?;
        Some(handle.memory_usage().ok()? as u64 + (1 << 20))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();

    let source = Arc::new(Source {
        pending: Mutex::new((0..ROWS).collect()),
    });
    let slot = Arc::new(OnceLock::new());
    let monitor = MemoryMonitor::builder()
        .limit_bytes(LIMIT)
        .check_interval(Duration::from_millis(100))
        .probe(QueuedMemory(slot.clone()))
        .start()?;
    log::info!("memory monitor: limit {} bytes", monitor.limit());

    let handle: Handle<Row> = Builder::new(
        Exporter {
            source: source.clone(),
        },
        (),
    )
    .name("exporter")
    .max_batch_size(50)
    .max_concurrency(2)
    .flush_interval(Duration::from_millis(100))
    .poll(true)
    .idle_poll_delay(Duration::from_millis(200))
    .memory_monitor(&monitor)
    .weigher(|row: &Row| row.payload.capacity())
    .start()?;
    let _ = slot.set(handle.downgrade());

    let start = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let left = source.pending.lock().len();
        let count = handle.debug_count()?;
        log::info!(
            "progress: {} rows still pending at the source, {} queued, shrunk: {}",
            left,
            count.waiting,
            handle.is_shrunk()?
        );
        if left == 0 {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            return Err("did not finish in a minute".into());
        }
    }
    let report = handle.shutdown_drain()?;
    log::info!(
        "done in {:.1}s: every row exported; {} queued rows were shed and found again",
        start.elapsed().as_secs_f64(),
        report.overflowed
    );
    Ok(())
}

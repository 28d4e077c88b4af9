//! Drives a handle with an arbitrary sequence of operations and settings, then
//! checks that every entry given left the engine exactly once (processed, handed
//! back, overflowed or dead-lettered) and that nothing panicked outside `run`.
//!
//! `cargo fuzz run handle_ops` (from the repository root; needs cargo-fuzz).
#![no_main]

use arbitrary::Arbitrary;
use buffered_task::{
    BufferError, Builder, FlushInterval, Outcome, OverflowPolicy, Priority, RetryPolicy, Sink, Task,
};
use libfuzzer_sys::fuzz_target;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Arbitrary, Debug)]
struct Settings {
    batch: u8,
    concurrency: u8,
    bound: Option<u8>,
    policy: u8,
    retry_attempts: Option<u8>,
    init_entries: u8,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Buffer { n: u8, front: bool },
    BufferOne { front: bool },
    PushBack { n: u8 },
    PushFront { n: u8 },
    Flush,
    Shrink,
    Expand,
    Count,
    Stats,
}

#[derive(Arbitrary, Debug)]
struct Input {
    settings: Settings,
    ops: Vec<Op>,
    end_with_return: bool,
}

#[derive(Default)]
struct Ledger {
    processed: Vec<u64>,
    back: Vec<u64>,
    over: Vec<u64>,
    dead: Vec<u64>,
    tried: HashSet<u64>,
}

struct Fuzzed {
    ledger: Arc<Mutex<Ledger>>,
    init_entries: u64,
}

const INIT_BASE: u64 = 1 << 40;

impl Task for Fuzzed {
    type Entry = u64;
    type State = ();
    fn init(&self, sink: &mut Sink<u64>, _: &()) {
        for i in 0..self.init_entries {
            sink.push(INIT_BASE + i);
        }
    }
    fn run(&self, batch: &[u64], _: &()) -> Outcome<u64, ()> {
        let mut ledger = self.ledger.lock().unwrap();
        let mut again = Vec::new();
        for &id in batch {
            // Some entries fail once (retry or panic), then succeed.
            if id % 3 == 0 && ledger.tried.insert(id) {
                again.push(id);
            } else {
                ledger.processed.push(id);
            }
        }
        if batch.iter().any(|id| id % 7 == 1) && batch.iter().all(|id| !ledger.tried.contains(id)) {
            for &id in batch {
                ledger.tried.insert(id);
            }
            ledger.processed.retain(|p| !batch.contains(p));
            drop(ledger);
            panic!("fuzz panic");
        }
        Outcome::RetryEntries(again)
    }
}

fuzz_target!(|input: Input| {
    std::panic::set_hook(Box::new(|_| {}));
    let s = &input.settings;
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut builder = Builder::new(
        Fuzzed {
            ledger: ledger.clone(),
            init_entries: u64::from(s.init_entries % 50),
        },
        (),
    )
    .max_batch_size(usize::from(s.batch % 8) + 1)
    .max_concurrency(usize::from(s.concurrency % 3) + 1)
    .flush_interval(FlushInterval::Never)
    .poll(false)
    .overflow_policy(match s.policy % 3 {
        0 => OverflowPolicy::DropNewest,
        1 => OverflowPolicy::Reject,
        _ => OverflowPolicy::DropNewest, // Block could wait for a flush nobody does
    });
    if let Some(bound) = s.bound {
        builder = builder.max_queue_len(usize::from(bound) + 1);
    }
    if let Some(attempts) = s.retry_attempts {
        let dead = ledger.clone();
        builder = builder
            .retry_policy(
                RetryPolicy::new(u32::from(attempts % 4) + 1)
                    .backoff(Duration::ZERO, Duration::ZERO),
            )
            .dead_letter_handler(move |e, _| dead.lock().unwrap().dead.extend(e));
    }
    let over = ledger.clone();
    let handle = builder
        .overflow_handler(move |e, _| over.lock().unwrap().over.extend(e))
        .start()
        .expect("valid settings");

    let mut given: Vec<u64> = (0..u64::from(s.init_entries % 50))
        .map(|i| INIT_BASE + i)
        .collect();
    let mut next = 0u64;
    let mut take = |n: u8| -> Vec<u64> {
        let ids: Vec<u64> = (next..next + u64::from(n % 16)).collect();
        next += u64::from(n % 16);
        ids
    };
    let refused = |r: Result<(), BufferError<u64>>| {
        if let Err(e) = r {
            ledger.lock().unwrap().back.extend(e.into_entries());
        }
    };
    for op in input.ops.iter().take(200) {
        match *op {
            Op::Buffer { n, front } => {
                let ids = take(n);
                given.extend(&ids);
                let p = if front {
                    Priority::Front
                } else {
                    Priority::Back
                };
                refused(handle.buffer(ids, p));
            }
            Op::BufferOne { front } => {
                let ids = take(1);
                given.extend(&ids);
                let p = if front {
                    Priority::Front
                } else {
                    Priority::Back
                };
                refused(handle.buffer_one(ids[0], p));
            }
            Op::PushBack { n } => {
                let ids = take(n);
                given.extend(&ids);
                refused(handle.push_back(ids));
            }
            Op::PushFront { n } => {
                let ids = take(n);
                given.extend(&ids);
                refused(handle.push_front(ids));
            }
            Op::Flush => handle.flush().unwrap(),
            Op::Shrink => {
                let _ = handle.shrink();
            }
            Op::Expand => handle.expand().unwrap(),
            Op::Count => {
                handle.debug_count().unwrap();
            }
            Op::Stats => {
                handle.stats();
            }
        }
    }
    let report = if input.end_with_return {
        handle.shutdown_return().unwrap()
    } else {
        handle.shutdown_drain().unwrap()
    };
    let mut l = ledger.lock().unwrap();
    l.back.extend(report.unprocessed);
    let mut out: Vec<u64> = Vec::new();
    out.extend(&l.processed);
    out.extend(&l.back);
    out.extend(&l.over);
    out.extend(&l.dead);
    out.sort_unstable();
    given.sort_unstable();
    assert_eq!(out, given, "every entry leaves exactly once");
});

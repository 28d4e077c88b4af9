//! Key de-duplication, found by a fourth hostile review: `wait_idle` must
//! wait for the handler of an `init` chunk's duplicates, reported once the
//! chunk's other entries are queued.
mod common;
use buffered_task::{Builder, FlushInterval, IdleError, OverflowReason};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

type Entry = (u32, u32);

// ---------------------------------------------------------------------------
// 1. `wait_idle` returns while an `init` chunk's duplicates are still on their
//    way to (here: inside) the overflow handler.
// ---------------------------------------------------------------------------

/// 72fef4f moved the report of a `feed`'s duplicates to the end of the
/// chunk, after its kept entries are queued (`Store::duplicates` at the end
/// of `feed`). Nothing counts them meanwhile: not `State::handing` (as the
/// chunk's `Full` overflow is), not a run slot (as a worker's duplicates
/// are since 72fef4f), and `left_upto` does not look at the init run.
///
/// Order (one worker, batch 2): (0, 0) runs and waits for a permit;
/// A = (5, 0) is pushed back and waits (its key owed); `poll_now`: `init`
/// feeds the chunk [(5, 1), (7, 0)]: (5, 1) is A's duplicate, (7, 0) is
/// queued, and then (5, 1) goes to the overflow handler, which waits at a
/// gate. Everything else runs and is processed. Then `wait_idle(300 ms)`
/// from the test thread: (5, 1) was handed over (fed, in the same chunk as
/// (7, 0), which the engine did queue and run) before the call, and has not
/// left (its handler has not returned), so it must time out. It returns
/// `Ok` at once.
#[test]
fn wait_idle_waits_for_the_handler_of_an_init_chunks_duplicates() {
    let (task, started, permit, books) = permitted(|_| false);
    let armed = Arc::new(AtomicBool::new(false)); // the start's own init feeds nothing
    let arm = armed.clone();
    let task = task.with_init(move |sink, _: &()| {
        if !arm.load(SeqCst) {
            return;
        }
        sink.push((5, 1));
        sink.push((7, 0)); // a full chunk (batch 2): fed now
    });
    let (in_handler_tx, in_handler) = unbounded::<()>();
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
                in_handler_tx.send(()).unwrap();
                g.wait();
            }
        })
        .start()
        .unwrap();
    books.push_back(&handle, vec![(0, 0)]).unwrap();
    assert_eq!(recv(&started), vec![(0, 0)]); // the worker is busy
    books.push_back(&handle, vec![(5, 0)]).unwrap(); // A waits, its key owed
    wait_until(|| handle.stats().init_runs == 1);
    books.given(&[(5, 1), (7, 0)]); // fed by init
    armed.store(true, SeqCst);
    handle.poll_now().unwrap();
    recv(&in_handler); // (7, 0) queued; (5, 1) in its handler
    for _ in 0..3 {
        permit.send(()).unwrap();
    }
    wait_until(|| handle.stats().processed == 3); // (0, 0), A, (7, 0)
    let early = handle.wait_idle(Duration::from_millis(300));
    gate.open();
    handle.wait_idle(HANG).unwrap();
    books.finish(handle.shutdown_drain().unwrap());
    assert!(
        matches!(early, Err(IdleError::Timeout { .. })),
        "wait_idle returned {early:?} while (5, 1), fed before the call in the chunk \
         whose other entry it waited for, was still in its overflow handler \
         (dropped as a duplicate by `feed`)"
    );
}

//! Natural batching: a free worker takes whatever is buffered at once; under
//! load, batches fill up by themselves.

mod common;
use buffered_task::{Batching, Builder, FlushInterval, Priority};
use common::*;

#[test]
fn a_lone_entry_runs_at_once_without_any_flush() {
    let (task, held) = held::<u32>();
    held.gate.open(); // runs pass straight through
    let handle = Builder::new(task, ())
        .max_batch_size(100)
        .flush_interval(FlushInterval::Never)
        .batching(Batching::Natural)
        .poll(false)
        .start()
        .unwrap();
    for i in 0..20 {
        held.books.buffer(&handle, vec![i], Priority::Back).unwrap();
        assert_eq!(recv(&held.ran), vec![i]); // no tick, no flush: it ran
    }
    held.books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn under_load_batches_fill_up_by_themselves() {
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(4)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .batching(Batching::Natural)
        .poll(false)
        .start()
        .unwrap();
    held.books.buffer_one(&handle, 0, Priority::Back).unwrap();
    recv(&held.started); // the only worker is busy with [0]
    for i in 1..=10 {
        held.books.buffer_one(&handle, i, Priority::Back).unwrap();
    }
    let count = handle.debug_count().unwrap();
    assert_eq!(
        (count.waiting, count.running),
        (10, 1),
        "every worker is busy"
    );
    held.gate.open();
    assert_eq!(recv(&held.ran), vec![0]);
    assert_eq!(recv(&held.ran), vec![1, 2, 3, 4]);
    assert_eq!(recv(&held.ran), vec![5, 6, 7, 8]);
    assert_eq!(recv(&held.ran), vec![9, 10]);
    held.books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn front_entries_still_go_first() {
    let (task, held) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .batching(Batching::Natural)
        .poll(false)
        .start()
        .unwrap();
    held.books.buffer_one(&handle, 0, Priority::Back).unwrap();
    recv(&held.started);
    held.books
        .buffer(&handle, vec![1, 2], Priority::Back)
        .unwrap();
    held.books
        .buffer(&handle, vec![9], Priority::Front)
        .unwrap();
    held.gate.open();
    assert_eq!(recv(&held.ran), vec![0]);
    assert_eq!(recv(&held.ran), vec![9, 1, 2]);
    held.books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn many_producers_lose_nothing() {
    let (task, held) = held::<u32>();
    held.gate.open();
    let handle = Builder::new(task, ())
        .max_batch_size(16)
        .max_concurrency(3)
        .flush_interval(FlushInterval::Never)
        .batching(Batching::Natural)
        .poll(false)
        .start()
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (handle, books) = (handle.clone(), held.books.clone());
            s.spawn(move || {
                for i in 0..2_000 {
                    books
                        .buffer_one(&handle, t * 10_000 + i, Priority::Back)
                        .unwrap();
                }
            });
        }
    });
    // No flush: free workers took everything as it came.
    wait_until(|| handle.stats().processed == 8_000);
    held.books.finish(handle.shutdown_drain().unwrap());
}

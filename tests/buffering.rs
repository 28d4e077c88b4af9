//! Buffering, flushing and ordering (SPEC §4).

mod common;
use buffered_task::{Builder, FlushInterval, Outcome, Priority};
use common::*;
use crossbeam_channel::unbounded;
use std::time::Duration;

/// One worker, manual flushing, every batch sent to the returned channel.
fn recording(
    batch: usize,
) -> (
    buffered_task::Handle<u32>,
    crossbeam_channel::Receiver<Vec<u32>>,
    std::sync::Arc<Books<u32>>,
) {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .max_batch_size(batch)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    (handle, rx, books)
}

fn drain(
    handle: &buffered_task::Handle<u32>,
    rx: &crossbeam_channel::Receiver<Vec<u32>>,
    books: &Books<u32>,
) -> Vec<u32> {
    books.finish(handle.shutdown_drain().unwrap());
    rx.try_iter().flatten().collect()
}

#[test]
fn back_entries_are_fifo_across_and_within_calls() {
    let (handle, rx, books) = recording(100);
    books
        .buffer(&handle, vec![1, 2, 3], Priority::Back)
        .unwrap();
    books.buffer(&handle, vec![4, 5], Priority::Back).unwrap();
    books.buffer_one(&handle, 6, Priority::Back).unwrap();
    handle.flush().unwrap();
    assert_eq!(recv(&rx), vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(drain(&handle, &rx, &books), Vec::<u32>::new());
}

#[test]
fn front_entries_go_ahead_in_call_order_keeping_each_call_order() {
    let (
        task,
        Held {
            gate,
            started,
            ran: rx,
            books,
        },
    ) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(1000)
        .max_concurrency(1)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    // Occupy the only worker, and queue some entries behind it.
    books.push_back(&handle, vec![0]).unwrap();
    recv(&started);
    books.push_back(&handle, vec![10, 11]).unwrap();
    // One window: back and front calls interleaved.
    books.buffer(&handle, vec![20, 21], Priority::Back).unwrap();
    books.buffer(&handle, vec![1, 2], Priority::Front).unwrap();
    books.buffer(&handle, vec![22], Priority::Back).unwrap();
    books.buffer(&handle, vec![3, 4], Priority::Front).unwrap();
    handle.flush().unwrap();
    gate.open();
    assert_eq!(recv(&rx), vec![0]);
    assert_eq!(recv(&rx), vec![1, 2, 3, 4, 10, 11, 20, 21, 22]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn nothing_moves_without_a_flush_when_the_interval_is_never() {
    let (handle, rx, books) = recording(2);
    books
        .buffer(&handle, vec![1, 2, 3, 4, 5], Priority::Back)
        .unwrap();
    // Even a full batch waits: flushing is manual.
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (5, 0));
    assert_empty(&rx);
    handle.flush().unwrap();
    let got: Vec<u32> = recv_n(&rx, 3).into_iter().flatten().collect();
    assert_eq!(got, vec![1, 2, 3, 4, 5]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn a_full_batch_is_flushed_at_once_and_a_partial_one_waits_for_the_tick() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |b: &[u32], _: &()| {
        tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    // A tick an hour away: only the full-batch rule can move entries.
    let handle = Builder::new(task, ())
        .max_batch_size(3)
        .flush_interval(Duration::from_secs(3600))
        .poll(false)
        .start()
        .unwrap();
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap();
    books.buffer(&handle, vec![3], Priority::Front).unwrap();
    assert_eq!(recv(&rx), vec![3, 1, 2]);
    books.buffer(&handle, vec![4], Priority::Back).unwrap();
    // The partial batch stays buffered until a flush.
    assert_eq!(handle.debug_count().unwrap().waiting, 1);
    handle.flush().unwrap();
    assert_eq!(recv(&rx), vec![4]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn push_back_and_push_front_skip_the_buffers() {
    let (
        task,
        Held {
            gate,
            started,
            ran: rx,
            books,
        },
    ) = held::<u32>();
    let handle = Builder::new(task, ())
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![0]).unwrap(); // runs at once, no flush needed
    recv(&started);
    books.push_back(&handle, vec![5, 6]).unwrap();
    books.push_front(&handle, vec![3, 4]).unwrap();
    books.buffer(&handle, vec![99], Priority::Front).unwrap(); // buffered: needs a flush
                                                               // (debug_count answers after the pushes above: commands are handled in order.)
    assert_eq!(handle.debug_count().unwrap().waiting, 5);
    gate.open();
    assert_eq!(recv(&rx), vec![0]);
    assert_eq!(recv(&rx), vec![3, 4, 5, 6]);
    assert_eq!(handle.debug_count().unwrap().waiting, 1);
    handle.flush().unwrap();
    assert_eq!(recv(&rx), vec![99]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn empty_calls_are_no_ops() {
    let (handle, rx, books) = recording(2);
    books.buffer(&handle, vec![], Priority::Back).unwrap();
    books.push_back(&handle, vec![]).unwrap();
    handle.flush().unwrap();
    assert_eq!(handle.debug_count().unwrap().waiting, 0);
    assert_eq!(drain(&handle, &rx, &books), Vec::<u32>::new());
}

#[test]
fn buffer_from_many_threads_at_once_keeps_each_callers_order() {
    let (handle, rx, books) = recording(64);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let (handle, books) = (handle.clone(), books.clone());
            s.spawn(move || {
                for i in 0..1000u32 {
                    books
                        .buffer_one(&handle, t * 10_000 + i, Priority::Back)
                        .unwrap();
                }
            });
        }
    });
    handle.flush().unwrap();
    let all = drain(&handle, &rx, &books);
    assert_eq!(all.len(), 4000);
    for t in 0..4u32 {
        let mine: Vec<u32> = all.iter().copied().filter(|v| v / 10_000 == t).collect();
        assert_eq!(mine, (0..1000).map(|i| t * 10_000 + i).collect::<Vec<_>>());
    }
}

#[test]
fn full_batches_handed_straight_to_workers_keep_fifo_and_yield_to_front_entries() {
    let (
        task,
        Held {
            gate,
            started,
            ran: rx,
            books,
        },
    ) = held::<u32>();
    // A tick an hour away: full batches move at once, partial ones never.
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(1)
        .flush_interval(Duration::from_secs(3600))
        .poll(false)
        .start()
        .unwrap();
    books.push_back(&handle, vec![0]).unwrap();
    recv(&started); // the only worker is busy
    books.buffer(&handle, vec![1, 2], Priority::Back).unwrap(); // handed out at once
    books.buffer(&handle, vec![3, 4], Priority::Back).unwrap();
    books.buffer(&handle, vec![5], Priority::Back).unwrap(); // partial: waits
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (5, 1));
    // Front entries still go ahead of batches handed out but not started.
    books.buffer(&handle, vec![9, 10], Priority::Front).unwrap();
    handle.debug_count().unwrap(); // the flush that front batch asked for is done
    gate.open();
    let ran: Vec<Vec<u32>> = recv_n(&rx, 4);
    assert_eq!(ran, vec![vec![0], vec![9, 10], vec![1, 2], vec![3, 4]]);
    handle.flush().unwrap();
    assert_eq!(recv(&rx), vec![5]);
    books.finish(handle.shutdown_drain().unwrap());
}

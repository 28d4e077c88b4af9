//! The six reference scenarios of SPEC §10, with its numbers: `max_batch_size` 2,
//! `max_concurrency` 2, flush interval 50 ms, `poll` off unless stated.

mod common;
use buffered_task::{Builder, Handle, Outcome, Priority};
use common::*;
use crossbeam_channel::unbounded;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

fn reference<T: Send + 'static>(task: Script<T, ()>) -> Builder<Script<T, ()>> {
    Builder::new(task, ())
        .max_batch_size(2)
        .max_concurrency(2)
        .flush_interval(Duration::from_millis(50))
        .poll(false)
}

fn sorted(mut batches: Vec<Vec<String>>) -> Vec<Vec<String>> {
    batches.sort();
    batches
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Waits until nothing is waiting or running (a `run` reports its batch just before
/// it returns, so the last completion may still be on its way).
fn assert_idle<T: Send + 'static>(handle: &Handle<T>) {
    handle.flush().unwrap();
    wait_until(|| {
        let count = handle.debug_count().unwrap();
        (count.waiting, count.running) == (0, 0)
    });
}

#[test]
fn scenario_1_init_then_buffered_entries_each_run_once() {
    let (tx, rx) = unbounded();
    let books = Books::new();
    let given = books.clone();
    let task = Script::new(move |batch: &[String], _: &()| {
        tx.send(batch.to_vec()).unwrap();
        Outcome::Ok
    })
    .with_init(move |sink, _| {
        for i in 1..=11 {
            given.given(&[i.to_string()]);
            sink.push(i.to_string());
        }
    })
    .with_books(&books);
    let handle = reference(task).start().unwrap();

    let expected: Vec<Vec<String>> = [
        &["1", "2"][..],
        &["3", "4"],
        &["5", "6"],
        &["7", "8"],
        &["9", "10"],
        &["11"],
    ]
    .iter()
    .map(|b| strings(b))
    .collect();
    assert_eq!(sorted(recv_n(&rx, 6)), sorted(expected));

    books
        .buffer(
            &handle,
            strings(&["12", "13", "14", "15", "16"]),
            Priority::Back,
        )
        .unwrap();
    let expected = vec![
        strings(&["12", "13"]),
        strings(&["14", "15"]),
        strings(&["16"]),
    ];
    assert_eq!(sorted(recv_n(&rx, 3)), sorted(expected));

    books
        .buffer(&handle, strings(&["17"]), Priority::Back)
        .unwrap();
    assert_eq!(recv(&rx), strings(&["17"]));

    assert_idle(&handle);
    assert_empty(&rx);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn scenario_2_empty_init_then_buffer() {
    let (tx, rx) = unbounded();
    let mut task = Script::new(move |batch: &[String], _: &()| {
        tx.send(batch.to_vec()).unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let handle = reference(task).start().unwrap();
    assert_idle(&handle);
    assert_empty(&rx);

    books
        .buffer(
            &handle,
            strings(&["some", "more", "entries"]),
            Priority::Back,
        )
        .unwrap();
    let got = sorted(recv_n(&rx, 2));
    assert_eq!(
        got,
        sorted(vec![strings(&["some", "more"]), strings(&["entries"])])
    );
    assert_idle(&handle);
    assert_empty(&rx);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn scenario_3_panic_then_success_runs_twice() {
    quiet_panics();
    let (tx, rx) = unbounded();
    let calls = Arc::new(Mutex::new(0));
    let mut task = Script::new(move |batch: &[String], _: &()| {
        let mut calls = calls.lock();
        *calls += 1;
        tx.send(batch.to_vec()).unwrap();
        if *calls == 1 {
            drop(calls);
            panic!("deliberate boom");
        }
        Outcome::Ok
    });
    let books = task.books();
    let handle = reference(task).start().unwrap();
    books
        .buffer(&handle, strings(&["boom"]), Priority::Back)
        .unwrap();
    assert_eq!(recv_n(&rx, 2), vec![strings(&["boom"]), strings(&["boom"])]);
    assert_idle(&handle);
    assert_empty(&rx);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn scenario_4_retry_twice_then_ok_runs_six_times_in_rounds() {
    let (tx, rx) = unbounded();
    let attempts: Arc<Mutex<HashMap<Vec<u32>, u32>>> = Default::default();
    let mut task = Script::new(move |batch: &[u32], _: &()| {
        let mut attempts = attempts.lock();
        let n = attempts.entry(batch.to_vec()).or_insert(0);
        *n += 1;
        tx.send((batch.to_vec(), *n)).unwrap();
        if *n <= 2 {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let books = task.books();
    let handle = reference(task).start().unwrap();
    books
        .buffer(&handle, vec![1, 2, 3], Priority::Back)
        .unwrap();
    let runs = recv_n(&rx, 6);
    for round in 1..=3 {
        let mut in_round: Vec<Vec<u32>> = runs
            .iter()
            .filter(|(_, n)| *n == round)
            .map(|(b, _)| b.clone())
            .collect();
        in_round.sort();
        assert_eq!(in_round, vec![vec![1, 2], vec![3]], "round {round}");
    }
    // Each batch's attempts come in order.
    for batch in [vec![1, 2], vec![3]] {
        let seen: Vec<u32> = runs
            .iter()
            .filter(|(b, _)| *b == batch)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(seen, vec![1, 2, 3]);
    }
    assert_idle(&handle);
    assert_empty(&rx);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn scenario_5_counts_add_up_while_runs_are_held() {
    let gate = Gate::new();
    let (started_tx, started) = unbounded();
    let held = gate.clone();
    let mut task = Script::new(move |_: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        Outcome::Ok
    });
    let books = task.books();
    let handle = reference(task).max_batch_size(1).start().unwrap();
    books
        .buffer(&handle, vec![1, 2, 3], Priority::Back)
        .unwrap();
    let count = handle.debug_count().unwrap();
    assert_eq!(count.waiting + count.running, 3);
    // And once both slots are busy: 2 running, 1 waiting.
    recv_n(&started, 2);
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (1, 2));
    gate.open();
    recv(&started);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn scenario_6_empty_shrunk_queue_with_poll_reruns_init_and_keeps_flushing() {
    let gate = Gate::new();
    let held = gate.clone();
    let (init_tx, inits) = unbounded();
    let (ran_tx, ran) = unbounded();
    let (started_tx, started) = unbounded();
    let mut task = Script::new(move |batch: &[u32], _: &()| {
        started_tx.send(()).unwrap();
        held.wait();
        ran_tx.send(batch.to_vec()).unwrap();
        Outcome::Ok
    })
    .with_init(move |_, _| init_tx.send(()).unwrap());
    let books = task.books();
    let shed = books.clone();
    let handle = reference(task)
        .overflow_handler(move |e, _| shed.overflowed(&e))
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    recv(&inits); // the first init produced nothing; the next poll is an hour away

    books.push_back(&handle, (1..=8).collect()).unwrap();
    recv_n(&started, 2); // both slots busy
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (4, 2));
    handle.shrink().unwrap();
    assert!(handle.is_shrunk().unwrap());
    assert_eq!(handle.debug_count().unwrap().waiting, 2);
    assert_empty(&inits);

    gate.open();
    recv_n(&ran, 3);
    // The queue ran empty after a shrink: init runs again at once.
    recv(&inits);

    // And flushing goes on.
    books.buffer(&handle, vec![100], Priority::Back).unwrap();
    assert_eq!(recv(&ran), vec![100]);
    books.finish(handle.shutdown_drain().unwrap());
}

//! `init` streaming in chunks, and polling (SPEC §3, §7).

mod common;
use buffered_task::{Builder, FlushInterval, Outcome};
use common::*;
use crossbeam_channel::unbounded;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn init_chunks_are_dispatched_while_init_is_still_running() {
    // init pushes one full chunk, then waits until that chunk has run: only works if
    // full chunks are queued and dispatched at once.
    let (ran_tx, ran) = unbounded();
    let (init_wait_tx, init_wait) = unbounded::<()>();
    let books = Books::new();
    let g = books.clone();
    let task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        init_wait_tx.send(()).unwrap();
        Outcome::Ok
    })
    .with_init(move |sink, _| {
        g.given(&[1, 2, 3]);
        sink.extend([1, 2, 3]);
        init_wait.recv_timeout(HANG).expect("first chunk never ran");
        g.given(&[4]);
        sink.push(4); // the remainder, sent when init returns
    });
    let task = task.with_books(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    assert_eq!(recv(&ran), vec![1, 2, 3]);
    assert_eq!(recv(&ran), vec![4]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn a_panicking_init_keeps_what_it_pushed() {
    quiet_panics();
    let (ran_tx, ran) = unbounded();
    let books = Books::new();
    let g = books.clone();
    let task = Script::new(move |b: &[u32], _: &()| {
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    })
    .with_init(move |sink, _| {
        g.given(&[1, 2, 3]);
        sink.extend([1, 2, 3]);
        panic!("deliberate: init");
    });
    let task = task.with_books(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    let got: Vec<u32> = recv_n(&ran, 2).into_iter().flatten().collect();
    assert_eq!(got, vec![1, 2, 3]);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn poll_reruns_init_at_once_after_it_produced_work_and_waits_when_it_produced_none() {
    let (init_tx, inits) = unbounded();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let books = Books::new();
    let g = books.clone();
    let task = Script::new(move |_: &[u32], _: &()| {
        r.fetch_add(1, Ordering::SeqCst);
        Outcome::Ok
    })
    .with_init(move |sink, _| {
        let call = init_tx.len(); // calls so far are still in the channel
        init_tx.send(()).unwrap();
        if call == 0 {
            g.given(&[1, 2]);
            sink.extend([1, 2]);
        }
    });
    let task = task.with_books(&books);
    let handle = Builder::new(task, ())
        .max_batch_size(1)
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    // First init produced two entries: once they ran, init ran again at once.
    wait_until(|| inits.len() == 2);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    // The second produced nothing: the next poll is an hour away, however often
    // the engine is flushed.
    for _ in 0..20 {
        handle.flush().unwrap();
    }
    let count = handle.debug_count().unwrap();
    assert_eq!((count.waiting, count.running), (0, 0));
    assert_eq!(inits.len(), 2);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn poll_reruns_an_empty_init_after_the_idle_delay() {
    let (init_tx, inits) = unbounded();
    let books = Books::new();
    let task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |_, _| {
        let _ = init_tx.send(());
    });
    let task = task.with_books(&books);
    let clock = buffered_task::ManualClock::new();
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_millis(5))
        .clock(&clock)
        .start()
        .unwrap();
    for run in 1..=3 {
        recv(&inits); // the first run, then a poll after each delay
        wait_until(|| handle.stats().init_runs == run);
        clock.advance(Duration::from_millis(4));
        assert_empty(&inits);
        clock.advance(Duration::from_millis(1));
    }
    recv(&inits);
    books.finish(handle.shutdown_drain().unwrap());
}

#[test]
fn without_poll_init_runs_once() {
    let (init_tx, inits) = unbounded();
    let books = Books::new();
    let g = books.clone();
    let task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |sink, _| {
        init_tx.send(()).unwrap();
        g.given(&[1]);
        sink.push(1);
    });
    let task = task.with_books(&books);
    let handle = Builder::new(task, ())
        .flush_interval(Duration::from_millis(1))
        .poll(false)
        .start()
        .unwrap();
    recv(&inits);
    for _ in 0..20 {
        handle.flush().unwrap();
    }
    books.finish(handle.shutdown_drain().unwrap());
    assert_eq!(inits.len(), 0);
}

#[test]
fn init_sees_the_state_and_stops_when_told_and_nothing_it_pushed_is_lost() {
    let (seen_tx, seen) = unbounded();
    let (ran_tx, ran) = unbounded();
    let (started_tx, started) = unbounded();
    let (total_tx, total) = unbounded();
    let books = Books::new();
    let g = books.clone();
    let task = Script::new(move |b: &[u64], _: &u64| {
        let _ = started_tx.send(());
        ran_tx.send(b.to_vec()).unwrap();
        Outcome::Ok
    })
    .with_init(move |sink, state| {
        seen_tx.send(*state).unwrap();
        // An endless source that honours the stop signal.
        let mut i = 0;
        while {
            g.given(&[i]);
            sink.push(i)
        } {
            i += 1;
        }
        total_tx.send(i + 1).unwrap();
    });
    let task = task.with_books(&books);
    let handle = Builder::new(task, 42u64)
        .max_batch_size(100)
        .max_concurrency(2)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    assert_eq!(recv(&seen), 42);
    recv(&started); // some work is running
    let report = books.finish(handle.shutdown_return().unwrap());
    let total = recv(&total);
    let mut all: Vec<u64> = ran.try_iter().flatten().collect();
    all.extend(report.unprocessed);
    all.sort();
    // Every pushed entry either ran or came back, exactly once.
    assert_eq!(all, (0..total).collect::<Vec<u64>>());
}

#[test]
fn poll_now_runs_init_at_once() {
    let (init_tx, inits) = unbounded();
    let task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |_, _| {
        init_tx.send(()).unwrap();
    });
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    recv(&inits); // the first run; the next poll is an hour away
    handle.poll_now().unwrap();
    recv(&inits);
    handle.shutdown_drain().unwrap();
    assert_eq!(handle.poll_now(), Err(buffered_task::ControlError::Stopped));
}

#[test]
fn poll_now_while_init_runs_runs_it_once_more_afterwards() {
    let (init_tx, inits) = unbounded();
    let (go_tx, go) = unbounded::<()>();
    let task = Script::new(|_: &[u32], _: &()| Outcome::Ok).with_init(move |_, _| {
        init_tx.send(()).unwrap();
        let _ = go.recv_timeout(HANG); // hold the first run
    });
    let handle = Builder::new(task, ())
        .flush_interval(FlushInterval::Never)
        .poll(true)
        .idle_poll_delay(Duration::from_secs(3600))
        .start()
        .unwrap();
    recv(&inits); // the first run is holding
    handle.poll_now().unwrap();
    handle.poll_now().unwrap(); // asked twice: still one more run
    handle.debug_count().unwrap(); // both asks are handled
    go_tx.send(()).unwrap();
    recv(&inits); // the run asked for
    go_tx.send(()).unwrap();
    handle.flush().unwrap();
    handle.debug_count().unwrap();
    assert_eq!(inits.len(), 0);
    handle.shutdown_drain().unwrap();
}

//! Every invalid configuration is a typed error, never a panic (SPEC §2).

mod common;
use buffered_task::{BuildError, Builder, FlushInterval, Outcome};
use common::*;
use std::time::Duration;

fn task() -> Script<u32, ()> {
    Script::new(|_: &[u32], _: &()| Outcome::Ok)
}

#[test]
fn zero_batch_size_is_rejected() {
    let err = Builder::new(task(), ())
        .max_batch_size(0)
        .start()
        .unwrap_err();
    assert!(matches!(err, BuildError::ZeroBatchSize), "{err}");
    assert_eq!(err.to_string(), "max_batch_size must be at least 1");
}

#[test]
fn zero_concurrency_is_rejected() {
    let err = Builder::new(task(), ())
        .max_concurrency(0)
        .start()
        .unwrap_err();
    assert!(matches!(err, BuildError::ZeroConcurrency), "{err}");
}

#[test]
fn zero_flush_interval_is_rejected() {
    let err = Builder::new(task(), ())
        .flush_interval(Duration::ZERO)
        .start()
        .unwrap_err();
    assert!(matches!(err, BuildError::ZeroFlushInterval), "{err}");
    assert!(err.to_string().contains("FlushInterval::Never"));
}

#[test]
fn zero_queue_length_is_rejected() {
    let err = Builder::new(task(), ())
        .max_queue_len(0)
        .start()
        .unwrap_err();
    assert!(matches!(err, BuildError::ZeroQueueLen), "{err}");
}

#[test]
fn a_name_with_a_nul_byte_is_rejected() {
    let err = Builder::new(task(), ())
        .name("bad\0name")
        .start()
        .unwrap_err();
    assert!(matches!(err, BuildError::InvalidName(_)), "{err}");
}

#[test]
fn edge_values_that_are_valid_start() {
    let handle = Builder::new(task(), ())
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(1)
        .flush_interval(FlushInterval::Never)
        .idle_poll_delay(Duration::ZERO)
        .poll(false)
        .start()
        .unwrap();
    handle.shutdown_drain().unwrap();
}

#[test]
fn thread_names_carry_the_task_name() {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut task = Script::new(move |_: &[u32], _: &()| {
        tx.send(std::thread::current().name().map(String::from))
            .unwrap();
        Outcome::Ok
    });
    let books = task.books();
    let handle = Builder::new(task, ())
        .name("blocks")
        .flush_interval(FlushInterval::Never)
        .start()
        .unwrap();
    books.push_back(&handle, vec![1]).unwrap();
    assert_eq!(recv(&rx).as_deref(), Some("blocks-worker-0"));
    assert_eq!(handle.name(), "blocks");
    books.finish(handle.shutdown_drain().unwrap());
}

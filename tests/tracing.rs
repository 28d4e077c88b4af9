//! With the `tracing` feature: a span per run, with the batch's fields.
#![cfg(feature = "tracing")]

mod common;
use buffered_task::{Builder, FlushInterval, Outcome};
use common::*;
use parking_lot::Mutex;
use std::sync::Arc;

/// Collects what the subscriber writes.
#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn each_run_has_a_span_with_its_outcome() {
    let out = Buffer::default();
    let writer = out.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::set_global_default(subscriber).unwrap();
    let handle = Builder::new(Script::new(|_: &[u32], _: &()| Outcome::Retry), ())
        .name("traced")
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .retry_policy(buffered_task::RetryPolicy::new(1))
        .start()
        .unwrap();
    handle.push_back(vec![1, 2, 3]).unwrap();
    wait_until(|| handle.stats().dead_lettered == 3);
    handle.shutdown_drain().unwrap();
    let text = String::from_utf8(out.0.lock().clone()).unwrap();
    assert!(text.contains("buffered_task.run"), "{text}");
    assert!(text.contains("engine=traced"), "{text}");
    assert!(text.contains("size=3"), "{text}");
    assert!(text.contains("dead_lettered=3"), "{text}");
}

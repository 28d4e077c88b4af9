//! With the `metrics` feature: the engine's counters, gauges and histograms
//! reach a Prometheus recorder, and a scrape over a local port reads them back.
#![cfg(feature = "metrics")]

#[path = "../examples/prometheus.rs"]
#[allow(dead_code)]
mod prometheus;

mod common;
use buffered_task::{Builder, FlushInterval, Outcome, Priority};
use common::*;
use metrics_exporter_prometheus::PrometheusBuilder;
use std::net::TcpListener;
use std::time::Duration;

#[test]
fn a_scrape_shows_what_the_engine_did() {
    let metrics = PrometheusBuilder::new().install_recorder().unwrap();
    let calls = std::sync::atomic::AtomicU32::new(0);
    let task = Script::new(move |_: &[u32], _: &()| {
        if calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
            Outcome::Retry
        } else {
            Outcome::Ok
        }
    });
    let handle = Builder::new(task, ())
        .name("scraped")
        .max_batch_size(10)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .start()
        .unwrap();
    handle.buffer((0..25).collect(), Priority::Back).unwrap();
    handle.wait_idle(Duration::MAX).unwrap();
    handle.shutdown_drain().unwrap(); // publishes the final stats
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || prometheus::serve_one(&listener, &metrics));
    let body = prometheus::scrape(addr).unwrap();
    server.join().unwrap().unwrap();
    let value = |name: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l.contains("engine=\"scraped\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{body}"))
    };
    assert_eq!(value("buffered_task_entries_processed_total"), 25.0);
    assert_eq!(value("buffered_task_entries_retried_total"), 10.0);
    assert_eq!(value("buffered_task_entries_accepted_total"), 25.0);
    assert_eq!(value("buffered_task_queue_depth"), 0.0);
    assert!(body.contains("buffered_task_batch_size"), "{body}");
    assert!(body.contains("buffered_task_run_seconds"), "{body}");
}

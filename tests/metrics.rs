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
    // One engine: a retry, a duplicate.
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
        .max_concurrency(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .dedup_by_key(|e: &u32| *e)
        .start()
        .unwrap();
    handle
        .buffer((0..25).chain([3]).collect(), Priority::Back)
        .unwrap();
    handle.wait_idle(Duration::MAX).unwrap();
    handle.shutdown_drain().unwrap(); // publishes the final stats
                                      // Another: dead letters, an overflow, a panic, and the gauges published
                                      // while entries wait (at most once a second: a manual clock moves it on).
    quiet_panics();
    let clock = buffered_task::ManualClock::new();
    let gate = Gate::new();
    let g = gate.clone();
    let (holding_tx, holding) = crossbeam_channel::unbounded();
    let task = Script::new(move |b: &[u32], _: &()| match b[0] {
        0 => Outcome::Fail(buffered_task::RunError::new("deliberate")),
        1 => panic!("deliberate"),
        9 => {
            holding_tx.send(()).unwrap();
            g.wait();
            Outcome::Ok
        }
        _ => Outcome::Ok,
    });
    let failing = Builder::new(task, ())
        .name("failing")
        .max_batch_size(1)
        .max_concurrency(1)
        .max_queue_len(3)
        .flush_interval(FlushInterval::Never)
        .poll(false)
        .clock(&clock)
        .retry_policy(buffered_task::RetryPolicy::new(1))
        .start()
        .unwrap();
    failing.push_back(vec![0, 1, 2]).unwrap();
    failing.wait_idle(Duration::MAX).unwrap();
    failing.push_back(vec![9]).unwrap();
    recv(&holding); // the worker is held, the queue empty
    failing.push_back(vec![10, 11, 12, 13]).unwrap(); // one over the bound
    clock.advance(Duration::from_secs(2)); // a coordinator round: published
    let waiting = metrics.render();
    let gauge = |name: &str| {
        waiting
            .lines()
            .find(|l| l.starts_with(name) && l.contains("engine=\"failing\""))
            .unwrap_or_else(|| panic!("{name} missing from:\n{waiting}"))
            .to_string()
    };
    assert!(
        gauge("buffered_task_queue_depth").ends_with(" 3"),
        "{waiting}"
    );
    assert!(gauge("buffered_task_running").ends_with(" 1"), "{waiting}");
    gate.open();
    failing.shutdown_drain().unwrap();

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || prometheus::serve_one(&listener, &metrics));
    let body = prometheus::scrape(addr).unwrap();
    server.join().unwrap().unwrap();
    let value = |name: &str, engine: &str| -> f64 {
        body.lines()
            .find(|l| l.starts_with(name) && l.contains(&format!("engine=\"{engine}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} of {engine} missing from:\n{body}"))
    };
    let s = "scraped";
    assert_eq!(value("buffered_task_entries_processed_total", s), 25.0);
    assert_eq!(value("buffered_task_entries_retried_total", s), 10.0);
    assert_eq!(value("buffered_task_entries_accepted_total", s), 25.0); // not the duplicate
    assert_eq!(value("buffered_task_entries_deduplicated_total", s), 1.0);
    assert_eq!(
        value(
            "buffered_task_batches_total{engine=\"scraped\",kind=\"retry\"}",
            s
        ),
        1.0
    );
    assert_eq!(
        value(
            "buffered_task_batches_total{engine=\"scraped\",kind=\"ok\"}",
            s
        ),
        3.0
    );
    assert_eq!(value("buffered_task_queue_depth", s), 0.0);
    assert_eq!(value("buffered_task_concurrency_limit", s), 3.0);
    assert!(body.contains("buffered_task_batch_size"), "{body}");
    assert!(body.contains("buffered_task_run_seconds"), "{body}");
    let f = "failing";
    assert_eq!(value("buffered_task_entries_dead_lettered_total", f), 2.0);
    assert_eq!(value("buffered_task_entries_overflowed_total", f), 1.0);
    assert_eq!(
        value(
            "buffered_task_batches_total{engine=\"failing\",kind=\"error\"}",
            f
        ),
        1.0
    );
    assert_eq!(
        value(
            "buffered_task_batches_total{engine=\"failing\",kind=\"panic\"}",
            f
        ),
        1.0
    );
    assert_eq!(value("buffered_task_entries_processed_total", f), 5.0);
    assert_eq!(
        value("buffered_task_queue_depth", f),
        0.0,
        "published at the end"
    );
}

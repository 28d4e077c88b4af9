//! Exports an engine's metrics in the Prometheus text format on a local port.
//!
//! `cargo run --example prometheus --features metrics` (then
//! `curl http://127.0.0.1:9187/metrics`, or wait for it to print a scrape).
//!
//! With the `metrics` feature the engine records, through the `metrics` facade,
//! per batch: entries processed, retried and dead-lettered, batch size, wait and
//! run time; and from its stats: entries accepted and overflowed, buffered,
//! queue depth, running. Each is labelled with the engine's name. Any `metrics`
//! recorder works; this one is `metrics-exporter-prometheus`, served here with a
//! plain `TcpListener` (no async runtime).

use buffered_task::{Builder, Outcome, Priority, Task};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

struct Index;

impl Task for Index {
    type Entry = u64;
    type State = ();
    fn run(&self, blocks: &[u64], _: &()) -> Outcome<u64, ()> {
        if blocks.iter().any(|b| b % 97 == 0) {
            Outcome::RetryEntries(vec![]) // let the batch go: nothing to retry
        } else {
            Outcome::Ok
        }
    }
}

/// Answers one HTTP request on `listener` with the current metrics.
pub fn serve_one(listener: &TcpListener, metrics: &PrometheusHandle) -> std::io::Result<()> {
    let (mut stream, _) = listener.accept()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear(); // skip the request line and headers
    }
    let body = metrics.render();
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Fetches `/metrics` from `addr` (a minimal HTTP/1.1 client).
pub fn scrape(addr: std::net::SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

#[allow(dead_code)]
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let handle = Builder::new(Index, ())
        .name("blocks")
        .max_batch_size(100)
        .max_concurrency(4)
        .flush_interval(Duration::from_millis(10))
        .start()?;
    for chunk in (0..100_000u64).collect::<Vec<_>>().chunks(1000) {
        handle.buffer(chunk.to_vec(), Priority::Back)?;
    }
    handle.wait_idle(Duration::from_secs(30))?;
    let listener = TcpListener::bind("127.0.0.1:9187")?;
    let addr = listener.local_addr()?;
    println!("serving one scrape on http://{addr}/metrics");
    let server = std::thread::spawn(move || serve_one(&listener, &metrics));
    let body = scrape(addr)?;
    server.join().expect("server thread")?;
    for line in body
        .lines()
        .filter(|l| l.starts_with("buffered_task_entries"))
    {
        println!("{line}");
    }
    handle.shutdown_drain()?;
    Ok(())
}

//! Criterion benches: the crate against the hand-rolled baseline on the same
//! workloads, in the same run (see `common`). `cargo bench`; the HTML report is
//! written to `target/criterion/report/index.html`.
//!
//! `examples/bench_report.rs` runs the same workloads once at full size and adds
//! latency and memory.

mod common;

use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

const BULK: u64 = 2_000_000;
const SINGLE: u64 = 400_000;
const INIT: u64 = 2_000_000;
const RETRY: u64 = 400_000;

fn sum_of<F: FnMut() -> Duration>(iters: u64, mut f: F) -> Duration {
    (0..iters).map(|_| f()).sum()
}

fn throughput(c: &mut Criterion) {
    let mut g = c.benchmark_group("bulk");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(BULK));
    g.bench_function(BenchmarkId::new("crate", BULK), |b| {
        b.iter_custom(|iters| sum_of(iters, || bulk_crate(BULK, 1000, 500, 2)))
    });
    g.bench_function(BenchmarkId::new("baseline", BULK), |b| {
        b.iter_custom(|iters| sum_of(iters, || bulk_baseline(BULK, 1000, 500, 2)))
    });
    g.finish();

    let mut g = c.benchmark_group("single");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(SINGLE));
    g.bench_function(BenchmarkId::new("crate", SINGLE), |b| {
        b.iter_custom(|iters| sum_of(iters, || single_crate(SINGLE, 4, 500, 2).0))
    });
    g.bench_function(BenchmarkId::new("baseline", SINGLE), |b| {
        b.iter_custom(|iters| sum_of(iters, || single_baseline(SINGLE, 4, 500, 2)))
    });
    g.finish();

    let mut g = c.benchmark_group("init");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(INIT));
    g.bench_function(BenchmarkId::new("crate", INIT), |b| {
        b.iter_custom(|iters| sum_of(iters, || init_crate(INIT, 500, 2)))
    });
    g.finish();

    let mut g = c.benchmark_group("retry");
    g.sample_size(10).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(RETRY));
    g.bench_function(BenchmarkId::new("crate", RETRY), |b| {
        b.iter_custom(|iters| sum_of(iters, || retry_crate(RETRY, 100, 2)))
    });
    g.bench_function(BenchmarkId::new("baseline", RETRY), |b| {
        b.iter_custom(|iters| sum_of(iters, || retry_baseline(RETRY, 100, 2)))
    });
    g.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);

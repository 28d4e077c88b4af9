//! Runs every benchmark workload once, at full size, against the crate and the
//! hand-rolled baseline, and prints a table, then one JSON line with every figure.
//!
//! `cargo run --release --example bench_report`
//!
//! Sizes can be scaled down with `BENCH_SCALE` (e.g. `0.1`) for a quick look.
//!
//! `cargo run --release --example bench_report -- --scaling [--workers=1,2,4,8,16]
//! [--work-us=1]` instead measures how throughput grows with the number of
//! workers, for a fixed busy cost per entry, against plain threads doing the same
//! work with no engine (see the README's Scaling section).
//!
//! `cargo run --release --example bench_report -- --dedup [--pairs=5]` measures
//! only bulk with and without `dedup_by_key`, alternating, and memory with it.

#[path = "../benches/common/mod.rs"]
mod common;

use buffered_task::Batching;
use common::*;
use std::time::Duration;

fn rayon_threads() -> usize {
    buffered_task::rayon::current_num_threads()
}

fn main() {
    let scale: f64 = std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0);
    let n = |full: u64| ((full as f64 * scale) as u64).max(1000);

    // In a fresh child process: RSS growth is only meaningful where no earlier
    // workload left freed memory behind for the allocator to reuse.
    if let Some(which) = std::env::args().find(|a| a.starts_with("--memory")) {
        let v = memory_with(n(10_000_000), 1000, which == "--memory-dedup");
        println!("{}", v.map_or("null".into(), |v| format!("{v:.3}")));
        return;
    }
    let memory = |flag: &str| -> Option<f64> {
        std::process::Command::new(std::env::current_exe().unwrap())
            .arg(flag)
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
    };
    if std::env::args().any(|a| a == "--scaling") {
        scaling(n);
        return;
    }
    if std::env::args().any(|a| a == "--dedup") {
        dedup_pairs(n, memory("--memory-dedup"));
        return;
    }
    let bytes_per_u64 = memory("--memory-only");
    let bytes_per_u64_dedup = memory("--memory-dedup");

    let bulk_n = n(20_000_000);
    let bulk_c = bulk_crate(bulk_n, 1000, 500, 2);
    let bulk_b = bulk_baseline(bulk_n, 1000, 500, 2);
    let (bulk_nat, nat_mean) = bulk_crate_with(bulk_n, 1000, 500, 2, Batching::Natural);
    let dedup_n = n(2_000_000);
    let bulk_dd = bulk_dedup(dedup_n, 1000, 500, 2);
    let bulk_nodd = bulk_crate(dedup_n, 1000, 500, 2);

    let single_n = n(4_000_000);
    let cpu0 = process_cpu();
    let (single_c, cpu_ns) = single_crate(single_n, 4, 500, 2);
    let process_ns = match (cpu0, process_cpu()) {
        (Some(a), Some(b)) => Some((b - a).as_nanos() as f64 / single_n as f64),
        _ => None,
    };
    let single_b = single_baseline(single_n, 4, 500, 2);
    let (single_mv, mv_cpu_ns) = single_mutex_vec(single_n, 4, 500, 2);

    let init_n = n(20_000_000);
    let init_c = init_crate(init_n, 500, 2);

    let retry_n = n(2_000_000);
    let retry_c = retry_crate(retry_n, 100, 2);
    let retry_b = retry_baseline(retry_n, 100, 2);

    let cpu_n = n(200_000);
    let cpu_alone = cpu_crate(cpu_n, 500, 1, false);
    let cpu_rayon = cpu_crate(cpu_n, 500, 1, true);
    let cpu_limit = cpu_par_iter(cpu_n);
    let per_entry_us = cpu_limit.as_secs_f64() * 1e6 * rayon_threads() as f64 / cpu_n as f64;

    let interval = Duration::from_millis(10);
    let (mut full, mut partial) = latency_crate(2000, interval, 500);
    let mut lone = latency_natural(2000);
    let lone_p50 = percentile(&mut lone, 0.50);
    let lone_p99 = percentile(&mut lone, 0.99);
    let full_p50 = percentile(&mut full, 0.50);
    let full_p99 = percentile(&mut full, 0.99);
    let partial_p99 = percentile(&mut partial, 0.99);
    let over_tick_p99 = partial_p99 - interval.as_secs_f64() * 1e6;

    let row = |name: &str, c: f64, b: Option<f64>| match b {
        Some(b) => println!("{name:<34} {c:>10.1} {b:>10.1} {:>7.2}x", c / b),
        None => println!("{name:<34} {c:>10.1} {:>10} {:>8}", "-", "-"),
    };
    println!(
        "{:<34} {:>10} {:>10} {:>8}",
        "workload (M entries/s)", "crate", "baseline", "ratio"
    );
    row(
        "bulk: 1 producer, chunks of 1000",
        meps(bulk_n, bulk_c),
        Some(meps(bulk_n, bulk_b)),
    );
    row(
        "bulk, natural batching",
        meps(bulk_n, bulk_nat),
        Some(meps(bulk_n, bulk_c)),
    );
    row(
        "bulk, dedup on (2 M, all keys new)",
        meps(dedup_n, bulk_dd),
        Some(meps(dedup_n, bulk_nodd)),
    );
    row(
        "single: 4 producers, 1 per call",
        meps(single_n, single_c),
        Some(meps(single_n, single_b)),
    );
    row(
        "single: the same, mutex-guarded Vec",
        meps(single_n, single_c),
        Some(meps(single_n, single_mv)),
    );
    row("init: 20 M streamed", meps(init_n, init_c), None);
    row(
        "retry: every batch once",
        meps(retry_n, retry_c),
        Some(meps(retry_n, retry_b)),
    );
    row(
        "cpu work: engine, rayon inside",
        meps(cpu_n, cpu_rayon),
        Some(meps(cpu_n, cpu_alone)),
    );
    row(
        "cpu work: plain par_iter (limit)",
        meps(cpu_n, cpu_limit),
        Some(meps(cpu_n, cpu_rayon)),
    );
    println!();
    println!(
        "cpu work: {per_entry_us:.1} µs per entry; 1 worker; the ratio columns: rayon inside / engine alone, then limit / rayon inside"
    );
    println!(
        "single: producer CPU per buffer_one call: {}; per push into a mutex-guarded Vec: {}",
        cpu_ns.map_or("n/a".into(), |v| format!("{v:.0} ns")),
        mv_cpu_ns.map_or("n/a".into(), |v| format!("{v:.0} ns"))
    );
    println!("bulk, natural batching: mean batch {nat_mean:.1} of 500 (the ratio column is against ticked bulk)");
    println!("latency, full batch into an idle engine: p50 {full_p50:.1} µs, p99 {full_p99:.1} µs");
    println!("latency, lone entry into an idle engine (natural batching): p50 {lone_p50:.1} µs, p99 {lone_p99:.1} µs");
    println!(
        "latency, partial batch (tick {} ms): p99 {partial_p99:.0} µs, beyond the tick {over_tick_p99:.0} µs",
        interval.as_millis()
    );
    println!(
        "memory: {} bytes per queued u64 (RSS); with dedup on: {}",
        bytes_per_u64.map_or("n/a".into(), |v| format!("{v:.2}")),
        bytes_per_u64_dedup.map_or("n/a".into(), |v| format!("{v:.2}"))
    );
    println!(
        "{{\"bulk\":{{\"crate_meps\":{:.2},\"baseline_meps\":{:.2},\"natural_meps\":{:.2},\"natural_mean_batch\":{:.1}}},\"single\":{{\"crate_meps\":{:.2},\"baseline_meps\":{:.2},\"mutex_vec_meps\":{:.2},\"mutex_vec_cpu_ns\":{},\"cpu_ns_per_call\":{},\"process_cpu_ns_per_call\":{}}},\"init\":{{\"crate_meps\":{:.2}}},\"retry\":{{\"crate_meps\":{:.2},\"baseline_meps\":{:.2}}},\"latency\":{{\"full_batch_p50_us\":{:.1},\"full_batch_p99_us\":{:.1},\"idle_single_p50_us\":{:.1},\"idle_single_p99_us\":{:.1},\"partial_p99_us\":{:.1},\"partial_over_tick_p99_us\":{:.1}}},\"memory\":{{\"bytes_per_u64\":{},\"bytes_per_u64_dedup\":{}}},\"dedup\":{{\"bulk_meps\":{:.2},\"bulk_off_meps\":{:.2}}},\"rayon\":{{\"engine_meps\":{:.3},\"engine_rayon_meps\":{:.3},\"par_iter_meps\":{:.3},\"work_us\":{:.2}}},\"scale\":{}}}",
        meps(bulk_n, bulk_c),
        meps(bulk_n, bulk_b),
        meps(bulk_n, bulk_nat),
        nat_mean,
        meps(single_n, single_c),
        meps(single_n, single_b),
        meps(single_n, single_mv),
        mv_cpu_ns.map_or("null".into(), |v| format!("{v:.1}")),
        cpu_ns.map_or("null".into(), |v| format!("{v:.1}")),
        process_ns.map_or("null".into(), |v| format!("{v:.1}")),
        meps(init_n, init_c),
        meps(retry_n, retry_c),
        meps(retry_n, retry_b),
        full_p50,
        full_p99,
        lone_p50,
        lone_p99,
        partial_p99,
        over_tick_p99,
        bytes_per_u64.map_or("null".into(), |v| format!("{v:.2}")),
        bytes_per_u64_dedup.map_or("null".into(), |v| format!("{v:.2}")),
        meps(dedup_n, bulk_dd),
        meps(dedup_n, bulk_nodd),
        meps(cpu_n, cpu_alone),
        meps(cpu_n, cpu_rayon),
        meps(cpu_n, cpu_limit),
        per_entry_us,
        scale
    );
}

/// `--scaling`: throughput against the number of workers, for a fixed busy cost
/// per entry (and for none: the engine's own ceiling), the engine against plain
/// threads sharing the same batches through one atomic index.
/// Bulk with and without `dedup_by_key`, alternating in one process.
fn dedup_pairs(n: impl Fn(u64) -> u64, bytes_per_u64: Option<f64>) {
    let pairs: usize = std::env::args()
        .find_map(|a| a.strip_prefix("--pairs=").and_then(|p| p.parse().ok()))
        .unwrap_or(5);
    let total = n(2_000_000);
    println!("bulk, 2 workers, batch 500, {total} entries, all keys new");
    for i in 0..pairs {
        let on = meps(total, bulk_dedup(total, 1000, 500, 2));
        let off = meps(total, bulk_crate(total, 1000, 500, 2));
        println!(
            "pair {i}: dedup on {on:.1} M/s, off {off:.1} M/s, on/off {:.3}",
            on / off
        );
    }
    println!(
        "memory with dedup on: {} bytes per queued u64",
        bytes_per_u64.map_or("n/a".into(), |v| format!("{v:.2}"))
    );
}

fn scaling(n: impl Fn(u64) -> u64) {
    let arg = |name: &str| std::env::args().find_map(|a| a.strip_prefix(name).map(str::to_string));
    let workers: Vec<usize> = arg("--workers=")
        .map(|w| w.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4]);
    let work_us: f64 = arg("--work-us=")
        .and_then(|w| w.parse().ok())
        .unwrap_or(1.0);
    let batch = 500;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rounds = busy_rounds_for(work_us);
    println!("scaling: {work_us} µs of busy work per entry ({rounds} rounds), batch {batch}, {cores} cores here");
    println!(
        "{:>7} {:>12} {:>12} {:>8} {:>9} | {:>12} {:>12} {:>8}",
        "workers",
        "engine M/s",
        "threads M/s",
        "ratio",
        "speedup",
        "no work M/s",
        "threads M/s",
        "ratio"
    );
    let mut json = Vec::new();
    let mut first = None;
    for &w in &workers {
        let total = n(1_000_000);
        let engine = meps(total, scaling_crate(total, batch, w, rounds));
        let threads = meps(total, scaling_threads(total, batch, w, rounds));
        let bare = n(20_000_000);
        let engine0 = meps(bare, scaling_crate(bare, batch, w, 0));
        let threads0 = meps(bare, scaling_threads(bare, batch, w, 0));
        let speedup = engine / *first.get_or_insert(engine);
        println!(
            "{w:>7} {engine:>12.2} {threads:>12.2} {:>7.2}x {speedup:>8.2}x | {engine0:>12.1} {threads0:>12.1} {:>7.2}x",
            engine / threads,
            engine0 / threads0
        );
        json.push(format!(
            "{{\"workers\":{w},\"engine_meps\":{engine:.3},\"threads_meps\":{threads:.3},\"nowork_engine_meps\":{engine0:.1},\"nowork_threads_meps\":{threads0:.1}}}"
        ));
    }
    println!(
        "{{\"scaling\":{{\"work_us\":{work_us},\"cores\":{cores},\"rows\":[{}]}}}}",
        json.join(",")
    );
}

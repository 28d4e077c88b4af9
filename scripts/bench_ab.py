#!/usr/bin/env python3
"""Runs two `bench_report` builds in turn (A B A B ...) and compares them.

Usage: scripts/bench_ab.py A_BINARY B_BINARY [RUNS]

Each run prints one JSON line of figures (see examples/bench_report.rs); this
prints, for every figure, the median of each side and the median of the
pairwise ratios A/B (so a comparison holds while the machine's speed drifts).
Build the older commit in a git worktree beside this one:

    git worktree add ../old <commit> && (cd ../old && cargo build --release --example bench_report)
    cargo build --release --example bench_report
    scripts/bench_ab.py target/release/examples/bench_report ../old/target/release/examples/bench_report 5
"""
import json
import statistics
import subprocess
import sys


def run(binary):
    out = subprocess.run([binary], capture_output=True, text=True, check=True).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    return flatten(json.loads(line))


def flatten(d, prefix=""):
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)):
            flat[key] = float(v)
    return flat


def main():
    a, b = sys.argv[1], sys.argv[2]
    runs = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    rows_a, rows_b = [], []
    for i in range(runs):
        rows_a.append(run(a))
        rows_b.append(run(b))
        print(f"run {i + 1}/{runs} done", file=sys.stderr)
    keys = [k for k in rows_a[0] if k != "scale" and all(k in r for r in rows_a + rows_b)]
    print("| figure | A median | B median | A/B (median of pairs) | A range | B range |")
    print("|---|---|---|---|---|---|")
    for k in keys:
        va = [r[k] for r in rows_a]
        vb = [r[k] for r in rows_b]
        pairs = [x / y for x, y in zip(va, vb) if y != 0]
        ratio = f"{statistics.median(pairs):.2f}" if pairs else "-"
        print(
            f"| {k} | {statistics.median(va):.1f} | {statistics.median(vb):.1f} | {ratio} "
            f"| {min(va):.1f}–{max(va):.1f} | {min(vb):.1f}–{max(vb):.1f} |"
        )


if __name__ == "__main__":
    main()

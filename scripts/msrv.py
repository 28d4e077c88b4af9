#!/usr/bin/env python3
"""The lowest Rust version the library's dependencies allow.

Usage: scripts/msrv.py [PACKAGE]   (default: buffered-task)

Lists every normal (non-dev) dependency of PACKAGE with all its features on, as
Cargo resolves them in Cargo.lock, with the `rust-version` each declares, and
prints the highest: the library's `rust-version` must be at least that. (The
library's own code is checked against its `rust-version` by clippy's
`incompatible_msrv` lint, which flags any standard-library item stabilised
later; CI runs clippy.) Exit 1 if Cargo.toml declares less than the highest.
"""
import json
import subprocess
import sys


def version(v):
    return tuple(int(x) for x in v.split(".")) if v else (0,)


def main():
    package = sys.argv[1] if len(sys.argv) > 1 else "buffered-task"
    tree = subprocess.run(
        ["cargo", "tree", "-p", package, "-e", "normal", "--all-features",
         "--prefix", "none", "--format", "{p}"],
        capture_output=True, text=True, check=True).stdout
    wanted = {(l.split()[0], l.split()[1].lstrip("v")) for l in tree.splitlines() if l.strip()}
    meta = json.loads(subprocess.run(
        ["cargo", "metadata", "--format-version", "1"],
        capture_output=True, text=True, check=True).stdout)
    declared = None
    rows = []
    for p in meta["packages"]:
        if p["name"] == package and p["source"] is None:
            declared = p.get("rust_version")
        if (p["name"], p["version"]) in wanted and p["name"] != package:
            rows.append((version(p.get("rust_version")), p["name"], p["version"], p.get("rust_version")))
    rows.sort(reverse=True)
    for _, name, ver, rv in rows[:8]:
        print(f"{name} {ver}: rust-version {rv or '(none)'}")
    need = rows[0][3] if rows else None
    print(f"highest: {need}; {package} declares {declared}")
    if need and version(declared) < version(need):
        sys.exit(1)


if __name__ == "__main__":
    main()

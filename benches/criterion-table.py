#!/usr/bin/env python3
"""Turns the results of `cargo bench --bench engine` (target/criterion/*/new/estimates.json)
into the markdown table of docs/performance.md: median time per operation, throughput, and for
each group with a raw-file baseline the ratio rr-row/raw in throughput (>1 means faster).

Python 3 standard library only. Usage, from the repository root, after the bench ran:
  benches/criterion-table.py [--criterion-dir target/criterion]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Groups in report order; the member named first is the raw-file baseline where there is one.
GROUPS = [
    ("write_4k_random", "raw_pwrite"),
    ("read_4k_random", "raw_pread"),
    ("write_128k_seq", "raw_pwrite"),
    ("read_128k_seq", "raw_pread"),
    ("read_128k_seq_fragmented", "raw_pread"),
    ("write_4k_flush", "raw_pwrite_fdatasync"),
    ("resolve", None),
    ("journal", None),
    ("record", None),
    ("crc32c", None),
]


def load(bench_dir: Path) -> tuple[float, float, float, int | None]:
    """(median ns, lower ns, upper ns, bytes per iteration) of one benchmark."""
    est = json.loads((bench_dir / "new" / "estimates.json").read_text())
    med = est["median"]
    throughput = None
    bj = bench_dir / "new" / "benchmark.json"
    if bj.exists():
        tp = json.loads(bj.read_text()).get("throughput") or {}
        throughput = tp.get("Bytes")
    return med["point_estimate"], med["confidence_interval"]["lower_bound"], med["confidence_interval"]["upper_bound"], throughput


def fmt_time(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--criterion-dir", type=Path, default=ROOT / "target" / "criterion")
    opts = ap.parse_args()
    if not opts.criterion_dir.is_dir():
        print(f"error: {opts.criterion_dir} not found; run `cargo bench --bench engine` first", file=sys.stderr)
        return 2
    print("| Group | Benchmark | median / op (95% CI) | throughput | rr-row vs raw |")
    print("|---|---|---:|---:|---:|")
    for group, baseline in GROUPS:
        gdir = opts.criterion_dir / group
        if not gdir.is_dir():
            continue
        benches = sorted(p.parent.parent for p in gdir.rglob("new/estimates.json"))
        base_ns = None
        if baseline and (gdir / baseline / "new" / "estimates.json").exists():
            base_ns = load(gdir / baseline)[0]
        order = sorted(benches, key=lambda p: (p.name != baseline, str(p)))
        for b in order:
            ns, lo, hi, nbytes = load(b)
            name = str(b.relative_to(gdir))
            tput = f"{nbytes / ns * 1e9 / (1 << 20):,.0f} MiB/s" if nbytes else f"{1e9 / ns:,.0f} op/s"
            ratio = ""
            if base_ns and name != baseline:
                ratio = f"{base_ns / ns:.2f}x"
            print(f"| {group} | {name} | {fmt_time(ns)} ({fmt_time(lo)}-{fmt_time(hi)}) | {tput} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""The paper's headline, measured: record-log size in block-id mode against full mode, and the
cost of recording in IOPS.

Log sizes. The same workloads are recorded twice by the real daemon (`rr-row serve --record
LOG --record-mode block-id|full`) and driven by the same load generator (examples/perf.rs, the
libblkio virtio-blk-vhost-user client) with the same seed and a fixed amount of I/O
(`--io-size`), so both modes see the same request stream:

  - 4 KiB random reads, QD8
  - 64 KiB sequential reads, QD8
  - 4 KiB random 70/30 read/write, QD8
  - a real guest: boot plus a 24 MiB file copy on ext4 (the `guest_boot_and_file_copy_log_sizes`
    test of tests/guest_record_replay.rs, which records the same boot in both modes and hands
    its sizes over through RR_ROW_LOG_SIZES_OUT)

on a prefilled image (every block written once, so reads hit mapped blocks). Sizes come from
`rr-row log info --output json` (the file size, and for a block-id log also what the same
records would cost in full mode, a cross-check of the measured full log).

Overhead. 4 KiB random reads at QD1 and QD32 and the 70/30 mix at QD32, each run without
`--record`, with `--record` (block-id) and with `--record-mode full`, a fresh daemon per run,
the variants interleaved in a rotating order, `--reps` times; medians and the ratio to the run
without recording.

Writes a table into docs/log-size.md (between the log-sizes markers) and docs/log-size.svg.
Python 3 standard library only. From the repository root:

  scripts/log-sizes.py                # builds release binaries, ~6 minutes
  scripts/log-sizes.py --quick        # smaller runs, one repetition (checks the script)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- log-sizes:begin -->"
END = "<!-- log-sizes:end -->"


class Daemon:
    """One `rr-row serve` process on `image`."""

    def __init__(self, rr_row: Path, image: Path, sock: Path, logfile: Path, extra: list[str]):
        sock.unlink(missing_ok=True)
        self.logfile = logfile
        with open(logfile, "w") as f:
            self.proc = subprocess.Popen(
                [str(rr_row), "serve", "--socket", str(sock), "--image", str(image), *extra],
                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "RUST_LOG": "warn"})
        deadline = time.monotonic() + 20
        while not sock.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"rr-row serve exited at start ({self.proc.returncode}): {logfile.read_text()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("rr-row serve did not create its socket in 20 s")
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError("rr-row serve ignored SIGTERM for 60 s")
        if rc != 0:
            raise RuntimeError(f"rr-row serve exited with {rc}: {self.logfile.read_text()[-2000:]}")


def perf(opts, sock: Path, args: list[str]) -> dict:
    cmd = [str(opts.perf), "--socket", str(sock), "--json", "--queues", "1", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return json.loads(r.stdout)


def log_info(opts, log: Path) -> dict:
    r = subprocess.run([str(opts.rr_row), "log", "info", str(log), "--output", "json"],
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout)


def serve_run(opts, work: Path, image: Path, extra: list[str], args: list[str]) -> dict:
    sock = work / "rr.sock"
    d = Daemon(opts.rr_row, image, sock, work / "serve.log", extra)
    try:
        rep = perf(opts, sock, args)
    finally:
        d.stop()
    return rep


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def measure_sizes(opts, work: Path, image: Path) -> list[dict]:
    n = opts.requests
    workloads = [
        ("4 KiB random read, QD8", ["--pattern", "randread", "--bs", "4k", "--iodepth", "8", "--io-size", str(n * 4096)]),
        ("64 KiB sequential read, QD8", ["--pattern", "read", "--bs", "64k", "--iodepth", "8", "--io-size", str(n // 4 * 65536)]),
        ("4 KiB random 70/30 read/write, QD8", ["--pattern", "randrw", "--rwmix-read", "70", "--bs", "4k", "--iodepth", "8", "--io-size", str(n * 4096)]),
    ]
    rows = []
    for title, args in workloads:
        args = [*args, "--runtime", "3600", "--seed", "2024"]
        row = {"workload": title}
        for mode in ("block-id", "full"):
            log = work / f"{mode}.rrlog"
            log.unlink(missing_ok=True)
            rep = serve_run(opts, work, image, ["--record", str(log), "--record-mode", mode], args)
            info = log_info(opts, log)
            row[mode] = {"file_bytes": info["file_bytes"], "records": info["records"],
                         "full_mode_estimate": info.get("full_mode_bytes"),
                         "requests": rep["total"]["ios"], "bytes": rep["total"]["bytes"]}
            log.unlink()
        rows.append(row)
        print(f"  {title:<38} block-id {human(row['block-id']['file_bytes']):>10}  full {human(row['full']['file_bytes']):>10}"
              f"  ratio {100 * row['block-id']['file_bytes'] / row['full']['file_bytes']:.3f}%", file=sys.stderr)
    if not opts.no_guest:
        out = work / "guest-sizes.json"
        env = {**os.environ, "RR_ROW_LOG_SIZES_OUT": str(out)}
        env.setdefault("RR_ROW_TEST_ASSETS", str(ROOT / ".test-assets"))
        subprocess.run([str(ROOT / "scripts/guest-assets.sh")], check=True, stdout=subprocess.DEVNULL)
        r = subprocess.run(["cargo", "test", "--quiet", "--test", "guest_record_replay", "guest_boot_and_file_copy_log_sizes"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"the guest log-size run failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        g = json.loads(out.read_text())
        rows.append({"workload": "guest boot + 24 MiB file copy (ext4)", "block-id": g["block_id"], "full": g["full"]})
        print(f"  guest boot + file copy: block-id {human(g['block_id']['file_bytes'])}, full {human(g['full']['file_bytes'])}",
              file=sys.stderr)
    return rows


def measure_overhead(opts, work: Path, image: Path) -> list[dict]:
    workloads = [
        ("4 KiB random read, QD1", ["--pattern", "randread", "--bs", "4k", "--iodepth", "1"]),
        ("4 KiB random read, QD32", ["--pattern", "randread", "--bs", "4k", "--iodepth", "32"]),
        ("4 KiB random 70/30 read/write, QD32", ["--pattern", "randrw", "--rwmix-read", "70", "--bs", "4k", "--iodepth", "32"]),
    ]
    variants = [("off", []), ("block-id", ["--record-mode", "block-id"]), ("full", ["--record-mode", "full"])]
    rows = []
    for title, args in workloads:
        iops: dict[str, list[float]] = {v: [] for v, _ in variants}
        for rep in range(opts.reps):
            order = variants[rep % 3:] + variants[:rep % 3]
            for name, extra in order:
                log = work / "overhead.rrlog"
                log.unlink(missing_ok=True)
                rec = [] if name == "off" else ["--record", str(log), *extra]
                r = serve_run(opts, work, image, rec,
                              [*args, "--runtime", str(opts.runtime), "--ramp", str(opts.ramp), "--seed", str(100 + rep)])
                iops[name].append(r["total"]["iops"])
                log.unlink(missing_ok=True)
        # Runs next to each other in time share the machine's state: the ratio per repetition
        # cancels slow drifts that a ratio of medians keeps.
        paired = {k: statistics.median(a / b for a, b in zip(iops[k], iops["off"])) for k in ("block-id", "full")}
        row = {"workload": title, "iops": iops, "median": {k: statistics.median(v) for k, v in iops.items()},
               "paired_ratio": paired}
        rows.append(row)
        m = row["median"]
        print(f"  {title:<38} off {m['off']:>9,.0f}  block-id {m['block-id']:>9,.0f} ({m['block-id'] / m['off']:.3f}x)"
              f"  full {m['full']:>9,.0f} ({m['full'] / m['off']:.3f}x)", file=sys.stderr)
    return rows


def svg(rows: list[dict], path: Path) -> None:
    """Horizontal bars, log scale: block-id and full log size per workload, ratio labelled."""
    left, width, top, row_h = 290, 900, 60, 46
    plot_w = width - left - 120
    hi = max(r["full"]["file_bytes"] for r in rows) * 1.5
    lo = 1024.0
    while lo > min(r["block-id"]["file_bytes"] for r in rows) / 2:
        lo /= 16

    def x(v: float) -> float:
        return left + plot_w * (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    h = top + row_h * len(rows) + 60
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{h}" fill="white"/>',
           f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">Record log size, block-id vs full mode (same workload; log scale)</text>']
    tick = lo
    while tick <= hi:
        xx = x(tick)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 8}" x2="{xx:.1f}" y2="{top + row_h * len(rows)}" stroke="#ccc" stroke-dasharray="2,3"/>')
        out.append(f'<text x="{xx:.1f}" y="{top + row_h * len(rows) + 16}" text-anchor="middle">{human(tick)}</text>')
        tick *= 16
    for i, r in enumerate(rows):
        y0 = top + i * row_h
        out.append(f'<text x="{left - 8}" y="{y0 + 24}" text-anchor="end">{esc(r["workload"])}</text>')
        for j, (mode, color) in enumerate((("block-id", "#d62728"), ("full", "#1f77b4"))):
            v = r[mode]["file_bytes"]
            y = y0 + 4 + j * 18
            out.append(f'<rect x="{left}" y="{y}" width="{x(v) - left:.1f}" height="15" fill="{color}"/>')
            label = human(v) + (f"  ({100 * v / r['full']['file_bytes']:.3f}% of full)" if mode == "block-id" else "")
            out.append(f'<text x="{x(v) + 4:.1f}" y="{y + 12}" font-size="11">{esc(label)}</text>')
    ly = top + row_h * len(rows) + 40
    for k, (mode, color) in enumerate((("block-id mode (RR-Row: block ids)", "#d62728"), ("full mode (Raw/QCow2 recorder: read data)", "#1f77b4"))):
        out.append(f'<rect x="{left + k * 300}" y="{ly - 10}" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{left + k * 300 + 16}" y="{ly}">{esc(mode)}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def markdown(opts, sizes: list[dict], overhead: list[dict], elapsed: float) -> str:
    lines = [BEGIN, "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `scripts/log-sizes.py"
             f"{' --quick' if opts.quick else ''}` ({elapsed:.0f} s; {os.cpu_count()} CPUs, shared with other work;"
             f" image {human(opts.size)}, 4 KiB blocks, prefilled).", "",
             "| workload | requests | block-id log | full log | block-id / full | full-mode estimate from the block-id log |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in sizes:
        b, f = r["block-id"], r["full"]
        est = b.get("full_mode_estimate")
        lines.append(f"| {r['workload']} | {b['records']} | {b['file_bytes']:,} B | {f['file_bytes']:,} B "
                     f"| **{100 * b['file_bytes'] / f['file_bytes']:.3f}%** | {f'{est:,} B' if est else 'n/a'} |")
    lines += ["", "![log sizes](log-size.svg)", "",
              f"Record-mode overhead: IOPS of the same run without and with recording (1 queue, a fresh daemon per run,"
              f" {opts.runtime:g} s after {opts.ramp:g} s of ramp, variants interleaved in rotating order,"
              f" median of {opts.reps}; in parentheses the min-max over the repetitions; a paired ratio divides"
              f" the runs of one repetition, which ran next to each other):", "",
              "| workload | no recording | `--record` (block-id) | ratio of medians | median of paired ratios | `--record-mode full` | ratio of medians | median of paired ratios |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in overhead:
        m, it = r["median"], r["iops"]

        def cell(k: str) -> str:
            return f"{m[k]:,.0f} ({min(it[k]):,.0f}-{max(it[k]):,.0f})"
        pr = r["paired_ratio"]
        lines.append(f"| {r['workload']} | {cell('off')} | {cell('block-id')} | **{m['block-id'] / m['off']:.3f}x** "
                     f"| {pr['block-id']:.3f}x | {cell('full')} | {m['full'] / m['off']:.3f}x | {pr['full']:.3f}x |")
    lines += ["", END]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small runs, one repetition, no guest")
    ap.add_argument("--requests", type=int, default=50000, help="4 KiB requests per size workload")
    ap.add_argument("--size", type=int, default=1 << 30, help="image size in bytes")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--runtime", type=float, default=3.0)
    ap.add_argument("--ramp", type=float, default=1.0)
    ap.add_argument("--no-guest", action="store_true", help="skip the guest row")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="print only; leave docs/ alone")
    opts = ap.parse_args()
    if opts.quick:
        opts.requests, opts.size, opts.reps, opts.runtime, opts.ramp, opts.no_guest = 5000, 256 << 20, 1, 2.0, 0.5, True
    opts.rr_row = ROOT / "target/release/rr-row"
    opts.perf = ROOT / "target/release/examples/perf"
    if not opts.no_build:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--bin", "rr-row", "--example", "perf"], cwd=ROOT, check=True)
    start = time.monotonic()
    (ROOT / "target").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="log-sizes-", dir=ROOT / "target") as tmp:
        work = Path(tmp)
        image = work / "disk.rrow"
        subprocess.run([str(opts.rr_row), "create", str(image), "--size", str(opts.size)], check=True, capture_output=True)
        print(f"prefilling {human(opts.size)}", file=sys.stderr)
        serve_run(opts, work, image, [], ["--pattern", "write", "--bs", "1M", "--iodepth", "8", "--io-size", str(opts.size), "--runtime", "3600"])
        print("log sizes:", file=sys.stderr)
        sizes = measure_sizes(opts, work, image)
        print("record-mode overhead:", file=sys.stderr)
        overhead = measure_overhead(opts, work, image)
    elapsed = time.monotonic() - start
    block = markdown(opts, sizes, overhead, elapsed)
    print(block)
    json_out = ROOT / "target/log-sizes.json"
    json_out.write_text(json.dumps({"sizes": sizes, "overhead": overhead}, indent=1))
    if not opts.no_docs:
        md = ROOT / "docs/log-size.md"
        text = md.read_text() if md.exists() else f"# Record log size\n\n{BEGIN}\n{END}\n"
        if BEGIN in text and END in text:
            text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text += "\n" + block + "\n"
        md.write_text(text)
        svg(sizes, ROOT / "docs/log-size.svg")
        print(f"wrote {md.relative_to(ROOT)} and docs/log-size.svg (raw results: {json_out.relative_to(ROOT)})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

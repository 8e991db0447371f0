#!/usr/bin/env python3
"""Image growth with and without retention while serving (`rr-row serve --retain-seqs N`).

Starts `rr-row serve` on a fresh image three ways, in alternation (A B C A B C ...): keeping
every version; with `--retain-seqs N` (given-back blocks are reused for new writes, the
default); and with `--retain-seqs N --punch-reclaimed` (holes punched instead). Drives each
with the repo's load generator (examples/perf.rs: 4 KiB random writes at QD32 by default) for
a fixed time, and samples the image file's allocated size (st_blocks) and apparent size
(st_size) every second. Prints the medians (IOPS, final sizes) and the ratios to "keep", and
writes a plot of both sizes over time (docs/retention.svg) and a table between markers in
docs/performance.md.

Measures what retention buys (bounded disk usage, a file that stops growing) and what it
costs (throughput, measured in the same run); the machine is shared, so only ratios of medians
mean something.

Usage: python3 scripts/retention.py [--seconds 60] [--reps 2] [--size 2G] [--retain-seqs 131072]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN = "<!-- retention:begin -->"
END = "<!-- retention:end -->"


def parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = s.strip().upper()
    if s and s[-1] in mult:
        return int(float(s[:-1]) * mult[s[-1]])
    return int(s)


def variants(opts: argparse.Namespace) -> list[tuple[str, str, list[str]]]:
    """(key, label, extra serve arguments) of the three ways of serving."""
    n = str(opts.retain_seqs)
    return [
        ("keep", "every version kept", []),
        ("reuse", f"`--retain-seqs {n}` (reuse)", ["--retain-seqs", n]),
        ("punch", f"`--retain-seqs {n} --punch-reclaimed`", ["--retain-seqs", n, "--punch-reclaimed"]),
    ]


def run_one(opts: argparse.Namespace, workdir: Path, variant: tuple[str, str, list[str]], rep: int) -> dict:
    key, _, extra = variant
    image = workdir / f"ret-{key}.rrow"
    sock = workdir / f"ret-{key}.sock"
    log = workdir / f"ret-{key}.rep{rep}.log"
    for p in (image, sock):
        p.unlink(missing_ok=True)
    cmd = [str(opts.rr_row), "serve", "--socket", str(sock), "--image", str(image), "--size", str(opts.size_bytes)]
    cmd += extra
    env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    with open(log, "w") as lf:
        proc = subprocess.Popen(cmd, stdout=lf, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"rr-row serve did not start; see {log}")
        time.sleep(0.05)
    samples: list[tuple[float, int, int]] = []
    stop = threading.Event()
    t0 = time.monotonic()

    def sample() -> None:
        while not stop.is_set():
            try:
                st = image.stat()
                samples.append((time.monotonic() - t0, st.st_blocks * 512, st.st_size))
            except OSError:
                pass
            stop.wait(1.0)

    th = threading.Thread(target=sample)
    th.start()
    perf = [str(opts.perf), "--socket", str(sock), "--json", "--pattern", opts.pattern, "--bs", opts.bs,
            "--iodepth", str(opts.iodepth), "--runtime", str(opts.seconds), "--timeout", "60"]
    r = subprocess.run(perf, capture_output=True, text=True)
    # Give the retention thread its last look (it checks every second).
    time.sleep(2.5)
    stop.set()
    th.join()
    final = image.stat().st_blocks * 512
    final_size = image.stat().st_size
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    closed = image.stat().st_blocks * 512
    check = subprocess.run([str(opts.rr_row), "check", str(image), "--output", "json"], capture_output=True, text=True)
    check_status = json.loads(check.stdout).get("status") if check.stdout.strip().startswith("{") else f"exit {check.returncode}"
    image.unlink(missing_ok=True)
    if r.returncode != 0:
        raise RuntimeError(f"perf failed ({r.returncode}): {r.stderr[-500:]}")
    res = json.loads(r.stdout)
    tot = res["total"]
    return {
        "variant": key, "rep": rep, "iops": tot["iops"], "mib_s": tot["mib_s"],
        "written_bytes": tot["iops"] * opts.seconds * parse_size(opts.bs),
        "final_allocated": final, "final_size": final_size, "closed_allocated": closed, "samples": samples,
        "check": check_status,
    }


def svg(runs: list[dict], opts: argparse.Namespace, path: Path) -> None:
    """Allocated size (solid) and apparent size (dashed) over time, one colour per variant."""
    width, height, left, right, top, bottom = 810, 380, 70, 280, 30, 50
    pw, ph = width - left - right, height - top - bottom
    tmax = max((s[0] for r in runs for s in r["samples"]), default=1.0)
    ymax = max((max(s[1], s[2]) for r in runs for s in r["samples"]), default=1) / (1 << 30)
    ymax = max(ymax * 1.1, 0.1)
    colors = {"keep": "#c0392b", "reuse": "#2471a3", "punch": "#27ae60"}
    labels = {k: label for k, label, _ in variants(opts)}
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14">rr-row image size while serving {opts.bs} {opts.pattern} QD{opts.iodepth} ({opts.size} disk)</text>']
    for i in range(6):
        y = top + ph - ph * i / 5
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{ymax * i / 5:.1f}</text>')
    out.append(f'<text x="16" y="{top + ph / 2}" transform="rotate(-90 16 {top + ph / 2})" text-anchor="middle">GiB</text>')
    for i in range(6):
        x = left + pw * i / 5
        out.append(f'<text x="{x:.1f}" y="{top + ph + 18}" text-anchor="middle">{tmax * i / 5:.0f}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">seconds</text>')
    seen = []
    for r in runs:
        c = colors.get(r["variant"], "#555")
        for idx, dash in ((1, ""), (2, ' stroke-dasharray="5,4"')):
            pts = " ".join(f"{left + pw * s[0] / tmax:.1f},{top + ph - ph * (s[idx] / (1 << 30)) / ymax:.1f}" for s in r["samples"])
            out.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="1.5"{dash} opacity="{1.0 if r["rep"] == 0 else 0.45}"/>')
        if r["variant"] not in seen:
            seen.append(r["variant"])
            ly = top + 20 * len(seen)
            out.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 32}" y2="{ly}" stroke="{c}" stroke-width="2"/>')
            out.append(f'<text x="{left + pw + 36}" y="{ly + 4}">{esc(labels.get(r["variant"], r["variant"]).replace("`", ""))}</text>')
    ly = top + 20 * (len(seen) + 1)
    out.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 32}" y2="{ly}" stroke="#555" stroke-width="1.5"/>')
    out.append(f'<text x="{left + pw + 36}" y="{ly + 4}">allocated (st_blocks)</text>')
    ly += 20
    out.append(f'<line x1="{left + pw + 12}" y1="{ly}" x2="{left + pw + 32}" y2="{ly}" stroke="#555" stroke-width="1.5" stroke-dasharray="5,4"/>')
    out.append(f'<text x="{left + pw + 36}" y="{ly + 4}">file size (st_size)</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--size", default="2G")
    ap.add_argument("--retain-seqs", type=int, default=131072, help="the window (default: 512 MiB of 4 KiB writes)")
    ap.add_argument("--pattern", default="randwrite")
    ap.add_argument("--bs", default="4k")
    ap.add_argument("--iodepth", type=int, default=32)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--rr-row", type=Path, default=ROOT / "target/release/rr-row")
    ap.add_argument("--perf", type=Path, default=ROOT / "target/release/examples/perf")
    ap.add_argument("--svg", type=Path, default=ROOT / "docs/retention.svg")
    ap.add_argument("--md", type=Path, default=ROOT / "docs/performance.md")
    ap.add_argument("--no-build", action="store_true")
    opts = ap.parse_args()
    opts.size_bytes = parse_size(opts.size)
    if not opts.no_build:
        subprocess.run(["cargo", "build", "--release", "--example", "perf", "--bin", "rr-row"], cwd=ROOT, check=True)
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="rr-row-retention-", dir="/var/tmp"))
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[0]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    runs = []
    vs = variants(opts)
    total = len(vs) * opts.reps
    for rep in range(opts.reps):
        for v in vs:
            r = run_one(opts, workdir, v, rep)
            runs.append(r)
            print(f"[{len(runs)}/{total}] {v[0]:<6} {r['iops']:>10,.0f} IOPS  allocated {r['final_allocated'] / 2**30:6.2f} GiB "
                  f"file {r['final_size'] / 2**30:6.2f} GiB (allocated after close {r['closed_allocated'] / 2**30:.2f}) "
                  f"written {r['written_bytes'] / 2**30:.1f} GiB  check {r['check']}", flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[0]
    med = {}
    for key, _, _ in vs:
        rs = [r for r in runs if r["variant"] == key]
        med[key] = {k: statistics.median(r[k] for r in rs)
                    for k in ("iops", "final_allocated", "final_size", "closed_allocated", "written_bytes")}
        med[key]["checks"] = ", ".join(sorted({r["check"] for r in rs}))
    a = med["keep"]
    svg(runs, opts, opts.svg)
    lines = [BEGIN, "",
             f"Run {started}, {opts.reps} repetitions alternating, {opts.seconds} s of {opts.bs} {opts.pattern} at QD{opts.iodepth} on a fresh "
             f"{opts.size} rr-row image each (load average {load_before} before, {load_after} after; `python3 scripts/retention.py`). "
             "Allocated = the image file's st_blocks, file size = its st_size, 2.5 s after the load stopped (the retention thread "
             "looks every second). Ratios are to keeping every version, in the same run.", "",
             "| Serving | IOPS (median) | written GiB | allocated GiB at the end | file size GiB at the end | allocated after close | `check` | IOPS ratio | allocated ratio | file size ratio |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for key, label, _ in vs:
        b = med[key]
        lines.append(f"| {label} | {b['iops']:,.0f} | {b['written_bytes'] / 2**30:.1f} | {b['final_allocated'] / 2**30:.2f} | "
                     f"{b['final_size'] / 2**30:.2f} | {b['closed_allocated'] / 2**30:.2f} | {b['checks']} | "
                     f"{b['iops'] / a['iops']:.2f} | {b['final_allocated'] / max(a['final_allocated'], 1):.2f} | "
                     f"{b['final_size'] / max(a['final_size'], 1):.2f} |")
    lines += ["", f"![image size over time]({opts.svg.name})", "", END]
    block = "\n".join(lines)
    text = opts.md.read_text() if opts.md.exists() else "# Performance\n"
    if BEGIN in text and END in text:
        pre, rest = text.split(BEGIN, 1)
        text = pre + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n## Retention while serving\n\n" + block + "\n"
    opts.md.write_text(text)
    print("\n".join(lines[2:-3]))
    for p in workdir.glob("*.sock"):
        p.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Side-by-side performance matrix: rr-row serve vs qemu-storage-daemon (raw, qcow2).

Every backend serves a fresh image of the same virtual size, on the same filesystem, with the
same cache mode: buffered by default (the host page cache is used by all of them), or, with
--direct, O_DIRECT for all of them (rr-row `serve --direct`, qemu-storage-daemon
`cache.direct=on`, same aio mode). Each repetition:

  1. create a fresh image per backend, start every daemon, prefill each disk sequentially
     (1 MiB writes, QD8) so reads hit allocated, sequentially laid out data;
  2. run the workloads in the order below; within a workload the backends run back to back,
     so slow drifts of the machine hit every backend alike, in an order that changes from one
     workload and repetition to the next along a Williams design: over its rows each backend
     runs in each position, and right after each other backend, equally often (what one run
     leaves behind, such as a host still writing back, does not always fall on the same one);
  3. the fragmentation workload first overwrites the whole region with 4 KiB random writes
     (as many bytes as the region holds), unmeasured, then measures a 128 KiB sequential read;
  4. stop the daemons (SIGTERM) and delete the images.

The load generator is examples/perf.rs (libblkio virtio-blk-vhost-user driver, closed loop).
Medians over the repetitions, and the ratios rr-row/peer, are printed and written into
docs/performance.md between the perf-matrix markers, with an SVG plot next to it.

Python 3 standard library only. Typical use, from the repository root:

  cargo build --release --example perf --bin rr-row
  scripts/perf-matrix.py --quick              # ~2 minutes: short runs, one repetition
  scripts/perf-matrix.py                      # default: 5 s runs, 3 repetitions
  scripts/perf-matrix.py --full --record      # 10 s runs, 5 repetitions, plus rr-row --record
  scripts/perf-matrix.py --direct --quick     # every backend with the page cache out of the way
  scripts/perf-matrix.py --direct --ceiling   # also fio on the same file system, no daemon
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN_MARK = "<!-- perf-matrix:begin -->"
END_MARK = "<!-- perf-matrix:end -->"


def variant(opts: argparse.Namespace) -> str:
    """Which table of docs/performance.md a run owns: buffered or O_DIRECT, with or without
    retention ("", "direct", "retain", "direct-retain")."""
    parts = (["direct"] if opts.direct else []) + (["retain"] if opts.retain_seqs else [])
    return "-".join(parts)


def marks(var: str) -> tuple[str, str]:
    """The markers of the block a run of variant `var` owns in docs/performance.md."""
    if var:
        return BEGIN_MARK.replace("begin", f"{var}-begin"), END_MARK.replace("end", f"{var}-end")
    return BEGIN_MARK, END_MARK


@dataclass(frozen=True)
class Workload:
    """One cell row of the matrix: perf arguments plus how it is presented."""

    key: str
    title: str
    args: tuple[str, ...]
    # Unmeasured preparation run before the measured one (same backend), if any.
    prepare: tuple[str, ...] | None = None
    # Targets from issue 5 (ratio of medians against raw and qcow2), for the report.
    target_raw: float | None = None
    target_qcow2: float | None = None


def matrix(size: int) -> list[Workload]:
    """The matrix of issue 5, in execution order (reads first, then writes, then fragmentation)."""
    r4 = ("--bs", "4k")
    return [
        Workload("seqread-128k-qd8", "128 KiB seq read, QD8", ("--pattern", "read", "--bs", "128k", "--iodepth", "8"), target_raw=0.95),
        Workload("randread-4k-qd1", "4 KiB rand read, QD1, 1 queue", ("--pattern", "randread", *r4, "--iodepth", "1"), target_raw=1.0, target_qcow2=1.2),
        Workload("randread-4k-qd32", "4 KiB rand read, QD32, 1 queue", ("--pattern", "randread", *r4, "--iodepth", "32"), target_raw=1.0, target_qcow2=1.2),
        Workload("randread-4k-qd1-2q", "4 KiB rand read, QD1, 2 queues", ("--pattern", "randread", *r4, "--iodepth", "1", "--queues", "2"), target_raw=1.0, target_qcow2=1.2),
        Workload("randread-4k-qd32-2q", "4 KiB rand read, QD32, 2 queues", ("--pattern", "randread", *r4, "--iodepth", "32", "--queues", "2"), target_raw=1.0, target_qcow2=1.2),
        Workload("seqwrite-128k-qd8", "128 KiB seq write, QD8", ("--pattern", "write", "--bs", "128k", "--iodepth", "8"), target_raw=0.95),
        Workload("randwrite-4k-qd1", "4 KiB rand write, QD1, 1 queue", ("--pattern", "randwrite", *r4, "--iodepth", "1"), target_raw=1.0, target_qcow2=1.2),
        Workload("randwrite-4k-qd32", "4 KiB rand write, QD32, 1 queue", ("--pattern", "randwrite", *r4, "--iodepth", "32"), target_raw=1.0, target_qcow2=1.2),
        Workload("randwrite-4k-qd1-2q", "4 KiB rand write, QD1, 2 queues", ("--pattern", "randwrite", *r4, "--iodepth", "1", "--queues", "2"), target_raw=1.0, target_qcow2=1.2),
        Workload("randwrite-4k-qd32-2q", "4 KiB rand write, QD32, 2 queues", ("--pattern", "randwrite", *r4, "--iodepth", "32", "--queues", "2"), target_raw=1.0, target_qcow2=1.2),
        Workload("randrw70-4k-qd32", "4 KiB rand 70/30 read/write, QD32", ("--pattern", "randrw", "--rwmix-read", "70", *r4, "--iodepth", "32")),
        Workload(
            "fragread-128k-qd8",
            "128 KiB seq read after 4 KiB rand overwrite, QD8",
            ("--pattern", "read", "--bs", "128k", "--iodepth", "8"),
            prepare=("--pattern", "randwrite", *r4, "--iodepth", "32", "--io-size", str(size), "--runtime", "3600", "--seed", "4242"),
            target_raw=0.9,
        ),
    ]


@dataclass
class Backend:
    """A daemon serving one image over a vhost-user-blk socket, or (kind "fio") the same
    file system and cache mode driven by fio with no daemon and no vhost-user trip: the
    ceiling each cell is measured against."""

    name: str
    kind: str  # "rr-row", "qsd" or "fio"
    fmt: str  # "rrimg", "raw" or "qcow2"
    record: bool = False
    # fio only: write into a fresh file `fallocate`d first (unwritten extents, what a
    # redirect-on-write disk appends into) instead of over the prefilled one; measured only
    # for the workloads in `only`.
    reserved: bool = False
    only: frozenset[str] | None = None
    proc: subprocess.Popen | None = None
    image: Path | None = None
    socket: Path | None = None
    log: Path | None = None
    peak_rss_kib: list[int] = field(default_factory=list)
    image_bytes: list[int] = field(default_factory=list)
    log_bytes: list[int] = field(default_factory=list)
    # rr-row only: allocated image bytes after `rr-row reclaim --keep-from latest` (keeping the
    # repetition's record log with --keep-log), and how long the reclaim took.
    reclaimed_image_bytes: list[int] = field(default_factory=list)
    reclaim_seconds: list[float] = field(default_factory=list)

    def start(self, opts: argparse.Namespace, workdir: Path, rep: int) -> None:
        self.image = workdir / f"{self.name}.{self.fmt}"
        self.socket = workdir / f"{self.name}.sock"
        self.log = workdir / f"{self.name}.rep{rep}.log"
        for p in (self.image, self.socket):
            p.unlink(missing_ok=True)
        size = str(opts.size_bytes)
        if self.kind == "fio":
            # No daemon: fio opens the file itself (the reserved variant makes a file per run).
            if not self.reserved:
                with open(self.image, "wb") as f:
                    f.truncate(opts.size_bytes)
            return
        if self.kind == "qsd":
            run_checked(["qemu-img", "create", "-q", "-f", self.fmt, str(self.image), size])
            cmd = [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=file0,filename={self.image},cache.direct={'on' if opts.direct else 'off'},aio={opts.aio}",
                "--blockdev", f"driver={self.fmt},node-name=fmt0,file=file0",
                "--export", f"type=vhost-user-blk,id=exp0,node-name=fmt0,addr.type=unix,addr.path={self.socket},writable=on,num-queues=2",
            ]
        else:
            cmd = [str(opts.rr_row), "serve", "--socket", str(self.socket), "--image", str(self.image), "--size", size, "--queues", "2"]
            if opts.direct:
                cmd += ["--direct"]
            if opts.retain_seqs:
                cmd += ["--retain-seqs", str(opts.retain_seqs)]
            cmd += list(getattr(opts, "rr_row_arg", None) or [])
            if self.record:
                rec = workdir / f"{self.name}.rrlog"
                rec.unlink(missing_ok=True)
                cmd += ["--record", str(rec)]
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        with open(self.log, "w") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 15
        while not self.socket.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name}: daemon exited with {self.proc.returncode} at start; see {self.log}:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no socket after 15 s; see {self.log}")
            time.sleep(0.05)

    def sample_rss(self) -> None:
        """Records the running daemon's peak RSS."""
        if self.proc and self.proc.poll() is None:
            try:
                for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        self.peak_rss_kib.append(int(line.split()[1]))
            except OSError:
                pass

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the daemon (all its threads) has used so far."""
        if not self.proc or self.proc.poll() is not None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return None

    def sample_files(self) -> None:
        """Records the image's allocated size and the record log's size (after stop, so that
        everything the daemon buffered is on disk)."""
        if self.image and self.image.exists():
            self.image_bytes.append(self.image.stat().st_blocks * 512)
        if self.record and self.image:
            log = self.image.parent / f"{self.name}.rrlog"
            if log.exists():
                self.log_bytes.append(log.stat().st_size)

    def reclaim(self, rr_row: Path) -> None:
        """rr-row only, after stop and sample_files: gives back every version but the current
        state's (and the blocks the record log reads), and records the image's size after."""
        if self.kind != "rr-row" or not self.image or not self.image.exists():
            return
        cmd = [str(rr_row), "reclaim", str(self.image), "--keep-from", "latest", "--quiet", "--output", "json"]
        log = self.image.parent / f"{self.name}.rrlog"
        if self.record and log.exists():
            cmd += ["--keep-log", str(log)]
        t = time.monotonic()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  warning: {self.name}: rr-row reclaim failed ({r.returncode}): {r.stderr.strip()[-300:]}", file=sys.stderr)
            return
        self.reclaim_seconds.append(time.monotonic() - t)
        self.reclaimed_image_bytes.append(self.image.stat().st_blocks * 512)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                print(f"  warning: {self.name} ignored SIGTERM for 20 s, killing it", file=sys.stderr)
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def measures(self, key: str) -> bool:
        """Whether this backend is measured in workload `key`."""
        return self.only is None or key in self.only

    def cleanup(self) -> None:
        for p in (self.image, self.socket, reserved_file(self)):
            if p:
                p.unlink(missing_ok=True)
        if self.record and self.image:
            (self.image.parent / f"{self.name}.rrlog").unlink(missing_ok=True)


def settle() -> None:
    """Writes back every dirty page (sync(2)), so that no run pays for the writeback of the
    data an earlier run, of any backend, left in the page cache."""
    os.sync()


def tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def run_checked(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")


# Below this much free space in the work directory a failed run is taken for a full file system.
LOW_SPACE = 1 << 30


def out_of_space(free: int, daemon_log: str) -> bool:
    """Whether a run that failed did so because the work directory's file system filled up:
    little space left, or the daemon said so (its images may have been deleted since)."""
    return free < LOW_SPACE or "No space left on device" in daemon_log


def check_space_after_failure(opts: argparse.Namespace, backend: Backend) -> None:
    """Stops the matrix (RuntimeError; docs/ are left as they were) when a failed run is the
    file system filling up: every later run would fail too, and a matrix of failures replaces
    nothing useful."""
    free = shutil.disk_usage(opts.workdir).free
    log = tail(backend.log, 200) if backend.log else ""
    if out_of_space(free, log):
        raise RuntimeError(
            f"the file system of {opts.workdir} is full ({free / 2**30:.1f} GiB free now): rr-row "
            f"images grow by every write of a repetition (26.6 GiB each on a 1 GiB disk with --direct "
            f"at 5 s per run); free space, or use --workdir, --runtime or --reps")


def reserved_file(backend: Backend) -> Path | None:
    """The file a reserved-space fio backend writes into (made afresh for each run)."""
    if backend.kind != "fio" or not backend.reserved or backend.image is None:
        return None
    return backend.image.with_suffix(".reserved")


# How much a reserved-space fio run reserves, in disk sizes: more than a run writes (the
# 128 KiB sequential write runs at up to 2.5 GiB/s for ramp + runtime on a 1 GiB disk), so
# that fio never wraps around onto blocks it has written.
RESERVE_FACTOR = 16


# At most this many fio threads stand for the requests in flight of a buffered write cell.
FIO_MAX_THREADS = 64


def fio_command(args: tuple[str, ...], filename: Path, size: int, direct: bool, measured: bool,
                runtime: float, ramp: float, seed: int, reserve: int = 0) -> list[str]:
    """The fio command line that does what the load generator does with `args` (its flags:
    --pattern, --bs, --iodepth, --queues, --rwmix-read, --io-size, --runtime, --seed; later
    flags win, as they do for perf) over `size` bytes of `filename` (`reserve` > 0: over a file
    that long, `fallocate`d first).

    With O_DIRECT, and for buffered reads: io_uring, one job per queue at the cell's depth.
    Buffered writes and mixes: one `psync` thread per request in flight (at most
    FIO_MAX_THREADS): with io_uring, fio's buffered 4 KiB writes over cached pages of an ext4
    file ran at 14k per second at QD1 (p50 70 us, the writes handed to io_uring's worker
    threads), one `psync` thread at 83-95k. Sequential threads each take a slice of the file, one
    after the other."""
    flags: dict[str, str] = {"--runtime": f"{runtime:g}", "--ramp": f"{ramp:g}", "--seed": str(seed)} if measured else {"--seed": str(seed)}
    it = iter(args)
    for k in it:
        flags[k] = next(it)
    rw = {"read": "read", "write": "write", "randread": "randread", "randwrite": "randwrite", "randrw": "randrw"}[flags["--pattern"]]
    span = reserve or size
    queues, depth = int(flags.get("--queues", "1")), int(flags.get("--iodepth", "1"))
    threads = not direct and rw not in ("read", "randread")
    jobs = min(queues * depth, FIO_MAX_THREADS) if threads else queues
    per_job = span // jobs if rw in ("read", "write") else span
    cmd = [
        "fio", "--name=cell", f"--filename={filename}", f"--size={per_job}",
        f"--direct={1 if direct else 0}", f"--rw={rw}", f"--bs={flags.get('--bs', '4k')}", f"--numjobs={jobs}",
        "--group_reporting", "--output-format=json", "--lat_percentiles=1", "--percentile_list=50:99",
        f"--randseed={flags['--seed']}", "--allow_file_create=1",
        # fio drops the file's cached pages before a job by default; the daemons find the
        # pages their prefill and earlier runs left, and so must fio when buffered.
        "--invalidate=0",
    ]
    cmd += ["--ioengine=psync", "--thread"] if threads else ["--ioengine=io_uring", f"--iodepth={depth}"]
    if per_job != span:
        cmd.append(f"--offset_increment={per_job}")
    cmd.append("--fallocate=native" if reserve else "--fallocate=none")
    if rw == "randrw":
        cmd.append(f"--rwmixread={flags.get('--rwmix-read', '50')}")
    if "--io-size" in flags and "--ramp" not in flags:
        cmd.append(f"--io_size={int(flags['--io-size']) // jobs}")
    else:
        cmd += ["--time_based", f"--runtime={flags['--runtime']}", f"--ramp_time={flags['--ramp']}"]
    return cmd


def fio_report(out: dict) -> dict:
    """fio's JSON (one job group) in the load generator's report shape: total IOPS and MiB/s of
    both directions, and the p50 / p99 of total latency of the direction that did more I/O."""
    job = out["jobs"][0]
    dirs = [job[d] for d in ("read", "write") if job[d]["total_ios"] > 0]
    main = max(dirs, key=lambda d: d["total_ios"])
    pct = main["lat_ns"]["percentile"]
    return {"total": {
        "iops": sum(d["iops"] for d in dirs),
        "mib_s": sum(d["bw_bytes"] for d in dirs) / (1 << 20),
        "lat_us": {"p50": pct["50.000000"] / 1000, "p99": pct["99.000000"] / 1000},
    }}


def run_fio(opts: argparse.Namespace, backend: Backend, args: tuple[str, ...], measured: bool) -> dict | None:
    """Runs fio once for a fio backend; returns a report in the load generator's shape, or
    None when the run failed."""
    target = reserved_file(backend) or backend.image
    if backend.reserved:
        target.unlink(missing_ok=True)
    cmd = fio_command(args, target, opts.size_bytes, opts.direct, measured, opts.runtime, opts.ramp, opts.seed,
                      RESERVE_FACTOR * opts.size_bytes if backend.reserved else 0)
    limit = (opts.runtime + opts.ramp + 120) if measured else 3600
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"  error: fio for {backend.name} did not finish in {limit:.0f} s", file=sys.stderr)
        return None
    finally:
        if backend.reserved:
            target.unlink(missing_ok=True)
    if r.returncode != 0:
        print(f"  error: fio for {backend.name} failed ({r.returncode}): {r.stderr.strip()[-500:]}", file=sys.stderr)
        if shutil.disk_usage(opts.workdir).free < LOW_SPACE:
            raise RuntimeError(f"the file system of {opts.workdir} is full")
        return None
    try:
        # fio may print notes before its JSON.
        return fio_report(json.loads(r.stdout[r.stdout.index("{"):]))
    except (ValueError, KeyError, IndexError) as e:
        print(f"  error: fio printed no usable JSON ({e}): {r.stdout[:200]!r}", file=sys.stderr)
        return None


def run_perf(opts: argparse.Namespace, backend: Backend, args: tuple[str, ...], measured: bool) -> dict | None:
    """Runs the load generator once; returns its JSON report, or None when the run failed
    (raises RuntimeError when the failure is a full file system). For a fio backend, runs fio
    instead."""
    if backend.kind == "fio":
        return run_fio(opts, backend, args, measured)
    cmd = [str(opts.perf), "--socket", str(backend.socket), "--json", "--timeout", "30", "--seed", str(opts.seed)]
    if measured:
        cmd += ["--runtime", str(opts.runtime), "--ramp", str(opts.ramp)]
    cmd += list(args)  # later flags win: a prepare run's own --runtime/--seed override
    limit = (opts.runtime + opts.ramp + 120) if measured else 3600
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        print(f"  error: perf against {backend.name} did not finish in {limit:.0f} s", file=sys.stderr)
        check_space_after_failure(opts, backend)
        return None
    if r.returncode != 0:
        print(f"  error: perf against {backend.name} failed ({r.returncode}): {r.stderr.strip()}", file=sys.stderr)
        check_space_after_failure(opts, backend)
        return None
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        print(f"  error: perf printed no JSON: {r.stdout[:200]!r}", file=sys.stderr)
        return None


def rr_row_serve_works(rr_row: Path, workdir: Path, record: bool = False, direct: bool = False) -> str | None:
    """Returns None when `rr-row serve` (with `--record` and `--direct` if asked) starts and
    listens, else the reason it cannot be used."""
    if not rr_row.exists():
        return f"{rr_row} not built"
    probe = Backend("rr-row-probe", "rr-row", "rrimg", record=record)
    ns = argparse.Namespace(size_bytes=64 << 20, rr_row=rr_row, aio="io_uring", direct=direct, retain_seqs=0)
    try:
        probe.start(ns, workdir, 0)
        return None
    except RuntimeError as e:
        return str(e).splitlines()[0] + " " + tail(probe.log or Path("/nonexistent"), 3).replace("\n", " ")
    finally:
        probe.stop()
        probe.cleanup()


def parse_size(s: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = s.strip().lower()
    if s and s[-1] in units:
        return int(s[:-1]) * units[s[-1]]
    return int(s)


def fmt_num(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "MiB/s":
        return f"{v:,.0f}"
    return f"{v:,.0f}"


def fmt_ratio(a: float | None, b: float | None, target: float | None = None) -> str:
    if a is None or b is None or b == 0:
        return "n/a"
    r = a / b
    mark = ""
    if target is not None:
        mark = " ✓" if r >= target else " ✗"
    return f"{r:.2f}{mark}"


def machine_info(opts: argparse.Namespace) -> dict:
    def cmd_out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip().splitlines()[0]
        except (OSError, IndexError):
            return "unknown"

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # `stat -f` names every ext filesystem "ext2/ext3"; findmnt gives the real type (ext4...).
    fs = cmd_out(["findmnt", "-n", "-o", "FSTYPE", "--target", str(opts.workdir)])
    return {
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "qemu_storage_daemon": cmd_out(["qemu-storage-daemon", "--version"]),
        "filesystem": fs,
        "workdir": str(opts.workdir),
    }


def metric(report: dict | None, key: str) -> float | None:
    if report is None:
        return None
    total = report["total"]
    if key == "iops":
        return total["iops"]
    if key == "mib_s":
        return total["mib_s"]
    if key == "p99":
        return total["lat_us"]["p99"]
    if key == "p50":
        return total["lat_us"]["p50"]
    raise KeyError(key)


def median(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def spread(vals: list[float]) -> float | None:
    vals = [v for v in vals if v is not None]
    if len(vals) < 2:
        return None
    m = statistics.median(vals)
    return (max(vals) - min(vals)) / m if m else None


def svg_plot(workloads: list[Workload], backends: list[str], med: dict, path: Path, baseline: str, cache: str = "buffered") -> None:
    """Grouped bar chart of throughput relative to `baseline` (1.0 = as fast as it), by hand."""
    colors = {"rr-row": "#d62728", "rr-row-record": "#ff9896", "raw": "#1f77b4", "qcow2": "#2ca02c", "fio": "#999999"}
    backends = [b for b in backends if b != "fio-reserved"]
    rows = []
    for w in workloads:
        base = med.get((w.key, baseline, "iops"))
        vals = []
        for b in backends:
            v = med.get((w.key, b, "iops"))
            vals.append(v / base if (v is not None and base) else None)
        rows.append((w, vals))
    vmax = max([v for _, vs in rows for v in vs if v is not None] + [1.2])
    vmax = min(max(1.2, vmax * 1.1), 4.0)
    left, right, top, row_h, bar_h = 330, 110, 50, 14 * len(backends) + 12, 12
    width = 900
    plot_w = width - left - right
    height = top + row_h * len(rows) + 60
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="20" text-anchor="middle" font-size="15">Throughput relative to qemu-storage-daemon {baseline} ({cache}; median of interleaved runs; 1.0 = equal)</text>',
    ]

    def xpos(v: float) -> float:
        return left + plot_w * min(v, vmax) / vmax

    ticks = [i / 4 for i in range(0, int(vmax * 4) + 1)]
    for t in ticks:
        x = xpos(t)
        dash = "" if t == 1.0 else ' stroke-dasharray="2,3"'
        stroke = "#000" if t == 1.0 else "#bbb"
        out.append(f'<line x1="{x:.1f}" y1="{top - 5}" x2="{x:.1f}" y2="{top + row_h * len(rows)}" stroke="{stroke}"{dash}/>')
        if abs(t * 2 - round(t * 2)) < 1e-9:
            out.append(f'<text x="{x:.1f}" y="{top + row_h * len(rows) + 15}" text-anchor="middle">{t:.1f}x</text>')
    for i, (w, vals) in enumerate(rows):
        y0 = top + i * row_h
        out.append(f'<text x="{left - 8}" y="{y0 + row_h / 2 + 4:.1f}" text-anchor="end">{esc(w.title)}</text>')
        for j, (b, v) in enumerate(zip(backends, vals)):
            y = y0 + 6 + j * 14
            if v is None:
                out.append(f'<text x="{left + 4}" y="{y + 10}" fill="#888">{esc(b)}: n/a</text>')
                continue
            out.append(f'<rect x="{left}" y="{y}" width="{xpos(v) - left:.1f}" height="{bar_h}" fill="{colors.get(b, "#777")}"/>')
            clipped = " (bar clipped)" if v > vmax else ""
            out.append(f'<text x="{xpos(v) + 4:.1f}" y="{y + 10}" font-size="10">{v:.2f}{clipped}</text>')
    ly = top + row_h * len(rows) + 35
    lx = left if len(backends) <= 4 else 20
    for b in backends:
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{colors.get(b, "#777")}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly}">{esc("fio, no daemon" if b == "fio" else b)}</text>')
        lx += 140
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def cache_mode(opts: argparse.Namespace) -> str:
    """The cache mode of a run, as the report states it."""
    if opts.direct:
        return (f"O_DIRECT for every backend (rr-row `serve --direct`: data blocks bypass the page cache, "
                f"journal buffered + fdatasync; qemu-storage-daemon: `cache.direct=on,aio={opts.aio}`)")
    return f"buffered I/O for every backend (qemu-storage-daemon: `cache.direct=off,aio={opts.aio}`)"


def md_head(head: list[str]) -> list[str]:
    """A markdown table's header and alignment lines (first column left, the rest right)."""
    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]


CEILINGS = ("fio", "fio-reserved")


def ceiling_lines(workloads: list[Workload], names: list[str], med: dict) -> list[str]:
    """The table of ceilings: each cell's fio rate (the file system with no daemon), every
    backend's share of it, and what the cell's targets ask of rr-row as a share of it; then
    the 128 KiB sequential write into reserved space."""
    if "fio" not in names:
        return []
    peers = [b for b in names if b not in CEILINGS]
    lines = [
        "Ceilings: the same cells run by fio on the same file system and cache mode, with no daemon and no "
        "vhost-user trip (a prefilled raw file overwritten in place; io_uring with one job per queue, except "
        "buffered writes and the mix: one `psync` thread per request in flight; see Method). The client "
        "and the daemons above share the CPUs, fio has them to itself. 'targets / fio' is the rate the "
        "cell's targets ask of rr-row (the larger of target x raw and target x qcow2) as a share of fio's:",
        "",
    ]
    lines += md_head(["Workload", "fio IOPS"] + [f"{b}/fio" for b in peers] + ["targets / fio"])
    for w in workloads:
        fio = med.get((w.key, "fio", "iops"))
        row = [w.title, "n/a" if fio is None else f"{fio:,.0f}"]
        row += [fmt_ratio(med.get((w.key, b, "iops")), fio) for b in peers]
        asks = [t * v for t, v in ((w.target_raw, med.get((w.key, "raw", "iops"))), (w.target_qcow2, med.get((w.key, "qcow2", "iops"))))
                if t is not None and v is not None]
        row.append(fmt_ratio(max(asks), fio) if asks else "-")
        lines.append("| " + " | ".join(row) + " |")
    for w in workloads:
        res = med.get((w.key, "fio-reserved", "mib_s"))
        if res is None:
            continue
        inplace, rr = med.get((w.key, "fio", "mib_s")), med.get((w.key, "rr-row", "mib_s"))
        lines += ["", f"{w.title} by fio into a fresh file `fallocate`d first (unwritten extents, where a "
                      f"redirect-on-write disk's new versions go): {res:,.0f} MiB/s, "
                      f"{fmt_ratio(res, inplace)} of fio over written blocks; rr-row/that: {fmt_ratio(rr, res)}."]
    return lines + [""]


def render_markdown(opts, info, workloads, all_backends, med, spreads, results, elapsed, loads, backend_objs) -> str:
    backends = [b for b in all_backends if b not in CEILINGS]
    has_rr = "rr-row" in backends
    lines = [
        marks(variant(opts))[0],
        f"### Matrix run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {'O_DIRECT' if opts.direct else 'buffered'}"
        f"{f', rr-row with `--retain-seqs {opts.retain_seqs}`' if opts.retain_seqs else ''} (generated by `scripts/perf-matrix.py`)",
        "",
        f"- Command: `{opts.cmdline}`",
        f"- {opts.reps} repetition(s), runtime {opts.runtime} s after {opts.ramp} s ramp per run, "
        f"virtual disk {opts.size} on {info['filesystem']} ({info['workdir']}), cache mode: {cache_mode(opts)}, backends interleaved per workload (order from a carryover-balanced Williams design per workload and repetition){', sync(2) before each run' if opts.settle else ''}; wall time {elapsed / 60:.1f} min.",
        f"- Machine: {info['cpu']}, {info['cpus']} CPUs, kernel {info['kernel']}, {info['qemu_storage_daemon']}.",
        f"- Load average (1 min) before / after: {loads[0]} / {loads[1]} (other jobs share these CPUs; see the spread column).",
        "",
    ]
    if not has_rr:
        lines += [f"- **rr-row not measured**: {opts.rr_row_reason}", ""]
    if opts.record_reason:
        lines += [f"- **`--record` variant not measured**: {opts.record_reason}", ""]
    # Main table.
    head = ["Workload"] + [f"{b} IOPS" for b in backends]
    if has_rr:
        head += [f"rr-row/{p}" for p in ("raw", "qcow2") if p in backends]
        if "rr-row-record" in backends:
            head += ["record/rr-row"]
    head += ["max spread"]
    lines += md_head(head)
    for w in workloads:
        row = [w.title]
        for b in backends:
            v = med.get((w.key, b, "iops"))
            mib = med.get((w.key, b, "mib_s"))
            row.append("n/a" if v is None else (f"{v:,.0f} ({mib:,.0f} MiB/s)" if "128k" in w.key else f"{v:,.0f}"))
        if has_rr:
            rr = med.get((w.key, "rr-row", "iops"))
            if "raw" in backends:
                row.append(fmt_ratio(rr, med.get((w.key, "raw", "iops")), w.target_raw))
            if "qcow2" in backends:
                row.append(fmt_ratio(rr, med.get((w.key, "qcow2", "iops")), w.target_qcow2))
            if "rr-row-record" in backends:
                row.append(fmt_ratio(med.get((w.key, "rr-row-record", "iops")), rr, 0.95))
        sp = [spreads.get((w.key, b)) for b in backends]
        sp = [s for s in sp if s is not None]
        row.append(f"{max(sp) * 100:.0f}%" if sp else "-")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Ratios are of medians; ✓/✗ mark the targets of issue 5 (4 KiB random: ≥1.0x raw and ≥1.2x qcow2; "
        "128 KiB sequential: ≥0.95x raw; read after random overwrite: ≥0.9x raw; record: ≥0.95x). "
        "'max spread' is (max-min)/median over the repetitions, worst backend.",
        "",
        *ceiling_lines(workloads, all_backends, med),
        "Latency (median over repetitions of each run's p50 / p99, microseconds):",
        "",
    ]
    head = ["Workload"] + [f"{b} p50 / p99" for b in backends]
    if has_rr and "raw" in backends:
        head.append("rr-row/raw p99")
    lines += md_head(head)
    for w in workloads:
        row = [w.title]
        for b in backends:
            p50, p99 = med.get((w.key, b, "p50")), med.get((w.key, b, "p99"))
            row.append("n/a" if p50 is None else f"{p50:,.0f} / {p99:,.0f}")
        if has_rr and "raw" in backends:
            rr, raw = med.get((w.key, "rr-row", "p99")), med.get((w.key, "raw", "p99"))
            # Lower is better: show rr/raw; the target (QD1) is <= 1.2.
            if rr is None or not raw:
                row.append("n/a")
            else:
                r = rr / raw
                mark = (" ✓" if r <= 1.2 else " ✗") if "qd1" in w.key else ""
                row.append(f"{r:.2f}{mark}")
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "Daemon CPU (median over repetitions; user + system time of the daemon process, all threads, over the whole run: CPUs busy, and microseconds of CPU per request at that run's rate). The load generator's own CPU is not included:",
        "",
    ]
    head = ["Workload"] + [f"{b} CPUs / us per req" for b in backends]
    lines += md_head(head)
    for w in workloads:
        row = [w.title]
        for b in backends:
            c, u = med.get((w.key, b, "daemon_cpus")), med.get((w.key, b, "daemon_cpu_us_per_io"))
            row.append("n/a" if c is None or u is None else f"{c:.2f} / {u:.1f}")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Daemon peak RSS (VmHWM) and allocated image size at the end of each repetition:", ""]
    reclaimed = any(b.reclaim_seconds for b in backend_objs)
    extra = ["after `reclaim --keep-from latest` GiB (max)", "reclaim s (median)"] if reclaimed else []
    lines += md_head(["Backend", "peak RSS MiB (max)", "image allocated GiB (max)"] + extra + ["record log MiB (max)"])
    for b in backend_objs:
        if b.kind == "fio":
            continue
        rss = max(b.peak_rss_kib) / 1024 if b.peak_rss_kib else None
        img = max(b.image_bytes) / (1 << 30) if b.image_bytes else None
        cells = [b.name, "n/a" if rss is None else f"{rss:,.0f}", "n/a" if img is None else f"{img:.2f}"]
        if reclaimed:
            cells.append(f"{max(b.reclaimed_image_bytes) / (1 << 30):.2f}" if b.reclaimed_image_bytes else "-")
            cells.append(f"{statistics.median(b.reclaim_seconds):.1f}" if b.reclaim_seconds else "-")
        cells.append(f"{max(b.log_bytes) / (1 << 20):,.1f}" if b.log_bytes else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"![relative throughput]({opts.svg.name})", "", f"Raw per-run results (not committed): `{opts.json_out.relative_to(ROOT) if opts.json_out.is_relative_to(ROOT) else opts.json_out}`.", marks(variant(opts))[1]]
    return "\n".join(lines)


def write_docs(md_path: Path, block: str, var: str) -> None:
    text = md_path.read_text() if md_path.exists() else "# Performance\n\n"
    begin, end = marks(var)
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        title = {"": "Side-by-side matrix", "direct": "Side-by-side matrix, O_DIRECT",
                 "retain": "Side-by-side matrix, rr-row with retention",
                 "direct-retain": "Side-by-side matrix, O_DIRECT, rr-row with retention"}[var]
        text = text.rstrip("\n") + f"\n\n## {title}\n\n" + block + "\n"
    md_path.write_text(text)


def williams_rows(n: int) -> list[list[int]]:
    """The rows of a Williams design for `n` treatments: a Latin square (each treatment once
    per row and once per position) in which each treatment directly follows every other one
    equally often. For odd `n` the square's rows are followed by their reverses (2n rows)."""
    if n <= 1:
        return [list(range(n))]
    first = [0]
    lo, hi = 1, n - 1
    for k in range(1, n):
        if k % 2 == 1:
            first.append(lo)
            lo += 1
        else:
            first.append(hi)
            hi -= 1
    rows = [[(x + r) % n for x in first] for r in range(n)]
    if n % 2 == 1:
        rows += [list(reversed(row)) for row in rows]
    return rows


def run_order(n: int, rep: int, wi: int) -> list[int]:
    """The order of `n` backends for workload `wi` (0-based) in repetition `rep` (1-based).
    The row moves on by one per repetition and per workload, so each workload goes through
    all the rows over as many repetitions as there are rows."""
    rows = williams_rows(n)
    return rows[(rep - 1 + wi) % len(rows)]


def interrupt(*_args) -> None:
    """SIGTERM handler: stops the run the way Ctrl-C does."""
    raise KeyboardInterrupt


def self_test() -> int:
    """Checks `williams_rows` for 1 to 8 backends: every row a permutation, every backend in
    every position equally often, every ordered pair of backends adjacent equally often."""
    from collections import Counter
    for n in range(1, 9):
        rows = williams_rows(n)
        assert all(sorted(r) == list(range(n)) for r in rows), (n, rows)
        for pos in range(n):
            per = Counter(r[pos] for r in rows)
            assert len(per) == n and len(set(per.values())) == 1, (n, pos, per)
        pairs = Counter((r[i], r[i + 1]) for r in rows for i in range(n - 1))
        assert len(pairs) == n * (n - 1) and len(set(pairs.values())) <= 1, (n, pairs)
        # Each workload of a matrix goes through every row over len(rows) repetitions,
        # whatever the number of workloads.
        for workloads in (1, 5, 12, 16):
            for wi in range(workloads):
                seen = {tuple(run_order(n, rep, wi)) for rep in range(1, len(rows) + 1)}
                assert len(seen) == len(rows), (n, workloads, wi, seen)
    # A failed run is a full file system when space is low or the daemon said so.
    enospc = "ERROR rr_row::vhost_user::backend] queue 0 request #7 failed: request failed: device error: cannot write data blocks: No space left on device (os error 28)"
    assert out_of_space(LOW_SPACE - 1, "")
    assert out_of_space(100 * LOW_SPACE, enospc)
    assert not out_of_space(100 * LOW_SPACE, "ERROR ... Input/output error")
    # A cell becomes the fio job that does the same, and fio's report the load generator's shape.
    cmd = fio_command(("--pattern", "randrw", "--rwmix-read", "70", "--bs", "4k", "--iodepth", "32", "--queues", "2"),
                      Path("/x/f.raw"), 1 << 30, True, True, 5.0, 1.0, 7)
    for flag in ("--rw=randrw", "--rwmixread=70", "--bs=4k", "--iodepth=32", "--numjobs=2", "--direct=1", "--size=1073741824",
                 "--time_based", "--runtime=5", "--ramp_time=1", "--randseed=7", "--fallocate=none", "--filename=/x/f.raw",
                 "--invalidate=0"):
        assert flag in cmd, (flag, cmd)
    assert "--ioengine=io_uring" in cmd and not any(c.startswith("--offset_increment") for c in cmd), cmd
    # Buffered writes: a psync thread per request in flight, each with its share of the I/O.
    prep = fio_command(("--pattern", "randwrite", "--bs", "4k", "--iodepth", "32", "--io-size", "1048576", "--runtime", "3600", "--seed", "4242"),
                       Path("f"), 1 << 30, False, False, 5.0, 1.0, 7)
    for flag in ("--io_size=32768", "--randseed=4242", "--fallocate=none", "--size=1073741824", "--direct=0",
                 "--ioengine=psync", "--numjobs=32"):
        assert flag in prep, (flag, prep)
    assert "--time_based" not in prep, prep
    # A sequential write into reserved space: each thread its own slice of the reservation.
    seq = fio_command(("--pattern", "write", "--bs", "128k", "--iodepth", "8"), Path("f"), 1 << 30, False, True, 5.0, 1.0, 7,
                      reserve=16 << 30)
    for flag in ("--fallocate=native", "--numjobs=8", f"--size={2 << 30}", f"--offset_increment={2 << 30}", "--time_based"):
        assert flag in seq, (flag, seq)
    # Buffered reads stay on io_uring at the cell's depth.
    rd = fio_command(("--pattern", "randread", "--bs", "4k", "--iodepth", "32"), Path("f"), 1 << 30, False, True, 5.0, 1.0, 7)
    assert "--ioengine=io_uring" in rd and "--iodepth=32" in rd and "--numjobs=1" in rd, rd
    cap = fio_command(("--pattern", "randwrite", "--bs", "4k", "--iodepth", "32", "--queues", "4"), Path("f"), 1 << 30, False, True, 5.0, 1.0, 7)
    assert f"--numjobs={FIO_MAX_THREADS}" in cap, cap
    d = lambda ios, iops, bw, p50, p99: {"total_ios": ios, "iops": iops, "bw_bytes": bw,
                                         "lat_ns": {"percentile": {"50.000000": p50, "99.000000": p99}}}
    rep = fio_report({"jobs": [{"read": d(700, 70.0, 70 << 20, 2000, 9000), "write": d(300, 30.0, 30 << 20, 1000, 5000)}]})
    assert rep == {"total": {"iops": 100.0, "mib_s": 100.0, "lat_us": {"p50": 2.0, "p99": 9.0}}}, rep
    rep = fio_report({"jobs": [{"read": d(0, 0.0, 0, 0, 0), "write": d(5, 5.0, 1 << 20, 3000, 4000)}]})
    assert rep["total"]["iops"] == 5.0 and rep["total"]["lat_us"]["p50"] == 3.0, rep
    print("perf-matrix self-test: run orders balanced for 1-8 backends; a full file system is recognised; "
          "cells translated to fio and its reports read")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 s runs, 0.5 s ramp, 1 repetition, 1 GiB disk")
    mode.add_argument("--full", action="store_true", help="10 s runs, 2 s ramp, 5 repetitions, 4 GiB disk")
    ap.add_argument("--runtime", type=float, help="measured seconds per run (default 5)")
    ap.add_argument("--ramp", type=float, help="warm-up seconds per run (default 1)")
    ap.add_argument("--reps", type=int, help="repetitions of the whole matrix (default 3)")
    ap.add_argument("--size", help="virtual disk size, K/M/G suffix (default 2G)")
    ap.add_argument("--backends", default="rr-row,raw,qcow2", help="comma list from rr-row,raw,qcow2 (default all; rr-row is skipped with a note if `rr-row serve` does not start)")
    ap.add_argument("--record", action="store_true", help="also run rr-row with --record (backend rr-row-record)")
    ap.add_argument("--ceiling", action="store_true",
                    help="also measure the file system without any daemon: fio (io_uring, same cache mode, one job per "
                         "queue) on a prefilled raw file (backend fio), and, for the 128 KiB sequential write, into a "
                         "fresh file `fallocate`d first (backend fio-reserved: what a redirect-on-write disk appends "
                         "into); reported in a table of ceilings. Needs fio (Debian: fio)")
    ap.add_argument("--only", help="comma list of workload keys to run (default all)")
    ap.add_argument("--aio", default="io_uring", choices=["io_uring", "threads"], help="qemu-storage-daemon aio mode")
    ap.add_argument("--direct", action="store_true", help="O_DIRECT for every backend: rr-row serve --direct, qemu-storage-daemon cache.direct=on (default: buffered for all)")
    ap.add_argument("--rr-row-arg", action="append", metavar="ARG",
                    help="one more argument for `rr-row serve` (repeatable; e.g. --rr-row-arg=--defrag-idle-ms=0)")
    ap.add_argument("--retain-seqs", type=int, default=0, metavar="N",
                    help="serve rr-row with `--retain-seqs N` (retention while serving, reclaimed blocks reused); "
                         "the results go to a table of their own")
    ap.add_argument("--freeze-idle", action="store_true",
                    help="stop (SIGSTOP) every other backend's daemon while one is measured, so that idle "
                         "daemons' threads cannot take CPU from it (the page cache and writeback stay shared)")
    ap.add_argument("--reclaim", action="store_true", help="after each repetition, run `rr-row reclaim --keep-from latest` on every rr-row image and report its size after it and the reclaim's time (slow: it punches every superseded block, about 150 us each)")
    ap.add_argument("--no-settle", dest="settle", action="store_false", help="do not sync(2) before each measured run")
    ap.add_argument("--seed", type=int, default=1, help="seed passed to perf")
    ap.add_argument("--workdir", type=Path, default=ROOT / "target" / "perf-matrix", help="where images live (one filesystem for all)")
    ap.add_argument("--rr-row", type=Path, default=ROOT / "target" / "release" / "rr-row")
    ap.add_argument("--perf", type=Path, default=ROOT / "target" / "release" / "examples" / "perf")
    ap.add_argument("--build", action="store_true", help="run `cargo build --release --example perf --bin rr-row` first")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "performance.md", help="markdown file to update")
    ap.add_argument("--no-doc", action="store_true", help="print only; do not touch docs/")
    ap.add_argument("--self-test", action="store_true", help="check the run-order design and exit (no daemon is started)")
    opts = ap.parse_args()
    if opts.self_test:
        return self_test()
    # A `kill` of the driver stops its daemons as Ctrl-C does.
    signal.signal(signal.SIGTERM, interrupt)
    preset = {"runtime": 5.0, "ramp": 1.0, "reps": 3, "size": "2G"}
    if opts.quick:
        preset = {"runtime": 2.0, "ramp": 0.5, "reps": 1, "size": "1G"}
    elif opts.full:
        preset = {"runtime": 10.0, "ramp": 2.0, "reps": 5, "size": "4G"}
    for k, v in preset.items():
        if getattr(opts, k) is None:
            setattr(opts, k, v)
    opts.size_bytes = parse_size(opts.size)
    opts.cmdline = " ".join(["scripts/perf-matrix.py"] + sys.argv[1:])
    opts.svg = opts.doc.parent / (f"perf-matrix-{variant(opts)}.svg" if variant(opts) else "perf-matrix.svg")
    opts.json_out = opts.workdir / f"results-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"

    if opts.build:
        subprocess.run(["cargo", "build", "--release", "--example", "perf", "--bin", "rr-row"], cwd=ROOT, check=True)
    if not opts.perf.exists():
        print(f"error: {opts.perf} missing; run: cargo build --release --example perf --bin rr-row", file=sys.stderr)
        return 2
    if shutil.which("qemu-storage-daemon") is None or shutil.which("qemu-img") is None:
        print("error: qemu-storage-daemon and qemu-img are needed (Debian: qemu-utils)", file=sys.stderr)
        return 2
    opts.workdir.mkdir(parents=True, exist_ok=True)
    # A redirect-on-write image keeps every version while it is served (reclaim runs on a
    # stopped image, after each repetition here): every write of a repetition appends, and the faster rr-row writes, the more it appends. Measured peak:
    # about 14x the disk size per rr-row image in one repetition of the default matrix (2 GiB
    # disk: 25-28 GiB each, 2026-11-26; 1 GiB disk with --direct: 26.6 GiB, 2026-11-27: the
    # growth is what the writes of a repetition add, more than a multiple of the disk), so ask
    # for 16x per rr-row backend plus 2x for each qemu-storage-daemon image. The file system
    # may still fill up (it may be shared): a failed run then stops the matrix
    # (check_space_after_failure) instead of failing every later run.
    n_rr = sum(1 for b in opts.backends.split(",") if b.strip() == "rr-row") * (2 if opts.record else 1)
    n_qsd = sum(1 for b in opts.backends.split(",") if b.strip() in ("raw", "qcow2"))
    # The ceiling's file (1x) and the reserved run's file (RESERVE_FACTOR x, only while it runs).
    need = opts.size_bytes * (16 * n_rr + 2 * n_qsd + ((1 + RESERVE_FACTOR) if opts.ceiling else 0))
    free = shutil.disk_usage(opts.workdir).free
    if free < need:
        print(f"error: {opts.workdir} has {free / 2**30:.1f} GiB free; this matrix needs about {need / 2**30:.0f} GiB "
              f"(rr-row images grow by every write of a repetition); free space or use --size/--workdir", file=sys.stderr)
        return 2

    wanted = [b.strip() for b in opts.backends.split(",") if b.strip()]
    opts.rr_row_reason = ""
    if "rr-row" in wanted:
        reason = rr_row_serve_works(opts.rr_row, opts.workdir, direct=opts.direct)
        if reason:
            print(f"note: rr-row skipped: {reason}", file=sys.stderr)
            opts.rr_row_reason = reason
            wanted.remove("rr-row")
    opts.record_reason = ""
    if opts.record and "rr-row" in wanted:
        reason = rr_row_serve_works(opts.rr_row, opts.workdir, record=True, direct=opts.direct)
        if reason:
            print(f"note: rr-row --record skipped: {reason}", file=sys.stderr)
            opts.record_reason = reason
            opts.record = False
    backends: list[Backend] = []
    for name in wanted:
        if name == "rr-row":
            backends.append(Backend("rr-row", "rr-row", "rrimg"))
            if opts.record:
                backends.append(Backend("rr-row-record", "rr-row", "rrimg", record=True))
        elif name in ("raw", "qcow2"):
            backends.append(Backend(name, "qsd", name))
        else:
            print(f"error: unknown backend {name}", file=sys.stderr)
            return 2
    if opts.ceiling:
        if shutil.which("fio") is None:
            print("error: --ceiling needs fio (Debian: apt-get install fio)", file=sys.stderr)
            return 2
        backends.append(Backend("fio", "fio", "raw"))
        backends.append(Backend("fio-reserved", "fio", "raw", reserved=True, only=frozenset({"seqwrite-128k-qd8"})))
    if not backends:
        print("error: no backend to measure", file=sys.stderr)
        return 2
    names = [b.name for b in backends]
    workloads = matrix(opts.size_bytes)
    if opts.only:
        keep = set(opts.only.split(","))
        workloads = [w for w in workloads if w.key in keep]

    total_runs = opts.reps * sum(1 for w in workloads for b in backends if b.measures(w.key))
    print(f"perf-matrix: backends {', '.join(names)}; {len(workloads)} workloads x {opts.reps} reps = {total_runs} runs of {opts.ramp}+{opts.runtime} s; disk {opts.size}; {'O_DIRECT' if opts.direct else 'buffered'}")
    load_before = Path("/proc/loadavg").read_text().split()[0]
    t_start = time.monotonic()
    results: dict[tuple[str, str], list[dict | None]] = {}
    done = 0
    try:
        for rep in range(1, opts.reps + 1):
            print(f"== repetition {rep}/{opts.reps}: fresh images, prefill")
            for b in backends:
                b.start(opts, opts.workdir, rep)
            for b in backends:
                if b.reserved:
                    continue  # writes into a file of its own, made afresh per run
                t = time.monotonic()
                pre = run_perf(opts, b, ("--pattern", "write", "--bs", "1M", "--iodepth", "8", "--io-size", str(opts.size_bytes), "--runtime", "3600"), measured=False)
                if pre is None:
                    raise RuntimeError(f"prefill of {b.name} failed; see {b.log}")
                print(f"   prefill {b.name:<14} {opts.size} in {time.monotonic() - t:5.1f} s ({pre['total']['mib_s']:,.0f} MiB/s)")
            for wi, w in enumerate(workloads):
                prepared = {b.name: True for b in backends}
                if w.prepare:
                    for b in backends:
                        if not b.measures(w.key):
                            continue
                        t = time.monotonic()
                        pre = run_perf(opts, b, w.prepare, measured=False)
                        prepared[b.name] = pre is not None
                        state = "FAILED, not measured" if pre is None else f"{time.monotonic() - t:5.1f} s, {pre['total']['iops']:,.0f} IOPS"
                        print(f"   prepare {w.key} on {b.name:<14} ({state})")
                # A carryover-balanced order (run_order): what one run leaves behind (dirty
                # pages, a host busy writing back) does not always fall on the same backend.
                order = run_order(len(backends), rep, wi)
                for b in [backends[k] for k in order]:
                    if not b.measures(w.key):
                        continue
                    if opts.settle:
                        settle()
                    others = [o for o in backends if o is not b and o.proc is not None] if opts.freeze_idle else []
                    for o in others:
                        o.proc.send_signal(signal.SIGSTOP)
                    try:
                        cpu0, wall0 = b.cpu_seconds(), time.monotonic()
                        rep_res = run_perf(opts, b, w.args, measured=True) if prepared[b.name] else None
                        cpu1, wall = b.cpu_seconds(), time.monotonic() - wall0
                    finally:
                        for o in others:
                            o.proc.send_signal(signal.SIGCONT)
                    if rep_res is not None and cpu0 is not None and cpu1 is not None and wall > 0:
                        # The daemon's CPU over the whole run (ramp and connection included),
                        # as CPUs busy and as CPU time per request at the run's rate.
                        rep_res["daemon_cpus"] = (cpu1 - cpu0) / wall
                        iops = rep_res["total"]["iops"]
                        rep_res["daemon_cpu_us_per_io"] = (cpu1 - cpu0) / wall / iops * 1e6 if iops else None
                    results.setdefault((w.key, b.name), []).append(rep_res)
                    done += 1
                    el = time.monotonic() - t_start
                    eta = el / done * (total_runs - done)
                    if rep_res:
                        t = rep_res["total"]
                        desc = f"{t['iops']:>10,.0f} IOPS {t['mib_s']:>8,.0f} MiB/s  p50 {t['lat_us']['p50']:>8,.1f} us  p99 {t['lat_us']['p99']:>9,.1f} us"
                    else:
                        desc = "FAILED"
                    print(f"[{done:>3}/{total_runs}] {w.key:<22} {b.name:<14} {desc}   (eta {eta / 60:4.1f} min)", flush=True)
            for b in backends:
                b.sample_rss()
                b.stop()
                b.sample_files()
                if opts.reclaim:
                    b.reclaim(opts.rr_row)
                b.cleanup()
    except KeyboardInterrupt:
        # What ran is printed, but a partial matrix does not replace the one in docs/.
        print("interrupted; reporting what ran (docs/ left as they were)", file=sys.stderr)
        opts.no_doc = True
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        for b in backends:
            b.stop()
        return 1
    finally:
        for b in backends:
            b.stop()
            b.cleanup()
    elapsed = time.monotonic() - t_start
    load_after = Path("/proc/loadavg").read_text().split()[0]

    med: dict[tuple[str, str, str], float | None] = {}
    spreads: dict[tuple[str, str], float | None] = {}
    for (wk, bn), reps in results.items():
        for m in ("iops", "mib_s", "p50", "p99"):
            med[(wk, bn, m)] = median([metric(r, m) for r in reps])
        for m in ("daemon_cpus", "daemon_cpu_us_per_io"):
            med[(wk, bn, m)] = median([r[m] for r in reps if r and r.get(m) is not None])
        spreads[(wk, bn)] = spread([metric(r, "iops") for r in reps])

    # Console summary.
    print()
    hdr = f"{'workload':<22}" + "".join(f"{n + ' IOPS':>20}" for n in names)
    peers = [p for p in ("raw", "qcow2") if p in names and "rr-row" in names]
    hdr += "".join(f"{'rr/' + p:>10}" for p in peers)
    if "rr-row-record" in names:
        hdr += f"{'rec/rr':>10}"
    print(hdr)
    for w in workloads:
        line = f"{w.key:<22}" + "".join(f"{fmt_num(med.get((w.key, n, 'iops')), 'IOPS'):>20}" for n in names)
        for p in peers:
            line += f"{fmt_ratio(med.get((w.key, 'rr-row', 'iops')), med.get((w.key, p, 'iops'))):>10}"
        if "rr-row-record" in names:
            line += f"{fmt_ratio(med.get((w.key, 'rr-row-record', 'iops')), med.get((w.key, 'rr-row', 'iops'))):>10}"
        print(line)
    print(f"\nwall time {elapsed / 60:.1f} min; load average {load_before} -> {load_after}")

    if not opts.no_doc:
        info = machine_info(opts)
        opts.doc.parent.mkdir(parents=True, exist_ok=True)
        baseline = "raw" if "raw" in names else names[0]
        svg_plot(workloads, names, med, opts.svg, baseline, "O_DIRECT" if opts.direct else "buffered")
        raw_dump = {
            "command": opts.cmdline,
            "machine": info,
            "runtime_s": opts.runtime,
            "ramp_s": opts.ramp,
            "reps": opts.reps,
            "size": opts.size_bytes,
            "cache": "direct" if opts.direct else "buffered",
            "runs": [{"workload": wk, "backend": bn, "rep": i + 1, "report": r} for (wk, bn), reps in results.items() for i, r in enumerate(reps)],
        }
        opts.json_out.write_text(json.dumps(raw_dump, indent=1) + "\n")
        block = render_markdown(opts, info, workloads, names, med, spreads, results, elapsed, (load_before, load_after), backends)
        write_docs(opts.doc, block, variant(opts))
        print(f"wrote {opts.doc}, {opts.svg}, {opts.json_out}")
    failed = sum(1 for reps in results.values() for r in reps if r is None)
    if failed:
        print(f"{failed} run(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

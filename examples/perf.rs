//! `perf`: a closed-loop load generator for any vhost-user-blk backend, built on the `blkio`
//! crate's virtio-blk-vhost-user driver (libblkio in Rust).
//!
//! One thread per virtqueue keeps `--iodepth` requests in flight: every completion is
//! timestamped, recorded in a latency histogram and immediately replaced by the next request
//! (closed loop). Nothing is measured during `--ramp`; after ramp the run lasts `--runtime`
//! seconds, or until `--io-size` bytes were transferred when that comes first.
//!
//! Patterns: `randread`, `randwrite`, `randrw` (mix chosen per request with `--rwmix-read`),
//! and the sequential `read` and `write`. Random offsets are uniform over the `--size` region
//! starting at `--offset`, aligned to `--bs`. With several queues, sequential patterns split the
//! region into one contiguous slice per queue so that each queue streams through its own part.
//!
//! ```text
//! cargo run --release --example perf -- --socket SOCK --pattern randread --bs 4k \
//!     --iodepth 32 --queues 1 --runtime 10 --json
//! ```
//!
//! Write buffers are filled once with pseudo-random bytes (never zeros, so no backend can take a
//! zero-detection shortcut). No flushes are sent: every backend is measured with its write cache
//! on, as a guest that does not flush would see it.
//!
//! libblkio has no connection timeout and a backend that dies leaves requests pending forever,
//! so a watchdog ends the process (exit code 2) if the whole run overstays its time by more than
//! `--timeout` seconds.
#![deny(clippy::undocumented_unsafe_blocks)]

use std::mem::MaybeUninit;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rr_row::units::parse_size;
use serde::Serialize;

/// The name of the libblkio driver this tool uses.
const DRIVER: &str = "virtio-blk-vhost-user";

/// Latencies above this many nanoseconds (one minute) are clamped in the histogram.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// I/O pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Pattern {
    /// Uniform random reads.
    Randread,
    /// Uniform random writes.
    Randwrite,
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Uniform random reads and writes, `--rwmix-read` percent reads.
    Randrw,
}

impl Pattern {
    fn is_random(self) -> bool {
        matches!(
            self,
            Pattern::Randread | Pattern::Randwrite | Pattern::Randrw
        )
    }

    fn name(self) -> &'static str {
        match self {
            Pattern::Randread => "randread",
            Pattern::Randwrite => "randwrite",
            Pattern::Read => "read",
            Pattern::Write => "write",
            Pattern::Randrw => "randrw",
        }
    }

    fn writes(self) -> bool {
        !matches!(self, Pattern::Randread | Pattern::Read)
    }
}

/// Closed-loop load generator for vhost-user-blk backends (libblkio virtio-blk-vhost-user).
///
/// An option given twice takes its last value, so scripts can append overrides.
#[derive(Debug, Parser)]
#[command(name = "perf", args_override_self = true)]
struct Args {
    /// The backend's vhost-user unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// I/O pattern.
    #[arg(long, value_enum, default_value_t = Pattern::Randread)]
    pattern: Pattern,
    /// Request size in bytes (K/M/G suffixes), a multiple of 512.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    bs: u64,
    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 1)]
    iodepth: u32,
    /// Virtqueues used, one thread each.
    #[arg(long, default_value_t = 1)]
    queues: u32,
    /// Measured run time in seconds (after ramp).
    #[arg(long, default_value_t = 10.0)]
    runtime: f64,
    /// Warm-up time in seconds: I/O runs but nothing is measured.
    #[arg(long, default_value_t = 0.0)]
    ramp: f64,
    /// Size of the region I/O goes to (default: from --offset to the end of the disk).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Start of the region, in bytes.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    offset: u64,
    /// Seed of the offset and read/write-mix generators (queue N uses seed + N).
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
    /// Percentage of reads for `randrw`.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    rwmix_read: u8,
    /// Stop once this many bytes were transferred (all queues together, ramp included), e.g.
    /// `--pattern write --io-size 1G` writes the first gigabyte of the region exactly once.
    #[arg(long, value_parser = parse_size)]
    io_size: Option<u64>,
    /// Virtqueue size (default: 3 x iodepth rounded up to a power of two, at least 16, at
    /// most 256; libblkio spends 3 descriptors per request).
    #[arg(long)]
    queue_size: Option<u32>,
    /// Seconds the run may overstay (connecting, draining) before the watchdog aborts it.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

/// What can go wrong in a run.
#[derive(Debug, thiserror::Error)]
enum PerfError {
    /// A libblkio call failed.
    #[error("{what}: {msg}")]
    Blkio { what: String, msg: String },
    /// The arguments do not describe a possible run.
    #[error("{0}")]
    Usage(String),
    /// A request completed with an error.
    #[error("{op} at offset {offset} failed: {msg} (errno {errno})")]
    Request {
        op: &'static str,
        offset: u64,
        errno: i32,
        msg: String,
    },
    /// No request completed within the timeout.
    #[error("queue {queue}: no completion for {secs:.1}s with {inflight} requests in flight")]
    Stalled {
        queue: u32,
        secs: f64,
        inflight: u32,
    },
    /// A worker thread panicked.
    #[error("queue {0}: worker thread panicked")]
    Worker(u32),
}

/// Wraps a libblkio error with what was being done.
fn bk(what: impl Into<String>) -> impl FnOnce(blkio::Error) -> PerfError {
    let what = what.into();
    move |e| PerfError::Blkio {
        what,
        msg: e.message().to_string(),
    }
}

/// The run parameters shared by every queue, validated.
#[derive(Debug, Clone, Copy)]
struct Job {
    pattern: Pattern,
    bs: u64,
    iodepth: u32,
    region_start: u64,
    region_len: u64,
    rwmix_read: u8,
    ramp: Duration,
    runtime: Duration,
    io_budget_per_queue: Option<u64>,
    timeout: Duration,
    seed: u64,
    queues: u32,
}

/// Latency and volume of one direction (or of both together).
#[derive(Debug)]
struct DirStats {
    ios: u64,
    bytes: u64,
    lat: Histogram<u64>,
}

impl DirStats {
    fn new() -> Result<Self, PerfError> {
        Ok(Self {
            ios: 0,
            bytes: 0,
            lat: Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3)
                .map_err(|e| PerfError::Usage(format!("histogram: {e}")))?,
        })
    }

    fn record(&mut self, bytes: u64, ns: u64) {
        self.ios += 1;
        self.bytes += bytes;
        self.lat.saturating_record(ns.clamp(1, MAX_LATENCY_NS));
    }

    fn merge(&mut self, other: &DirStats) {
        self.ios += other.ios;
        self.bytes += other.bytes;
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.lat.add(&other.lat);
    }
}

/// What one queue measured.
struct QueueStats {
    read: DirStats,
    write: DirStats,
    /// Length of the measured window (shorter than runtime when the I/O budget ran out).
    window: Duration,
}

/// One direction in the report.
#[derive(Debug, Serialize)]
struct DirReport {
    ios: u64,
    bytes: u64,
    iops: f64,
    mib_s: f64,
    lat_us: LatReport,
}

/// Latency summary in microseconds.
#[derive(Debug, Serialize)]
struct LatReport {
    mean: f64,
    min: f64,
    p50: f64,
    p90: f64,
    p99: f64,
    #[serde(rename = "p99.9")]
    p99_9: f64,
    max: f64,
}

/// The whole report, as printed with `--json`.
#[derive(Debug, Serialize)]
struct Report {
    socket: String,
    pattern: Pattern,
    bs: u64,
    iodepth: u32,
    queues: u32,
    queue_size: u32,
    rwmix_read: Option<u8>,
    region_offset: u64,
    region_size: u64,
    capacity: u64,
    seed: u64,
    ramp_s: f64,
    runtime_s: f64,
    read: Option<DirReport>,
    write: Option<DirReport>,
    total: DirReport,
}

fn dir_report(s: &DirStats, secs: f64) -> DirReport {
    let us = |ns: u64| ns as f64 / 1000.0;
    let secs = secs.max(f64::MIN_POSITIVE);
    let empty = s.lat.is_empty();
    DirReport {
        ios: s.ios,
        bytes: s.bytes,
        iops: s.ios as f64 / secs,
        mib_s: s.bytes as f64 / secs / (1024.0 * 1024.0),
        lat_us: LatReport {
            mean: if empty { 0.0 } else { s.lat.mean() / 1000.0 },
            min: if empty { 0.0 } else { us(s.lat.min()) },
            p50: us(s.lat.value_at_quantile(0.50)),
            p90: us(s.lat.value_at_quantile(0.90)),
            p99: us(s.lat.value_at_quantile(0.99)),
            p99_9: us(s.lat.value_at_quantile(0.999)),
            max: us(s.lat.max()),
        },
    }
}

/// Per-slot bookkeeping of one in-flight request.
#[derive(Clone, Copy)]
struct Slot {
    submitted: Instant,
    offset: u64,
    is_read: bool,
}

/// Generates the offsets and directions of one queue's requests.
struct OffsetGen {
    rng: StdRng,
    pattern: Pattern,
    bs: u64,
    start: u64,
    blocks: u64,
    next_seq: u64,
    rwmix_read: u8,
}

impl OffsetGen {
    fn new(job: &Job, queue: u32) -> Self {
        let total_blocks = job.region_len / job.bs;
        let (start, blocks) = if job.pattern.is_random() {
            (job.region_start, total_blocks)
        } else {
            // Sequential: one contiguous slice of the region per queue.
            let per = total_blocks / u64::from(job.queues);
            (
                job.region_start + u64::from(queue) * per * job.bs,
                per.max(1),
            )
        };
        Self {
            rng: StdRng::seed_from_u64(job.seed.wrapping_add(u64::from(queue))),
            pattern: job.pattern,
            bs: job.bs,
            start,
            blocks,
            next_seq: 0,
            rwmix_read: job.rwmix_read,
        }
    }

    /// The next request: (offset, is_read).
    fn next(&mut self) -> (u64, bool) {
        let block = if self.pattern.is_random() {
            self.rng.gen_range(0..self.blocks)
        } else {
            let b = self.next_seq;
            self.next_seq = (self.next_seq + 1) % self.blocks;
            b
        };
        let is_read = match self.pattern {
            Pattern::Randread | Pattern::Read => true,
            Pattern::Randwrite | Pattern::Write => false,
            Pattern::Randrw => self.rng.gen_range(0..100u8) < self.rwmix_read,
        };
        (self.start + block * self.bs, is_read)
    }
}

/// Runs one queue's closed loop. `base` is the address of this queue's buffers (iodepth x bs
/// bytes of a mapped libblkio memory region).
fn run_queue(
    q: &mut Blkioq,
    job: &Job,
    queue: u32,
    base: usize,
    t0: Instant,
) -> Result<QueueStats, PerfError> {
    let mut read = DirStats::new()?;
    let mut write = DirStats::new()?;
    let ramp_end = t0 + job.ramp;
    let end = ramp_end + job.runtime;
    let depth = job.iodepth as usize;
    let bs = job.bs as usize;
    let mut gen = OffsetGen::new(job, queue);
    let mut budget = job.io_budget_per_queue;
    let mut slots: Vec<Option<Slot>> = vec![None; depth];
    let mut comps: Vec<MaybeUninit<Completion>> =
        (0..depth).map(|_| MaybeUninit::uninit()).collect();
    let mut inflight: u32 = 0;
    let mut last_counted = ramp_end;
    let mut failure: Option<PerfError> = None;

    // Submits one request into slot `i` unless the run is over; returns whether it did.
    let submit = |q: &mut Blkioq,
                  slot: &mut Option<Slot>,
                  i: usize,
                  gen: &mut OffsetGen,
                  budget: &mut Option<u64>,
                  now: Instant|
     -> bool {
        if now >= end {
            return false;
        }
        if let Some(left) = budget {
            if *left == 0 {
                return false;
            }
            *left = left.saturating_sub(job.bs);
        }
        let (offset, is_read) = gen.next();
        let buf = (base + i * bs) as *mut u8;
        *slot = Some(Slot {
            submitted: Instant::now(),
            offset,
            is_read,
        });
        if is_read {
            q.read(offset, buf, bs, i, ReqFlags::empty());
        } else {
            q.write(offset, buf, bs, i, ReqFlags::empty());
        }
        true
    };

    let now = Instant::now();
    for (i, slot) in slots.iter_mut().enumerate() {
        if submit(q, slot, i, &mut gen, &mut budget, now) {
            inflight += 1;
        }
    }

    while inflight > 0 {
        let mut timeout = job.timeout;
        let n = match q.do_io(&mut comps, 1, Some(&mut timeout), None) {
            Ok(n) => n,
            Err(e) if e.errno() == blkio::Errno::TIME => {
                return Err(PerfError::Stalled {
                    queue,
                    secs: job.timeout.as_secs_f64(),
                    inflight,
                })
            }
            Err(e) => return Err(bk(format!("queue {queue}: do_io"))(e)),
        };
        let now = Instant::now();
        for c in comps.iter().take(n) {
            // SAFETY: do_io initialised the first `n` entries of `comps`; Completion is plain
            // data (its message pointer refers to static strings inside libblkio).
            let c = unsafe { c.assume_init_read() };
            let Some(slot) = slots.get_mut(c.user_data).and_then(Option::take) else {
                return Err(PerfError::Usage(format!(
                    "queue {queue}: completion for unknown request {}",
                    c.user_data
                )));
            };
            inflight -= 1;
            if c.ret < 0 {
                if failure.is_none() {
                    let msg = if c.error_msg.is_null() {
                        std::io::Error::from_raw_os_error(-c.ret).to_string()
                    } else {
                        // SAFETY: a non-null error_msg points to a NUL-terminated static
                        // string owned by libblkio.
                        unsafe { std::ffi::CStr::from_ptr(c.error_msg) }
                            .to_string_lossy()
                            .into_owned()
                    };
                    failure = Some(PerfError::Request {
                        op: if slot.is_read { "read" } else { "write" },
                        offset: slot.offset,
                        errno: -c.ret,
                        msg,
                    });
                }
                continue;
            }
            if now >= ramp_end && now <= end {
                let ns = u64::try_from(now.duration_since(slot.submitted).as_nanos())
                    .unwrap_or(u64::MAX);
                if slot.is_read {
                    read.record(job.bs, ns);
                } else {
                    write.record(job.bs, ns);
                }
                last_counted = now;
            }
            if failure.is_none() {
                let i = c.user_data;
                if let Some(s) = slots.get_mut(i) {
                    if submit(q, s, i, &mut gen, &mut budget, now) {
                        inflight += 1;
                    }
                }
            }
        }
    }
    if let Some(f) = failure {
        return Err(f);
    }
    let window = if budget == Some(0) {
        last_counted.saturating_duration_since(ramp_end)
    } else {
        job.runtime
    };
    Ok(QueueStats {
        read,
        write,
        window,
    })
}

/// Rounds `v` up to a multiple of `align` (a power of two or any non-zero value).
fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align.max(1)) * align.max(1)
}

fn secs(v: f64, what: &str) -> Result<Duration, PerfError> {
    Duration::try_from_secs_f64(v).map_err(|_| PerfError::Usage(format!("bad {what}: {v}")))
}

fn run(args: &Args) -> Result<Report, PerfError> {
    if args.bs == 0 || args.bs % 512 != 0 {
        return Err(PerfError::Usage(format!(
            "--bs {} is not a non-zero multiple of 512",
            args.bs
        )));
    }
    if args.iodepth == 0 || args.queues == 0 {
        return Err(PerfError::Usage(
            "--iodepth and --queues must be at least 1".into(),
        ));
    }
    let ramp = secs(args.ramp, "--ramp")?;
    let runtime = secs(args.runtime, "--runtime")?;
    let timeout = secs(args.timeout, "--timeout")?;

    // The watchdog: libblkio neither times out a handshake nor notices a dead backend.
    let deadline = ramp + runtime + timeout * 2;
    std::thread::spawn(move || {
        std::thread::sleep(deadline);
        eprintln!(
            "perf: watchdog: run overstayed its time by {:.0}s, aborting",
            (timeout * 2).as_secs_f64()
        );
        std::process::exit(2);
    });

    let socket = args
        .socket
        .to_str()
        .ok_or_else(|| PerfError::Usage("socket path is not UTF-8".into()))?;
    let mut b = Blkio::new(DRIVER).map_err(bk("create libblkio instance"))?;
    b.set_str("path", socket).map_err(bk("set path"))?;
    b.connect()
        .map_err(bk(format!("connect to {}", args.socket.display())))?;

    let capacity = b.get_u64("capacity").map_err(bk("get capacity"))?;
    let max_queues = b.get_i32("max-queues").map_err(bk("get max-queues"))?;
    let max_transfer = b.get_i32("max-transfer").map_err(bk("get max-transfer"))?;
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(bk("get mem-region-alignment"))?;
    if i64::from(args.queues) > i64::from(max_queues) {
        return Err(PerfError::Usage(format!(
            "--queues {} but the backend offers {max_queues}",
            args.queues
        )));
    }
    if max_transfer > 0 && args.bs > max_transfer as u64 {
        return Err(PerfError::Usage(format!(
            "--bs {} exceeds the backend's max transfer {max_transfer}",
            args.bs
        )));
    }
    if args.offset % 512 != 0 || args.offset >= capacity {
        return Err(PerfError::Usage(format!(
            "--offset {} is unaligned or past the disk's end ({capacity})",
            args.offset
        )));
    }
    let region_len = args.size.unwrap_or(capacity - args.offset);
    if region_len > capacity - args.offset || region_len < args.bs {
        return Err(PerfError::Usage(format!(
            "region {}+{region_len} does not fit the disk ({capacity} bytes) or holds no {}-byte request",
            args.offset, args.bs
        )));
    }
    if !args.pattern.is_random() && region_len / args.bs < u64::from(args.queues) {
        return Err(PerfError::Usage(
            "region too small to give each queue its own sequential slice".into(),
        ));
    }

    let queue_size = match args.queue_size {
        Some(q) => q,
        None => (args.iodepth.saturating_mul(3))
            .next_power_of_two()
            .clamp(16, 256),
    };
    b.set_i32("num-queues", args.queues as i32)
        .map_err(bk("set num-queues"))?;
    b.set_i32(
        "queue-size",
        i32::try_from(queue_size).map_err(|_| PerfError::Usage("queue size too large".into()))?,
    )
    .map_err(bk("set queue-size"))?;

    let buf_len = round_up(u64::from(args.iodepth) * args.bs, align);
    let buf_len =
        usize::try_from(buf_len).map_err(|_| PerfError::Usage("buffers too large".into()))?;
    let mut regions: Vec<MemoryRegion> = Vec::new();
    for _ in 0..args.queues {
        regions.push(
            b.alloc_mem_region(buf_len)
                .map_err(bk("allocate memory region"))?,
        );
    }
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0xdead_beef);
    for r in &regions {
        // SAFETY: the region is a fresh private-to-us shared mapping of `len` bytes that
        // libblkio allocated and keeps mapped until `b` and every queue are dropped; nothing
        // else accesses it before the run starts.
        let mem = unsafe { std::slice::from_raw_parts_mut(r.addr as *mut u8, r.len) };
        rng.fill_bytes(mem);
    }
    let started = b.start().map_err(bk("start"))?;
    for r in &regions {
        b.map_mem_region(r).map_err(bk("map memory region"))?;
    }
    let mut queues = started.queues;
    if queues.len() != args.queues as usize {
        return Err(PerfError::Usage(format!(
            "asked for {} queues, libblkio started {}",
            args.queues,
            queues.len()
        )));
    }

    let job = Job {
        pattern: args.pattern,
        bs: args.bs,
        iodepth: args.iodepth,
        region_start: args.offset,
        region_len,
        rwmix_read: args.rwmix_read,
        ramp,
        runtime,
        io_budget_per_queue: args
            .io_size
            .map(|s| round_up(s.div_ceil(u64::from(args.queues)), args.bs)),
        timeout,
        seed: args.seed,
        queues: args.queues,
    };

    let t0 = Instant::now();
    let results: Vec<Result<QueueStats, PerfError>> = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .iter_mut()
            .zip(&regions)
            .enumerate()
            .map(|(i, (q, r))| {
                let base = r.addr;
                let job = &job;
                let qi = i as u32;
                s.spawn(move || run_queue(q, job, qi, base, t0))
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| h.join().unwrap_or(Err(PerfError::Worker(i as u32))))
            .collect()
    });
    // Queues go before the instance that owns the transport and ring memory.
    drop(queues);
    drop(b);

    let mut read = DirStats::new()?;
    let mut write = DirStats::new()?;
    let mut window = Duration::ZERO;
    for r in results {
        let qs = r?;
        read.merge(&qs.read);
        write.merge(&qs.write);
        window = window.max(qs.window);
    }
    let mut total = DirStats::new()?;
    total.merge(&read);
    total.merge(&write);
    let w = window.as_secs_f64();
    let has_read = args.pattern != Pattern::Randwrite && args.pattern != Pattern::Write;
    Ok(Report {
        socket: args.socket.display().to_string(),
        pattern: args.pattern,
        bs: args.bs,
        iodepth: args.iodepth,
        queues: args.queues,
        queue_size,
        rwmix_read: (args.pattern == Pattern::Randrw).then_some(args.rwmix_read),
        region_offset: args.offset,
        region_size: region_len,
        capacity,
        seed: args.seed,
        ramp_s: args.ramp,
        runtime_s: w,
        read: has_read.then(|| dir_report(&read, w)),
        write: args.pattern.writes().then(|| dir_report(&write, w)),
        total: dir_report(&total, w),
    })
}

fn print_text(r: &Report) {
    let mix = r
        .rwmix_read
        .map(|m| format!(" rwmix_read={m}%"))
        .unwrap_or_default();
    println!(
        "{} bs={} iodepth={} queues={} queue_size={}{mix} region={}+{} runtime={:.2}s",
        r.pattern.name(),
        r.bs,
        r.iodepth,
        r.queues,
        r.queue_size,
        r.region_offset,
        r.region_size,
        r.runtime_s
    );
    let line = |name: &str, d: &DirReport| {
        println!(
            "  {name:<5}: IOPS={:.0} BW={:.1}MiB/s ios={} lat(us): mean={:.1} p50={:.1} p99={:.1} p99.9={:.1} max={:.1}",
            d.iops, d.mib_s, d.ios, d.lat_us.mean, d.lat_us.p50, d.lat_us.p99, d.lat_us.p99_9,
            d.lat_us.max
        );
    };
    if let Some(d) = &r.read {
        line("read", d);
    }
    if let Some(d) = &r.write {
        line("write", d);
    }
    if r.read.is_some() && r.write.is_some() {
        line("total", &r.total);
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("perf: cannot encode report: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print_text(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("perf: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(pattern: Pattern, queues: u32) -> Job {
        Job {
            pattern,
            bs: 4096,
            iodepth: 4,
            region_start: 1 << 20,
            region_len: 64 << 20,
            rwmix_read: 70,
            ramp: Duration::ZERO,
            runtime: Duration::from_secs(1),
            io_budget_per_queue: None,
            timeout: Duration::from_secs(1),
            seed: 42,
            queues,
        }
    }

    #[test]
    fn random_offsets_are_aligned_and_inside_the_region() {
        let j = job(Pattern::Randread, 1);
        let mut g = OffsetGen::new(&j, 0);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let (off, is_read) = g.next();
            assert!(is_read);
            assert_eq!(off % j.bs, 0);
            assert!(off >= j.region_start && off + j.bs <= j.region_start + j.region_len);
            seen.insert(off);
        }
        // 10k draws over 16384 blocks: a uniform generator hits thousands of distinct blocks.
        assert!(seen.len() > 5000, "only {} distinct offsets", seen.len());
    }

    #[test]
    fn sequential_queues_stream_through_disjoint_slices_and_wrap() {
        let j = job(Pattern::Write, 2);
        let per = j.region_len / 2;
        for q in 0..2u32 {
            let mut g = OffsetGen::new(&j, q);
            let start = j.region_start + u64::from(q) * per;
            let blocks = per / j.bs;
            for i in 0..blocks {
                assert_eq!(g.next(), (start + i * j.bs, false));
            }
            assert_eq!(g.next().0, start, "queue {q} wraps to its slice start");
        }
    }

    #[test]
    fn randrw_mix_follows_rwmix_read() {
        let j = job(Pattern::Randrw, 1);
        let mut g = OffsetGen::new(&j, 0);
        let reads = (0..20_000).filter(|_| g.next().1).count();
        let pct = reads as f64 / 200.0;
        assert!((67.0..73.0).contains(&pct), "{pct}% reads for rwmix 70");
    }

    #[test]
    fn same_seed_same_stream_other_queue_other_stream() {
        let j = job(Pattern::Randwrite, 2);
        let a: Vec<_> = (0..64)
            .map({
                let mut g = OffsetGen::new(&j, 0);
                move |_| g.next()
            })
            .collect();
        let b: Vec<_> = (0..64)
            .map({
                let mut g = OffsetGen::new(&j, 0);
                move |_| g.next()
            })
            .collect();
        let c: Vec<_> = (0..64)
            .map({
                let mut g = OffsetGen::new(&j, 1);
                move |_| g.next()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn histogram_stats_merge_and_report() {
        let mut a = DirStats::new().expect("histogram");
        let mut b = DirStats::new().expect("histogram");
        for ns in [10_000u64, 20_000, 30_000] {
            a.record(4096, ns);
        }
        b.record(4096, 1_000_000);
        a.merge(&b);
        let r = dir_report(&a, 2.0);
        assert_eq!(r.ios, 4);
        assert_eq!(r.bytes, 4 * 4096);
        assert!((r.iops - 2.0).abs() < 1e-9);
        assert!((r.lat_us.p50 - 20.0).abs() < 0.1, "p50 {}", r.lat_us.p50);
        assert!((r.lat_us.max - 1000.0).abs() < 1.0, "max {}", r.lat_us.max);
    }
}

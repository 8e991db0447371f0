//! Record and replay through the real `rr-row serve` binary, driven by the `blkio` crate
//! (libblkio's virtio-blk-vhost-user driver) as the frontend.
//!
//! - `a_recorded_run_replays_byte_for_byte_after_the_disk_was_overwritten`: a seeded mixed
//!   workload on 2 queues (reads, full-block and sub-block writes, vectored writes, discards,
//!   write-zeroes, flushes; up to 4 requests in flight per queue) is recorded with
//!   `serve --record`; SIGTERM exits 0; `rr-row log info --output json` counts exactly what was
//!   sent, per kind and per queue. A second, plain session overwrites the whole disk. Then
//!   `serve --replay` serves the same request stream: every request completes as it did while
//!   recording and every read returns the very bytes it returned then; SIGTERM exits 0; the
//!   image's seq and its export are unchanged and `rr-row check` finds it clean.
//! - `a_recorded_direct_run_replays_byte_for_byte_after_the_disk_was_overwritten`: the same,
//!   recorded with `--direct`, where a batch's reads go to the image together and are
//!   recorded from what the batch resolved (the daemon's debug log shows they did).
//! - `a_divergent_stream_exits_2_and_names_the_request`: request k of the replayed stream reads
//!   another sector: requests before k match, k and every later one fail with EIO, the daemon
//!   logs the divergence at the recorded request index of k, and exits 2.
//! - `a_damaged_log_is_refused_before_serving`: a log cut inside its header, one with a bad
//!   header checksum, one with a corrupt frame in the middle, and a log of another image: each
//!   makes `serve --replay` exit non-zero at start, without creating the socket, with a
//!   one-line error naming the problem.
//! - `a_killed_recorder_leaves_a_replayable_prefix`: the recorder is killed with SIGKILL after
//!   the last requests went unflushed; the log's records per queue are a prefix of what was
//!   sent, that prefix replays cleanly (exit 0), and so does the log cut again inside its last
//!   frame (a torn tail, as a power cut leaves it).
//!
//! Every client runs under a watchdog (blkio has no timeouts); daemons are killed when a test
//! ends and their log printed when it failed.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::blk::{Client, ClientOpts, Queue, Req, EIO};
use common::daemon::{replay_refused, start_rr_row, Daemon, ServeOpts};
use common::{arg, export, image_seq, log_info, rr_row, tempdir, with_watchdog};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// The disk: 32 MiB in 4 KiB blocks.
const SIZE: u64 = 32 << 20;
/// Largest request of the workload.
const MAX_REQ: usize = 128 << 10;
/// Requests in flight at most per queue (one buffer slot each).
const MAX_BATCH: usize = 4;
/// Buffer memory per queue.
const QUEUE_MEM: usize = MAX_BATCH * MAX_REQ;
const WATCHDOG: Duration = Duration::from_secs(120);
const EXIT_LIMIT: Duration = Duration::from_secs(30);

/// One request of a workload stream, with the data of a write.
#[derive(Clone, Debug)]
enum Op {
    Read {
        offset: u64,
        len: usize,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    /// A write from two buffers (its first `split` bytes from one, the rest from the other).
    Writev {
        offset: u64,
        data: Vec<u8>,
        split: usize,
    },
    Discard {
        offset: u64,
        len: u64,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        unmap: bool,
    },
    Flush,
}

impl Op {
    fn kind(&self) -> &'static str {
        match self {
            Op::Read { .. } => "read",
            Op::Write { .. } | Op::Writev { .. } => "write",
            Op::Discard { .. } => "discard",
            Op::WriteZeroes { .. } => "write-zeroes",
            Op::Flush => "flush",
        }
    }
}

/// A seeded workload stream of `n` requests, cut into batches of 1 to [`MAX_BATCH`] requests
/// that are in flight together. Offsets and lengths are multiples of 512: sub-block requests
/// (a few sectors inside a 4 KiB block) are frequent, and so are block-aligned ones.
fn stream(seed: u64, n: usize) -> Vec<Vec<Op>> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut batches = Vec::new();
    let mut left = n;
    while left > 0 {
        let size = rng.gen_range(1..=MAX_BATCH).min(left);
        left -= size;
        let batch = (0..size)
            .map(|_| {
                let sectors: u64 = if rng.gen_bool(0.3) {
                    rng.gen_range(1..8)
                } else {
                    8 * rng.gen_range(1..=(MAX_REQ as u64 / 4096))
                };
                let len = sectors * 512;
                let offset = if sectors % 8 == 0 && rng.gen_bool(0.7) {
                    rng.gen_range(0..(SIZE - len) / 4096) * 4096
                } else {
                    rng.gen_range(0..(SIZE - len) / 512) * 512
                };
                let data = |rng: &mut StdRng| {
                    let mut d = vec![0u8; len as usize];
                    rng.fill_bytes(&mut d);
                    d
                };
                match rng.gen_range(0..100) {
                    0..=54 => Op::Read {
                        offset,
                        len: len as usize,
                    },
                    55..=79 => Op::Write {
                        offset,
                        data: data(&mut rng),
                    },
                    80..=84 => Op::Writev {
                        offset,
                        data: data(&mut rng),
                        split: (len as usize / 2) / 512 * 512,
                    },
                    85..=89 => Op::Discard { offset, len },
                    90..=94 => Op::WriteZeroes {
                        offset,
                        len,
                        unmap: rng.gen(),
                    },
                    _ => Op::Flush,
                }
            })
            .collect();
        batches.push(batch);
    }
    batches
}

/// What the client saw for one request: its result and, for a successful read, the data.
type Seen = (i32, Option<Vec<u8>>);

/// Runs `batches` on `q`, whose buffers are the [`QUEUE_MEM`] bytes at `base` of the region.
fn run_stream(q: &mut Queue<'_>, base: usize, batches: &[Vec<Op>]) -> Vec<Seen> {
    let mem = q.mem();
    let mut seen = Vec::new();
    for batch in batches {
        let reqs: Vec<Req> = batch
            .iter()
            .enumerate()
            .map(|(slot, op)| {
                let buf = base + slot * MAX_REQ;
                match op {
                    Op::Read { offset, len } => Req::Read {
                        offset: *offset,
                        buf,
                        len: *len,
                    },
                    Op::Write { offset, data } => {
                        mem.fill(buf, data);
                        Req::Write {
                            offset: *offset,
                            buf,
                            len: data.len(),
                        }
                    }
                    Op::Writev {
                        offset,
                        data,
                        split,
                    } => {
                        // The second segment sits at the end of the slot, apart from the first.
                        let (a, b) = data.split_at(*split);
                        let second = buf + MAX_REQ - b.len();
                        mem.fill(buf, a);
                        mem.fill(second, b);
                        Req::Writev {
                            offset: *offset,
                            segs: vec![(buf, a.len()), (second, b.len())],
                        }
                    }
                    Op::Discard { offset, len } => Req::Discard {
                        offset: *offset,
                        len: *len,
                    },
                    Op::WriteZeroes { offset, len, unmap } => Req::WriteZeroes {
                        offset: *offset,
                        len: *len,
                        unmap: *unmap,
                    },
                    Op::Flush => Req::Flush,
                }
            })
            .collect();
        let results = q.submit(&reqs);
        for ((slot, op), r) in batch.iter().enumerate().zip(results) {
            let data = match op {
                Op::Read { len, .. } if r == 0 => Some(mem.read(base + slot * MAX_REQ, *len)),
                _ => None,
            };
            seen.push((r, data));
        }
    }
    seen
}

/// Connects with one queue per stream and runs stream `i` on queue `i`, all queues at once.
fn drive(socket: &Path, streams: Vec<Vec<Vec<Op>>>) -> Vec<Vec<Seen>> {
    let socket = socket.to_owned();
    with_watchdog("blkio workload", WATCHDOG, move || {
        let n = streams.len();
        let opts = ClientOpts {
            queues: n,
            queue_size: 64,
            read_only: false,
            mem: n * QUEUE_MEM,
        };
        let mut client = Client::open(&socket, opts);
        let queues = client.queues();
        std::thread::scope(|s| {
            let handles: Vec<_> = queues
                .into_iter()
                .zip(&streams)
                .enumerate()
                .map(|(i, (mut q, batches))| {
                    s.spawn(move || run_stream(&mut q, i * QUEUE_MEM, batches))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a queue thread panicked"))
                .collect()
        })
    })
}

/// Writes the whole disk with seeded data in 1 MiB requests through a plain session, except
/// every fourth MiB, which stays unwritten (reads of it are zero extents).
fn fill_disk(dir: &Path, image: &Path, seed: u64, holes: bool) {
    let daemon = start_rr_row(dir, &ServeOpts::new(image, SIZE));
    let socket = daemon.socket().to_owned();
    with_watchdog("fill the disk", WATCHDOG, move || {
        let mut client = Client::open(
            &socket,
            ClientOpts {
                mem: 1 << 20,
                ..ClientOpts::default()
            },
        );
        let mut rng = StdRng::seed_from_u64(seed);
        let mut data = vec![0u8; 1 << 20];
        let mut q = client.queue(0);
        for mib in 0..SIZE >> 20 {
            if holes && mib % 4 == 3 {
                continue;
            }
            rng.fill_bytes(&mut data);
            q.write_ok(mib << 20, 0, &data);
        }
        q.flush_ok();
    });
    stop(daemon, libc::SIGTERM, 0);
}

/// Sends `signal` and asserts the exit code.
fn stop(daemon: Daemon, signal: i32, code: i32) {
    let log = daemon.log_text();
    let status = daemon.signal_and_wait(signal, EXIT_LIMIT);
    assert_eq!(
        status.code(),
        Some(code),
        "rr-row serve exited with {status}, expected code {code}; its log:\n{log}"
    );
}

fn serve_opts(image: &Path, queues: u16, extra: &[&str]) -> ServeOpts {
    let mut o = ServeOpts::new(image, SIZE);
    o.queues = queues;
    o.extra = extra.iter().map(|s| (*s).to_owned()).collect();
    o
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temporary paths are UTF-8")
}

/// The records of `log`, one JSON object each.
fn log_dump(log: &Path) -> Vec<serde_json::Value> {
    let (code, out, err) = rr_row(&[
        "log".as_ref(),
        "dump".as_ref(),
        arg(log),
        "--output".as_ref(),
        "json".as_ref(),
    ]);
    assert_eq!(code, 0, "rr-row log dump failed: {err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("a dump line is JSON"))
        .collect()
}

/// Records per queue, from `log info`.
/// Per queue, how many requests from index 0 on have a record with no gap: the prefix a replay
/// can follow. A killed or torn log loses a suffix of the log in time order, and the requests of
/// one queue run in parallel (`--io-threads`), so a lost suffix can leave a gap before indices
/// that were recorded.
fn replayable_prefix(log: &Path, queues: u16) -> Vec<usize> {
    let idx = rr_row::record::ReplayIndex::open(log).expect("the log indexes");
    (0..queues)
        .map(|q| {
            (0u64..)
                .take_while(|&i| idx.get(q, (0, i, 0)).is_some())
                .count()
        })
        .collect()
}

fn records_per_queue(info: &serde_json::Value) -> BTreeMap<u64, u64> {
    info["queues"]
        .as_array()
        .expect("queues array")
        .iter()
        .map(|q| (q["queue"].as_u64().unwrap(), q["records"].as_u64().unwrap()))
        .collect()
}

fn assert_same(recorded: &[Vec<Seen>], replayed: &[Vec<Seen>]) {
    assert_eq!(recorded.len(), replayed.len());
    for (q, (a, b)) in recorded.iter().zip(replayed).enumerate() {
        assert_eq!(a.len(), b.len(), "queue {q}: number of requests");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert_eq!(x.0, y.0, "queue {q} request {i}: result differs");
            assert!(
                x.1 == y.1,
                "queue {q} request {i}: the replayed read returned other bytes than recorded"
            );
        }
    }
}

/// The requests of all streams, queue by queue, in order (as `drive` returns their results).
fn streams_ops(streams: &[Vec<Vec<Op>>]) -> impl Iterator<Item = &Op> {
    streams.iter().flatten().flatten()
}

/// Takes the first `n` requests of a batched stream, keeping the batch boundaries.
fn prefix(batches: &[Vec<Op>], n: usize) -> Vec<Vec<Op>> {
    let mut left = n;
    let mut out = Vec::new();
    for b in batches {
        if left == 0 {
            break;
        }
        let take = b.len().min(left);
        out.push(b[..take].to_vec());
        left -= take;
    }
    out
}

#[test]
fn a_recorded_run_replays_byte_for_byte_after_the_disk_was_overwritten() {
    let (_, ring) = recorded_run_replays_after_overwrite(&[]);
    assert_eq!(ring, 0, "buffered: no ring");
}

#[test]
fn a_recorded_direct_run_replays_byte_for_byte_after_the_disk_was_overwritten() {
    // With --direct the recorder's reads are batched: in flight on the queue's io_uring ring
    // (each recorded when its transfers are in, with the extents and seq its plan resolved),
    // or, for those relocation on read takes, read together by one read_many.
    let (batched, ring) = recorded_run_replays_after_overwrite(&["--direct"]);
    assert!(batched > 100, "only {batched} reads were batched");
    assert!(ring > 20, "only {ring} batches put reads on the ring");
}

#[test]
fn a_recorded_direct_run_without_the_ring_replays_byte_for_byte() {
    // `--ring-reads off`: the recorder's batched reads all go through read_many.
    let (batched, ring) =
        recorded_run_replays_after_overwrite(&["--direct", "--ring-reads", "off"]);
    assert!(batched > 100, "only {batched} reads went through read_many");
    assert_eq!(ring, 0);
}

/// Records a mixed two-queue workload with `serve --record` (and `record_extra`), overwrites
/// the disk in a plain session, replays it and compares; returns how many reads the recorder
/// logged as batched, and how many batches put reads on a queue's io_uring ring.
fn recorded_run_replays_after_overwrite(record_extra: &[&str]) -> (usize, usize) {
    let dir = tempdir();
    let d = dir.path();
    let image = d.join("disk.rrow");
    let log = d.join("run.log");
    fill_disk(d, &image, 1, true);

    // Record.
    let streams = vec![stream(100, 400), stream(101, 400)];
    let mut args = vec!["--record", path_str(&log)];
    args.extend_from_slice(record_extra);
    let mut opts = serve_opts(&image, 2, &args);
    // The batched path logs each request it prepares at debug level, the worker each batch
    // that put reads on its ring.
    opts.rust_log =
        Some("info,rr_row::virtio_blk::execute=debug,rr_row::vhost_user::backend=debug");
    let daemon = start_rr_row(d, &opts);
    let recorded = drive(daemon.socket(), streams.clone());
    let batched = daemon.batched_requests(": read sector");
    let ring = daemon
        .log_text()
        .lines()
        .filter(|l| l.contains("reads on the ring") && !l.contains(": 0 reads"))
        .count();
    stop(daemon, libc::SIGTERM, 0);
    let reads_ok = recorded
        .iter()
        .flatten()
        .filter(|(r, data)| *r == 0 && data.is_some())
        .count();
    assert!(reads_ok > 300, "only {reads_ok} successful reads");
    assert!(
        recorded.iter().flatten().all(|(r, _)| *r == 0),
        "every request of the workload is valid and must succeed"
    );

    // The log counts what was sent.
    let info = log_info(&log);
    let sent: Vec<&Op> = streams.iter().flatten().flatten().collect();
    assert_eq!(info["records"].as_u64(), Some(sent.len() as u64), "{info}");
    assert_eq!(info["header"]["mode"], "block-id");
    assert!(info["torn_tail"].is_null(), "{info}");
    assert!(info["damage"].is_null(), "{info}");
    let mut by_kind: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    for op in &sent {
        let len = match op {
            Op::Read { len, .. } => *len as u64,
            Op::Write { data, .. } | Op::Writev { data, .. } => data.len() as u64,
            Op::Discard { len, .. } | Op::WriteZeroes { len, .. } => *len,
            Op::Flush => 0,
        };
        let e = by_kind.entry(op.kind()).or_default();
        e.0 += 1;
        e.1 += len;
    }
    let kinds = info["kinds"].as_object().expect("kinds");
    assert_eq!(
        kinds.keys().map(String::as_str).collect::<Vec<_>>(),
        by_kind.keys().copied().collect::<Vec<_>>(),
        "{info}"
    );
    for (kind, (count, bytes)) in &by_kind {
        let k = &kinds[*kind];
        assert_eq!(k["count"].as_u64(), Some(*count), "{kind}: {info}");
        assert_eq!(k["failed"].as_u64(), Some(0), "{kind}: {info}");
        assert_eq!(k["request_bytes"].as_u64(), Some(*bytes), "{kind}: {info}");
    }
    assert_eq!(
        records_per_queue(&info),
        BTreeMap::from([(0, 400), (1, 400)]),
        "{info}"
    );
    // Block-id mode: the log is a small fraction of the data read.
    let read_bytes = by_kind["read"].1;
    let file_bytes = info["file_bytes"].as_u64().unwrap();
    assert!(
        file_bytes * 20 < read_bytes,
        "a {file_bytes}-byte log for {read_bytes} bytes read"
    );

    // A later plain session overwrites the whole disk.
    fill_disk(d, &image, 2, false);
    let seq = image_seq(&image);
    let before = export(&image, &d.join("before.raw"));

    // Replay the same request stream.
    let daemon = start_rr_row(d, &serve_opts(&image, 2, &["--replay", path_str(&log)]));
    let streams_copy = streams.clone();
    let replayed = drive(daemon.socket(), streams);
    let text = daemon.log_text();
    stop(daemon, libc::SIGTERM, 0);
    assert_same(&recorded, &replayed);
    // ... which is not what the live disk holds now: the data came from the history.
    let stale = streams_ops(&streams_copy)
        .zip(replayed.iter().flatten())
        .filter(|(op, (_, data))| match (op, data) {
            (Op::Read { offset, len }, Some(d)) => {
                let at = *offset as usize;
                d[..] != before[at..at + len]
            }
            _ => false,
        })
        .count();
    assert!(
        stale * 10 > reads_ok * 9,
        "only {stale} of {reads_ok} replayed reads differ from the overwritten disk"
    );
    assert!(
        !text.contains("diverged"),
        "a clean replay logged a divergence:\n{text}"
    );

    // The replay left the image as it was.
    assert_eq!(image_seq(&image), seq, "the replay changed the image's seq");
    assert!(
        export(&image, &d.join("after.raw")) == before,
        "the replay changed the disk's content"
    );
    let (code, out, err) = rr_row(&["check".as_ref(), arg(&image)]);
    assert_eq!(code, 0, "rr-row check after the replay: {out}{err}");
    (batched, ring)
}

#[test]
fn a_divergent_stream_exits_2_and_names_the_request() {
    let dir = tempdir();
    let d = dir.path();
    let image = d.join("disk.rrow");
    let log = d.join("run.log");
    fill_disk(d, &image, 1, true);
    let recorded_stream = stream(7, 120);
    // One request thread: the divergent request is then the exact point where the replay stops
    // (with several, requests of the same batch run concurrently with it and may complete).
    let daemon = start_rr_row(
        d,
        &serve_opts(
            &image,
            1,
            &["--record", path_str(&log), "--io-threads", "1"],
        ),
    );
    let recorded = drive(daemon.socket(), vec![recorded_stream.clone()]);
    stop(daemon, libc::SIGTERM, 0);
    fill_disk(d, &image, 2, false);

    // Request k of the replayed stream reads 8 sectors further on than recorded.
    let k = 77;
    let ops: Vec<Op> = recorded_stream.iter().flatten().cloned().collect();
    let k = (k..ops.len())
        .find(|&i| matches!(ops[i], Op::Read { offset, len } if offset + len as u64 + 4096 <= SIZE))
        .expect("a read after request 77");
    let mut divergent = recorded_stream.clone();
    let mut i = 0;
    for b in &mut divergent {
        for op in b.iter_mut() {
            if i == k {
                if let Op::Read { offset, .. } = op {
                    *offset += 4096;
                }
            }
            i += 1;
        }
    }
    let records = log_dump(&log);
    assert_eq!(records.len(), ops.len());
    let k_index = records[k]["index"].as_u64().expect("record index");
    let k_sector = records[k]["sector"].as_u64().expect("record sector");

    let daemon = start_rr_row(
        d,
        &serve_opts(
            &image,
            1,
            &["--replay", path_str(&log), "--io-threads", "1"],
        ),
    );
    let replayed = drive(daemon.socket(), vec![divergent]);
    let text = daemon.log_text();
    stop(daemon, libc::SIGTERM, 2);
    assert_same(&[recorded[0][..k].to_vec()], &[replayed[0][..k].to_vec()]);
    for (i, (r, _)) in replayed[0].iter().enumerate().skip(k) {
        assert_eq!(*r, EIO, "request {i} at or after the divergence must fail");
    }
    let line = text
        .lines()
        .find(|l| l.contains("replay diverged at"))
        .unwrap_or_else(|| panic!("no divergence in the daemon's log:\n{text}"));
    assert!(
        line.contains(&format!("queue 0 request {k_index}:")),
        "divergence reported at the wrong request (expected index {k_index}): {line}"
    );
    assert!(
        line.contains(&format!("sector={k_sector} "))
            && line.contains(&format!("sector={} ", k_sector + 8)),
        "the report must show both versions: {line}"
    );
    assert_eq!(
        text.matches("replay diverged at").count(),
        1,
        "one divergence, then the replay stopped:\n{text}"
    );
}

/// Runs `rr-row serve --replay LOG`, which must fail at start with a one-line error naming the
/// log: returns that line.
fn replay_refused_line(dir: &Path, image: &Path, log: &Path) -> String {
    let err = replay_refused(dir, image, log);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "expected a one-line error for {}, got:\n{err}",
        log.display()
    );
    assert!(lines[0].starts_with("rr-row: "), "{err}");
    assert!(
        lines[0].contains(path_str(log)),
        "the error names the log: {err}"
    );
    lines[0].to_owned()
}

#[test]
fn a_damaged_log_is_refused_before_serving() {
    let dir = tempdir();
    let d = dir.path();
    let image = d.join("disk.rrow");
    let log = d.join("run.log");
    fill_disk(d, &image, 1, true);
    // Flushes end frames: many frames, so one can be damaged in the middle.
    let batches: Vec<Vec<Op>> = stream(9, 300)
        .into_iter()
        .flat_map(|b| [b, vec![Op::Flush]])
        .collect();
    let daemon = start_rr_row(d, &serve_opts(&image, 1, &["--record", path_str(&log)]));
    drive(daemon.socket(), vec![batches]);
    stop(daemon, libc::SIGTERM, 0);
    let bytes = std::fs::read(&log).expect("the log");
    let info = log_info(&log);
    assert!(info["frames"].as_u64().unwrap() > 10, "{info}");

    let variant = |name: &str, data: &[u8]| -> PathBuf {
        let p = d.join(name);
        std::fs::write(&p, data).expect("write a damaged log");
        p
    };
    // Cut inside the 80-byte header.
    let e = replay_refused_line(d, &image, &variant("cut.log", &bytes[..40]));
    assert!(e.contains("truncated"), "{e}");
    // A flipped bit in the header.
    let mut h = bytes.clone();
    h[45] ^= 0x10;
    let e = replay_refused_line(d, &image, &variant("header.log", &h));
    assert!(e.contains("checksum") || e.contains("crc"), "{e}");
    // A flipped bit in the payload of a frame in the middle.
    let mid = frame_offsets(&bytes)[5];
    let mut m = bytes.clone();
    m[mid + 12] ^= 0x01;
    let e = replay_refused_line(d, &image, &variant("middle.log", &m));
    assert!(e.contains(&format!("byte {mid}")), "{e}");
    // Not a log at all.
    let e = replay_refused_line(d, &image, &variant("zeros.log", &[0u8; 4096]));
    assert!(e.contains("not an RR-Row record log"), "{e}");
    // A log of another image.
    let other = d.join("other.rrow");
    let (code, o, e) = rr_row(&[
        "create".as_ref(),
        arg(&other),
        "--size".as_ref(),
        "32M".as_ref(),
    ]);
    assert_eq!(code, 0, "{o}{e}");
    let e = replay_refused_line(d, &other, &log);
    assert!(e.contains("not on this image"), "{e}");

    // The intact log still replays (nothing above changed it).
    assert_eq!(std::fs::read(&log).expect("the log"), bytes);
}

/// Byte offsets of the log's frames (80-byte header, then `len:u32 crc:u32 payload`).
fn frame_offsets(log: &[u8]) -> Vec<usize> {
    let mut v = Vec::new();
    let mut off = 80;
    while off + 8 <= log.len() {
        v.push(off);
        let len = u32::from_le_bytes(log[off..off + 4].try_into().expect("4 bytes")) as usize;
        off += 8 + len;
    }
    v
}

#[test]
fn a_killed_recorder_leaves_a_replayable_prefix() {
    let dir = tempdir();
    let d = dir.path();
    let image = d.join("disk.rrow");
    let log = d.join("run.log");
    fill_disk(d, &image, 1, true);

    // Flushed work, then a tail of unflushed requests, then SIGKILL.
    let mut streams = vec![stream(21, 300), stream(22, 300)];
    for (q, s) in streams.iter_mut().enumerate() {
        s.push(vec![Op::Flush]);
        s.extend(
            stream(1000 + q as u64, 40)
                .into_iter()
                .map(|b| b.into_iter().filter(|o| !matches!(o, Op::Flush)).collect())
                .filter(|b: &Vec<Op>| !b.is_empty()),
        );
    }
    let sent: Vec<usize> = streams.iter().map(|s| s.iter().flatten().count()).collect();
    let daemon = start_rr_row(d, &serve_opts(&image, 2, &["--record", path_str(&log)]));
    let recorded = drive(daemon.socket(), streams.clone());
    let status = daemon.signal_and_wait(libc::SIGKILL, EXIT_LIMIT);
    assert_eq!(
        status.code(),
        None,
        "the recorder survived SIGKILL: {status}"
    );

    // Everything up to each queue's flush is there; the rest may be lost, never reordered.
    let info = log_info(&log);
    assert!(info["damage"].is_null(), "{info}");
    let per_queue = records_per_queue(&info);
    let prefixes = replayable_prefix(&log, 2);
    for q in 0..streams.len() {
        // The requests before the final flush, which completed only once they were synced.
        let flushed = 300;
        let have = per_queue.get(&(q as u64)).copied().unwrap_or(0) as usize;
        assert!(
            (flushed..=sent[q]).contains(&have),
            "queue {q}: {have} records, {sent:?} sent: {info}"
        );
        assert!(
            (flushed..=have).contains(&prefixes[q]),
            "queue {q}: replayable prefix {} of {have} records: {info}",
            prefixes[q]
        );
    }
    replay_prefix(d, &image, &log, &streams, &recorded, &prefixes);

    // A power cut inside the last frame: the torn tail is dropped, the rest replays.
    let bytes = std::fs::read(&log).expect("the log");
    let last = *frame_offsets(&bytes).last().expect("frames");
    let cut = d.join("cut.log");
    std::fs::write(&cut, &bytes[..last + 20.min(bytes.len() - last - 1)]).expect("write");
    let info = log_info(&cut);
    assert!(!info["torn_tail"].is_null(), "{info}");
    let prefixes = replayable_prefix(&cut, 2);
    assert!(prefixes.iter().sum::<usize>() > 0, "{info}");
    replay_prefix(d, &image, &cut, &streams, &recorded, &prefixes);
}

/// Overwrites the disk, then replays the first `prefixes[q]` requests of each queue's stream
/// from `log`: they must see what was recorded, and the daemon must exit 0.
fn replay_prefix(
    d: &Path,
    image: &Path,
    log: &Path,
    streams: &[Vec<Vec<Op>>],
    recorded: &[Vec<Seen>],
    prefixes: &[usize],
) {
    fill_disk(d, image, 3, false);
    let replay: Vec<Vec<Vec<Op>>> = streams
        .iter()
        .zip(prefixes)
        .map(|(s, &n)| prefix(s, n))
        .collect();
    let daemon = start_rr_row(d, &serve_opts(image, 2, &["--replay", path_str(log)]));
    let replayed = drive(daemon.socket(), replay);
    // Records past a gap (requests that ran in parallel with a lost one) are not replayed, and
    // a replay that leaves records unreplayed exits 2.
    let records = log_info(log)["records"].as_u64().expect("record count");
    let code = if prefixes.iter().sum::<usize>() as u64 == records {
        0
    } else {
        2
    };
    stop(daemon, libc::SIGTERM, code);
    let expected: Vec<Vec<Seen>> = recorded
        .iter()
        .zip(prefixes)
        .map(|(r, &n)| r[..n].to_vec())
        .collect();
    assert_same(&expected, &replayed);
}

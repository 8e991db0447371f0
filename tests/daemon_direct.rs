//! `rr-row serve --direct` (O_DIRECT data I/O) driven through its vhost-user socket by the
//! `blkio` crate: random 4 KiB and 128 KiB writes from aligned and unaligned guest buffers,
//! multi-segment requests with sub-sector boundaries, sub-block writes, discard, write-zeroes
//! and flush, all checked against a model; SIGTERM, `rr-row check` clean, reopen and verify.
//! Batches of reads and writes against a model, with `--direct` and (for the batched writes)
//! without.
//! Also the refusals: a filesystem without O_DIRECT and a block size below the page size.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::blk::{Client, ClientOpts, Queue, Req};
use common::daemon::{start_rr_row, Daemon, ServeOpts};
use common::with_watchdog;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Virtual disk size.
const SIZE: u64 = 32 << 20;
/// Watchdog for one client session.
const SESSION: Duration = Duration::from_secs(120);

fn serve_direct(dir: &Path, image: &Path) -> Daemon {
    let opts = ServeOpts {
        extra: vec!["--direct".into()],
        ..ServeOpts::new(image, SIZE)
    };
    start_rr_row(dir, &opts)
}

/// Places `len` bytes in 1..=3 segments at buffer offsets that are sometimes odd (not
/// aligned for O_DIRECT), with boundaries that are sometimes not multiples of 512.
fn segments(rng: &mut StdRng, len: usize) -> Vec<(usize, usize)> {
    let n = rng.gen_range(1..=3usize).min(len / 512);
    let mut cuts: Vec<usize> = (1..n)
        .map(|_| {
            if rng.gen_bool(0.5) {
                rng.gen_range(1..len / 512) * 512
            } else {
                rng.gen_range(1..len)
            }
        })
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut segs = Vec::new();
    let mut prev = 0;
    for (i, &c) in cuts.iter().chain(std::iter::once(&len)).enumerate() {
        let misalign = match rng.gen_range(0..4) {
            0 => 0,
            1 => 512,
            _ => rng.gen_range(1..4096),
        };
        // 1 MiB apart: segments never overlap.
        segs.push((i * (1 << 20) + misalign, c - prev));
        prev = c;
    }
    segs
}

/// Random 4 KiB and 128 KiB writes (some sub-block) and reads, checked against `model`.
fn random_io(q: &mut Queue<'_>, model: &mut [u8], rng: &mut StdRng, ops: usize) {
    for op in 0..ops {
        let len = match rng.gen_range(0..10) {
            0..=4 => 4096,
            5..=7 => 128 << 10,
            _ => rng.gen_range(1..=16usize) * 512,
        };
        let align = if len % 4096 == 0 && rng.gen_bool(0.8) {
            4096
        } else {
            512
        };
        let offset = rng.gen_range(0..(SIZE - len as u64) / align) * align;
        let segs = segments(rng, len);
        if rng.gen_bool(0.6) {
            q.writev_random(rng, model, offset, &segs, op);
        } else {
            q.readv_check(model, offset, &segs, op);
        }
    }
}

/// Reads the whole disk in 256 KiB pieces (from an odd buffer every other time) and compares.
fn verify_all(q: &mut Queue<'_>, model: &[u8]) {
    let step = 256 << 10;
    for (i, off) in (0..SIZE).step_by(step).enumerate() {
        let buf = if i % 2 == 0 { 0 } else { 3 };
        let got = q.read_ok(off, buf, step);
        let o = off as usize;
        assert!(
            got == model[o..o + step],
            "disk bytes {off}..{} differ from the model",
            off + step as u64
        );
    }
}

fn connect(socket: &Path) -> Client {
    Client::open(socket, ClientOpts::default())
}

#[test]
fn serve_direct_random_io_discard_flush_sigterm_check_reopen() {
    let dir = common::tempdir();
    let image: PathBuf = dir.path().join("disk.rrow");
    let d = serve_direct(dir.path(), &image);
    let socket = d.socket().to_owned();
    let model = with_watchdog("direct random I/O", SESSION, move || {
        let mut c = connect(&socket);
        let mut q = c.queue(0);
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = StdRng::seed_from_u64(5);
        random_io(&mut q, &mut model, &mut rng, 300);
        // Discard and write-zeroes over written data, whole and partial blocks.
        q.write_ok(1 << 20, 0, &vec![0x5a; 256 << 10]);
        model[1 << 20..(1 << 20) + (256 << 10)].fill(0x5a);
        q.discard_ok((1 << 20) + 4096, 64 << 10);
        model[(1 << 20) + 4096..(1 << 20) + 4096 + (64 << 10)].fill(0);
        q.write_zeroes_ok((1 << 20) + (128 << 10) + 512, 1024, false);
        let z = (1 << 20) + (128 << 10) + 512;
        model[z..z + 1024].fill(0);
        q.flush_ok();
        random_io(&mut q, &mut model, &mut rng, 100);
        q.flush_ok();
        verify_all(&mut q, &model);
        model
    });
    assert!(
        d.log_text().contains("data blocks use direct I/O"),
        "the daemon did not say it uses direct I/O:\n{}",
        d.log_text()
    );
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(
        status.success(),
        "rr-row serve exited with {status} on SIGTERM"
    );
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&image)]);
    assert_eq!(code, 0, "rr-row check after SIGTERM: {out}{err}");

    // Reopened, with direct I/O again: every byte is there.
    let d = serve_direct(dir.path(), &image);
    let socket = d.socket().to_owned();
    with_watchdog("direct reopen", SESSION, move || {
        let mut c = connect(&socket);
        let mut q = c.queue(0);
        verify_all(&mut q, &model);
    });
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(
        status.success(),
        "rr-row serve exited with {status} on SIGTERM"
    );
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&image)]);
    assert_eq!(code, 0, "rr-row check after the second run: {out}{err}");
}

#[test]
fn batches_of_reads_beside_writes_match_the_model() {
    // With --direct a queue's worker hands the reads of a batch to the image together (one
    // io_uring submission for all their extents). Batches of 32: 24 reads of fragmented data
    // (sub-block offsets, odd buffers that are bounced) beside 8 writes to the other half of
    // the disk. A batch is what the worker finds published when it looks: usually the whole
    // 32, but a read that arrives alone is read alone. Most must have gone through read_many.
    // With --direct the worker is pipelined by default: it hands batches to the request
    // threads and does not wait for them.
    let b = mixed_batches(21, 8, &["--direct"]);
    assert!(
        b.reads >= 24 * 30 / 2,
        "only {} of 720 reads went through read_many",
        b.reads
    );
    assert!(b.handed >= 15, "only {} batches handed over", b.handed);
    assert!(b.pipelined);
    // Pipelined, the reads of few extents go on the queue's io_uring ring (the others, and
    // the fragmented ones relocation on read takes, to the request threads).
    assert!(
        b.ring >= 15,
        "only {} batches put reads on the ring",
        b.ring
    );
}

#[test]
fn direct_reads_without_the_ring_match_the_model() {
    // `--ring-reads off`: every read goes to the request threads.
    let b = mixed_batches(26, 8, &["--direct", "--ring-reads", "off"]);
    assert!(b.reads >= 24 * 30 / 2, "only {} batched reads", b.reads);
    assert!(b.pipelined);
    assert_eq!(b.ring, 0, "--ring-reads off puts no read on the ring");
}

#[test]
fn batches_of_writes_beside_reads_match_the_model() {
    // And its writes, in one submission too: batches of 32, 24 writes (mostly whole aligned
    // blocks from aligned buffers, which go to the ring together; some sub-block or from odd
    // buffers, which go alone) beside 8 reads of fragmented data.
    let b = mixed_batches(22, 24, &["--direct"]);
    assert!(
        b.writes >= 24 * 30 / 4,
        "only {} of 720 writes went through write_many",
        b.writes
    );
}

#[test]
fn buffered_batches_of_writes_beside_reads_match_the_model() {
    // Without --direct too, a batch's writes go to the image together (one pwritev per run
    // of adjacent new blocks); its reads do not (the pool's threads read the page cache
    // faster in parallel).
    let b = mixed_batches(23, 24, &[]);
    assert_eq!(b.reads, 0, "buffered reads are not batched");
    assert!(
        b.writes >= 24 * 30 / 4,
        "only {} of 720 writes went through write_many",
        b.writes
    );
    assert_eq!(b.handed, 0, "not pipelined without --direct");
    assert!(!b.pipelined);
}

#[test]
fn pipelined_buffered_batches_match_the_model() {
    // `--pipeline on` without --direct: the batches' writes go to write_many as above, and
    // the worker hands each batch over instead of waiting for it.
    let b = mixed_batches(24, 16, &["--pipeline", "on"]);
    assert!(b.writes >= 16 * 30 / 8, "only {} batched writes", b.writes);
    assert!(b.handed >= 15, "only {} batches handed over", b.handed);
    assert!(b.pipelined);
}

#[test]
fn direct_batches_without_the_pipeline_match_the_model() {
    // `--direct --pipeline off`: the worker waits for each batch, as before the pipeline.
    let b = mixed_batches(25, 8, &["--direct", "--pipeline", "off"]);
    assert!(b.reads >= 24 * 30 / 2, "only {} batched reads", b.reads);
    assert_eq!(b.handed, 0, "--pipeline off hands nothing over");
    assert!(!b.pipelined);
    assert_eq!(b.ring, 0, "not pipelined: no read on the ring");
}

#[test]
fn two_queues_writing_one_request_at_a_time_match_the_model() {
    // One request in flight per queue, two queues at once: each write is a batch of its own,
    // and a write that finds the other queue's write in flight goes through the ring instead
    // of pwritev (Shared::write_data). Each queue owns half of the disk; flushes now and then,
    // and some writes from odd buffers (bounced) or of partial blocks.
    let dir = common::tempdir();
    let image: PathBuf = dir.path().join("two.rrow");
    let opts = ServeOpts {
        extra: vec!["--direct".into()],
        queues: 2,
        ..ServeOpts::new(&image, SIZE)
    };
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    with_watchdog("two queues, direct", SESSION, move || {
        let mut c = Client::open(
            &socket,
            ClientOpts {
                queues: 2,
                ..ClientOpts::default()
            },
        );
        let half = SIZE / 2;
        let halves: Vec<Vec<u8>> = c.on_each_queue(|i, mut q| {
            let mut model = vec![0u8; half as usize];
            let mut rng = StdRng::seed_from_u64(40 + i as u64);
            let window = i * (4 << 20);
            for op in 0..600 {
                let (len, unit) = if rng.gen_bool(0.9) {
                    (rng.gen_range(1..=4usize) * 4096, 4096)
                } else {
                    (rng.gen_range(1..=8usize) * 512, 512)
                };
                let off = rng.gen_range(0..(half - len as u64) / unit) * unit;
                let buf = window + if rng.gen_bool(0.2) { 100 } else { 0 };
                let mut data = vec![0u8; len];
                rng.fill_bytes(&mut data);
                q.write_ok(i as u64 * half + off, buf, &data);
                model[off as usize..off as usize + len].copy_from_slice(&data);
                if op % 100 == 99 {
                    q.flush_ok();
                }
            }
            model
        });
        verify_all(&mut c.queue(0), &halves.concat());
    });
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "rr-row serve exited with {status}");
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&image)]);
    assert_eq!(code, 0, "rr-row check: {out}{err}");
}

/// Serves a fresh image (with `--direct` if `direct`), fragments it, then runs 30 batches of
/// 32 requests, `writes` of them writes (each in a slot of its own on one half of the disk:
/// requests in flight have no order) and the rest reads of the other half, all checked
/// against a model;
/// then verifies the whole disk, stops the daemon with SIGTERM and checks the image. Returns
/// what the daemon logged.
fn mixed_batches(seed: u64, writes: usize, extra: &[&str]) -> Batched {
    let dir = common::tempdir();
    let image: PathBuf = dir.path().join("batch.rrow");
    let opts = ServeOpts {
        extra: extra.iter().map(|a| (*a).into()).collect(),
        // The batched path logs each request it prepares at debug level, and the worker each
        // batch it hands over.
        rust_log: Some("info,rr_row::virtio_blk::execute=debug,rr_row::vhost_user::backend=debug"),
        ..ServeOpts::new(&image, SIZE)
    };
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    with_watchdog("direct batches", SESSION, move || {
        let mut c = connect(&socket);
        let mem = c.mem();
        let mut q = c.queue(0);
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = StdRng::seed_from_u64(seed);
        for op in 0..1500 {
            let off = rng.gen_range(0..SIZE / 4096) * 4096;
            q.writev_random(&mut rng, &mut model, off, &[(0, 4096)], op);
        }
        let half = SIZE / 2;
        let slot = half / writes as u64 / 4096 * 4096;
        // Writes whole aligned blocks this often (else at a 512-byte offset).
        let whole = if writes > 8 { 0.8 } else { 0.1 };
        for round in 0..30u64 {
            let (rbase, wbase) = if round % 2 == 0 { (0, half) } else { (half, 0) };
            let mut reqs = Vec::new();
            let mut written = Vec::new();
            for k in 0..32usize {
                let odd = if rng.gen_bool(0.3) {
                    rng.gen_range(1..4096)
                } else {
                    0
                };
                let buf = k * (256 << 10) + odd;
                // Writes spread over the batch.
                let w = k * writes / 32;
                if (k + 1) * writes / 32 > w {
                    let len = rng.gen_range(1..=16usize) * 4096;
                    let unit = if rng.gen_bool(whole) { 4096 } else { 512 };
                    let off = wbase
                        + w as u64 * slot
                        + rng.gen_range(0..(slot - len as u64) / unit) * unit;
                    let mut data = vec![0u8; len];
                    rng.fill_bytes(&mut data);
                    mem.fill(buf, &data);
                    reqs.push(Req::Write {
                        offset: off,
                        buf,
                        len,
                    });
                    written.push((off as usize, data));
                } else {
                    let len = rng.gen_range(1..=128usize) * 512;
                    let off = rbase + rng.gen_range(0..(half - len as u64) / 512) * 512;
                    mem.fill(buf, &vec![0xa5; len]);
                    reqs.push(Req::Read {
                        offset: off,
                        buf,
                        len,
                    });
                }
            }
            assert_eq!(written.len(), writes);
            let res = q.submit(&reqs);
            assert!(res.iter().all(|&r| r == 0), "round {round}: {res:?}");
            for (k, r) in reqs.iter().enumerate() {
                if let Req::Read { offset, buf, len } = *r {
                    let o = offset as usize;
                    assert!(
                        mem.read(buf, len) == model[o..o + len],
                        "round {round}, request {k}: read {len} at {offset} differs"
                    );
                }
            }
            for (off, data) in written {
                model[off..off + data.len()].copy_from_slice(&data);
            }
        }
        verify_all(&mut q, &model);
    });
    let counts = Batched {
        reads: d.batched_requests(": read sector"),
        writes: d.batched_requests(": write sector"),
        handed: d
            .log_text()
            .lines()
            .filter(|l| l.contains("handed to the request threads"))
            .count(),
        pipelined: d.serves_pipelined(),
        ring: d
            .log_text()
            .lines()
            .filter(|l| l.contains("reads on the ring") && !l.contains(": 0 reads"))
            .count(),
    };
    eprintln!("{counts:?}");
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "rr-row serve exited with {status}");
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&image)]);
    assert_eq!(code, 0, "rr-row check: {out}{err}");
    counts
}

/// What [`mixed_batches`]'s daemon logged: reads and writes that went through `read_many` and
/// `write_many`, and batches its worker handed over without waiting (`--pipeline`).
#[derive(Debug)]
struct Batched {
    reads: usize,
    writes: usize,
    handed: usize,
    /// The daemon said it serves pipelined queues when it started.
    pipelined: bool,
    /// Batches whose worker put reads on the queue's io_uring ring.
    ring: usize,
}

/// Runs `rr-row serve --direct ARGS` expecting it to fail before listening; returns stderr.
fn serve_fails(dir: &Path, args: &[&str]) -> String {
    let socket = dir.join("never.sock");
    let out = std::process::Command::new(common::rr_row_bin())
        .arg("serve")
        .arg("--direct")
        .arg("--socket")
        .arg(&socket)
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("cannot run rr-row");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "rr-row serve {args:?}: {err}");
    assert!(
        !socket.exists(),
        "the daemon listened although the open failed"
    );
    err
}

/// procfs refuses O_DIRECT on every kernel (tmpfs, e.g. /dev/shm, accepts it since Linux
/// 6.6, so it no longer serves for this test); the direct descriptor is opened before the
/// header is read, so the refusal is what `serve` reports.
#[test]
fn serve_direct_on_a_filesystem_without_o_direct_fails_cleanly() {
    let dir = common::tempdir();
    let err = serve_fails(dir.path(), &["--read-only", "--image", "/proc/version"]);
    assert!(
        err.contains("/proc/version") && err.contains("O_DIRECT") && err.contains("drop --direct"),
        "unclear error: {err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
}

#[test]
fn serve_direct_refuses_blocks_smaller_than_a_page() {
    let dir = common::tempdir();
    let image = dir.path().join("small.rrow");
    let err = serve_fails(
        dir.path(),
        &[
            "--image",
            image.to_str().unwrap(),
            "--size",
            "1M",
            "--block-size",
            "512",
        ],
    );
    assert!(
        err.contains("small.rrow") && err.contains("block size") && err.contains("--direct"),
        "unclear error: {err}"
    );
    // The image was created and is fine without --direct.
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&image)]);
    assert_eq!(code, 0, "rr-row check: {out}{err}");
}

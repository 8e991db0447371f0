//! The daemon's performance features, end to end through a blkio frontend: completed writes
//! survive SIGKILL without a flush (the journal is written out at the end of every batch),
//! fragmented data read back through the daemon is relocated without changing what it reads,
//! an idle daemon defragments the disk on its own (`--defrag-idle-ms`), and batches run on several request threads per queue (`--io-threads`) match a model.

mod common;

use std::time::Duration;

use common::blk::{Client, ClientOpts, Req};
use common::daemon::{start_rr_row, ServeOpts};
use common::with_watchdog;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rr_row::image::{Extent, Image, OpenMode};
use rr_row::units::Lba;

const SIZE: u64 = 16 << 20;
const CHUNK: usize = 256 << 10;
const LIMIT: Duration = Duration::from_secs(120);

#[test]
fn sigkill_keeps_every_completed_write_without_a_flush() {
    sigkill_keeps_completed_writes(&[]);
}

/// The same with `O_DIRECT` data and two queues, writing from both: the journal's records go
/// out through its mapped segment while the other queue's direct writes are in flight.
#[test]
fn sigkill_keeps_every_completed_direct_write_without_a_flush() {
    sigkill_keeps_completed_writes(&["--direct"]);
}

fn sigkill_keeps_completed_writes(extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("k.rrow");
    let mut opts = ServeOpts::new(&image, SIZE);
    opts.queues = 2;
    opts.extra = extra.iter().map(|s| s.to_string()).collect();
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    // Written and completed, never flushed; the connection stays open until the kill, so the
    // daemon has no disconnect on which it would flush.
    let (data, client) = with_watchdog("unflushed writes", LIMIT, move || {
        let mut c = Client::open(
            &socket,
            ClientOpts {
                queues: 2,
                ..ClientOpts::default()
            },
        );
        let mut data = vec![0u8; 4 << 20];
        StdRng::seed_from_u64(1).fill_bytes(&mut data);
        // Both queues at once: even chunks on queue 0, odd ones on queue 1, each from a
        // buffer window of its own.
        c.on_each_queue(|qi, mut q| {
            for (i, chunk) in data.chunks(CHUNK).enumerate().skip(qi).step_by(2) {
                q.write_ok((i * CHUNK) as u64, qi * CHUNK, chunk);
            }
        });
        let mut q = c.queue(0);
        // And sub-block writes, which take the read-modify-write path.
        for i in 0..64u64 {
            let off = i * 8192 + 512;
            let v = vec![i as u8 + 1; 1024];
            q.write_ok(off, 0, &v);
            data[off as usize..off as usize + 1024].copy_from_slice(&v);
        }
        (data, c)
    });
    let status = d.signal_and_wait(libc::SIGKILL, Duration::from_secs(20));
    assert!(!status.success());
    drop(client);

    let img = Image::open(&image, OpenMode::ReadOnly).unwrap();
    let mut got = vec![0u8; data.len()];
    img.read_at(0, &mut got).unwrap();
    assert!(got == data, "a completed write was lost to SIGKILL");
    drop(img);
    let rep = Image::check(&image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

#[test]
fn fragmented_reads_through_the_daemon_are_relocated_and_read_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("f.rrow");
    let d = start_rr_row(dir.path(), &ServeOpts::new(&image, SIZE));
    let socket = d.socket().to_owned();
    let (model, first, second) = with_watchdog("fragment and read", LIMIT, move || {
        let mut c = Client::open(&socket, ClientOpts::default());
        let mut q = c.queue(0);
        let mut rng = StdRng::seed_from_u64(2);
        let mut model = vec![0u8; 4 << 20];
        rng.fill_bytes(&mut model);
        for (i, chunk) in model.chunks(CHUNK).enumerate() {
            q.write_ok((i * CHUNK) as u64, 0, chunk);
        }
        for _ in 0..1024 {
            let b = rng.gen_range(0..model.len() / 4096);
            let blk = &mut model[b * 4096..(b + 1) * 4096];
            rng.fill_bytes(blk);
            q.write_ok((b * 4096) as u64, 0, blk);
        }
        q.flush_ok();
        let read_all = |q: &mut common::blk::Queue<'_>| {
            let mut out = Vec::new();
            for i in 0..model.len() / CHUNK {
                out.extend(q.read_ok((i * CHUNK) as u64, 0, CHUNK));
            }
            out
        };
        let first = read_all(&mut q);
        let second = read_all(&mut q);
        (model, first, second)
    });
    assert!(first == model, "first (relocating) pass read wrong data");
    assert!(second == model, "second pass read wrong data");
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: flush, close, exit 0");

    let runs = stopped_image_runs(&image, &model);
    assert!(
        runs <= model.len() / CHUNK + 1,
        "{runs} physical runs remain after reading everything"
    );
}

/// The image a stopped daemon left: it holds `model` from LBA 0 and checks clean; returns
/// the number of physical runs of data blocks behind the model's range.
fn stopped_image_runs(image: &std::path::Path, model: &[u8]) -> usize {
    let img = Image::open(image, OpenMode::ReadOnly).unwrap();
    let runs = img
        .resolve(Lba(0), (model.len() / 4096) as u64)
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Extent::Mapped { .. }))
        .count();
    let mut got = vec![0u8; model.len()];
    img.read_at(0, &mut got).unwrap();
    assert!(got == model, "the image after the daemon stopped");
    drop(img);
    let rep = Image::check(image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
    runs
}

#[test]
fn an_idle_daemon_defragments_and_reads_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("g.rrow");
    let mut opts = ServeOpts::new(&image, SIZE);
    // No relocation on read: whatever is contiguous afterwards, the idle walk made so.
    opts.extra = [
        "--relocate-on-read",
        "0",
        "--defrag-idle-ms",
        "100",
        "--defrag-rate",
        "64",
    ]
    .map(String::from)
    .to_vec();
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    let log = d.log_path().to_owned();
    let blocks = (4 << 20) / 4096;
    let (model, got) = with_watchdog("fragment, go quiet, read", LIMIT, move || {
        let mut rng = StdRng::seed_from_u64(3);
        let mut model = vec![0u8; blocks * 4096];
        rng.fill_bytes(&mut model);
        let mut c = Client::open(&socket, ClientOpts::default());
        let mut q = c.queue(0);
        for (i, chunk) in model.chunks(CHUNK).enumerate() {
            q.write_ok((i * CHUNK) as u64, 0, chunk);
        }
        for _ in 0..1024 {
            let b = rng.gen_range(0..blocks);
            let blk = &mut model[b * 4096..(b + 1) * 4096];
            rng.fill_bytes(blk);
            q.write_ok((b * 4096) as u64, 0, blk);
        }
        q.flush_ok();
        // The guest goes quiet: the daemon says when a walk relocated something.
        let said = || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("idle defragmentation: relocated")
        };
        while !said() {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut got = Vec::new();
        for i in 0..model.len() / CHUNK {
            got.extend(q.read_ok((i * CHUNK) as u64, 0, CHUNK));
        }
        (model, got)
    });
    assert!(got == model, "read wrong data after defragmentation");
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: flush, close, exit 0");

    // 1024 random overwrites of 1024 blocks leave some 650 runs; a walk leaves at most one
    // run per 2 MiB window.
    let runs = stopped_image_runs(&image, &model);
    assert!(runs <= 4, "{runs} physical runs remain after the idle walk");
}

#[test]
fn batches_run_on_eight_request_threads_match_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("p.rrow");
    let mut opts = ServeOpts::new(&image, SIZE);
    opts.extra = vec!["--io-threads".into(), "8".into()];
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    let model = with_watchdog("parallel batches", LIMIT, move || {
        let mut c = Client::open(&socket, ClientOpts::default());
        let mut q = c.queue(0);
        let mem = q.mem();
        let mut rng = StdRng::seed_from_u64(3);
        let mut model = vec![0u8; SIZE as usize];
        // Each round: 32 requests in flight at once, writes (whole and sub-block) to distinct
        // 64 KiB slots and reads of other slots, so no two requests of a batch overlap and the
        // result is defined whatever order the threads run them in.
        const SLOT: usize = 64 << 10;
        for round in 0..40 {
            let mut slots: Vec<usize> = (0..SIZE as usize / SLOT).collect();
            for i in (1..slots.len()).rev() {
                slots.swap(i, rng.gen_range(0..=i));
            }
            let mut reqs = Vec::new();
            let mut writes = Vec::new();
            let mut reads = Vec::new();
            for (i, &slot) in slots.iter().take(32).enumerate() {
                let buf = i * SLOT;
                let sub = rng.gen_range(0..8u64) * 512;
                let len = (rng.gen_range(1..=16usize) * 4096).min(SLOT - sub as usize);
                let offset = (slot * SLOT) as u64 + sub;
                if (i + round) % 2 == 0 {
                    let mut data = vec![0u8; len];
                    rng.fill_bytes(&mut data);
                    mem.fill(buf, &data);
                    writes.push((offset as usize, data));
                    reqs.push(Req::Write { offset, buf, len });
                } else {
                    reads.push((offset as usize, buf, len));
                    reqs.push(Req::Read { offset, buf, len });
                }
            }
            assert!(
                q.submit(&reqs).iter().all(|&r| r == 0),
                "round {round} failed"
            );
            for (offset, buf, len) in reads {
                assert!(
                    mem.read(buf, len) == model[offset..offset + len],
                    "round {round}: a read returned other data"
                );
            }
            for (offset, data) in writes {
                model[offset..offset + data.len()].copy_from_slice(&data);
            }
        }
        q.flush_ok();
        model
    });
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM: flush, close, exit 0");
    let img = Image::open(&image, OpenMode::ReadOnly).unwrap();
    let mut got = vec![0u8; model.len()];
    img.read_at(0, &mut got).unwrap();
    assert!(got == model, "the image differs from the model");
    drop(img);
    let rep = Image::check(&image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

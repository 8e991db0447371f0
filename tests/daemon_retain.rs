//! Retention while serving (`rr-row serve --retain-seqs N`), end to end through a blkio
//! frontend: the image gives its old versions back while the guest keeps writing, every state
//! inside the window and the current data stay exact, and a recording's own states are never
//! given up, so its log replays.

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use common::blk::{Client, ClientOpts, Req};
use common::daemon::{start_rr_row, ServeOpts};
use common::image::create_image;
use common::{wait_until, with_watchdog};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use rr_row::blockdev::replay_dev::{DivergencePolicy, ReplayingDevice};
use rr_row::image::{Image, ImageError, OpenMode};
use rr_row::units::Seq;

const SIZE: u64 = 8 << 20;
const LIMIT: Duration = Duration::from_secs(180);

fn allocated(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Overwrites the whole disk `passes` times with 4 KiB writes (one seq each); returns the
/// final content.
fn overwrite(socket: &std::path::Path, passes: u32, seed: u64) -> Vec<u8> {
    let mut c = Client::open(socket, ClientOpts::default());
    let mut q = c.queue(0);
    let mut rng = StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    for _ in 0..passes {
        rng.fill_bytes(&mut model);
        for (i, blk) in model.chunks(4096).enumerate() {
            q.write_ok((i * 4096) as u64, 0, blk);
        }
    }
    model
}

#[test]
fn old_versions_are_given_back_while_the_guest_writes() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("r.rrow");
    let mut opts = ServeOpts::new(&image, SIZE);
    // Keep the states of the last 1024 operations (a half pass over the disk), punching
    // holes over what is given back (reuse, the default, is tested below). No space reserved
    // ahead of the data (64 MiB by default), which would count in the allocated size below.
    opts.extra = vec![
        "--retain-seqs".into(),
        "1024".into(),
        "--punch-reclaimed".into(),
        "--preallocate".into(),
        "0".into(),
    ];
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    let blocks = SIZE / 4096;
    let passes = 12u32;
    let model = with_watchdog("overwrite passes", LIMIT, move || {
        overwrite(&socket, passes, 7)
    });
    let written = u64::from(passes) * SIZE;
    // The thread looks every second; once the seq has moved on it gives back everything but
    // the last 1024 states' versions: the image ends far below what was written.
    assert!(
        wait_until(Duration::from_secs(60), || allocated(&image) < written / 3),
        "the image still occupies {} bytes after {written} bytes written",
        allocated(&image)
    );
    let log = d.log_path().to_owned();
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(log).unwrap_or_default()
    );

    let rep = Image::check(&image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
    assert!(rep.reclaimed_blocks > 0);
    let img = Image::open(&image, OpenMode::ReadOnly).unwrap();
    let seq = img.seq().0;
    assert_eq!(seq, u64::from(passes) * blocks);
    let horizon = img.history_horizon().0;
    // How far it got depends on when the thread last looked; it never enters the window.
    assert!(horizon > 0, "nothing was reclaimed");
    assert!(
        horizon <= seq - 1024,
        "horizon {horizon} inside the window (seq {seq})"
    );
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(0, &mut got).unwrap();
    assert!(got == model, "the current data changed");
    // A state inside the window reads as the model: its first blocks from the last pass,
    // the rest from the one before (which the window keeps too).
    let s = img.state_at(Seq(seq - 1024)).unwrap();
    s.read_at(0, &mut got).unwrap();
    let last_pass_written = (blocks - 1024) as usize * 4096;
    assert!(got[..last_pass_written] == model[..last_pass_written]);
    assert!(matches!(
        img.state_at(Seq(horizon - 1)),
        Err(ImageError::HistoryReclaimed { .. })
    ));
}

/// Blocks the daemon's log says were handed to the allocator, over all its reclaims.
fn reusable_blocks(log: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let rest = l.split("retention: ").nth(1)?;
            let n = rest.strip_suffix(" given-back blocks now serve new writes")?;
            n.parse::<u64>().ok()
        })
        .sum()
}

/// Overwrites the whole disk `passes` times with 4 KiB writes from `rng`, then flushes.
fn overwrite_flush(
    q: &mut common::blk::Queue<'_>,
    rng: &mut StdRng,
    model: &mut [u8],
    passes: u32,
) {
    for _ in 0..passes {
        rng.fill_bytes(model);
        for (i, blk) in model.chunks(4096).enumerate() {
            q.write_ok((i * 4096) as u64, 0, blk);
        }
    }
    q.flush_ok();
}

#[test]
fn given_back_blocks_are_reused_and_the_file_stops_growing() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("u.rrow");
    let mut opts = ServeOpts::new(&image, SIZE);
    opts.extra = vec!["--retain-seqs".into(), "1024".into()];
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    let blocks = SIZE / 4096;
    let img_path = image.clone();
    let log = d.log_path().to_owned();
    let (model, grown) = with_watchdog("overwrite, reclaim, overwrite", LIMIT, move || {
        let mut c = Client::open(&socket, ClientOpts::default());
        let mut q = c.queue(0);
        let mut rng = StdRng::seed_from_u64(11);
        let mut model = vec![0u8; SIZE as usize];
        overwrite_flush(&mut q, &mut rng, &mut model, 4);
        // Wait until the retention thread has given back everything outside the window:
        // keeping the last 1024 states, that is passes 1 and 2 and the first 1024 blocks of
        // pass 3 (20 MiB). Once a sync has made that reclaim durable (the guest's flush, or
        // the thread's own after a few seconds) its blocks serve new writes, which the daemon
        // logs. Then two more passes (16 MiB) fit in them: the file must not grow by more
        // than a journal segment.
        let full = 4 * blocks - 1024;
        assert!(
            wait_until(Duration::from_secs(60), || reusable_blocks(&log)
                == 5 * 1024),
            "the history before seq {full} was not given back for reuse:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(
            Image::open(&img_path, OpenMode::ReadOnly)
                .unwrap()
                .history_horizon()
                .0,
            full
        );
        let before = std::fs::metadata(&img_path).unwrap().len();
        overwrite_flush(&mut q, &mut rng, &mut model, 2);
        let after = std::fs::metadata(&img_path).unwrap().len();
        (model, after.saturating_sub(before))
    });
    // Two passes appended would be 16 MiB; reused, the file grows by journal segments only.
    assert!(
        grown <= 1 << 20,
        "the file grew by {grown} bytes over 2 passes of {SIZE} bytes"
    );
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success());
    let rep = Image::check(&image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
    let img = Image::open(&image, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq().0, 6 * blocks);
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(0, &mut got).unwrap();
    assert!(got == model, "the current data changed");
    // Versions whose blocks were reused are gone, like reclaimed ones, in history.
    let h = img.history(rr_row::units::Lba(0)).unwrap();
    assert_eq!(h.len(), 6);
    assert!(h[0].reclaimed, "{h:?}");
    assert!(!h[5].reclaimed);
}

#[test]
fn retention_while_recording_keeps_every_state_of_the_recording() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("rec.rrow");
    // History from before the recording: four passes.
    let img = create_image(&image, SIZE, 4096);
    let mut rng = StdRng::seed_from_u64(3);
    let mut buf = vec![0u8; 4096];
    for _ in 0..4 {
        for b in 0..SIZE / 4096 {
            rng.fill_bytes(&mut buf);
            img.write_at(b * 4096, &buf).unwrap();
        }
    }
    let start = img.seq().0;
    img.close().unwrap();
    let log = dir.path().join("rec.rrlog");
    let mut opts = ServeOpts::new(&image, SIZE);
    opts.extra = vec![
        "--retain-seqs".into(),
        "512".into(),
        "--record".into(),
        log.display().to_string(),
    ];
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    // Reads of the pre-recording data (recorded by block id), then overwrites of it.
    let first = with_watchdog("record", LIMIT, move || {
        let mut c = Client::open(&socket, ClientOpts::default());
        let mut q = c.queue(0);
        let mut first = Vec::new();
        for off in (0..SIZE).step_by(256 << 10) {
            first.extend(q.read_ok(off, 0, 256 << 10));
        }
        drop(c);
        overwrite(&socket, 4, 9);
        first
    });
    // Pre-recording history is given back; the recording's start state stays.
    assert!(
        wait_until(Duration::from_secs(60), || {
            Image::open(&image, OpenMode::ReadOnly)
                .map(|i| i.history_horizon().0 == start)
                .unwrap_or(false)
        }),
        "the horizon never reached the recording's start seq {start}"
    );
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success());
    let img = Image::open(&image, OpenMode::ReadOnly).unwrap();
    assert_eq!(
        img.history_horizon().0,
        start,
        "retention passed the recording's start"
    );
    let mut got = vec![0u8; SIZE as usize];
    img.state_at(Seq(start))
        .unwrap()
        .read_at(0, &mut got)
        .unwrap();
    assert!(
        got == first,
        "the recorded read no longer matches the state it read"
    );
    // Replay preparation checks every block run the log reads: none was given back.
    let img = std::sync::Arc::new(img);
    if let Err(e) = ReplayingDevice::open(img.clone(), &log, DivergencePolicy::Stop) {
        panic!("the recording cannot be replayed after retention: {e}");
    }
    drop(img);
    let rep = Image::check(&image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

/// The content of version `v` of block `lba` in
/// [`direct_reads_beside_reclaim_and_reuse_return_versions_of_their_own_block`]: every 8-byte
/// word names the block and the version, so a read that got another block's bytes (a block
/// given back and reused for another write while the read was in flight) or a mix of
/// versions is caught.
fn tagged(lba: u64, v: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|i| {
            let w = match i {
                0 => lba,
                1 => v,
                _ => lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ v.rotate_left(17) ^ i,
            };
            w.to_le_bytes()
        })
        .collect()
}

#[test]
fn direct_reads_beside_reclaim_and_reuse_return_versions_of_their_own_block() {
    // With --direct, pipelined reads go on the queue's io_uring ring, resolved when planned
    // and read when the disk gets to them. Meanwhile retention gives blocks back and reuse
    // writes other data into them: a read must only ever return a version of its own block.
    // Queue 0 overwrites a 2 MiB region over and over (flushing, so reclaims become durable
    // and their blocks serve new writes); queue 1 reads batches of random blocks of the same
    // region and checks each. (A reclaim landing inside one read's flight is rare here, a
    // reclaim runs about once a second; that a plan made before a reclaim is read again is
    // shown by `image::plan`'s and `virtio_backend`'s ring tests.)
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("d.rrow");
    let mut opts = ServeOpts::new(&image, SIZE);
    opts.queues = 2;
    opts.extra = vec!["--direct".into(), "--retain-seqs".into(), "256".into()];
    opts.rust_log = Some("info,rr_row::vhost_user::backend=debug");
    let d = start_rr_row(dir.path(), &opts);
    let socket = d.socket().to_owned();
    const BLOCKS: u64 = 512;
    let (reads, writes) = with_watchdog("reads beside reclaim and reuse", LIMIT, move || {
        let mut c = Client::open(&socket, ClientOpts::new(2, 128, 16 << 20));
        let mem = c.mem();
        {
            let mut q = c.queue(0);
            for lba in 0..BLOCKS {
                q.write_ok(lba * 4096, 0, &tagged(lba, 0));
            }
            q.flush_ok();
        }
        let done = std::sync::atomic::AtomicBool::new(false);
        let counts = c.on_each_queue(|i, mut q| {
            let mut rng = StdRng::seed_from_u64(40 + i as u64);
            let mut n = 0u64;
            if i == 0 {
                // Writer: buffers in the first MiB of the region.
                let mut version = 1u64;
                let start = std::time::Instant::now();
                while start.elapsed() < Duration::from_secs(8) {
                    for lba in 0..BLOCKS {
                        q.write_ok(lba * 4096, 0, &tagged(lba, version));
                        n += 1;
                        if n % 128 == 0 {
                            q.flush_ok();
                        }
                    }
                    version += 1;
                }
                done.store(true, std::sync::atomic::Ordering::SeqCst);
            } else {
                // Reader: batches of 16 reads into buffers from 4 MiB on.
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let lbas: Vec<u64> = (0..16).map(|_| rng.next_u64() % BLOCKS).collect();
                    let reqs: Vec<Req> = lbas
                        .iter()
                        .enumerate()
                        .map(|(k, &lba)| Req::Read {
                            offset: lba * 4096,
                            buf: (4 << 20) + k * 4096,
                            len: 4096,
                        })
                        .collect();
                    let res = q.submit(&reqs);
                    assert!(res.iter().all(|&r| r == 0), "{res:?}");
                    for (k, &lba) in lbas.iter().enumerate() {
                        let got = mem.read((4 << 20) + k * 4096, 4096);
                        let v = u64::from_le_bytes(got[8..16].try_into().unwrap());
                        assert!(
                            got == tagged(lba, v),
                            "block {lba}: not a version of its own (words {:?})",
                            &got[..16]
                        );
                        n += 1;
                    }
                }
            }
            n
        });
        (counts[1], counts[0])
    });
    let log = d.log_text();
    let reused = reusable_blocks(d.log_path());
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(30));
    assert!(status.success(), "{log}");
    let on_ring = log
        .lines()
        .filter(|l| l.contains("reads on the ring") && !l.contains(": 0 reads"))
        .count();
    eprintln!("{reads} reads checked beside {writes} writes; {on_ring} batches on the ring");
    assert!(reads > 1000, "only {reads} reads");
    assert!(
        on_ring > 100,
        "only {on_ring} batches put reads on the ring"
    );
    assert!(reused > 0, "no given-back block served a new write:\n{log}");
    let rep = Image::check(&image, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

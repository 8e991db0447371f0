//! Record and replay through the whole stack: libblkio's virtio-blk-vhost-user driver (the
//! `blkio` crate) talks to `rr_row::vhost_user::run` serving a `RecordingDevice`, then, after a
//! later session overwrote the disk, a `ReplayingDevice`, both over a real image in a tempdir.
//! Every read of the replay must return the bytes it returned when recorded.
//!
//! Every test has a watchdog: libblkio has no timeouts.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blkio::ReqFlags;
use common::blk::{wait_one as wait, Client, ClientOpts, Req};
use common::image::{create_image, write_random};
use common::inproc::InProcDaemon;
use common::Watchdog;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use rr_row::blockdev::record_dev::RecordingDevice;
use rr_row::blockdev::replay_dev::{DivergencePolicy, ReplayingDevice};
use rr_row::blockdev::BlockDevice;
use rr_row::image::Image;
use rr_row::record::RecordMode;

const SIZE: u64 = 32 << 20;

/// What the client saw for one request: its result, and the data of a read.
type Seen = (i32, Option<Vec<u8>>);

/// A seeded mixed workload over one queue: random-size reads and writes (sub-block ones too),
/// vectored writes, discards, write-zeroes, flushes. `diverge_at` changes that request.
fn workload(c: &mut Client, q: usize, seed: u64, n: usize, diverge_at: Option<usize>) -> Vec<Seen> {
    let mut rng = StdRng::seed_from_u64(seed);
    // SAFETY (test): each queue has its own 2 MiB of the region; the client outlives the slice.
    let mem = unsafe { c.mem().slice(q * (2 << 20), 2 << 20) };
    let (wbuf, rbuf) = mem.split_at_mut(1 << 20);
    let queue = c.raw_queue(q);
    let mut seen = Vec::new();
    for i in 0..n {
        let sectors = rng.gen_range(1..=128u64);
        let mut offset = rng.gen_range(0..SIZE / 512 - sectors) * 512;
        let len = (sectors * 512) as usize;
        if diverge_at == Some(i) {
            offset = (offset + 4096) % (SIZE - len as u64);
        }
        let op = rng.gen_range(0..100);
        let r = match op {
            0..=49 => {
                queue.read(offset, rbuf.as_mut_ptr(), len, 0, ReqFlags::empty());
                let r = wait(queue);
                seen.push((r, (r == 0).then(|| rbuf[..len].to_vec())));
                continue;
            }
            50..=79 => {
                rng.fill(&mut wbuf[..len]);
                queue.write(offset, wbuf.as_ptr(), len, 0, ReqFlags::empty());
                wait(queue)
            }
            80..=84 => {
                // Vectored: two segments.
                rng.fill(&mut wbuf[..len]);
                let half = len / 2 / 512 * 512;
                let iov = [
                    libc::iovec {
                        iov_base: wbuf.as_mut_ptr().cast(),
                        iov_len: half,
                    },
                    libc::iovec {
                        iov_base: wbuf[65536..].as_mut_ptr().cast(),
                        iov_len: len - half,
                    },
                ];
                if half == 0 {
                    queue.write(offset, wbuf.as_ptr(), len, 0, ReqFlags::empty());
                } else {
                    queue.writev(offset, iov.as_ptr(), 2, 0, ReqFlags::empty());
                }
                wait(queue)
            }
            85..=89 => {
                queue.discard(offset, len as u64, 0, ReqFlags::empty());
                wait(queue)
            }
            90..=94 => {
                let flags = if rng.gen() {
                    ReqFlags::NO_UNMAP
                } else {
                    ReqFlags::empty()
                };
                queue.write_zeroes(offset, len as u64, 0, flags);
                wait(queue)
            }
            _ => {
                queue.flush(0, ReqFlags::empty());
                wait(queue)
            }
        };
        seen.push((r, None));
    }
    seen
}

/// A disk with random data in every other MiB.
fn new_image(dir: &Path) -> Arc<Image> {
    let img = create_image(&dir.join("disk.rrow"), SIZE, 4096);
    write_random(&img, 1, 1 << 20, 2 << 20);
    Arc::new(img)
}

fn whole_disk(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

/// A later session that overwrites the whole disk.
fn overwrite(img: &Image) {
    write_random(img, 1234, 1 << 20, 1 << 20);
    img.flush().unwrap();
}

/// Serves `dev` to one blkio frontend that runs the `n`-request workload of seed 100 + q on
/// each queue q of `queues` (see [`workload`] for `diverge_at`), until it disconnects; returns
/// what the client saw per queue.
fn session(
    dev: Arc<dyn BlockDevice>,
    queues: usize,
    n: usize,
    diverge_at: Option<usize>,
) -> Vec<Vec<Seen>> {
    // `once`: the daemon returns when the frontend leaves.
    let d = InProcDaemon::start(dev, queues as u16, true, "rr");
    let mut c = Client::open(d.socket(), ClientOpts::new(queues, 256, 4 << 20));
    let seen = (0..queues)
        .map(|q| workload(&mut c, q, 100 + q as u64, n, diverge_at))
        .collect();
    drop(c);
    d.join_or_stop_after(Duration::from_secs(20));
    seen
}

/// Records, in block-id mode into `log`, whatever `drive` does with the recording device;
/// returns what `drive` returns once the log is finished.
fn record_with<T>(
    img: &Arc<Image>,
    log: &Path,
    drive: impl FnOnce(Arc<dyn BlockDevice>) -> T,
) -> T {
    let dev = Arc::new(
        RecordingDevice::with_sync_interval(
            Arc::clone(img),
            log,
            RecordMode::BlockId,
            Duration::from_millis(100),
        )
        .unwrap(),
    );
    let seen = drive(dev.clone());
    Arc::try_unwrap(dev)
        .ok()
        .expect("the daemon dropped its reference")
        .finish()
        .unwrap();
    seen
}

/// Records `n` requests on each of `queues` queues; returns what the client saw per queue.
fn record(img: &Arc<Image>, log: &Path, queues: usize, n: usize) -> Vec<Vec<Seen>> {
    record_with(img, log, |dev| session(dev, queues, n, None))
}

#[test]
fn a_recorded_blkio_run_replays_byte_for_byte_after_the_disk_moved_on() {
    let _w = Watchdog::new(240);
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let log = dir.path().join("run.log");
    let recorded = record(&img, &log, 2, 300);
    let reads = recorded
        .iter()
        .flatten()
        .filter(|(r, d)| *r == 0 && d.is_some())
        .count();
    assert!(reads > 200, "{reads} reads");

    overwrite(&img);
    let before = whole_disk(&img);
    let seq = img.seq();

    let dev =
        Arc::new(ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap());
    let replayed = session(dev.clone(), 2, 300, None);
    for q in 0..2 {
        for (i, (a, b)) in recorded[q].iter().zip(&replayed[q]).enumerate() {
            assert!(a == b, "queue {q} request {i} differs");
        }
    }
    let s = dev.summary();
    assert!(s.is_clean(), "{s}");
    assert_eq!(img.seq(), seq);
    assert!(
        whole_disk(&img) == before,
        "the replay changed the live image"
    );
}

#[test]
fn a_divergent_blkio_run_is_reported_at_its_index() {
    let _w = Watchdog::new(240);
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let log = dir.path().join("run.log");
    let recorded = record(&img, &log, 1, 120);
    overwrite(&img);

    let dev =
        Arc::new(ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap());
    let k = 77;
    let replayed = session(dev.clone(), 1, 120, Some(k)).remove(0);
    assert_eq!(&replayed[..k], &recorded[0][..k]);
    assert!(replayed[k..].iter().all(|(r, _)| *r == -libc::EIO));
    let s = dev.summary();
    assert!(s.stopped);
    assert_eq!(s.divergences, 1, "{s}");
    assert_eq!(s.first_divergences[0].index, k as u64);
    assert_eq!(s.first_divergences[0].queue, 0);
}

/// One connection's worth of batches: `rounds` batches of 32 requests in flight at once on
/// queue 0, reads and writes of distinct 64 KiB slots (so no two requests of a batch overlap),
/// each request's data and result as the client saw them.
fn parallel_batches(c: &mut Client, seed: u64, rounds: usize) -> Vec<Seen> {
    const SLOT: usize = 64 << 10;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut q = c.queue(0);
    let mem = q.mem();
    let mut seen = Vec::new();
    for _ in 0..rounds {
        let mut slots: Vec<usize> = (0..SIZE as usize / SLOT).collect();
        for i in (1..slots.len()).rev() {
            slots.swap(i, rng.gen_range(0..=i));
        }
        let mut reqs = Vec::new();
        for (i, &slot) in slots.iter().take(32).enumerate() {
            let len = rng.gen_range(1..=16usize) * 4096;
            let (buf, offset) = (i * SLOT, (slot * SLOT) as u64);
            if rng.gen_bool(0.6) {
                reqs.push(Req::Read { offset, buf, len });
            } else {
                let mut data = vec![0u8; len];
                rng.fill(&mut data[..]);
                mem.fill(buf, &data);
                reqs.push(Req::Write { offset, buf, len });
            }
        }
        let results = q.submit(&reqs);
        for (r, req) in results.into_iter().zip(&reqs) {
            let data = match *req {
                Req::Read { buf, len, .. } => Some(mem.read(buf, len)),
                _ => None,
            };
            seen.push((r, data));
        }
    }
    seen
}

/// Two connections one after the other (indices count on across them), 4 request threads on
/// the queue, so the requests of each batch run - and are recorded - in parallel.
fn parallel_session(dev: Arc<dyn BlockDevice>) -> Vec<Seen> {
    let cfg = rr_row::vhost_user::BackendConfig {
        io_threads: 4,
        ..rr_row::vhost_user::BackendConfig::new(1, 256, rr_row::virtio_blk::serial_bytes("p"))
    };
    let d = InProcDaemon::start_with(dev, cfg, false);
    let mut seen = Vec::new();
    for conn in 0..2u64 {
        let mut c = Client::open(d.socket(), ClientOpts::new(1, 256, 4 << 20));
        seen.extend(parallel_batches(&mut c, 500 + conn, 12));
    }
    d.stop();
    seen
}

#[test]
fn a_recording_made_on_parallel_request_threads_replays_exactly() {
    let _w = Watchdog::new(240);
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let log = dir.path().join("par.log");
    let recorded = record_with(&img, &log, parallel_session);
    assert!(recorded.iter().all(|(r, _)| *r == 0));
    // The requests of a batch were recorded in whatever order the threads ran them.
    let index = rr_row::record::ReplayIndex::open(&log).unwrap();
    assert_eq!(
        index.header().indices,
        rr_row::record::IndexKeying::Continuous
    );
    assert_eq!(index.len(), recorded.len() as u64);

    overwrite(&img);
    let before = whole_disk(&img);
    let dev =
        Arc::new(ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap());
    let replayed = parallel_session(dev.clone());
    assert_eq!(replayed.len(), recorded.len());
    for (i, (a, b)) in recorded.iter().zip(&replayed).enumerate() {
        assert!(a == b, "request {i} differs");
    }
    let s = dev.summary();
    assert!(s.is_clean(), "{s}");
    assert!(
        whole_disk(&img) == before,
        "the replay changed the live image"
    );
}

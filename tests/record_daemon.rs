//! Record and replay through the whole stack: libblkio's virtio-blk-vhost-user driver (the
//! `blkio` crate) talks to `rr_row::vhost_user::run` serving a `RecordingDevice`, then, after a
//! later session overwrote the disk, a `ReplayingDevice`, both over a real image in a tempdir.
//! Every read of the replay must return the bytes it returned when recorded.
//!
//! Every test has a watchdog: libblkio has no timeouts.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use rr_row::blockdev::record_dev::RecordingDevice;
use rr_row::blockdev::replay_dev::{DivergencePolicy, ReplayingDevice};
use rr_row::blockdev::BlockDevice;
use rr_row::image::{CreateOptions, Image};
use rr_row::record::RecordMode;
use rr_row::units::BlockSize;
use rr_row::vhost_user::{run, BackendConfig, DaemonConfig, StopHandle};
use rr_row::virtio_blk::serial_bytes;

const SIZE: u64 = 32 << 20;

/// Aborts the process if a test takes longer than `secs` (libblkio has no timeouts).
struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    fn new(secs: u64) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let d = done.clone();
        std::thread::spawn(move || {
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(secs) {
                if d.load(Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            eprintln!("watchdog: test hung for {secs}s, aborting");
            std::process::abort();
        });
        Watchdog(done)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

struct Daemon {
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
}

impl Daemon {
    fn start(dir: &Path, dev: Arc<dyn BlockDevice>, queues: u16) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let socket = dir.join(format!("blk-{}.sock", rand::random::<u32>()));
        let cfg = DaemonConfig {
            socket: socket.clone(),
            socket_mode: 0o600,
            once: true,
            backend: BackendConfig::new(queues, 256, serial_bytes("rr")),
        };
        let stop = StopHandle::new().unwrap();
        let s = stop.clone();
        let thread = std::thread::spawn(move || run(&cfg, dev, &s).unwrap());
        let start = Instant::now();
        while !socket.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "no socket");
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            stop,
            thread: Some(thread),
            socket,
        }
    }

    /// Waits for the daemon to end after the client disconnected (`once`).
    fn join(mut self) {
        let t = self.thread.take().unwrap();
        let start = Instant::now();
        while !t.is_finished() {
            if start.elapsed() > Duration::from_secs(20) {
                self.stop.stop();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().unwrap();
    }
}

struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

impl Client {
    fn connect(socket: &Path, queues: i32) -> Client {
        let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
        b.set_str("path", socket.to_str().unwrap()).unwrap();
        b.connect().unwrap();
        b.set_i32("num-queues", queues).unwrap();
        b.set_i32("queue-size", 256).unwrap();
        let out = b.start().unwrap();
        let region = b.alloc_mem_region(4 << 20).unwrap();
        b.map_mem_region(&region).unwrap();
        Client {
            queues: out.queues,
            region,
            blkio: b,
        }
    }

    fn close(mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
        self.queues.clear();
        drop(self.blkio);
    }
}

fn wait(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    let n = q.do_io(&mut c, 1, None, None).unwrap();
    assert_eq!(n, 1);
    // SAFETY (test): do_io initialised the first `n` completions.
    unsafe { c[0].assume_init_read() }.ret
}

/// What the client saw for one request: its result, and the data of a read.
type Seen = (i32, Option<Vec<u8>>);

/// A seeded mixed workload over one queue: random-size reads and writes (sub-block ones too),
/// vectored writes, discards, write-zeroes, flushes. `diverge_at` changes that request.
fn workload(c: &mut Client, q: usize, seed: u64, n: usize, diverge_at: Option<usize>) -> Vec<Seen> {
    let mut rng = StdRng::seed_from_u64(seed);
    // SAFETY (test): the region stays mapped until `close`; one request at a time uses it.
    let mem = unsafe {
        std::slice::from_raw_parts_mut((c.region.addr + q * (2 << 20)) as *mut u8, 2 << 20)
    };
    let (wbuf, rbuf) = mem.split_at_mut(1 << 20);
    let queue = &mut c.queues[q];
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

fn new_image(dir: &Path) -> Arc<Image> {
    let img = Image::create(
        &dir.join("disk.rrow"),
        &CreateOptions {
            size: SIZE,
            block_size: BlockSize::DEFAULT,
            base: None,
        },
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let mut data = vec![0u8; 1 << 20];
    for i in 0..SIZE / (1 << 20) / 2 {
        rng.fill(&mut data[..]);
        img.write_at(i * 2 * (1 << 20), &data).unwrap();
    }
    Arc::new(img)
}

fn whole_disk(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

fn overwrite(img: &Image) {
    let mut rng = StdRng::seed_from_u64(1234);
    let mut data = vec![0u8; 1 << 20];
    for i in 0..SIZE / (1 << 20) {
        rng.fill(&mut data[..]);
        img.write_at(i * (1 << 20), &data).unwrap();
    }
    img.flush().unwrap();
}

/// Records `n` requests on each of `queues` queues; returns what the client saw per queue.
fn record(dir: &Path, img: &Arc<Image>, log: &Path, queues: usize, n: usize) -> Vec<Vec<Seen>> {
    let dev = Arc::new(
        RecordingDevice::with_sync_interval(
            Arc::clone(img),
            log,
            RecordMode::BlockId,
            Duration::from_millis(100),
        )
        .unwrap(),
    );
    let d = Daemon::start(dir, dev.clone(), queues as u16);
    let mut c = Client::connect(&d.socket, queues as i32);
    let seen = (0..queues)
        .map(|q| workload(&mut c, q, 100 + q as u64, n, None))
        .collect();
    c.close();
    d.join();
    Arc::try_unwrap(dev)
        .ok()
        .expect("the daemon dropped its reference")
        .finish()
        .unwrap();
    seen
}

#[test]
fn a_recorded_blkio_run_replays_byte_for_byte_after_the_disk_moved_on() {
    let _w = Watchdog::new(240);
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path());
    let log = dir.path().join("run.log");
    let recorded = record(dir.path(), &img, &log, 2, 300);
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
    let d = Daemon::start(dir.path(), dev.clone(), 2);
    let mut c = Client::connect(&d.socket, 2);
    let replayed: Vec<Vec<Seen>> = (0..2)
        .map(|q| workload(&mut c, q, 100 + q as u64, 300, None))
        .collect();
    c.close();
    d.join();
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
    let recorded = record(dir.path(), &img, &log, 1, 120);
    overwrite(&img);

    let dev =
        Arc::new(ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap());
    let d = Daemon::start(dir.path(), dev.clone(), 1);
    let mut c = Client::connect(&d.socket, 1);
    let k = 77;
    let replayed = workload(&mut c, 0, 100, 120, Some(k));
    c.close();
    d.join();
    assert_eq!(&replayed[..k], &recorded[0][..k]);
    assert!(replayed[k..].iter().all(|(r, _)| *r == -libc::EIO));
    let s = dev.summary();
    assert!(s.stopped);
    assert_eq!(s.divergences, 1, "{s}");
    assert_eq!(s.first_divergences[0].index, k as u64);
    assert_eq!(s.first_divergences[0].queue, 0);
}

//! The vhost-user daemon loop driven by a real vhost-user frontend: libblkio's
//! virtio-blk-vhost-user driver (the `blkio` crate) talks to `rr_row::vhost_user::run` running
//! in-process over an in-memory block device. This exercises the whole stack below the image
//! engine: socket handling, feature and protocol negotiation, the config space, memory tables,
//! per-queue workers, request execution, disconnect/reconnect and stopping.
//!
//! Every test has a watchdog: libblkio has no timeouts, so a hung handshake aborts the test
//! binary instead of hanging CI.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use rand::{Rng, SeedableRng};
use rr_row::blockdev::{BlockDevice, BlockError, RejectedRequest, RequestCtx};
use rr_row::iobuf::{total_len, IoSeg};
use rr_row::vhost_user::{run, BackendConfig, DaemonConfig, StopHandle};
use rr_row::virtio_blk::serial_bytes;

const CAPACITY: u64 = 64 << 20;

/// An in-memory block device that counts flushes and remembers which queues it served.
struct MemDevice {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: AtomicUsize,
    queues_seen: Mutex<Vec<u16>>,
    rejected: Mutex<Vec<(RequestCtx, RejectedRequest)>>,
}

impl MemDevice {
    fn new(read_only: bool) -> Arc<Self> {
        Arc::new(MemDevice {
            data: Mutex::new(vec![0; CAPACITY as usize]),
            read_only,
            flushes: AtomicUsize::new(0),
            queues_seen: Mutex::new(Vec::new()),
            rejected: Mutex::new(Vec::new()),
        })
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        match offset.checked_add(len) {
            Some(end) if end <= CAPACITY => Ok(offset as usize..end as usize),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                capacity: CAPACITY,
            }),
        }
    }

    fn seen(&self, ctx: &RequestCtx) {
        let mut q = self.queues_seen.lock().unwrap();
        if !q.contains(&ctx.queue) {
            q.push(ctx.queue);
        }
    }
}

impl BlockDevice for MemDevice {
    fn capacity(&self) -> u64 {
        CAPACITY
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.seen(ctx);
        let r = self.range(offset, total_len(segs))?;
        let data = self.data.lock().unwrap();
        let mut pos = r.start;
        for s in segs {
            assert!(s.copy_from(0, &data[pos..pos + s.len()]));
            pos += s.len();
        }
        Ok(())
    }
    fn write(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.seen(ctx);
        let r = self.range(offset, total_len(segs))?;
        let mut data = self.data.lock().unwrap();
        let mut pos = r.start;
        for s in segs {
            assert!(s.copy_to(0, &mut data[pos..pos + s.len()]));
            pos += s.len();
        }
        Ok(())
    }
    fn flush(&self, _: &RequestCtx) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, _: &RequestCtx, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, c: &RequestCtx, o: u64, l: u64, _: bool) -> Result<(), BlockError> {
        self.discard(c, o, l)
    }
    fn rejected(&self, ctx: &RequestCtx, req: &RejectedRequest) {
        self.rejected.lock().unwrap().push((*ctx, *req));
    }
}

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
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start(dev: Arc<MemDevice>, queues: u16, once: bool) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("blk.sock");
        let cfg = DaemonConfig {
            socket: socket.clone(),
            socket_mode: 0o600,
            once,
            backend: BackendConfig::new(queues, 256, serial_bytes("test")),
        };
        let stop = StopHandle::new().unwrap();
        let s = stop.clone();
        let thread = std::thread::spawn(move || run(&cfg, dev, &s).unwrap());
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            stop,
            thread: Some(thread),
            socket,
            _dir: dir,
        }
    }

    fn stop(mut self) {
        self.stop.stop();
        self.thread.take().unwrap().join().unwrap();
        assert!(!self.socket.exists(), "the socket file is removed on exit");
    }
}

struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    blkio: Blkio,
}

impl Client {
    fn connect(socket: &Path, queues: i32) -> Client {
        Self::try_connect(socket, queues, false).unwrap()
    }

    fn try_connect(socket: &Path, queues: i32, read_only: bool) -> blkio::Result<Client> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", queues)?;
        b.set_i32("queue-size", 256)?;
        let out = b.start()?;
        let region = b.alloc_mem_region(4 << 20)?;
        b.map_mem_region(&region)?;
        Ok(Client {
            queues: out.queues,
            region,
            blkio: b,
        })
    }

    fn buf(&self, off: usize, len: usize) -> &'static mut [u8] {
        assert!(off + len <= self.region.len);
        // SAFETY (test): the region stays mapped until `close`, which the tests call last; only
        // one request uses a given range at a time.
        unsafe { std::slice::from_raw_parts_mut((self.region.addr + off) as *mut u8, len) }
    }

    fn close(mut self) {
        self.blkio.unmap_mem_region(&self.region);
        self.blkio.free_mem_region(&self.region);
        self.queues.clear();
        drop(self.blkio);
    }
}

/// Waits for one completion and returns its `ret`.
fn wait(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    let n = q.do_io(&mut c, 1, None, None).unwrap();
    assert_eq!(n, 1);
    // SAFETY (test): do_io initialised the first `n` completions.
    unsafe { c[0].assume_init_read() }.ret
}

fn read(q: &mut Blkioq, buf: &mut [u8], offset: u64) -> i32 {
    q.read(offset, buf.as_mut_ptr(), buf.len(), 0, ReqFlags::empty());
    wait(q)
}

fn write(q: &mut Blkioq, buf: &[u8], offset: u64) -> i32 {
    q.write(offset, buf.as_ptr(), buf.len(), 0, ReqFlags::empty());
    wait(q)
}

#[test]
fn data_round_trips_through_the_daemon() {
    let _w = Watchdog::new(60);
    let dev = MemDevice::new(false);
    let d = Daemon::start(dev.clone(), 1, false);
    let mut c = Client::connect(&d.socket, 1);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), CAPACITY);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = vec![0u8; CAPACITY as usize];
    let wbuf = c.buf(0, 1 << 20);
    let rbuf = c.buf(1 << 20, 1 << 20);
    let mut q = c.queues.remove(0);
    for _ in 0..200 {
        let sectors = rng.gen_range(1..=256u64);
        let offset = rng.gen_range(0..(CAPACITY / 512 - sectors)) * 512;
        let len = (sectors * 512) as usize;
        rng.fill(&mut wbuf[..len]);
        assert_eq!(write(&mut q, &wbuf[..len], offset), 0);
        model[offset as usize..offset as usize + len].copy_from_slice(&wbuf[..len]);
        let check = rng.gen_range(0..(CAPACITY / 512 - sectors)) * 512;
        assert_eq!(read(&mut q, &mut rbuf[..len], check), 0);
        assert_eq!(&rbuf[..len], &model[check as usize..check as usize + len]);
    }

    // Scatter-gather: a vectored write of three uneven segments, read back in one piece.
    let parts = [(0usize, 512usize), (8192, 3584), (65536, 4096)];
    rng.fill(&mut wbuf[..70000]);
    let iov: Vec<libc::iovec> = parts
        .iter()
        .map(|&(o, l)| libc::iovec {
            iov_base: wbuf[o..].as_mut_ptr().cast(),
            iov_len: l,
        })
        .collect();
    q.writev(4096, iov.as_ptr(), iov.len() as u32, 0, ReqFlags::empty());
    assert_eq!(wait(&mut q), 0);
    assert_eq!(read(&mut q, &mut rbuf[..8192], 4096), 0);
    let expect: Vec<u8> = parts
        .iter()
        .flat_map(|&(o, l)| wbuf[o..o + l].to_vec())
        .collect();
    assert_eq!(&rbuf[..8192], &expect[..]);

    // Flush reaches the device.
    let before = dev.flushes.load(Ordering::SeqCst);
    q.flush(0, ReqFlags::empty());
    assert_eq!(wait(&mut q), 0);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), before + 1);

    // Discard and write-zeroes (with and without unmap) read back as zeros.
    for (i, kind) in ["discard", "zeroes", "zeroes-no-unmap"].iter().enumerate() {
        let off = (1 << 20) * (i as u64 + 1);
        wbuf[..65536].fill(0xa5);
        assert_eq!(write(&mut q, &wbuf[..65536], off), 0);
        match *kind {
            "discard" => q.discard(off + 4096, 8192, 0, ReqFlags::empty()),
            "zeroes" => q.write_zeroes(off + 4096, 8192, 0, ReqFlags::empty()),
            _ => q.write_zeroes(off + 4096, 8192, 0, ReqFlags::NO_UNMAP),
        }
        assert_eq!(wait(&mut q), 0, "{kind}");
        assert_eq!(read(&mut q, &mut rbuf[..65536], off), 0);
        assert!(rbuf[..4096].iter().all(|&b| b == 0xa5), "{kind}");
        assert!(rbuf[4096..12288].iter().all(|&b| b == 0), "{kind}");
        assert!(rbuf[12288..65536].iter().all(|&b| b == 0xa5), "{kind}");
    }

    // A read past the end fails cleanly and the daemon keeps serving.
    let r = read(&mut q, &mut rbuf[..8192], CAPACITY - 4096);
    assert!(r < 0, "read past the end returned {r}");
    assert_eq!(read(&mut q, &mut rbuf[..4096], 0), 0);

    c.queues.push(q);
    c.close();
    d.stop();
}

#[test]
fn queues_run_in_parallel_and_are_numbered() {
    let _w = Watchdog::new(60);
    let dev = MemDevice::new(false);
    let d = Daemon::start(dev.clone(), 4, false);
    let mut c = Client::connect(&d.socket, 4);
    let region_addr = c.region.addr;
    let queues = std::mem::take(&mut c.queues);
    assert_eq!(queues.len(), 4);
    std::thread::scope(|s| {
        for (i, mut q) in queues.into_iter().enumerate() {
            s.spawn(move || {
                // SAFETY (test): each thread uses its own 1 MiB of the mapped region.
                let buf = unsafe {
                    std::slice::from_raw_parts_mut((region_addr + i * (1 << 20)) as *mut u8, 65536)
                };
                let base = (i as u64) * (8 << 20);
                for k in 0..64u64 {
                    buf[..4096].fill((i * 64 + k as usize) as u8);
                    assert_eq!(write(&mut q, &buf[..4096], base + k * 4096), 0);
                }
                for k in 0..64u64 {
                    assert_eq!(read(&mut q, &mut buf[..4096], base + k * 4096), 0);
                    assert!(buf[..4096]
                        .iter()
                        .all(|&b| b == (i * 64 + k as usize) as u8));
                }
            });
        }
    });
    let mut seen = dev.queues_seen.lock().unwrap().clone();
    seen.sort();
    assert_eq!(seen, vec![0, 1, 2, 3], "every queue served requests");
    c.close();
    d.stop();
}

#[test]
fn reconnect_keeps_the_data_and_flushes_on_disconnect() {
    let _w = Watchdog::new(60);
    let dev = MemDevice::new(false);
    let d = Daemon::start(dev.clone(), 2, false);
    for round in 0..3u8 {
        let mut c = Client::connect(&d.socket, 2);
        let buf = c.buf(0, 4096);
        let mut q = c.queues.remove(0);
        if round > 0 {
            assert_eq!(read(&mut q, buf, 1 << 20), 0);
            assert!(buf.iter().all(|&b| b == round - 1), "round {round}");
        }
        let flushes = dev.flushes.load(Ordering::SeqCst);
        buf.fill(round);
        assert_eq!(write(&mut q, buf, 1 << 20), 0);
        c.queues.push(q);
        c.close();
        // The daemon flushes after the frontend goes away.
        let start = Instant::now();
        while dev.flushes.load(Ordering::SeqCst) == flushes {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no flush after disconnect"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    d.stop();
}

#[test]
fn read_only_device_is_advertised_and_served() {
    // libblkio honours VIRTIO_BLK_F_RO: a read-write connection is refused, so writes never
    // reach the daemon from this client (the daemon's own refusal of writes on a read-only
    // device is covered by the request-level unit tests).
    let _w = Watchdog::new(60);
    let dev = MemDevice::new(true);
    dev.data.lock().unwrap()[..4096].fill(0x3c);
    let d = Daemon::start(dev.clone(), 1, false);
    let err = Client::try_connect(&d.socket, 1, false)
        .err()
        .expect("RW connect must fail");
    assert_eq!(err.errno(), blkio::Errno::ROFS);
    let mut c = Client::try_connect(&d.socket, 1, true).unwrap();
    let buf = c.buf(0, 4096);
    let mut q = c.queues.remove(0);
    assert_eq!(read(&mut q, buf, 0), 0);
    assert!(buf.iter().all(|&b| b == 0x3c));
    assert!(write(&mut q, buf, 0) < 0);
    c.queues.push(q);
    c.close();
    d.stop();
}

#[test]
fn once_mode_returns_after_the_first_frontend() {
    let _w = Watchdog::new(60);
    let dev = MemDevice::new(false);
    let mut d = Daemon::start(dev.clone(), 1, true);
    let c = Client::connect(&d.socket, 1);
    c.close();
    d.thread.take().unwrap().join().unwrap();
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
    assert!(!d.socket.exists());
}

#[test]
fn stop_while_connected_ends_the_connection() {
    let _w = Watchdog::new(60);
    let dev = MemDevice::new(false);
    let d = Daemon::start(dev.clone(), 1, false);
    let c = Client::connect(&d.socket, 1);
    d.stop();
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
    c.close();
}

#[test]
fn socket_is_created_with_the_requested_mode() {
    use std::os::unix::fs::PermissionsExt;
    let _w = Watchdog::new(60);
    let d = Daemon::start(MemDevice::new(false), 1, false);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    d.stop();
}

#[test]
fn a_socket_in_use_is_not_stolen() {
    let _w = Watchdog::new(60);
    let d = Daemon::start(MemDevice::new(false), 1, false);
    let cfg = DaemonConfig {
        socket: d.socket.clone(),
        socket_mode: 0o600,
        once: true,
        backend: BackendConfig::new(1, 256, serial_bytes("second")),
    };
    let stop = StopHandle::new().unwrap();
    let err = run(&cfg, MemDevice::new(false), &stop).unwrap_err();
    assert!(
        matches!(err, rr_row::vhost_user::DaemonError::SocketInUse(_)),
        "{err}"
    );
    // The first daemon still serves.
    let c = Client::connect(&d.socket, 1);
    c.close();
    d.stop();
}

//! The vhost-user daemon loop driven by a real vhost-user frontend: libblkio's
//! virtio-blk-vhost-user driver (the `blkio` crate) talks to `rr_row::vhost_user::run` running
//! in-process over an in-memory block device. This exercises the whole stack below the image
//! engine: socket handling, feature and protocol negotiation, the config space, memory tables,
//! per-queue workers, request execution, disconnect/reconnect and stopping.
//!
//! Every test has a watchdog: libblkio has no timeouts, so a hung handshake aborts the test
//! binary instead of hanging CI.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkioq, ReqFlags};
use common::blk::{wait_one as wait, Client, ClientOpts};
use common::inproc::InProcDaemon;
use common::mem_dev::MemDevice;
use common::Watchdog;
use rand::{Rng, SeedableRng};
use rr_row::vhost_user::{run, BackendConfig, DaemonConfig, StopHandle};
use rr_row::virtio_blk::serial_bytes;

const CAPACITY: u64 = 64 << 20;

/// An in-memory disk of `CAPACITY` zero bytes.
fn mem_device(read_only: bool) -> Arc<MemDevice> {
    MemDevice::new(CAPACITY, 0, read_only)
}

/// Starts the daemon in-process over `dev`.
fn start(dev: Arc<MemDevice>, queues: u16, once: bool) -> InProcDaemon {
    InProcDaemon::start(dev, queues, once, "test")
}

fn try_connect(d: &InProcDaemon, queues: usize, read_only: bool) -> blkio::Result<Client> {
    let opts = ClientOpts {
        read_only,
        ..ClientOpts::new(queues, 256, 4 << 20)
    };
    Client::connect(d.socket(), opts)
}

fn connect(d: &InProcDaemon, queues: usize) -> Client {
    try_connect(d, queues, false).unwrap()
}

/// `len` bytes of the client's buffer region at `off`.
fn region(c: &Client, off: usize, len: usize) -> &'static mut [u8] {
    // SAFETY (test): every test uses disjoint ranges at a time and drops the client last.
    unsafe { c.mem().slice(off, len) }
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
    let dev = mem_device(false);
    let d = start(dev.clone(), 1, false);
    let mut c = connect(&d, 1);
    assert_eq!(c.blkio().get_u64("capacity").unwrap(), CAPACITY);
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut model = vec![0u8; CAPACITY as usize];
    let wbuf = region(&c, 0, 1 << 20);
    let rbuf = region(&c, 1 << 20, 1 << 20);
    let q = c.raw_queue(0);
    for _ in 0..200 {
        let sectors = rng.gen_range(1..=256u64);
        let offset = rng.gen_range(0..(CAPACITY / 512 - sectors)) * 512;
        let len = (sectors * 512) as usize;
        rng.fill(&mut wbuf[..len]);
        assert_eq!(write(q, &wbuf[..len], offset), 0);
        model[offset as usize..offset as usize + len].copy_from_slice(&wbuf[..len]);
        let check = rng.gen_range(0..(CAPACITY / 512 - sectors)) * 512;
        assert_eq!(read(q, &mut rbuf[..len], check), 0);
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
    assert_eq!(wait(q), 0);
    assert_eq!(read(q, &mut rbuf[..8192], 4096), 0);
    let expect: Vec<u8> = parts
        .iter()
        .flat_map(|&(o, l)| wbuf[o..o + l].to_vec())
        .collect();
    assert_eq!(&rbuf[..8192], &expect[..]);

    // Flush reaches the device.
    let before = dev.flushes.load(Ordering::SeqCst);
    q.flush(0, ReqFlags::empty());
    assert_eq!(wait(q), 0);
    assert_eq!(dev.flushes.load(Ordering::SeqCst), before + 1);

    // Discard and write-zeroes (with and without unmap) read back as zeros.
    for (i, kind) in ["discard", "zeroes", "zeroes-no-unmap"].iter().enumerate() {
        let off = (1 << 20) * (i as u64 + 1);
        wbuf[..65536].fill(0xa5);
        assert_eq!(write(q, &wbuf[..65536], off), 0);
        match *kind {
            "discard" => q.discard(off + 4096, 8192, 0, ReqFlags::empty()),
            "zeroes" => q.write_zeroes(off + 4096, 8192, 0, ReqFlags::empty()),
            _ => q.write_zeroes(off + 4096, 8192, 0, ReqFlags::NO_UNMAP),
        }
        assert_eq!(wait(q), 0, "{kind}");
        assert_eq!(read(q, &mut rbuf[..65536], off), 0);
        assert!(rbuf[..4096].iter().all(|&b| b == 0xa5), "{kind}");
        assert!(rbuf[4096..12288].iter().all(|&b| b == 0), "{kind}");
        assert!(rbuf[12288..65536].iter().all(|&b| b == 0xa5), "{kind}");
    }

    // A read past the end fails cleanly and the daemon keeps serving.
    let r = read(q, &mut rbuf[..8192], CAPACITY - 4096);
    assert!(r < 0, "read past the end returned {r}");
    assert_eq!(read(q, &mut rbuf[..4096], 0), 0);

    drop(c);
    d.stop();
}

#[test]
fn queues_run_in_parallel_and_are_numbered() {
    let _w = Watchdog::new(60);
    let dev = mem_device(false);
    let d = start(dev.clone(), 4, false);
    let mut c = connect(&d, 4);
    let mem = c.mem();
    let queues = c.raw_queues();
    assert_eq!(queues.len(), 4);
    std::thread::scope(|s| {
        for (i, q) in queues.iter_mut().enumerate() {
            s.spawn(move || {
                // SAFETY (test): each thread uses its own 1 MiB of the mapped region.
                let buf = unsafe { mem.slice(i * (1 << 20), 65536) };
                let base = (i as u64) * (8 << 20);
                for k in 0..64u64 {
                    buf[..4096].fill((i * 64 + k as usize) as u8);
                    assert_eq!(write(q, &buf[..4096], base + k * 4096), 0);
                }
                for k in 0..64u64 {
                    assert_eq!(read(q, &mut buf[..4096], base + k * 4096), 0);
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
    drop(c);
    d.stop();
}

#[test]
fn reconnect_keeps_the_data_and_flushes_on_disconnect() {
    let _w = Watchdog::new(60);
    let dev = mem_device(false);
    let d = start(dev.clone(), 2, false);
    for round in 0..3u8 {
        let mut c = connect(&d, 2);
        let buf = region(&c, 0, 4096);
        let q = c.raw_queue(0);
        if round > 0 {
            assert_eq!(read(q, buf, 1 << 20), 0);
            assert!(buf.iter().all(|&b| b == round - 1), "round {round}");
        }
        let flushes = dev.flushes.load(Ordering::SeqCst);
        buf.fill(round);
        assert_eq!(write(q, buf, 1 << 20), 0);
        drop(c);
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
    let dev = mem_device(true);
    dev.data.lock().unwrap()[..4096].fill(0x3c);
    let d = start(dev.clone(), 1, false);
    let err = try_connect(&d, 1, false)
        .err()
        .expect("RW connect must fail");
    assert_eq!(err.errno(), blkio::Errno::ROFS);
    let mut c = try_connect(&d, 1, true).unwrap();
    let buf = region(&c, 0, 4096);
    let q = c.raw_queue(0);
    assert_eq!(read(q, buf, 0), 0);
    assert!(buf.iter().all(|&b| b == 0x3c));
    assert!(write(q, buf, 0) < 0);
    drop(c);
    d.stop();
}

#[test]
fn once_mode_returns_after_the_first_frontend() {
    let _w = Watchdog::new(60);
    let dev = mem_device(false);
    let d = start(dev.clone(), 1, true);
    let c = connect(&d, 1);
    drop(c);
    // Returns once `run` has returned by itself, asserting that the socket was removed.
    d.join();
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
}

#[test]
fn stop_while_connected_ends_the_connection() {
    let _w = Watchdog::new(60);
    let dev = mem_device(false);
    let d = start(dev.clone(), 1, false);
    let c = connect(&d, 1);
    d.stop();
    assert!(dev.flushes.load(Ordering::SeqCst) >= 1);
    drop(c);
}

#[test]
fn socket_is_created_with_the_requested_mode() {
    use std::os::unix::fs::PermissionsExt;
    let _w = Watchdog::new(60);
    let d = start(mem_device(false), 1, false);
    let mode = std::fs::metadata(d.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    d.stop();
}

#[test]
fn a_socket_in_use_is_not_stolen() {
    let _w = Watchdog::new(60);
    let d = start(mem_device(false), 1, false);
    let cfg = DaemonConfig {
        socket: d.socket().to_owned(),
        socket_mode: 0o600,
        once: true,
        backend: BackendConfig::new(1, 256, serial_bytes("second")),
    };
    let stop = StopHandle::new().unwrap();
    let err = run(&cfg, mem_device(false), &stop).unwrap_err();
    assert!(
        matches!(err, rr_row::vhost_user::DaemonError::SocketInUse(_)),
        "{err}"
    );
    // The first daemon still serves.
    let c = connect(&d, 1);
    drop(c);
    d.stop();
}

//! Integration tests of `rr-row serve` through its vhost-user socket, with the `blkio` crate's
//! virtio-blk-vhost-user driver as the frontend (a real vhost-user client, no VM).
//!
//! Every I/O is checked against a reference model of the disk (a byte vector). The tests whose
//! name starts with `reference_` run the same scenarios against qemu-storage-daemon exporting
//! a raw file: they validate the harness and the scenarios themselves, so a failure only on
//! the rr-row side points at the daemon.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::blk::{Client, ClientOpts, Queue, Req, EIO};
use common::daemon::{start_rr_row, Daemon, Peer, ServeOpts};
use common::with_watchdog;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

/// Virtual disk size of every test.
const SIZE: u64 = 64 << 20;
/// Largest request of the random workloads.
const MAX_REQ: usize = 256 << 10;
/// Watchdog for one client session.
const SESSION: Duration = Duration::from_secs(60);

/// A test's folder, image and backend.
struct Setup {
    dir: tempfile::TempDir,
    image: PathBuf,
    peer: Peer,
}

impl Setup {
    fn new(peer: Peer) -> Setup {
        let dir = common::tempdir();
        let image = dir.path().join(match peer {
            Peer::RrRow => "disk.rrimg",
            Peer::QsdRaw => "disk.raw",
        });
        peer.prepare_image(&image, SIZE);
        Setup { dir, image, peer }
    }

    fn start(&self, queues: u16) -> Daemon {
        self.start_with(queues, false)
    }

    fn start_with(&self, queues: u16, read_only: bool) -> Daemon {
        let opts = ServeOpts {
            queues,
            read_only,
            ..ServeOpts::new(&self.image, SIZE)
        };
        self.peer.start(self.dir.path(), &opts)
    }
}

fn connect(socket: &Path, queues: usize) -> Client {
    Client::open(
        socket,
        ClientOpts {
            queues,
            ..ClientOpts::default()
        },
    )
}

/// A random 512-aligned range of at most `max` bytes inside `[lo, hi)`.
fn random_range(rng: &mut StdRng, lo: u64, hi: u64, max: usize) -> (u64, usize) {
    let sectors_total = (hi - lo) / 512;
    let len_sectors = rng.gen_range(1..=(max as u64 / 512).min(sectors_total));
    // Mostly small requests, as guests issue them.
    let len_sectors = if rng.gen_bool(0.6) {
        len_sectors.min(rng.gen_range(1..=16))
    } else {
        len_sectors
    };
    let start = rng.gen_range(0..=sectors_total - len_sectors);
    (lo + start * 512, (len_sectors * 512) as usize)
}

/// Splits `len` bytes into 1..=4 segments placed at scattered offsets of the window starting
/// at `base`; sometimes with boundaries that are not multiples of 512 (allowed by virtio).
fn random_segs(rng: &mut StdRng, base: usize, len: usize) -> Vec<(usize, usize)> {
    let n = rng.gen_range(1..=4usize).min(len);
    let mut cuts: Vec<usize> = (1..n)
        .map(|_| {
            if len >= 1024 && rng.gen_bool(0.7) {
                rng.gen_range(1..len / 512) * 512
            } else {
                rng.gen_range(1..len)
            }
        })
        .filter(|&c| c > 0 && c < len)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut segs = Vec::new();
    let mut prev = 0;
    for (i, c) in cuts.iter().chain(std::iter::once(&len)).enumerate() {
        // Each segment gets its own slot, in reverse order, with a gap: not one contiguous run.
        let slot = base + (3 - i) * (MAX_REQ + 4096);
        segs.push((slot, c - prev));
        prev = *c;
    }
    segs
}

/// Bytes of a queue's buffer window (4 segment slots of MAX_REQ plus gaps).
const WINDOW: usize = 4 * (MAX_REQ + 4096);

/// `ops` random reads and writes (single and multi-segment) inside `[lo, hi)` of the disk,
/// checked against `model` (the whole disk); the queue uses buffer window `base`.
fn random_io(
    q: &mut Queue<'_>,
    model: &mut [u8],
    rng: &mut StdRng,
    lo: u64,
    hi: u64,
    base: usize,
    ops: usize,
) {
    for op in 0..ops {
        let (offset, len) = random_range(rng, lo, hi, MAX_REQ);
        let segs = random_segs(rng, base, len);
        if rng.gen_bool(0.5) {
            q.writev_random(rng, model, offset, &segs, op);
        } else {
            q.readv_check(model, offset, &segs, op);
        }
    }
}

/// Reads `[lo, hi)` in 256 KiB chunks through window `base` and compares with the model.
fn verify_range(q: &mut Queue<'_>, model: &[u8], lo: u64, hi: u64, base: usize) {
    let mut off = lo;
    while off < hi {
        let len = (hi - off).min(MAX_REQ as u64) as usize;
        let got = q.read_ok(off, base, len);
        let o = off as usize;
        assert!(
            got == model[o..o + len],
            "disk bytes {off}..{} differ from the model",
            off + len as u64
        );
        off += len as u64;
    }
}

fn scenario_random_write_read_back(peer: Peer) {
    let s = Setup::new(peer);
    let d = s.start(1);
    let socket = d.socket().to_owned();
    with_watchdog("random write/read-back", SESSION, move || {
        let mut c = connect(&socket, 1);
        assert_eq!(c.capacity(), SIZE, "capacity from the config space");
        let mut q = c.queue(0);
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = StdRng::seed_from_u64(1);
        random_io(&mut q, &mut model, &mut rng, 0, SIZE, 0, 400);
        // Sub-block writes next to each other inside one 4 KiB block, then the block.
        let block = 4096 * 77;
        q.write_ok(block, 0, &[1u8; 4096]);
        q.write_ok(block + 512, 0, &[2u8; 512]);
        q.write_ok(block + 3072, 0, &[3u8; 1024]);
        let mut expect = vec![1u8; 4096];
        expect[512..1024].fill(2);
        expect[3072..4096].fill(3);
        assert_eq!(q.read_ok(block, 0, 4096), expect);
        model[block as usize..block as usize + 4096].copy_from_slice(&expect);
        q.flush_ok();
        verify_range(&mut q, &model, 0, SIZE, 0);
    });
    drop(d);
}

#[test]
fn random_write_read_back_multi_segment_and_sub_block() {
    scenario_random_write_read_back(Peer::RrRow);
}

#[test]
fn reference_random_write_read_back_qsd() {
    scenario_random_write_read_back(Peer::QsdRaw);
}

fn scenario_queue_depth(peer: Peer) {
    let s = Setup::new(peer);
    let d = s.start(1);
    let socket = d.socket().to_owned();
    with_watchdog("queue depth 32", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        let mem = q.mem();
        let mut rng = StdRng::seed_from_u64(2);
        // 32 writes of 16 KiB in flight at once, to distinct places, then 32 reads.
        let reqs: Vec<Req> = (0..32u64)
            .map(|i| Req::Write {
                offset: i * (1 << 20) + 4096 * i,
                buf: i as usize * 16384,
                len: 16384,
            })
            .collect();
        let mut data = vec![0u8; 32 * 16384];
        rng.fill_bytes(&mut data);
        mem.fill(0, &data);
        assert!(
            q.submit(&reqs).iter().all(|&r| r == 0),
            "a write of the batch failed"
        );
        mem.fill(0, &vec![0u8; data.len()]);
        let reads: Vec<Req> = (0..32u64)
            .map(|i| Req::Read {
                offset: i * (1 << 20) + 4096 * i,
                buf: i as usize * 16384,
                len: 16384,
            })
            .collect();
        assert!(
            q.submit(&reads).iter().all(|&r| r == 0),
            "a read of the batch failed"
        );
        assert!(
            mem.read(0, data.len()) == data,
            "batched reads returned other data"
        );
    });
    drop(d);
}

#[test]
fn queue_depth_32_batches() {
    scenario_queue_depth(Peer::RrRow);
}

#[test]
fn reference_queue_depth_32_batches_qsd() {
    scenario_queue_depth(Peer::QsdRaw);
}

fn scenario_discard_and_write_zeroes(peer: Peer) {
    let s = Setup::new(peer);
    let d = s.start(1);
    let socket = d.socket().to_owned();
    with_watchdog("discard and write-zeroes", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        let fill = vec![0x5au8; 1 << 20];
        for i in 0..4 {
            q.write_ok(i << 20, 0, &fill);
        }
        // Discard 256 KiB at 1 MiB, write zeroes (may unmap) at 2 MiB and (must not) at 3 MiB,
        // and 512 bytes of zeroes inside a block.
        q.discard_ok(1 << 20, 256 << 10);
        q.write_zeroes_ok(2 << 20, 128 << 10, true);
        q.write_zeroes_ok(3 << 20, 64 << 10, false);
        q.write_zeroes_ok((3 << 20) + (512 << 10) + 1024, 512, false);
        q.flush_ok();
        let mut expect = vec![0x5au8; 4 << 20];
        expect[1 << 20..(1 << 20) + (256 << 10)].fill(0);
        expect[2 << 20..(2 << 20) + (128 << 10)].fill(0);
        expect[3 << 20..(3 << 20) + (64 << 10)].fill(0);
        let z = (3 << 20) + (512 << 10) + 1024;
        expect[z..z + 512].fill(0);
        let mut model = vec![0u8; SIZE as usize];
        model[..4 << 20].copy_from_slice(&expect);
        verify_range(&mut q, &model, 0, 5 << 20, 0);
    });
    drop(d);
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    scenario_discard_and_write_zeroes(Peer::RrRow);
}

#[test]
fn reference_discard_and_write_zeroes_qsd() {
    scenario_discard_and_write_zeroes(Peer::QsdRaw);
}

fn scenario_past_end(peer: Peer) {
    let s = Setup::new(peer);
    let d = s.start(1);
    let socket = d.socket().to_owned();
    with_watchdog("requests past the end", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        q.write_ok(SIZE - 4096, 0, &[7u8; 4096]);
        let cases = [
            (
                "read at the end",
                Req::Read {
                    offset: SIZE,
                    buf: 0,
                    len: 4096,
                },
            ),
            (
                "read across the end",
                Req::Read {
                    offset: SIZE - 512,
                    buf: 0,
                    len: 1024,
                },
            ),
            (
                "read far past the end",
                Req::Read {
                    offset: SIZE * 1000,
                    buf: 0,
                    len: 512,
                },
            ),
            (
                "write across the end",
                Req::Write {
                    offset: SIZE - 4096,
                    buf: 0,
                    len: 8192,
                },
            ),
            (
                "write at the end",
                Req::Write {
                    offset: SIZE,
                    buf: 0,
                    len: 512,
                },
            ),
            (
                "discard across the end",
                Req::Discard {
                    offset: SIZE - 4096,
                    len: 8192,
                },
            ),
            (
                "write-zeroes past the end",
                Req::WriteZeroes {
                    offset: SIZE,
                    len: 4096,
                    unmap: false,
                },
            ),
        ];
        for (what, req) in cases {
            assert_eq!(q.one(req), EIO, "{what}: expected -EIO");
        }
        // Nothing was changed by the failed requests, and the device still serves.
        assert_eq!(q.read_ok(SIZE - 4096, 0, 4096), vec![7u8; 4096]);
        q.flush_ok();
    });
    drop(d);
}

#[test]
fn requests_past_the_end_fail_with_eio() {
    scenario_past_end(Peer::RrRow);
}

#[test]
fn reference_requests_past_the_end_qsd() {
    scenario_past_end(Peer::QsdRaw);
}

fn scenario_several_queues(peer: Peer) {
    const QUEUES: usize = 4;
    let s = Setup::new(peer);
    let d = s.start(QUEUES as u16);
    let socket = d.socket().to_owned();
    with_watchdog("several queues in parallel", SESSION, move || {
        let mut c = connect(&socket, QUEUES);
        let part = SIZE / QUEUES as u64;
        let models: Vec<Vec<u8>> = c.on_each_queue(|i, mut q| {
            // Each thread owns a quarter of the disk and a window of the buffers.
            let mut model = vec![0u8; SIZE as usize];
            let mut rng = StdRng::seed_from_u64(100 + i as u64);
            let (lo, hi) = (i as u64 * part, (i as u64 + 1) * part);
            random_io(&mut q, &mut model, &mut rng, lo, hi, i * WINDOW, 150);
            model
        });
        // Everything, read back through queue 0.
        let mut whole = vec![0u8; SIZE as usize];
        for (i, m) in models.iter().enumerate() {
            let (lo, hi) = (i * part as usize, (i + 1) * part as usize);
            whole[lo..hi].copy_from_slice(&m[lo..hi]);
        }
        verify_range(&mut c.queue(0), &whole, 0, SIZE, 0);
    });
    drop(d);
}

#[test]
fn several_queues_in_parallel() {
    scenario_several_queues(Peer::RrRow);
}

#[test]
fn reference_several_queues_in_parallel_qsd() {
    scenario_several_queues(Peer::QsdRaw);
}

fn scenario_reconnect(peer: Peer) {
    let s = Setup::new(peer);
    let mut d = s.start(2);
    let socket = d.socket().to_owned();
    let model = with_watchdog("reconnects", SESSION, move || {
        let mut model = vec![0u8; SIZE as usize];
        let mut rng = StdRng::seed_from_u64(3);
        for round in 0..3 {
            // Alternate one and two queues: each connection negotiates afresh.
            let mut c = connect(&socket, 1 + round % 2);
            let mut q = c.queue(0);
            verify_range(&mut q, &model, 0, 8 << 20, 0);
            random_io(&mut q, &mut model, &mut rng, 0, 8 << 20, 0, 60);
            // Disconnect without flushing: the data must survive the reconnection.
        }
        model
    });
    assert!(
        d.is_running(),
        "the backend exited after its frontends disconnected"
    );
    let socket = d.socket().to_owned();
    with_watchdog("last reconnect", SESSION, move || {
        let mut c = connect(&socket, 1);
        verify_range(&mut c.queue(0), &model, 0, 8 << 20, 0);
    });
    drop(d);
}

#[test]
fn disconnect_and_reconnect_keep_the_data() {
    scenario_reconnect(Peer::RrRow);
}

#[test]
fn reference_disconnect_and_reconnect_qsd() {
    scenario_reconnect(Peer::QsdRaw);
}

/// Writes random data to the first 4 MiB and returns it.
fn write_some(socket: &Path, seed: u64, flush: bool) -> Vec<u8> {
    let socket = socket.to_owned();
    with_watchdog("write some data", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        let mut data = vec![0u8; 4 << 20];
        StdRng::seed_from_u64(seed).fill_bytes(&mut data);
        for (i, chunk) in data.chunks(MAX_REQ).enumerate() {
            q.write_ok((i * MAX_REQ) as u64, 0, chunk);
        }
        if flush {
            q.flush_ok();
        }
        data
    })
}

fn read_first(socket: &Path, len: usize, opts: ClientOpts) -> Vec<u8> {
    let socket = socket.to_owned();
    with_watchdog("read back", SESSION, move || {
        let mut c = Client::open(&socket, opts);
        let mut q = c.queue(0);
        let mut out = Vec::new();
        while out.len() < len {
            let n = (len - out.len()).min(MAX_REQ);
            out.extend(q.read_ok(out.len() as u64, 0, n));
        }
        out
    })
}

#[test]
fn sigterm_exits_cleanly_and_check_finds_the_image_clean() {
    let s = Setup::new(Peer::RrRow);
    let d = s.start(1);
    // No flush from the client: SIGTERM itself must make the data durable.
    let data = write_some(d.socket(), 4, false);
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(
        status.success(),
        "rr-row serve exited with {status} on SIGTERM"
    );
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&s.image)]);
    assert_eq!(code, 0, "rr-row check after SIGTERM: {out}{err}");
    let d = s.start(1);
    let got = read_first(d.socket(), data.len(), ClientOpts::default());
    assert!(got == data, "data changed across SIGTERM and reopen");
    // SIGINT is handled the same way.
    let status = d.signal_and_wait(libc::SIGINT, Duration::from_secs(20));
    assert!(
        status.success(),
        "rr-row serve exited with {status} on SIGINT"
    );
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&s.image)]);
    assert_eq!(code, 0, "rr-row check after SIGINT: {out}{err}");
}

/// The access modes of the daemon's open files under `prefix` (from /proc/PID/fdinfo).
fn open_modes(pid: u32, prefix: &Path) -> Vec<(PathBuf, i32)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/fd")).expect("cannot list the daemon's fds") {
        let e = e.expect("fd entry");
        let Ok(target) = std::fs::read_link(e.path()) else {
            continue;
        };
        if !target
            .to_string_lossy()
            .starts_with(&*prefix.to_string_lossy())
        {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            e.file_name().to_string_lossy()
        ))
        .expect("fdinfo");
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| i32::from_str_radix(f.trim(), 8).expect("octal flags"))
            .expect("flags line");
        v.push((target, flags & libc::O_ACCMODE));
    }
    v
}

#[test]
fn read_only_mode_refuses_writes_and_leaves_the_image_unchanged() {
    let s = Setup::new(Peer::RrRow);
    let d = s.start(1);
    let data = write_some(d.socket(), 5, true);
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success());
    let before = std::fs::read(&s.image).expect("read the image file");

    let d = s.start_with(1, true);
    // The daemon holds the image open read-only.
    let modes = open_modes(d.pid(), &s.image);
    assert!(
        !modes.is_empty(),
        "the daemon has no open file at {}",
        s.image.display()
    );
    for (path, mode) in &modes {
        assert_eq!(
            *mode,
            libc::O_RDONLY,
            "{} is open for writing in --read-only mode",
            path.display()
        );
    }
    // The device says it is read-only: blkio refuses to start a writable session.
    let socket = d.socket().to_owned();
    let err = with_watchdog(
        "writable client on a read-only device",
        SESSION,
        move || Client::connect(&socket, ClientOpts::default()).err(),
    );
    let err = err.expect("a writable client must be refused by a read-only device");
    assert_eq!(err.errno(), blkio::Errno::ROFS, "unexpected error: {err}");
    // Reads work.
    let ro = ClientOpts {
        read_only: true,
        ..ClientOpts::default()
    };
    assert!(read_first(d.socket(), data.len(), ro) == data);
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(status.success());
    let after = std::fs::read(&s.image).expect("read the image file");
    assert!(before == after, "serving read-only changed the image file");
}

#[test]
fn hostile_buffers_outside_guest_memory_fail_and_the_daemon_keeps_serving() {
    let s = Setup::new(Peer::RrRow);
    // The warnings are counted below, so the log level must not depend on the caller's.
    let mut o = ServeOpts::new(&s.image, SIZE);
    o.rust_log = Some("info");
    let mut d = start_rr_row(s.dir.path(), &o);
    let data = write_some(d.socket(), 6, true);
    let socket = d.socket().to_owned();
    let expect = data.clone();
    with_watchdog("hostile client", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        // A heap buffer: an address the backend's memory table does not contain.
        let mut heap = vec![0u8; 8192];
        let cases = [
            Req::ReadRaw {
                offset: 0,
                addr: heap.as_mut_ptr() as usize,
                len: 4096,
            },
            Req::ReadRaw {
                offset: 0,
                addr: 0,
                len: 4096,
            },
            Req::ReadRaw {
                offset: 4096,
                addr: usize::MAX - 4095,
                len: 4096,
            },
        ];
        for (i, req) in cases.into_iter().enumerate() {
            assert_eq!(q.one(req), EIO, "hostile request {i} should fail with -EIO");
        }
        // Many more of them: the daemon must not log one warning per request.
        let addr = heap.as_mut_ptr() as usize;
        for _ in 0..50 {
            let r = q.one(Req::ReadRaw {
                offset: 0,
                addr,
                len: 512,
            });
            assert_eq!(r, EIO);
        }
        assert!(
            heap.iter().all(|&b| b == 0),
            "the backend wrote outside the client's memory table"
        );
        // The same connection still serves.
        assert!(q.read_ok(0, 0, 8192) == expect[..8192]);
    });
    assert!(d.is_running(), "the daemon died after hostile requests");
    let log = d.log_text();
    let warnings = log.lines().filter(|l| l.contains(" WARN ")).count();
    assert!(
        (1..=5).contains(&warnings),
        "53 hostile requests logged {warnings} warnings: expected at least one, and at most \
         one per kind; log:\n{log}"
    );
    // And so does a new one.
    assert!(read_first(d.socket(), data.len(), ClientOpts::default()) == data);
}

#[test]
fn socket_mode_and_config_space_as_a_frontend_sees_them() {
    use std::os::unix::fs::PermissionsExt;
    let s = Setup::new(Peer::RrRow);
    let d = s.start(3);
    let mode = std::fs::metadata(d.socket())
        .expect("stat the socket")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "the socket must be created with mode 0600"
    );
    let socket = d.socket().to_owned();
    with_watchdog("config space", SESSION, move || {
        let c = connect(&socket, 1);
        let b = c.blkio();
        let prop = |name: &str| b.get_u64(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        let prop_i = |name: &str| b.get_i32(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(c.capacity(), SIZE);
        assert_eq!(prop_i("max-queues"), 3, "num_queues in the config space");
        assert!(prop_i("max-segments") >= 1, "SEG_MAX offered");
        assert!(prop("max-discard-len") > 0, "DISCARD offered with a limit");
        assert!(
            prop("max-write-zeroes-len") > 0,
            "WRITE_ZEROES offered with a limit"
        );
        let align = prop_i("request-alignment");
        assert!(
            (512..=65536).contains(&align) && align.count_ones() == 1,
            "blk_size {align} is not a power of two from 512 to 64K"
        );
    });
    drop(d);

    // --socket-mode overrides the default.
    let mut o = ServeOpts::new(&s.image, SIZE);
    o.extra = vec!["--socket-mode".into(), "660".into()];
    let d = start_rr_row(s.dir.path(), &o);
    let mode = std::fs::metadata(d.socket())
        .expect("stat the socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "--socket-mode 660");
}

#[test]
fn sigkill_keeps_flushed_data_and_recovers_an_ordered_prefix_of_later_writes() {
    const CHUNKS: usize = 16;
    let s = Setup::new(Peer::RrRow);
    let d = s.start(1);
    // A: 4 MiB, flushed.
    let a = write_some(d.socket(), 7, true);
    // B: the same 4 MiB rewritten in 16 chunks, one after the other, never flushed; the
    // connection stays open so that the daemon has no chance to flush on disconnect.
    let socket = d.socket().to_owned();
    let (b, client) = with_watchdog("unflushed writes", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        let mut b = vec![0u8; 4 << 20];
        StdRng::seed_from_u64(8).fill_bytes(&mut b);
        for (i, chunk) in b.chunks(MAX_REQ).enumerate() {
            q.write_ok((i * MAX_REQ) as u64, 0, chunk);
        }
        (b, c)
    });
    let status = d.signal_and_wait(libc::SIGKILL, Duration::from_secs(20));
    assert!(!status.success());
    drop(client);

    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&s.image)]);
    assert_eq!(
        code, 0,
        "rr-row check after SIGKILL must not find damage: {out}{err}"
    );
    let d = s.start(1);
    let got = read_first(d.socket(), a.len(), ClientOpts::default());
    // The disk is the state after some seq no older than the flush: A, then the first k
    // chunks of B for some k, in order.
    let k = (0..=CHUNKS)
        .take_while(|&i| {
            i < CHUNKS && got[i * MAX_REQ..(i + 1) * MAX_REQ] == b[i * MAX_REQ..(i + 1) * MAX_REQ]
        })
        .count();
    assert!(
        got[k * MAX_REQ..] == a[k * MAX_REQ..],
        "after SIGKILL the disk holds the first {k} unflushed chunks, then something that is \
         not the flushed data"
    );
    eprintln!("{k} of {CHUNKS} unflushed chunks survived SIGKILL");
    drop(d);
}

#[test]
fn a_frontend_vanishing_with_requests_in_flight_leaves_a_working_daemon() {
    scenario_frontend_vanishing(&[]);
}

#[test]
fn a_frontend_vanishing_with_requests_in_flight_on_pipelined_direct_queues_leaves_a_working_daemon()
{
    // With --direct the queues are pipelined: the abandoned writes are still running on the
    // request threads, which complete them into the old connection's rings, and the
    // abandoned reads on the queues' io_uring rings, when the frontend goes away.
    scenario_frontend_vanishing(&["--direct"]);
}

/// A frontend submits 48 writes and flushes on each of 2 queues and disconnects without
/// waiting; the daemon (`rr-row serve EXTRA`) must serve the next frontend, exit cleanly on
/// SIGTERM and leave a clean image.
fn scenario_frontend_vanishing(extra: &[&str]) {
    let s = Setup::new(Peer::RrRow);
    let opts = ServeOpts {
        queues: 2,
        extra: extra.iter().map(|a| (*a).to_string()).collect(),
        // The worker logs each batch that put reads on its ring.
        rust_log: Some("info,rr_row::vhost_user::backend=debug"),
        ..ServeOpts::new(&s.image, SIZE)
    };
    let mut d = s.peer.start(s.dir.path(), &opts);
    let socket = d.socket().to_owned();
    with_watchdog("abandoned requests", SESSION, move || {
        let mut c = connect(&socket, 2);
        // Data for the abandoned reads to fetch from the disk (with --direct, on the queues'
        // io_uring rings when the frontend goes).
        {
            let mut q = c.queue(0);
            for k in 0..16u64 {
                q.write_ok((32 << 20) + k * MAX_REQ as u64, 0, &vec![0x5a; MAX_REQ]);
            }
        }
        for (i, mut q) in c.queues().into_iter().enumerate() {
            let mem = q.mem();
            mem.fill(i * WINDOW, &vec![0xee; MAX_REQ]);
            let reqs: Vec<Req> = (0..48u64)
                .map(|j| match j % 4 {
                    3 => Req::Flush,
                    2 => Req::Read {
                        offset: (32 << 20) + (j % 16) * MAX_REQ as u64,
                        buf: i * WINDOW + MAX_REQ + 4096,
                        len: MAX_REQ,
                    },
                    _ => Req::Write {
                        offset: (j * 2 + i as u64) * MAX_REQ as u64,
                        buf: i * WINDOW,
                        len: MAX_REQ,
                    },
                })
                .collect();
            q.submit_and_abandon(&reqs);
        }
        // Dropping the client closes the connection with those requests in flight.
    });
    // The daemon notices, flushes, and serves the next frontend.
    let mut model = vec![0u8; SIZE as usize];
    let socket = d.socket().to_owned();
    let got = with_watchdog("next frontend", SESSION, move || {
        let mut c = connect(&socket, 1);
        let mut q = c.queue(0);
        let mut rng = StdRng::seed_from_u64(9);
        // Whatever the abandoned writes did, the region past them and the data the
        // abandoned reads read are untouched and usable.
        assert_eq!(q.read_ok(32 << 20, 0, MAX_REQ), vec![0x5a; MAX_REQ]);
        let lo = 36 << 20;
        let got = q.read_ok(lo, 0, MAX_REQ);
        random_io(&mut q, &mut model, &mut rng, lo, SIZE, 0, 50);
        got
    });
    assert_eq!(got, vec![0u8; MAX_REQ], "bytes nobody wrote changed");
    assert!(d.is_running());
    if extra.contains(&"--direct") {
        // The abandoned reads went on the queues' rings: the old backend, dropped after its
        // workers ended, waited for them there.
        let log = d.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("reads on the ring") && !l.contains(": 0 reads")),
            "no read went on a ring:\n{log}"
        );
    }
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    assert!(
        status.success(),
        "rr-row serve exited with {status} on SIGTERM"
    );
    let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(&s.image)]);
    assert_eq!(code, 0, "rr-row check: {out}{err}");
}

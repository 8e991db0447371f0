//! Smoke tests of the real `rr-row serve` binary with libblkio as the frontend: an image is
//! created on demand, data written through the socket survives a reconnect and a SIGTERM, the
//! image checks clean afterwards, and bad arguments fail with a clear message. (The full
//! integration suite against the binary lives in the harness tests.)

use std::fs::File;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, MemoryRegion, ReqFlags};
use rr_row::image::{Image, OpenMode};

const BIN: &str = env!("CARGO_BIN_EXE_rr-row");

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

struct Served {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Served {
    fn start(dir: &Path, extra: &[&str]) -> Served {
        let socket = dir.join("blk.sock");
        let log = dir.join("serve.log");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--image")
            .arg(dir.join("disk.rrow"))
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut s = Served { child, socket, log };
        let start = Instant::now();
        while !s.socket.exists() {
            if let Some(status) = s.child.try_wait().unwrap() {
                panic!("rr-row serve exited with {status}: {}", s.log_text());
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: sending a signal to our own child process, whose pid is still valid because
        // it has not been waited for yet.
        let r = unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        assert_eq!(r, 0);
        self.child.wait().unwrap()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        let region = b.alloc_mem_region(1 << 20).unwrap();
        b.map_mem_region(&region).unwrap();
        Client {
            queues: out.queues,
            region,
            blkio: b,
        }
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

fn wait(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    assert_eq!(q.do_io(&mut c, 1, None, None).unwrap(), 1);
    // SAFETY (test): do_io initialised the first completion.
    unsafe { c[0].assume_init_read() }.ret
}

fn pattern(i: u64) -> Vec<u8> {
    (0..8192u64)
        .map(|k| ((k * 31 + i * 7) % 256) as u8)
        .collect()
}

const OFFSETS: [u64; 4] = [0, 4096 * 3 + 512, 1 << 20, (64 << 20) - 8192];

#[test]
fn serve_creates_serves_and_closes_cleanly_on_sigterm() {
    let _w = Watchdog::new(120);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Served::start(
        dir.path(),
        &["--size", "64M", "--queues", "2", "--serial", "rr-row-smoke"],
    );
    let mode = std::fs::metadata(&s.socket).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let mut c = Client::connect(&s.socket, 2);
    assert_eq!(c.blkio.get_u64("capacity").unwrap(), 64 << 20);
    let buf = c.buf(0, 8192);
    for (i, off) in OFFSETS.iter().enumerate() {
        let q = &mut c.queues[i % 2];
        buf.copy_from_slice(&pattern(i as u64));
        q.write(*off, buf.as_ptr(), buf.len(), 0, ReqFlags::empty());
        assert_eq!(wait(q), 0, "write at {off}");
    }
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(wait(&mut c.queues[0]), 0);
    c.close();

    // Reconnect: the data is there.
    let mut c = Client::connect(&s.socket, 1);
    let buf = c.buf(0, 8192);
    for (i, off) in OFFSETS.iter().enumerate() {
        let q = &mut c.queues[0];
        q.read(*off, buf.as_mut_ptr(), buf.len(), 0, ReqFlags::empty());
        assert_eq!(wait(q), 0);
        assert_eq!(&buf[..], &pattern(i as u64)[..], "read back at {off}");
    }
    c.close();

    let status = s.terminate();
    assert!(status.success(), "exit status {status}: {}", s.log_text());
    assert!(!s.socket.exists(), "socket removed on exit");
    let log = s.log_text();
    for needle in [
        "created image",
        "image opened",
        "listening on",
        "frontend connected",
        "negotiated features",
        "frontend disconnected",
        "image closed",
    ] {
        assert!(log.contains(needle), "log lacks '{needle}':\n{log}");
    }

    let img = dir.path().join("disk.rrow");
    let report = Image::check(&img, false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    let image = Image::open(&img, OpenMode::ReadOnly).unwrap();
    let mut back = vec![0u8; 8192];
    for (i, off) in OFFSETS.iter().enumerate() {
        image.read_at(*off, &mut back).unwrap();
        assert_eq!(back, pattern(i as u64), "image content at {off}");
    }
}

#[test]
fn sigterm_while_a_frontend_is_connected_exits_zero() {
    let _w = Watchdog::new(120);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Served::start(dir.path(), &["--size", "16M"]);
    let mut c = Client::connect(&s.socket, 1);
    let buf = c.buf(0, 4096);
    buf.fill(0x5a);
    c.queues[0].write(4096, buf.as_ptr(), 4096, 0, ReqFlags::empty());
    assert_eq!(wait(&mut c.queues[0]), 0);
    let status = s.terminate();
    assert!(status.success(), "exit status {status}: {}", s.log_text());
    c.close();
    let image = Image::open(&dir.path().join("disk.rrow"), OpenMode::ReadOnly).unwrap();
    let mut back = vec![0u8; 4096];
    image.read_at(4096, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
}

fn serve_fails(dir: &Path, extra: &[&str]) -> String {
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(dir.join("x.sock"))
        .arg("--image")
        .arg(dir.join("disk.rrow"))
        .args(extra)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!dir.join("x.sock").exists());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(serve_fails(d, &[]).contains("no such image"));
    assert!(serve_fails(
        d,
        &["--size", "1M", "--record", "l.log", "--replay", "l.log"]
    )
    .contains("cannot be used with"));
    assert!(serve_fails(d, &["--size", "1M", "--record-mode", "full"]).contains("--record"));
    assert!(serve_fails(d, &["--size", "1M", "--queues", "0"]).contains("--queues"));
    assert!(serve_fails(d, &["--size", "1M", "--queue-size", "100"]).contains("--queue-size"));
    assert!(
        serve_fails(d, &["--size", "1M", "--serial", "012345678901234567890"]).contains("--serial")
    );
    assert!(serve_fails(d, &["--size", "1M", "--socket-mode", "9x"]).contains("--socket-mode"));
    assert!(
        !d.join("disk.rrow").exists(),
        "nothing is created on bad arguments"
    );
}

#[test]
fn a_socket_path_that_is_not_a_socket_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("x.sock"), b"precious").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--size", "1M", "--socket"])
        .arg(d.join("x.sock"))
        .arg("--image")
        .arg(d.join("disk.rrow"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(d.join("x.sock")).unwrap(), b"precious");
}

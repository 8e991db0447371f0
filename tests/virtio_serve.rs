//! Smoke tests of the real `rr-row serve` binary with libblkio as the frontend: an image is
//! created on demand, data written through the socket survives a reconnect and a SIGTERM, the
//! image checks clean afterwards, and bad arguments fail with a clear message. (The full
//! integration suite against the binary lives in the harness tests.)

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use blkio::ReqFlags;
use common::blk::{wait_one as wait, Client, ClientOpts};
use common::daemon::{start_rr_row, Daemon, ServeOpts};
use common::{rr_row, Watchdog};
use rr_row::image::{Image, OpenMode};

/// Starts `rr-row serve` on `DIR/disk.rrow` with `queues` queues (of the default size), the
/// `extra` arguments and `RUST_LOG=info`.
fn serve(dir: &Path, queues: u16, extra: &[&str]) -> Daemon {
    let opts = ServeOpts {
        size: None,
        queues,
        extra: extra.iter().map(|a| a.to_string()).collect(),
        rust_log: Some("info"),
        ..ServeOpts::new(&dir.join("disk.rrow"), 0)
    };
    start_rr_row(dir, &opts)
}

/// Sends SIGTERM and waits for the exit; returns the status, the socket path and the log.
fn terminate(d: Daemon) -> (ExitStatus, PathBuf, String) {
    let socket = d.socket().to_owned();
    let log = d.log_path().to_owned();
    let status = d.signal_and_wait(libc::SIGTERM, Duration::from_secs(60));
    (
        status,
        socket,
        std::fs::read_to_string(log).unwrap_or_default(),
    )
}

fn connect(d: &Daemon, queues: usize) -> Client {
    let opts = ClientOpts::new(queues, 256, 1 << 20);
    Client::open(d.socket(), opts)
}

/// `len` bytes of the client's buffer region at `off`.
fn region(c: &Client, off: usize, len: usize) -> &'static mut [u8] {
    // SAFETY (test): each test uses one range and drops the client last.
    unsafe { c.mem().slice(off, len) }
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
    let s = serve(
        dir.path(),
        2,
        &["--size", "64M", "--serial", "rr-row-smoke"],
    );
    let mode = std::fs::metadata(s.socket()).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let mut c = connect(&s, 2);
    assert_eq!(c.blkio().get_u64("capacity").unwrap(), 64 << 20);
    let buf = region(&c, 0, 8192);
    for (i, off) in OFFSETS.iter().enumerate() {
        let q = c.raw_queue(i % 2);
        buf.copy_from_slice(&pattern(i as u64));
        q.write(*off, buf.as_ptr(), buf.len(), 0, ReqFlags::empty());
        assert_eq!(wait(q), 0, "write at {off}");
    }
    c.raw_queue(0).flush(0, ReqFlags::empty());
    assert_eq!(wait(c.raw_queue(0)), 0);
    drop(c);

    // Reconnect: the data is there.
    let mut c = connect(&s, 1);
    let buf = region(&c, 0, 8192);
    for (i, off) in OFFSETS.iter().enumerate() {
        let q = c.raw_queue(0);
        q.read(*off, buf.as_mut_ptr(), buf.len(), 0, ReqFlags::empty());
        assert_eq!(wait(q), 0);
        assert_eq!(&buf[..], &pattern(i as u64)[..], "read back at {off}");
    }
    drop(c);

    let (status, socket, log) = terminate(s);
    assert!(status.success(), "exit status {status}: {log}");
    assert!(!socket.exists(), "socket removed on exit");
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
    let s = serve(dir.path(), 1, &["--size", "16M"]);
    let mut c = connect(&s, 1);
    let buf = region(&c, 0, 4096);
    buf.fill(0x5a);
    c.raw_queue(0)
        .write(4096, buf.as_ptr(), 4096, 0, ReqFlags::empty());
    assert_eq!(wait(c.raw_queue(0)), 0);
    let (status, _, log) = terminate(s);
    assert!(status.success(), "exit status {status}: {log}");
    drop(c);
    let image = Image::open(&dir.path().join("disk.rrow"), OpenMode::ReadOnly).unwrap();
    let mut back = vec![0u8; 4096];
    image.read_at(4096, &mut back).unwrap();
    assert!(back.iter().all(|&b| b == 0x5a));
}

/// Runs `rr-row serve --socket DIR/x.sock --image DIR/disk.rrow EXTRA...`, which must fail
/// without creating the socket; returns its stderr.
fn serve_fails(dir: &Path, extra: &[&str]) -> String {
    let (socket, image) = (dir.join("x.sock"), dir.join("disk.rrow"));
    let mut args = vec![
        "serve".as_ref(),
        "--socket".as_ref(),
        socket.as_os_str(),
        "--image".as_ref(),
        image.as_os_str(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let (code, _, stderr) = rr_row(&args);
    assert_ne!(code, 0);
    assert!(!socket.exists());
    stderr
}

#[test]
fn bad_arguments_fail_with_a_clear_message() {
    // An argument that is wrongly accepted starts a daemon that never exits.
    let _w = common::Watchdog::new(120);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(serve_fails(d, &[]).contains("no such image"));
    // Inside the temporary directory, so a wrongly accepted run cannot leave a log behind
    // in the working directory.
    let log = d.join("l.log");
    let log = log.to_str().unwrap();
    assert!(
        serve_fails(d, &["--size", "1M", "--record", log, "--replay", log])
            .contains("cannot be used with")
    );
    assert!(serve_fails(d, &["--size", "1M", "--record-mode", "full"]).contains("--record"));
    assert!(serve_fails(d, &["--size", "1M", "--queues", "0"]).contains("--queues"));
    assert!(serve_fails(d, &["--size", "1M", "--queue-size", "100"]).contains("--queue-size"));
    assert!(serve_fails(d, &["--size", "1M", "--io-threads", "0"]).contains("--io-threads 0"));
    assert!(serve_fails(d, &["--size", "1M", "--io-threads", "65"]).contains("out of range"));
    assert!(
        serve_fails(d, &["--size", "1M", "--serial", "012345678901234567890"]).contains("--serial")
    );
    assert!(serve_fails(d, &["--size", "1M", "--socket-mode", "9x"]).contains("--socket-mode"));
    // Page-cache preparation has no meaning when data bypasses the page cache.
    let direct_cached = serve_fails(d, &["--size", "1M", "--direct", "--preallocate-cached"]);
    assert!(
        direct_cached.contains("cannot be used with")
            && direct_cached.contains("--preallocate-cached"),
        "{direct_cached}"
    );
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
    let (code, _, stderr) = rr_row(&[
        "serve".as_ref(),
        "--size".as_ref(),
        "1M".as_ref(),
        "--socket".as_ref(),
        d.join("x.sock").as_os_str(),
        "--image".as_ref(),
        d.join("disk.rrow").as_os_str(),
    ]);
    assert_ne!(code, 0);
    assert!(stderr.contains("not a socket"));
    assert_eq!(std::fs::read(d.join("x.sock")).unwrap(), b"precious");
}

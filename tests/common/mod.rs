//! Shared helpers of RR-Row's integration tests.
//!
//! - [`daemon`]: start `rr-row serve` or `qemu-storage-daemon` on a socket, and a guard that
//!   kills the process when the test ends (also on panic), printing its log on failure.
//! - [`blk`]: a vhost-user-blk frontend built on the `blkio` crate, with request helpers and a
//!   watchdog (blkio has no timeout of its own for the vhost-user handshake).
//! - [`guest`]: the test assets prepared by `scripts/guest-assets.sh`, the guest initramfs and
//!   a QEMU (TCG) runner whose serial console the tests parse.
//! - [`image`]: creating and filling images.
//! - [`inproc`]: `rr_row::vhost_user::run` on a thread of the test, with a stop handle.
//! - [`mem_dev`]: an in-memory block device that records what it was asked.
//! - [`Watchdog`]: a whole-test time limit that aborts the test binary.
//!
//! Each test crate uses a different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

pub mod blk;
pub mod daemon;
pub mod guest;
pub mod image;
pub mod inproc;
pub mod mem_dev;
pub mod reclaim;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The `rr-row` binary cargo built for this test run.
pub fn rr_row_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_rr-row"))
}

/// Finds `tool` on PATH, or fails the test saying how to install it.
pub fn require_tool(tool: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!("`{tool}` is not on PATH: run ./scripts/test.sh, which installs what the tests need");
}

/// Runs `rr-row ARGS...` to completion and returns (exit code, stdout, stderr).
pub fn rr_row(args: &[&std::ffi::OsStr]) -> (i32, String, String) {
    let out = Command::new(rr_row_bin())
        .args(args)
        .output()
        .expect("cannot run the rr-row binary");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Runs `rr-row ARGS...` to completion with `RUST_LOG` unset, so that stderr holds only what
/// the command itself prints.
pub fn rr_row_output<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(rr_row_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run the rr-row binary")
}

/// Polls `cond` every 20 ms until it returns true; false if `limit` passed first.
pub fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if cond() {
            return true;
        }
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `f` on its own thread and fails the test if it has not finished within `limit`.
///
/// blkio blocks forever when a backend stops answering (handshake or requests), so every piece
/// of client work runs under this. A panic inside `f` is propagated as is.
pub fn with_watchdog<T, F>(what: &str, limit: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("watched: {what}"))
        .spawn(move || {
            let r = f();
            // The receiver is gone only if the watchdog already fired.
            let _ = tx.send(());
            r
        })
        .expect("cannot spawn the watched thread");
    match rx.recv_timeout(limit) {
        Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Ok(v) => v,
            Err(payload) => std::panic::resume_unwind(payload),
        },
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("watchdog: `{what}` did not finish within {limit:?} (backend hung?)")
        }
    }
}

/// A fresh temporary directory for one test (removed on drop).
pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("rr-row-test-")
        .tempdir()
        .expect("cannot create a temporary directory")
}

/// `path` as an `OsStr` argument.
pub fn arg(path: &Path) -> &std::ffi::OsStr {
    path.as_os_str()
}

/// Runs `rr-row ARGS` (which must print JSON) and parses its output; fails the test on a
/// non-zero exit or bad JSON.
pub fn json_of(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    let (code, out, err) = rr_row(args);
    assert_eq!(code, 0, "rr-row {args:?} failed: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("rr-row {args:?}: bad JSON ({e}): {out}"))
}

/// `rr-row log info LOG --output json`.
pub fn log_info(log: &Path) -> serde_json::Value {
    json_of(&[
        "log".as_ref(),
        "info".as_ref(),
        arg(log),
        "--output".as_ref(),
        "json".as_ref(),
    ])
}

/// The image's current seq, from `rr-row info --output json`.
pub fn image_seq(image: &Path) -> u64 {
    json_of(&[
        "info".as_ref(),
        arg(image),
        "--output".as_ref(),
        "json".as_ref(),
    ])["seq"]
        .as_u64()
        .expect("seq in rr-row info")
}

/// `rr-row export IMAGE OUT --quiet`, returning the exported bytes.
pub fn export(image: &Path, out: &Path) -> Vec<u8> {
    let _ = std::fs::remove_file(out);
    let (code, o, e) = rr_row(&["export".as_ref(), arg(image), arg(out), "--quiet".as_ref()]);
    assert_eq!(code, 0, "rr-row export failed: {o}{e}");
    std::fs::read(out).expect("cannot read the export")
}

/// Aborts the whole test binary if it is still alive `secs` seconds after creation (dropping
/// it disarms it).
///
/// For tests whose blocking calls run on the test's own thread (blkio queues driven inline, an
/// in-process daemon): libblkio has no timeouts, and a hung handshake must end CI rather than
/// hang it. Where the client work can move to its own thread, [`with_watchdog`] fails just
/// that test instead.
pub struct Watchdog(Arc<AtomicBool>);

impl Watchdog {
    /// Arms a watchdog of `secs` seconds.
    pub fn new(secs: u64) -> Self {
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

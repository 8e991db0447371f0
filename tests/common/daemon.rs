//! Backend processes under test: `rr-row serve` and `qemu-storage-daemon`, each wrapped in a
//! [`Daemon`] guard that kills it when dropped.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::{require_tool, rr_row_bin, wait_until};

/// How long a backend may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// A running backend process serving a vhost-user-blk socket.
///
/// Dropping it kills the process (SIGKILL) and reaps it; when the test is failing, the tail of
/// the process's log (its stderr) is printed to help the diagnosis.
pub struct Daemon {
    child: Option<Child>,
    name: String,
    socket: PathBuf,
    log: PathBuf,
}

impl Daemon {
    /// Spawns `cmd` (stdout and stderr to `log`) and waits until `socket` exists as a socket.
    pub fn spawn(name: &str, mut cmd: Command, socket: &Path, log: &Path) -> Daemon {
        let log_file = File::create(log).expect("cannot create the daemon log");
        let log_err = log_file.try_clone().expect("cannot clone the log file");
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut d = Daemon {
            child: Some(child),
            name: name.to_owned(),
            socket: socket.to_owned(),
            log: log.to_owned(),
        };
        d.wait_for_socket();
        d
    }

    fn wait_for_socket(&mut self) {
        let socket = self.socket.clone();
        let mut exited = None;
        let ready = wait_until(SOCKET_TIMEOUT, || {
            if let Ok(Some(status)) = self.child_mut().try_wait() {
                exited = Some(status);
                return true;
            }
            std::fs::metadata(&socket).is_ok_and(|m| m.file_type().is_socket())
        });
        if let Some(status) = exited {
            panic!(
                "{} exited ({status}) before creating {}; its log:\n{}",
                self.name,
                socket.display(),
                self.log_text()
            );
        }
        assert!(
            ready,
            "{} did not create {} within {SOCKET_TIMEOUT:?}; its log:\n{}",
            self.name,
            socket.display(),
            self.log_text()
        );
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("daemon already reaped")
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("daemon already reaped").id()
    }

    /// The file the process logs to (still readable after [`Daemon::signal_and_wait`]).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many requests whose debug line contains `what` (e.g. `": read sector"`) went
    /// through a device batch (`read_many`/`write_many`): the lines `virtio_blk::execute`
    /// logs at debug level ending in `(batched)`.
    pub fn batched_requests(&self, what: &str) -> usize {
        self.log_text()
            .lines()
            .filter(|l| l.contains(what) && l.ends_with("(batched)"))
            .count()
    }

    /// Whether `rr-row serve`'s startup line says its queues are pipelined.
    pub fn serves_pipelined(&self) -> bool {
        self.log_text()
            .lines()
            .any(|l| l.contains("listening on") && l.contains(", pipelined"))
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child_mut().try_wait(), Ok(None))
    }

    /// Sends `signal` and waits up to `limit` for the process to exit; returns its status.
    /// Fails the test (after killing it) if it does not exit in time.
    pub fn signal_and_wait(mut self, signal: i32, limit: Duration) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.pid()).expect("pid out of range");
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet (we own the
        // Child), so the pid cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        let mut status = None;
        wait_until(limit, || {
            status = self.child_mut().try_wait().expect("waitpid failed");
            status.is_some()
        });
        match status {
            Some(s) => {
                self.child = None;
                s
            }
            None => panic!(
                "{} did not exit within {limit:?} after signal {signal}; its log:\n{}",
                self.name,
                self.log_text()
            ),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!(
                "---- last lines of {} log ({}) ----",
                self.name,
                self.log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Options of an `rr-row serve` run.
#[derive(Clone, Debug)]
pub struct ServeOpts {
    /// Image to serve.
    pub image: PathBuf,
    /// `--size`: create the image with this size when it does not exist.
    pub size: Option<u64>,
    /// `--queues`.
    pub queues: u16,
    /// `--queue-size`.
    pub queue_size: u16,
    /// `--read-only`.
    pub read_only: bool,
    /// Further arguments.
    pub extra: Vec<String>,
    /// `RUST_LOG` for the daemon; `None`: the test's own `RUST_LOG`, else `info`.
    pub rust_log: Option<&'static str>,
}

impl ServeOpts {
    /// Serve `image`, creating it with `size` bytes if needed, one queue of 256.
    pub fn new(image: &Path, size: u64) -> ServeOpts {
        ServeOpts {
            image: image.to_owned(),
            size: Some(size),
            queues: 1,
            queue_size: 256,
            read_only: false,
            extra: Vec::new(),
            rust_log: None,
        }
    }
}

/// Starts `rr-row serve` with a socket and log in `dir` (`RUST_LOG` as [`ServeOpts::rust_log`]).
pub fn start_rr_row(dir: &Path, opts: &ServeOpts) -> Daemon {
    let socket = dir.join("rr-row.sock");
    let _ = std::fs::remove_file(&socket);
    let mut cmd = Command::new(rr_row_bin());
    cmd.arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(&opts.image)
        .arg("--queues")
        .arg(opts.queues.to_string())
        .arg("--queue-size")
        .arg(opts.queue_size.to_string());
    if let Some(size) = opts.size {
        cmd.arg("--size").arg(size.to_string());
    }
    if opts.read_only {
        cmd.arg("--read-only");
    }
    cmd.args(&opts.extra);
    match opts.rust_log {
        Some(level) => {
            cmd.env("RUST_LOG", level);
        }
        None if std::env::var_os("RUST_LOG").is_none() => {
            cmd.env("RUST_LOG", "info");
        }
        None => {}
    }
    Daemon::spawn("rr-row serve", cmd, &socket, &dir.join("rr-row.log"))
}

/// Runs `rr-row serve --replay LOG` on `image` (socket in `dir`) and expects it to refuse to
/// start: it must exit unsuccessfully within 30 s, without ever creating its socket. Returns
/// its stderr.
pub fn replay_refused(dir: &Path, image: &Path, log: &Path) -> String {
    let socket = dir.join("refused.sock");
    let mut child = Command::new(rr_row_bin())
        .arg("serve")
        .arg("--socket")
        .arg(&socket)
        .arg("--image")
        .arg(image)
        .arg("--replay")
        .arg(log)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start rr-row serve");
    let exited = wait_until(Duration::from_secs(30), || {
        child.try_wait().expect("waitpid").is_some()
    });
    if !exited {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "rr-row serve --replay {} did not refuse the log",
            log.display()
        );
    }
    let out = child.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "serve --replay {} started: {err}",
        log.display()
    );
    assert!(
        !socket.exists(),
        "the socket was created before the refusal"
    );
    err
}

/// The image formats qemu-storage-daemon serves in these tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QsdFormat {
    /// A raw file.
    Raw,
    /// A qcow2 file.
    Qcow2,
}

/// Creates an image for qemu-storage-daemon with `qemu-img create`.
pub fn qemu_img_create(path: &Path, format: QsdFormat, size: u64) {
    let fmt = match format {
        QsdFormat::Raw => "raw",
        QsdFormat::Qcow2 => "qcow2",
    };
    let status = Command::new(require_tool("qemu-img"))
        .args(["create", "-q", "-f", fmt])
        .arg(path)
        .arg(size.to_string())
        .status()
        .expect("cannot run qemu-img");
    assert!(status.success(), "qemu-img create failed: {status}");
}

/// Starts qemu-storage-daemon exporting `image` over vhost-user-blk, with a socket and log in
/// `dir` (buffered I/O, io_uring, discard passed down as unmap).
pub fn start_qsd(
    dir: &Path,
    image: &Path,
    format: QsdFormat,
    queues: u16,
    writable: bool,
) -> Daemon {
    let socket = dir.join("qsd.sock");
    let _ = std::fs::remove_file(&socket);
    let fmt = match format {
        QsdFormat::Raw => "raw",
        QsdFormat::Qcow2 => "qcow2",
    };
    let mut cmd = Command::new(require_tool("qemu-storage-daemon"));
    cmd.arg("--blockdev")
        .arg(format!(
            "driver=file,node-name=f,filename={},cache.direct=off,aio=io_uring,discard=unmap",
            image.display()
        ))
        .arg("--blockdev")
        .arg(format!("driver={fmt},node-name=fmt,file=f,discard=unmap"))
        .arg("--export")
        .arg(format!(
            "type=vhost-user-blk,id=e,node-name=fmt,addr.type=unix,addr.path={},writable={},num-queues={queues}",
            socket.display(),
            if writable { "on" } else { "off" }
        ));
    Daemon::spawn("qemu-storage-daemon", cmd, &socket, &dir.join("qsd.log"))
}

/// The backend of a comparative test: the product, or the reference that validates the
/// harness itself (when the reference passes and the rr-row run fails, the daemon is at fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// `rr-row serve`.
    RrRow,
    /// qemu-storage-daemon exporting a raw file.
    QsdRaw,
}

impl Peer {
    /// Makes `image` ready to be served with `size` bytes: a raw file from `qemu-img create`
    /// for qemu-storage-daemon; nothing for rr-row, whose `--size` creates the image.
    pub fn prepare_image(self, image: &Path, size: u64) {
        if self == Peer::QsdRaw {
            qemu_img_create(image, QsdFormat::Raw, size);
        }
    }

    /// Starts the backend with its socket and log in `dir`, serving `opts.image` with
    /// `opts.queues` queues, read-only if `opts.read_only`; the other options apply to rr-row
    /// only.
    pub fn start(self, dir: &Path, opts: &ServeOpts) -> Daemon {
        match self {
            Peer::RrRow => start_rr_row(dir, opts),
            Peer::QsdRaw => start_qsd(
                dir,
                &opts.image,
                QsdFormat::Raw,
                opts.queues,
                !opts.read_only,
            ),
        }
    }
}

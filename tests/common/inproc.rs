//! The vhost-user daemon loop (`rr_row::vhost_user::run`) running in-process on a thread over
//! any [`BlockDevice`], with a [`StopHandle`] to end it; the socket lives in a fresh tempdir.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rr_row::blockdev::BlockDevice;
use rr_row::vhost_user::{run, BackendConfig, DaemonConfig, StopHandle};
use rr_row::virtio_blk::serial_bytes;

use super::{tempdir, wait_until};

/// How long the daemon may take to create its socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);

/// A daemon thread serving one device. Dropping it (a failing test) stops it.
pub struct InProcDaemon {
    stop: StopHandle,
    thread: Option<JoinHandle<()>>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl InProcDaemon {
    /// Starts `run` over `dev` with `queues` queues of 256, socket mode 0600, the given `once`
    /// and serial, and waits until its socket exists. `run` failing fails the test on `stop`.
    pub fn start(dev: Arc<dyn BlockDevice>, queues: u16, once: bool, serial: &str) -> Self {
        Self::start_with(
            dev,
            BackendConfig::new(queues, 256, serial_bytes(serial)),
            once,
        )
    }

    /// As [`start`](Self::start), with a backend configuration of the test's own.
    pub fn start_with(dev: Arc<dyn BlockDevice>, backend: BackendConfig, once: bool) -> Self {
        let _ = env_logger::builder().is_test(true).try_init();
        let dir = tempdir();
        let socket = dir.path().join("blk.sock");
        let cfg = DaemonConfig {
            socket: socket.clone(),
            socket_mode: 0o600,
            once,
            backend,
        };
        let stop = StopHandle::new().expect("cannot create a stop handle");
        let s = stop.clone();
        let thread = std::thread::spawn(move || run(&cfg, dev, &s).expect("the daemon failed"));
        assert!(
            wait_until(SOCKET_TIMEOUT, || socket.exists()),
            "socket never appeared"
        );
        InProcDaemon {
            stop,
            thread: Some(thread),
            socket,
            _dir: dir,
        }
    }

    /// The vhost-user socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Stops the daemon, waits for it and asserts that it removed its socket.
    pub fn stop(mut self) {
        self.stop.stop();
        self.take_thread()
            .join()
            .expect("the daemon thread panicked");
        assert!(!self.socket.exists(), "the socket file is removed on exit");
    }

    /// Waits, without stopping it, for the daemon to return on its own (`once` after the
    /// frontend left), and asserts that it removed its socket; a daemon that never returns is
    /// left to the test's watchdog.
    pub fn join(mut self) {
        self.take_thread()
            .join()
            .expect("the daemon thread panicked");
        assert!(!self.socket.exists(), "the socket file is removed on exit");
    }

    /// Waits for the daemon to return on its own, stopping it if it has not after `limit`.
    pub fn join_or_stop_after(mut self, limit: Duration) {
        let t = self.take_thread();
        let start = Instant::now();
        while !t.is_finished() {
            if start.elapsed() > limit {
                self.stop.stop();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        t.join().expect("the daemon thread panicked");
    }

    fn take_thread(&mut self) -> JoinHandle<()> {
        self.thread.take().expect("daemon already joined")
    }
}

impl Drop for InProcDaemon {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.stop.stop();
            let _ = t.join();
        }
    }
}

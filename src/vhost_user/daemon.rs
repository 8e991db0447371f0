//! The daemon loop: listen on a unix socket, serve one vhost-user frontend at a time, flush the
//! device whenever a frontend goes away, and stop cleanly on request (SIGINT / SIGTERM through
//! [`StopHandle`]).
//!
//! Each connection gets a fresh [`BlkBackend`] and `VhostUserDaemon` (so request counters and
//! negotiated state start over) around the one shared device. When the connection ends the
//! daemon object is dropped, which stops and joins its queue worker threads before the device
//! is flushed.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use log::{error, info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blockdev::BlockDevice;

use super::backend::{BackendConfig, BackendError, BlkBackend, RequestCounters};

/// Settings of the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Path of the listening socket.
    pub socket: PathBuf,
    /// Mode of the socket file (e.g. 0o600).
    pub socket_mode: u32,
    /// Return after the first frontend disconnects.
    pub once: bool,
    /// Backend settings.
    pub backend: BackendConfig,
}

/// Errors of the daemon loop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The socket path is taken by something that is not a stale socket.
    #[error("{0}: exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is listening on the socket.
    #[error("{0}: another process is listening on this socket")]
    SocketInUse(PathBuf),
    /// Creating the listening socket failed.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Setting up the stop event or polling failed.
    #[error("event handling failed: {0}")]
    Event(io::Error),
    /// The backend configuration is invalid.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The vhost-user machinery failed.
    #[error("vhost-user: {0}")]
    VhostUser(String),
}

struct StopState {
    stopping: AtomicBool,
    wake: EventFd,
    conn: Mutex<Option<ShutdownHandle>>,
}

/// Asks a running daemon loop to stop: the current connection is shut down, the device is
/// flushed and [`run`] returns. Cheap to clone; safe to use from any thread.
#[derive(Clone)]
pub struct StopHandle(Arc<StopState>);

impl StopHandle {
    /// A new handle, not yet stopped.
    pub fn new() -> Result<Self, DaemonError> {
        Ok(StopHandle(Arc::new(StopState {
            stopping: AtomicBool::new(false),
            wake: EventFd::new(EFD_NONBLOCK).map_err(DaemonError::Event)?,
            conn: Mutex::new(None),
        })))
    }

    /// Requests the stop.
    pub fn stop(&self) {
        self.0.stopping.store(true, Ordering::Release);
        if let Err(e) = self.0.wake.write(1) {
            error!("cannot wake the daemon loop: {e}");
        }
        if let Ok(conn) = self.0.conn.lock() {
            if let Some(h) = conn.as_ref() {
                h.shutdown();
            }
        }
    }

    /// True once [`StopHandle::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        self.0.stopping.load(Ordering::Acquire)
    }

    fn set_connection(&self, h: Option<ShutdownHandle>) {
        if let Ok(mut conn) = self.0.conn.lock() {
            *conn = h;
        }
        // A stop that raced with the connection being set up must still end it.
        if self.is_stopping() {
            self.stop_connection();
        }
    }

    fn stop_connection(&self) {
        if let Ok(conn) = self.0.conn.lock() {
            if let Some(h) = conn.as_ref() {
                h.shutdown();
            }
        }
    }
}

/// Stops `stop` on SIGINT or SIGTERM (from a background thread). A second signal exits the
/// process at once with status 1, without flushing: the image is crash consistent, so this only
/// loses writes the guest had not flushed.
pub fn stop_on_signals(stop: StopHandle) -> io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut forever = signals.forever();
            if let Some(sig) = forever.next() {
                info!("signal {sig} received: stopping");
                stop.stop();
            }
            if let Some(sig) = forever.next() {
                warn!("second signal {sig} received: exiting without flushing");
                std::process::exit(1);
            }
        })?;
    Ok(())
}

/// Prepares the socket path: a stale socket is removed, anything else is refused.
fn clear_stale_socket(path: &Path) -> Result<(), DaemonError> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DaemonError::Listen {
            path: path.to_owned(),
            source: e,
        }),
        Ok(m) if !m.file_type().is_socket() => Err(DaemonError::NotASocket(path.to_owned())),
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(DaemonError::SocketInUse(path.to_owned()));
            }
            fs::remove_file(path).map_err(|e| DaemonError::Listen {
                path: path.to_owned(),
                source: e,
            })
        }
    }
}

/// Creates the listening socket with mode `mode`, never more open than 0600 in between.
fn listen(path: &Path, mode: u32) -> Result<Listener, DaemonError> {
    clear_stale_socket(path)?;
    // SAFETY: umask only changes the process file-mode creation mask; it cannot fail.
    let old = unsafe { libc::umask(0o177) };
    let listener = Listener::new(path, false);
    // SAFETY: as above; restores the previous mask.
    unsafe { libc::umask(old) };
    let listener = listener.map_err(|e| DaemonError::Listen {
        path: path.to_owned(),
        source: io::Error::other(e.to_string()),
    })?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(|e| {
        DaemonError::Listen {
            path: path.to_owned(),
            source: e,
        }
    })?;
    Ok(listener)
}

/// Waits until a frontend connects (true) or a stop is requested (false).
fn wait_for_connection(listener: &Listener, stop: &StopHandle) -> Result<bool, DaemonError> {
    loop {
        if stop.is_stopping() {
            return Ok(false);
        }
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.0.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd structs that outlives the call, and the
        // length passed matches it.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(DaemonError::Event(e));
        }
        if stop.is_stopping() {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
    }
}

fn is_disconnect(e: &vhost_user_backend::Error) -> bool {
    matches!(
        e,
        vhost_user_backend::Error::HandleRequest(
            VhostUserError::Disconnected
                | VhostUserError::PartialMessage
                | VhostUserError::SocketBroken(_)
        )
    )
}

/// Serves `dev` on `cfg.socket` until stopped (or, with `cfg.once`, until the first frontend
/// disconnects). The device is flushed after every connection. Returns when the loop ends; the
/// caller closes the device.
pub fn run(
    cfg: &DaemonConfig,
    dev: Arc<dyn BlockDevice>,
    stop: &StopHandle,
) -> Result<(), DaemonError> {
    let mut listener = listen(&cfg.socket, cfg.socket_mode)?;
    info!(
        "listening on {} ({} queue(s) of up to {} descriptors, {} request thread(s) per queue{}, mode {:o})",
        cfg.socket.display(),
        cfg.backend.num_queues,
        cfg.backend.queue_size,
        cfg.backend.io_threads,
        if cfg.backend.pipelined() {
            ", pipelined"
        } else {
            ""
        },
        cfg.socket_mode
    );
    // One set of request counters for the whole run: indices count on across reconnections.
    let counters = RequestCounters::new(cfg.backend.num_queues);
    while wait_for_connection(&listener, stop)? {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::with_counters(
            dev.clone(),
            cfg.backend.clone(),
            mem.clone(),
            counters.clone(),
        )?);
        let mut daemon = VhostUserDaemon::new("rr-row".into(), backend.clone(), mem)
            .map_err(|e| DaemonError::VhostUser(e.to_string()))?;
        // Each queue's ring of reads wakes the queue's worker (thread i serves queue i).
        let handlers = daemon.get_epoll_handlers();
        for (queue, fd) in backend.ring_read_fds() {
            let Some(h) = handlers.get(usize::from(queue)) else {
                continue;
            };
            match h.register_listener(fd, EventSet::IN, u64::from(backend.ring_event())) {
                Ok(()) => backend.ring_registered(queue),
                Err(e) => warn!("queue {queue}: reads go to the request threads: {e}"),
            }
        }
        daemon
            .start(&mut listener)
            .map_err(|e| DaemonError::VhostUser(e.to_string()))?;
        info!("frontend connected");
        stop.set_connection(daemon.shutdown_handle());
        let result = daemon.wait();
        stop.set_connection(None);
        match result {
            Ok(()) => info!("frontend disconnected"),
            Err(e) if is_disconnect(&e) => info!("frontend disconnected"),
            Err(e) => warn!("connection ended with an error: {e}"),
        }
        // Dropping the daemon stops and joins the queue workers: no request is in flight after.
        drop(daemon);
        match dev.flush(&super::INTERNAL_CTX) {
            Ok(()) => info!("device flushed"),
            Err(e) => error!("flush after disconnect failed: {e}"),
        }
        if cfg.once {
            break;
        }
    }
    Ok(())
}

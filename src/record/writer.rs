//! [`LogWriter`]: appends records to a log from any number of queue threads.
//!
//! Records are encoded into one frame buffer under a mutex. A frame is written to the file with
//! a single `write` when its payload reaches [`FRAME_TARGET`] bytes, when [`LogWriter::sync`] is
//! called (the guest flushed its disk), and by a timer thread every `sync_interval`, which also
//! `fdatasync`s the file. Memory is bounded by one frame. A crash loses at most the records not
//! yet synced and leaves a torn tail that readers drop cleanly.
//!
//! A write or sync error stops the log for good (later appends return
//! [`RecordError::Stopped`]): the file then ends at its last complete frame, a valid prefix,
//! rather than continuing after a hole.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, warn};

use super::format::{
    frame_header, Codec, LogHeader, Record, RecordRef, FRAME_HEADER_LEN, HEADER_LEN,
};
use super::RecordError;

/// Payload size at which a frame is written out.
pub const FRAME_TARGET: usize = 64 * 1024;

/// The default interval of the periodic sync.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(1);

/// Counters of a writer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Records appended.
    pub records: u64,
    /// Frames written.
    pub frames: u64,
    /// Bytes in the file (header included).
    pub bytes: u64,
    /// `fdatasync` calls made.
    pub syncs: u64,
}

struct State {
    codec: Codec,
    /// The current frame: FRAME_HEADER_LEN bytes reserved for its header, then the payload.
    frame: Vec<u8>,
    stats: WriterStats,
    /// Frames written so far (the generation a sync must cover).
    written_gen: u64,
    failed: Option<String>,
}

struct Shared {
    file: File,
    path: PathBuf,
    state: Mutex<State>,
    /// Serialises fdatasync calls; holds the generation known to be on stable storage.
    synced_gen: Mutex<u64>,
    stop: Mutex<bool>,
    wake: Condvar,
}

/// Appends records to a log file; shared by all queue threads (`&self` methods).
pub struct LogWriter {
    shared: Arc<Shared>,
    header: LogHeader,
    timer: Option<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave the log state half-updated in a way that
    // matters more than losing the log: keep going with whatever is there.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    /// Writes the current frame out (if it holds any record). Called with the state locked.
    fn emit(&self, st: &mut State) -> Result<(), RecordError> {
        if let Some(e) = &st.failed {
            return Err(RecordError::Stopped(e.clone()));
        }
        if st.frame.len() <= FRAME_HEADER_LEN {
            return Ok(());
        }
        let hdr = frame_header(st.frame.get(FRAME_HEADER_LEN..).unwrap_or_default())?;
        if let Some(h) = st.frame.get_mut(..FRAME_HEADER_LEN) {
            h.copy_from_slice(&hdr);
        }
        if let Err(e) = (&self.file).write_all(&st.frame) {
            return Err(self.fail(st, e));
        }
        st.stats.frames += 1;
        st.stats.bytes += st.frame.len() as u64;
        st.written_gen += 1;
        st.frame.truncate(FRAME_HEADER_LEN);
        st.codec.reset();
        Ok(())
    }

    fn fail(&self, st: &mut State, e: std::io::Error) -> RecordError {
        error!(
            "record log {}: {e}; recording stops here, the log keeps the records before this point",
            self.path.display()
        );
        st.failed = Some(e.to_string());
        RecordError::Io(e)
    }

    fn sync(&self) -> Result<(), RecordError> {
        let target = {
            let mut st = lock(&self.state);
            self.emit(&mut st)?;
            st.written_gen
        };
        let mut synced = lock(&self.synced_gen);
        if *synced >= target {
            // A sync that started after our frame was written covered it (group commit).
            return Ok(());
        }
        // Every frame written before the fdatasync starts is covered by it, including frames
        // of other threads that are now waiting for this lock.
        let covered = lock(&self.state).written_gen;
        if let Err(e) = self.file.sync_data() {
            let mut st = lock(&self.state);
            return Err(self.fail(&mut st, e));
        }
        *synced = covered;
        lock(&self.state).stats.syncs += 1;
        Ok(())
    }
}

impl LogWriter {
    /// Creates a new log at `path` (mode 0600, refusing an existing file), writes and syncs its
    /// header, and starts the periodic sync (`sync_interval`; zero disables it).
    pub fn create(
        path: &Path,
        header: &LogHeader,
        sync_interval: Duration,
    ) -> Result<Self, RecordError> {
        // Mode 0600: a full-mode log holds guest data, a block-id log says what the guest read.
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => RecordError::Exists(path.to_path_buf()),
                _ => RecordError::Io(e),
            })?;
        (&file).write_all(&header.encode())?;
        file.sync_data()?;
        // Make the new file's directory entry durable too.
        if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
                warn!("record log: cannot sync directory {}: {e}", dir.display());
            }
        }
        let mut frame = Vec::with_capacity(FRAME_TARGET + FRAME_TARGET / 4);
        frame.resize(FRAME_HEADER_LEN, 0);
        let shared = Arc::new(Shared {
            file,
            path: path.to_path_buf(),
            state: Mutex::new(State {
                codec: Codec::new(header.block_size),
                frame,
                stats: WriterStats {
                    bytes: HEADER_LEN as u64,
                    ..WriterStats::default()
                },
                written_gen: 0,
                failed: None,
            }),
            synced_gen: Mutex::new(0),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let timer = if sync_interval.is_zero() {
            None
        } else {
            let s = Arc::clone(&shared);
            Some(
                std::thread::Builder::new()
                    .name("rr-row-log-sync".into())
                    .spawn(move || periodic_sync(&s, sync_interval))?,
            )
        };
        debug!("record log {} created: {header:?}", path.display());
        Ok(Self {
            shared,
            header: *header,
            timer,
        })
    }

    /// The header this log was created with.
    pub fn header(&self) -> &LogHeader {
        &self.header
    }

    /// Appends one record. The frame goes to the file when it is full; durability comes with
    /// the next [`sync`](Self::sync) or periodic sync.
    pub fn append(&self, rec: &Record) -> Result<(), RecordError> {
        self.append_ref(&rec.view())
    }

    /// [`append`](Self::append) for a borrowed record (what the recorder uses: nothing is
    /// allocated per record).
    pub fn append_ref(&self, rec: &RecordRef<'_>) -> Result<(), RecordError> {
        let mut st = lock(&self.shared.state);
        if let Some(e) = &st.failed {
            return Err(RecordError::Stopped(e.clone()));
        }
        let State { codec, frame, .. } = &mut *st;
        // On error the codec appends nothing and keeps its state.
        codec.encode_ref(rec, frame)?;
        st.stats.records += 1;
        if st.frame.len() >= FRAME_TARGET + FRAME_HEADER_LEN {
            self.shared.emit(&mut st)?;
        }
        Ok(())
    }

    /// Writes out the current frame and makes everything appended so far durable
    /// (`fdatasync`). Called when the guest flushes its disk.
    pub fn sync(&self) -> Result<(), RecordError> {
        self.shared.sync()
    }

    /// Counters so far.
    pub fn stats(&self) -> WriterStats {
        lock(&self.shared.state).stats
    }

    /// Stops the periodic sync, writes and syncs the rest; returns the final counters.
    pub fn finish(mut self) -> Result<WriterStats, RecordError> {
        self.stop_timer();
        self.shared.sync()?;
        Ok(self.stats())
    }

    fn stop_timer(&mut self) {
        if let Some(t) = self.timer.take() {
            *lock(&self.shared.stop) = true;
            self.shared.wake.notify_all();
            if t.join().is_err() {
                error!("record log: the periodic sync thread panicked");
            }
        }
    }
}

impl Drop for LogWriter {
    fn drop(&mut self) {
        self.stop_timer();
        if let Err(e) = self.shared.sync() {
            error!(
                "record log {}: final sync failed: {e}",
                self.shared.path.display()
            );
        }
    }
}

fn periodic_sync(shared: &Shared, interval: Duration) {
    let mut stop = lock(&shared.stop);
    loop {
        let (s, _) = shared
            .wake
            .wait_timeout(stop, interval)
            .unwrap_or_else(|p| p.into_inner());
        stop = s;
        if *stop {
            return;
        }
        drop(stop);
        if let Err(e) = shared.sync() {
            debug!("record log periodic sync: {e}");
        }
        stop = lock(&shared.stop);
    }
}

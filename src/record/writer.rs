//! [`LogWriter`]: appends records to a log from any number of queue threads.
//!
//! With [`LogStreams::PerThread`] (what the recorder writes) every recording thread encodes
//! into a frame of its own, so the threads of all queues never share a lock or a cache line
//! per record: each thread locks only its own stream, which nobody else touches but a sync.
//! A frame is written to the file with a single `write` when its payload reaches
//! [`FRAME_TARGET`] bytes (by the thread that filled it), and every stream's frame is written
//! when [`LogWriter::sync`] is called (the guest flushed its disk) and by a timer thread every
//! `sync_interval`, which also `fdatasync`s the file. A [`LogStreams::Single`] log has one
//! stream that every thread shares. Memory is bounded by one frame per stream, at most
//! [`STREAMS`] of them. A crash loses at most the records not yet synced and leaves a torn
//! tail that readers drop cleanly.
//!
//! A write or sync error stops the log for good (later appends return
//! [`RecordError::Stopped`]): the file then ends at its last complete frame, a valid prefix,
//! rather than continuing after a hole.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use log::{debug, error, warn};

use super::format::{
    frame_header, Codec, IndexKeying, LogHeader, LogStreams, Record, RecordRef, FRAME_HEADER_LEN,
    HEADER_LEN,
};
use super::RecordError;

/// Payload size at which a frame is written out.
pub const FRAME_TARGET: usize = 64 * 1024;

/// The default interval of the periodic sync. It was a second until session 21: each sync
/// wakes a thread that disturbs the placement of the queues' threads and their client's on a
/// machine with few CPUs, and recorded 4 KiB reads at queue depth 1 on two queues ran at 0.88x
/// of plain serving with a sync every second, 0.99x with one every five seconds
/// (docs/perf-notes.md, section 43). A guest flush still syncs the log before it completes.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);

/// Number of streams of a [`LogStreams::PerThread`] writer. Threads are numbered in the order
/// they first append to any log, and thread `n` uses stream `n % STREAMS`: the daemon's
/// recording threads (a worker and `--io-threads - 1` helpers per queue) each get a stream of
/// their own as long as there are at most this many.
pub const STREAMS: usize = 32;

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

/// One stream: a frame being filled and the delta state of its records.
struct Stream {
    codec: Codec,
    /// The current frame: FRAME_HEADER_LEN bytes reserved for its header, then the payload.
    /// Empty until the stream's first record.
    frame: Vec<u8>,
    records: u64,
}

impl Stream {
    fn has_records(&self) -> bool {
        self.frame.len() > FRAME_HEADER_LEN
    }
}

/// A stream on a cache line (two, for adjacent-line prefetch) of its own, so threads filling
/// neighbouring streams do not share lines.
#[repr(align(128))]
struct StreamSlot(Mutex<Stream>);

/// The file's side: what has been written, and whether writing failed.
struct Output {
    frames: u64,
    bytes: u64,
    syncs: u64,
    /// Frames written so far (the generation a sync must cover).
    written_gen: u64,
    failed: Option<String>,
}

struct Shared {
    file: File,
    path: PathBuf,
    streams: Box<[StreamSlot; STREAMS]>,
    /// [`LogStreams::Single`]: every thread uses stream 0.
    single: bool,
    /// Taken after a stream's lock (never the other way round) to write a frame.
    out: Mutex<Output>,
    /// Set with `out.failed`, read without the lock on every append.
    stopped: AtomicBool,
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

/// This thread's number, given on its first call (the basis of its stream).
fn thread_number() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

impl Shared {
    /// The stream the calling thread appends to.
    fn stream(&self) -> &Mutex<Stream> {
        let n = if self.single {
            0
        } else {
            thread_number() % STREAMS
        };
        &self.streams[n].0
    }

    /// The streams in use.
    fn used_streams(&self) -> &[StreamSlot] {
        let n = if self.single { 1 } else { STREAMS };
        self.streams.get(..n).unwrap_or_default()
    }

    fn stopped_error(&self) -> RecordError {
        let out = lock(&self.out);
        RecordError::Stopped(out.failed.clone().unwrap_or_default())
    }

    /// Writes a stream's frame out (if it holds any record). Called with the stream locked.
    fn emit(&self, st: &mut Stream) -> Result<(), RecordError> {
        if !st.has_records() {
            return Ok(());
        }
        let hdr = frame_header(st.frame.get(FRAME_HEADER_LEN..).unwrap_or_default())?;
        if let Some(h) = st.frame.get_mut(..FRAME_HEADER_LEN) {
            h.copy_from_slice(&hdr);
        }
        {
            let mut out = lock(&self.out);
            if let Some(e) = &out.failed {
                return Err(RecordError::Stopped(e.clone()));
            }
            if let Err(e) = (&self.file).write_all(&st.frame) {
                return Err(self.fail(&mut out, e));
            }
            out.frames += 1;
            out.bytes += st.frame.len() as u64;
            out.written_gen += 1;
        }
        st.frame.truncate(FRAME_HEADER_LEN);
        st.codec.reset();
        Ok(())
    }

    fn fail(&self, out: &mut Output, e: std::io::Error) -> RecordError {
        error!(
            "record log {}: {e}; recording stops here, the log keeps the records before this point",
            self.path.display()
        );
        out.failed = Some(e.to_string());
        self.stopped.store(true, Ordering::Release);
        RecordError::Io(e)
    }

    fn sync(&self) -> Result<(), RecordError> {
        // Every record appended before this call is in a stream now: write each stream out.
        // (Streams are taken one at a time, so appenders wait at most for their own.)
        for s in self.used_streams() {
            self.emit(&mut lock(&s.0))?;
        }
        let target = {
            let out = lock(&self.out);
            if let Some(e) = &out.failed {
                return Err(RecordError::Stopped(e.clone()));
            }
            out.written_gen
        };
        let mut synced = lock(&self.synced_gen);
        if *synced >= target {
            // A sync that started after our frames were written covered them (group commit).
            return Ok(());
        }
        // Every frame written before the fdatasync starts is covered by it, including frames
        // of other threads that are now waiting for this lock.
        let covered = lock(&self.out).written_gen;
        if let Err(e) = self.file.sync_data() {
            let mut out = lock(&self.out);
            return Err(self.fail(&mut out, e));
        }
        *synced = covered;
        lock(&self.out).syncs += 1;
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
        if header.streams == LogStreams::PerThread && header.indices != IndexKeying::Continuous {
            // Per-connection keying needs the records of a queue in order (one stream).
            return Err(RecordError::BadHeader(
                "per-thread streams need continuous request indices".into(),
            ));
        }
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
        let shared = Arc::new(Shared {
            file,
            path: path.to_path_buf(),
            streams: Box::new(std::array::from_fn(|_| {
                StreamSlot(Mutex::new(Stream {
                    codec: Codec::new(header.block_size),
                    frame: Vec::new(),
                    records: 0,
                }))
            })),
            single: header.streams == LogStreams::Single,
            out: Mutex::new(Output {
                frames: 0,
                bytes: HEADER_LEN as u64,
                syncs: 0,
                written_gen: 0,
                failed: None,
            }),
            stopped: AtomicBool::new(false),
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

    /// Appends one record to the calling thread's stream. The frame goes to the file when it
    /// is full; durability comes with the next [`sync`](Self::sync) or periodic sync.
    pub fn append(&self, rec: &Record) -> Result<(), RecordError> {
        self.append_ref(&rec.view())
    }

    /// [`append`](Self::append) for a borrowed record (what the recorder uses: nothing is
    /// allocated per record).
    pub fn append_ref(&self, rec: &RecordRef<'_>) -> Result<(), RecordError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(self.shared.stopped_error());
        }
        let mut guard = lock(self.shared.stream());
        let st = &mut *guard;
        if st.frame.is_empty() {
            st.frame.reserve(FRAME_TARGET + FRAME_TARGET / 4);
            st.frame.resize(FRAME_HEADER_LEN, 0);
        }
        // On error the codec appends nothing and keeps its state.
        st.codec.encode_ref(rec, &mut st.frame)?;
        st.records += 1;
        if st.frame.len() >= FRAME_TARGET + FRAME_HEADER_LEN {
            self.shared.emit(st)?;
        }
        Ok(())
    }

    /// Writes out every stream's frame and makes everything appended so far, by any thread,
    /// durable (`fdatasync`). Called when the guest flushes its disk.
    pub fn sync(&self) -> Result<(), RecordError> {
        self.shared.sync()
    }

    /// Counters so far.
    pub fn stats(&self) -> WriterStats {
        let records = self
            .shared
            .used_streams()
            .iter()
            .map(|s| lock(&s.0).records)
            .sum();
        let out = lock(&self.shared.out);
        WriterStats {
            records,
            frames: out.frames,
            bytes: out.bytes,
            syncs: out.syncs,
        }
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

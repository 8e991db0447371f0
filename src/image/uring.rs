//! Batches of transfers through io_uring: all the extents of one read, or the reads and
//! writes of a whole batch of requests, submitted at once.
//!
//! Data overwritten at random resolves to many extents (runs of consecutive block ids): a
//! 128 KiB read of such data is 20-32 of them. The engine's read path (`Shared::read_extents`)
//! issues one `preadv` per extent for a few extents; from [`min_extents`] mapped extents on, it
//! hands them to `run_all`, which queues one `IORING_OP_READ` per extent (`READV` when the
//! extent spans several of the caller's segments) on this thread's ring, submits them with one
//! `io_uring_enter`, and waits for every one of them. Data goes straight into the caller's
//! segments, as with `preadv`: no bounce buffer. With a direct (`O_DIRECT`) descriptor the
//! reads of a whole batch of requests go together (`Image::read_many`), and so do its
//! writes (`IORING_OP_WRITE`/`WRITEV`, `Image::write_many`): their disk I/O overlaps as a
//! batch's does in qemu-storage-daemon, with no thread per request.
//!
//! Cached pages are read inline in `io_uring_enter` (the kernel tries `IOCB_NOWAIT` first), so
//! for them the ring saves system calls only; reads that would wait for the disk go to io-wq
//! workers and overlap (docs/perf-notes.md, section 13).
//!
//! - **One ring per thread**, made on first use (a `thread_local`), with
//!   `IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN` (completions are only run when
//!   this thread waits for them, which it always does) and `IORING_SETUP_SUBMIT_ALL`, or
//!   without those flags on kernels that refuse them. Its memory is marked `MADV_DONTFORK`, so
//!   a forked child can never reach it.
//! - **Polled waits.** A thread given a window with [`set_completion_poll`] (a queue's worker
//!   serving a lone request) spins on its ring for up to that long before it sleeps, and sends
//!   its single aligned `O_DIRECT` transfers through the ring so that they can be polled for;
//!   every other thread sleeps in `io_uring_enter` until a completion arrives.
//! - **When io_uring cannot be used** (kernel too old, `kernel.io_uring_disabled`, seccomp,
//!   out of memory...), `run_all` returns `None` and the caller uses `preadv`/`pwritev`; why
//!   is logged once per process at info level.
//! - **Short transfers** are resubmitted for the remainder (the iovec list advanced past what
//!   was transferred); a read that returns 0 has reached the end of the file, a write that
//!   returns 0 is not resubmitted either (`ended`). `-EAGAIN` and `-EINTR` completions are
//!   resubmitted as they are. A transfer of more than `IOV_MAX` segments is submitted
//!   `IOV_MAX` at a time: it completes short and the remainder goes again.
//! - **Errors.** The first error completion is returned, after every request already submitted
//!   has completed (no new request is submitted once one failed).
//!
//! **The one safety rule: `run_all` never returns while the kernel may still write into (or
//! read from) a caller's segment or read one of its iovec arrays.** Every path out of it,
//! error paths included, first waits for every submitted request's completion. Queued entries
//! the kernel never consumed (only after `io_uring_enter` itself failed) are never submitted
//! afterwards: the ring is closed and this thread goes back to `preadv`/`pwritev`. If the
//! kernel refuses even to wait for the requests in flight, the process aborts rather than
//! return buffers the kernel may still use. Nothing in the loop can panic while requests are
//! in flight (checked indexing only).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::Once;
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring};

use super::io::advance;
use crate::iobuf::{as_iovecs, IoSegs};

/// Mapped extents from which a read goes through io_uring by default (fewer: one `preadv`
/// each). Chosen by measurement: docs/perf-notes.md, section 13.
pub const DEFAULT_MIN_EXTENTS: usize = 4;

/// Submission queue entries of each thread's ring: at most this many transfers in flight.
const ENTRIES: u32 = 64;

/// Largest iovec count of one `READV` (the kernel's `UIO_MAXIOV`).
const IOV_MAX: usize = 1024;

/// `io_uring_enter` failures in a row (`EAGAIN`, `EBUSY` with nothing in flight) before the
/// batch is given up.
const MAX_RETRIES: u32 = 1000;

/// Offset meaning "the file's current position" (for files without offsets: pipes).
pub(crate) const CURRENT_POSITION: u64 = u64::MAX;

thread_local! {
    static RING: RefCell<Ring> = const { RefCell::new(Ring::Unset) };
    static MIN_EXTENTS: Cell<usize> = const { Cell::new(DEFAULT_MIN_EXTENTS) };
    static COMPLETION_POLL: Cell<Duration> = const { Cell::new(Duration::ZERO) };
}

#[cfg(test)]
thread_local! {
    /// Requests this thread queued (tests check that a path was taken).
    static QUEUED: Cell<u64> = const { Cell::new(0) };
    /// Waits this thread ended by polling, without sleeping.
    static POLLED: Cell<u64> = const { Cell::new(0) };
}

/// Requests this thread queued so far (tests check that a path was taken).
#[cfg(test)]
pub(crate) fn queued() -> u64 {
    QUEUED.with(Cell::get)
}

/// Why io_uring is not used, logged once per process.
static LOGGED: Once = Once::new();

/// This thread's ring.
enum Ring {
    /// Not tried yet.
    Unset,
    /// Set up.
    Ready(Box<IoUring>),
    /// Cannot be used on this thread (the reason was logged).
    Unavailable,
}

/// Mapped extents from which reads on this thread go through io_uring (0: never).
pub fn min_extents() -> usize {
    MIN_EXTENTS.with(Cell::get)
}

/// Sets [`min_extents`] for reads made on the calling thread: `0` turns io_uring off (one
/// `preadv` per extent), `1` sends every read with a mapped extent through it. For benchmarks
/// and tests; the default is [`DEFAULT_MIN_EXTENTS`].
pub fn set_min_extents(n: usize) {
    MIN_EXTENTS.with(|m| m.set(n));
}

/// How long the calling thread polls for a completion before it sleeps (see
/// [`set_completion_poll`]).
pub fn completion_poll() -> Duration {
    COMPLETION_POLL.with(Cell::get)
}

/// Lets transfers the calling thread waits for be polled for: for up to `window`, the thread
/// spins on its ring (one `io_uring_enter` that waits for nothing per turn) instead of
/// sleeping until the kernel wakes it; zero (every thread's default) sleeps at once. Also
/// sends the thread's single aligned `O_DIRECT` transfers through its ring, where they can be
/// polled for.
///
/// Why: a thread asleep on one CPU while the disk's interrupt arrives on the other is woken
/// by an inter-processor interrupt, which on a virtual machine costs about as much as a fast
/// disk's read (docs/perf-notes.md, section 30). A queue's worker serving a lone request (queue
/// depth 1) polls for as long as it polls its available ring; request threads never do.
pub fn set_completion_poll(window: Duration) {
    COMPLETION_POLL.with(|c| c.set(window));
}

/// Whether a single transfer on the calling thread should go through its ring rather than
/// `preadv`/`pwritev`: only where it would be polled for ([`set_completion_poll`]).
pub(crate) fn uses_ring_for_single() -> bool {
    !completion_poll().is_zero()
}

/// True when this thread has (or can set up) a ring.
pub fn available() -> bool {
    with_ring(|_| ()).is_some()
}

/// One transfer of a batch: a read into the segments (or a write of them) of their length at
/// `off` of `fd`.
pub(crate) struct Io<'a> {
    /// The file (open for the whole call).
    pub fd: RawFd,
    /// Its offset, or [`CURRENT_POSITION`].
    pub off: u64,
    /// For a read, where the bytes go: memory valid for writes; for a write, where they come
    /// from: memory valid for reads (IoSeg's contract).
    pub segs: IoSegs<'a>,
    /// A write of the segments instead of a read into them.
    pub write: bool,
    /// Bytes transferred (set by [`run_all`]).
    pub done: u64,
    /// The transfer stopped before the segments' end: a read reached the end of the file, or
    /// the kernel wrote nothing (set by [`run_all`]).
    pub ended: bool,
}

impl<'a> Io<'a> {
    /// A read into `segs` from `off` of `fd`.
    pub fn read(fd: RawFd, off: u64, segs: impl Into<IoSegs<'a>>) -> Self {
        Io {
            fd,
            off,
            segs: segs.into(),
            write: false,
            done: 0,
            ended: false,
        }
    }

    /// A write of `segs` at `off` of `fd`.
    pub fn write(fd: RawFd, off: u64, segs: impl Into<IoSegs<'a>>) -> Self {
        Io {
            write: true,
            ..Io::read(fd, off, segs)
        }
    }
}

/// Runs `f` with this thread's ring, setting it up on first use; `None` when io_uring cannot
/// be used here (or the ring is busy: not reached, nothing re-enters while it is lent).
fn with_ring<R>(f: impl FnOnce(&mut IoUring) -> R) -> Option<R> {
    RING.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if matches!(*slot, Ring::Unset) {
            *slot = match setup() {
                Ok(ring) => Ring::Ready(Box::new(ring)),
                Err(e) => {
                    LOGGED.call_once(|| {
                        log::info!(
                            "io_uring cannot be used ({e}); reads and writes use preadv and \
                             pwritev"
                        );
                    });
                    Ring::Unavailable
                }
            };
        }
        match &mut *slot {
            Ring::Ready(ring) => Some(f(ring)),
            _ => None,
        }
    })
}

/// Makes a ring, with the cheaper completion mode where the kernel has it.
fn setup() -> io::Result<IoUring> {
    let mut b = IoUring::builder();
    b.dontfork()
        .setup_submit_all()
        .setup_single_issuer()
        .setup_defer_taskrun();
    match b.build(ENTRIES) {
        Ok(r) => Ok(r),
        // Before 6.1 (DEFER_TASKRUN) or 5.18 (SUBMIT_ALL): the plain ring.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            IoUring::builder().dontfork().build(ENTRIES)
        }
        Err(e) => Err(e),
    }
}

/// Runs every transfer of `reads` through this thread's ring, all submitted together, and
/// fills in each one's `done` and `ended`. Returns `None` (and transfers nothing) when
/// io_uring cannot be used on this thread; `Some(Err)` with the first error the kernel gave,
/// once no request is in flight any more (the transfers that had not failed may have
/// completed or not: their `done` says how far they got).
pub(crate) fn run_all(reads: &mut [Io<'_>]) -> Option<io::Result<()>> {
    run_all_then(reads, &mut || {})
}

/// As [`run_all`], and runs `during` once while the batch is in flight: right after its
/// first submission, so that the caller's own work on the batch (checksums of the data being
/// written, say) overlaps the disk's instead of preceding it. `during` must not touch what
/// the requests read from or write into mutably. It runs exactly once whatever happens: if
/// nothing could be submitted, after the batch; without a ring (`None`), before this returns.
pub(crate) fn run_all_then(
    reads: &mut [Io<'_>],
    during: &mut dyn FnMut(),
) -> Option<io::Result<()>> {
    let mut once = Some(during);
    let ran = with_ring(|ring| run(ring, reads, &mut once));
    if let Some(f) = once.take() {
        f();
    }
    let (res, broken) = ran?;
    if broken {
        // Entries the kernel never consumed may still sit in the submission queue: never
        // enter this ring again (closing it does not submit them; nothing is in flight).
        RING.with(|cell| {
            if let Ok(mut slot) = cell.try_borrow_mut() {
                *slot = Ring::Unavailable;
            }
        });
        log::warn!("io_uring failed on this thread; it uses preadv and pwritev from now on");
    }
    Some(res)
}

/// The batch on one ring; returns the result and whether the ring must not be used again.
fn run(
    ring: &mut IoUring,
    reads: &mut [Io<'_>],
    during: &mut Option<&mut dyn FnMut()>,
) -> (io::Result<()>, bool) {
    // One iovec list per read, advanced as the read progresses. Each inner vector is only
    // modified (advanced) when its read has no request in flight, and the outer one never
    // changes length, so the arrays the kernel was given stay where they are.
    let mut iovs: Vec<Vec<libc::iovec>> = reads
        .iter()
        .map(|r| {
            as_iovecs(&r.segs)
                .iter()
                .filter(|v| v.iov_len > 0)
                .copied()
                .collect()
        })
        .collect();
    for r in reads.iter_mut() {
        r.done = 0;
        r.ended = false;
    }
    let mut todo: VecDeque<usize> = (0..reads.len())
        .filter(|&i| iovs.get(i).is_some_and(|v| !v.is_empty()))
        .collect();
    let cap = (ring.params().sq_entries() as usize).min(ENTRIES as usize);
    // Requests the kernel consumed and has not completed.
    let mut in_flight = 0usize;
    let mut err: Option<io::Error> = None;
    let mut retries = 0u32;
    loop {
        // Queue what fits, unless a read already failed.
        let mut queued = ring.submission().len();
        if err.is_none() {
            while in_flight + queued < cap {
                let Some(i) = todo.pop_front() else { break };
                let (Some(r), Some(v)) = (reads.get(i), iovs.get(i)) else {
                    continue;
                };
                let off = if r.off == CURRENT_POSITION {
                    CURRENT_POSITION
                } else {
                    r.off.saturating_add(r.done)
                };
                // One segment left: a plain READ or WRITE (no iovec array for the kernel to
                // copy in).
                let n = v.len().min(IOV_MAX) as u32;
                let entry = match (v.as_slice(), r.write) {
                    ([one], false) => opcode::Read::new(
                        types::Fd(r.fd),
                        one.iov_base.cast::<u8>(),
                        u32::try_from(one.iov_len).unwrap_or(u32::MAX),
                    )
                    .offset(off)
                    .build(),
                    ([one], true) => opcode::Write::new(
                        types::Fd(r.fd),
                        one.iov_base.cast::<u8>().cast_const(),
                        u32::try_from(one.iov_len).unwrap_or(u32::MAX),
                    )
                    .offset(off)
                    .build(),
                    (_, false) => opcode::Readv::new(types::Fd(r.fd), v.as_ptr(), n)
                        .offset(off)
                        .build(),
                    (_, true) => opcode::Writev::new(types::Fd(r.fd), v.as_ptr(), n)
                        .offset(off)
                        .build(),
                }
                .user_data(i as u64);
                // SAFETY: the entry points at `v`, an iovec array that stays allocated and
                // unmoved until this request completes (see `iovs` above), or straight at the
                // memory of its one entry. Its entries describe memory valid for writes (a
                // read) or reads (a write) for the whole call (IoSeg's constructor contract;
                // `advance` keeps them inside their segments). This function waits for the completion of every request it
                // submits before it returns (the loop below runs until nothing is in flight,
                // and the failure paths wait too), so the kernel is done with the array and
                // the memory before the caller gets its segments back. The fd is open for the
                // call (the caller holds the file).
                if unsafe { ring.submission().push(&entry) }.is_err() {
                    todo.push_front(i);
                    break;
                }
                queued += 1;
                #[cfg(test)]
                QUEUED.with(|q| q.set(q.get() + 1));
            }
        }
        if in_flight + queued == 0 {
            break;
        }
        if let Some(f) = during.take() {
            // Hand the kernel what is queued, then do the caller's work while it runs. A
            // refused submission leaves the entries queued: the call below submits them, or
            // handles the refusal, as it would have without this one. The count of entries
            // consumed is taken from the queue's length after that call, so it covers both.
            if queued > 0 {
                let _ = ring.submit();
            }
            f();
        }
        let window = completion_poll();
        let polled = !window.is_zero() && poll_for_completion(ring, window);
        match if polled {
            Ok(0)
        } else {
            ring.submit_and_wait(1)
        } {
            Ok(_) => retries = 0,
            Err(e) => match e.raw_os_error() {
                Some(libc::EINTR) => {}
                // Short of resources, or completions to take first: let some of what is in
                // flight complete (or give the kernel a moment), then submit again.
                Some(libc::EAGAIN | libc::EBUSY) if retries < MAX_RETRIES => {
                    retries += 1;
                    if in_flight > 0 {
                        // SAFETY: submits nothing (to_submit 0), only waits for one
                        // completion; no argument.
                        let _ = unsafe {
                            ring.submitter().enter::<libc::sigset_t>(
                                0,
                                1,
                                io_uring::EnterFlags::GETEVENTS.bits(),
                                None,
                            )
                        };
                    } else {
                        std::thread::yield_now();
                    }
                }
                _ => {
                    // The kernel refuses the submission: wait for what is in flight, then
                    // give the ring up (its unconsumed entries must never be submitted).
                    let consumed = queued.saturating_sub(ring.submission().len());
                    in_flight += consumed;
                    drain(ring, reads, &mut iovs, &mut in_flight, &mut todo, &mut err);
                    wait_all(ring, reads, &mut iovs, &mut in_flight, &mut err);
                    return (Err(err.unwrap_or(e)), true);
                }
            },
        }
        in_flight += queued.saturating_sub(ring.submission().len());
        drain(ring, reads, &mut iovs, &mut in_flight, &mut todo, &mut err);
    }
    (err.map_or(Ok(()), Err), false)
}

/// Submits what is queued, then spins for up to `window` until the ring holds a completion;
/// says whether one arrived. `false` also when the submission failed: the caller's wait then
/// submits again and handles the error.
fn poll_for_completion(ring: &mut IoUring, window: Duration) -> bool {
    if ring.submit().is_err() {
        return false;
    }
    let start = Instant::now();
    loop {
        // Transfers the kernel completed inline (cached data) are there at once.
        if !ring.completion().is_empty() {
            #[cfg(test)]
            POLLED.with(|p| p.set(p.get() + 1));
            return true;
        }
        if start.elapsed() >= window {
            return false;
        }
        std::hint::spin_loop();
        // SAFETY: submits nothing (to_submit 0) and waits for nothing (min_complete 0): the
        // kernel only runs the ring's deferred completion work (DEFER_TASKRUN), which posts
        // the transfers that have finished to the completion queue. No argument.
        let _ = unsafe {
            ring.submitter().enter::<libc::sigset_t>(
                0,
                0,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
    }
}

/// Takes every completion the ring holds and accounts for it.
fn drain(
    ring: &mut IoUring,
    reads: &mut [Io<'_>],
    iovs: &mut [Vec<libc::iovec>],
    in_flight: &mut usize,
    todo: &mut VecDeque<usize>,
    err: &mut Option<io::Error>,
) {
    for cqe in ring.completion() {
        *in_flight = in_flight.saturating_sub(1);
        let i = cqe.user_data() as usize;
        let (Some(r), Some(v)) = (reads.get_mut(i), iovs.get_mut(i)) else {
            continue;
        };
        let res = cqe.result();
        if res > 0 {
            // No request of read `i` is in flight now: its iovec list may change.
            r.done += res as u64;
            advance(v, res as usize);
            if !v.is_empty() {
                todo.push_back(i);
            }
        } else if res == 0 {
            // A read at the end of the file, or a write the kernel took nothing of: either
            // way, resubmitting would not progress.
            r.ended = true;
        } else if res == -libc::EAGAIN || res == -libc::EINTR {
            todo.push_back(i);
        } else if err.is_none() {
            *err = Some(io::Error::from_raw_os_error(-res));
        }
    }
}

/// Waits, without submitting anything, until no request is in flight. Aborts the process if
/// the kernel refuses to wait: returning would hand back buffers it may still write into.
fn wait_all(
    ring: &mut IoUring,
    reads: &mut [Io<'_>],
    iovs: &mut [Vec<libc::iovec>],
    in_flight: &mut usize,
    err: &mut Option<io::Error>,
) {
    // Reads that would need resubmitting are simply not resubmitted.
    let mut ignored = VecDeque::new();
    let mut failures = 0u32;
    while *in_flight > 0 {
        let want = u32::try_from(*in_flight).unwrap_or(u32::MAX);
        // SAFETY: submits nothing (to_submit 0), only waits for completions; no argument.
        let r = unsafe {
            ring.submitter().enter::<libc::sigset_t>(
                0,
                want,
                io_uring::EnterFlags::GETEVENTS.bits(),
                None,
            )
        };
        if let Err(e) = r {
            if e.raw_os_error() != Some(libc::EINTR) {
                failures += 1;
                if failures > MAX_RETRIES {
                    log::error!(
                        "io_uring: cannot wait for {} transfers in flight ({e}); aborting \
                         rather than return buffers the kernel may still use",
                        *in_flight
                    );
                    std::process::abort();
                }
            }
        }
        drain(ring, reads, iovs, in_flight, &mut ignored, err);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iobuf::IoSeg;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    fn file_with(data: &[u8]) -> tempfile::NamedTempFile {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(data).unwrap();
        t.flush().unwrap();
        t
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n as u32).map(|i| (i * 31 + i / 253) as u8).collect()
    }

    #[test]
    fn the_kernel_here_has_io_uring() {
        // The engine's tests run on Linux 6.x with io_uring enabled: the ring must come up,
        // or every other test here would only exercise the fallback.
        assert!(available(), "io_uring could not be set up on this machine");
    }

    #[test]
    fn reads_of_different_lengths_land_in_their_segments() {
        let data = pattern(64 << 10);
        let t = file_with(&data);
        let fd = t.as_file().as_raw_fd();
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 3 * 4096];
        let (mut c1, mut c2) = (vec![0u8; 100], vec![0u8; 8092]);
        let mut reads = vec![
            Io::read(fd, 40960, vec![IoSeg::from_mut_slice(&mut a)]),
            Io::read(fd, 0, vec![IoSeg::from_mut_slice(&mut b)]),
            // One read split over two segments of odd lengths.
            Io::read(
                fd,
                20000,
                vec![
                    IoSeg::from_mut_slice(&mut c1),
                    IoSeg::from_mut_slice(&mut c2),
                ],
            ),
        ];
        run_all(&mut reads).unwrap().unwrap();
        assert_eq!(
            reads.iter().map(|r| (r.done, r.ended)).collect::<Vec<_>>(),
            vec![(4096, false), (12288, false), (8192, false)]
        );
        drop(reads);
        assert_eq!(a, data[40960..45056]);
        assert_eq!(b, data[..12288]);
        assert_eq!(c1, data[20000..20100]);
        assert_eq!(c2, data[20100..28192]);
    }

    #[test]
    fn a_read_past_the_end_of_the_file_stops_there() {
        let data = pattern(10000);
        let t = file_with(&data);
        let fd = t.as_file().as_raw_fd();
        let mut a = vec![0xeeu8; 4096];
        let mut b = vec![0xeeu8; 4096];
        let mut reads = vec![
            Io::read(fd, 8192, vec![IoSeg::from_mut_slice(&mut a)]),
            Io::read(fd, 20000, vec![IoSeg::from_mut_slice(&mut b)]),
        ];
        run_all(&mut reads).unwrap().unwrap();
        assert_eq!((reads[0].done, reads[0].ended), (1808, true));
        assert_eq!((reads[1].done, reads[1].ended), (0, true));
        drop(reads);
        assert_eq!(a[..1808], data[8192..]);
        assert!(a[1808..].iter().all(|&x| x == 0xee));
        assert!(b.iter().all(|&x| x == 0xee));
    }

    #[test]
    fn more_segments_than_iov_max_complete_short_and_are_resubmitted() {
        // 3000 segments of 7 bytes: the first READV takes 1024 of them, completes short, and
        // the remainder is submitted twice more.
        let data = pattern(30000);
        let t = file_with(&data);
        let fd = t.as_file().as_raw_fd();
        let mut buf = vec![0u8; 21000];
        let segs: Vec<IoSeg<'_>> = buf.chunks_mut(7).map(IoSeg::from_mut_slice).collect();
        assert_eq!(segs.len(), 3000);
        let mut reads = vec![Io::read(fd, 5, segs)];
        let before = queued();
        run_all(&mut reads).unwrap().unwrap();
        assert_eq!((reads[0].done, reads[0].ended), (21000, false));
        // 1024 + 1024 + 952 segments.
        assert_eq!(queued() - before, 3);
        drop(reads);
        assert_eq!(buf, data[5..21005]);
    }

    #[test]
    fn short_reads_from_the_kernel_are_resubmitted_for_the_remainder() {
        // A stream socket returns what it holds: the first completion is short, the remainder is
        // resubmitted and completes when the writer sends the rest.
        let (rd, mut wr) = std::os::unix::net::UnixStream::pair().unwrap();
        let data = pattern(12000);
        wr.write_all(&data[..3000]).unwrap();
        let rest = data[3000..].to_vec();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            wr.write_all(&rest[..5000]).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(50));
            wr.write_all(&rest[5000..]).unwrap();
        });
        let mut a = vec![0u8; 5000];
        let mut b = vec![0u8; 7000];
        let mut reads = vec![Io::read(
            rd.as_raw_fd(),
            CURRENT_POSITION,
            vec![IoSeg::from_mut_slice(&mut a), IoSeg::from_mut_slice(&mut b)],
        )];
        let before = queued();
        run_all(&mut reads).unwrap().unwrap();
        assert_eq!((reads[0].done, reads[0].ended), (12000, false));
        // At least the first completion was short (3000 of 12000 bytes were there).
        assert!(queued() - before >= 2);
        drop(reads);
        writer.join().unwrap();
        assert_eq!(a, data[..5000]);
        assert_eq!(b, data[5000..]);
    }

    #[test]
    fn an_error_is_returned_after_every_other_read_completed() {
        let data = pattern(1 << 20);
        let t = file_with(&data);
        let fd = t.as_file().as_raw_fd();
        let mut bufs: Vec<Vec<u8>> = (0..40).map(|_| vec![0u8; 8192]).collect();
        let mut reads: Vec<Io<'_>> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| Io::read(fd, i as u64 * 20000, vec![IoSeg::from_mut_slice(b)]))
            .collect();
        // A descriptor that is not open.
        reads[7].fd = 1 << 20;
        let e = run_all(&mut reads).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF));
        // The reads submitted with it completed (all 40 fit in the ring at once).
        for (i, r) in reads.iter().enumerate() {
            if i != 7 {
                assert_eq!(r.done, 8192, "read {i}");
            }
        }
        drop(reads);
        for (i, b) in bufs.iter().enumerate() {
            if i != 7 {
                assert_eq!(b[..], data[i * 20000..i * 20000 + 8192], "read {i}");
            }
        }
        // The ring still works afterwards.
        let mut x = vec![0u8; 10];
        let mut again = vec![Io::read(fd, 1, vec![IoSeg::from_mut_slice(&mut x)])];
        run_all(&mut again).unwrap().unwrap();
        drop(again);
        assert_eq!(x, data[1..11]);
    }

    #[test]
    fn more_reads_than_the_ring_holds_go_in_waves() {
        let data = pattern(1 << 20);
        let t = file_with(&data);
        let fd = t.as_file().as_raw_fd();
        let mut buf = vec![0u8; 200 * 512];
        // 200 reads of 512 bytes in reverse file order, 3x the ring.
        let mut reads: Vec<Io<'_>> = buf
            .chunks_mut(512)
            .enumerate()
            .map(|(i, b)| Io::read(fd, (199 - i as u64) * 4096, vec![IoSeg::from_mut_slice(b)]))
            .collect();
        run_all(&mut reads).unwrap().unwrap();
        assert!(reads.iter().all(|r| r.done == 512 && !r.ended));
        drop(reads);
        for (i, b) in buf.chunks(512).enumerate() {
            let off = (199 - i) * 4096;
            assert_eq!(b, &data[off..off + 512], "read {i}");
        }
    }

    #[test]
    fn empty_reads_need_no_submission() {
        let mut reads = vec![Io::read(-1, 0, vec![]), Io::read(-1, 0, vec![])];
        run_all(&mut reads).unwrap().unwrap();
        assert!(reads.iter().all(|r| r.done == 0 && !r.ended));
    }

    #[test]
    fn a_polled_wait_gets_what_a_sleeping_one_does_and_zero_never_polls() {
        // O_DIRECT on the build directory's disk file system: completions come from the
        // disk's interrupt, through the ring's deferred work, as the daemon's do.
        let data = pattern(64 << 10);
        let t = tempfile::NamedTempFile::new_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target"))
            .unwrap();
        std::fs::write(t.path(), &data).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(t.path())
            .unwrap();
        let fd = f.as_raw_fd();
        let polled = || POLLED.with(Cell::get);
        for window in [Duration::from_secs(1), Duration::ZERO] {
            set_completion_poll(window);
            let before = polled();
            let mut bufs: Vec<crate::iobuf::PageBuf> =
                (0..3).map(|_| crate::iobuf::PageBuf::new(4096)).collect();
            let offs = [40960u64, 0, 8192];
            let mut ios: Vec<Io<'_>> = bufs
                .iter_mut()
                .zip(offs)
                .map(|(b, off)| Io::read(fd, off, vec![IoSeg::from_mut_slice(b.bytes_mut())]))
                .collect();
            run_all(&mut ios).unwrap().unwrap();
            assert!(ios.iter().all(|r| r.done == 4096 && !r.ended));
            drop(ios);
            for (b, off) in bufs.iter().zip(offs) {
                assert_eq!(b.bytes(), &data[off as usize..off as usize + 4096]);
            }
            if window.is_zero() {
                assert_eq!(polled(), before, "a zero window sleeps");
            } else {
                // A second's window outlasts any disk here: every wait ended by polling.
                assert!(polled() > before, "the wait was polled");
            }
        }
        set_completion_poll(Duration::ZERO);
    }

    #[test]
    fn work_given_to_a_batch_runs_once_after_its_submission() {
        let t = file_with(&[0u8; 64 << 10]);
        let fd = t.as_file().as_raw_fd();
        let a = pattern(8192);
        let b: Vec<u8> = pattern(4096).iter().map(|x| x ^ 0x33).collect();
        let mut ios = vec![
            Io::write(fd, 0, vec![IoSeg::from_slice(&a)]),
            Io::write(fd, 32768, vec![IoSeg::from_slice(&b)]),
        ];
        let before = queued();
        let mut runs = Vec::new();
        // The work reads the data being written (as a checksum would) while it is in flight.
        run_all_then(&mut ios, &mut || {
            runs.push((
                queued() - before,
                a.iter().map(|&x| u64::from(x)).sum::<u64>(),
            ))
        })
        .unwrap()
        .unwrap();
        let sum: u64 = a.iter().map(|&x| u64::from(x)).sum();
        assert_eq!(
            runs,
            vec![(2, sum)],
            "once, with both writes already queued"
        );
        assert!(ios
            .iter()
            .all(|w| w.done == crate::iobuf::total_len(&w.segs) && !w.ended));
        drop(ios);
        let got = std::fs::read(t.path()).unwrap();
        assert!(got[..8192] == a[..] && got[32768..36864] == b[..]);
        // Nothing to submit: the work still runs, once.
        let mut count = 0;
        let mut empty = vec![Io::write(fd, 0, vec![])];
        run_all_then(&mut empty, &mut || count += 1)
            .unwrap()
            .unwrap();
        assert_eq!(count, 1);
    }

    #[test]
    fn writes_of_different_lengths_land_where_they_were_asked() {
        let t = file_with(&[0u8; 64 << 10]);
        let fd = t.as_file().as_raw_fd();
        let a = pattern(4096);
        let b: Vec<u8> = pattern(3 * 4096).iter().map(|x| x ^ 0x5a).collect();
        let (c1, c2) = (vec![7u8; 100], vec![9u8; 8092]);
        let mut ios = vec![
            Io::write(fd, 40960, vec![IoSeg::from_slice(&a)]),
            Io::write(fd, 0, vec![IoSeg::from_slice(&b)]),
            // One write gathered from two segments of odd lengths.
            Io::write(
                fd,
                20000,
                vec![IoSeg::from_slice(&c1), IoSeg::from_slice(&c2)],
            ),
        ];
        let before = queued();
        run_all(&mut ios).unwrap().unwrap();
        assert_eq!(queued() - before, 3);
        assert_eq!(
            ios.iter().map(|w| (w.done, w.ended)).collect::<Vec<_>>(),
            vec![(4096, false), (12288, false), (8192, false)]
        );
        drop(ios);
        let mut want = vec![0u8; 64 << 10];
        want[40960..45056].copy_from_slice(&a);
        want[..12288].copy_from_slice(&b);
        want[20000..20100].copy_from_slice(&c1);
        want[20100..28192].copy_from_slice(&c2);
        assert!(std::fs::read(t.path()).unwrap() == want);
    }

    #[test]
    fn reads_and_writes_go_in_one_submission_and_a_failed_write_fails_the_batch() {
        let t = file_with(&pattern(16384));
        let fd = t.as_file().as_raw_fd();
        // A descriptor open for reading only: a write through it fails with EBADF.
        let ro = std::fs::File::open(t.path()).unwrap();
        let w = vec![0xabu8; 4096];
        let mut r = vec![0u8; 4096];
        let mut ios = vec![
            Io::write(fd, 8192, vec![IoSeg::from_slice(&w)]),
            Io::write(ro.as_raw_fd(), 0, vec![IoSeg::from_slice(&w)]),
            Io::read(fd, 4096, vec![IoSeg::from_mut_slice(&mut r)]),
        ];
        let e = run_all(&mut ios).unwrap().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
        // The others were submitted together and completed before the error came back.
        assert_eq!(ios[0].done, 4096);
        assert_eq!(ios[1].done, 0);
        assert_eq!(ios[2].done, 4096);
        drop(ios);
        let data = std::fs::read(t.path()).unwrap();
        assert!(data[8192..12288].iter().all(|&x| x == 0xab));
        assert_eq!(data[..4096], pattern(16384)[..4096]);
        assert_eq!(r[..], pattern(16384)[4096..8192]);
    }

    // The engine's read path, through the ring and through preadv, byte for byte.

    use crate::image::{BatchRead, BatchTrace, CreateOptions, Extent, Image, ImageError};
    use crate::units::{BlockSize, Lba};

    const BS: usize = 4096;
    const DISK_BLOCKS: usize = 160;

    /// A small deterministic generator (no test may depend on the run).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self, n: u64) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (self.0 >> 33) % n
        }
    }

    /// An image over a base, overwritten in random order in runs of 1-3 blocks (extents of
    /// different lengths), with zeroed ranges; and the bytes it must read as.
    fn fragmented(dir: &std::path::Path) -> (Image, Vec<u8>) {
        // The base covers 100 blocks and ends inside one: past its end, zeros.
        let base_len = 100 * BS - 1000;
        let base = pattern(base_len);
        std::fs::write(dir.join("base.raw"), &base).unwrap();
        let img = Image::create(
            &dir.join("img.rrimg"),
            &CreateOptions {
                size: (DISK_BLOCKS * BS) as u64,
                block_size: BlockSize::DEFAULT,
                base: Some(dir.join("base.raw")),
            },
        )
        .unwrap();
        let mut model = vec![0u8; DISK_BLOCKS * BS];
        model[..base_len].copy_from_slice(&base);
        let mut rng = Lcg(42);
        let mut runs = Vec::new();
        let mut b = 0;
        while b < DISK_BLOCKS {
            let n = (1 + rng.next(3) as usize).min(DISK_BLOCKS - b);
            runs.push((b, n));
            b += n;
        }
        // Shuffle, then write two thirds of the runs (the rest stays base or zero).
        for i in (1..runs.len()).rev() {
            runs.swap(i, rng.next(i as u64 + 1) as usize);
        }
        let keep = runs.len() * 2 / 3;
        for (k, &(b, n)) in runs.iter().take(keep).enumerate() {
            let data: Vec<u8> = (0..n * BS)
                .map(|i| (i as u64 * 7 + k as u64 * 131) as u8)
                .collect();
            img.write_at((b * BS) as u64, &data).unwrap();
            model[b * BS..(b + n) * BS].copy_from_slice(&data);
        }
        for &(b, n) in [(10usize, 2usize), (57, 1), (120, 3), (131, 1)].iter() {
            img.write_zeroes((b * BS) as u64, (n * BS) as u64).unwrap();
            model[b * BS..(b + n) * BS].fill(0);
        }
        (img, model)
    }

    /// Segments of odd lengths over `buf`, so that segments straddle extents.
    fn odd_segs(buf: &mut [u8]) -> Vec<IoSeg<'_>> {
        let lens = [1000usize, 3096, 512, 7000, 4096, 333, 12288];
        let mut out = Vec::new();
        let mut rest = buf;
        let mut i = 0;
        while !rest.is_empty() {
            let n = lens[i % lens.len()].min(rest.len());
            let (a, b) = rest.split_at_mut(n);
            out.push(IoSeg::from_mut_slice(a));
            rest = b;
            i += 1;
        }
        out
    }

    /// Reads `[off, off + len)` with io_uring from `min` mapped extents on (0: never).
    fn read_with(img: &Image, min: usize, off: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0xa5u8; len];
        set_min_extents(min);
        let r = img.read_vectored(off, &odd_segs(&mut buf), None);
        set_min_extents(DEFAULT_MIN_EXTENTS);
        r.unwrap();
        buf
    }

    #[test]
    fn engine_reads_through_the_ring_match_preadv_and_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let (img, model) = fragmented(dir.path());
        let disk = (DISK_BLOCKS * BS) as u64;
        let mut cases: Vec<(u64, usize)> = vec![(0, DISK_BLOCKS * BS), (512, 128 << 10)];
        cases.extend(
            (0..disk)
                .step_by(128 << 10)
                .map(|o| (o, (128usize << 10).min((disk - o) as usize))),
        );
        cases.extend([
            (3 * 512, 20 * 512),
            (95 * 4096 + 1536, 40960),
            (disk - 8192, 8192),
        ]);
        let mut ring_reads = 0;
        for &(off, len) in &cases {
            let ex = img
                .resolve(
                    Lba(off / BS as u64),
                    ((off % BS as u64) + len as u64).div_ceil(BS as u64),
                )
                .unwrap();
            let mapped = ex
                .iter()
                .filter(|e| matches!(e, Extent::Mapped { .. }))
                .count();
            let expect = &model[off as usize..off as usize + len];
            let by_preadv = read_with(&img, 0, off, len);
            assert!(by_preadv == expect, "preadv path at {off}+{len}");
            let before = queued();
            let by_ring = read_with(&img, 1, off, len);
            assert!(by_ring == expect, "io_uring path at {off}+{len}");
            // Every mapped extent went through the ring.
            assert_eq!(queued() - before, mapped as u64, "at {off}+{len}");
            let by_default = read_with(&img, DEFAULT_MIN_EXTENTS, off, len);
            assert!(by_default == expect, "default threshold at {off}+{len}");
            if mapped >= DEFAULT_MIN_EXTENTS {
                ring_reads += 1;
            }
        }
        // The image is fragmented enough that the default threshold takes the ring.
        assert!(ring_reads >= 3, "{ring_reads}");
    }

    #[test]
    fn read_extents_with_a_skip_matches_preadv() {
        let dir = tempfile::tempdir().unwrap();
        let (img, model) = fragmented(dir.path());
        let ex = img.resolve(Lba(20), 40).unwrap();
        assert!(
            ex.iter()
                .filter(|e| matches!(e, Extent::Mapped { .. }))
                .count()
                >= 8
        );
        // Start 5000 bytes into the extents (inside the second block), read 100,000 bytes.
        let mut bufs = Vec::new();
        for min in [0, 1] {
            let mut buf = vec![0u8; 100_000];
            set_min_extents(min);
            let r = img.read_extents(&ex, 5000, &odd_segs(&mut buf));
            set_min_extents(DEFAULT_MIN_EXTENTS);
            r.unwrap();
            bufs.push(buf);
        }
        let start = 20 * BS + 5000;
        assert!(bufs[0] == model[start..start + 100_000]);
        assert!(bufs[1] == bufs[0]);
        // Extents that do not cover the request fail the same way on both paths.
        for min in [0, 1] {
            let mut buf = vec![0u8; 40 * BS];
            set_min_extents(min);
            let r = img.read_extents(&ex, 4096, &[IoSeg::from_mut_slice(&mut buf)]);
            set_min_extents(DEFAULT_MIN_EXTENTS);
            assert!(
                matches!(r, Err(ImageError::ExtentsTooShort { have, need }) if have == 39 * BS as u64 && need == 40 * BS as u64),
                "{r:?}"
            );
        }
    }

    #[test]
    fn a_block_past_the_end_of_the_file_fails_on_both_paths() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = fragmented(dir.path());
        let (ex, last, cut) = last_block_and_cut(&img);
        // Cut the file inside the last data block (nothing after it is read here).
        cut_at(dir.path(), cut);
        let mut msgs = Vec::new();
        for min in [0, 1] {
            let mut buf = vec![0u8; DISK_BLOCKS * BS];
            set_min_extents(min);
            let before = queued();
            let r = img.read_extents(&ex, 0, &[IoSeg::from_mut_slice(&mut buf)]);
            let used_ring = queued() > before;
            set_min_extents(DEFAULT_MIN_EXTENTS);
            assert_eq!(used_ring, min == 1);
            match r {
                Err(e @ ImageError::Truncated { .. }) => msgs.push(e.to_string()),
                other => panic!("min {min}: {other:?}"),
            }
        }
        assert_eq!(msgs[0], msgs[1]);
        assert!(
            msgs[0].contains(&format!("data block {} ", last.0)),
            "{}",
            msgs[0]
        );
        // A block id that is not a data block: refused before any read, on both paths.
        for min in [0, 1] {
            let mut buf = vec![0u8; 5 * BS];
            let bad = [
                ex[0],
                Extent::Mapped {
                    pba: crate::units::Pba(1 << 40),
                    blocks: 1,
                },
                ex[1],
                ex[2],
                ex[3],
            ];
            set_min_extents(min);
            let r = img.read_extents(&bad, 0, &[IoSeg::from_mut_slice(&mut buf)]);
            set_min_extents(DEFAULT_MIN_EXTENTS);
            assert!(matches!(r, Err(ImageError::UnknownPba(_))), "{r:?}");
        }
    }

    // With `O_DIRECT`: aligned extents through the ring on the direct descriptor.

    /// `len` bytes at a 4096-aligned address (kept alive by the returned vector).
    fn aligned(len: usize) -> (Vec<u8>, usize) {
        let v = vec![0x5au8; len + 4096];
        let at = v.as_ptr().align_offset(4096);
        (v, at)
    }

    fn reopen_direct(dir: &std::path::Path, img: Image) -> Image {
        img.close().unwrap();
        Image::open_with_options(
            &dir.join("img.rrimg"),
            crate::image::OpenMode::ReadWrite,
            &crate::image::OpenOptions {
                direct: true,
                shared_lock: false,
            },
        )
        .unwrap()
    }

    #[test]
    fn direct_reads_of_aligned_extents_go_through_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let (img, model) = fragmented(dir.path());
        let img = reopen_direct(dir.path(), img);
        let ex = img.resolve(Lba(0), DISK_BLOCKS as u64).unwrap();
        let mapped = ex
            .iter()
            .filter(|e| matches!(e, Extent::Mapped { .. }))
            .count() as u64;
        assert!(mapped >= 8, "{mapped}");
        let len = DISK_BLOCKS * BS;
        // Aligned buffers, in pieces of 3 blocks, so some extents straddle two segments: every
        // mapped extent goes to the ring.
        let (mut v, at) = aligned(len);
        let buf = &mut v[at..at + len];
        let segs: Vec<IoSeg<'_>> = buf.chunks_mut(3 * BS).map(IoSeg::from_mut_slice).collect();
        set_min_extents(1);
        let before = queued();
        let r = img.read_extents(&ex, 0, &segs);
        let through_ring = queued() - before;
        set_min_extents(DEFAULT_MIN_EXTENTS);
        r.unwrap();
        drop(segs);
        assert!(buf == &model[..], "aligned direct reads through the ring");
        assert_eq!(through_ring, mapped);
        // Odd segments: the extents they split unaligned are bounced, the rest still go to
        // the ring; the bytes are the same.
        let mut odd = vec![0u8; len];
        set_min_extents(1);
        let before = queued();
        let r = img.read_extents(&ex, 0, &odd_segs(&mut odd));
        let through_ring = queued() - before;
        set_min_extents(DEFAULT_MIN_EXTENTS);
        r.unwrap();
        assert!(odd == model, "odd segments, direct");
        assert!(through_ring < mapped, "{through_ring} of {mapped}");
        // And the engine's own read path (the default threshold) agrees.
        for off in (0..len as u64).step_by(128 << 10) {
            let n = (128usize << 10).min(len - off as usize);
            let got = read_with(&img, DEFAULT_MIN_EXTENTS, off, n);
            assert!(got == model[off as usize..off as usize + n], "at {off}");
        }
    }

    /// A direct read that the end of the file cuts inside a block: the kernel completes it
    /// short, the remainder (at an unaligned offset past the end) reads as end of file.
    #[test]
    fn a_direct_read_cut_short_inside_a_block_is_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = fragmented(dir.path());
        let (ex, last, cut) = last_block_and_cut(&img);
        let img = reopen_direct(dir.path(), img);
        cut_at(dir.path(), cut);
        let len = DISK_BLOCKS * BS;
        let (mut v, at) = aligned(len);
        let buf = &mut v[at..at + len];
        set_min_extents(1);
        let before = queued();
        let r = img.read_extents(&ex, 0, &[IoSeg::from_mut_slice(buf)]);
        let used_ring = queued() > before;
        set_min_extents(DEFAULT_MIN_EXTENTS);
        assert!(used_ring);
        match r {
            Err(e @ ImageError::Truncated { .. }) => assert!(
                e.to_string().contains(&format!("data block {} ", last.0)),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }

    // Several requests in one submission (`Image::read_many`).

    #[test]
    fn read_many_reads_a_batch_of_requests_as_read_vectored_does() {
        let dir = tempfile::tempdir().unwrap();
        let (img, model) = fragmented(dir.path());
        let disk = (DISK_BLOCKS * BS) as u64;
        let img = reopen_direct(dir.path(), img);
        // (offset, length, aligned buffer)
        let reqs: [(u64, usize, bool); 6] = [
            (0, 4096, true),
            (20 * BS as u64, 12 * BS, true),
            (8192 + 512, 3072, false),
            (disk - 8192, 8192, true),
            (4096, 0, true),
            (disk, 4096, true),
        ];
        let mut bufs: Vec<(Vec<u8>, usize)> =
            reqs.iter().map(|&(_, len, _)| aligned(len)).collect();
        let mut segs: Vec<Vec<IoSeg<'_>>> = Vec::new();
        for ((v, at), &(_, len, al)) in bufs.iter_mut().zip(&reqs) {
            let start = if al { *at } else { *at + 1 };
            segs.push(vec![IoSeg::from_mut_slice(&mut v[start..start + len])]);
        }
        let plain: Vec<(u64, &[IoSeg<'_>])> = reqs
            .iter()
            .zip(&segs)
            .map(|(&(off, _, _), s)| (off, s.as_slice()))
            .collect();
        // The second request resolves to several extents: with a limit of 3 it is left alone.
        let many = img.resolve(Lba(20), 12).unwrap().len();
        assert!(many >= 3, "{many}");
        let before = queued();
        let mut trace = BatchTrace::default();
        let out = img.read_many(&plain, 3, Some(&mut trace));
        assert!(queued() > before, "the batch went through the ring");
        drop(segs);
        assert_eq!(trace.seq, img.seq());
        assert_eq!(trace.extents.len(), reqs.len());
        for (k, (r, &(off, len, al))) in out.iter().zip(&reqs).enumerate() {
            match (k, r) {
                (1, Ok(BatchRead::Alone)) | (5, Err(_)) => {
                    assert!(trace.extents[k].is_empty(), "request {k} was not read");
                    continue;
                }
                (_, Ok(BatchRead::Done)) => {}
                other => panic!("request {k}: {other:?}"),
            }
            // The trace names what a single read would have traced.
            let mut one = Vec::new();
            let mut scratch = vec![0u8; len];
            img.read_vectored(off, &[IoSeg::from_mut_slice(&mut scratch)], Some(&mut one))
                .unwrap();
            assert_eq!(trace.extents[k], one, "request {k}");
            assert_eq!(one.is_empty(), len == 0, "request {k}");
            let (v, at) = &bufs[k];
            let start = if al { *at } else { *at + 1 };
            assert!(
                v[start..start + len] == model[off as usize..off as usize + len],
                "request {k}"
            );
        }
        // Without the limit the fragmented one is read in the batch too.
        let (mut v, at) = aligned(12 * BS);
        let seg = [IoSeg::from_mut_slice(&mut v[at..at + 12 * BS])];
        let out = img.read_many(&[(20 * BS as u64, &seg[..])], usize::MAX, None);
        assert!(matches!(out[..], [Ok(BatchRead::Done)]), "{out:?}");
        assert!(v[at..at + 12 * BS] == model[20 * BS..32 * BS]);
    }

    #[test]
    fn read_many_fails_only_the_request_the_end_of_the_file_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let (img, model) = fragmented(dir.path());
        // The LBA whose block is the last in the file; the file cut inside that block.
        let (ex, last, cut) = last_block_and_cut(&img);
        let lba = lba_of(&ex, last.0);
        let img = reopen_direct(dir.path(), img);
        cut_at(dir.path(), cut);
        let other = if lba >= 8 { 0 } else { DISK_BLOCKS as u64 - 4 };
        let (mut a, at_a) = aligned(BS);
        let (mut b, at_b) = aligned(4 * BS);
        let sa = [IoSeg::from_mut_slice(&mut a[at_a..at_a + BS])];
        let sb = [IoSeg::from_mut_slice(&mut b[at_b..at_b + 4 * BS])];
        let out = img.read_many(
            &[(lba * BS as u64, &sa[..]), (other * BS as u64, &sb[..])],
            usize::MAX,
            None,
        );
        assert!(
            matches!(out[0], Err(ImageError::Truncated { .. })),
            "{out:?}"
        );
        assert!(matches!(out[1], Ok(BatchRead::Done)), "{out:?}");
        let o = (other * BS as u64) as usize;
        assert!(b[at_b..at_b + 4 * BS] == model[o..o + 4 * BS]);
    }

    /// After a flush: the image's extents from LBA 0, its mapped extent with the highest
    /// block ids (the last data in the file), and a file length 1 KiB into that extent.
    fn last_block_and_cut(img: &Image) -> (Vec<Extent>, (u64, u64), u64) {
        img.flush().unwrap();
        let ex = img.resolve(Lba(0), DISK_BLOCKS as u64).unwrap();
        let last = ex
            .iter()
            .filter_map(|e| match *e {
                Extent::Mapped { pba, blocks } => Some((pba.0, blocks)),
                _ => None,
            })
            .max()
            .unwrap();
        let cut = img.sh.slot_off(last.0).unwrap() + 1024;
        (ex, last, cut)
    }

    /// Truncates the image file in `dir` to `len` bytes (if it is longer).
    fn cut_at(dir: &std::path::Path, len: u64) {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join("img.rrimg"))
            .unwrap();
        if file.metadata().unwrap().len() > len {
            file.set_len(len).unwrap();
        }
    }

    /// The LBA that maps block `pba` in `ex` (extents from LBA 0).
    fn lba_of(ex: &[Extent], pba: u64) -> u64 {
        let mut lba = 0;
        for e in ex {
            if let Extent::Mapped { pba: p, blocks } = *e {
                if (p.0..p.0 + blocks).contains(&pba) {
                    return lba + (pba - p.0);
                }
            }
            lba += e.blocks();
        }
        panic!("block {pba} not mapped");
    }

    // Several writes in one submission (`Image::write_many`).

    #[test]
    fn write_many_writes_a_direct_batch_as_write_vectored_does_and_survives_reopening() {
        write_many_case(true);
    }

    #[test]
    fn write_many_writes_a_buffered_batch_as_write_vectored_does_and_survives_reopening() {
        write_many_case(false);
    }

    /// A batch through `Image::write_many` on an `O_DIRECT` image or a buffered one, against
    /// the model, then checked and reopened.
    fn write_many_case(direct: bool) {
        use crate::image::BatchWrite;
        let dir = tempfile::tempdir().unwrap();
        let (img, mut model) = fragmented(dir.path());
        let disk = (DISK_BLOCKS * BS) as u64;
        let img = if direct {
            reopen_direct(dir.path(), img)
        } else {
            img
        };
        let seq0 = img.seq().0;
        // (offset, length, aligned buffer, expected outcome: 'd' done, 'a' alone, 'e' error)
        let reqs: [(u64, usize, bool, char); 7] = [
            (3 * BS as u64, BS, true, 'd'),
            (50 * BS as u64, 4 * BS, true, 'd'),
            // Not whole blocks: left to the caller.
            (8192 + 512, 1024, true, 'a'),
            // A buffer O_DIRECT cannot take: left to the caller with a direct descriptor.
            (70 * BS as u64, BS, false, if direct { 'a' } else { 'd' }),
            (4096, 0, true, 'd'),
            (disk, 4096, true, 'e'),
            // Overlaps the second request: the later one wins.
            (51 * BS as u64, 2 * BS, true, 'd'),
        ];
        let mut bufs: Vec<(Vec<u8>, usize)> = Vec::new();
        for (k, &(_, len, al, _)) in reqs.iter().enumerate() {
            let (mut v, at) = aligned(len + 1);
            let start = if al { at } else { at + 1 };
            for (i, x) in v[start..start + len].iter_mut().enumerate() {
                *x = (i as u64 * 13 + k as u64 * 101 + 1) as u8;
            }
            bufs.push((v, start));
        }
        let segs: Vec<Vec<IoSeg<'_>>> = bufs
            .iter()
            .zip(&reqs)
            .map(|((v, start), &(_, len, _, _))| vec![IoSeg::from_slice(&v[*start..start + len])])
            .collect();
        let plain: Vec<(u64, &[IoSeg<'_>])> = reqs
            .iter()
            .zip(&segs)
            .map(|(&(off, ..), s)| (off, s.as_slice()))
            .collect();
        let before = queued();
        let mut seen: Vec<Vec<u8>> = vec![Vec::new(); reqs.len()];
        let out = img.write_many_seeing(&plain, &mut |i, piece| seen[i].extend_from_slice(piece));
        // The three whole-block writes got blocks that follow each other: one write.
        let ring = if direct { 1 } else { 0 };
        assert_eq!(
            queued() - before,
            ring,
            "the whole-block writes went to the ring as one"
        );
        let mut seqs = Vec::new();
        let mut pbas = Vec::new();
        for (k, (r, &(off, len, _, want))) in out.iter().zip(&reqs).enumerate() {
            match (want, r) {
                ('d', Ok(BatchWrite::Done(o))) => {
                    assert_eq!(o.blocks, len as u64 / BS as u64, "request {k}");
                    if len > 0 {
                        seqs.push(o.seq.0);
                        pbas.push((o.first_pba.0, o.blocks));
                    }
                }
                ('a', Ok(BatchWrite::Alone)) => {
                    // What the device does with it: write it on its own.
                    img.write_vectored(off, &segs[k]).unwrap();
                }
                ('e', Err(ImageError::OutOfRange { .. })) => {
                    assert!(seen[k].is_empty(), "request {k}: refused, yet shown");
                    continue;
                }
                other => panic!("request {k}: {other:?}"),
            }
            let (v, start) = &bufs[k];
            // The caller was shown, once, the data of exactly the writes the batch placed.
            let shown: &[u8] = if want == 'd' {
                &v[*start..start + len]
            } else {
                &[]
            };
            assert_eq!(seen[k], shown, "request {k}");
            model[off as usize..off as usize + len].copy_from_slice(&v[*start..start + len]);
        }
        // Committed in request order, one seq each, before the ones written alone, in blocks
        // that follow each other (buffered: one run, one pwritev).
        let batched = seqs.len() as u64;
        assert_eq!(batched, if direct { 3 } else { 4 });
        assert_eq!(seqs, (seq0 + 1..=seq0 + batched).collect::<Vec<_>>());
        assert!(
            pbas.windows(2).all(|w| w[1].0 == w[0].0 + w[0].1),
            "{pbas:?}"
        );
        assert_eq!(img.seq().0, seq0 + 5);
        let img = reads_as_model_before_and_after_reopening(img, dir.path(), &model);
        assert_eq!(img.seq().0, seq0 + 5);
    }

    /// The disk reads as `model`, and does so again once flushed, closed, checked clean and
    /// reopened (durable like any write); returns the reopened image.
    fn reads_as_model_before_and_after_reopening(
        img: Image,
        dir: &std::path::Path,
        model: &[u8],
    ) -> Image {
        let mut got = vec![0u8; DISK_BLOCKS * BS];
        img.read_at(0, &mut got).unwrap();
        assert!(got == model, "the disk after the batch");
        img.flush().unwrap();
        img.close().unwrap();
        let path = dir.join("img.rrimg");
        let report = Image::check(&path, false).unwrap();
        assert!(report.is_clean(), "{report:?}");
        let img = Image::open(&path, crate::image::OpenMode::ReadWrite).unwrap();
        let mut got = vec![0u8; DISK_BLOCKS * BS];
        img.read_at(0, &mut got).unwrap();
        assert!(got == model, "the disk after reopening");
        img
    }

    /// A direct batch of 300 single-block writes (1.2 MiB) goes to the disk as two merged
    /// writes (at most `MAX_DIRECT_RUN` each), every request done with its own blocks and
    /// seq, the bytes as the model says, before and after reopening.
    #[test]
    fn a_direct_batch_of_adjacent_writes_goes_as_runs_of_at_most_one_mib() {
        use crate::image::{BatchWrite, MAX_DIRECT_RUN};
        let dir = tempfile::tempdir().unwrap();
        let (img, mut model) = fragmented(dir.path());
        let img = reopen_direct(dir.path(), img);
        let n = 300usize;
        assert!((n * BS) as u64 > MAX_DIRECT_RUN && (n * BS) as u64 <= 2 * MAX_DIRECT_RUN);
        let (mut v, at) = aligned(n * BS);
        for (i, x) in v[at..at + n * BS].iter_mut().enumerate() {
            *x = (i / BS * 7 + i % 251) as u8;
        }
        // Block k of the buffer goes to LBA (k * 37) % DISK_BLOCKS: scattered in the disk
        // (every LBA is written once or twice: the later write wins), adjacent in the file.
        let lbas: Vec<u64> = (0..n).map(|k| ((k * 37) % DISK_BLOCKS) as u64).collect();
        let segs: Vec<[IoSeg<'_>; 1]> = (0..n)
            .map(|k| [IoSeg::from_slice(&v[at + k * BS..at + (k + 1) * BS])])
            .collect();
        let plain: Vec<(u64, &[IoSeg<'_>])> = lbas
            .iter()
            .zip(&segs)
            .map(|(&l, s)| (l * BS as u64, &s[..]))
            .collect();
        let seq0 = img.seq().0;
        let before = queued();
        let out = img.write_many(&plain);
        assert_eq!(queued() - before, 2, "two merged writes");
        for (k, r) in out.iter().enumerate() {
            match r {
                Ok(BatchWrite::Done(o)) => {
                    assert_eq!((o.seq.0, o.blocks), (seq0 + 1 + k as u64, 1))
                }
                other => panic!("request {k}: {other:?}"),
            }
            let l = lbas[k] as usize * BS;
            model[l..l + BS].copy_from_slice(&v[at + k * BS..at + (k + 1) * BS]);
        }
        reads_as_model_before_and_after_reopening(img, dir.path(), &model);
    }

    #[test]
    fn adjacent_writes_are_grouped_up_to_the_limit_in_one_file() {
        let (v, at) = aligned(64 * BS);
        let seg = |k: usize, blocks: usize| {
            vec![IoSeg::from_slice(&v[at + k * BS..at + (k + blocks) * BS])]
        };
        let b = BS as u64;
        let ios = vec![
            Io::write(3, 0, seg(0, 1)),
            Io::write(3, b, seg(1, 2)),
            Io::write(3, 3 * b, seg(3, 1)),
            // A gap: a new run.
            Io::write(3, 10 * b, seg(4, 1)),
            // Adjacent, but another file.
            Io::write(4, 11 * b, seg(5, 1)),
            // A single write over the limit is a run of its own.
            Io::write(4, 12 * b, seg(6, 8)),
            Io::write(4, 20 * b, seg(14, 2)),
            Io::write(4, 22 * b, seg(16, 2)),
            Io::write(4, 24 * b, seg(18, 1)),
        ];
        assert_eq!(
            crate::image::adjacent_runs(&ios, 4 * b),
            vec![0..3, 3..4, 4..5, 5..6, 6..8, 8..9]
        );
        assert_eq!(
            crate::image::adjacent_runs(&ios, u64::MAX),
            vec![0..3, 3..4, 4..9]
        );
        assert!(crate::image::adjacent_runs(&[], 1).is_empty());
        let segs = crate::image::run_segs(&ios, 0..3);
        assert_eq!(segs.len(), 3);
        assert_eq!(crate::iobuf::total_len(&segs), 4 * b);
    }

    #[test]
    fn a_short_merged_write_fails_only_the_writes_it_did_not_cover() {
        let err = || Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        let got = |done| {
            crate::image::run_results([4096u64, 8192, 4096].into_iter(), done, err())
                .iter()
                .map(|r| match r {
                    Ok(()) => 'o',
                    Err(e) => {
                        assert_eq!(e.raw_os_error(), Some(libc::ENOSPC));
                        'e'
                    }
                })
                .collect::<String>()
        };
        assert_eq!(got(0), "eee");
        assert_eq!(got(4096), "oee");
        assert_eq!(got(12287), "oee", "the second write only partly written");
        assert_eq!(got(12288), "ooe");
        let ok = crate::image::run_results([1u64, 2].into_iter(), 0, Ok(()));
        assert!(ok.iter().all(|r| r.is_ok()));
    }

    #[test]
    fn a_direct_write_goes_through_the_ring_only_beside_other_direct_writes() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let (img, mut model) = fragmented(dir.path());
        let img = reopen_direct(dir.path(), img);
        let (mut v, at) = aligned(2 * BS);
        for (others, lba) in [(0u64, 5usize), (1, 9), (0, 140)] {
            v[at..at + 2 * BS].fill(lba as u8);
            img.sh.direct_writes.store(others, Ordering::SeqCst);
            let before = queued();
            let seg = [IoSeg::from_slice(&v[at..at + 2 * BS])];
            img.write_vectored((lba * BS) as u64, &seg).unwrap();
            assert_eq!(queued() - before, others, "{others} other writes in flight");
            assert_eq!(img.sh.direct_writes.load(Ordering::SeqCst), others);
            model[lba * BS..(lba + 2) * BS].fill(lba as u8);
        }
        img.sh.direct_writes.store(0, Ordering::SeqCst);
        let mut got = vec![0u8; DISK_BLOCKS * BS];
        img.read_at(0, &mut got).unwrap();
        assert!(got == model);
        img.close().unwrap();
        let report = Image::check(&dir.path().join("img.rrimg"), false).unwrap();
        assert!(report.is_clean(), "{report:?}");
    }
}

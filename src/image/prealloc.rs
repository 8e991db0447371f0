//! Background preparation of the file area just ahead of the allocation counter.
//!
//! Every write of a redirect-on-write image lands in slots that were never written. A
//! [`Preallocator`] keeps a window of slots ahead of the counter reserved: `fallocate` (mode 0)
//! allocates their blocks and extends the file, never shrinking it nor touching data already
//! there. Appends are then writes inside the file: a buffered write does not change the file's
//! size (and so skips the inode update an extending write makes every time), and ext4 runs
//! aligned `O_DIRECT` writes inside the file in parallel where it runs extending ones one at a
//! time (docs/perf-notes.md, sections 9 and 31).
//!
//! Optionally (not `reserve_only`, buffered images only) the thread also `readahead`s the
//! reserved range, which brings its zero-filled pages into the page cache, so the write that
//! later takes those slots copies into cached pages, like an overwrite of a raw file: on a host
//! that backs guest memory lazily, touching a page the guest has not used for a while is the
//! dominant cost of a small write. The price is small folios, which slow later large reads of
//! that data, and the thread's own CPU.
//!
//! Neither call changes any byte of the file as read back: slots past the counter read as
//! zeros before and after, and a slot that a writer already took is left as it is. So the
//! thread needs no coordination with writers beyond reading the counter.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::shared::Shared;

/// Granularity of one `fallocate` + `readahead` step.
const STEP: u64 = 4 << 20;

/// State shared by the allocator (which wakes the thread) and the thread.
#[derive(Debug, Default)]
pub struct PreallocState {
    /// Bytes to keep prepared ahead of the counter (0: off).
    pub window: AtomicU64,
    /// Slots below this are prepared (or were taken before the thread got there).
    pub prepared: AtomicU64,
    /// Only reserve (`fallocate`), without reading the range into the page cache: the
    /// default, and always so for an image with direct data I/O.
    pub reserve_only: AtomicBool,
    stop: AtomicBool,
    wake: Mutex<()>,
    cv: Condvar,
}

impl PreallocState {
    /// Called after an allocation ended at slot `end`: wakes the thread when less than half
    /// of the window is left.
    pub fn note_alloc(&self, end: u64, bs: u64) {
        let window = self.window.load(Ordering::Relaxed);
        if window == 0 {
            return;
        }
        let low = end.saturating_add(window / 2 / bs);
        if low > self.prepared.load(Ordering::Relaxed) {
            let _g = self.wake.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_one();
        }
    }
}

/// The preparing thread; stopped and joined on drop.
pub struct Preallocator {
    state: Arc<PreallocState>,
    thread: Option<JoinHandle<()>>,
}

impl Preallocator {
    /// Starts the thread for `sh` (whose `prealloc` state it serves).
    pub fn start(sh: Arc<Shared>) -> std::io::Result<Preallocator> {
        let state = Arc::clone(&sh.prealloc);
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("rr-row-prealloc".into())
            .spawn(move || run(&sh, &st))?;
        Ok(Preallocator {
            state,
            thread: Some(thread),
        })
    }
}

impl Drop for Preallocator {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.state.wake.lock().unwrap_or_else(|e| e.into_inner());
            self.state.cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(sh: &Shared, st: &PreallocState) {
    let bs = sh.bs.bytes_u64();
    let step_slots = (STEP / bs).max(1);
    loop {
        let target = {
            let mut g = st.wake.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if st.stop.load(Ordering::SeqCst) {
                    return;
                }
                let window = st.window.load(Ordering::Relaxed) / bs;
                let next = sh.next_slot.load(Ordering::SeqCst);
                let target = next.saturating_add(window);
                if window > 0 && target > st.prepared.load(Ordering::Relaxed) {
                    break target;
                }
                g = st.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        // Never prepare what writers already took: start at the counter.
        let next = sh.next_slot.load(Ordering::SeqCst);
        let start = st.prepared.load(Ordering::Relaxed).max(next);
        let end = target
            .min(start.saturating_add(step_slots))
            .min(sh.slot_limit());
        if end <= start {
            st.prepared.store(target, Ordering::Relaxed);
            continue;
        }
        let (Some(off), Some(off_end)) = (sh.slot_off(start), sh.slot_off(end)) else {
            return;
        };
        if let Err(e) = prepare(
            sh,
            off,
            off_end - off,
            !st.reserve_only.load(Ordering::Relaxed),
        ) {
            // Not an error for the image: writes work without it, only slower.
            log::warn!("preallocation ahead of the image's end stopped: {e}");
            st.window.store(0, Ordering::Relaxed);
            return;
        }
        st.prepared.store(end, Ordering::Relaxed);
    }
}

/// Reserves `[off, off + len)` in the file (extending it if needed, never shrinking it) and,
/// with `cache`, reads it into the page cache.
fn prepare(sh: &Shared, off: u64, len: u64, cache: bool) -> std::io::Result<()> {
    let fd = sh.file.as_raw_fd();
    let o = libc::off_t::try_from(off).map_err(std::io::Error::other)?;
    let l = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: plain system calls on an fd the image keeps open; no memory is passed.
    let r = unsafe { libc::fallocate(fd, 0, o, l) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if !cache {
        return Ok(());
    }
    // SAFETY: as above.
    let r = unsafe { libc::readahead(fd, o, len as usize) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

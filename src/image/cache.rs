//! Dropping superseded block versions from the host page cache.
//!
//! A redirect-on-write image keeps every old version of a block on disk, and with buffered I/O
//! the old version also stays in the page cache until memory pressure evicts it: a disk that is
//! overwritten twice holds two copies of itself in the cache, and every write fills a page the
//! kernel has to find first. Old versions are cold by construction - only history reads
//! (`state_at`, `read_block`, a replay) ever read them again - so the [`CacheDropper`] thread
//! tells the kernel to drop them (`posix_fadvise(POSIX_FADV_DONTNEED)`); their pages go back
//! to the free lists, where the next appended writes find them (on the measured machine, filling
//! recently freed pages is about 4x faster than filling pages the guest kernel has not touched
//! for a while; docs/perf-notes.md).
//!
//! Runs are merged with their neighbours first, and only runs of at least 256 KiB are dropped:
//! a scattered 4 KiB version is not worth a system call.
//!
//! Only clean pages can be dropped, so a superseded run waits until a sync has covered it: the
//! image reports each completed `fdatasync` with the allocation counter as it was before the
//! sync started ([`DropState::synced`]), and runs below that mark are dropped. Nothing here
//! changes a byte of the file; a run that is still dirty or was read back into the cache since
//! is simply not dropped (the kernel skips it). History reads of dropped blocks come from the
//! disk.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::shared::Shared;

/// Most superseded runs kept waiting for a sync; beyond it new runs are forgotten (they stay in
/// the cache until the kernel evicts them): bounds the memory of an image that never syncs.
const MAX_PENDING: usize = 1 << 20;

/// How often the thread looks at pending runs without being woken.
const TICK: Duration = Duration::from_millis(200);

/// Smallest run (after merging neighbours) worth a system call. Scattered small runs (random
/// 4 KiB overwrites) are forgotten: dropping them one `fadvise` at a time cost more CPU than
/// their pages are worth (measured: 4 KiB random writes at QD32 lost a third of their speed).
const MIN_RUN_BYTES: u64 = 256 << 10;

/// Pending bytes below the sync mark that wake the thread early.
const WAKE_BYTES: u64 = 8 << 20;

/// State shared by the image (which queues superseded runs and reports syncs) and the thread.
#[derive(Debug, Default)]
pub struct DropState {
    /// Whether superseded runs are queued at all.
    pub enabled: AtomicBool,
    /// Slots below this were allocated before the last completed sync started.
    synced_below: AtomicU64,
    pending: Mutex<Vec<(u64, u64)>>,
    stop: AtomicBool,
    cv: Condvar,
    /// Runs dropped and slots dropped so far (for tests and `info`-style reporting).
    dropped_runs: AtomicU64,
    dropped_slots: AtomicU64,
}

impl DropState {
    /// Queues slot runs `(first, count)` whose blocks no LBA maps any more.
    pub fn superseded(&self, runs: &[(u64, u64)], bs: u64) {
        if runs.is_empty() || !self.enabled.load(Ordering::Relaxed) {
            return;
        }
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() + runs.len() > MAX_PENDING {
            return;
        }
        p.extend_from_slice(runs);
        let below = self.synced_below.load(Ordering::Relaxed);
        let ready: u64 = runs
            .iter()
            .filter(|r| r.0.saturating_add(r.1) <= below)
            .map(|r| r.1.saturating_mul(bs))
            .sum();
        if ready >= WAKE_BYTES {
            self.cv.notify_one();
        }
    }

    /// Reports a completed sync that started when the allocation counter was `next_slot`.
    pub fn synced(&self, next_slot: u64) {
        self.synced_below.fetch_max(next_slot, Ordering::Relaxed);
        if self.enabled.load(Ordering::Relaxed) {
            let _g = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.cv.notify_one();
        }
    }

    /// `(runs, slots)` handed to the kernel to drop so far.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.dropped_runs.load(Ordering::Relaxed),
            self.dropped_slots.load(Ordering::Relaxed),
        )
    }
}

/// The dropping thread; stopped and joined on drop.
pub struct CacheDropper {
    state: Arc<DropState>,
    thread: Option<JoinHandle<()>>,
}

impl CacheDropper {
    /// Starts the thread for `sh` (whose `drop_state` it serves).
    pub fn start(sh: Arc<Shared>) -> std::io::Result<CacheDropper> {
        let state = Arc::clone(&sh.drop_state);
        let st = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("rr-row-cache-drop".into())
            .spawn(move || run(&sh, &st))?;
        Ok(CacheDropper {
            state,
            thread: Some(thread),
        })
    }
}

impl Drop for CacheDropper {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        {
            let _g = self.state.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.state.cv.notify_one();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(sh: &Shared, st: &DropState) {
    let bs = sh.bs.bytes_u64();
    loop {
        let ready = {
            let mut p = st.pending.lock().unwrap_or_else(|e| e.into_inner());
            if st.stop.load(Ordering::SeqCst) {
                return;
            }
            p = st
                .cv
                .wait_timeout(p, TICK)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
            if st.stop.load(Ordering::SeqCst) {
                return;
            }
            let below = st.synced_below.load(Ordering::Relaxed);
            let (ready, wait): (Vec<_>, Vec<_>) =
                p.drain(..).partition(|r| r.0.saturating_add(r.1) <= below);
            *p = wait;
            ready
        };
        for (first, n) in merge(ready) {
            if n.saturating_mul(bs) < MIN_RUN_BYTES {
                continue;
            }
            if let Err(e) = drop_pages(sh, first, n, bs) {
                log::debug!("cannot drop superseded slots {first}+{n} from the page cache: {e}");
                continue;
            }
            st.dropped_runs.fetch_add(1, Ordering::Relaxed);
            st.dropped_slots.fetch_add(n, Ordering::Relaxed);
        }
    }
}

/// Sorts runs and merges those that touch or overlap.
fn merge(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, n) in runs {
        let end = s.saturating_add(n);
        match out.last_mut() {
            Some((ls, ln)) if *ls + *ln >= s => *ln = (*ln).max(end - *ls),
            _ => out.push((s, n)),
        }
    }
    out
}

fn drop_pages(sh: &Shared, first: u64, n: u64, bs: u64) -> std::io::Result<()> {
    let off = sh
        .slot_off(first)
        .ok_or_else(|| std::io::Error::other("offset overflow"))?;
    let len = n
        .checked_mul(bs)
        .ok_or_else(|| std::io::Error::other("length overflow"))?;
    let o = libc::off_t::try_from(off).map_err(std::io::Error::other)?;
    let l = libc::off_t::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: a plain system call on an fd the image keeps open; no memory is passed, and the
    // advice changes no byte of the file.
    let r = unsafe { libc::posix_fadvise(sh.file.as_raw_fd(), o, l, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::merge;

    #[test]
    fn merge_joins_touching_and_overlapping_runs() {
        assert_eq!(
            merge(vec![(10, 2), (0, 4), (4, 1), (12, 3), (20, 1), (13, 1)]),
            vec![(0, 5), (10, 5), (20, 1)]
        );
        assert_eq!(merge(Vec::new()), Vec::<(u64, u64)>::new());
    }
}

//! Background relocation of fragmented ranges, shared by [`super::image_dev::ImageDevice`] and
//! [`super::record_dev::RecordingDevice`].
//!
//! A read that found its data spread over many physical runs hands those extents to a
//! background thread, which relocates them into one contiguous run
//! ([`Image::relocate_extents`]) while the guest's read has long completed: the read itself
//! costs nothing more, and the next read of that range is one system call. A relocation never
//! frees or changes an old block, so record logs that name the old blocks stay valid.
//!
//! The same thread also defragments while the device is idle ([`RelocPolicy::idle_after`]):
//! once no batch of requests has ended for that long, it walks the windows of
//! [`MAX_MERGED_BLOCKS`] blocks that were written since it last looked at them
//! ([`Relocator::note_written`]; every window once after the start) and relocates every piece
//! of [`DEFRAG_PIECE`] bytes that a read of it would find in at least [`DEFRAG_MIN_RUNS`]
//! physical runs of data blocks (adjacent pieces together), one window at a time, stopping as
//! soon as a request arrives, and no faster than [`RelocPolicy::idle_rate`] when that is set.
//! A walk costs what was written since the last one, not the size of the disk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{
    sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError,
};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::image::{Extent, Image};
use crate::iobuf::{scatter, total_len, IoSeg, PageBuf};
use crate::units::{Lba, Seq};

/// Relocation requests waiting for the background thread; more are dropped (a later read of
/// the same range asks again).
const RELOCATION_QUEUE: usize = 64;

/// The most blocks one merged relocation covers (2 MiB of 4 KiB blocks); also the window of
/// the idle defragmenter.
pub const MAX_MERGED_BLOCKS: u64 = 512;

/// The idle defragmenter looks at pieces of this many bytes (aligned in the disk): the size
/// of a large guest read.
pub const DEFRAG_PIECE: u64 = 128 << 10;

/// A piece is relocated when its data blocks lie in at least this many physical runs (as
/// `serve --relocate-on-read`'s default): so at least two writes landed inside it, and a
/// walk rewrites at most 64 KiB per 4 KiB written, where a rule over the whole window would
/// rewrite 2 MiB for a few scattered writes.
pub const DEFRAG_MIN_RUNS: usize = 4;

/// How often the relocation thread looks whether the device went idle.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// What the relocation thread does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RelocPolicy {
    /// Relocate a read's range when its data blocks were spread over at least this many
    /// physical runs; below 2, reads relocate nothing.
    pub on_read_min_runs: usize,
    /// Defragment the disk once no batch of requests has ended for this long; `None`: never.
    pub idle_after: Option<Duration>,
    /// The most bytes per second the idle defragmenter relocates, on average over its
    /// windows; `None`: as fast as the disk goes.
    pub idle_rate: Option<u64>,
}

impl RelocPolicy {
    /// Relocation on read only (`min_runs` below 2: nothing).
    pub fn on_read(min_runs: usize) -> Self {
        RelocPolicy {
            on_read_min_runs: min_runs,
            idle_after: None,
            idle_rate: None,
        }
    }

    /// Whether there is anything for a thread to do.
    pub fn is_active(&self) -> bool {
        self.on_read_min_runs >= 2 || self.idle_after.is_some()
    }
}

/// Counters of the idle defragmenter, for logs and tests.
#[derive(Debug, Default)]
pub struct DefragStats {
    /// Complete walks over the windows written since the previous walk.
    pub passes: AtomicU64,
    /// Windows looked at (each costs one map lookup).
    pub windows: AtomicU64,
    /// Stretches relocated.
    pub relocations: AtomicU64,
    /// Blocks relocated.
    pub blocks: AtomicU64,
}

/// The largest `O_DIRECT` read that goes through a private buffer handed to its relocation
/// ([`Relocator::read_and_offer`]); larger ones are read again from the disk by the
/// relocation thread. With the 64 requests the queue holds, at most 32 MiB of buffers.
pub const MAX_COPY: usize = 512 << 10;

/// One relocation request: a range, the extents a read found backing it, and, when the read
/// went to a private buffer, that buffer (so that the relocation does not read the scattered
/// blocks from the disk a second time).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    lba: Lba,
    extents: Vec<Extent>,
    data: Option<PageBuf>,
}

impl Req {
    fn blocks(&self) -> u64 {
        self.extents.iter().map(Extent::blocks).sum()
    }
}

/// One bit per window of [`MAX_MERGED_BLOCKS`] blocks: set when the window was written since
/// the idle defragmenter last looked at it. Lock-free: writers set bits, the defragmenter
/// clears one before it looks at its window, so a write during the look marks it again.
/// 64 KiB for a 1 TiB disk of 4 KiB blocks.
#[derive(Debug)]
struct WindowMarks {
    words: Vec<AtomicU64>,
    windows: u64,
}

impl WindowMarks {
    /// Marks for a disk of `blocks` blocks, every window marked (an image may come fragmented
    /// from an earlier run).
    fn all(blocks: u64) -> WindowMarks {
        let windows = blocks.div_ceil(MAX_MERGED_BLOCKS);
        let words = (0..windows.div_ceil(64))
            .map(|w| {
                let left = windows - w * 64;
                AtomicU64::new(if left >= 64 {
                    u64::MAX
                } else {
                    (1u64 << left) - 1
                })
            })
            .collect();
        WindowMarks { words, windows }
    }

    /// Marks the windows that blocks `first..first + blocks` touch (past the end: ignored).
    fn mark(&self, first: u64, blocks: u64) {
        if blocks == 0 || first / MAX_MERGED_BLOCKS >= self.windows {
            return;
        }
        let lo = first / MAX_MERGED_BLOCKS;
        let hi = (first.saturating_add(blocks - 1) / MAX_MERGED_BLOCKS).min(self.windows - 1);
        for w in lo..=hi {
            self.set(w);
        }
    }

    fn set(&self, window: u64) {
        if let Some(word) = self.words.get((window / 64) as usize) {
            // A bit already set (the common case for a busy window) costs a load only.
            let bit = 1u64 << (window % 64);
            if word.load(Ordering::Relaxed) & bit == 0 {
                word.fetch_or(bit, Ordering::Relaxed);
            }
        }
    }

    /// The first marked window at or after `from`, if any.
    fn next(&self, from: u64) -> Option<u64> {
        let mut i = (from / 64) as usize;
        let mut mask = u64::MAX.checked_shl((from % 64) as u32).unwrap_or(0);
        while let Some(word) = self.words.get(i) {
            let v = word.load(Ordering::Relaxed) & mask;
            if v != 0 {
                return Some(i as u64 * 64 + u64::from(v.trailing_zeros()));
            }
            i += 1;
            mask = u64::MAX;
        }
        None
    }

    /// Clears `window`'s mark (before the window is looked at).
    fn clear(&self, window: u64) {
        if let Some(word) = self.words.get((window / 64) as usize) {
            word.fetch_and(!(1u64 << (window % 64)), Ordering::Relaxed);
        }
    }
}

/// Sorts relocation requests by LBA and joins those whose ranges follow each other (up to
/// `max_blocks` blocks per result), so that one relocation writes one longer run with one
/// journal record. A joined request's extents are the concatenation of its parts', with
/// physically contiguous runs at the seams merged, as the map itself would report them
/// (the relocation only commits if the map still resolves to exactly these extents); it has
/// data when every part had. Exact repeats are dropped; overlapping requests are kept apart
/// (the later one then finds the map changed and does nothing).
fn merge_adjacent(mut reqs: Vec<Req>, max_blocks: u64) -> Vec<Req> {
    reqs.sort_by_key(|r| r.lba.0);
    // The same range read twice before the thread got to it.
    reqs.dedup_by(|a, b| a.lba == b.lba && a.extents == b.extents);
    // Each result with its length in blocks and its parts' data (None once a part had none).
    let mut out: Vec<(Req, u64, Option<Vec<PageBuf>>)> = Vec::with_capacity(reqs.len());
    for r in reqs {
        let blocks = r.blocks();
        if let Some((cur, n, parts)) = out.last_mut() {
            if cur.lba.0.checked_add(*n) == Some(r.lba.0) && *n + blocks <= max_blocks {
                for e in r.extents {
                    match (cur.extents.last_mut(), e) {
                        (
                            Some(Extent::Mapped { pba, blocks: b }),
                            Extent::Mapped {
                                pba: next,
                                blocks: nb,
                            },
                        ) if pba.0.checked_add(*b) == Some(next.0) => *b += nb,
                        _ => cur.extents.push(e),
                    }
                }
                *n += blocks;
                *parts = match (parts.take(), r.data) {
                    (Some(mut p), Some(d)) => {
                        p.push(d);
                        Some(p)
                    }
                    _ => None,
                };
                continue;
            }
        }
        let parts = r.data.map(|d| vec![d]);
        out.push((
            Req {
                lba: r.lba,
                extents: r.extents,
                data: None,
            },
            blocks,
            parts,
        ));
    }
    out.into_iter()
        .map(|(mut r, _, parts)| {
            r.data = match parts {
                Some(mut p) if p.len() == 1 => p.pop(),
                Some(p) => Some(PageBuf::concat(&p)),
                None => None,
            };
            r
        })
        .collect()
}

/// Whether the map still resolves `lba..` to exactly `extents` (what the read saw).
fn is_current(img: &Image, lba: Lba, extents: &[Extent]) -> bool {
    let blocks: u64 = extents.iter().map(Extent::blocks).sum();
    matches!(img.resolve(lba, blocks), Ok(now) if now == extents)
}

/// The ranges of a window worth relocating, as (first LBA, blocks): `extents` (resolved from
/// `lba`) are cut into pieces of `piece` blocks aligned in the disk; a piece is picked when it
/// holds only data blocks in at least `min_runs` runs (the extents that overlap it); adjacent
/// picked pieces form one range.
fn fragmented_ranges(lba: Lba, extents: &[Extent], piece: u64, min_runs: usize) -> Vec<(Lba, u64)> {
    let piece = piece.max(1);
    let end = lba.0 + extents.iter().map(Extent::blocks).sum::<u64>();
    let mut out: Vec<(Lba, u64)> = Vec::new();
    let mut i = 0; // first extent that may overlap the piece
    let mut at = lba.0; // where extent `i` starts
    let mut p = lba.0 - lba.0 % piece;
    while p < end {
        let (lo, hi) = (p.max(lba.0), (p + piece).min(end));
        let (mut runs, mut data, mut j, mut pos) = (0usize, true, i, at);
        while let Some(e) = extents.get(j) {
            if pos >= hi {
                break;
            }
            if pos + e.blocks() > lo {
                runs += 1;
                data &= matches!(e, Extent::Mapped { .. });
            }
            pos += e.blocks();
            j += 1;
        }
        if data && runs >= min_runs {
            match out.last_mut() {
                Some((s, n)) if s.0 + *n == lo => *n += hi - lo,
                _ => out.push((Lba(lo), hi - lo)),
            }
        }
        // Move past the extents that end inside this piece.
        while let Some(e) = extents.get(i) {
            if at + e.blocks() > hi {
                break;
            }
            at += e.blocks();
            i += 1;
        }
        p += piece;
    }
    out
}

/// Relocates a batch of requests: drops those the map no longer matches, joins adjacent
/// ranges ([`merge_adjacent`]) and relocates each result. A stale request (its range was
/// relocated or written since the read) would otherwise make the whole merged relocation it
/// joins find the map changed and do nothing.
fn relocate_batch(img: &Image, mut batch: Vec<Req>) {
    batch.retain(|r| is_current(img, r.lba, &r.extents));
    for r in merge_adjacent(batch, MAX_MERGED_BLOCKS) {
        match img.relocate_extents_from(r.lba, &r.extents, r.data.as_ref().map(PageBuf::bytes)) {
            Ok(true) => log::trace!("relocated {} runs at LBA {}", r.extents.len(), r.lba.0),
            Ok(false) => {}
            Err(e) => log::debug!("relocation at LBA {} failed: {e}", r.lba.0),
        }
    }
}

/// The idle defragmenter's state on the relocation thread.
struct Defrag {
    idle_after: Duration,
    /// Bytes per second, at most.
    rate: Option<u64>,
    /// The windows written since they were last looked at.
    marks: Arc<WindowMarks>,
    /// The next window the walk looks at.
    cursor: u64,
    /// The windows the current walk looked at, and the stretches and blocks it relocated.
    pass_windows: u64,
    pass_moved: u64,
    pass_blocks: u64,
    /// A relocation failed with the disk at this seq: no walk until the seq moves.
    failed_at: Option<Seq>,
    /// The activity counter as last seen, and since when it has not moved.
    seen: u64,
    quiet_since: Instant,
    /// With a rate: no window before this.
    next_at: Option<Instant>,
    stats: Arc<DefragStats>,
}

impl Defrag {
    /// A walk over the windows `marks` holds, once the device has been idle for `idle_after`,
    /// relocating at most `rate` bytes per second.
    fn new(
        idle_after: Duration,
        rate: Option<u64>,
        marks: Arc<WindowMarks>,
        stats: Arc<DefragStats>,
    ) -> Defrag {
        Defrag {
            idle_after,
            rate: rate.filter(|&r| r > 0),
            marks,
            cursor: 0,
            pass_windows: 0,
            pass_moved: 0,
            pass_blocks: 0,
            failed_at: None,
            seen: 0,
            quiet_since: Instant::now(),
            next_at: None,
            stats,
        }
    }

    /// How long the thread may wait for a request before it calls [`Defrag::run`] again: the
    /// idle poll, or less when the rate lets the next window go sooner.
    fn wait(&self) -> Duration {
        match self.next_at {
            Some(t) => t
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), IDLE_POLL),
            None => IDLE_POLL,
        }
    }

    /// Relocates marked windows while the device stays idle; returns when a request arrives
    /// (the activity counter moved or a relocation request is waiting), when the rate asks
    /// for a pause, or when no window is marked.
    fn run(&mut self, img: &Image, activity: &AtomicU64, rx: &Receiver<Req>) -> Option<Req> {
        let now = activity.load(Ordering::Relaxed);
        if now != self.seen {
            self.seen = now;
            self.quiet_since = Instant::now();
            return None;
        }
        if self.quiet_since.elapsed() < self.idle_after
            || self.failed_at.is_some_and(|s| s == img.seq())
            || self.next_at.is_some_and(|t| Instant::now() < t)
        {
            return None;
        }
        self.failed_at = None;
        let bs = img.block_size().bytes_u64();
        let piece = (DEFRAG_PIECE / bs).max(1);
        let end = img.size() / bs;
        loop {
            let Some(w) = self.marks.next(self.cursor) else {
                // The end of the disk: a walk is complete.
                if self.pass_windows > 0 {
                    self.stats.passes.fetch_add(1, Ordering::Relaxed);
                    if self.pass_moved > 0 {
                        log::info!(
                            "idle defragmentation: relocated {} fragmented stretches ({} MiB) in {} written windows",
                            self.pass_moved,
                            (self.pass_blocks * bs) >> 20,
                            self.pass_windows
                        );
                    }
                }
                self.pass_windows = 0;
                self.pass_moved = 0;
                self.pass_blocks = 0;
                if self.cursor == 0 {
                    return None;
                }
                self.cursor = 0;
                continue;
            };
            // Cleared before the look: a write meanwhile marks the window again.
            self.marks.clear(w);
            self.cursor = w + 1;
            self.pass_windows += 1;
            self.stats.windows.fetch_add(1, Ordering::Relaxed);
            let first = w * MAX_MERGED_BLOCKS;
            let n = MAX_MERGED_BLOCKS.min(end.saturating_sub(first));
            let started = Instant::now();
            let mut moved = 0;
            if let Ok(extents) = img.resolve(Lba(first), n) {
                for (lba, blocks) in fragmented_ranges(Lba(first), &extents, piece, DEFRAG_MIN_RUNS)
                {
                    // The range's own extents, cut at its ends, as the relocation expects.
                    let Ok(ex) = img.resolve(lba, blocks) else {
                        continue;
                    };
                    match img.relocate_extents(lba, &ex) {
                        Ok(true) => {
                            let blocks: u64 = ex.iter().map(Extent::blocks).sum();
                            moved += blocks;
                            self.pass_moved += 1;
                            self.pass_blocks += blocks;
                            self.stats.relocations.fetch_add(1, Ordering::Relaxed);
                            self.stats.blocks.fetch_add(blocks, Ordering::Relaxed);
                        }
                        Ok(false) => {}
                        Err(e) => {
                            log::debug!("defragmentation at LBA {} failed: {e}", lba.0);
                            // Try again after the next write rather than in a loop.
                            self.marks.set(w);
                            self.failed_at = Some(img.seq());
                            return None;
                        }
                    }
                }
            }
            if let Some(rate) = self.rate.filter(|_| moved > 0) {
                // The window's own time counts toward its share: the pause is what is left.
                let base = self.next_at.map_or(started, |t| t.max(started));
                self.next_at =
                    Some(base + Duration::from_secs_f64((moved * bs) as f64 / rate as f64));
            }
            // Give way to the guest at once, and to a stop (the device is going away: the
            // thread's owner waits for it, so it must not finish a walk of the disk first).
            if activity.load(Ordering::Relaxed) != self.seen {
                return None;
            }
            match rx.try_recv() {
                Ok(r) => return Some(r),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            if self.next_at.is_some_and(|t| Instant::now() < t) {
                return None;
            }
        }
    }
}

/// The background relocation thread and its queue; stopped and joined on drop.
pub struct Relocator {
    min_runs: usize,
    block_size: u64,
    activity: Arc<AtomicU64>,
    /// The windows written since the idle defragmenter looked at them; `None` when it is off.
    marks: Option<Arc<WindowMarks>>,
    stats: Arc<DefragStats>,
    tx: Option<SyncSender<Req>>,
    thread: Option<JoinHandle<()>>,
}

impl Relocator {
    /// Starts the relocation thread for `image` with `policy`. `None` for read-only images
    /// and a policy with nothing to do.
    pub fn start(image: &Arc<Image>, policy: RelocPolicy) -> std::io::Result<Option<Self>> {
        if !policy.is_active() || image.is_read_only() {
            return Ok(None);
        }
        let (tx, rx) = sync_channel::<Req>(RELOCATION_QUEUE);
        let img = Arc::clone(image);
        let activity = Arc::new(AtomicU64::new(0));
        let stats = Arc::new(DefragStats::default());
        let block_size = image.block_size().bytes_u64();
        let marks = policy
            .idle_after
            .map(|_| Arc::new(WindowMarks::all(image.size() / block_size)));
        let mut defrag = policy.idle_after.zip(marks.clone()).map(|(idle_after, m)| {
            Defrag::new(idle_after, policy.idle_rate, m, Arc::clone(&stats))
        });
        let act = Arc::clone(&activity);
        let thread = std::thread::Builder::new()
            .name("rr-row-relocate".into())
            .spawn(move || loop {
                let first = match &mut defrag {
                    None => match rx.recv() {
                        Ok(r) => r,
                        Err(_) => return,
                    },
                    Some(d) => match rx.recv_timeout(d.wait()) {
                        Ok(r) => r,
                        Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => match d.run(&img, &act, &rx) {
                            Some(r) => r,
                            None => continue,
                        },
                    },
                };
                // Take every request already waiting, so that the ranges a sequential
                // reader asked for one after the other become one relocation.
                let mut batch = vec![first];
                while batch.len() < RELOCATION_QUEUE {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                relocate_batch(&img, batch);
            })?;
        Ok(Some(Relocator {
            min_runs: if policy.on_read_min_runs >= 2 {
                policy.on_read_min_runs
            } else {
                usize::MAX
            },
            block_size,
            activity,
            marks,
            stats,
            tx: Some(tx),
            thread: Some(thread),
        }))
    }

    /// Notes that the device served requests (a batch ended): the idle defragmenter waits
    /// for its idle time again. One relaxed atomic add.
    pub fn note_activity(&self) {
        self.activity.fetch_add(1, Ordering::Relaxed);
    }

    /// Notes that `len` bytes at byte `offset` were written (or are being written): the idle
    /// defragmenter looks at their windows in its next walk. Nothing when it is off; a few
    /// relaxed atomic operations otherwise.
    pub fn note_written(&self, offset: u64, len: u64) {
        if let Some(m) = &self.marks {
            let first = offset / self.block_size;
            let last = offset.saturating_add(len.max(1) - 1) / self.block_size;
            m.mark(first, last - first + 1);
        }
    }

    /// The idle defragmenter's counters (all zero when it is off).
    pub fn defrag_stats(&self) -> &DefragStats {
        &self.stats
    }

    /// The fewest runs that make a read's range worth relocating; `None` when reads relocate
    /// nothing (only the idle defragmenter runs).
    pub fn min_runs(&self) -> Option<usize> {
        (self.min_runs != usize::MAX).then_some(self.min_runs)
    }

    /// The `max_extents` of a batch's [`Image::read_many`] for a device with `reloc`: reads
    /// that relocation on read wants go on their own, with the trace it needs.
    pub fn batch_read_limit(reloc: Option<&Relocator>) -> usize {
        reloc.and_then(Relocator::min_runs).unwrap_or(usize::MAX)
    }

    /// Reads `segs` at byte `offset` of `image` (tracing the extents into `trace`, as
    /// [`Image::read_vectored`] does, and returning its seq) and offers the range for
    /// relocation when the read found enough data-block runs.
    ///
    /// With `O_DIRECT`, reading the scattered blocks again would cost the disk as much as the
    /// read itself: a whole-block read of up to [`MAX_COPY`] bytes that the map shows
    /// fragmented is read into a private buffer instead, copied into `segs`, and handed to
    /// the relocation. Never a copy taken from `segs`: guest memory can change under a read,
    /// and a relocation must write exactly the old blocks' content.
    pub fn read_and_offer(
        &self,
        image: &Image,
        offset: u64,
        segs: &[IoSeg<'_>],
        trace: &mut Vec<Extent>,
    ) -> Result<crate::units::Seq, crate::image::ImageError> {
        let len = total_len(segs);
        if !self.wants_copy(image, offset, len) {
            let seq = image.read_vectored(offset, segs, Some(&mut *trace))?;
            self.offer(offset, trace, None);
            return Ok(seq);
        }
        let mut buf = PageBuf::new(len as usize);
        let seq = image.read_vectored(
            offset,
            &[IoSeg::from_mut_slice(buf.bytes_mut())],
            Some(&mut *trace),
        )?;
        scatter(segs, 0, buf.bytes());
        self.offer(offset, trace, Some(buf));
        Ok(seq)
    }

    /// Whether a read of `len` bytes at `offset` should go through a private buffer: a
    /// direct image, whole blocks, at most [`MAX_COPY`], and at least `min_runs` data-block
    /// runs in the map now (a hint: the read's own trace decides what is offered).
    fn wants_copy(&self, image: &Image, offset: u64, len: u64) -> bool {
        if !image.is_direct()
            || self.min_runs == usize::MAX
            || offset % self.block_size != 0
            || len % self.block_size != 0
            || len == 0
            || len > MAX_COPY as u64
        {
            return false;
        }
        matches!(
            image.resolve(Lba(offset / self.block_size), len / self.block_size),
            Ok(ex) if ex.len() >= self.min_runs && ex.iter().all(|e| matches!(e, Extent::Mapped { .. }))
        )
    }

    /// Offers the extents `trace` that a completed read at byte `offset` found; queued when
    /// they are enough data-block runs, dropped when the queue is full. `data`, a private
    /// copy of exactly those blocks' content, spares the relocation reading them again.
    fn offer(&self, offset: u64, trace: &[Extent], data: Option<PageBuf>) {
        if trace.len() < self.min_runs || !trace.iter().all(|e| matches!(e, Extent::Mapped { .. }))
        {
            return;
        }
        let Some(tx) = &self.tx else {
            return;
        };
        let req = Req {
            lba: Lba(offset / self.block_size),
            extents: trace.to_vec(),
            data,
        };
        match tx.try_send(req) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => log::debug!("relocation thread gone"),
        }
    }

    /// Stops the thread (after the relocations already queued) and waits for it.
    pub fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Relocator {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::CreateOptions;
    use crate::units::{BlockSize, Pba};

    /// A new image of `size` bytes in 4 KiB blocks.
    fn new_image(path: &std::path::Path, size: u64) -> Image {
        let opts = CreateOptions {
            size,
            block_size: BlockSize::new(4096).unwrap(),
            base: None,
        };
        Image::create(path, &opts).unwrap()
    }

    fn req(lba: u64, extents: Vec<Extent>) -> Req {
        Req {
            lba: Lba(lba),
            extents,
            data: None,
        }
    }

    fn plain(reqs: Vec<Req>) -> Vec<(Lba, Vec<Extent>)> {
        reqs.into_iter().map(|r| (r.lba, r.extents)).collect()
    }

    fn m(pba: u64, blocks: u64) -> Extent {
        Extent::Mapped {
            pba: Pba(pba),
            blocks,
        }
    }

    #[test]
    fn adjacent_ranges_merge_in_lba_order_and_seams_coalesce() {
        let reqs = vec![
            req(8, vec![m(100, 4), m(7, 4)]),
            req(0, vec![m(50, 2), m(90, 6)]),
            req(16, vec![m(11, 8)]),
        ];
        let got = plain(merge_adjacent(reqs, 512));
        assert_eq!(
            got,
            vec![(Lba(0), vec![m(50, 2), m(90, 6), m(100, 4), m(7, 12)])],
            "0..8 then 8..16 then 16..24; 96..100 and 100.. and 7..11 and 11.. are contiguous"
        );
    }

    #[test]
    fn gaps_overlaps_and_the_size_limit_keep_requests_apart() {
        let reqs = vec![
            req(0, vec![m(10, 8)]),
            req(9, vec![m(30, 8)]),  // gap at 8
            req(9, vec![m(30, 8)]),  // repeated: dropped
            req(12, vec![m(40, 2)]), // overlaps 9..17
            req(17, vec![m(60, 8)]), // does not follow 12..14: a new start
            req(25, vec![m(80, 8)]), // follows 17..25
            req(33, vec![m(90, 8)]), // would take 17.. past 16 blocks
        ];
        let got = plain(merge_adjacent(reqs, 16));
        assert_eq!(
            got,
            vec![
                (Lba(0), vec![m(10, 8)]),
                (Lba(9), vec![m(30, 8)]),
                (Lba(12), vec![m(40, 2)]),
                (Lba(17), vec![m(60, 8), m(80, 8)]),
                (Lba(33), vec![m(90, 8)]),
            ]
        );
    }

    /// Regression (a flaky test): a request made stale by an earlier relocation of its range
    /// joined the fresh requests for the ranges after it, and the merged relocation then found
    /// the map changed and relocated none of them.
    #[test]
    fn a_stale_request_does_not_spoil_the_merged_relocation() {
        let dir = tempfile::tempdir().unwrap();
        let img = new_image(&dir.path().join("r.rrow"), 1 << 20);
        // 64 blocks written whole, then every other one overwritten: 64 runs.
        img.write_at(0, &vec![1u8; 64 * 4096]).unwrap();
        for b in (0..64u64).step_by(2) {
            img.write_at(b * 4096, &[2u8; 4096]).unwrap();
        }
        let reqs: Vec<Req> = (0..4u64)
            .map(|i| req(i * 16, img.resolve(Lba(i * 16), 16).unwrap()))
            .collect();
        assert!(reqs.iter().all(|r| r.extents.len() == 16));
        // The first range is relocated on its own; its request, read before that, is stale.
        assert!(img.relocate_extents(reqs[0].lba, &reqs[0].extents).unwrap());
        relocate_batch(&img, reqs);
        let runs = img.resolve(Lba(0), 64).unwrap();
        assert!(runs.len() <= 2, "{runs:?}");
        let mut got = vec![0u8; 64 * 4096];
        img.read_at(0, &mut got).unwrap();
        for (b, chunk) in got.chunks(4096).enumerate() {
            let want = if b % 2 == 0 { 2 } else { 1 };
            assert!(chunk.iter().all(|&x| x == want), "block {b}");
        }
    }

    #[test]
    fn fragmented_ranges_are_pieces_of_data_blocks_in_enough_runs() {
        let z = |blocks| Extent::Zero { blocks };
        // Pieces of 8 blocks, 3 runs or more; the extents start at LBA 4 (mid-piece).
        let ex = vec![
            m(10, 1),
            m(20, 1),
            m(30, 2), // LBAs 4..8: 3 runs in the piece 0..8 (from 4): picked
            m(40, 3),
            m(50, 3),
            m(60, 2), // 8..16: 3 runs: picked, joined to the first
            m(70, 8), // 16..24: one run: left
            m(80, 2),
            z(2),
            m(90, 4), // 24..32: a hole: left
            m(100, 1),
            m(110, 1),
            m(120, 6), // 32..40: 3 runs: picked
            m(130, 7), // 40..47: one run (the extents end at 47): left
        ];
        assert_eq!(
            fragmented_ranges(Lba(4), &ex, 8, 3),
            vec![(Lba(4), 12), (Lba(32), 8)]
        );
        // A run that spans two pieces counts in both.
        let ex = vec![m(1, 1), m(5, 1), m(9, 10), m(30, 1), m(40, 1)];
        assert_eq!(fragmented_ranges(Lba(0), &ex, 8, 3), vec![(Lba(0), 14)]);
        assert_eq!(fragmented_ranges(Lba(0), &ex, 8, 4), vec![]);
        // One write inside a whole piece makes 3 runs: not enough at 4.
        let ex = vec![m(0, 3), m(99, 1), m(4, 4)];
        assert!(fragmented_ranges(Lba(0), &ex, 8, DEFRAG_MIN_RUNS).is_empty());
        assert!(fragmented_ranges(Lba(0), &[z(8)], 8, 1).is_empty());
        assert!(fragmented_ranges(Lba(0), &[], 8, 1).is_empty());
    }

    /// An image of 1024 blocks with its first 256 written whole, then every other one of
    /// them overwritten (256 runs); returns it with the content of those 256 blocks.
    fn fragmented(dir: &std::path::Path) -> (Arc<Image>, Vec<u8>) {
        let img = new_image(&dir.join("d.rrow"), 4 << 20);
        let mut want: Vec<u8> = (0..256 * 4096).map(|i| (i / 4096) as u8).collect();
        img.write_at(0, &want).unwrap();
        for b in (0..256usize).step_by(2) {
            let blk = [0xa0 ^ b as u8; 4096];
            img.write_at(b as u64 * 4096, &blk).unwrap();
            want[b * 4096..(b + 1) * 4096].copy_from_slice(&blk);
        }
        assert_eq!(img.resolve(Lba(0), 256).unwrap().len(), 256);
        (Arc::new(img), want)
    }

    fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn an_idle_device_is_defragmented_keeping_content_and_old_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let (img, want) = fragmented(dir.path());
        let seq = img.seq();
        // Block 0's first version, superseded by the overwrite.
        let Extent::Mapped { pba: old, .. } =
            img.state_at(Seq(1)).unwrap().resolve(Lba(0), 1).unwrap()[0]
        else {
            panic!("block 0 of state 1 is not mapped");
        };
        let policy = RelocPolicy {
            on_read_min_runs: 0,
            idle_after: Some(Duration::from_millis(30)),
            idle_rate: None,
        };
        let r = Relocator::start(&img, policy).unwrap().unwrap();
        let st = r.defrag_stats();
        wait_for("a walk", || st.passes.load(Ordering::Relaxed) >= 1);
        // The first walk after the start looks at every window of the disk (4 MiB: 2).
        assert_eq!(st.windows.load(Ordering::Relaxed), 2);
        assert!(st.relocations.load(Ordering::Relaxed) >= 1);
        assert!(st.blocks.load(Ordering::Relaxed) >= 256);
        let runs = img.resolve(Lba(0), 256).unwrap();
        assert!(runs.len() <= 2, "{runs:?}");
        let mut got = vec![0u8; want.len()];
        img.read_at(0, &mut got).unwrap();
        assert!(got == want, "defragmentation changed the content");
        assert_eq!(img.seq(), seq, "a relocation takes no seq");
        let mut first = vec![0u8; 4096];
        img.read_block(old, &mut first).unwrap();
        assert!(
            first.iter().all(|&b| b == 0),
            "the old version is still there"
        );
        // Nothing written: no more walks, not even a look at a window.
        let passes = st.passes.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(st.passes.load(Ordering::Relaxed), passes);
        assert_eq!(st.windows.load(Ordering::Relaxed), 2);
        // A new fragmenting write (noted as the device notes its writes), then quiet: the
        // stretch is relocated again, and the walk looks at that one window only.
        for b in (0..64u64).step_by(2) {
            img.write_at(b * 4096, &[9u8; 4096]).unwrap();
            r.note_written(b * 4096, 4096);
            // As the device's end of batch does: no walk while the writes go on.
            r.note_activity();
        }
        assert!(img.resolve(Lba(0), 256).unwrap().len() > 60);
        wait_for("the next walk", || {
            img.resolve(Lba(0), 256).unwrap().len() <= 2
        });
        wait_for("the walk's end", || {
            st.passes.load(Ordering::Relaxed) > passes
        });
        assert_eq!(st.windows.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn requests_keep_the_defragmenter_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (img, _) = fragmented(dir.path());
        let policy = RelocPolicy {
            on_read_min_runs: 0,
            idle_after: Some(Duration::from_secs(2)),
            idle_rate: None,
        };
        let r = Relocator::start(&img, policy).unwrap().unwrap();
        let busy_until = Instant::now() + Duration::from_millis(600);
        while Instant::now() < busy_until {
            r.note_activity();
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(r.defrag_stats().relocations.load(Ordering::Relaxed), 0);
        assert_eq!(img.resolve(Lba(0), 256).unwrap().len(), 256);
        wait_for("defragmentation once quiet", || {
            r.defrag_stats().relocations.load(Ordering::Relaxed) > 0
        });
    }

    /// With `O_DIRECT`, a fragmented read goes through a private buffer that the relocation
    /// then writes: the guest gets the right bytes, the relocation writes the old blocks'
    /// content even when the guest's buffer is changed right after the read, and only
    /// reads that the map shows fragmented take that path.
    #[test]
    fn direct_reads_hand_their_private_buffer_to_the_relocation() {
        // The temporary directory must support O_DIRECT (as in the ring's tests).
        let dir = tempfile::tempdir().unwrap();
        let (img, want) = fragmented(dir.path());
        Arc::try_unwrap(img).ok().unwrap().close().unwrap();
        let img = Arc::new(
            Image::open_with_options(
                &dir.path().join("d.rrow"),
                crate::image::OpenMode::ReadWrite,
                &crate::image::OpenOptions {
                    direct: true,
                    shared_lock: false,
                },
            )
            .unwrap(),
        );
        assert!(img.is_direct());
        let mut r = Relocator::start(&img, RelocPolicy::on_read(4))
            .unwrap()
            .unwrap();
        assert!(r.wants_copy(&img, 0, 64 << 10));
        assert!(!r.wants_copy(&img, 512, 64 << 10), "not whole blocks");
        assert!(
            !r.wants_copy(&img, 300 << 12, 64 << 10),
            "never written: not data blocks"
        );
        // Two 64 KiB reads in odd-sized segments, the guest's buffer scribbled on at once.
        for part in 0..2usize {
            let mut guest = vec![0u8; 64 << 10];
            let (a, b) = guest.split_at_mut(5000);
            let segs = [IoSeg::from_mut_slice(a), IoSeg::from_mut_slice(b)];
            let mut trace = Vec::new();
            r.read_and_offer(&img, (part * (64 << 10)) as u64, &segs, &mut trace)
                .unwrap();
            assert_eq!(trace.len(), 16);
            assert!(guest[..] == want[part * (64 << 10)..(part + 1) * (64 << 10)]);
            guest.fill(0x5c);
        }
        r.stop();
        let runs = img.resolve(Lba(0), 32).unwrap();
        assert_eq!(runs.len(), 1, "both reads relocated as one run: {runs:?}");
        let mut got = vec![0u8; 128 << 10];
        img.read_at(0, &mut got).unwrap();
        assert!(
            got[..] == want[..128 << 10],
            "the relocation wrote other data"
        );
    }

    #[test]
    fn joined_requests_carry_their_data_only_when_every_part_has_some() {
        let with = |lba: u64, pba: u64, byte: u8| {
            let mut d = PageBuf::new(2 * 4096);
            d.bytes_mut().fill(byte);
            Req {
                lba: Lba(lba),
                extents: vec![m(pba, 1), m(pba + 10, 1)],
                data: Some(d),
            }
        };
        let got = merge_adjacent(vec![with(2, 50, 2), with(0, 30, 1), with(4, 70, 3)], 512);
        assert_eq!(got.len(), 1);
        let data = got[0].data.as_ref().unwrap().bytes();
        assert_eq!(data.len(), 6 * 4096);
        assert_eq!(data.as_ptr().align_offset(4096), 0, "page-aligned");
        for (i, b) in [1u8, 2, 3].iter().enumerate() {
            assert!(data[i * 8192..(i + 1) * 8192].iter().all(|x| x == b));
        }
        let got = merge_adjacent(vec![with(0, 30, 1), req(2, vec![m(50, 1), m(60, 1)])], 512);
        assert_eq!(got.len(), 1);
        assert!(
            got[0].data.is_none(),
            "a part without data: the thread reads the blocks"
        );
    }

    /// A stop (the sender dropped) ends a walk after the window in progress: the device's
    /// owner waits for the thread, so it must not walk the rest of the disk first.
    #[test]
    fn a_stop_ends_the_walk_after_one_window() {
        let dir = tempfile::tempdir().unwrap();
        let img = new_image(&dir.path().join("w.rrow"), 8 << 20);
        img.write_at(0, &vec![1u8; 4 << 20]).unwrap();
        for b in (0..1024u64).step_by(2) {
            img.write_at(b * 4096, &[2u8; 4096]).unwrap();
        }
        let stats = Arc::new(DefragStats::default());
        let marks = Arc::new(WindowMarks::all(2048));
        let mut d = Defrag::new(Duration::ZERO, None, marks, Arc::clone(&stats));
        let activity = AtomicU64::new(0);
        let (tx, rx) = sync_channel::<Req>(1);
        drop(tx);
        assert!(d.run(&img, &activity, &rx).is_none());
        assert_eq!(d.cursor, 1, "one window, then the stop");
        assert_eq!(stats.relocations.load(Ordering::Relaxed), 1);
        assert_eq!(img.resolve(Lba(0), 512).unwrap().len(), 1);
        assert_eq!(
            img.resolve(Lba(512), 512).unwrap().len(),
            512,
            "second window untouched"
        );
    }

    #[test]
    fn window_marks_cover_written_ranges_and_only_the_disk() {
        // 100 windows: the last word holds 36 bits.
        let m = WindowMarks::all(100 * MAX_MERGED_BLOCKS - 7);
        assert_eq!(m.windows, 100);
        assert_eq!(m.next(0), Some(0));
        assert_eq!(m.next(99), Some(99));
        assert_eq!(m.next(100), None);
        for w in 0..100 {
            m.clear(w);
        }
        assert_eq!(m.next(0), None, "no bit past the last window was set");
        // One block in window 3; a range from the last block of window 5 into window 7;
        // a range running past the end of the disk; a range wholly past it.
        m.mark(3 * MAX_MERGED_BLOCKS + 17, 1);
        m.mark(6 * MAX_MERGED_BLOCKS - 1, MAX_MERGED_BLOCKS + 2);
        m.mark(99 * MAX_MERGED_BLOCKS, 10 * MAX_MERGED_BLOCKS);
        m.mark(200 * MAX_MERGED_BLOCKS, 1);
        m.mark(64 * MAX_MERGED_BLOCKS, 0);
        let mut got = Vec::new();
        let mut at = 0;
        while let Some(w) = m.next(at) {
            got.push(w);
            at = w + 1;
        }
        assert_eq!(got, [3, 5, 6, 7, 99]);
        m.clear(6);
        assert_eq!(m.next(6), Some(7));
        m.mark(u64::MAX - 3, 10);
        assert_eq!(
            m.next(8),
            Some(99),
            "a range at the end of u64 marks nothing"
        );
    }

    /// Writes the first 64 blocks of window `w` whole, then every other one of them again
    /// (64 runs).
    fn fragment_window(img: &Image, w: u64) {
        let at = w * MAX_MERGED_BLOCKS * 4096;
        img.write_at(at, &vec![1u8; 64 * 4096]).unwrap();
        for b in (0..64u64).step_by(2) {
            img.write_at(at + b * 4096, &[2u8; 4096]).unwrap();
        }
        assert_eq!(
            img.resolve(Lba(w * MAX_MERGED_BLOCKS), 64).unwrap().len(),
            64
        );
    }

    /// An image of `windows` windows with the listed ones fragmented ([`fragment_window`]).
    fn fragmented_windows(dir: &std::path::Path, windows: u64, which: &[u64]) -> Image {
        let img = new_image(&dir.join("f.rrow"), windows * MAX_MERGED_BLOCKS * 4096);
        for &w in which {
            fragment_window(&img, w);
        }
        img
    }

    /// A defragmenter over a disk of `blocks` blocks that is idle at once, with its counters,
    /// its marks and a request queue nobody sends to.
    struct Walker {
        d: Defrag,
        stats: Arc<DefragStats>,
        marks: Arc<WindowMarks>,
        activity: AtomicU64,
        rx: Receiver<Req>,
        _tx: SyncSender<Req>,
    }

    impl Walker {
        fn new(blocks: u64, rate: Option<u64>) -> Walker {
            let stats = Arc::new(DefragStats::default());
            let marks = Arc::new(WindowMarks::all(blocks));
            let d = Defrag::new(Duration::ZERO, rate, Arc::clone(&marks), Arc::clone(&stats));
            let (tx, rx) = sync_channel::<Req>(1);
            Walker {
                d,
                stats,
                marks,
                activity: AtomicU64::new(0),
                rx,
                _tx: tx,
            }
        }

        /// One call of the walk; says whether it handed back a request (never here).
        fn run(&mut self, img: &Image) -> bool {
            self.d.run(img, &self.activity, &self.rx).is_some()
        }

        fn count(&self, c: fn(&DefragStats) -> &AtomicU64) -> u64 {
            c(&self.stats).load(Ordering::Relaxed)
        }
    }

    /// After the first walk, a walk looks at the windows marked written and no others.
    #[test]
    fn a_walk_looks_at_the_written_windows_only() {
        let dir = tempfile::tempdir().unwrap();
        let img = fragmented_windows(dir.path(), 32, &[4, 20]);
        let mut w = Walker::new(32 * MAX_MERGED_BLOCKS, None);
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.windows), 32, "every window once");
        assert_eq!(w.count(|s| &s.relocations), 2);
        assert_eq!(w.count(|s| &s.passes), 1);
        // Nothing marked: nothing looked at.
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.windows), 32);
        assert_eq!(w.count(|s| &s.passes), 1);
        // Window 9 fragmented and marked, window 30 marked but whole.
        fragment_window(&img, 9);
        img.write_at(30 * MAX_MERGED_BLOCKS * 4096, &[4u8; 8192])
            .unwrap();
        w.marks.mark(9 * MAX_MERGED_BLOCKS, 64);
        w.marks.mark(30 * MAX_MERGED_BLOCKS, 2);
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.windows), 34);
        assert_eq!(w.count(|s| &s.relocations), 3);
        assert_eq!(w.count(|s| &s.passes), 2);
        assert!(img.resolve(Lba(9 * MAX_MERGED_BLOCKS), 64).unwrap().len() <= 2);
    }

    /// With a rate, the walk pauses after a window until its bytes' share of time has
    /// passed, and a call before then relocates nothing.
    #[test]
    fn a_rate_paces_the_walk_window_by_window() {
        let dir = tempfile::tempdir().unwrap();
        let img = fragmented_windows(dir.path(), 4, &[0, 1, 2]);
        // 64 blocks of 4 KiB per window at 1 MiB/s: 250 ms per window.
        let mut w = Walker::new(4 * MAX_MERGED_BLOCKS, Some(1 << 20));
        let t0 = Instant::now();
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.relocations), 1, "one window, then a pause");
        let next = w.d.next_at.expect("a pause");
        assert!(next >= t0 + Duration::from_millis(250));
        assert!(w.d.wait() <= IDLE_POLL && !w.d.wait().is_zero());
        if Instant::now() < next {
            assert!(!w.run(&img));
            assert_eq!(w.count(|s| &s.relocations), 1, "still paused");
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.relocations), 2);
        assert!(w.d.next_at.unwrap() >= next + Duration::from_millis(250));
    }

    /// Scattered writes, one inside each 128 KiB piece, leave the window as it is (the old
    /// rule over the whole window rewrote its 2 MiB for 64 KiB written); two writes inside
    /// one piece get that piece, and only it, relocated.
    #[test]
    fn a_walk_rewrites_only_the_pieces_that_reads_would_find_fragmented() {
        let dir = tempfile::tempdir().unwrap();
        let img = new_image(&dir.path().join("p.rrow"), 2 * MAX_MERGED_BLOCKS * 4096);
        img.write_at(0, &vec![1u8; (MAX_MERGED_BLOCKS * 4096) as usize])
            .unwrap();
        let piece = DEFRAG_PIECE / 4096;
        for p in 0..MAX_MERGED_BLOCKS / piece {
            img.write_at((p * piece + 10) * 4096, &[2u8; 4096]).unwrap();
        }
        let runs = |img: &Image| img.resolve(Lba(0), MAX_MERGED_BLOCKS).unwrap().len();
        assert_eq!(runs(&img), 1 + 2 * 16);
        let mut w = Walker::new(2 * MAX_MERGED_BLOCKS, None);
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.relocations), 0);
        assert_eq!(runs(&img), 33, "nothing rewritten for scattered writes");
        // Two more writes inside piece 3 (LBAs 96..128): five runs there.
        img.write_at((3 * piece + 20) * 4096, &[3u8; 4096]).unwrap();
        img.write_at((3 * piece + 25) * 4096, &[3u8; 4096]).unwrap();
        w.marks.mark(3 * piece, piece);
        assert!(!w.run(&img));
        assert_eq!(w.count(|s| &s.relocations), 1);
        assert_eq!(w.count(|s| &s.blocks), piece, "one piece moved");
        assert_eq!(img.resolve(Lba(3 * piece), piece).unwrap().len(), 1);
        let mut got = vec![0u8; (piece * 4096) as usize];
        img.read_at(3 * piece * 4096, &mut got).unwrap();
        for (b, chunk) in got.chunks(4096).enumerate() {
            let want = match b {
                10 => 2,
                20 | 25 => 3,
                _ => 1,
            };
            assert!(chunk.iter().all(|&x| x == want), "block {b} of the piece");
        }
    }
}

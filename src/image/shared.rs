//! What an open image and its snapshots share: the file, the base image, the geometry, the
//! slot allocator and the list of metadata slots; plus the read path from extents.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};

use super::cache::DropState;
use super::direct::DirectFile;
use super::format::Reclaimed;
use super::freelist::{FreeList, RunSet};
use super::io::{preadv_full, pwritev_all};
use super::prealloc::PreallocState;
use super::uring;
use super::{Extent, ImageError};
use crate::iobuf::{slice_segs, total_len, IoSeg, IoSegs};
use crate::units::{BlockSize, Pba};

/// The read-only base image.
pub struct Base {
    /// The open file.
    pub file: File,
    /// Its size.
    pub size: u64,
}

/// State shared by an image and its snapshots.
pub struct Shared {
    /// The image file (buffered: journal, headers, checkpoints; and data unless `direct`).
    pub file: File,
    /// A second, `O_DIRECT` descriptor of the image file; when present, every data-block
    /// transfer goes through it (see [`super::direct`]).
    pub direct: Option<DirectFile>,
    /// The base image, if any.
    pub base: Option<Base>,
    /// Block size.
    pub bs: BlockSize,
    /// Virtual size in bytes.
    pub size: u64,
    /// Virtual size in blocks (rounded up).
    pub blocks: u64,
    /// Byte offset of slot 0.
    pub data_offset: u64,
    /// Image UUID.
    pub uuid: [u8; 16],
    /// Journal segment length in slots.
    pub seg_slots: u64,
    /// Next free slot (the allocator).
    pub next_slot: AtomicU64,
    /// Sorted (first slot, count) runs that hold metadata, not data.
    pub meta: RwLock<Vec<(u64, u64)>>,
    /// The window prepared ahead of the allocator (see [`super::prealloc`]).
    pub prealloc: Arc<PreallocState>,
    /// Superseded runs waiting to leave the page cache (see [`super::cache`]).
    pub drop_state: Arc<DropState>,
    /// The history horizon and the reclaimed slots.
    pub reclaimed: RwLock<ReclaimedSet>,
    /// Set under `reclaimed`'s write lock by the first [`Shared::add_reclaimed`] and never
    /// cleared: until then the set is empty and the horizon 0, and the lookups every write's
    /// commit and every block-id read make skip the lock (a read lock is an atomic update of
    /// a cache line that all request threads share).
    pub has_reclaimed: AtomicBool,
    /// Reclaimed runs this process punched holes over (sorted, merged): a reclaim beside
    /// writers punches only what is not a hole yet.
    pub punched: std::sync::Mutex<Vec<(u64, u64)>>,
    /// Bumped by every [`Shared::add_reclaimed`], before any hole of those runs is punched: a
    /// read that sees it unchanged across its I/O read no block reclaimed meanwhile.
    pub reclaim_gen: AtomicU64,
    /// Data allocations take reclaimed slots from `free` first (see [`super::freelist`]).
    pub reuse: AtomicBool,
    /// Reclaimed slots whose reclaim is durable and that no write has taken yet.
    pub free: Mutex<FreeList>,
    /// Bumped every time a write revives reclaimed slots: a block-id read that saw a reclaim
    /// happen while it ran, and this change too, may have read a slot's new incarnation.
    pub revived: AtomicU64,
    /// Direct data writes from aligned buffers in flight ([`Shared::write_data`] and
    /// `Image::write_many`).
    pub direct_writes: AtomicU64,
}

/// The history horizon and the reclaimed slots, in memory.
#[derive(Debug, Default, Clone)]
pub struct ReclaimedSet {
    /// States before this seq can no longer be rebuilt (0: nothing reclaimed).
    pub horizon: u64,
    /// The reclaimed slots.
    pub runs: RunSet,
}

impl ReclaimedSet {
    /// As a checkpoint's reclaimed section holds it.
    pub fn to_reclaimed(&self) -> Reclaimed {
        Reclaimed {
            horizon: self.horizon,
            runs: self.runs.to_runs(),
        }
    }
}

impl Shared {
    /// Byte offset of slot `slot`, or None on overflow.
    pub fn slot_off(&self, slot: u64) -> Option<u64> {
        slot.checked_mul(self.bs.bytes_u64())?
            .checked_add(self.data_offset)
    }

    /// Largest slot number that can exist (keeps every offset computation in range).
    /// Also keeps map entries (block id + 2) within 48 bits.
    pub fn slot_limit(&self) -> u64 {
        ((i64::MAX as u64 - self.data_offset) / self.bs.bytes_u64()).min((1 << 48) - 4)
    }

    /// Bytes per journal segment.
    pub fn seg_bytes(&self) -> u64 {
        self.seg_slots * self.bs.bytes_u64()
    }

    /// Allocates `n` consecutive slots.
    pub fn alloc(&self, n: u64) -> Result<u64, ImageError> {
        let first = self.next_slot.fetch_add(n, Ordering::SeqCst);
        match first.checked_add(n) {
            Some(end) if end <= self.slot_limit() => {
                self.prealloc.note_alloc(end, self.bs.bytes_u64());
                Ok(first)
            }
            _ => Err(ImageError::Full),
        }
    }

    /// Allocates `n` consecutive slots for data: reclaimed slots from the free list when reuse
    /// is on and a run is long enough, else at the end of the file ([`Shared::alloc`]).
    /// Journal segments and checkpoints always come from [`Shared::alloc`].
    pub fn alloc_data(&self, n: u64) -> Result<u64, ImageError> {
        if self.reuse.load(Ordering::Relaxed) {
            if let Some(s) = self.free.lock().unwrap_or_else(|e| e.into_inner()).take(n) {
                return Ok(s);
            }
        }
        self.alloc(n)
    }

    /// Gives back slots [`Shared::alloc_data`] returned that no record names (a write that
    /// failed, a relocation that lost a race): slots taken from the free list go back to it,
    /// appended ones stay dead space.
    pub fn release_data(&self, slot: u64, n: u64) {
        if self.reuse.load(Ordering::Relaxed) {
            self.free
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .give_back(slot, n);
        }
    }

    /// Offers the still reclaimed parts of `runs` (whose reclaim must be durable) for reuse;
    /// slots already free, or taken by a write in flight, stay as they are. Returns the blocks
    /// that became free.
    pub fn add_free(&self, runs: &[(u64, u64)]) -> u64 {
        let r = self.reclaimed.read().unwrap_or_else(|e| e.into_inner());
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let mut added = 0;
        for &(slot, n) in runs {
            for (s, c) in r.runs.parts_in(slot, n) {
                added += f.offer(s, c);
            }
        }
        added
    }

    /// The reclaimed set, read-locked; `None` while nothing was ever reclaimed (the set is
    /// then empty and the horizon 0), without taking the lock ([`Shared::has_reclaimed`]).
    fn reclaimed_set(&self) -> Option<RwLockReadGuard<'_, ReclaimedSet>> {
        self.has_reclaimed
            .load(Ordering::Acquire)
            .then(|| self.reclaimed.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// True when some slot of `[pba, pba + n)` is reclaimed.
    pub fn any_reclaimed(&self, pba: u64, n: u64) -> bool {
        self.reclaimed_set()
            .is_some_and(|r| r.runs.overlaps(pba, n))
    }

    /// Makes the reclaimed slots in `[pba, pba + n)` live again: a record naming them was
    /// appended (or replayed by recovery). Returns true when some were reclaimed.
    pub fn revive(&self, pba: u64, n: u64) -> bool {
        if !self.any_reclaimed(pba, n) {
            return false;
        }
        self.reclaimed
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .runs
            .remove_range(pba, n);
        {
            let mut p = self.punched.lock().unwrap_or_else(|e| e.into_inner());
            if !p.is_empty() {
                *p = subtract_runs(&p, &[(pba, n)]);
            }
        }
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .forget(pba, n);
        self.revived.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Records a metadata run.
    pub fn add_meta(&self, slot: u64, count: u64) {
        let mut m = self.meta.write().unwrap_or_else(|e| e.into_inner());
        let i = m.partition_point(|&(s, _)| s < slot);
        m.insert(i, (slot, count));
    }

    /// The metadata runs.
    pub fn meta_runs(&self) -> Vec<(u64, u64)> {
        self.meta.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True when `[slot, slot + n)` overlaps a metadata run.
    pub fn overlaps_meta(&self, slot: u64, n: u64) -> bool {
        let m = self.meta.read().unwrap_or_else(|e| e.into_inner());
        let end = slot.saturating_add(n);
        // Runs are sorted and disjoint: only the last run starting before `end` can overlap.
        let i = m.partition_point(|&(s, _)| s < end);
        i.checked_sub(1)
            .and_then(|j| m.get(j))
            .is_some_and(|&(s, c)| s.saturating_add(c) > slot)
    }

    /// The history horizon (0: nothing reclaimed).
    pub fn horizon(&self) -> u64 {
        self.reclaimed_set().map_or(0, |r| r.horizon)
    }

    /// The first reclaimed slot in `[pba, pba + n)`, if any.
    pub fn first_reclaimed(&self, pba: u64, n: u64) -> Option<u64> {
        self.reclaimed_set().and_then(|r| r.runs.first_in(pba, n))
    }

    /// Adds reclaimed runs and raises the horizon.
    pub fn add_reclaimed(&self, add: &Reclaimed) {
        let mut r = self.reclaimed.write().unwrap_or_else(|e| e.into_inner());
        // Before the set changes, under the lock: whoever sees the flag clear saw the set empty.
        self.has_reclaimed.store(true, Ordering::Release);
        r.horizon = r.horizon.max(add.horizon);
        for &(s, c) in &add.runs {
            r.runs.insert(s, c);
        }
        drop(r);
        self.reclaim_gen.fetch_add(1, Ordering::SeqCst);
    }

    /// [`Shared::read_extents`] that never passes a punched hole off as data: blocks found
    /// reclaimed before the read fail with [`ImageError::Reclaimed`], and so do blocks
    /// reclaimed (and perhaps punched) while it ran.
    pub fn read_extents_checked(
        &self,
        extents: &[Extent],
        skip: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<(), ImageError> {
        let gen = self.reclaim_gen.load(Ordering::SeqCst);
        let revived = self.revived.load(Ordering::SeqCst);
        self.check_not_reclaimed(extents)?;
        self.read_extents(extents, skip, segs)?;
        if self.reclaim_gen.load(Ordering::SeqCst) != gen {
            self.check_not_reclaimed(extents)?;
            if self.revived.load(Ordering::SeqCst) != revived {
                // A block may have been reclaimed and written again while this read ran: its
                // bytes may be the new incarnation's.
                self.fail_if_revived(extents)?;
            }
        }
        Ok(())
    }

    /// The conservative answer for a block-id read that overlapped both a reclaim and a
    /// revive: it cannot tell whether one of its blocks was among them, so it fails.
    fn fail_if_revived(&self, extents: &[Extent]) -> Result<(), ImageError> {
        let first = extents.iter().find_map(|e| match *e {
            Extent::Mapped { pba, .. } => Some(pba),
            _ => None,
        });
        match first {
            Some(pba) => Err(ImageError::Reclaimed {
                pba,
                horizon: crate::units::Seq(self.horizon()),
            }),
            None => Ok(()),
        }
    }

    /// Fails with [`ImageError::Reclaimed`] when an extent names a reclaimed block.
    pub fn check_not_reclaimed(&self, extents: &[Extent]) -> Result<(), ImageError> {
        let horizon = self.horizon();
        if horizon == 0 {
            return Ok(());
        }
        for e in extents {
            if let Extent::Mapped { pba, blocks } = *e {
                if let Some(p) = self.first_reclaimed(pba.0, blocks) {
                    return Err(ImageError::Reclaimed {
                        pba: Pba(p),
                        horizon: crate::units::Seq(horizon),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that `[pba, pba + n)` are allocated data blocks.
    pub fn check_data(&self, pba: u64, n: u64) -> Result<(), ImageError> {
        let end = pba.checked_add(n).ok_or(ImageError::UnknownPba(Pba(pba)))?;
        if end > self.next_slot.load(Ordering::SeqCst) || self.overlaps_meta(pba, n) {
            return Err(ImageError::UnknownPba(Pba(pba)));
        }
        Ok(())
    }

    /// Writes `buf` at `off` in the image file.
    pub fn pwrite(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.file.write_all_at(buf, off)
    }

    /// Writes data blocks from `segs` at `off` (through the direct descriptor when there is
    /// one).
    ///
    /// A direct write from aligned buffers that finds other direct writes in flight goes
    /// through this thread's io_uring ring instead of `pwritev`: ext4 holds the inode lock
    /// (shared) for the whole of a synchronous `O_DIRECT` write, and the journal's buffered
    /// write-out at the end of every batch needs that lock exclusively, so with two queues
    /// each queue's write-out waited for the other's disk write. Through the ring the lock
    /// is held only while the write is submitted. A write alone keeps `pwritev`, which is
    /// cheaper on its own: a write into reserved (unwritten) space cannot complete inline in
    /// the ring and goes to an io-wq worker (docs/perf-notes.md, section 21).
    pub fn write_data(&self, segs: &[IoSeg<'_>], off: u64) -> std::io::Result<()> {
        let Some(d) = &self.direct else {
            return pwritev_all(&self.file, segs, off);
        };
        if !d.is_aligned(segs, off) {
            return d.write(segs, off);
        }
        let others = self.direct_writes.fetch_add(1, Ordering::SeqCst);
        let res = if others > 0 {
            let mut ios = [uring::Io::write(d.raw_fd(), off, IoSegs::from_slice(segs))];
            ring_writes(d, &mut ios)
                .pop()
                .unwrap_or_else(|| d.write(segs, off))
        } else {
            d.write(segs, off)
        };
        self.direct_writes.fetch_sub(1, Ordering::SeqCst);
        res
    }

    /// Writes `ios` (writes on the direct descriptor from aligned buffers, in blocks the
    /// caller allocated) all at once through this thread's ring, counted in
    /// [`Shared::direct_writes`] meanwhile; says which landed whole.
    pub fn write_direct_batch(
        &self,
        d: &DirectFile,
        ios: &mut [uring::Io<'_>],
        during: &mut dyn FnMut(),
    ) -> Vec<std::io::Result<()>> {
        let count = ios.len() as u64;
        self.direct_writes.fetch_add(count, Ordering::SeqCst);
        let landed = ring_writes_then(d, ios, during);
        self.direct_writes.fetch_sub(count, Ordering::SeqCst);
        landed
    }

    /// Writes data blocks from `buf` at `off` (through the direct descriptor when there is
    /// one).
    pub fn write_data_buf(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        match &self.direct {
            Some(d) => d.write_buf(buf, off),
            None => self.pwrite(buf, off),
        }
    }

    /// Reads data blocks into `segs` from `off`; returns the bytes read before end of file.
    fn read_data(&self, segs: &[IoSeg<'_>], off: u64) -> std::io::Result<u64> {
        match &self.direct {
            Some(d) => d.read(segs, off),
            None => preadv_full(&self.file, segs, off),
        }
    }

    /// Reads `buf.len()` bytes at `off`; bytes past the end of the file read as zeros.
    /// Returns how many bytes came from the file.
    pub fn pread_padded(&self, buf: &mut [u8], off: u64) -> Result<usize, ImageError> {
        let mut done = 0;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or(&mut []);
            match self.file.read_at(rest, off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ImageError::io("cannot read the image", e)),
            }
        }
        if let Some(rest) = buf.get_mut(done..) {
            rest.fill(0);
        }
        Ok(done)
    }

    /// Reads one journal segment (zeros past the end of the file).
    pub fn read_segment(&self, slot: u64) -> Result<Vec<u8>, ImageError> {
        let off = self
            .slot_off(slot)
            .ok_or_else(|| ImageError::corrupt(0, "journal segment offset overflows"))?;
        let mut seg = vec![0u8; self.seg_bytes() as usize];
        self.pread_padded(&mut seg, off)?;
        Ok(seg)
    }

    /// crc32c of data blocks `[pba, pba + n)` as they are in the file, or None when the file
    /// ends before them.
    pub fn data_crc(&self, pba: u64, n: u64) -> Result<Option<u32>, ImageError> {
        let Some(off) = self.slot_off(pba) else {
            return Ok(None);
        };
        let total = n.saturating_mul(self.bs.bytes_u64());
        let mut crc = 0u32;
        let mut buf = vec![0u8; (1 << 20).min(total as usize)];
        let mut done = 0u64;
        while done < total {
            let len = ((total - done) as usize).min(buf.len());
            let chunk = buf.get_mut(..len).unwrap_or(&mut []);
            if self.pread_padded(chunk, off + done)? < len {
                return Ok(None);
            }
            crc = crate::crc::crc32c_append(crc, chunk);
            done += len as u64;
        }
        Ok(Some(crc))
    }

    /// Fills `segs` with the bytes of the concatenated `extents`, starting `skip` bytes into
    /// the first one. Extents may come from a record log: every block id is checked.
    ///
    /// With [`uring::min_extents`] or more mapped extents to read, every one of them is read
    /// through this thread's io_uring ring, submitted at once (see [`super::uring`]); with
    /// fewer, or when io_uring cannot be used, one `preadv` each. With a direct descriptor the
    /// ring reads it with `O_DIRECT`, the extents' disk reads overlapping; an extent whose
    /// segments are not aligned for it is read at once through the bounce buffer instead.
    pub fn read_extents(
        &self,
        extents: &[Extent],
        skip: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<(), ImageError> {
        let need = total_len(segs);
        let bs = self.bs.bytes_u64();
        let min = uring::min_extents();
        let gather = min > 0 && mapped_extents_read(extents, skip, need, bs) >= min;
        let mut batch = ReadBatch::default();
        self.gather_extents(extents, skip, segs, gather, &mut batch)?;
        if batch.is_empty() {
            return Ok(());
        }
        // Errors as the `preadv` path gives them: the first I/O error, else the first extent
        // the file ends in.
        self.submit_batch(&mut batch)?;
        match batch.short_in(0..batch.len()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The work of [`Self::read_extents`] short of the ring: zeroed and base extents are
    /// served at once, and so are mapped extents unless `gather` (or, with a direct
    /// descriptor, unless their segments are aligned for it); the others are appended to
    /// `batch` for one submission, possibly with other requests' reads.
    pub fn gather_extents<'a>(
        &self,
        extents: &[Extent],
        skip: u64,
        segs: &[IoSeg<'a>],
        gather: bool,
        batch: &mut ReadBatch<'a>,
    ) -> Result<(), ImageError> {
        let need = total_len(segs);
        let bs = self.bs.bytes_u64();
        let mut pos = 0u64;
        let first_skip = skip;
        let mut skip = skip;
        let mut have = 0u64;
        for e in extents {
            if pos >= need {
                break;
            }
            let eb = e.blocks().saturating_mul(bs);
            have = have.saturating_add(eb);
            if skip >= eb {
                skip -= eb;
                continue;
            }
            let take = (eb - skip).min(need - pos);
            let sub = slice_segs(segs, pos, take).ok_or(ImageError::BadBuffer {
                expected: pos + take,
                got: need,
            })?;
            match *e {
                Extent::Mapped { pba, blocks } => {
                    self.check_data(pba.0, blocks)?;
                    let off = self
                        .slot_off(pba.0)
                        .and_then(|o| o.checked_add(skip))
                        .ok_or(ImageError::UnknownPba(pba))?;
                    let ring_fd = match &self.direct {
                        _ if !gather => None,
                        None => Some(self.file.as_raw_fd()),
                        // Unaligned pieces (odd guest buffers, a skip inside a sector) are
                        // bounced at once; the aligned ones go to the disk together.
                        Some(d) if d.is_aligned(&sub, off) => Some(d.raw_fd()),
                        Some(_) => None,
                    };
                    if let Some(fd) = ring_fd {
                        batch.reads.push(uring::Io::read(fd, off, sub));
                        batch.wanted.push((pba, take));
                    } else {
                        let got = self
                            .read_data(&sub, off)
                            .map_err(|e| ImageError::io("cannot read the image", e))?;
                        if got < take {
                            return Err(past_the_end(pba));
                        }
                    }
                }
                Extent::Zero { .. } => {
                    for s in &sub {
                        s.zero(0, s.len());
                    }
                }
                Extent::Base { lba, .. } => {
                    let start = lba
                        .0
                        .checked_mul(bs)
                        .and_then(|o| o.checked_add(skip))
                        .unwrap_or(u64::MAX);
                    self.read_base(start, &sub)?;
                }
            }
            pos += take;
            skip = 0;
        }
        if pos < need {
            return Err(ImageError::ExtentsTooShort {
                have: have.saturating_sub(first_skip),
                need,
            });
        }
        Ok(())
    }

    /// Reads everything gathered: all at once through io_uring, or one `preadv` each when
    /// this thread cannot use it. The first I/O error fails the whole batch (every read has
    /// completed by then); a read the end of the file cut short is found with
    /// [`ReadBatch::short_in`].
    pub fn submit_batch(&self, batch: &mut ReadBatch<'_>) -> Result<(), ImageError> {
        match uring::run_all(&mut batch.reads) {
            Some(res) => res.map_err(|e| ImageError::io("cannot read the image", e)),
            None => {
                for r in batch.reads.iter_mut() {
                    r.done = self
                        .read_data(&r.segs, r.off)
                        .map_err(|e| ImageError::io("cannot read the image", e))?;
                }
                Ok(())
            }
        }
    }

    fn read_base(&self, start: u64, segs: &[IoSeg<'_>]) -> Result<(), ImageError> {
        let len = total_len(segs);
        let (bsize, file) = match &self.base {
            Some(b) => (b.size, Some(&b.file)),
            None => (0, None),
        };
        let avail = bsize.saturating_sub(start).min(len);
        let mut got = 0;
        if let (Some(f), true) = (file, avail > 0) {
            let part = slice_segs(segs, 0, avail).unwrap_or_default();
            got = preadv_full(f, &part, start)
                .map_err(|e| ImageError::io("cannot read the base image", e))?;
        }
        if got < len {
            if let Some(rest) = slice_segs(segs, got, len - got) {
                for s in &rest {
                    s.zero(0, s.len());
                }
            }
        }
        Ok(())
    }
}

/// Mapped extents' reads gathered for one io_uring submission ([`Shared::gather_extents`]),
/// with, for each, its first block id and the bytes wanted (for the error when the file ends
/// first).
#[derive(Default)]
pub struct ReadBatch<'a> {
    pub(crate) reads: Vec<uring::Io<'a>>,
    pub(crate) wanted: Vec<(Pba, u64)>,
}

impl ReadBatch<'_> {
    /// Reads gathered so far.
    pub fn len(&self) -> usize {
        self.reads.len()
    }

    /// True when nothing was gathered.
    pub fn is_empty(&self) -> bool {
        self.reads.is_empty()
    }

    /// Forgets the reads gathered from the `n`th on (those of a request that failed while
    /// being gathered).
    pub fn truncate(&mut self, n: usize) {
        self.reads.truncate(n);
        self.wanted.truncate(n);
    }

    /// After [`Shared::submit_batch`]: the error for the first of reads `range` that the end
    /// of the file cut short, if any.
    pub fn short_in(&self, range: std::ops::Range<usize>) -> Option<ImageError> {
        let reads = self.reads.get(range.clone())?;
        let wanted = self.wanted.get(range)?;
        wanted
            .iter()
            .zip(reads)
            .find(|((_, take), r)| r.done < *take)
            .map(|(&(pba, _), _)| past_the_end(pba))
    }
}

/// Writes `ios` on `d` through this thread's ring, all submitted together: which landed
/// whole, the others failing with the first error the ring gave (or as writing nothing).
/// When this thread has no ring, one `pwritev` each.
fn ring_writes(d: &DirectFile, ios: &mut [uring::Io<'_>]) -> Vec<std::io::Result<()>> {
    ring_writes_then(d, ios, &mut || {})
}

/// As [`ring_writes`], running `during` once while the writes are in flight (see
/// [`uring::run_all_then`]; without a ring, before the writes).
fn ring_writes_then(
    d: &DirectFile,
    ios: &mut [uring::Io<'_>],
    during: &mut dyn FnMut(),
) -> Vec<std::io::Result<()>> {
    match uring::run_all_then(ios, during) {
        Some(res) => {
            let first_err = res.err();
            ios.iter()
                .map(|w| {
                    if w.done == total_len(&w.segs) {
                        Ok(())
                    } else {
                        Err(match &first_err {
                            Some(e) => copy_io_error(e),
                            None => std::io::Error::from(std::io::ErrorKind::WriteZero),
                        })
                    }
                })
                .collect()
        }
        None => ios.iter().map(|w| d.write(&w.segs, w.off)).collect(),
    }
}

/// The same error again (`std::io::Error` is not `Clone`): the first error of a batch fails
/// every request of it that did not complete.
pub fn copy_io_error(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

/// How many mapped extents a read of `need` bytes from `skip` bytes into `extents` reads from.
fn mapped_extents_read(extents: &[Extent], mut skip: u64, need: u64, bs: u64) -> usize {
    let mut pos = 0u64;
    let mut n = 0;
    for e in extents {
        if pos >= need {
            break;
        }
        let eb = e.blocks().saturating_mul(bs);
        if skip >= eb {
            skip -= eb;
            continue;
        }
        pos = pos.saturating_add(eb - skip);
        skip = 0;
        if matches!(e, Extent::Mapped { .. }) {
            n += 1;
        }
    }
    n
}

/// The error of a data block the file ends before.
fn past_the_end(pba: Pba) -> ImageError {
    ImageError::Truncated {
        what: format!("data block {} lies past the end of the file", pba.0),
    }
}

/// Sorts runs and merges the overlapping and adjacent ones.
pub fn merge_runs(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, c) in runs {
        match out.last_mut() {
            Some((ls, lc)) if *ls + *lc >= s => *lc = (*lc).max(s + c - *ls),
            _ => out.push((s, c)),
        }
    }
    out
}

/// `a` minus `b` (both sorted, disjoint, merged).
pub fn subtract_runs(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::with_capacity(a.len() + 1);
    let mut j = 0;
    for &(s, c) in a {
        let (mut s, e) = (s, s + c);
        while b.get(j).is_some_and(|&(bs, bc)| bs + bc <= s) {
            j += 1;
        }
        let mut k = j;
        while let Some(&(bs, bc)) = b.get(k) {
            if bs >= e {
                break;
            }
            if bs > s {
                out.push((s, bs - s));
            }
            s = s.max(bs + bc);
            k += 1;
        }
        if s < e {
            out.push((s, e - s));
        }
    }
    out
}

//! Retention: giving the data blocks of versions that no retained state needs back to the
//! file system.
//!
//! An image keeps every version of every block, so its file grows by every write. A reclaim
//! with *keep-from* seq `H` keeps every state at and after `H` readable (`state_at`, replay of
//! logs recorded since `H`, `history` of those versions) and gives back the blocks of every
//! other version: a data block is reclaimed when a record of a state up to `H` names it, the
//! map of state `H` does not, and no *pinned* run (the blocks a kept record log reads) holds
//! it. States after `H` only ever map blocks that the map of `H` maps or that later records
//! wrote, so they lose nothing. "The map of state `H`" here leaves out the relocations
//! appended in state `H`: a read in state `H` before one of them returned the old block ids,
//! so both the old blocks and the copies stay.
//!
//! It runs in three steps, each safe to stop after:
//!
//! 1. [`Image::plan_reclaim`] walks the journal and computes the runs (read-only).
//! 2. [`Image::commit_reclaim`] makes every operation durable, sets the header's reclaim
//!    feature bit (with a checkpoint), appends reclaim records naming the runs and syncs. From
//!    then on the blocks are gone as far as the image is concerned: `read_block` of one fails
//!    with [`ImageError::Reclaimed`], `state_at` before `H` with
//!    [`ImageError::HistoryReclaimed`], and `check` no longer verifies their content.
//! 3. [`Image::punch_reclaimed`] punches holes over the runs (`FALLOC_FL_PUNCH_HOLE`), which is
//!    what returns the space.
//!
//! A crash after step 2 leaves blocks that are reclaimed but still hold their data: harmless,
//! and a later reclaim punches them. A crash before the reclaim records are durable leaves
//! nothing reclaimed. Blocks that no record names (dead space: failed writes, relocations that
//! lost a race) are not reclaimed: a write in flight owns slots no record names yet.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use super::format::{self, RecKind, Reclaimed, Record, RUN_LEN};
use super::map::Map;
use super::shared::{merge_runs, Shared};
use super::{apply, lock, rlock, zero_value, Image, ImageError};
use crate::units::Seq;

/// What a reclaim would give back, computed by [`Image::plan_reclaim`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimPlan {
    /// States at and after this seq stay readable.
    pub keep_from: u64,
    /// The image's seq when the plan was made.
    pub seq: u64,
    /// (first slot, count) runs of data blocks to give back: sorted, disjoint, merged.
    pub runs: Vec<(u64, u64)>,
    /// Data blocks in `runs`.
    pub blocks: u64,
    /// Bytes in `runs`.
    pub bytes: u64,
    /// Blocks of versions before `keep_from` that stay only because a pinned run holds them.
    pub pinned_blocks: u64,
}

/// What [`Image::reclaim`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReclaimReport {
    /// The plan that was carried out.
    pub plan: ReclaimPlan,
    /// The image's history horizon afterwards.
    pub horizon: u64,
    /// Bytes the image file occupied on the file system before.
    pub allocated_before: u64,
    /// Bytes it occupies afterwards.
    pub allocated_after: u64,
}

/// Checks reclaimed runs read from the image: inside the allocated slots and never metadata.
pub(crate) fn validate(sh: &Shared, r: &Reclaimed, next_slot: u64) -> Result<(), String> {
    for &(s, c) in &r.runs {
        if s.saturating_add(c) > next_slot {
            return Err(format!(
                "reclaimed blocks {s}+{c} lie past the allocated slots ({next_slot})"
            ));
        }
        if sh.overlaps_meta(s, c) {
            return Err(format!(
                "reclaimed blocks {s}+{c} overlap journal or checkpoint slots"
            ));
        }
    }
    Ok(())
}

/// One bit per slot.
struct Bits(Vec<u64>);

impl Bits {
    fn new(slots: u64) -> Bits {
        Bits(vec![0; slots.div_ceil(64) as usize])
    }

    fn limit(&self) -> u64 {
        self.0.len() as u64 * 64
    }

    fn set_range(&mut self, start: u64, count: u64, on: bool) {
        let end = start.saturating_add(count).min(self.limit());
        let mut i = start;
        while i < end {
            let (w, b) = ((i / 64) as usize, i % 64);
            let n = (64 - b).min(end - i);
            let mask = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << b
            };
            if let Some(word) = self.0.get_mut(w) {
                if on {
                    *word |= mask;
                } else {
                    *word &= !mask;
                }
            }
            i += n;
        }
    }

    fn count(&self, start: u64, count: u64) -> u64 {
        let end = start.saturating_add(count).min(self.limit());
        (start..end)
            .filter(|&i| {
                self.0
                    .get((i / 64) as usize)
                    .is_some_and(|w| w >> (i % 64) & 1 == 1)
            })
            .count() as u64
    }

    fn runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (wi, &w) in self.0.iter().enumerate() {
            let mut w = w;
            let base = wi as u64 * 64;
            while w != 0 {
                let start = u64::from(w.trailing_zeros());
                let len = u64::from((!(w >> start)).trailing_zeros()).min(64 - start);
                let s = base + start;
                match out.last_mut() {
                    Some((ls, lc)) if *ls + *lc == s => *lc += len,
                    _ => out.push((s, len)),
                }
                w = if start + len >= 64 {
                    0
                } else {
                    w & !(((1u64 << len) - 1) << start)
                };
            }
        }
        out
    }
}

/// Live PBA runs of a map (entries >= 2), merged.
fn mapped_runs(map: &Map) -> Vec<(u64, u64)> {
    merge_runs(
        map.runs()
            .into_iter()
            .filter(|&(_, _, e)| e >= 2)
            .map(|(_, c, e)| (e - 2, c))
            .collect(),
    )
}

/// True when two sorted, disjoint run lists share a slot.
fn intersects(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let (mut i, mut j) = (0, 0);
    while let (Some(&(s1, c1)), Some(&(s2, c2))) = (a.get(i), b.get(j)) {
        if s1 < s2 + c2 && s2 < s1 + c1 {
            return true;
        }
        if s1 + c1 <= s2 + c2 {
            i += 1;
        } else {
            j += 1;
        }
    }
    false
}

/// True when every run of `a` lies inside the runs of `b` (both sorted, disjoint, merged).
fn covered_by(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter().all(|&(s, c)| {
        let i = b.partition_point(|&(bs, bc)| bs + bc <= s);
        b.get(i)
            .is_some_and(|&(bs, bc)| bs <= s && s + c <= bs + bc)
    })
}

impl Image {
    /// Computes what a reclaim keeping every state from `keep_from` on would give back.
    /// `pinned` lists (first block id, count) runs that must stay readable whatever their
    /// age: the blocks a kept record log reads. Works on read-only images too (a dry run).
    pub fn plan_reclaim(
        &self,
        keep_from: Seq,
        pinned: &[(u64, u64)],
    ) -> Result<ReclaimPlan, ImageError> {
        let seq = self.seq();
        if keep_from > seq {
            return Err(ImageError::SeqInFuture {
                requested: keep_from,
                current: seq,
            });
        }
        let limit = self.sh.next_slot.load(Ordering::SeqCst);
        let zero = zero_value(&self.sh);
        let mut map_h = Map::new(self.sh.blocks);
        let mut named = Bits::new(limit);
        self.walk_all(|r, _| {
            if r.kind.maps() {
                if r.seq > keep_from.0 {
                    return Ok(false);
                }
                if r.kind == RecKind::Relocate && r.seq == keep_from.0 {
                    // Reads in state H before this relocation (a log recorded from H on)
                    // returned the blocks it re-points away from: keep the old blocks (mapped
                    // by H without its relocations) and the copy (never marked here).
                    return Ok(true);
                }
                apply(&mut map_h, r, zero);
                for p in &r.pieces {
                    if let Some(pba) = p.pba {
                        named.set_range(pba, p.blocks, true);
                    }
                }
            }
            Ok(true)
        })?;
        for (s, c) in mapped_runs(&map_h) {
            named.set_range(s, c, false);
        }
        for (s, c) in self.sh.meta_runs() {
            named.set_range(s, c, false);
        }
        let already = rlock(&self.sh.reclaimed).runs.clone();
        for &(s, c) in &already {
            named.set_range(s, c, false);
        }
        let mut pinned_blocks = 0;
        for &(s, c) in &merge_runs(pinned.to_vec()) {
            pinned_blocks += named.count(s, c);
            named.set_range(s, c, false);
        }
        let runs = named.runs();
        let blocks: u64 = runs.iter().map(|&(_, c)| c).sum();
        Ok(ReclaimPlan {
            keep_from: keep_from.0,
            seq: seq.0,
            runs,
            blocks,
            bytes: blocks * self.sh.bs.bytes_u64(),
            pinned_blocks,
        })
    }

    /// Step 2 of a reclaim (see the module documentation): makes the plan's runs reclaimed,
    /// durably. Refuses a plan that names a block the current map holds (a stale plan).
    pub fn commit_reclaim(&self, plan: &ReclaimPlan) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        // Every record up to the keep-from state must be durable before anything that state
        // no longer maps is given up: recovery must never fall back to an older state.
        self.flush()?;
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        let live = mapped_runs(&rlock(&self.live).map);
        if intersects(&plan.runs, &live) || plan.keep_from > j.seq {
            return Err(ImageError::InvalidOptions(
                "the reclaim plan is stale: the image changed since it was made".into(),
            ));
        }
        if j.hdr.incompat & format::INCOMPAT_RECLAIM == 0 {
            // Older readers must refuse the image rather than take holes for damage.
            j.hdr.incompat |= format::INCOMPAT_RECLAIM;
            self.checkpoint_locked(&mut j)?;
        }
        // A record must fit an empty segment after its header and the link record's room.
        let room = self.sh.seg_bytes() as usize
            - format::SEG_HEADER_SIZE as usize
            - format::LINK_LEN
            - (format::REC_HEAD + 16 + 4);
        let per_record = (room / RUN_LEN).clamp(1, 4096);
        // Nothing to give back: nothing is recorded and no state becomes unreadable.
        let horizon = plan.keep_from.max(self.sh.horizon());
        for runs in plan.runs.chunks(per_record) {
            let body = Reclaimed {
                horizon,
                runs: runs.to_vec(),
            };
            let rec = Record {
                kind: RecKind::Reclaim,
                seq: j.seq,
                pieces: Vec::new(),
                link: None,
                nonce: None,
                reclaim: Some(body),
            };
            j.append(&self.sh, &rec)?;
            if let Some(body) = &rec.reclaim {
                // Before any hole is punched, so no reader of this process gets zeros.
                self.sh.add_reclaimed(body);
            }
        }
        j.write_out(&self.sh)?;
        if let Err(e) = self.sh.file.sync_data() {
            j.failed = true;
            return Err(ImageError::io("cannot sync the image", e));
        }
        log::info!(
            "reclaimed {} blocks in {} runs; history horizon is now seq {horizon}",
            plan.blocks,
            plan.runs.len()
        );
        Ok(())
    }

    /// Step 3 of a reclaim: punches holes over the plan's runs (which must have been
    /// committed), then syncs. `progress(done, total)` is called in bytes.
    pub fn punch_reclaimed(
        &self,
        plan: &ReclaimPlan,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if !covered_by(&plan.runs, &rlock(&self.sh.reclaimed).runs) {
            return Err(ImageError::InvalidOptions(
                "refusing to punch blocks that are not reclaimed (commit the plan first)".into(),
            ));
        }
        let bs = self.sh.bs.bytes_u64();
        let fd = self.sh.file.as_raw_fd();
        let mut done = 0u64;
        progress(0, plan.bytes);
        for &(s, c) in &plan.runs {
            let off = self.sh.slot_off(s).ok_or(ImageError::Full)?;
            let len = c.saturating_mul(bs);
            let (o, l) = match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
                (Ok(o), Ok(l)) => (o, l),
                _ => return Err(ImageError::Full),
            };
            // SAFETY: a plain system call on the image's open fd; no memory is passed. The
            // range holds only reclaimed data blocks (checked above), which nothing reads.
            let r = unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    o,
                    l,
                )
            };
            if r != 0 {
                let e = std::io::Error::last_os_error();
                return Err(ImageError::io(
                    "cannot punch holes in the image (the blocks are reclaimed, but the file \
                     system keeps their space)",
                    e,
                ));
            }
            done += len;
            progress(done, plan.bytes);
        }
        self.sh
            .file
            .sync_data()
            .map_err(|e| ImageError::io("cannot sync the image", e))
    }

    /// A whole reclaim: [`plan_reclaim`](Self::plan_reclaim),
    /// [`commit_reclaim`](Self::commit_reclaim), [`punch_reclaimed`](Self::punch_reclaimed).
    pub fn reclaim(
        &self,
        keep_from: Seq,
        pinned: &[(u64, u64)],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<ReclaimReport, ImageError> {
        let allocated_before = self.allocated_bytes()?;
        let plan = self.plan_reclaim(keep_from, pinned)?;
        self.commit_reclaim(&plan)?;
        self.punch_reclaimed(&plan, progress)?;
        Ok(ReclaimReport {
            horizon: self.sh.horizon(),
            allocated_after: self.allocated_bytes()?,
            allocated_before,
            plan,
        })
    }

    fn allocated_bytes(&self) -> Result<u64, ImageError> {
        use std::os::unix::fs::MetadataExt;
        let md = self
            .sh
            .file
            .metadata()
            .map_err(|e| ImageError::io("cannot stat the image", e))?;
        Ok(md.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_turn_into_merged_runs() {
        let mut b = Bits::new(300);
        b.set_range(3, 70, true);
        b.set_range(64, 64, true);
        b.set_range(200, 100, true);
        b.set_range(250, 5, false);
        assert_eq!(b.runs(), vec![(3, 125), (200, 50), (255, 45)]);
        assert_eq!(b.count(0, 10), 7);
        let mut full = Bits::new(128);
        full.set_range(0, 128, true);
        assert_eq!(full.runs(), vec![(0, 128)]);
    }

    #[test]
    fn run_lists_intersect_and_cover() {
        let a = [(10, 5), (30, 2)];
        assert!(intersects(&a, &[(14, 1)]));
        assert!(!intersects(&a, &[(15, 15), (32, 8)]));
        assert!(covered_by(&a, &[(0, 20), (30, 2)]));
        assert!(!covered_by(&a, &[(0, 20), (31, 2)]));
        assert_eq!(
            merge_runs(vec![(5, 2), (0, 3), (3, 2), (9, 1)]),
            vec![(0, 7), (9, 1)]
        );
    }
}

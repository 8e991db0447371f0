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

use super::format::{self, JPos, RecKind, Reclaimed, Record, RUN_LEN};
use super::freelist::{RunSet, SlotBits};
use super::map::Map;
use super::shared::{merge_runs, subtract_runs as subtract, Shared};
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

/// Where the previous plan stopped: the map of state `seq` and the journal position right
/// after its last record, so the next plan of the same open image only walks what came since.
pub(crate) struct Cursor {
    map: Map,
    pos: JPos,
    seq: u64,
    /// Slots whose incarnation of the time was displaced from the map up to `seq`. A record
    /// naming a slot again (reusing it) and a reclaim record naming it take it out: what is
    /// left are the slots whose latest incarnation is superseded. A plan subtracts what is
    /// reclaimed, pinned or metadata at its own time.
    displaced: SlotBits,
    /// `displaced` holds no reclaimed slot and no slot a record after the cursor names (see
    /// [`Image::plan_reclaim`]): plans need not subtract either any more.
    purged: bool,
}

impl Cursor {
    fn start(img: &Image) -> Cursor {
        Cursor {
            map: Map::new(img.sh.blocks),
            pos: lock(&img.journal).hdr.journal_start(),
            seq: 0,
            displaced: SlotBits::default(),
            purged: false,
        }
    }
}

/// Pushes `pba` onto sorted-by-arrival runs, extending the last run when it is adjacent.
fn push_block(out: &mut Vec<(u64, u64)>, pba: u64) {
    match out.last_mut() {
        Some((s, c)) if *s + *c == pba => *c += 1,
        _ => out.push((pba, 1)),
    }
}

fn blocks_in(runs: &[(u64, u64)]) -> u64 {
    runs.iter().map(|&(_, c)| c).sum()
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

/// The runs of `all` that share a slot with some run of `some` (both sorted, disjoint), in
/// one pass over both.
fn touching(all: &[(u64, u64)], some: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut j = 0;
    for &(s, c) in all {
        // Runs of `some` that end before this one starts cannot touch it nor any later one.
        while some.get(j).is_some_and(|&(bs, bc)| bs + bc <= s) {
            j += 1;
        }
        if some.get(j).is_some_and(|&(bs, _)| bs < s + c) {
            out.push((s, c));
        }
    }
    out
}

/// True when every run of `a` lies inside the runs of `b` (both sorted, disjoint, merged).
fn covered_by(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    a.iter().all(|&(s, c)| {
        let i = b.partition_point(|&(bs, bc)| bs + bc <= s);
        b.get(i)
            .is_some_and(|&(bs, bc)| bs <= s && s + c <= bs + bc)
    })
}

/// Where reclaimed slots were written again (reuse), built from the journal: which versions
/// and which reads of a record log a reuse has overtaken.
#[derive(Debug, Default, Clone)]
pub struct RebornIndex {
    /// (first slot, count, seq of the record that reused them, its position in the journal),
    /// sorted by first slot.
    events: Vec<(u64, u64, u64, u64)>,
    /// Longest event (bounds the search for overlaps).
    longest: u64,
}

impl RebornIndex {
    /// Builds the index while a walk visits the journal's records in order: feed each record
    /// to [`RebornBuilder::visit`], then call [`RebornBuilder::finish`].
    pub fn builder() -> RebornBuilder {
        RebornBuilder::default()
    }

    /// True when no reclaimed slot was ever reused.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Number of reuse events.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// The first slot of `[pba, pba + n)` that a record later than journal position `ordinal`
    /// reused (so the version there at `ordinal` is gone), if any.
    pub fn reused_after_record(&self, pba: u64, n: u64, ordinal: u64) -> Option<u64> {
        self.first(pba, n, |&(_, _, _, o)| o > ordinal)
    }

    /// The first slot of `[pba, pba + n)` that a record with a seq above `seq` reused (so what
    /// a read in state `seq` found there is gone), if any.
    pub fn reused_after_seq(&self, pba: u64, n: u64, seq: u64) -> Option<u64> {
        self.first(pba, n, |&(_, _, s, _)| s > seq)
    }

    fn first(&self, pba: u64, n: u64, pick: impl Fn(&(u64, u64, u64, u64)) -> bool) -> Option<u64> {
        let end = pba.saturating_add(n);
        let lo = self
            .events
            .partition_point(|&(s, _, _, _)| s.saturating_add(self.longest) <= pba);
        self.events
            .get(lo..)
            .unwrap_or_default()
            .iter()
            .take_while(|&&(s, _, _, _)| s < end)
            .filter(|e| e.0 + e.1 > pba && pick(e))
            .map(|&(s, _, _, _)| s.max(pba))
            .min()
    }
}

/// Builds a [`RebornIndex`] from the journal's records, in order.
#[derive(Debug, Default)]
pub struct RebornBuilder {
    /// The reclaimed set at the current point of the walk.
    reclaimed: RunSet,
    index: RebornIndex,
    ordinal: u64,
}

impl RebornBuilder {
    /// Takes the next record; returns its ordinal (position in the journal, from 1) and
    /// whether it reused reclaimed slots.
    pub fn visit(&mut self, r: &Record) -> (u64, bool) {
        self.ordinal += 1;
        let mut reused = false;
        if let Some(rc) = &r.reclaim {
            for &(s, c) in &rc.runs {
                self.reclaimed.insert(s, c);
            }
        }
        if r.kind.maps() && self.reclaimed.blocks() > 0 {
            for p in &r.pieces {
                let Some(pba) = p.pba else { continue };
                if self.reclaimed.overlaps(pba, p.blocks) {
                    self.reclaimed.remove_range(pba, p.blocks);
                    self.index.events.push((pba, p.blocks, r.seq, self.ordinal));
                    self.index.longest = self.index.longest.max(p.blocks);
                    reused = true;
                }
            }
        }
        (self.ordinal, reused)
    }

    /// The index.
    pub fn finish(mut self) -> RebornIndex {
        self.index.events.sort_unstable();
        self.index
    }
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
        // Every slot a committed record names lies inside the file (its data was written
        // first): the cursor's bitmap needs no bit past it.
        let file_len = self
            .sh
            .file
            .metadata()
            .map_err(|e| ImageError::io("cannot stat the image", e))?
            .len();
        let file_slots = file_len
            .saturating_sub(self.sh.data_offset)
            .div_ceil(self.sh.bs.bytes_u64());
        let mut guard = lock(&self.reclaim_cursor);
        let cur = guard.get_or_insert_with(|| Cursor::start(self));
        cur.displaced.raise_limit(file_slots);
        if keep_from.0 > cur.seq {
            // Walk on from where the last plan stopped, up to the write that made state
            // `keep_from` (see below for the relocations appended in that state).
            let zero = zero_value(&self.sh);
            let (mut pos, mut seq) = (cur.pos, cur.seq);
            let Cursor { map, displaced, .. } = cur;
            self.walk_from(cur.pos, cur.seq, |r, after| {
                // Stop at the first record after the write that made state `keep_from`,
                // relocations appended in that state included: a log recorded from
                // `keep_from` on may have read the blocks such a relocation moved away from.
                let in_keep_from_state = r.kind == RecKind::Relocate && r.seq == keep_from.0;
                if r.kind.maps() && (r.seq > keep_from.0 || in_keep_from_state) {
                    return Ok(false);
                }
                if r.kind.maps() {
                    let mut out = Vec::new();
                    for p in &r.pieces {
                        for i in 0..p.blocks {
                            let v = map.get(p.lba + i);
                            if v >= 2 {
                                push_block(&mut out, v - 2);
                            }
                        }
                    }
                    for (s, c) in out {
                        displaced.insert(s, c);
                    }
                    // A record naming slots starts their new incarnation (a reuse): what
                    // displaced the old one no longer applies.
                    for p in &r.pieces {
                        if let Some(pba) = p.pba {
                            displaced.remove_range(pba, p.blocks);
                        }
                    }
                    apply(map, r, zero);
                }
                if let Some(rc) = &r.reclaim {
                    for &(s, c) in &rc.runs {
                        displaced.remove_range(s, c);
                    }
                }
                if r.kind.changes_state() {
                    seq = r.seq;
                }
                pos = after;
                Ok(true)
            })?;
            cur.pos = pos;
            cur.seq = seq;
        }
        if keep_from.0 < cur.seq {
            // An older keep-from than an earlier plan of this image: recompute from scratch
            // (rare: only a caller going backwards).
            drop(guard);
            let fresh = self.fresh_plan(keep_from, pinned)?;
            return Ok(fresh);
        }
        // Everything displaced up to the cursor's state is superseded at `keep_from` too: its
        // slot is only mapped again by a record that reuses it.
        //
        // A cursor can hold slots that are stale: reclaimed by a record after the cursor (a
        // reclaim record is appended at the journal's end, after states newer than its
        // keep-from), and, on images with the reuse feature, then named again by a record
        // after the cursor. Within one process every commit takes its plan's slots out of
        // the cursor (`forget_candidates`), so stale slots come only from the journal this
        // cursor found when it was built: once its keep-from is past the horizon, every
        // reclaimed slot's displacing record is behind it (each was displaced by the state its
        // reclaim kept from, at most the horizon), and one purge of the reclaimed set and of
        // the slots named after the cursor leaves none. Until then every plan subtracts both.
        let gone = |cur: &Cursor| -> Result<Vec<(u64, u64)>, ImageError> {
            let mut gone = rlock(&self.sh.reclaimed).runs.to_runs();
            if lock(&self.journal).hdr.incompat & format::INCOMPAT_REUSE != 0 {
                self.walk_from(cur.pos, cur.seq, |r, _| {
                    if r.kind.maps() {
                        gone.extend(r.pieces.iter().filter_map(|p| p.pba.map(|b| (b, p.blocks))));
                    }
                    Ok(true)
                })?;
            }
            Ok(merge_runs(gone))
        };
        if !cur.purged && keep_from.0 > self.sh.horizon() {
            for (s, c) in gone(cur)? {
                cur.displaced.remove_range(s, c);
            }
            cur.purged = true;
        }
        let mut candidates = cur.displaced.to_runs();
        if !cur.purged {
            candidates = subtract(&candidates, &gone(cur)?);
        }
        drop(guard);
        candidates = subtract(&candidates, &self.sh.meta_runs());
        let runs = subtract(&candidates, &merge_runs(pinned.to_vec()));
        let blocks = blocks_in(&runs);
        Ok(ReclaimPlan {
            keep_from: keep_from.0,
            seq: seq.0,
            pinned_blocks: blocks_in(&candidates) - blocks,
            runs,
            blocks,
            bytes: blocks * self.sh.bs.bytes_u64(),
        })
    }

    /// A plan with a cursor of its own from the journal's start (for a keep-from older than
    /// the image's cursor).
    fn fresh_plan(&self, keep_from: Seq, pinned: &[(u64, u64)]) -> Result<ReclaimPlan, ImageError> {
        let saved = lock(&self.reclaim_cursor).take();
        let plan = self.plan_reclaim(keep_from, pinned);
        let mut g = lock(&self.reclaim_cursor);
        // Keep whichever cursor went further.
        if let Some(old) = saved {
            if g.as_ref().map_or(true, |c| c.seq < old.seq) {
                *g = Some(old);
            }
        }
        plan
    }

    /// Step 2 of a reclaim (see the module documentation): makes the plan's runs reclaimed,
    /// durably. Refuses a plan that names a block the current map holds (a stale plan).
    pub fn commit_reclaim(&self, plan: &ReclaimPlan) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if plan.runs.is_empty() {
            // Nothing to give back: nothing is recorded, no state becomes unreadable, and the
            // image stays readable by builds without the reclaim feature.
            return Ok(());
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
        self.append_reclaim(&mut j, plan)?;
        j.write_out(&self.sh)?;
        let ticket = self.sync_ticket();
        self.sync_file(ticket).inspect_err(|_| j.failed = true)?;
        drop(j);
        self.forget_candidates(plan);
        log::info!(
            "reclaimed {} blocks in {} runs; history horizon is now seq {}",
            plan.blocks,
            plan.runs.len(),
            self.sh.horizon()
        );
        Ok(())
    }

    /// Sets the feature bit if needed (with a checkpoint) and appends the reclaim records of
    /// `plan` (buffered), updating the in-memory reclaimed set.
    fn append_reclaim(
        &self,
        j: &mut super::journal::Journal,
        plan: &ReclaimPlan,
    ) -> Result<(), ImageError> {
        if j.hdr.incompat & format::INCOMPAT_RECLAIM == 0 {
            // Older readers must refuse the image rather than take holes for damage.
            j.hdr.incompat |= format::INCOMPAT_RECLAIM;
            if let Err(e) = self.checkpoint_locked(j) {
                // The header on disk may still lack the bit: so must the next one written.
                j.hdr.incompat &= !format::INCOMPAT_RECLAIM;
                return Err(e);
            }
        }
        // A record must fit an empty segment after its header and the link record's room.
        let room = self.sh.seg_bytes() as usize
            - format::SEG_HEADER_SIZE as usize
            - format::LINK_LEN
            - (format::REC_HEAD + 16 + 4);
        let per_record = (room / RUN_LEN).clamp(1, 4096);
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
        Ok(())
    }

    /// Step 2 of a reclaim beside writers (`serve --retain-seqs`): as
    /// [`commit_reclaim`](Self::commit_reclaim), without syncing anything. The plan's
    /// keep-from state must already be durable ([`Image::durable_seq`]); the reclaim records
    /// become durable with the next sync of the image (a flush, the periodic sync, a
    /// checkpoint, or [`sync_journal`](Self::sync_journal)). Returns the ticket to pass to
    /// [`is_durable`](Self::is_durable): no hole may be punched before it is.
    pub fn commit_reclaim_unsynced(&self, plan: &ReclaimPlan) -> Result<u64, ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        if plan.keep_from > j.durable_seq {
            return Err(ImageError::InvalidOptions(format!(
                "the reclaim plan keeps from seq {}, but only seq {} is durable",
                plan.keep_from, j.durable_seq
            )));
        }
        self.append_reclaim(&mut j, plan)?;
        let ticket = self.sync_started.load(std::sync::atomic::Ordering::SeqCst);
        drop(j);
        self.forget_candidates(plan);
        Ok(ticket)
    }

    /// Takes a committed plan's runs out of the cursor's candidates at once: with reuse a
    /// reclaimed slot can be written again (and so leave the reclaimed set) before the next
    /// plan would have subtracted it, and a candidate that is live again must never be
    /// planned.
    fn forget_candidates(&self, plan: &ReclaimPlan) {
        if let Some(cur) = lock(&self.reclaim_cursor).as_mut() {
            for &(s, c) in &plan.runs {
                cur.displaced.remove_range(s, c);
            }
        }
    }

    /// Turns reuse of reclaimed slots for new data on or off (docs/format.md, "Reuse"). With it
    /// on, [`reuse_reclaimed`](Self::reuse_reclaimed) feeds the slots of durable reclaims to
    /// the allocator instead of punching holes over them.
    pub fn set_reuse_reclaimed(&self, on: bool) {
        if !self.read_only {
            self.sh.reuse.store(on, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Hands reclaimed runs to the allocator for new writes. The reclaim that named them must
    /// be durable ([`is_durable`](Self::is_durable)): a slot is overwritten only once no
    /// recovery can fall back to a state that still reads its old version. The first call
    /// sets the header's reuse feature bit (with a checkpoint). Returns the blocks added.
    pub fn reuse_reclaimed(&self, runs: &[(u64, u64)]) -> Result<u64, ImageError> {
        if self.read_only || !self.sh.reuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Ok(0);
        }
        {
            let mut j = lock(&self.journal);
            if j.failed {
                return Err(ImageError::Failed);
            }
            if j.hdr.incompat & format::INCOMPAT_RECLAIM == 0 {
                return Ok(0);
            }
            if j.hdr.incompat & format::INCOMPAT_REUSE == 0 {
                // Older readers must refuse the image rather than read reused slots as the
                // versions they held before.
                j.hdr.incompat |= format::INCOMPAT_REUSE;
                if let Err(e) = self.checkpoint_locked(&mut j) {
                    j.hdr.incompat &= !format::INCOMPAT_REUSE;
                    return Err(e);
                }
            }
        }
        Ok(self.sh.add_free(runs))
    }

    /// [`reuse_reclaimed`](Self::reuse_reclaimed) of every reclaimed slot, after making the
    /// journal durable (what a daemon does when it starts with reuse on).
    pub fn reuse_all_reclaimed(&self) -> Result<u64, ImageError> {
        if self.read_only || self.sh.horizon() == 0 {
            return Ok(0);
        }
        self.sync_journal()?;
        let runs = rlock(&self.sh.reclaimed).runs.to_runs();
        self.reuse_reclaimed(&runs)
    }

    /// Every reuse of reclaimed slots in the journal (empty, without a walk, for images
    /// without the reuse feature).
    pub fn reborn_index(&self) -> Result<RebornIndex, ImageError> {
        if lock(&self.journal).hdr.incompat & format::INCOMPAT_REUSE == 0 {
            return Ok(RebornIndex::default());
        }
        let mut b = RebornIndex::builder();
        self.walk_all(|r, _| {
            b.visit(r);
            Ok(true)
        })?;
        Ok(b.finish())
    }

    /// Reclaimed blocks waiting in the allocator's free list.
    pub fn free_blocks(&self) -> u64 {
        lock(&self.sh.free).blocks()
    }

    /// True once a sync that started after `ticket` was taken has completed.
    pub fn is_durable(&self, ticket: u64) -> bool {
        self.sync_done.load(std::sync::atomic::Ordering::SeqCst) > ticket
    }

    /// Writes the journal out and syncs the image (without a flush marker): what makes an
    /// unsynced reclaim durable when no write comes along to do it.
    pub fn sync_journal(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        let ticket = {
            let mut j = lock(&self.journal);
            if j.failed {
                return Err(ImageError::Failed);
            }
            j.write_out(&self.sh)?;
            self.sync_ticket()
        };
        self.sync_file(ticket)
            .inspect_err(|_| lock(&self.journal).failed = true)
    }

    /// Step 3 of a reclaim: punches holes over the plan's runs (which must have been
    /// committed), then syncs. `progress(done, total)` is called in bytes.
    pub fn punch_reclaimed(
        &self,
        plan: &ReclaimPlan,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), ImageError> {
        self.punch_runs(&plan.runs, progress)
    }

    /// Punches holes over the runs of reclaimed blocks that this plan's runs belong to (merged
    /// with reclaimed neighbours) and that are at least `min_bytes` long, longest first, until
    /// `budget` is spent; returns the bytes punched. What a reclaim running beside writers uses: versions superseded at random are
    /// scattered single blocks, one `fallocate` each, and each holds the file's lock against
    /// the writers (measured, punching them all: 0.30x the throughput of 4 KiB random
    /// writes). Runs left out stay reclaimed but allocated; they are punched when a later
    /// plan reclaims a neighbour (they are part of its merged run then), or by
    /// [`punch_all_reclaimed`](Self::punch_all_reclaimed).
    pub fn punch_reclaimed_runs_of(
        &self,
        plan: &ReclaimPlan,
        min_bytes: u64,
        budget: std::time::Duration,
    ) -> Result<u64, ImageError> {
        let bs = self.sh.bs.bytes_u64();
        let min_blocks = min_bytes.div_ceil(bs).max(1);
        let mut runs: Vec<(u64, u64)> =
            touching(&rlock(&self.sh.reclaimed).runs.to_runs(), &plan.runs)
                .into_iter()
                .filter(|&(_, c)| c >= min_blocks)
                .collect();
        // Only what is not a hole yet: a run that grew by a few blocks costs a few blocks.
        runs = subtract(&runs, &lock(&self.sh.punched));
        runs.sort_unstable_by_key(|&(s, c)| (std::cmp::Reverse(c), s));
        let start = std::time::Instant::now();
        let mut done = 0;
        for chunk in runs.chunks(64) {
            if start.elapsed() >= budget {
                break;
            }
            let mut sorted = chunk.to_vec();
            sorted.sort_unstable();
            self.punch_runs(&sorted, &mut |_, _| {})?;
            done += blocks_in(&sorted) * bs;
        }
        Ok(done)
    }

    /// Punches holes over `runs`, which must all be reclaimed.
    fn punch_runs(
        &self,
        runs: &[(u64, u64)],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        if !covered_by(runs, &rlock(&self.sh.reclaimed).runs.to_runs()) {
            return Err(ImageError::InvalidOptions(
                "refusing to punch blocks that are not reclaimed (commit the plan first)".into(),
            ));
        }
        let bs = self.sh.bs.bytes_u64();
        let fd = self.sh.file.as_raw_fd();
        let total = blocks_in(runs) * bs;
        let mut done = 0u64;
        progress(0, total);
        for &(s, c) in runs {
            let off = self.sh.slot_off(s).ok_or(ImageError::Full)?;
            let len = c.saturating_mul(bs);
            let (o, l) = match (libc::off_t::try_from(off), libc::off_t::try_from(len)) {
                (Ok(o), Ok(l)) => (o, l),
                _ => return Err(ImageError::Full),
            };
            // SAFETY: lseek on the image's open fd, no memory involved. SEEK_DATA finds the
            // next byte that is not a hole (ENXIO: none up to the end of the file): a range
            // that is a hole already is skipped, which costs a few microseconds against a
            // punch's ~150 (repeated reclaims re-punch nothing).
            let next_data = unsafe { libc::lseek(fd, o, libc::SEEK_DATA) };
            let no_data_after = next_data < 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
            if no_data_after || next_data >= o.saturating_add(l) {
                done += len;
                progress(done, total);
                continue;
            }
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
            progress(done, total);
        }
        // No sync: the reclaim is durable already, and a hole a crash loses only leaves a
        // reclaimed block taking space until the next punch of it.
        let mut p = lock(&self.sh.punched);
        p.extend_from_slice(runs);
        *p = merge_runs(std::mem::take(&mut *p));
        Ok(())
    }

    /// Punches holes over every reclaimed block, also those of earlier reclaims (a crash
    /// between commit and punch, or a failed punch, leaves reclaimed blocks that still take
    /// space; punching a hole again costs little). `progress(done, total)` in bytes.
    pub fn punch_all_reclaimed(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(), ImageError> {
        let runs = rlock(&self.sh.reclaimed).runs.to_runs();
        let blocks = blocks_in(&runs);
        let all = ReclaimPlan {
            keep_from: self.sh.horizon(),
            seq: self.seq().0,
            runs,
            blocks,
            bytes: blocks * self.sh.bs.bytes_u64(),
            pinned_blocks: 0,
        };
        self.punch_reclaimed(&all, progress)
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
    fn runs_subtract() {
        assert_eq!(
            subtract(&[(0, 10), (20, 5), (40, 3)], &[(2, 2), (8, 14), (41, 1)]),
            vec![(0, 2), (4, 4), (22, 3), (40, 1), (42, 1)]
        );
        assert_eq!(subtract(&[(5, 5)], &[]), vec![(5, 5)]);
        assert_eq!(subtract(&[(5, 5)], &[(0, 100)]), vec![]);
        let mut v = Vec::new();
        for p in [7, 8, 9, 3, 4] {
            push_block(&mut v, p);
        }
        assert_eq!(v, vec![(7, 3), (3, 2)]);
    }

    #[test]
    fn run_lists_intersect_and_cover() {
        let a = [(10, 5), (30, 2)];
        assert!(intersects(&a, &[(14, 1)]));
        assert!(!intersects(&a, &[(15, 15), (32, 8)]));
        assert!(covered_by(&a, &[(0, 20), (30, 2)]));
        assert_eq!(
            touching(
                &[(0, 5), (10, 5), (20, 5), (30, 5)],
                &[(4, 1), (12, 10), (40, 1)]
            ),
            vec![(0, 5), (10, 5), (20, 5)]
        );
        assert_eq!(touching(&a, &[]), vec![]);
        assert!(!covered_by(&a, &[(0, 20), (31, 2)]));
        assert_eq!(
            merge_runs(vec![(5, 2), (0, 3), (3, 2), (9, 1)]),
            vec![(0, 7), (9, 1)]
        );
    }
}

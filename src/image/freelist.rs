//! Reuse of reclaimed slots for new data (`Image::set_reuse_reclaimed`).
//!
//! A reclaim gives the slots of versions no retained state needs back. Punching holes over
//! them returns the space to the file system but costs a `fallocate` each (about 150 us here
//! whatever the length up to 64 KiB) and leaves the file growing at its end. Reusing them
//! instead keeps the file at its high-water mark, and a write into a reused slot lands in
//! blocks (and often page-cache pages) the file already has, the way a raw file's overwrite
//! does.
//!
//! The free list holds reclaimed runs whose reclaim records are durable (a slot may only be
//! overwritten once no recovery can fall back to a state that still names its old version).
//! Allocation is next-fit: the first run at or after a roving cursor that is long enough, so
//! that sequential writes get consecutive slots; runs too short for a request stay for
//! shorter ones. The list is an in-memory view: what is on disk is the reclaimed set, and a
//! write record that names reclaimed slots makes them live again (docs/format.md, "Reuse").

use std::collections::BTreeMap;

/// Most runs one allocation looks at before it gives up and appends at the end of the file.
pub const MAX_PROBES: usize = 64;

/// A set of slots kept as disjoint, merged runs in a B-tree: insertion, removal and lookups
/// of a range cost O(log runs) (the reclaimed set, the free list, a reclaim plan's
/// candidates).
#[derive(Debug, Default, Clone)]
pub struct RunSet {
    runs: BTreeMap<u64, u64>,
    blocks: u64,
}

impl RunSet {
    /// Slots in the set.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Adds `[slot, slot + n)`, merging with neighbours (slots already in the set stay once).
    pub fn insert(&mut self, slot: u64, n: u64) {
        if n == 0 {
            return;
        }
        self.remove_range(slot, n);
        let (mut s, mut e) = (slot, slot.saturating_add(n));
        if let Some((&ps, &pc)) = self.runs.range(..s).next_back() {
            if ps + pc == s {
                self.runs.remove(&ps);
                s = ps;
            }
        }
        if let Some(&nc) = self.runs.get(&e) {
            self.runs.remove(&e);
            e += nc;
        }
        self.runs.insert(s, e - s);
        // The range was removed first, so exactly its slots are new.
        self.blocks += slot.saturating_add(n) - slot;
    }

    /// Removes every slot of `[slot, slot + n)` from the set.
    pub fn remove_range(&mut self, slot: u64, n: u64) {
        let end = slot.saturating_add(n);
        let hit: Vec<(u64, u64)> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|&(&s, &c)| s + c > slot)
            .map(|(&s, &c)| (s, c))
            .collect();
        for (s, c) in hit {
            self.runs.remove(&s);
            self.blocks -= c;
            if s < slot {
                self.runs.insert(s, slot - s);
                self.blocks += slot - s;
            }
            if s + c > end {
                self.runs.insert(end, s + c - end);
                self.blocks += s + c - end;
            }
        }
    }

    /// The parts of `[slot, slot + n)` in the set, in order, without allocating.
    fn parts(&self, slot: u64, n: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = slot.saturating_add(n);
        let first = self
            .runs
            .range(..=slot)
            .next_back()
            .filter(|&(&s, &c)| s + c > slot)
            .map(|(&s, _)| s)
            .unwrap_or(slot);
        self.runs
            .range(first..end)
            .map(move |(&s, &c)| (s.max(slot), (s + c).min(end) - s.max(slot)))
    }

    /// The parts of `[slot, slot + n)` in the set, in order.
    pub fn parts_in(&self, slot: u64, n: u64) -> Vec<(u64, u64)> {
        self.parts(slot, n).collect()
    }

    /// The first slot of `[slot, slot + n)` in the set, if any.
    pub fn first_in(&self, slot: u64, n: u64) -> Option<u64> {
        self.parts(slot, n).next().map(|(s, _)| s)
    }

    /// True when some slot of `[slot, slot + n)` is in the set.
    pub fn overlaps(&self, slot: u64, n: u64) -> bool {
        self.runs
            .range(..slot.saturating_add(n))
            .next_back()
            .is_some_and(|(&s, &c)| s + c > slot)
    }

    /// The runs, sorted.
    pub fn to_runs(&self) -> Vec<(u64, u64)> {
        self.runs.iter().map(|(&s, &c)| (s, c)).collect()
    }
}

/// Free (reclaimed, durable, unused) slot runs, with the roving cursor of next-fit, and the
/// slots handed out but not committed yet (`taken`): those must never be offered again until
/// their write commits (they leave the list) or fails (they come back).
#[derive(Debug, Default)]
pub struct FreeList {
    set: RunSet,
    taken: RunSet,
    cursor: u64,
}

impl FreeList {
    /// Free blocks.
    pub fn blocks(&self) -> u64 {
        self.set.blocks()
    }

    /// Offers `[slot, slot + n)` for reuse, except what is taken; returns the blocks that are
    /// free now and were not before.
    pub fn offer(&mut self, slot: u64, n: u64) -> u64 {
        let before = self.set.blocks();
        let mut at = slot;
        let end = slot.saturating_add(n);
        for (s, c) in self.taken.parts_in(slot, n) {
            if s > at {
                self.set.insert(at, s - at);
            }
            at = s + c;
        }
        if end > at {
            self.set.insert(at, end - at);
        }
        self.set.blocks() - before
    }

    /// A record naming `[slot, slot + n)` was committed: those slots are live, neither free
    /// nor taken.
    pub fn forget(&mut self, slot: u64, n: u64) {
        self.set.remove_range(slot, n);
        self.taken.remove_range(slot, n);
    }

    /// The write that took `[slot, slot + n)` failed: what of it was taken is free again.
    pub fn give_back(&mut self, slot: u64, n: u64) {
        for (s, c) in self.taken.parts_in(slot, n) {
            self.taken.remove_range(s, c);
            self.set.insert(s, c);
        }
    }

    /// Takes `n` consecutive free slots, next-fit from the cursor (wrapping once), looking at
    /// no more than [`MAX_PROBES`] runs. None when no run it looked at is long enough.
    pub fn take(&mut self, n: u64) -> Option<u64> {
        if n == 0 || self.set.blocks < n {
            return None;
        }
        let runs = &self.set.runs;
        let found = runs
            .range(self.cursor..)
            .chain(runs.range(..self.cursor))
            .take(MAX_PROBES)
            .find(|&(_, &c)| c >= n)
            .map(|(&s, _)| s);
        let s = found?;
        self.set.remove_range(s, n);
        self.taken.insert(s, n);
        self.cursor = s + n;
        Some(s)
    }
}

/// A set of slots as a bitmap, one bit per slot below a limit (a reclaim cursor's displaced
/// slots: dense, changed a few blocks at a time for every journal record a plan walks, read
/// whole once per plan; a B-tree of runs spent most of the retention thread's time on those
/// single-block changes). Slots at or above the limit are ignored: the limit is the number of
/// slots the image file holds, and a slot past its end holds no data to give back (only a
/// damaged record names one, and it must not make the bitmap huge).
#[derive(Debug, Default, Clone)]
pub struct SlotBits {
    words: Vec<u64>,
    limit: u64,
}

impl SlotBits {
    /// Slots from `limit` on are ignored from now on (the limit only grows).
    pub fn raise_limit(&mut self, limit: u64) {
        self.limit = self.limit.max(limit);
    }

    /// Calls `f(word, mask)` for the bits of `[slot, slot + n)` below the limit, word by word
    /// (words that do not exist yet included).
    fn for_words(slot: u64, n: u64, limit: u64, mut f: impl FnMut(usize, u64)) {
        let end = slot.saturating_add(n).min(limit);
        let mut s = slot;
        while s < end {
            let w = s / 64;
            let lo = s % 64;
            let hi = (end - w * 64).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            f(w as usize, mask);
            s = (w + 1) * 64;
        }
    }

    /// Adds `[slot, slot + n)` (the part below the limit).
    pub fn insert(&mut self, slot: u64, n: u64) {
        let words = &mut self.words;
        Self::for_words(slot, n, self.limit, |w, mask| {
            if words.len() <= w {
                words.resize(w + 1, 0);
            }
            if let Some(x) = words.get_mut(w) {
                *x |= mask;
            }
        });
    }

    /// Removes `[slot, slot + n)`.
    pub fn remove_range(&mut self, slot: u64, n: u64) {
        let words = &mut self.words;
        let limit = (words.len() as u64).saturating_mul(64);
        Self::for_words(slot, n, limit, |w, mask| {
            if let Some(x) = words.get_mut(w) {
                *x &= !mask;
            }
        });
    }

    /// The set as sorted, disjoint, merged runs.
    pub fn to_runs(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (w, &bits) in self.words.iter().enumerate() {
            let mut b = bits;
            while b != 0 {
                let lo = u64::from(b.trailing_zeros());
                let len = u64::from((b >> lo).trailing_ones());
                let start = w as u64 * 64 + lo;
                match out.last_mut() {
                    Some((s, c)) if *s + *c == start => *c += len,
                    _ => out.push((start, len)),
                }
                b = if lo + len >= 64 {
                    0
                } else {
                    b & !(((1u64 << len) - 1) << lo)
                };
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_fit_keeps_sequential_allocations_consecutive() {
        let mut f = FreeList::default();
        f.offer(100, 64);
        f.offer(10, 4);
        f.cursor = 50;
        assert_eq!(f.take(32), Some(100));
        assert_eq!(f.take(32), Some(132));
        // Only the 4-block run is left: too short for 8, right for 2.
        assert_eq!(f.take(8), None);
        assert_eq!(f.take(2), Some(10));
        assert_eq!(f.blocks(), 2);
    }

    #[test]
    fn insert_merges_and_remove_splits() {
        let mut f = FreeList::default();
        f.offer(0, 4);
        f.offer(8, 4);
        f.offer(4, 4);
        assert_eq!(f.set.to_runs().len(), 1);
        assert_eq!(f.blocks(), 12);
        f.forget(3, 6);
        assert_eq!(f.blocks(), 6);
        assert_eq!(f.set.to_runs().len(), 2);
        assert_eq!(f.take(3), Some(0));
        assert_eq!(f.take(3), Some(9));
        assert_eq!(f.take(1), None);
    }

    #[test]
    fn run_set_counts_and_finds_parts() {
        let mut r = RunSet::default();
        r.insert(10, 5);
        r.insert(20, 5);
        r.insert(12, 10); // overlaps both: merges into one run
        assert_eq!(r.to_runs(), vec![(10, 15)]);
        assert_eq!(r.blocks(), 15);
        r.remove_range(14, 2);
        assert_eq!(r.parts_in(0, 100), vec![(10, 4), (16, 9)]);
        assert_eq!(r.parts_in(12, 6), vec![(12, 2), (16, 2)]);
        assert_eq!(r.first_in(14, 2), None);
        assert_eq!(r.first_in(14, 3), Some(16));
        assert!(r.overlaps(24, 10));
        assert!(!r.overlaps(25, 10));
    }

    #[test]
    fn taken_slots_are_never_offered_twice() {
        let mut f = FreeList::default();
        assert_eq!(f.offer(0, 8), 8);
        assert_eq!(f.take(4), Some(0));
        // Offering the whole run again (a caller that offers too much) adds nothing taken.
        assert_eq!(f.offer(0, 8), 0);
        assert_eq!(f.take(4), Some(4));
        assert_eq!(f.take(1), None);
        // A failed write gives its slots back; a committed one forgets them.
        f.give_back(0, 4);
        f.forget(4, 4);
        assert_eq!(f.blocks(), 4);
        f.give_back(4, 4);
        assert_eq!(f.blocks(), 4, "committed slots do not come back");
    }

    #[test]
    fn gives_up_after_the_probe_limit() {
        let mut f = FreeList::default();
        for i in 0..(MAX_PROBES as u64 + 1) {
            f.offer(i * 2, 1);
        }
        f.offer(10_000, 16);
        assert_eq!(f.take(16), None, "the long run lies past the probe limit");
        assert_eq!(f.take(1), Some(0));
    }

    #[test]
    fn slot_bits_follow_a_model_and_ignore_slots_past_the_limit() {
        let mut bits = SlotBits::default();
        bits.raise_limit(1000);
        let mut model = std::collections::BTreeSet::new();
        let mut x = 12345u64;
        for i in 0..5000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let slot = (x >> 33) % 1100;
            let n = 1 + (x >> 20) % 150;
            if i % 3 == 2 {
                bits.remove_range(slot, n);
                for b in slot..slot + n {
                    model.remove(&b);
                }
            } else {
                bits.insert(slot, n);
                for b in slot..(slot + n).min(1000) {
                    model.insert(b);
                }
            }
        }
        let mut want: Vec<(u64, u64)> = Vec::new();
        for &b in &model {
            match want.last_mut() {
                Some((s, c)) if *s + *c == b => *c += 1,
                _ => want.push((b, 1)),
            }
        }
        assert_eq!(bits.to_runs(), want);
        // A slot far past the limit allocates nothing.
        bits.insert(u64::MAX - 10, 5);
        assert!(bits.words.len() <= 1000 / 64 + 1);
        // Whole words and runs across word boundaries.
        let mut b = SlotBits::default();
        b.raise_limit(1 << 20);
        b.insert(64, 64);
        b.insert(200, 100);
        b.remove_range(250, 1);
        assert_eq!(b.to_runs(), vec![(64, 64), (200, 50), (251, 49)]);
    }
}

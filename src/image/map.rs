//! The in-memory LBA -> entry map, in lazily allocated chunks.
//!
//! Entry values: 0 = unmapped (reads the base image, or zeros without one), 1 = zero marker,
//! `p + 2` = data block (PBA) `p`; values are below 2^48 (the engine bounds block ids).
//! The disk is cut into chunks of [`CHUNK`] blocks. A chunk with no non-zero entry costs
//! nothing but its directory entry (18 bytes). A sparsely used chunk is a sorted list of
//! (offset, 48-bit value) pairs packed into 8 bytes each; a nearly full one is a plain array of
//! `u64`. Either way the map costs about 8 bytes per non-zero entry, however the written blocks
//! are scattered over the disk (docs/format.md has the measurements).

use super::Extent;
use crate::units::{Lba, Pba};

/// Entries per chunk.
pub const CHUNK: u64 = 4096;
const CHUNK_SHIFT: u32 = 12;
/// A sparse chunk becomes dense when it holds this many entries.
const TO_DENSE: usize = 3856;
/// A dense chunk becomes sparse when it drops below this many entries.
const TO_SPARSE: usize = 2048;

/// Entry value for "reads as zeros" (over a base image).
pub const ZERO: u64 = 1;

/// Sorted entries of a sparse chunk, each `offset << 48 | value` (so sorting by the packed
/// word sorts by offset).
#[derive(Default, Clone)]
struct Sparse(Vec<u64>);

const VALUE_MASK: u64 = (1 << 48) - 1;

impl Sparse {
    fn find(&self, o: u16) -> Result<usize, usize> {
        let key = |e: &u64| (e >> 48) as u16;
        let n = self.0.len();
        if n >= 64 {
            // Offsets are spread over the chunk: start from where `o` would sit if they were
            // uniform, and search a small window around it (fewer cache misses than a full
            // binary search); fall back when `o` is outside the window.
            let g = (usize::from(o) * n) >> CHUNK_SHIFT;
            let lo = g.saturating_sub(24);
            let hi = (g + 24).min(n);
            let inside = (lo == 0 || self.0.get(lo).is_some_and(|e| key(e) <= o))
                && (hi == n || self.0.get(hi - 1).is_some_and(|e| key(e) >= o));
            if inside {
                if let Some(w) = self.0.get(lo..hi) {
                    return match w.binary_search_by_key(&o, key) {
                        Ok(i) => Ok(lo + i),
                        Err(i) => Err(lo + i),
                    };
                }
            }
        }
        self.0.binary_search_by_key(&o, key)
    }

    fn get(&self, o: u16) -> u64 {
        match self.find(o) {
            Ok(i) => self.0.get(i).map_or(0, |e| e & VALUE_MASK),
            Err(_) => 0,
        }
    }

    /// Sets offset `o` to `v`; returns the old value.
    fn set(&mut self, o: u16, v: u64) -> u64 {
        let packed = (u64::from(o) << 48) | (v & VALUE_MASK);
        match self.find(o) {
            Ok(i) => {
                let old = self.0.get(i).map_or(0, |e| e & VALUE_MASK);
                if v == 0 {
                    self.0.remove(i);
                } else if let Some(e) = self.0.get_mut(i) {
                    *e = packed;
                }
                old
            }
            Err(i) => {
                if v != 0 {
                    if self.0.len() == self.0.capacity() {
                        // Grow by 1/16: at most ~6% slack over 8 bytes per entry.
                        self.0.reserve_exact((self.0.len() / 16).max(1));
                    }
                    self.0.insert(i, packed);
                }
                0
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.0.capacity() as u64 * 8
    }

    fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.0.iter().map(|&e| (e >> 48, e & VALUE_MASK))
    }
}

#[derive(Clone, Default)]
enum Chunk {
    #[default]
    Empty,
    Sparse(Sparse),
    Dense(Box<[u64; CHUNK as usize]>),
}

impl Chunk {
    fn bytes(&self) -> u64 {
        match self {
            Chunk::Empty => 0,
            Chunk::Sparse(s) => s.bytes(),
            Chunk::Dense(_) => CHUNK * 8,
        }
    }

    fn get(&self, o: u64) -> u64 {
        match self {
            Chunk::Empty => 0,
            Chunk::Sparse(s) => s.get(o as u16),
            Chunk::Dense(d) => d.get(o as usize).copied().unwrap_or(0),
        }
    }
}

/// The map of one state of the disk (live, or a snapshot).
pub struct Map {
    dir: Vec<Chunk>,
    /// Non-zero entries per chunk.
    count: Vec<u16>,
    blocks: u64,
    chunk_bytes: u64,
    mapped: u64,
}

impl Map {
    /// An empty map of `blocks` blocks (callers bound `blocks`, see `format::MAX_BLOCKS`).
    pub fn new(blocks: u64) -> Map {
        let n = blocks.div_ceil(CHUNK) as usize;
        let mut dir = Vec::with_capacity(n);
        dir.resize_with(n, Chunk::default);
        Map {
            dir,
            count: vec![0; n],
            blocks,
            chunk_bytes: 0,
            mapped: 0,
        }
    }

    /// Entries that map a data block.
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    /// Bytes of memory the map uses (directory plus chunks).
    pub fn memory_bytes(&self) -> u64 {
        let dir = self.dir.capacity() * std::mem::size_of::<Chunk>()
            + self.count.capacity() * std::mem::size_of::<u16>();
        dir as u64 + self.chunk_bytes
    }

    /// The entry of `lba` (0 when out of range).
    pub fn get(&self, lba: u64) -> u64 {
        match self.dir.get((lba >> CHUNK_SHIFT) as usize) {
            Some(c) => c.get(lba & (CHUNK - 1)),
            None => 0,
        }
    }

    /// Reads the entries of `lba .. lba + blocks` and throws them away: one load per cache
    /// line of a dense chunk, a lookup of the first entry of a sparse one. It brings the lines
    /// (and their pages' translations) into the caches, so that a later [`set`](Self::set) of
    /// them, made under the image's map lock, does not wait for memory there.
    pub fn warm(&self, lba: u64, blocks: u64) {
        const PER_LINE: u64 = 64 / 8;
        let end = lba.saturating_add(blocks).min(self.blocks);
        let mut l = lba;
        while l < end {
            let ci = (l >> CHUNK_SHIFT) as usize;
            let chunk_end = ((ci as u64 + 1) << CHUNK_SHIFT).min(end);
            match self.dir.get(ci) {
                Some(Chunk::Dense(d)) => {
                    let mut o = l & (CHUNK - 1);
                    while ((ci as u64) << CHUNK_SHIFT) | o < chunk_end {
                        std::hint::black_box(d.get(o as usize).copied());
                        o = (o | (PER_LINE - 1)) + 1;
                    }
                }
                Some(c @ Chunk::Sparse(_)) => {
                    std::hint::black_box(c.get(l & (CHUNK - 1)));
                }
                _ => {}
            }
            l = chunk_end;
        }
    }

    /// Sets the entry of `lba` (ignored when out of range).
    pub fn set(&mut self, lba: u64, v: u64) {
        if lba >= self.blocks {
            return;
        }
        let ci = (lba >> CHUNK_SHIFT) as usize;
        let o = lba & (CHUNK - 1);
        let (Some(chunk), Some(count)) = (self.dir.get_mut(ci), self.count.get_mut(ci)) else {
            return;
        };
        let before = chunk.bytes();
        if matches!(chunk, Chunk::Empty) {
            if v == 0 {
                return;
            }
            *chunk = Chunk::Sparse(Sparse::default());
        }
        let old = match chunk {
            Chunk::Empty => 0,
            Chunk::Sparse(s) => s.set(o as u16, v),
            Chunk::Dense(d) => match d.get_mut(o as usize) {
                Some(e) => std::mem::replace(e, v),
                None => 0,
            },
        };
        match (old != 0, v != 0) {
            (false, true) => *count += 1,
            (true, false) => *count -= 1,
            _ => {}
        }
        if old >= 2 {
            self.mapped -= 1;
        }
        if v >= 2 {
            self.mapped += 1;
        }
        let n = usize::from(*count);
        let new = match chunk {
            Chunk::Sparse(_) if n == 0 => Some(Chunk::Empty),
            Chunk::Dense(_) if n == 0 => Some(Chunk::Empty),
            Chunk::Sparse(s) if n >= TO_DENSE => {
                let mut d: Box<[u64; CHUNK as usize]> = Box::new([0u64; CHUNK as usize]);
                for (o, v) in s.iter() {
                    if let Some(e) = d.get_mut(o as usize) {
                        *e = v;
                    }
                }
                Some(Chunk::Dense(d))
            }
            Chunk::Dense(d) if n < TO_SPARSE => {
                let mut s = Sparse(Vec::with_capacity(n));
                for (o, &v) in d.iter().enumerate() {
                    if v != 0 {
                        s.set(o as u16, v);
                    }
                }
                Some(Chunk::Sparse(s))
            }
            _ => None,
        };
        if let Some(c) = new {
            *chunk = c;
        }
        self.chunk_bytes = self.chunk_bytes - before + chunk.bytes();
    }

    /// Maps `blocks` blocks from `lba` to PBAs `pba..`, or to `zero_value` when `pba` is None.
    pub fn set_range(&mut self, lba: u64, blocks: u64, pba: Option<u64>, zero_value: u64) {
        for i in 0..blocks {
            let v = match pba {
                Some(p) => p + i + 2,
                None => zero_value,
            };
            self.set(lba + i, v);
        }
    }

    /// Describes blocks `lba..lba + blocks` as extents in LBA order; unmapped blocks are
    /// `Base` when the image has a base, else `Zero`.
    pub fn extents(&self, lba: u64, blocks: u64, has_base: bool, out: &mut Vec<Extent>) {
        for i in 0..blocks {
            let l = lba + i;
            let v = self.get(l);
            match (out.last_mut(), v) {
                (Some(Extent::Mapped { pba, blocks: n }), v) if v >= 2 && pba.0 + *n + 2 == v => {
                    *n += 1
                }
                (Some(Extent::Zero { blocks: n }), v) if v == ZERO || (v == 0 && !has_base) => {
                    *n += 1
                }
                (Some(Extent::Base { lba: b, blocks: n }), 0) if has_base && b.0 + *n == l => {
                    *n += 1
                }
                (_, v) if v >= 2 => out.push(Extent::Mapped {
                    pba: Pba(v - 2),
                    blocks: 1,
                }),
                (_, 0) if has_base => out.push(Extent::Base {
                    lba: Lba(l),
                    blocks: 1,
                }),
                _ => out.push(Extent::Zero { blocks: 1 }),
            }
        }
    }

    /// The map as runs (first lba, count, first entry) of non-zero entries; entries >= 2
    /// increase by one per block within a run, zero markers repeat.
    pub fn runs(&self) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        let mut push = |l: u64, v: u64| {
            if let Some((rl, rc, re)) = out.last_mut() {
                let next = if *re >= 2 { *re + *rc } else { *re };
                if *rl + *rc == l && v == next {
                    *rc += 1;
                    return;
                }
            }
            out.push((l, 1, v));
        };
        for (ci, c) in self.dir.iter().enumerate() {
            let base = (ci as u64) << CHUNK_SHIFT;
            match c {
                Chunk::Empty => {}
                Chunk::Sparse(s) => s.iter().for_each(|(o, v)| push(base + o, v)),
                Chunk::Dense(d) => {
                    for (o, &v) in d.iter().enumerate() {
                        if v != 0 {
                            push(base + o as u64, v);
                        }
                    }
                }
            }
        }
        out
    }

    /// True when both maps hold the same entries.
    pub fn same_as(&self, other: &Map) -> bool {
        self.blocks == other.blocks && self.runs() == other.runs()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_are_allocated_lazily_and_freed() {
        let mut m = Map::new(1 << 20);
        let empty = m.memory_bytes();
        m.set(5, 10);
        assert_eq!(m.get(5), 10);
        assert_eq!(m.mapped(), 1);
        assert!(m.memory_bytes() > empty);
        m.set(5, 0);
        assert_eq!(m.memory_bytes(), empty);
        assert_eq!(m.mapped(), 0);
    }

    #[test]
    fn chunks_switch_between_sparse_and_dense_without_losing_entries() {
        let mut m = Map::new(3 * CHUNK);
        // Fill chunk 1 in a scattered order until it turns dense, then empty it again.
        let order: Vec<u64> = (0..CHUNK).map(|i| (i * 1237) % CHUNK).collect();
        for (k, &o) in order.iter().enumerate() {
            m.set(CHUNK + o, (1u64 << 40) + o + 2);
            assert_eq!(m.mapped(), k as u64 + 1);
        }
        assert!(matches!(m.dir[1], Chunk::Dense(_)));
        for o in 0..CHUNK {
            assert_eq!(m.get(CHUNK + o), (1u64 << 40) + o + 2);
        }
        assert_eq!(m.runs(), vec![(CHUNK, CHUNK, (1u64 << 40) + 2)]);
        for &o in &order[..3000] {
            m.set(CHUNK + o, 0);
        }
        assert!(matches!(m.dir[1], Chunk::Sparse(_)));
        for &o in &order[3000..] {
            assert_eq!(m.get(CHUNK + o), (1u64 << 40) + o + 2);
        }
        for &o in &order[3000..] {
            m.set(CHUNK + o, 0);
        }
        assert!(matches!(m.dir[1], Chunk::Empty));
        assert_eq!(m.mapped(), 0);
        assert_eq!(m.memory_bytes(), Map::new(3 * CHUNK).memory_bytes());
    }

    #[test]
    fn warming_reads_any_range_of_any_chunk_and_changes_nothing() {
        // Chunk 0 dense, chunk 1 sparse, chunk 2 empty, and a partial last chunk.
        let mut m = Map::new(3 * CHUNK + 100);
        m.set_range(0, CHUNK, Some(1000), ZERO);
        m.set_range(CHUNK + 10, 5, Some(50), ZERO);
        m.set(3 * CHUNK + 99, ZERO);
        assert!(matches!(m.dir[0], Chunk::Dense(_)));
        assert!(matches!(m.dir[1], Chunk::Sparse(_)));
        let (runs, mapped, bytes) = (m.runs(), m.mapped(), m.memory_bytes());
        for (lba, blocks) in [
            (0, 1),
            (7, 9),
            (CHUNK - 3, 20),
            (CHUNK + 10, 5),
            (0, 4 * CHUNK),
            (3 * CHUNK + 90, 1000),
            (4 * CHUNK, 8),
            (5, u64::MAX),
            (u64::MAX - 1, u64::MAX),
            (9, 0),
        ] {
            m.warm(lba, blocks);
        }
        assert_eq!(m.runs(), runs);
        assert_eq!((m.mapped(), m.memory_bytes()), (mapped, bytes));
        assert_eq!(m.get(3 * CHUNK + 99), ZERO);
    }

    #[test]
    fn scattered_entries_cost_about_eight_bytes_each() {
        let mut m = Map::new(1 << 24);
        let empty = m.memory_bytes();
        let mut x = 1u64;
        for _ in 0..100_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            m.set((x >> 20) % (1 << 24), 7);
        }
        let per = (m.memory_bytes() - empty) as f64 / m.mapped() as f64;
        assert!(per < 9.0, "{per} bytes per entry");
    }

    proptest::proptest! {
        #[test]
        fn map_agrees_with_a_plain_array(
            ops in proptest::collection::vec((0u64..3 * CHUNK, 0u64..4), 1..8000),
            spread in 1u64..7,
        ) {
            let mut m = Map::new(3 * CHUNK);
            let mut plain = vec![0u64; (3 * CHUNK) as usize];
            if spread == 1 {
                // Start from a full (dense) chunk so that removals turn it sparse again.
                for l in 0..CHUNK {
                    m.set(l, l + 5);
                    plain[l as usize] = l + 5;
                }
            }
            for (l, v) in ops {
                // Cluster the offsets for some cases so chunks fill up and turn dense.
                let l = if spread == 1 { l % CHUNK } else { (l * spread) % (3 * CHUNK) };
                let v = if v == 3 { 0 } else { v * 1000 + l };
                m.set(l, v);
                plain[l as usize] = v;
            }
            for (l, &v) in plain.iter().enumerate() {
                proptest::prop_assert_eq!(m.get(l as u64), v);
            }
            proptest::prop_assert_eq!(m.mapped(), plain.iter().filter(|&&v| v >= 2).count() as u64);
        }
    }

    #[test]
    fn extents_and_runs_merge_consecutive_blocks() {
        let mut m = Map::new(100);
        m.set_range(10, 4, Some(7), ZERO);
        m.set_range(14, 2, None, ZERO);
        let mut ex = Vec::new();
        m.extents(9, 8, true, &mut ex);
        assert_eq!(
            ex,
            vec![
                Extent::Base {
                    lba: Lba(9),
                    blocks: 1
                },
                Extent::Mapped {
                    pba: Pba(7),
                    blocks: 4
                },
                Extent::Zero { blocks: 2 },
                Extent::Base {
                    lba: Lba(16),
                    blocks: 1
                },
            ]
        );
        assert_eq!(m.runs(), vec![(10, 4, 9), (14, 2, 1)]);
    }
}

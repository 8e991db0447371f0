//! The in-memory LBA -> entry map, in lazily allocated chunks.
//!
//! Entry values: 0 = unmapped (reads the base image, or zeros without one), 1 = zero marker,
//! `p + 2` = data block (PBA) `p`. A chunk of [`CHUNK`] entries is allocated on first non-zero
//! store and freed when its last non-zero entry is cleared, so a sparse disk costs only what it
//! touches: at most 8 bytes per block of the chunks in use plus 8 bytes per chunk of directory.

use super::Extent;
use crate::units::{Lba, Pba};

/// Entries per chunk.
pub const CHUNK: u64 = 4096;
const CHUNK_SHIFT: u32 = 12;

/// Entry value for "reads as zeros" (over a base image).
pub const ZERO: u64 = 1;

struct Chunk {
    e: Box<[u64]>,
    nonzero: u32,
}

/// The map of one state of the disk (live, or a snapshot).
pub struct Map {
    dir: Vec<Option<Chunk>>,
    blocks: u64,
    chunks: usize,
    mapped: u64,
}

impl Map {
    /// An empty map of `blocks` blocks (callers bound `blocks`, see `format::MAX_BLOCKS`).
    pub fn new(blocks: u64) -> Map {
        let n = blocks.div_ceil(CHUNK) as usize;
        let mut dir = Vec::with_capacity(n);
        dir.resize_with(n, || None);
        Map {
            dir,
            blocks,
            chunks: 0,
            mapped: 0,
        }
    }

    /// Entries that map a data block.
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    /// Bytes of memory the map uses (directory plus allocated chunks).
    pub fn memory_bytes(&self) -> u64 {
        let dir = self.dir.capacity() * std::mem::size_of::<Option<Chunk>>();
        (dir as u64) + (self.chunks as u64) * CHUNK * 8
    }

    /// The entry of `lba` (0 when out of range).
    pub fn get(&self, lba: u64) -> u64 {
        let ci = (lba >> CHUNK_SHIFT) as usize;
        match self.dir.get(ci) {
            Some(Some(c)) => *c.e.get((lba & (CHUNK - 1)) as usize).unwrap_or(&0),
            _ => 0,
        }
    }

    /// Sets the entry of `lba` (ignored when out of range).
    pub fn set(&mut self, lba: u64, v: u64) {
        if lba >= self.blocks {
            return;
        }
        let ci = (lba >> CHUNK_SHIFT) as usize;
        let Some(slot) = self.dir.get_mut(ci) else {
            return;
        };
        if slot.is_none() {
            if v == 0 {
                return;
            }
            *slot = Some(Chunk {
                e: vec![0u64; CHUNK as usize].into_boxed_slice(),
                nonzero: 0,
            });
            self.chunks += 1;
        }
        let mut free = false;
        if let Some(c) = slot.as_mut() {
            if let Some(e) = c.e.get_mut((lba & (CHUNK - 1)) as usize) {
                let old = *e;
                *e = v;
                if old >= 2 {
                    self.mapped -= 1;
                }
                if v >= 2 {
                    self.mapped += 1;
                }
                match (old != 0, v != 0) {
                    (false, true) => c.nonzero += 1,
                    (true, false) => c.nonzero -= 1,
                    _ => {}
                }
                free = c.nonzero == 0;
            }
        }
        if free {
            *slot = None;
            self.chunks -= 1;
        }
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
        let mut i = 0;
        while i < blocks {
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
            i += 1;
        }
    }

    /// The map as runs (first lba, count, first entry) of non-zero entries; entries >= 2
    /// increase by one per block within a run, zero markers repeat.
    pub fn runs(&self) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for (ci, c) in self.dir.iter().enumerate() {
            let Some(c) = c else { continue };
            for (j, &v) in c.e.iter().enumerate() {
                if v == 0 {
                    continue;
                }
                let l = ((ci as u64) << CHUNK_SHIFT) + j as u64;
                if let Some((rl, rc, re)) = out.last_mut() {
                    let next = if *re >= 2 { *re + *rc } else { *re };
                    if *rl + *rc == l && v == next {
                        *rc += 1;
                        continue;
                    }
                }
                out.push((l, 1, v));
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
        assert_eq!(m.memory_bytes(), empty + CHUNK * 8);
        m.set(5, 0);
        assert_eq!(m.memory_bytes(), empty);
        assert_eq!(m.mapped(), 0);
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

//! The journal: a chain of segments holding checksum-chained records. [`Walker`] reads it
//! (recovery, history, state_at, check); [`Journal`] appends to it (buffered group commit).

use super::format::{
    check_seg_header, decode_record, encode_record, encode_seg_header, Decoded, Header, JPos,
    RecKind, Record, LINK_LEN, SEG_HEADER_SIZE,
};
use super::segmap::SegMap;
use super::shared::Shared;
use super::ImageError;

/// Why a walk stopped.
#[derive(Debug)]
pub enum Stop {
    /// Zero length field: the clean end.
    End,
    /// Bytes that are not a valid record at file offset `at`.
    Torn {
        /// File offset of the bad record.
        at: u64,
        /// What was wrong.
        what: String,
        /// Plausible length and stored crc of the bad record.
        plausible: Option<(usize, u32)>,
    },
    /// A link pointed to a segment whose header is not valid.
    BadSegment {
        /// File offset of the segment.
        at: u64,
        /// What was wrong.
        what: String,
    },
}

/// One step of a walk.
#[derive(Debug)]
pub enum Step {
    /// A valid record; the walker's position is now right after it.
    Rec(Record, usize),
    /// The walk ended.
    Stop(Stop),
}

/// Reads records from a journal position onwards.
pub struct Walker<'a> {
    sh: &'a Shared,
    /// Position of the next record.
    pub pos: JPos,
    seg: Vec<u8>,
    seg_ok: Result<(), String>,
    /// Seq of the state after the last record read.
    pub seq: u64,
    check_seq: bool,
}

impl<'a> Walker<'a> {
    /// Starts at `pos` (whose segment must be valid) with the state at `seq`.
    pub fn new(sh: &'a Shared, pos: JPos, seq: u64) -> Result<Walker<'a>, ImageError> {
        let seg = sh.read_segment(pos.seg_slot)?;
        let seg_ok = check_seg_header(&seg, &sh.uuid, pos.seg_index);
        if let Err(what) = seg_ok {
            return Err(ImageError::corrupt(
                sh.slot_off(pos.seg_slot).unwrap_or(0),
                what,
            ));
        }
        Ok(Walker {
            sh,
            pos,
            seg,
            seg_ok: Ok(()),
            seq,
            check_seq: true,
        })
    }

    /// A walker that checks no seq order (the look-ahead past a damaged record).
    fn lookahead(&self, offset: u64, crc: u32) -> Walker<'a> {
        Walker {
            sh: self.sh,
            pos: JPos {
                offset,
                crc,
                ..self.pos
            },
            seg: self.seg.clone(),
            seg_ok: Ok(()),
            seq: 0,
            check_seq: false,
        }
    }

    /// File offset of the current position.
    pub fn file_pos(&self) -> u64 {
        self.sh
            .slot_off(self.pos.seg_slot)
            .and_then(|o| o.checked_add(self.pos.offset))
            .unwrap_or(u64::MAX)
    }

    /// Reads the next record.
    pub fn next_step(&mut self) -> Result<Step, ImageError> {
        if let Err(what) = &self.seg_ok {
            return Ok(Step::Stop(Stop::BadSegment {
                at: self.sh.slot_off(self.pos.seg_slot).unwrap_or(0),
                what: what.clone(),
            }));
        }
        let at = self.file_pos();
        let rest = self.seg.get(self.pos.offset as usize..).unwrap_or(&[]);
        let (rec, len, crc) = match decode_record(rest, self.pos.crc) {
            Err(what) => return Err(ImageError::corrupt(at, what)),
            Ok(Decoded::End) => return Ok(Step::Stop(Stop::End)),
            Ok(Decoded::Invalid { what, plausible }) => {
                return Ok(Step::Stop(Stop::Torn {
                    at,
                    what,
                    plausible,
                }))
            }
            Ok(Decoded::Valid { rec, len, crc }) => (rec, len, crc),
        };
        self.validate(&rec)
            .map_err(|w| ImageError::corrupt(at, w))?;
        self.pos.offset += len as u64;
        self.pos.crc = crc;
        if rec.kind.changes_state() {
            self.seq = rec.seq;
        }
        if let Some((slot, idx)) = rec.link {
            let seg = self.sh.read_segment(slot)?;
            self.seg_ok = check_seg_header(&seg, &self.sh.uuid, idx);
            self.seg = seg;
            self.pos = JPos {
                seg_slot: slot,
                seg_index: idx,
                offset: SEG_HEADER_SIZE,
                crc,
            };
        }
        Ok(Step::Rec(rec, len))
    }

    fn validate(&self, rec: &Record) -> Result<(), String> {
        if self.check_seq {
            let ok = match rec.kind {
                RecKind::Write | RecKind::Discard | RecKind::WriteZeroes => rec.seq == self.seq + 1,
                // A flush marker vouches for a seq reached before it was appended.
                RecKind::Flush => rec.seq <= self.seq,
                // Links, epochs, relocations and reclaims follow the state they were appended in.
                RecKind::Link | RecKind::Epoch | RecKind::Relocate | RecKind::Reclaim => {
                    rec.seq == self.seq
                }
            };
            let want = if rec.kind.changes_state() {
                self.seq + 1
            } else {
                self.seq
            };
            if !ok {
                return Err(format!(
                    "journal record has seq {}, expected {want}",
                    rec.seq
                ));
            }
        }
        for p in &rec.pieces {
            let end = p.lba.checked_add(p.blocks);
            if p.blocks == 0 || end.map_or(true, |e| e > self.sh.blocks) {
                return Err(format!(
                    "journal record maps blocks {}+{} outside the disk",
                    p.lba, p.blocks
                ));
            }
            if let Some(pba) = p.pba {
                if pba
                    .checked_add(p.blocks)
                    .map_or(true, |e| e > self.sh.slot_limit())
                {
                    return Err(format!("journal record names impossible block id {pba}"));
                }
            } else if matches!(rec.kind, RecKind::Write | RecKind::Relocate) {
                return Err(format!("{:?} record with a zero piece", rec.kind).to_lowercase());
            }
        }
        if let Some((slot, idx)) = rec.link {
            if idx != self.pos.seg_index + 1
                || slot
                    .checked_add(self.sh.seg_slots)
                    .map_or(true, |e| e > self.sh.slot_limit())
            {
                return Err(format!("link record names an impossible segment {slot}"));
            }
        }
        Ok(())
    }

    /// After a torn record with a plausible length: is there, further on in the chain it would
    /// have seeded, a flush marker vouching for a seq beyond `last_seq` (the seq before the bad
    /// record)? If so the bad record was made durable by that flush and is now damaged.
    pub fn flush_marker_after(&self, plausible: Option<(usize, u32)>, last_seq: u64) -> bool {
        let Some((len, crc)) = plausible else {
            return false;
        };
        let mut w = self.lookahead(self.pos.offset + len as u64, crc);
        for _ in 0..1_000_000 {
            match w.next_step() {
                Ok(Step::Rec(r, _)) if r.kind == RecKind::Flush && r.seq > last_seq => return true,
                Ok(Step::Rec(..)) => {}
                _ => return false,
            }
        }
        false
    }
}

/// Size of the in-memory record buffer that triggers a write-out.
pub const BUF_LIMIT: usize = 256 * 1024;

/// The append side of the journal, kept under the image's journal mutex.
pub struct Journal {
    /// Position after the last appended (possibly still buffered) record.
    pub pos: JPos,
    /// Offset in the current segment up to which records are in the file.
    pub written: u64,
    /// Records not yet written to the file.
    pub buf: Vec<u8>,
    /// Seq of the latest state-changing record.
    pub seq: u64,
    /// Seq vouched for by the latest flush marker (everything up to it is durable).
    pub durable_seq: u64,
    /// Data bytes committed since the last sync.
    pub unsynced: u64,
    /// A background sync was requested for the current `unsynced` and has not completed.
    pub sync_requested: bool,
    /// Journal bytes since the last checkpoint.
    pub since_ckpt: u64,
    /// A write-out failed: acknowledged records may be lost; refuse further changes.
    pub failed: bool,
    /// The header as last written.
    pub hdr: Header,
    /// Which copy holds `hdr` (0 = A at offset 0, 1 = B).
    pub hdr_copy: u8,
    /// Number of segments in the chain.
    pub segments: u64,
    /// The current segment's mapping, through which records are written out (see
    /// [`super::segmap`]).
    pub map: SegMapState,
}

/// Whether the journal writes out through a mapping of its current segment.
pub enum SegMapState {
    /// Not mapped yet: the next write-out tries to map the current segment.
    Unmapped,
    /// Mapped: write-outs to that segment are stores into the mapping.
    Mapped(SegMap),
    /// Mapping the segment starting at this slot failed: write-outs to it use `pwrite`.
    Refused(u64),
    /// Never map (write-outs always use `pwrite`; tests of that path).
    #[cfg(test)]
    Off,
}

impl SegMapState {
    /// The mapping of the segment starting at `seg_slot`, made now if it is not mapped yet
    /// (and mapping it was not refused before).
    fn for_segment(&mut self, sh: &Shared, seg_slot: u64) -> Option<&mut SegMap> {
        let stale = match self {
            #[cfg(test)]
            SegMapState::Off => return None,
            SegMapState::Unmapped => true,
            SegMapState::Mapped(m) => m.seg_slot() != seg_slot,
            SegMapState::Refused(s) => *s != seg_slot,
        };
        if stale {
            *self = match sh
                .slot_off(seg_slot)
                .ok_or_else(|| std::io::Error::other("segment offset overflows"))
                .and_then(|off| SegMap::new(&sh.file, off, sh.seg_bytes(), seg_slot))
            {
                Ok(m) => SegMapState::Mapped(m),
                Err(e) => {
                    log::debug!(
                        "journal segment at slot {seg_slot} not mapped ({e}); using pwrite"
                    );
                    SegMapState::Refused(seg_slot)
                }
            };
        }
        match self {
            SegMapState::Mapped(m) => Some(m),
            _ => None,
        }
    }
}

impl Journal {
    /// Writes buffered records to the file (no sync): stores into the mapped segment, or
    /// `pwrite` where it is not mapped.
    pub fn write_out(&mut self, sh: &Shared) -> Result<(), ImageError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if let Some(m) = self.map.for_segment(sh, self.pos.seg_slot) {
            if m.write(self.written, &self.buf) {
                self.written += self.buf.len() as u64;
                self.buf.clear();
                return Ok(());
            }
        }
        let off = sh
            .slot_off(self.pos.seg_slot)
            .and_then(|o| o.checked_add(self.written))
            .ok_or_else(|| ImageError::corrupt(0, "journal offset overflows"))?;
        if let Err(e) = sh.pwrite(&self.buf, off) {
            self.failed = true;
            return Err(ImageError::io("cannot write the journal", e));
        }
        self.written += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Appends one record (rolling to a new segment first when it does not fit).
    pub fn append(&mut self, sh: &Shared, rec: &Record) -> Result<(), ImageError> {
        if self.failed {
            return Err(ImageError::Failed);
        }
        let (mut bytes, mut crc) = encode_record(rec, self.pos.crc);
        if self.pos.offset + (bytes.len() + LINK_LEN) as u64 > sh.seg_bytes() {
            self.roll(sh)?;
            (bytes, crc) = encode_record(rec, self.pos.crc);
            if self.pos.offset + (bytes.len() + LINK_LEN) as u64 > sh.seg_bytes() {
                return Err(ImageError::InvalidOptions(
                    "journal record larger than a segment".into(),
                ));
            }
        }
        self.pos.offset += bytes.len() as u64;
        self.pos.crc = crc;
        self.since_ckpt += bytes.len() as u64;
        self.buf.extend_from_slice(&bytes);
        if self.buf.len() >= BUF_LIMIT {
            self.write_out(sh)?;
        }
        Ok(())
    }

    /// Starts a new segment: allocate it, write it zeroed with its header, then link it.
    fn roll(&mut self, sh: &Shared) -> Result<(), ImageError> {
        let slot = sh.alloc(sh.seg_slots)?;
        let idx = self.pos.seg_index + 1;
        let mut seg = vec![0u8; sh.seg_bytes() as usize];
        let h = encode_seg_header(&sh.uuid, idx);
        if let Some(d) = seg.get_mut(..h.len()) {
            d.copy_from_slice(&h);
        }
        let off = sh
            .slot_off(slot)
            .ok_or_else(|| ImageError::corrupt(0, "segment offset overflows"))?;
        // Zero-filled so no stale bytes of earlier uses of these slots sit in the segment.
        // (No sync is needed: stale records cannot validate, every open re-seeds the chain.)
        if let Err(e) = sh.pwrite(&seg, off) {
            self.failed = true;
            return Err(ImageError::io("cannot write a new journal segment", e));
        }
        sh.add_meta(slot, sh.seg_slots);
        let link = Record {
            kind: RecKind::Link,
            seq: self.seq,
            pieces: Vec::new(),
            link: Some((slot, idx)),
            nonce: None,
            reclaim: None,
        };
        let (bytes, crc) = encode_record(&link, self.pos.crc);
        self.buf.extend_from_slice(&bytes);
        self.since_ckpt += bytes.len() as u64 + SEG_HEADER_SIZE;
        self.write_out(sh)?;
        self.pos = JPos {
            seg_slot: slot,
            seg_index: idx,
            offset: SEG_HEADER_SIZE,
            crc,
        };
        self.written = SEG_HEADER_SIZE;
        self.segments += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SegMapState;
    use crate::image::{lock, CreateOptions, Image, OpenMode};
    use crate::units::BlockSize;

    /// Writes enough 4 KiB blocks to roll the journal over several 1 MiB segments, each write
    /// written out like a batch's end, then forgets the image without closing it (no sync, no
    /// checkpoint: what a killed daemon leaves) and reopens it.
    fn writes_survive_without_a_close(mapped: bool) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let opts = CreateOptions {
            size: 4 << 20,
            block_size: BlockSize::DEFAULT,
            base: None,
        };
        let img = Image::create(&p, &opts).unwrap();
        if !mapped {
            lock(&img.journal).map = SegMapState::Off;
        }
        let blocks = (4u64 << 20) / 4096;
        let rounds = 40_000 / blocks;
        let mut expect = vec![0u8; 4 << 20];
        for r in 0..rounds {
            for b in 0..blocks {
                let lba = (b * 7 + r) % blocks;
                let fill = (r * 31 + lba) as u8 | 1;
                let data = vec![fill; 4096];
                img.write_at(lba * 4096, &data).unwrap();
                expect[(lba * 4096) as usize..][..4096].copy_from_slice(&data);
                img.write_out_journal().unwrap();
            }
        }
        {
            let j = lock(&img.journal);
            assert!(
                j.segments >= 2,
                "the journal rolled ({} segments)",
                j.segments
            );
            match (&j.map, mapped) {
                (SegMapState::Mapped(m), true) => assert_eq!(m.seg_slot(), j.pos.seg_slot),
                (SegMapState::Off, false) => {}
                _ => panic!("unexpected mapping state (mapped: {mapped})"),
            }
        }
        let seq = img.seq();
        std::mem::forget(img);
        let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
        assert_eq!(img.seq(), seq);
        let mut got = vec![0u8; 4 << 20];
        img.read_at(0, &mut got).unwrap();
        assert!(got == expect, "data read back differs (mapped: {mapped})");
    }

    #[test]
    fn records_written_out_through_the_mapping_survive_without_a_close() {
        writes_survive_without_a_close(true);
    }

    #[test]
    fn records_written_out_with_pwrite_survive_without_a_close() {
        writes_survive_without_a_close(false);
    }
}

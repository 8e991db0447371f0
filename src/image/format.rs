//! Byte-exact encodings of the on-disk structures (docs/format.md is their specification):
//! the A/B header, journal segment headers, journal records and checkpoints.
//!
//! Everything here is pure: bytes in, typed values or a description of what is wrong out.
//! No decoder indexes a slice with a length read from disk without a bounds check.

use crate::units::BlockSize;

/// Magic at offset 0 of each header copy.
pub const MAGIC: [u8; 8] = *b"RRROWIMG";
/// Magic of a journal segment header.
pub const SEG_MAGIC: [u8; 8] = *b"RRROWSEG";
/// Magic of a checkpoint.
pub const CKPT_MAGIC: [u8; 8] = *b"RRROWCKP";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Incompatible feature bit 0: history before a horizon may have been reclaimed. The journal
/// may hold reclaim records (kind 8) and every checkpoint carries a reclaimed section. A reader
/// that does not know it would take the holes of reclaimed blocks for damaged data.
pub const INCOMPAT_RECLAIM: u64 = 1;
/// Incompatible feature bit 1 (only with bit 0): reclaimed slots may be reused. A write or
/// relocation record may name slots that are reclaimed at that point of the journal: from
/// then on they hold that record's data and are no longer reclaimed, and every version that
/// named them before is gone. A reader that does not know it would read the new data as the
/// old version's.
pub const INCOMPAT_REUSE: u64 = 2;
/// Incompatible feature bits this build understands.
pub const KNOWN_INCOMPAT: u64 = INCOMPAT_RECLAIM | INCOMPAT_REUSE;
/// Size of one header copy.
pub const HEADER_SIZE: usize = 4096;
/// Offset of header copy B.
pub const HEADER_B_OFFSET: u64 = 4096;
/// Offset of the data area in images this build creates.
pub const DATA_OFFSET: u64 = 64 * 1024;
/// Maximum length of the base image path.
pub const MAX_BASE_PATH: usize = 1024;
/// Size of a journal segment header; records start right after it.
pub const SEG_HEADER_SIZE: u64 = 64;
/// Size of the fixed part of a record (length, kind, seq) before the payload.
pub const REC_HEAD: usize = 16;
/// Smallest valid record (no payload).
pub const REC_MIN: usize = REC_HEAD + 4;
/// Size of a link record.
pub const LINK_LEN: usize = REC_HEAD + 16 + 4;
/// Size of one piece in a write/discard/write-zeroes record.
pub const PIECE_LEN: usize = 32;
/// Size of one slot run in a reclaim record or a checkpoint's reclaimed section.
pub const RUN_LEN: usize = 16;
/// Marker in a piece's `pba` field for "reads as zeros".
pub const PIECE_ZERO: u64 = u64::MAX;
/// Bytes of a checkpoint before its runs.
pub const CKPT_HEAD: usize = 48;
/// Bytes per map run in a checkpoint.
pub const CKPT_RUN: usize = 24;
/// Bytes per metadata run in a checkpoint.
pub const CKPT_META: usize = 16;
/// Largest virtual disk, in blocks (keeps the map directory bounded).
pub const MAX_BLOCKS: u64 = 1 << 35;
/// "No checkpoint" in the header's checkpoint slot field.
pub const NO_CKPT: u64 = u64::MAX;

pub(crate) fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes(s.try_into().ok()?))
}

pub(crate) fn rd_u64(b: &[u8], off: usize) -> Option<u64> {
    let s = b.get(off..off.checked_add(8)?)?;
    Some(u64::from_le_bytes(s.try_into().ok()?))
}

fn put(b: &mut [u8], off: usize, v: &[u8]) {
    if let Some(d) = b.get_mut(off..off + v.len()) {
        d.copy_from_slice(v);
    }
}

/// A position in the journal: where the next record goes (or the replay starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JPos {
    /// First slot of the segment.
    pub seg_slot: u64,
    /// Index of the segment in the chain (0 = first).
    pub seg_index: u64,
    /// Byte offset inside the segment.
    pub offset: u64,
    /// Chain crc: the crc of the record before this position (the seed of the next one).
    pub crc: u32,
}

/// Where the latest checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CkptRef {
    /// First slot.
    pub slot: u64,
    /// Length in bytes.
    pub len: u64,
    /// crc32c of the whole checkpoint.
    pub crc: u32,
}

/// One decoded header copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Incompatible feature bits.
    pub incompat: u64,
    /// Compatible feature bits.
    pub compat: u64,
    /// Generation: the valid copy with the highest one wins.
    pub generation: u64,
    /// Block size.
    pub block_size: BlockSize,
    /// Journal segment length in slots.
    pub seg_slots: u32,
    /// Virtual size in bytes.
    pub size: u64,
    /// Image UUID.
    pub uuid: [u8; 16],
    /// Byte offset of slot 0.
    pub data_offset: u64,
    /// Slot of journal segment 0.
    pub first_seg_slot: u64,
    /// The latest checkpoint, if any.
    pub ckpt: Option<CkptRef>,
    /// Seq of the state the checkpoint holds (0 without a checkpoint).
    pub ckpt_seq: u64,
    /// Journal position right after the checkpointed state: replay starts here.
    pub jpos: JPos,
    /// Next free slot as of the checkpoint.
    pub next_free_slot: u64,
    /// Base image size in bytes (0 without a base).
    pub base_size: u64,
    /// Base image path as given at creation.
    pub base_path: Option<String>,
}

/// Why a header copy was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderFault {
    /// Wrong magic (the bytes found).
    BadMagic([u8; 8]),
    /// A newer format version.
    Version(u32),
    /// Unknown incompatible feature bits.
    Features(u64),
    /// Checksum or field validation failed.
    Invalid(String),
}

impl Header {
    /// The chain seed of an image's first journal record.
    pub fn chain_seed(uuid: &[u8; 16]) -> u32 {
        crate::crc::crc32c_append(crate::crc::crc32c(b"RRROWJNL"), uuid)
    }

    /// The position of the journal's very first record (byte 64 of segment 0), with its chain
    /// seed: where a walk of the whole journal starts.
    pub fn journal_start(&self) -> JPos {
        JPos {
            seg_slot: self.first_seg_slot,
            seg_index: 0,
            offset: SEG_HEADER_SIZE,
            crc: Self::chain_seed(&self.uuid),
        }
    }

    /// Bytes per journal segment.
    pub fn seg_bytes(&self) -> u64 {
        u64::from(self.seg_slots) * self.block_size.bytes_u64()
    }

    /// Number of blocks of the virtual disk (the last one may be partial).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(self.block_size.bytes_u64())
    }

    /// Encodes one header copy.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        put(&mut b, 0, &MAGIC);
        put(&mut b, 8, &VERSION.to_le_bytes());
        put(&mut b, 12, &(HEADER_SIZE as u32).to_le_bytes());
        put(&mut b, 16, &self.incompat.to_le_bytes());
        put(&mut b, 24, &self.compat.to_le_bytes());
        put(&mut b, 32, &self.generation.to_le_bytes());
        put(&mut b, 40, &self.block_size.bytes().to_le_bytes());
        put(&mut b, 44, &self.seg_slots.to_le_bytes());
        put(&mut b, 48, &self.size.to_le_bytes());
        put(&mut b, 56, &self.uuid);
        put(&mut b, 72, &self.data_offset.to_le_bytes());
        put(&mut b, 80, &self.first_seg_slot.to_le_bytes());
        let (slot, len, crc) = match self.ckpt {
            Some(c) => (c.slot, c.len, c.crc),
            None => (NO_CKPT, 0, 0),
        };
        put(&mut b, 88, &slot.to_le_bytes());
        put(&mut b, 96, &len.to_le_bytes());
        put(&mut b, 104, &crc.to_le_bytes());
        put(&mut b, 108, &self.jpos.crc.to_le_bytes());
        put(&mut b, 112, &self.ckpt_seq.to_le_bytes());
        put(&mut b, 120, &self.jpos.seg_slot.to_le_bytes());
        put(&mut b, 128, &self.jpos.seg_index.to_le_bytes());
        put(&mut b, 136, &self.jpos.offset.to_le_bytes());
        put(&mut b, 144, &self.next_free_slot.to_le_bytes());
        put(&mut b, 152, &self.base_size.to_le_bytes());
        let path = self.base_path.as_deref().unwrap_or("").as_bytes();
        let plen = path.len().min(MAX_BASE_PATH);
        put(&mut b, 160, &(plen as u32).to_le_bytes());
        put(&mut b, 168, path.get(..plen).unwrap_or(&[]));
        let crc = crate::crc::crc32c(&b[..HEADER_SIZE - 4]);
        put(&mut b, HEADER_SIZE - 4, &crc.to_le_bytes());
        b
    }

    /// Decodes and validates one header copy.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderFault> {
        let inv = |s: &str| HeaderFault::Invalid(s.to_string());
        let magic: [u8; 8] = b
            .get(0..8)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| inv("short header"))?;
        if magic != MAGIC {
            return Err(HeaderFault::BadMagic(magic));
        }
        let version = rd_u32(b, 8).ok_or_else(|| inv("short header"))?;
        if b.len() < HEADER_SIZE {
            return Err(inv("short header"));
        }
        let stored = rd_u32(b, HEADER_SIZE - 4).unwrap_or(0);
        let crc_ok = crate::crc::crc32c(b.get(..HEADER_SIZE - 4).unwrap_or(&[])) == stored;
        if version > VERSION {
            // A future version may lay the rest out differently: report the version first.
            return Err(HeaderFault::Version(version));
        }
        if !crc_ok {
            return Err(inv("header checksum mismatch"));
        }
        if version != VERSION {
            return Err(inv(&format!("unknown format version {version}")));
        }
        let g64 = |o| rd_u64(b, o).unwrap_or(0);
        let g32 = |o| rd_u32(b, o).unwrap_or(0);
        let incompat = g64(16);
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(HeaderFault::Features(incompat & !KNOWN_INCOMPAT));
        }
        if incompat & INCOMPAT_REUSE != 0 && incompat & INCOMPAT_RECLAIM == 0 {
            return Err(inv("the reuse feature is set without the reclaim feature"));
        }
        let block_size = BlockSize::new(g32(40))
            .ok_or_else(|| inv(&format!("invalid block size {}", g32(40))))?;
        let seg_slots = g32(44);
        let bs = block_size.bytes_u64();
        let seg_bytes = u64::from(seg_slots) * bs;
        if seg_slots == 0 || !(4096..=(16 << 20)).contains(&seg_bytes) {
            return Err(inv(&format!(
                "invalid journal segment length {seg_slots} slots"
            )));
        }
        let size = g64(48);
        if size == 0 || size % 512 != 0 || size.div_ceil(bs) > MAX_BLOCKS {
            return Err(inv(&format!("invalid virtual size {size}")));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(b.get(56..72).unwrap_or(&[0; 16]));
        let data_offset = g64(72);
        if data_offset < 2 * HEADER_SIZE as u64 || data_offset % 512 != 0 || data_offset > 1 << 30 {
            return Err(inv(&format!("invalid data area offset {data_offset}")));
        }
        let ckpt_slot = g64(88);
        let ckpt = if ckpt_slot == NO_CKPT {
            None
        } else {
            Some(CkptRef {
                slot: ckpt_slot,
                len: g64(96),
                crc: g32(104),
            })
        };
        let plen = g32(160) as usize;
        if plen > MAX_BASE_PATH {
            return Err(inv("base path longer than 1024 bytes"));
        }
        let base_path = if plen == 0 {
            None
        } else {
            let raw = b.get(168..168 + plen).ok_or_else(|| inv("short header"))?;
            Some(
                std::str::from_utf8(raw)
                    .map_err(|_| inv("base path is not UTF-8"))?
                    .to_string(),
            )
        };
        let h = Header {
            incompat,
            compat: g64(24),
            generation: g64(32),
            block_size,
            seg_slots,
            size,
            uuid,
            data_offset,
            first_seg_slot: g64(80),
            ckpt,
            ckpt_seq: g64(112),
            jpos: JPos {
                seg_slot: g64(120),
                seg_index: g64(128),
                offset: g64(136),
                crc: g32(108),
            },
            next_free_slot: g64(144),
            base_size: g64(152),
            base_path,
        };
        if h.jpos.offset < SEG_HEADER_SIZE || h.jpos.offset + LINK_LEN as u64 > seg_bytes {
            return Err(inv("journal position outside its segment"));
        }
        let slot_limit = ((i64::MAX as u64) / bs).min((1 << 48) - 4);
        if h.next_free_slot > slot_limit
            || h.jpos.seg_slot.saturating_add(u64::from(seg_slots)) > h.next_free_slot
            || h.first_seg_slot.saturating_add(u64::from(seg_slots)) > h.next_free_slot
        {
            return Err(inv("slot numbers beyond the allocated area"));
        }
        if let Some(c) = h.ckpt {
            if c.len < (CKPT_HEAD + 4) as u64
                || c.len > 1 << 40
                || c.slot.saturating_add(c.len.div_ceil(bs)) > h.next_free_slot
            {
                return Err(inv("checkpoint location out of bounds"));
            }
        }
        Ok(h)
    }
}

/// Encodes a journal segment header.
pub fn encode_seg_header(uuid: &[u8; 16], seg_index: u64) -> [u8; SEG_HEADER_SIZE as usize] {
    let mut b = [0u8; SEG_HEADER_SIZE as usize];
    put(&mut b, 0, &SEG_MAGIC);
    put(&mut b, 8, uuid);
    put(&mut b, 24, &seg_index.to_le_bytes());
    let crc = crate::crc::crc32c(&b[..60]);
    put(&mut b, 60, &crc.to_le_bytes());
    b
}

/// Validates a journal segment header; returns what is wrong.
pub fn check_seg_header(b: &[u8], uuid: &[u8; 16], seg_index: u64) -> Result<(), String> {
    if b.get(0..8) != Some(&SEG_MAGIC[..]) {
        return Err("journal segment header has a bad magic".into());
    }
    let stored = rd_u32(b, 60).ok_or("short segment header")?;
    if crate::crc::crc32c(b.get(..60).ok_or("short segment header")?) != stored {
        return Err("journal segment header checksum mismatch".into());
    }
    if b.get(8..24) != Some(&uuid[..]) {
        return Err("journal segment belongs to another image".into());
    }
    let idx = rd_u64(b, 24).ok_or("short segment header")?;
    if idx != seg_index {
        return Err(format!(
            "journal segment has index {idx}, expected {seg_index}"
        ));
    }
    Ok(())
}

/// Record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecKind {
    /// Data written to new blocks.
    Write,
    /// A discard (ranges read as zeros afterwards).
    Discard,
    /// A write-zeroes.
    WriteZeroes,
    /// Everything before this record was made durable.
    Flush,
    /// The journal continues in another segment.
    Link,
    /// A read-write open started appending here (a random nonce re-seeds the chain).
    Epoch,
    /// Content-preserving relocation: LBAs that already held this content are re-pointed at
    /// a new, physically contiguous copy. Takes no seq (the disk's content is unchanged).
    Relocate,
    /// Data blocks whose versions no retained state needs were given back to the file system
    /// (holes punched); states before the record's horizon can no longer be rebuilt.
    Reclaim,
}

impl RecKind {
    fn code(self) -> u8 {
        match self {
            RecKind::Write => 1,
            RecKind::Discard => 2,
            RecKind::WriteZeroes => 3,
            RecKind::Flush => 4,
            RecKind::Link => 5,
            RecKind::Epoch => 6,
            RecKind::Relocate => 7,
            RecKind::Reclaim => 8,
        }
    }

    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => RecKind::Write,
            2 => RecKind::Discard,
            3 => RecKind::WriteZeroes,
            4 => RecKind::Flush,
            5 => RecKind::Link,
            6 => RecKind::Epoch,
            7 => RecKind::Relocate,
            8 => RecKind::Reclaim,
            _ => return None,
        })
    }

    /// True for kinds that take a new seq and change the map.
    pub fn changes_state(self) -> bool {
        matches!(
            self,
            RecKind::Write | RecKind::Discard | RecKind::WriteZeroes
        )
    }

    /// True for kinds whose pieces change the map: the state-changing kinds and relocations.
    pub fn maps(self) -> bool {
        self.changes_state() || self == RecKind::Relocate
    }
}

/// One LBA range of an operation: mapped to new blocks, or to zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First LBA.
    pub lba: u64,
    /// Number of blocks.
    pub blocks: u64,
    /// First PBA of the new blocks, or `None` for "reads as zeros".
    pub pba: Option<u64>,
    /// crc32c of the data written to the new blocks (0 for zero pieces).
    pub data_crc: u32,
}

/// A decoded journal record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Kind.
    pub kind: RecKind,
    /// Seq (for flush and link: the seq of the state they follow).
    pub seq: u64,
    /// Pieces (write, discard, write-zeroes).
    pub pieces: Vec<Piece>,
    /// Link target: (segment slot, segment index).
    pub link: Option<(u64, u64)>,
    /// Epoch nonce.
    pub nonce: Option<[u8; 16]>,
    /// Reclaim: the horizon and the slot runs given back.
    pub reclaim: Option<Reclaimed>,
}

impl Record {
    /// A flush marker vouching for every record up to state `seq` (and their data).
    pub fn flush_marker(seq: u64) -> Record {
        Record {
            kind: RecKind::Flush,
            seq,
            pieces: Vec::new(),
            link: None,
            nonce: None,
            reclaim: None,
        }
    }
}

/// What a reclaim record (or a checkpoint's reclaimed section) holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Reclaimed {
    /// The history horizon: states before this seq can no longer be rebuilt (0 = none).
    pub horizon: u64,
    /// (first slot, count) runs of data blocks whose content is gone.
    pub runs: Vec<(u64, u64)>,
}

/// Encodes a record with the chain seed `prev_crc`; returns the bytes and the record's crc.
pub fn encode_record(rec: &Record, prev_crc: u32) -> (Vec<u8>, u32) {
    let payload = match rec.kind {
        RecKind::Write | RecKind::Discard | RecKind::WriteZeroes | RecKind::Relocate => {
            8 + PIECE_LEN * rec.pieces.len()
        }
        RecKind::Link | RecKind::Epoch => 16,
        RecKind::Flush => 0,
        RecKind::Reclaim => 16 + RUN_LEN * rec.reclaim.as_ref().map_or(0, |r| r.runs.len()),
    };
    let len = REC_HEAD + payload + 4;
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(len as u32).to_le_bytes());
    b.extend_from_slice(&[rec.kind.code(), 0, 0, 0]);
    b.extend_from_slice(&rec.seq.to_le_bytes());
    match rec.kind {
        RecKind::Write | RecKind::Discard | RecKind::WriteZeroes | RecKind::Relocate => {
            b.extend_from_slice(&(rec.pieces.len() as u32).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            for p in &rec.pieces {
                b.extend_from_slice(&p.lba.to_le_bytes());
                b.extend_from_slice(&p.blocks.to_le_bytes());
                b.extend_from_slice(&p.pba.unwrap_or(PIECE_ZERO).to_le_bytes());
                b.extend_from_slice(&p.data_crc.to_le_bytes());
                b.extend_from_slice(&0u32.to_le_bytes());
            }
        }
        RecKind::Link => {
            let (slot, idx) = rec.link.unwrap_or((0, 0));
            b.extend_from_slice(&slot.to_le_bytes());
            b.extend_from_slice(&idx.to_le_bytes());
        }
        RecKind::Epoch => b.extend_from_slice(&rec.nonce.unwrap_or_default()),
        RecKind::Flush => {}
        RecKind::Reclaim => {
            let r = rec.reclaim.clone().unwrap_or_default();
            b.extend_from_slice(&r.horizon.to_le_bytes());
            b.extend_from_slice(&(r.runs.len() as u32).to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            for (s, c) in r.runs {
                b.extend_from_slice(&s.to_le_bytes());
                b.extend_from_slice(&c.to_le_bytes());
            }
        }
    }
    let crc = crate::crc::crc32c_append(prev_crc, &b);
    b.extend_from_slice(&crc.to_le_bytes());
    (b, crc)
}

/// Outcome of decoding the bytes at a journal position.
#[derive(Debug)]
pub enum Decoded {
    /// A valid record of `len` bytes whose chain crc is `crc`.
    Valid {
        /// The record.
        rec: Record,
        /// Its length in bytes.
        len: usize,
        /// Its crc (the seed of the next record).
        crc: u32,
    },
    /// Zero length: the clean end of the journal.
    End,
    /// Bytes that do not form a valid record (torn write or damage). `len` is the length
    /// field when it is plausible and `stored_crc` the crc field it points at.
    Invalid {
        /// What is wrong.
        what: String,
        /// Plausible length and stored crc, for the look-ahead.
        plausible: Option<(usize, u32)>,
    },
}

/// Decodes the record at the start of `b` with chain seed `prev_crc`. Checksum failures are
/// `Invalid`; a record whose checksum is right but whose content is malformed is an `Err`
/// (that is never a torn write).
pub fn decode_record(b: &[u8], prev_crc: u32) -> Result<Decoded, String> {
    let Some(len) = rd_u32(b, 0) else {
        return Ok(Decoded::End);
    };
    if len == 0 {
        return Ok(Decoded::End);
    }
    let len = len as usize;
    if len < REC_MIN || len > b.len() {
        return Ok(Decoded::Invalid {
            what: format!("record length {len} is impossible here"),
            plausible: None,
        });
    }
    let body = b.get(..len - 4).unwrap_or(&[]);
    let stored = rd_u32(b, len - 4).unwrap_or(0);
    let crc = crate::crc::crc32c_append(prev_crc, body);
    if crc != stored {
        return Ok(Decoded::Invalid {
            what: "record checksum mismatch".into(),
            plausible: Some((len, stored)),
        });
    }
    let kind_code = *b.get(4).unwrap_or(&0);
    let kind =
        RecKind::from_code(kind_code).ok_or_else(|| format!("unknown record kind {kind_code}"))?;
    let seq = rd_u64(b, 8).unwrap_or(0);
    let payload = body.get(REC_HEAD..).unwrap_or(&[]);
    let mut rec = Record {
        kind,
        seq,
        pieces: Vec::new(),
        link: None,
        nonce: None,
        reclaim: None,
    };
    match kind {
        RecKind::Write | RecKind::Discard | RecKind::WriteZeroes | RecKind::Relocate => {
            let n = rd_u32(payload, 0).ok_or("record too short for its piece count")? as usize;
            if payload.len() != 8 + n.saturating_mul(PIECE_LEN) || n == 0 {
                return Err(format!("record with {n} pieces has the wrong length {len}"));
            }
            for i in 0..n {
                let o = 8 + i * PIECE_LEN;
                let g = |d| rd_u64(payload, o + d).unwrap_or(0);
                let pba = g(16);
                rec.pieces.push(Piece {
                    lba: g(0),
                    blocks: g(8),
                    pba: (pba != PIECE_ZERO).then_some(pba),
                    data_crc: rd_u32(payload, o + 24).unwrap_or(0),
                });
            }
        }
        RecKind::Link => {
            if payload.len() != 16 {
                return Err("link record has the wrong length".into());
            }
            rec.link = Some((
                rd_u64(payload, 0).unwrap_or(0),
                rd_u64(payload, 8).unwrap_or(0),
            ));
        }
        RecKind::Epoch => {
            let n: [u8; 16] = payload
                .try_into()
                .map_err(|_| "epoch record has the wrong length".to_string())?;
            rec.nonce = Some(n);
        }
        RecKind::Flush => {
            if !payload.is_empty() {
                return Err("flush record has a payload".into());
            }
        }
        RecKind::Reclaim => {
            let horizon = rd_u64(payload, 0).ok_or("reclaim record too short")?;
            let n = rd_u32(payload, 8).ok_or("reclaim record too short")? as usize;
            if payload.len() != 16 + n.saturating_mul(RUN_LEN) || n == 0 {
                return Err(format!(
                    "reclaim record with {n} runs has the wrong length {len}"
                ));
            }
            if horizon > seq {
                return Err(format!(
                    "reclaim record at seq {seq} names the later horizon {horizon}"
                ));
            }
            let runs = decode_runs(payload.get(16..).unwrap_or_default(), n)?;
            rec.reclaim = Some(Reclaimed { horizon, runs });
        }
    }
    Ok(Decoded::Valid { rec, len, crc })
}

/// Decodes `n` slot runs; each must be non-empty, not overflow, and start after the end of
/// the previous one (sorted, disjoint).
fn decode_runs(b: &[u8], n: usize) -> Result<Vec<(u64, u64)>, String> {
    let mut runs = Vec::with_capacity(n);
    let mut prev_end = 0u64;
    for i in 0..n {
        let s = rd_u64(b, i * RUN_LEN).ok_or("reclaimed runs are truncated")?;
        let c = rd_u64(b, i * RUN_LEN + 8).ok_or("reclaimed runs are truncated")?;
        let end = s
            .checked_add(c)
            .filter(|_| c > 0)
            .ok_or_else(|| format!("reclaimed run {s}+{c} is impossible"))?;
        if i > 0 && s < prev_end {
            return Err(format!("reclaimed run {s}+{c} is out of order"));
        }
        prev_end = end;
        runs.push((s, c));
    }
    Ok(runs)
}

/// A checkpoint: the map as runs plus the metadata slot runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Seq of the state.
    pub seq: u64,
    /// (first lba, count, first map entry); entries >= 2 increase by one per block.
    pub runs: Vec<(u64, u64, u64)>,
    /// (first slot, count) of every metadata run (journal segments, checkpoints).
    pub meta: Vec<(u64, u64)>,
    /// The reclaimed section: present exactly when the header has [`INCOMPAT_RECLAIM`].
    pub reclaimed: Option<Reclaimed>,
}

impl Checkpoint {
    /// Encoded length for `runs` and `meta` counts, and `reclaimed` runs when the reclaimed
    /// section is present.
    pub fn encoded_len(runs: usize, meta: usize, reclaimed: Option<usize>) -> usize {
        CKPT_HEAD
            + runs * CKPT_RUN
            + meta * CKPT_META
            + reclaimed.map_or(0, |n| 16 + n * RUN_LEN)
            + 4
    }

    /// Encodes; returns the bytes and their crc (the trailing field).
    pub fn encode(&self, uuid: &[u8; 16]) -> (Vec<u8>, u32) {
        let mut b = Vec::with_capacity(Self::encoded_len(
            self.runs.len(),
            self.meta.len(),
            self.reclaimed.as_ref().map(|r| r.runs.len()),
        ));
        b.extend_from_slice(&CKPT_MAGIC);
        b.extend_from_slice(uuid);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        b.extend_from_slice(&(self.meta.len() as u64).to_le_bytes());
        for &(l, c, e) in &self.runs {
            b.extend_from_slice(&l.to_le_bytes());
            b.extend_from_slice(&c.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
        }
        for &(s, c) in &self.meta {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&c.to_le_bytes());
        }
        if let Some(r) = &self.reclaimed {
            b.extend_from_slice(&r.horizon.to_le_bytes());
            b.extend_from_slice(&(r.runs.len() as u64).to_le_bytes());
            for &(s, c) in &r.runs {
                b.extend_from_slice(&s.to_le_bytes());
                b.extend_from_slice(&c.to_le_bytes());
            }
        }
        let crc = crate::crc::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        (b, crc)
    }

    /// Decodes and validates the structure (not the values against the image). `reclaim`:
    /// the header has [`INCOMPAT_RECLAIM`], so the reclaimed section follows the metadata runs.
    pub fn decode(b: &[u8], uuid: &[u8; 16], reclaim: bool) -> Result<Checkpoint, String> {
        if b.len() < CKPT_HEAD + 4 {
            return Err("checkpoint too short".into());
        }
        let body = b.get(..b.len() - 4).unwrap_or(&[]);
        let stored = rd_u32(b, b.len() - 4).unwrap_or(0);
        if crate::crc::crc32c(body) != stored {
            return Err("checkpoint checksum mismatch".into());
        }
        if b.get(0..8) != Some(&CKPT_MAGIC[..]) {
            return Err("checkpoint has a bad magic".into());
        }
        if b.get(8..24) != Some(&uuid[..]) {
            return Err("checkpoint belongs to another image".into());
        }
        let seq = rd_u64(b, 24).unwrap_or(0);
        let nr = rd_u64(b, 32).unwrap_or(0);
        let nm = rd_u64(b, 40).unwrap_or(0);
        let fixed = (nr as u128) * CKPT_RUN as u128
            + (nm as u128) * CKPT_META as u128
            + (CKPT_HEAD + 4) as u128;
        let mut want = fixed;
        let mut nrec = 0u64;
        if reclaim {
            let at = usize::try_from(fixed - 4)
                .ok()
                .filter(|&a| a + 16 <= body.len())
                .ok_or("checkpoint too short for its reclaimed section")?;
            nrec = rd_u64(b, at + 8).unwrap_or(0);
            want += 16 + (nrec as u128) * RUN_LEN as u128;
        }
        if want != b.len() as u128 {
            return Err(format!(
                "checkpoint of {} bytes cannot hold {nr} runs and {nm} metadata runs",
                b.len()
            ));
        }
        let mut c = Checkpoint {
            seq,
            runs: Vec::with_capacity(nr as usize),
            meta: Vec::with_capacity(nm as usize),
            reclaimed: None,
        };
        let mut o = CKPT_HEAD;
        for _ in 0..nr {
            let g = |d| rd_u64(b, o + d).unwrap_or(0);
            c.runs.push((g(0), g(8), g(16)));
            o += CKPT_RUN;
        }
        for _ in 0..nm {
            let g = |d| rd_u64(b, o + d).unwrap_or(0);
            c.meta.push((g(0), g(8)));
            o += CKPT_META;
        }
        if reclaim {
            let horizon = rd_u64(b, o).unwrap_or(0);
            if horizon > seq {
                return Err(format!(
                    "checkpoint of seq {seq} names the later history horizon {horizon}"
                ));
            }
            let runs = decode_runs(b.get(o + 16..).unwrap_or_default(), nrec as usize)?;
            c.reclaimed = Some(Reclaimed { horizon, runs });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            incompat: 0,
            compat: 0,
            generation: 7,
            block_size: BlockSize::DEFAULT,
            seg_slots: 256,
            size: 1 << 30,
            uuid: [9; 16],
            data_offset: DATA_OFFSET,
            first_seg_slot: 0,
            ckpt: Some(CkptRef {
                slot: 300,
                len: 100,
                crc: 5,
            }),
            ckpt_seq: 12,
            jpos: JPos {
                seg_slot: 0,
                seg_index: 0,
                offset: 200,
                crc: 77,
            },
            next_free_slot: 400,
            base_size: 4096,
            base_path: Some("/tmp/base.raw".into()),
        }
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let h = hdr();
        let mut b = h.encode();
        assert_eq!(Header::decode(&b).unwrap(), h);
        b[50] ^= 1;
        assert!(matches!(Header::decode(&b), Err(HeaderFault::Invalid(_))));
        b[0] = b'X';
        assert!(matches!(Header::decode(&b), Err(HeaderFault::BadMagic(_))));
    }

    #[test]
    fn future_version_is_reported_before_the_checksum() {
        let mut b = hdr().encode();
        b[8] = 9;
        assert_eq!(Header::decode(&b), Err(HeaderFault::Version(9)));
    }

    #[test]
    fn records_chain_their_checksums() {
        let r = Record {
            kind: RecKind::Write,
            seq: 3,
            pieces: vec![Piece {
                lba: 1,
                blocks: 2,
                pba: Some(40),
                data_crc: 9,
            }],
            link: None,
            nonce: None,
            reclaim: None,
        };
        let (b, crc) = encode_record(&r, 11);
        match decode_record(&b, 11).unwrap() {
            Decoded::Valid { rec, len, crc: c } => {
                assert_eq!(rec, r);
                assert_eq!(len, b.len());
                assert_eq!(c, crc);
            }
            other => panic!("unexpected {other:?}"),
        }
        // The same bytes with another seed never validate.
        assert!(matches!(
            decode_record(&b, 12).unwrap(),
            Decoded::Invalid { .. }
        ));
    }

    #[test]
    fn checkpoint_round_trips() {
        let c = Checkpoint {
            seq: 5,
            runs: vec![(0, 10, 2), (20, 3, 1)],
            meta: vec![(0, 256)],
            reclaimed: None,
        };
        let (b, _) = c.encode(&[1; 16]);
        assert_eq!(Checkpoint::decode(&b, &[1; 16], false).unwrap(), c);
        // A reader expecting the reclaimed section finds none.
        assert!(Checkpoint::decode(&b, &[1; 16], true).is_err());
        let mut bad = b.clone();
        bad[30] ^= 4;
        assert!(Checkpoint::decode(&bad, &[1; 16], false).is_err());
    }

    #[test]
    fn checkpoint_with_a_reclaimed_section_round_trips() {
        let c = Checkpoint {
            seq: 9,
            runs: vec![(0, 10, 2)],
            meta: vec![(0, 256)],
            reclaimed: Some(Reclaimed {
                horizon: 7,
                runs: vec![(300, 4), (310, 1)],
            }),
        };
        let (b, _) = c.encode(&[1; 16]);
        assert_eq!(b.len(), Checkpoint::encoded_len(1, 1, Some(2)));
        assert_eq!(Checkpoint::decode(&b, &[1; 16], true).unwrap(), c);
        assert!(Checkpoint::decode(&b, &[1; 16], false).is_err());
        // A horizon beyond the checkpoint's own state is impossible.
        let mut later = c.clone();
        later.reclaimed = Some(Reclaimed {
            horizon: 10,
            runs: vec![(300, 4)],
        });
        let (b, _) = later.encode(&[1; 16]);
        assert!(Checkpoint::decode(&b, &[1; 16], true).is_err());
    }

    #[test]
    fn reclaim_records_round_trip_and_reject_impossible_runs() {
        let r = Record {
            kind: RecKind::Reclaim,
            seq: 12,
            pieces: Vec::new(),
            link: None,
            nonce: None,
            reclaim: Some(Reclaimed {
                horizon: 10,
                runs: vec![(256, 8), (300, 2)],
            }),
        };
        let (b, _) = encode_record(&r, 5);
        match decode_record(&b, 5).unwrap() {
            Decoded::Valid { rec, .. } => assert_eq!(rec, r),
            other => panic!("unexpected {other:?}"),
        }
        for (horizon, runs) in [
            (13, vec![(256, 8)]),           // horizon after the record's own state
            (10, vec![(300, 2), (256, 8)]), // out of order
            (10, vec![(256, 8), (260, 1)]), // overlapping
            (10, vec![(256, 0)]),           // empty run
            (10, vec![(u64::MAX - 1, 4)]),  // overflowing run
        ] {
            let bad = Record {
                reclaim: Some(Reclaimed { horizon, runs }),
                ..r.clone()
            };
            let (b, _) = encode_record(&bad, 5);
            assert!(decode_record(&b, 5).is_err(), "{bad:?} decoded");
        }
    }
}

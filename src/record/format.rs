//! The record log's bytes: header, checksummed frames, and the record encoding.
//!
//! This module is the executable form of `docs/record-log.md`; the two must agree byte for
//! byte. A log is an 80-byte header followed by frames. A frame is
//! `[payload length: u32 LE][crc32c: u32 LE][payload]`, the checksum covering the four length
//! bytes and the payload, and the payload is a sequence of records. Records are compact:
//! LEB128 varints, zigzag deltas for sectors, indexes, seqs and PBAs against what the previous
//! record of the same frame predicts. The delta state restarts at every frame, so each frame
//! decodes on its own and a torn tail costs at most one frame.

use crate::image::Extent;
use crate::iobuf::{copy_out, IoSeg};
use crate::units::{BlockSize, Lba, Pba, Seq};

use super::RecordError;

/// The eight bytes a record log starts with.
pub const MAGIC: [u8; 8] = *b"RRROWLOG";
/// The format version this build writes (and the highest it reads).
pub const VERSION: u16 = 1;
/// Size of the header in bytes.
pub const HEADER_LEN: usize = 80;
/// Size of a frame header (payload length and checksum) in bytes.
pub const FRAME_HEADER_LEN: usize = 8;
/// Largest frame payload a reader accepts (1 GiB). Writers cut frames far earlier.
pub const MAX_FRAME_PAYLOAD: u32 = 1 << 30;
/// Largest read a full-mode record carries (64 MiB), so that a frame stays far below
/// [`MAX_FRAME_PAYLOAD`] and a hostile guest cannot make the recorder allocate without bound.
pub const MAX_READ_DATA: u64 = 64 << 20;
/// Bytes of the hash kept for a written request's data (128 bits; which hash the log header's
/// [`WriteHash`] says).
pub const HASH_LEN: usize = 16;

/// Record kind codes (the low four bits of a record's tag byte).
mod kind {
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const FLUSH: u8 = 3;
    pub const DISCARD: u8 = 4;
    pub const WRITE_ZEROES: u8 = 5;
    pub const REJECTED: u8 = 6;
}

/// Tag byte layout.
const TAG_KIND_MASK: u8 = 0x0f;
const TAG_STATUS_SHIFT: u8 = 4;
const TAG_STATUS_MASK: u8 = 0x30;
/// Status class 3: the status byte follows the tag.
const STATUS_EXPLICIT: u8 = 3;
/// Kind-specific flag A: read carries extents; write carries an allocation; write-zeroes unmap.
const TAG_FLAG_A: u8 = 0x40;
/// Kind-specific flag B: read carries data.
const TAG_FLAG_B: u8 = 0x80;

/// Extent kind codes (the low two bits of an extent's head varint).
const EXT_MAPPED: u64 = 0;
const EXT_ZERO: u64 = 1;
const EXT_BASE: u64 = 2;

/// What a recorded read costs the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecordMode {
    /// Reads are logged as the extents of block ids that supplied the data (RR-Row).
    #[default]
    BlockId,
    /// Reads are logged with their data: what a recorder must do over a Raw or QCow2 disk.
    Full,
}

impl RecordMode {
    /// The header byte for this mode.
    pub const fn code(self) -> u8 {
        match self {
            RecordMode::BlockId => 0,
            RecordMode::Full => 1,
        }
    }

    /// The mode for a header byte.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            0 => Some(RecordMode::BlockId),
            1 => Some(RecordMode::Full),
            _ => None,
        }
    }

    /// The name used on the command line and in JSON (`block-id`, `full`).
    pub const fn name(self) -> &'static str {
        match self {
            RecordMode::BlockId => "block-id",
            RecordMode::Full => "full",
        }
    }
}

/// The log header: which image, which mode, where in the image's history the log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogHeader {
    /// Format version (written as [`VERSION`]).
    pub version: u16,
    /// Record mode.
    pub mode: RecordMode,
    /// Block size of the recorded image in bytes.
    pub block_size: BlockSize,
    /// UUID of the recorded image.
    pub image_uuid: [u8; 16],
    /// The image's seq when recording started.
    pub start_seq: Seq,
    /// Virtual size of the recorded image in bytes.
    pub image_size: u64,
    /// When the log was created, in nanoseconds since the Unix epoch.
    pub created_unix_ns: u64,
    /// The hash kept for the data of every write.
    pub write_hash: WriteHash,
    /// How requests are numbered (incompatible feature bit 0).
    pub indices: IndexKeying,
    /// How many streams of frames the writer interleaves (incompatible feature bit 1).
    pub streams: LogStreams,
}

/// Incompatible feature bit 0: [`IndexKeying::Continuous`].
pub const FEATURE_CONTINUOUS_INDICES: u32 = 1;
/// Incompatible feature bit 1: [`LogStreams::PerThread`].
pub const FEATURE_THREAD_STREAMS: u32 = 2;
/// Every incompatible feature bit this build knows.
const KNOWN_FEATURES: u32 = FEATURE_CONTINUOUS_INDICES | FEATURE_THREAD_STREAMS;

/// Whether the frames of a log come from one stream of records or from several interleaved
/// ones (see docs/record-log.md, "Streams"). Records are encoded the same way either way; what
/// differs is how far apart in the file the records of neighbouring requests can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogStreams {
    /// One stream: records are appended to one frame in the order the requests ran, so the
    /// records of a queue are at most the requests in flight (a queue's size) out of index
    /// order (feature bit 1 clear; the first logs).
    Single,
    /// One stream per recording thread: each frame holds the records of one thread, in the
    /// order that thread ran them, and the frames of different threads interleave in the file
    /// in the order they were written. The records of a queue can be any distance out of
    /// index order; the calls of one request are still in order, since one thread makes them
    /// (feature bit 1 set; what the recorder writes).
    #[default]
    PerThread,
}

/// How the requests of a log are numbered, which decides how a replay finds the record of a
/// request (see docs/record-log.md, "Identifying requests").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IndexKeying {
    /// Indices restart at 0 when a frontend reconnects and a queue's records are in index
    /// order; a smaller index than the previous one starts a new epoch (the first logs;
    /// feature bit 0 clear).
    PerConnection,
    /// Per-queue indices count on across reconnections for the whole recording, so queue and
    /// index name one request; a queue's records may be out of index order, because the
    /// requests of one queue run in parallel (feature bit 0 set; what the recorder writes).
    #[default]
    Continuous,
}

/// The hash function whose first [`HASH_LEN`] bytes a write record keeps (header byte 17).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteHash {
    /// BLAKE3, truncated to 16 bytes (code 0; the first logs were written with it).
    Blake3,
    /// XXH3-128 (code 1): what the recorder writes, about ten times cheaper per write than
    /// BLAKE3 and still a 128-bit hash; a replay uses it to detect a guest writing other data,
    /// not to resist an adversary forging collisions.
    #[default]
    Xxh3_128,
}

impl WriteHash {
    /// The header code.
    pub fn code(self) -> u8 {
        match self {
            WriteHash::Blake3 => 0,
            WriteHash::Xxh3_128 => 1,
        }
    }

    /// The hash for a header code, `None` for an unknown one.
    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(WriteHash::Blake3),
            1 => Some(WriteHash::Xxh3_128),
            _ => None,
        }
    }

    /// Its name, as `rr-row log info` shows it.
    pub fn name(self) -> &'static str {
        match self {
            WriteHash::Blake3 => "blake3",
            WriteHash::Xxh3_128 => "xxh3-128",
        }
    }
}

impl LogHeader {
    /// The header bytes, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..10].copy_from_slice(&self.version.to_le_bytes());
        h[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        let mut features = match self.indices {
            IndexKeying::PerConnection => 0,
            IndexKeying::Continuous => FEATURE_CONTINUOUS_INDICES,
        };
        if self.streams == LogStreams::PerThread {
            features |= FEATURE_THREAD_STREAMS;
        }
        h[12..16].copy_from_slice(&features.to_le_bytes());
        h[16] = self.mode.code();
        h[17] = self.write_hash.code();
        // 18..20: reserved, zero.
        h[20..24].copy_from_slice(&self.block_size.bytes().to_le_bytes());
        h[24..40].copy_from_slice(&self.image_uuid);
        h[40..48].copy_from_slice(&self.start_seq.get().to_le_bytes());
        h[48..56].copy_from_slice(&self.image_size.to_le_bytes());
        h[56..64].copy_from_slice(&self.created_unix_ns.to_le_bytes());
        // 64..76: reserved, zero.
        let crc = crate::crc::crc32c(&h[..HEADER_LEN - 4]);
        h[HEADER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and validates a header from the first bytes of a log.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let h: &[u8; HEADER_LEN] = match bytes.get(..HEADER_LEN).and_then(|s| s.try_into().ok()) {
            Some(h) => h,
            None => {
                // A short file that does not even start like a log is "not a log".
                let n = bytes.len().min(MAGIC.len());
                if bytes.get(..n) != MAGIC.get(..n) {
                    return Err(RecordError::BadMagic);
                }
                return Err(RecordError::Truncated {
                    needed: HEADER_LEN as u64,
                    found: bytes.len() as u64,
                });
            }
        };
        if h[0..8] != MAGIC {
            return Err(RecordError::BadMagic);
        }
        let version = u16::from_le_bytes([h[8], h[9]]);
        if version > VERSION {
            return Err(RecordError::UnsupportedVersion {
                found: version,
                supported: VERSION,
            });
        }
        if version == 0 {
            return Err(RecordError::BadHeader("version 0".into()));
        }
        let stored = u32::from_le_bytes([h[76], h[77], h[78], h[79]]);
        let computed = crate::crc::crc32c(&h[..HEADER_LEN - 4]);
        if stored != computed {
            return Err(RecordError::HeaderChecksum { stored, computed });
        }
        let header_len = u16::from_le_bytes([h[10], h[11]]);
        if usize::from(header_len) != HEADER_LEN {
            return Err(RecordError::BadHeader(format!(
                "header length {header_len}, expected {HEADER_LEN}"
            )));
        }
        let features = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        if features & !KNOWN_FEATURES != 0 {
            return Err(RecordError::UnknownFeatures(features & !KNOWN_FEATURES));
        }
        let indices = if features & FEATURE_CONTINUOUS_INDICES != 0 {
            IndexKeying::Continuous
        } else {
            IndexKeying::PerConnection
        };
        let streams = if features & FEATURE_THREAD_STREAMS != 0 {
            if indices != IndexKeying::Continuous {
                // Per-connection keying needs the records of a queue in order.
                return Err(RecordError::BadHeader(
                    "per-thread streams (feature bit 1) without continuous indices (bit 0)".into(),
                ));
            }
            LogStreams::PerThread
        } else {
            LogStreams::Single
        };
        let mode = RecordMode::from_code(h[16])
            .ok_or_else(|| RecordError::BadHeader(format!("unknown record mode {}", h[16])))?;
        let write_hash = WriteHash::from_code(h[17])
            .ok_or_else(|| RecordError::BadHeader(format!("unknown write hash {}", h[17])))?;
        let bs = u32::from_le_bytes([h[20], h[21], h[22], h[23]]);
        let block_size = BlockSize::new(bs)
            .ok_or_else(|| RecordError::BadHeader(format!("invalid block size {bs}")))?;
        let mut image_uuid = [0u8; 16];
        image_uuid.copy_from_slice(&h[24..40]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        Ok(LogHeader {
            version,
            mode,
            block_size,
            image_uuid,
            start_seq: Seq(u64_at(40)),
            image_size: u64_at(48),
            created_unix_ns: u64_at(56),
            write_hash,
            indices,
            streams,
        })
    }
}

/// One run of blocks that supplied part of a read, as stored in the log. Mirrors
/// `rr_row::image::Extent`, kept separate so that the log's wire format is versioned on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogExtent {
    /// Data blocks `pba .. pba + blocks` of the image, consecutive.
    Mapped {
        /// First physical block.
        pba: Pba,
        /// Number of blocks.
        blocks: u64,
    },
    /// Blocks that read as zeros.
    Zero {
        /// Number of blocks.
        blocks: u64,
    },
    /// Blocks read from the raw base image at `lba ..`.
    Base {
        /// First logical block of the base image.
        lba: Lba,
        /// Number of blocks.
        blocks: u64,
    },
}

impl LogExtent {
    /// Number of blocks the extent covers.
    pub fn blocks(&self) -> u64 {
        match *self {
            LogExtent::Mapped { blocks, .. }
            | LogExtent::Zero { blocks }
            | LogExtent::Base { blocks, .. } => blocks,
        }
    }
}

impl From<&Extent> for LogExtent {
    fn from(e: &Extent) -> Self {
        match *e {
            Extent::Mapped { pba, blocks } => LogExtent::Mapped { pba, blocks },
            Extent::Zero { blocks } => LogExtent::Zero { blocks },
            Extent::Base { lba, blocks } => LogExtent::Base { lba, blocks },
        }
    }
}

impl From<&LogExtent> for Extent {
    fn from(e: &LogExtent) -> Self {
        match *e {
            LogExtent::Mapped { pba, blocks } => Extent::Mapped { pba, blocks },
            LogExtent::Zero { blocks } => Extent::Zero { blocks },
            LogExtent::Base { lba, blocks } => Extent::Base { lba, blocks },
        }
    }
}

/// What a recorded read carries.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadBody {
    /// The extents that supplied the data, in order, covering every block the read touched
    /// (block-id mode; empty in full mode or when the read failed).
    pub extents: Vec<LogExtent>,
    /// The data itself, exactly `len` bytes (full mode, successful reads only).
    pub data: Option<Vec<u8>>,
}

/// The kind-specific part of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    /// VIRTIO_BLK_T_IN.
    Read(ReadBody),
    /// VIRTIO_BLK_T_OUT: the blocks the data was redirected to and a hash of the data.
    Write {
        /// First PBA allocated (meaningless when `blocks` is 0).
        first_pba: Pba,
        /// Number of consecutive PBAs allocated; 0 when the write failed.
        blocks: u64,
        /// The hash of the written data ([`WriteHash`] of the log), [`HASH_LEN`] bytes.
        hash: [u8; HASH_LEN],
    },
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD of `[sector, sector + len)`.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES of `[sector, sector + len)`.
    WriteZeroes {
        /// The guest allowed deallocation (VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP).
        unmap: bool,
    },
    /// A request the virtio layer completed without executing (malformed or unsupported).
    Rejected {
        /// The virtio-blk request type code from the request header.
        req_type: u32,
    },
}

/// One completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Virtqueue index.
    pub queue: u16,
    /// Per-queue request index.
    pub index: u64,
    /// First 512-byte sector of the request.
    pub sector: u64,
    /// Data length in bytes (for discard and write-zeroes: the range length).
    pub len: u64,
    /// The virtio-blk status byte the request completed with.
    pub status: u8,
    /// The image seq the request saw: the state a read returned, or the seq a state-changing
    /// request created.
    pub seq: Seq,
    /// Kind-specific content.
    pub body: RecordBody,
}

impl Record {
    /// A short name of the record's kind: `read`, `write`, `flush`, `discard`,
    /// `write-zeroes`, `rejected`.
    pub fn kind_name(&self) -> &'static str {
        match self.body {
            RecordBody::Read(_) => "read",
            RecordBody::Write { .. } => "write",
            RecordBody::Flush => "flush",
            RecordBody::Discard => "discard",
            RecordBody::WriteZeroes { .. } => "write-zeroes",
            RecordBody::Rejected { .. } => "rejected",
        }
    }
}

/// The extents of a read, borrowed: as a record holds them, or as the image engine traced them
/// (so that recording a read converts and copies nothing).
#[derive(Debug, Clone, Copy)]
pub enum ExtentsRef<'a> {
    /// Log extents, e.g. those of a decoded [`Record`].
    Log(&'a [LogExtent]),
    /// Extents traced by [`Image::read_vectored`](crate::image::Image::read_vectored).
    Image(&'a [Extent]),
}

impl ExtentsRef<'_> {
    /// Number of extents.
    pub fn len(&self) -> usize {
        match self {
            ExtentsRef::Log(e) => e.len(),
            ExtentsRef::Image(e) => e.len(),
        }
    }

    /// True when there is no extent.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The extents, in order, as the log stores them.
    pub fn iter(&self) -> impl Iterator<Item = LogExtent> + '_ {
        let (log, image) = match *self {
            ExtentsRef::Log(e) => (e, &[][..]),
            ExtentsRef::Image(e) => (&[][..], e),
        };
        log.iter().copied().chain(image.iter().map(LogExtent::from))
    }
}

/// The kind-specific part of a [`RecordRef`]: [`RecordBody`] with its variable-size parts
/// borrowed.
#[derive(Debug, Clone, Copy)]
pub enum BodyRef<'a> {
    /// A read: the extents that supplied the data (block-id mode), or the data (full mode).
    Read {
        /// The extents, empty in full mode or when the read failed.
        extents: ExtentsRef<'a>,
        /// The data, exactly `len` bytes (full mode, successful reads only).
        data: Option<&'a [u8]>,
    },
    /// A write, as [`RecordBody::Write`].
    Write {
        /// First PBA allocated (meaningless when `blocks` is 0).
        first_pba: Pba,
        /// Number of consecutive PBAs allocated; 0 when the write failed.
        blocks: u64,
        /// The hash of the written data.
        hash: [u8; HASH_LEN],
    },
    /// A flush.
    Flush,
    /// A discard.
    Discard,
    /// A write-zeroes, as [`RecordBody::WriteZeroes`].
    WriteZeroes {
        /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP.
        unmap: bool,
    },
    /// A rejected request, as [`RecordBody::Rejected`].
    Rejected {
        /// The virtio-blk request type code.
        req_type: u32,
    },
}

/// A record to encode, borrowing its extents and data: what the recorder appends, so that
/// recording a request allocates nothing. Encodes to the same bytes as the [`Record`] with the
/// same content.
#[derive(Debug, Clone, Copy)]
pub struct RecordRef<'a> {
    /// Virtqueue index.
    pub queue: u16,
    /// Per-queue request index.
    pub index: u64,
    /// First 512-byte sector of the request.
    pub sector: u64,
    /// Data length in bytes (for discard and write-zeroes: the range length).
    pub len: u64,
    /// The virtio-blk status byte the request completed with.
    pub status: u8,
    /// The image seq the request saw.
    pub seq: Seq,
    /// Kind-specific content.
    pub body: BodyRef<'a>,
}

impl Record {
    /// This record as a [`RecordRef`] borrowing from it.
    pub fn view(&self) -> RecordRef<'_> {
        let body = match &self.body {
            RecordBody::Read(b) => BodyRef::Read {
                extents: ExtentsRef::Log(&b.extents),
                data: b.data.as_deref(),
            },
            RecordBody::Write {
                first_pba,
                blocks,
                hash,
            } => BodyRef::Write {
                first_pba: *first_pba,
                blocks: *blocks,
                hash: *hash,
            },
            RecordBody::Flush => BodyRef::Flush,
            RecordBody::Discard => BodyRef::Discard,
            RecordBody::WriteZeroes { unmap } => BodyRef::WriteZeroes { unmap: *unmap },
            RecordBody::Rejected { req_type } => BodyRef::Rejected {
                req_type: *req_type,
            },
        };
        RecordRef {
            queue: self.queue,
            index: self.index,
            sector: self.sector,
            len: self.len,
            status: self.status,
            seq: self.seq,
            body,
        }
    }
}

impl std::fmt::Display for LogExtent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            LogExtent::Mapped { pba, blocks } => write!(f, "pba:{pba}+{blocks}"),
            LogExtent::Zero { blocks } => write!(f, "zero+{blocks}"),
            LogExtent::Base { lba, blocks } => write!(f, "base:{lba}+{blocks}"),
        }
    }
}

/// The name of a virtio-blk status byte.
pub fn status_name(status: u8) -> std::borrow::Cow<'static, str> {
    match status {
        0 => "ok".into(),
        1 => "ioerr".into(),
        2 => "unsupp".into(),
        n => format!("status-{n}").into(),
    }
}

/// One line: `q0 #12 read sector=8 len=4096 status=ok seq=5 extents=[pba:100+1]`.
impl std::fmt::Display for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "q{} #{} {} sector={} len={} status={} seq={}",
            self.queue,
            self.index,
            self.kind_name(),
            self.sector,
            self.len,
            status_name(self.status),
            self.seq
        )?;
        match &self.body {
            RecordBody::Read(b) => {
                if !b.extents.is_empty() {
                    write!(f, " extents=[")?;
                    for (i, e) in b.extents.iter().enumerate() {
                        write!(f, "{}{e}", if i == 0 { "" } else { " " })?;
                    }
                    write!(f, "]")?;
                }
                if let Some(d) = &b.data {
                    write!(f, " data_blake3={}", blake3::hash(d).to_hex())?;
                }
                Ok(())
            }
            RecordBody::Write {
                first_pba,
                blocks,
                hash,
            } => {
                if *blocks > 0 {
                    write!(f, " pba={first_pba}+{blocks}")?;
                }
                write!(f, " hash=")?;
                hash.iter().try_for_each(|b| write!(f, "{b:02x}"))
            }
            RecordBody::WriteZeroes { unmap } => write!(f, " unmap={unmap}"),
            RecordBody::Rejected { req_type } => write!(f, " type={req_type}"),
            RecordBody::Flush | RecordBody::Discard => Ok(()),
        }
    }
}

/// Zigzag-maps a signed delta to an unsigned varint value.
fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

/// Appends `v` as an unsigned LEB128 varint (1 to 10 bytes).
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Reads an unsigned LEB128 varint at `*pos`, advancing it.
pub fn get_varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10u32 {
        let b = *buf
            .get(*pos)
            .ok_or_else(|| "record ends inside a varint".to_string())?;
        *pos += 1;
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return Err("varint overflows 64 bits".into());
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

fn get_u8(buf: &[u8], pos: &mut usize) -> Result<u8, String> {
    let b = *buf
        .get(*pos)
        .ok_or_else(|| "record ends early".to_string())?;
    *pos += 1;
    Ok(b)
}

fn get_bytes<'a>(buf: &'a [u8], pos: &mut usize, n: u64) -> Result<&'a [u8], String> {
    let end = usize::try_from(n)
        .ok()
        .and_then(|n| pos.checked_add(n))
        .filter(|&e| e <= buf.len())
        .ok_or_else(|| format!("record wants {n} more bytes than its frame holds"))?;
    let s = buf.get(*pos..end).ok_or("record ends early")?;
    *pos = end;
    Ok(s)
}

/// The per-frame delta state shared by the encoder and the decoder. Reset at every frame.
#[derive(Debug, Clone)]
pub struct Codec {
    block_shift: u32,
    /// Sector the previous record ended at.
    next_sector: u64,
    /// Seq of the previous record.
    seq: u64,
    /// PBA following the previous mapped extent or write allocation.
    next_pba: u64,
    /// Last index seen per queue in this frame.
    queues: Vec<(u16, u64)>,
}

impl Codec {
    /// A codec for a log of the given block size, in the state of a frame's start.
    pub fn new(block_size: BlockSize) -> Self {
        Self {
            block_shift: block_size.shift(),
            next_sector: 0,
            seq: 0,
            next_pba: 0,
            queues: Vec::new(),
        }
    }

    /// Returns to the state of a frame's start.
    pub fn reset(&mut self) {
        self.next_sector = 0;
        self.seq = 0;
        self.next_pba = 0;
        self.queues.clear();
    }

    fn expected_index(&self, queue: u16) -> u64 {
        self.queues
            .iter()
            .find(|(q, _)| *q == queue)
            .map_or(0, |(_, i)| i.wrapping_add(1))
    }

    fn set_index(&mut self, queue: u16, index: u64) {
        match self.queues.iter_mut().find(|(q, _)| *q == queue) {
            Some(e) => e.1 = index,
            None => self.queues.push((queue, index)),
        }
    }

    fn after_range(&mut self, sector: u64, len: u64) {
        self.next_sector = sector.wrapping_add(len >> 9);
    }

    /// The LBA containing `sector` (used to predict base extents).
    fn lba_of(&self, sector: u64) -> u64 {
        sector.wrapping_mul(512) >> self.block_shift
    }

    /// Appends the encoding of `r` to `out`, advancing the delta state. On error (a value that
    /// cannot be encoded) nothing is appended and the state is unchanged.
    pub fn encode(&mut self, r: &Record, out: &mut Vec<u8>) -> Result<(), RecordError> {
        self.encode_ref(&r.view(), out)
    }

    /// [`encode`](Self::encode) for a borrowed record.
    pub fn encode_ref(&mut self, r: &RecordRef<'_>, out: &mut Vec<u8>) -> Result<(), RecordError> {
        let (kind, flags) = match &r.body {
            BodyRef::Read { extents, data } => {
                let mut f = 0;
                if !extents.is_empty() {
                    f |= TAG_FLAG_A;
                }
                if let Some(d) = data {
                    if d.len() as u64 != r.len {
                        return Err(RecordError::Encode("read data length differs from len"));
                    }
                    if r.len > MAX_READ_DATA {
                        return Err(RecordError::Encode("read data larger than 64 MiB"));
                    }
                    f |= TAG_FLAG_B;
                }
                // Every check happens before anything is written or the delta state moves, so
                // an error leaves both as they were.
                if extents.iter().any(|e| e.blocks() > u64::MAX >> 2) {
                    return Err(RecordError::Encode("extent block count too large"));
                }
                (kind::READ, f)
            }
            BodyRef::Write { blocks, .. } => {
                (kind::WRITE, if *blocks > 0 { TAG_FLAG_A } else { 0 })
            }
            BodyRef::Flush => (kind::FLUSH, 0),
            BodyRef::Discard => (kind::DISCARD, 0),
            BodyRef::WriteZeroes { unmap } => {
                (kind::WRITE_ZEROES, if *unmap { TAG_FLAG_A } else { 0 })
            }
            BodyRef::Rejected { .. } => (kind::REJECTED, 0),
        };
        let status_class = if r.status < STATUS_EXPLICIT {
            r.status
        } else {
            STATUS_EXPLICIT
        };
        out.push(kind | (status_class << TAG_STATUS_SHIFT) | flags);
        if status_class == STATUS_EXPLICIT {
            out.push(r.status);
        }
        put_varint(out, u64::from(r.queue));
        let idx_delta = r.index.wrapping_sub(self.expected_index(r.queue)) as i64;
        put_varint(out, zigzag(idx_delta));
        self.set_index(r.queue, r.index);
        put_varint(out, zigzag(r.sector.wrapping_sub(self.next_sector) as i64));
        if r.len % 512 == 0 {
            put_varint(out, (r.len >> 9) << 1);
        } else {
            put_varint(out, 1);
            put_varint(out, r.len);
        }
        put_varint(out, zigzag(r.seq.get().wrapping_sub(self.seq) as i64));
        self.seq = r.seq.get();
        match &r.body {
            BodyRef::Read { extents, data } => {
                if !extents.is_empty() {
                    put_varint(out, extents.len() as u64);
                    let mut expected_lba = self.lba_of(r.sector);
                    for e in extents.iter() {
                        let blocks = e.blocks();
                        match e {
                            LogExtent::Mapped { pba, blocks } => {
                                put_varint(out, (blocks << 2) | EXT_MAPPED);
                                let d = pba.get().wrapping_sub(self.next_pba) as i64;
                                put_varint(out, zigzag(d));
                                self.next_pba = pba.get().wrapping_add(blocks);
                            }
                            LogExtent::Zero { blocks } => {
                                put_varint(out, (blocks << 2) | EXT_ZERO);
                            }
                            LogExtent::Base { lba, blocks } => {
                                put_varint(out, (blocks << 2) | EXT_BASE);
                                let d = lba.get().wrapping_sub(expected_lba) as i64;
                                put_varint(out, zigzag(d));
                            }
                        }
                        expected_lba = expected_lba.wrapping_add(blocks);
                    }
                }
                if let Some(d) = data {
                    out.extend_from_slice(d);
                }
            }
            BodyRef::Write {
                first_pba,
                blocks,
                hash,
            } => {
                if *blocks > 0 {
                    put_varint(
                        out,
                        zigzag(first_pba.get().wrapping_sub(self.next_pba) as i64),
                    );
                    put_varint(out, *blocks);
                    self.next_pba = first_pba.get().wrapping_add(*blocks);
                }
                out.extend_from_slice(hash);
            }
            BodyRef::Rejected { req_type } => put_varint(out, u64::from(*req_type)),
            BodyRef::Flush | BodyRef::Discard | BodyRef::WriteZeroes { .. } => {}
        }
        self.after_range(r.sector, r.len);
        Ok(())
    }

    /// Decodes the record at `*pos` of a frame payload, advancing `pos` and the delta state.
    /// Never panics on malformed input; returns the reason instead.
    pub fn decode(&mut self, buf: &[u8], pos: &mut usize) -> Result<Record, String> {
        let tag = get_u8(buf, pos)?;
        let kind = tag & TAG_KIND_MASK;
        let flags = tag & (TAG_FLAG_A | TAG_FLAG_B);
        let status_class = (tag & TAG_STATUS_MASK) >> TAG_STATUS_SHIFT;
        let allowed = match kind {
            kind::READ => TAG_FLAG_A | TAG_FLAG_B,
            kind::WRITE | kind::WRITE_ZEROES => TAG_FLAG_A,
            kind::FLUSH | kind::DISCARD | kind::REJECTED => 0,
            k => return Err(format!("unknown record kind {k}")),
        };
        if flags & !allowed != 0 {
            return Err(format!("record tag {tag:#04x} sets undefined flags"));
        }
        let status = if status_class == STATUS_EXPLICIT {
            let s = get_u8(buf, pos)?;
            if s < STATUS_EXPLICIT {
                return Err(format!("status {s} stored explicitly, must be in the tag"));
            }
            s
        } else {
            status_class
        };
        let queue = u16::try_from(get_varint(buf, pos)?).map_err(|_| "queue beyond 65535")?;
        let index = self
            .expected_index(queue)
            .wrapping_add(unzigzag(get_varint(buf, pos)?) as u64);
        self.set_index(queue, index);
        let sector = self
            .next_sector
            .wrapping_add(unzigzag(get_varint(buf, pos)?) as u64);
        let l = get_varint(buf, pos)?;
        let len = if l & 1 == 0 {
            (l >> 1) << 9
        } else if l == 1 {
            let len = get_varint(buf, pos)?;
            if len % 512 == 0 {
                return Err("aligned length stored in the unaligned form".into());
            }
            len
        } else {
            return Err(format!("invalid length code {l}"));
        };
        let seq = self
            .seq
            .wrapping_add(unzigzag(get_varint(buf, pos)?) as u64);
        self.seq = seq;
        let body = match kind {
            kind::READ => {
                let mut extents = Vec::new();
                if flags & TAG_FLAG_A != 0 {
                    let n = get_varint(buf, pos)?;
                    // Every extent takes at least one byte: a count beyond what is left is bogus,
                    // and checking it first bounds the allocation.
                    if n == 0 || n > (buf.len().saturating_sub(*pos)) as u64 {
                        return Err(format!("invalid extent count {n}"));
                    }
                    extents.reserve(n as usize);
                    let mut expected_lba = self.lba_of(sector);
                    for _ in 0..n {
                        let head = get_varint(buf, pos)?;
                        let blocks = head >> 2;
                        let e = match head & 3 {
                            EXT_MAPPED => {
                                let pba = self
                                    .next_pba
                                    .wrapping_add(unzigzag(get_varint(buf, pos)?) as u64);
                                self.next_pba = pba.wrapping_add(blocks);
                                LogExtent::Mapped {
                                    pba: Pba(pba),
                                    blocks,
                                }
                            }
                            EXT_ZERO => LogExtent::Zero { blocks },
                            EXT_BASE => {
                                let lba = expected_lba
                                    .wrapping_add(unzigzag(get_varint(buf, pos)?) as u64);
                                LogExtent::Base {
                                    lba: Lba(lba),
                                    blocks,
                                }
                            }
                            _ => return Err("unknown extent kind 3".into()),
                        };
                        expected_lba = expected_lba.wrapping_add(blocks);
                        extents.push(e);
                    }
                }
                let data = if flags & TAG_FLAG_B != 0 {
                    Some(get_bytes(buf, pos, len)?.to_vec())
                } else {
                    None
                };
                RecordBody::Read(ReadBody { extents, data })
            }
            kind::WRITE => {
                let (first_pba, blocks) = if flags & TAG_FLAG_A != 0 {
                    let pba = self
                        .next_pba
                        .wrapping_add(unzigzag(get_varint(buf, pos)?) as u64);
                    let blocks = get_varint(buf, pos)?;
                    if blocks == 0 {
                        return Err("write allocation of 0 blocks".into());
                    }
                    self.next_pba = pba.wrapping_add(blocks);
                    (pba, blocks)
                } else {
                    (0, 0)
                };
                let mut hash = [0u8; HASH_LEN];
                hash.copy_from_slice(get_bytes(buf, pos, HASH_LEN as u64)?);
                RecordBody::Write {
                    first_pba: Pba(first_pba),
                    blocks,
                    hash,
                }
            }
            kind::FLUSH => RecordBody::Flush,
            kind::DISCARD => RecordBody::Discard,
            kind::WRITE_ZEROES => RecordBody::WriteZeroes {
                unmap: flags & TAG_FLAG_A != 0,
            },
            _ => {
                let t = get_varint(buf, pos)?;
                RecordBody::Rejected {
                    req_type: u32::try_from(t).map_err(|_| "request type beyond 32 bits")?,
                }
            }
        };
        self.after_range(sector, len);
        Ok(Record {
            queue,
            index,
            sector,
            len,
            status,
            seq: Seq(seq),
            body,
        })
    }
}

/// The frame header for `payload`: its length and the crc32c of length bytes and payload.
pub fn frame_header(payload: &[u8]) -> Result<[u8; FRAME_HEADER_LEN], RecordError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l <= MAX_FRAME_PAYLOAD)
        .ok_or(RecordError::Encode("frame payload larger than 1 GiB"))?;
    let len_bytes = len.to_le_bytes();
    let crc = crate::crc::crc32c_append(crate::crc::crc32c(&len_bytes), payload);
    let mut h = [0u8; FRAME_HEADER_LEN];
    h[..4].copy_from_slice(&len_bytes);
    h[4..].copy_from_slice(&crc.to_le_bytes());
    Ok(h)
}

/// Checks a frame: `len_bytes` are its first four bytes, `crc` the stored checksum.
pub fn frame_crc_ok(len_bytes: [u8; 4], crc: u32, payload: &[u8]) -> bool {
    crate::crc::crc32c_append(crate::crc::crc32c(&len_bytes), payload) == crc
}

/// A BLAKE3 hash as kept for written data in [`WriteHash::Blake3`] logs: truncated to
/// [`HASH_LEN`] bytes.
pub fn truncate_hash(h: &blake3::Hash) -> [u8; HASH_LEN] {
    let mut out = [0u8; HASH_LEN];
    out.copy_from_slice(&h.as_bytes()[..HASH_LEN]);
    out
}

/// The hash kept for the data of a write, fed its bytes as they come, in one or more pieces.
/// Data that comes in one piece (what [`copy_out`] makes of every write up to its 16 KiB, so
/// every 4 KiB write) is hashed with XXH3's one-shot function, which costs about half of
/// feeding a streaming hasher and needs no hasher state.
pub struct WriteHasher {
    alg: WriteHash,
    total: u64,
    state: HasherState,
}

enum HasherState {
    Start,
    Blake3(Box<blake3::Hasher>),
    Xxh3(Box<twox_hash::XxHash3_128>),
    Done([u8; HASH_LEN]),
}

impl WriteHasher {
    /// A hasher for `total` bytes of write data, hashed with `alg`.
    pub fn new(alg: WriteHash, total: u64) -> Self {
        Self {
            alg,
            total,
            state: HasherState::Start,
        }
    }

    /// Feeds the next `piece` of the data. The pieces must add up to the `total` given to
    /// [`new`](Self::new): data that came whole is hashed at once, and nothing more is taken.
    pub fn update(&mut self, piece: &[u8]) {
        if matches!(self.state, HasherState::Start) {
            self.state = match self.alg {
                WriteHash::Xxh3_128 if piece.len() as u64 == self.total => {
                    HasherState::Done(twox_hash::XxHash3_128::oneshot(piece).to_le_bytes())
                }
                WriteHash::Xxh3_128 => HasherState::Xxh3(Box::new(twox_hash::XxHash3_128::new())),
                WriteHash::Blake3 => HasherState::Blake3(Box::default()),
            };
        }
        match &mut self.state {
            HasherState::Blake3(h) => {
                h.update(piece);
            }
            HasherState::Xxh3(h) => h.write(piece),
            HasherState::Done(_) | HasherState::Start => {}
        }
    }

    /// The hash of everything fed.
    pub fn finish(self) -> [u8; HASH_LEN] {
        match self.state {
            HasherState::Done(h) => h,
            HasherState::Blake3(h) => truncate_hash(&h.finalize()),
            HasherState::Xxh3(h) => h.finish_128().to_le_bytes(),
            HasherState::Start => match self.alg {
                WriteHash::Xxh3_128 => twox_hash::XxHash3_128::oneshot(&[]).to_le_bytes(),
                WriteHash::Blake3 => truncate_hash(&blake3::hash(&[])),
            },
        }
    }
}

/// The hash kept for the data of a write, computed over its scatter-gather segments (copied
/// out through [`copy_out`]'s per-thread buffer: guest memory is never borrowed as a Rust
/// slice).
pub fn hash_segs(alg: WriteHash, segs: &[IoSeg<'_>]) -> [u8; HASH_LEN] {
    let mut h = WriteHasher::new(alg, crate::iobuf::total_len(segs));
    copy_out(segs, &mut |piece| h.update(piece));
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header() -> LogHeader {
        LogHeader {
            version: VERSION,
            mode: RecordMode::BlockId,
            block_size: BlockSize::DEFAULT,
            image_uuid: [7; 16],
            start_seq: Seq(42),
            image_size: 1 << 30,
            created_unix_ns: 1_700_000_000_000_000_000,
            write_hash: WriteHash::default(),
            indices: IndexKeying::default(),
            streams: LogStreams::default(),
        }
    }

    #[test]
    fn header_round_trips_and_rejects_damage() {
        let h = header();
        let b = h.encode();
        assert_eq!(LogHeader::decode(&b).unwrap(), h);
        assert_eq!(&b[..8], b"RRROWLOG");

        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            LogHeader::decode(&bad),
            Err(RecordError::BadMagic)
        ));

        let mut future = b;
        future[8] = 2;
        assert!(matches!(
            LogHeader::decode(&future),
            Err(RecordError::UnsupportedVersion {
                found: 2,
                supported: 1
            })
        ));

        let mut flipped = b;
        flipped[30] ^= 1;
        assert!(matches!(
            LogHeader::decode(&flipped),
            Err(RecordError::HeaderChecksum { .. })
        ));

        assert!(matches!(
            LogHeader::decode(&b[..40]),
            Err(RecordError::Truncated {
                needed: 80,
                found: 40
            })
        ));
        assert!(matches!(
            LogHeader::decode(b"hello"),
            Err(RecordError::BadMagic)
        ));
    }

    #[test]
    fn header_with_unknown_mode_or_features_is_refused() {
        let mut b = header().encode();
        b[16] = 9;
        let crc = crate::crc::crc32c(&b[..76]);
        b[76..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            LogHeader::decode(&b),
            Err(RecordError::BadHeader(_))
        ));
        let mut b = header().encode();
        b[12] |= 4;
        let crc = crate::crc::crc32c(&b[..76]);
        b[76..].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            LogHeader::decode(&b),
            Err(RecordError::UnknownFeatures(4))
        ));
    }

    #[test]
    fn feature_bit_0_says_how_requests_are_numbered() {
        let h = header();
        assert_eq!(h.indices, IndexKeying::Continuous);
        let b = h.encode();
        assert_eq!(b[12] & 1, 1);
        assert_eq!(LogHeader::decode(&b).unwrap(), h);
        let old = LogHeader {
            indices: IndexKeying::PerConnection,
            streams: LogStreams::Single,
            ..h
        };
        let b = old.encode();
        assert_eq!(b[12..16], [0, 0, 0, 0]);
        assert_eq!(
            LogHeader::decode(&b).unwrap().indices,
            IndexKeying::PerConnection
        );
    }

    #[test]
    fn feature_bit_1_says_the_frames_come_from_per_thread_streams() {
        let h = header();
        assert_eq!(h.streams, LogStreams::PerThread);
        let b = h.encode();
        assert_eq!(b[12..16], [3, 0, 0, 0]);
        assert_eq!(LogHeader::decode(&b).unwrap(), h);
        // The logs written before per-thread streams: one stream, bit 1 clear.
        let single = LogHeader {
            streams: LogStreams::Single,
            ..h
        };
        let b = single.encode();
        assert_eq!(b[12..16], [1, 0, 0, 0]);
        assert_eq!(LogHeader::decode(&b).unwrap(), single);
        // Per-connection indices need one ordered stream: bit 1 without bit 0 is refused.
        let mut b = h.encode();
        b[12] = 2;
        let crc = crate::crc::crc32c(&b[..76]);
        b[76..].copy_from_slice(&crc.to_le_bytes());
        let e = LogHeader::decode(&b).unwrap_err().to_string();
        assert!(e.contains("per-thread streams"), "{e}");
    }

    #[test]
    fn borrowed_records_encode_like_owned_ones() {
        let image = [
            Extent::Mapped {
                pba: Pba(70),
                blocks: 2,
            },
            Extent::Zero { blocks: 1 },
            Extent::Base {
                lba: Lba(12),
                blocks: 1,
            },
        ];
        let owned = Record {
            queue: 1,
            index: 9,
            sector: 96,
            len: 4 * 4096,
            status: 0,
            seq: Seq(5),
            body: RecordBody::Read(ReadBody {
                extents: image.iter().map(LogExtent::from).collect(),
                data: None,
            }),
        };
        let borrowed = RecordRef {
            body: BodyRef::Read {
                extents: ExtentsRef::Image(&image),
                data: None,
            },
            ..owned.view()
        };
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let (mut ca, mut cb) = (
            Codec::new(BlockSize::DEFAULT),
            Codec::new(BlockSize::DEFAULT),
        );
        for _ in 0..2 {
            ca.encode(&owned, &mut a).unwrap();
            cb.encode_ref(&borrowed, &mut b).unwrap();
        }
        assert_eq!(a, b);
        let mut pos = 0;
        let mut d = Codec::new(BlockSize::DEFAULT);
        assert_eq!(d.decode(&b, &mut pos).unwrap(), owned);
        assert_eq!(d.decode(&b, &mut pos).unwrap(), owned);
        assert_eq!(pos, b.len());
    }

    #[test]
    fn hashes_do_not_depend_on_segmentation() {
        let data: Vec<u8> = (0..50_000u32).map(|i| (i * 7) as u8).collect();
        let whole = truncate_hash(&blake3::hash(&data));
        let (a, b) = data.split_at(12_345);
        let segs = [IoSeg::from_slice(a), IoSeg::from_slice(b)];
        assert_eq!(hash_segs(WriteHash::Blake3, &segs), whole);
        assert_ne!(hash_segs(WriteHash::Blake3, &segs[..1]), whole);
        let xxh = xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes();
        assert_eq!(hash_segs(WriteHash::Xxh3_128, &segs), xxh);
        assert_ne!(hash_segs(WriteHash::Xxh3_128, &segs[..1]), xxh);
        assert_ne!(xxh, whole);
        // Data that fits in the bounce buffer is hashed in one call: the same hash, and the
        // same as another implementation's (xxhash-rust) on both sides of XXH3's size classes.
        for len in [
            0usize,
            1,
            16,
            17,
            128,
            129,
            240,
            241,
            1024,
            4096,
            16 * 1024,
            16 * 1024 + 1,
            40_000,
        ] {
            let data = &data[..len];
            let (a, b) = data.split_at(len / 3);
            let segs = [IoSeg::from_slice(a), IoSeg::from_slice(b)];
            assert_eq!(
                hash_segs(WriteHash::Xxh3_128, &segs),
                xxhash_rust::xxh3::xxh3_128(data).to_le_bytes(),
                "{len} bytes"
            );
            assert_eq!(
                hash_segs(WriteHash::Blake3, &segs),
                truncate_hash(&blake3::hash(data)),
                "{len} bytes"
            );
        }
    }

    proptest! {
        /// However a write's data is cut into pieces, the hasher gives the hash of the whole
        /// (checked against another implementation for XXH3); one piece takes the one-shot
        /// path, several the streaming one.
        #[test]
        fn write_hasher_takes_any_pieces(
            len in 0usize..40_000,
            cuts in proptest::collection::vec(0usize..40_000, 0..4),
        ) {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 + i / 97) as u8).collect();
            let mut at: Vec<usize> = cuts.into_iter().map(|c| c % (len + 1)).collect();
            at.push(0);
            at.push(len);
            at.sort_unstable();
            for (alg, want) in [
                (WriteHash::Xxh3_128, xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes()),
                (WriteHash::Blake3, truncate_hash(&blake3::hash(&data))),
            ] {
                let mut h = WriteHasher::new(alg, len as u64);
                for w in at.windows(2) {
                    h.update(&data[w[0]..w[1]]);
                }
                prop_assert_eq!(h.finish(), want, "{:?} cut at {:?}", alg, at);
            }
        }
    }

    #[test]
    fn the_write_hash_is_kept_in_the_header_and_unknown_ones_refused() {
        for alg in [WriteHash::Blake3, WriteHash::Xxh3_128] {
            let mut h = header();
            h.write_hash = alg;
            assert_eq!(LogHeader::decode(&h.encode()).unwrap().write_hash, alg);
        }
        let mut b = header().encode();
        b[17] = 9;
        let crc = crate::crc::crc32c(&b[..76]);
        b[76..].copy_from_slice(&crc.to_le_bytes());
        let e = LogHeader::decode(&b).unwrap_err().to_string();
        assert!(e.contains("unknown write hash 9"), "{e}");
    }

    #[test]
    fn records_display_as_one_line() {
        let r = Record {
            queue: 1,
            index: 7,
            sector: 16,
            len: 8192,
            status: 0,
            seq: Seq(3),
            body: RecordBody::Read(ReadBody {
                extents: vec![
                    LogExtent::Mapped {
                        pba: Pba(9),
                        blocks: 1,
                    },
                    LogExtent::Zero { blocks: 1 },
                ],
                data: None,
            }),
        };
        assert_eq!(
            r.to_string(),
            "q1 #7 read sector=16 len=8192 status=ok seq=3 extents=[pba:9+1 zero+1]"
        );
    }

    #[test]
    fn varints_round_trip_at_the_edges() {
        for v in [0, 1, 127, 128, 16383, 16384, u64::MAX >> 1, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut pos = 0;
            assert_eq!(get_varint(&out, &mut pos).unwrap(), v);
            assert_eq!(pos, out.len());
        }
        // 11 continuation bytes, and a 10th byte carrying more than one bit.
        let mut pos = 0;
        assert!(get_varint(&[0xff; 11], &mut pos).is_err());
        let mut over = vec![0xff; 9];
        over.push(0x02);
        let mut pos = 0;
        assert!(get_varint(&over, &mut pos).is_err());
        for v in [0i64, 1, -1, i64::MAX, i64::MIN] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn a_sequential_block_id_read_costs_a_few_bytes() {
        let mut c = Codec::new(BlockSize::DEFAULT);
        let mut out = Vec::new();
        for i in 0..100u64 {
            let r = Record {
                queue: 0,
                index: i,
                sector: i * 8,
                len: 4096,
                status: 0,
                seq: Seq(1000),
                body: RecordBody::Read(ReadBody {
                    extents: vec![LogExtent::Mapped {
                        pba: Pba(5000 + i),
                        blocks: 1,
                    }],
                    data: None,
                }),
            };
            c.encode(&r, &mut out).unwrap();
        }
        // tag, queue, index delta, sector delta, len, seq delta, count, head, pba delta: 9 bytes
        // each, the first record paying for its absolute seq and PBA.
        assert!(out.len() < 100 * 9 + 8, "{} bytes", out.len());
        let mut d = Codec::new(BlockSize::DEFAULT);
        let mut pos = 0;
        for i in 0..100u64 {
            let r = d.decode(&out, &mut pos).unwrap();
            assert_eq!(r.index, i);
            assert_eq!(r.sector, i * 8);
        }
        assert_eq!(pos, out.len());
    }

    #[test]
    fn malformed_records_are_errors() {
        let mut c = Codec::new(BlockSize::DEFAULT);
        for bad in [
            &[0u8][..],                  // kind 0
            &[0x0f],                     // kind 15
            &[0x83],                     // flush with flag B
            &[0x31, 5],                  // explicit status < 3
            &[0x01, 0, 0, 0, 3, 0],      // length code 3
            &[0x41, 0, 0, 0, 8, 0, 200], // extent count beyond the buffer
        ] {
            let mut pos = 0;
            assert!(c.decode(bad, &mut pos).is_err(), "{bad:?}");
            c.reset();
        }
    }

    fn arb_extent() -> impl Strategy<Value = LogExtent> {
        prop_oneof![
            (any::<u64>(), 0..(u64::MAX >> 2)).prop_map(|(p, b)| LogExtent::Mapped {
                pba: Pba(p),
                blocks: b
            }),
            (0..(u64::MAX >> 2)).prop_map(|b| LogExtent::Zero { blocks: b }),
            (any::<u64>(), 0..(u64::MAX >> 2)).prop_map(|(l, b)| LogExtent::Base {
                lba: Lba(l),
                blocks: b
            }),
        ]
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        let len = prop_oneof![
            (0u64..4096).prop_map(|s| s * 512),
            any::<u64>(),
            Just(u64::MAX)
        ];
        let body = prop_oneof![
            prop::collection::vec(arb_extent(), 0..5).prop_map(|extents| RecordBody::Read(
                ReadBody {
                    extents,
                    data: None
                }
            )),
            (any::<u64>(), any::<u64>(), any::<[u8; HASH_LEN]>()).prop_map(|(p, b, hash)| {
                RecordBody::Write {
                    first_pba: Pba(if b == 0 { 0 } else { p }),
                    blocks: b,
                    hash,
                }
            }),
            Just(RecordBody::Flush),
            Just(RecordBody::Discard),
            any::<bool>().prop_map(|unmap| RecordBody::WriteZeroes { unmap }),
            any::<u32>().prop_map(|req_type| RecordBody::Rejected { req_type }),
        ];
        (
            any::<u16>(),
            any::<u64>(),
            any::<u64>(),
            len,
            any::<u8>(),
            any::<u64>(),
            body,
            prop::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(queue, index, sector, len, status, seq, body, data)| {
                let (len, body) = match body {
                    // Reads with data need len == data.len().
                    RecordBody::Read(r) if data.len() % 3 == 0 => (
                        data.len() as u64,
                        RecordBody::Read(ReadBody {
                            extents: r.extents,
                            data: Some(data),
                        }),
                    ),
                    b => (len, b),
                };
                Record {
                    queue,
                    index,
                    sector,
                    len,
                    status,
                    seq: Seq(seq),
                    body,
                }
            })
    }

    proptest! {
        #[test]
        fn records_round_trip(recs in prop::collection::vec(arb_record(), 0..40), shift in 9u32..=16) {
            let bs = BlockSize::new(1 << shift).unwrap();
            let mut enc = Codec::new(bs);
            let mut out = Vec::new();
            for r in &recs {
                enc.encode(r, &mut out).unwrap();
            }
            let mut dec = Codec::new(bs);
            let mut pos = 0;
            for r in &recs {
                prop_assert_eq!(&dec.decode(&out, &mut pos).unwrap(), r);
            }
            prop_assert_eq!(pos, out.len());
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let mut dec = Codec::new(BlockSize::DEFAULT);
            let mut pos = 0;
            while pos < bytes.len() {
                if dec.decode(&bytes, &mut pos).is_err() {
                    break;
                }
            }
            prop_assert!(pos <= bytes.len());
            let _ = LogHeader::decode(&bytes);
        }
    }
}

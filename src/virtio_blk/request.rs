//! Parsing a virtio-blk descriptor chain into a [`Request`] (virtio spec 1.2, 5.2.6).
//!
//! A request is `struct virtio_blk_req { le32 type; le32 reserved; le64 sector; u8 data[];
//! u8 status; }` laid over a descriptor chain: device-readable descriptors first (the 16-byte
//! header, then data for OUT / DISCARD / WRITE_ZEROES), device-writable ones after (data for IN
//! and GET_ID, then the status byte, the last byte of the chain). Any descriptor layout is
//! accepted (VIRTIO_F_ANY_LAYOUT is implied by VERSION_1): the header may span descriptors and
//! the status byte may share its descriptor with data.
//!
//! Guest input is hostile: every malformed case is a [`RequestError`] variant. Errors found
//! before the status byte is located (empty or truncated chain, unusable status descriptor)
//! leave no way to report a status, and the caller completes the chain without one; every later
//! error carries the status address so the chain completes with IOERR or UNSUPP.

use std::ops::Deref;

use smallvec::SmallVec;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemory, Le32, Le64, Permissions};

use crate::blockdev::RequestKind;
use crate::units::{Sector, SECTOR_SIZE};

use super::ID_BYTES;

/// Size of the request header (`type`, `reserved`, `sector`).
pub const HEADER_LEN: u64 = 16;
/// Size of one `struct virtio_blk_discard_write_zeroes` segment.
pub const DWZ_SEGMENT_LEN: u64 = 16;

/// The request type from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    /// VIRTIO_BLK_T_IN: read from the device.
    In,
    /// VIRTIO_BLK_T_OUT: write to the device.
    Out,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID: the device serial.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Any other type code.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            other => RequestType::Unsupported(other),
        }
    }
}

impl From<RequestType> for RequestKind {
    fn from(t: RequestType) -> Self {
        match t {
            RequestType::In => RequestKind::Read,
            RequestType::Out => RequestKind::Write,
            RequestType::Flush => RequestKind::Flush,
            RequestType::GetId => RequestKind::GetId,
            RequestType::Discard => RequestKind::Discard,
            RequestType::WriteZeroes => RequestKind::WriteZeroes,
            RequestType::Unsupported(t) => RequestKind::Other(t),
        }
    }
}

/// The request header as read from guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Request type.
    pub request_type: RequestType,
    /// Start sector (IN / OUT); ignored for other types.
    pub sector: Sector,
}

/// The data buffers of a request: up to four inline, on the heap beyond (a guest's read or
/// write has one or two), so parsing a chain allocates nothing in the common case.
pub type Segments = SmallVec<[DataSegment; 4]>;

/// A run of guest memory holding request data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSegment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes (never 0).
    pub len: u32,
}

/// One parsed `struct virtio_blk_discard_write_zeroes` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DwzRange {
    /// First sector.
    pub sector: Sector,
    /// Number of sectors.
    pub num_sectors: u32,
    /// VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP (write-zeroes only).
    pub unmap: bool,
}

/// `struct virtio_blk_discard_write_zeroes` as laid out in guest memory.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct DwzSegmentRaw {
    sector: Le64,
    num_sectors: Le32,
    flags: Le32,
}

// SAFETY: repr(C), integers only, 16 bytes with no padding; every bit pattern is valid.
unsafe impl ByteValued for DwzSegmentRaw {}

/// Limits the device advertised in its configuration space; the parser enforces them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `seg_max`: at most this many data descriptors (the chain may have 2 more: header and
    /// status).
    pub seg_max: u32,
    /// `max_discard_seg` / `max_write_zeroes_seg`.
    pub max_dwz_segments: u32,
    /// `max_discard_sectors` / `max_write_zeroes_sectors`.
    pub max_dwz_sectors: u32,
}

impl Limits {
    /// Most descriptors a well-formed chain can have.
    pub fn max_descriptors(&self) -> usize {
        (self.seg_max as usize).saturating_add(2)
    }
}

/// A well-formed virtio-blk request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Request type (never [`RequestType::Unsupported`]: that is an error).
    pub request_type: RequestType,
    /// Start sector for IN / OUT.
    pub sector: Sector,
    /// Data buffers: device-writable for IN / GET_ID, device-readable for OUT.
    pub data: Segments,
    /// Total data length in bytes (a multiple of 512 for IN / OUT).
    pub data_len: u64,
    /// Ranges of a DISCARD or WRITE_ZEROES request.
    pub ranges: Vec<DwzRange>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

/// What is wrong with a descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has no descriptor (e.g. a broken indirect table at its head).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// The chain stops at a descriptor that still has the NEXT flag: a loop, an out-of-table
    /// `next` index, an unreadable descriptor or a broken indirect table.
    #[error("descriptor chain is truncated (loop, bad next index or bad indirect table)")]
    ChainTruncated,
    /// The last descriptor is device-readable, so there is nowhere to put the status.
    #[error("status descriptor is not device-writable")]
    StatusNotWritable,
    /// The last descriptor has length 0.
    #[error("status descriptor is empty")]
    StatusTooShort,
    /// The status byte is not inside guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutOfMemory(u64),
    /// More descriptors than `seg_max + 2`.
    #[error("{count} descriptors exceed the limit of {max}")]
    TooManyDescriptors {
        /// Descriptors in the chain.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// A descriptor points outside guest memory.
    #[error("descriptor {addr:#x}+{len} is outside guest memory")]
    DescriptorOutOfMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// The first descriptor is device-writable: there is no readable header.
    #[error("request header is device-writable")]
    HeaderNotReadable,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// Fewer than 16 device-readable bytes.
    #[error("request header is {0} bytes, 16 needed")]
    HeaderTooShort(u64),
    /// Data in the wrong direction for the request type (e.g. device-readable data on IN).
    #[error("{request_type:?} request carries {len} bytes of {} data", if *.writable { "device-writable" } else { "device-readable" })]
    DataWrongDirection {
        /// The request type.
        request_type: RequestType,
        /// True when the offending data is device-writable.
        writable: bool,
        /// Bytes of offending data.
        len: u64,
    },
    /// IN / OUT data length is not a multiple of 512.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(u64),
    /// `sector * 512 + length` overflows.
    #[error("sector {sector} with {len} bytes overflows")]
    SectorOverflow {
        /// Start sector.
        sector: u64,
        /// Length in bytes.
        len: u64,
    },
    /// GET_ID buffer shorter than 20 bytes.
    #[error("GET_ID buffer is {0} bytes, 20 needed")]
    GetIdBufferTooSmall(u64),
    /// DISCARD / WRITE_ZEROES payload is empty or not a multiple of 16 bytes.
    #[error("discard/write-zeroes payload of {0} bytes is not a whole number of 16-byte segments")]
    SegmentArrayMalformed(u64),
    /// More DISCARD / WRITE_ZEROES segments than advertised.
    #[error("{count} discard/write-zeroes segments exceed the limit of {max}")]
    TooManySegments {
        /// Segments in the request.
        count: u64,
        /// Advertised limit.
        max: u32,
    },
    /// Reserved flag bits set in a DISCARD / WRITE_ZEROES segment, or UNMAP on a DISCARD.
    #[error("discard/write-zeroes segment has unsupported flags {0:#x}")]
    SegmentFlags(u32),
    /// A DISCARD / WRITE_ZEROES segment larger than advertised.
    #[error("discard/write-zeroes segment of {num_sectors} sectors exceeds the limit of {max}")]
    SegmentTooLarge {
        /// Sectors in the segment.
        num_sectors: u32,
        /// Advertised limit.
        max: u32,
    },
    /// Guest memory could not be read although the range was checked (memory changed).
    #[error("guest memory at {0:#x} could not be read")]
    MemoryRead(u64),
    /// A request type this device does not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
}

/// Number of distinct [`RequestError`] kinds (for once-per-kind logging).
pub const REQUEST_ERROR_KINDS: u32 = 20;

impl RequestError {
    /// A small distinct number per variant, below [`REQUEST_ERROR_KINDS`].
    pub fn kind_index(&self) -> u32 {
        match self {
            RequestError::EmptyChain => 0,
            RequestError::ChainTruncated => 1,
            RequestError::StatusNotWritable => 2,
            RequestError::StatusTooShort => 3,
            RequestError::StatusOutOfMemory(_) => 4,
            RequestError::TooManyDescriptors { .. } => 5,
            RequestError::DescriptorOutOfMemory { .. } => 6,
            RequestError::HeaderNotReadable => 7,
            RequestError::ReadableAfterWritable => 8,
            RequestError::HeaderTooShort(_) => 9,
            RequestError::DataWrongDirection { .. } => 10,
            RequestError::UnalignedLength(_) => 11,
            RequestError::SectorOverflow { .. } => 12,
            RequestError::GetIdBufferTooSmall(_) => 13,
            RequestError::SegmentArrayMalformed(_) => 14,
            RequestError::TooManySegments { .. } => 15,
            RequestError::SegmentFlags(_) => 16,
            RequestError::SegmentTooLarge { .. } => 17,
            RequestError::MemoryRead(_) => 18,
            RequestError::UnsupportedType(_) => 19,
        }
    }
}

/// A chain that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// What is wrong.
    pub error: RequestError,
    /// Where the status byte goes; `None` when it could not be located (the chain must be
    /// completed without a status).
    pub status_addr: Option<GuestAddress>,
    /// The header, when it could be read.
    pub header: Option<Header>,
    /// Total data bytes the chain carried besides header and status (0 when unknown).
    pub data_len: u64,
}

/// One descriptor, reduced to what the parser needs.
#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

fn seg_total(segs: &[DataSegment]) -> u64 {
    segs.iter().map(|s| u64::from(s.len)).sum()
}

/// Splits `segs` after `n` bytes: returns (first n bytes, the rest). `n` must not exceed the
/// total length (callers check); a shortfall just yields fewer bytes.
fn split_segs(segs: &[DataSegment], n: u64) -> (Segments, Segments) {
    let mut head = Segments::new();
    let mut tail = Segments::new();
    let mut left = n;
    for s in segs {
        if left == 0 {
            tail.push(*s);
        } else if u64::from(s.len) <= left {
            left -= u64::from(s.len);
            head.push(*s);
        } else {
            // left < s.len <= u32::MAX, so both fit in u32, and addr + left stays inside the
            // descriptor range that was checked against guest memory.
            let first = left as u32;
            head.push(DataSegment {
                addr: s.addr,
                len: first,
            });
            tail.push(DataSegment {
                addr: s.addr.unchecked_add(u64::from(first)),
                len: s.len - first,
            });
            left = 0;
        }
    }
    (head, tail)
}

/// Reads `buf.len()` bytes from the concatenation of `segs`.
fn read_segs<M: GuestMemory + ?Sized>(
    mem: &M,
    segs: &[DataSegment],
    buf: &mut [u8],
) -> Result<(), RequestError> {
    let mut pos = 0usize;
    for s in segs {
        if pos >= buf.len() {
            break;
        }
        let n = (s.len as usize).min(buf.len() - pos);
        let dst = buf
            .get_mut(pos..pos + n)
            .ok_or(RequestError::MemoryRead(s.addr.0))?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| RequestError::MemoryRead(s.addr.0))?;
        pos += n;
    }
    if pos < buf.len() {
        return Err(RequestError::MemoryRead(0));
    }
    Ok(())
}

impl Request {
    /// Parses a descriptor chain. On success the request is well formed against `limits`
    /// (sector ranges are checked against the capacity at execution). Never panics.
    pub fn parse<M>(chain: &DescriptorChain<M>, limits: &Limits) -> Result<Request, Malformed>
    where
        M: Deref + Clone,
        M::Target: GuestMemory,
    {
        let mem = chain.memory();
        let max = limits.max_descriptors();
        // Inline for chains of up to eight descriptors (a Linux guest's 4 KiB request has three).
        let mut descs: SmallVec<[Desc; 8]> = SmallVec::new();
        let mut count = 0usize;
        let mut last = None;
        for d in chain.clone() {
            count += 1;
            let desc = Desc {
                addr: d.addr(),
                len: d.len(),
                writable: d.is_write_only(),
            };
            if descs.len() <= max {
                descs.push(desc);
            }
            last = Some((desc, d.has_next()));
        }
        let drop_chain = |error| Malformed {
            error,
            status_addr: None,
            header: None,
            data_len: 0,
        };
        let Some((last, has_next)) = last else {
            return Err(drop_chain(RequestError::EmptyChain));
        };
        if has_next {
            return Err(drop_chain(RequestError::ChainTruncated));
        }
        if !last.writable {
            return Err(drop_chain(RequestError::StatusNotWritable));
        }
        if last.len == 0 {
            return Err(drop_chain(RequestError::StatusTooShort));
        }
        let status_addr = match last.addr.checked_add(u64::from(last.len) - 1) {
            Some(a) if mem.check_range(a, 1, Permissions::Write) => a,
            Some(a) => return Err(drop_chain(RequestError::StatusOutOfMemory(a.0))),
            None => return Err(drop_chain(RequestError::StatusOutOfMemory(u64::MAX))),
        };

        let mut fail = Malformed {
            error: RequestError::EmptyChain,
            status_addr: Some(status_addr),
            header: None,
            data_len: 0,
        };
        let mut err = |e: RequestError, header: Option<Header>, data_len: u64| {
            fail.error = e;
            fail.header = header;
            fail.data_len = data_len;
            fail.clone()
        };

        if count > max {
            return Err(err(
                RequestError::TooManyDescriptors { count, max },
                None,
                0,
            ));
        }
        for d in &descs {
            let access = if d.writable {
                Permissions::Write
            } else {
                Permissions::Read
            };
            if d.len > 0 && !mem.check_range(d.addr, d.len as usize, access) {
                return Err(err(
                    RequestError::DescriptorOutOfMemory {
                        addr: d.addr.0,
                        len: d.len,
                    },
                    None,
                    0,
                ));
            }
        }
        if descs.first().is_some_and(|d| d.writable) {
            return Err(err(RequestError::HeaderNotReadable, None, 0));
        }
        let first_writable = descs.iter().position(|d| d.writable).unwrap_or(descs.len());
        let (readable, writable) = descs.split_at(first_writable);
        if writable.iter().any(|d| !d.writable) {
            return Err(err(RequestError::ReadableAfterWritable, None, 0));
        }
        let to_segs = |ds: &[Desc]| -> Segments {
            ds.iter()
                .filter(|d| d.len > 0)
                .map(|d| DataSegment {
                    addr: d.addr,
                    len: d.len,
                })
                .collect()
        };
        let readable = to_segs(readable);
        let mut writable = to_segs(writable);
        // Drop the status byte from the writable data.
        if let Some(l) = writable.last_mut() {
            l.len -= 1;
            if l.len == 0 {
                writable.pop();
            }
        }

        let readable_len = seg_total(&readable);
        if readable_len < HEADER_LEN {
            return Err(err(RequestError::HeaderTooShort(readable_len), None, 0));
        }
        let (header_segs, out_data) = split_segs(&readable, HEADER_LEN);
        let mut raw = [0u8; HEADER_LEN as usize];
        if let Err(e) = read_segs(mem, &header_segs, &mut raw) {
            return Err(err(e, None, 0));
        }
        let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = raw;
        let header = Header {
            request_type: RequestType::from(u32::from_le_bytes([t0, t1, t2, t3])),
            sector: Sector(u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7])),
        };
        let in_len = seg_total(&writable);
        let out_len = seg_total(&out_data);
        let h = Some(header);

        let wrong_dir = |writable: bool, len: u64| RequestError::DataWrongDirection {
            request_type: header.request_type,
            writable,
            len,
        };
        let mut req = Request {
            request_type: header.request_type,
            sector: header.sector,
            data: Segments::new(),
            data_len: 0,
            ranges: Vec::new(),
            status_addr,
        };
        match header.request_type {
            RequestType::In | RequestType::Out => {
                let (data, len, stray, stray_writable) = if header.request_type == RequestType::In {
                    (writable, in_len, out_len, false)
                } else {
                    (out_data, out_len, in_len, true)
                };
                if stray > 0 {
                    return Err(err(wrong_dir(stray_writable, stray), h, len));
                }
                if len % SECTOR_SIZE != 0 {
                    return Err(err(RequestError::UnalignedLength(len), h, len));
                }
                let overflow = header
                    .sector
                    .to_bytes()
                    .and_then(|b| b.checked_add(len))
                    .is_none();
                if overflow {
                    return Err(err(
                        RequestError::SectorOverflow {
                            sector: header.sector.0,
                            len,
                        },
                        h,
                        len,
                    ));
                }
                req.data = data;
                req.data_len = len;
            }
            RequestType::Flush => {
                // The spec defines no data for FLUSH; like QEMU, any that is there is ignored.
            }
            RequestType::GetId => {
                if out_len > 0 {
                    return Err(err(wrong_dir(false, out_len), h, in_len));
                }
                if in_len < ID_BYTES as u64 {
                    return Err(err(RequestError::GetIdBufferTooSmall(in_len), h, in_len));
                }
                req.data = writable;
                req.data_len = in_len;
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                if in_len > 0 {
                    return Err(err(wrong_dir(true, in_len), h, out_len));
                }
                if out_len == 0 || out_len % DWZ_SEGMENT_LEN != 0 {
                    return Err(err(
                        RequestError::SegmentArrayMalformed(out_len),
                        h,
                        out_len,
                    ));
                }
                let n = out_len / DWZ_SEGMENT_LEN;
                if n > u64::from(limits.max_dwz_segments) {
                    return Err(err(
                        RequestError::TooManySegments {
                            count: n,
                            max: limits.max_dwz_segments,
                        },
                        h,
                        out_len,
                    ));
                }
                let mut rest = out_data;
                for _ in 0..n {
                    let (one, tail) = split_segs(&rest, DWZ_SEGMENT_LEN);
                    rest = tail;
                    let mut raw = DwzSegmentRaw::default();
                    if let Err(e) = read_segs(mem, &one, raw.as_mut_slice()) {
                        return Err(err(e, h, out_len));
                    }
                    let flags = u32::from(raw.flags);
                    let allowed = if header.request_type == RequestType::WriteZeroes {
                        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                    } else {
                        0
                    };
                    if flags & !allowed != 0 {
                        return Err(err(RequestError::SegmentFlags(flags), h, out_len));
                    }
                    let sector = u64::from(raw.sector);
                    let num_sectors = u32::from(raw.num_sectors);
                    if num_sectors > limits.max_dwz_sectors {
                        return Err(err(
                            RequestError::SegmentTooLarge {
                                num_sectors,
                                max: limits.max_dwz_sectors,
                            },
                            h,
                            out_len,
                        ));
                    }
                    let bytes = u64::from(num_sectors) * SECTOR_SIZE;
                    if Sector(sector)
                        .to_bytes()
                        .and_then(|b| b.checked_add(bytes))
                        .is_none()
                    {
                        return Err(err(
                            RequestError::SectorOverflow { sector, len: bytes },
                            h,
                            out_len,
                        ));
                    }
                    req.ranges.push(DwzRange {
                        sector: Sector(sector),
                        num_sectors,
                        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
                    });
                }
                req.data_len = out_len;
            }
            RequestType::Unsupported(t) => {
                return Err(err(
                    RequestError::UnsupportedType(t),
                    h,
                    in_len.max(out_len),
                ));
            }
        }
        Ok(req)
    }
}

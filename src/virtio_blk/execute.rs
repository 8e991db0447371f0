//! Executing a parsed virtio-blk request against a [`BlockDevice`] (virtio spec 1.2, 5.2.6).
//!
//! Data moves between guest memory and the device with no bounce copy: the request's guest
//! ranges become [`IoSeg`]s pointing straight into the guest's mapped memory, and the device
//! reads into / writes from them (with `preadv`/`pwritev` in the image engine).
//!
//! [`process_chain`] is the whole life of one descriptor chain: parse, execute, write the status
//! byte, and say how the chain must be completed. [`ChainError::status`] is the one place that
//! maps a failure to `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.

use std::ops::Deref;

use log::debug;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

use crate::blockdev::{BlockDevice, BlockError, RejectedRequest, RequestCtx, RequestKind};
use crate::iobuf::{IoSeg, IoSegs};
use crate::units::SECTOR_SIZE;

use super::request::{DataSegment, Limits, Request, RequestError, RequestType};
use super::{ID_BYTES, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

/// Device-level settings execution needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecuteParams {
    /// Limits advertised in the configuration space.
    pub limits: Limits,
    /// GET_ID answer.
    pub serial: [u8; ID_BYTES],
    /// Write-through mode (the driver cleared `writeback`): every state change is flushed
    /// before it completes.
    pub write_through: bool,
}

/// Why a well-formed request failed.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The request reaches past the end of the device.
    #[error("range {offset}+{len} is beyond the end of the device ({capacity} bytes)")]
    OutOfRange {
        /// Start byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Device capacity in bytes.
        capacity: u64,
    },
    /// A state-changing request on a read-only device.
    #[error("write to a read-only device")]
    ReadOnly,
    /// A data buffer is not (or no longer) inside guest memory.
    #[error("guest memory {addr:#x}+{len} is not accessible")]
    GuestMemory {
        /// Guest address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The device failed.
    #[error("device error: {0}")]
    Device(#[from] BlockError),
}

/// Number of distinct [`ExecuteError`] kinds (for once-per-kind logging).
pub const EXECUTE_ERROR_KINDS: u32 = 4;

impl ExecuteError {
    /// A small distinct number per variant, below [`EXECUTE_ERROR_KINDS`].
    pub fn kind_index(&self) -> u32 {
        match self {
            ExecuteError::OutOfRange { .. } => 0,
            ExecuteError::ReadOnly => 1,
            ExecuteError::GuestMemory { .. } => 2,
            ExecuteError::Device(_) => 3,
        }
    }
}

/// Any failure of a chain: malformed, or well formed but failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain could not be parsed.
    #[error("malformed request: {0}")]
    Malformed(#[from] RequestError),
    /// The request failed.
    #[error("request failed: {0}")]
    Execute(#[from] ExecuteError),
}

impl ChainError {
    /// The virtio-blk status reported for this failure: the single place where errors become
    /// `VIRTIO_BLK_S_IOERR` or `VIRTIO_BLK_S_UNSUPP`.
    pub fn status(&self) -> u8 {
        match self {
            ChainError::Malformed(
                RequestError::UnsupportedType(_)
                | RequestError::SegmentFlags(_)
                | RequestError::TooManySegments { .. },
            ) => STATUS_UNSUPP,
            ChainError::Execute(ExecuteError::Device(BlockError::Unsupported)) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// How a chain must be completed.
#[derive(Debug)]
pub struct Completion {
    /// Descriptor index of the chain head (for `add_used`).
    pub head_index: u16,
    /// Bytes written into the chain's device-writable buffers, status included; 0 when the
    /// chain is dropped.
    pub used_len: u32,
    /// The status byte written, or `None` when the chain had no usable status byte (dropped).
    pub status: Option<u8>,
    /// What went wrong, if anything.
    pub error: Option<ChainError>,
}

/// Builds scatter-gather segments over guest memory, with no copy. A range that spans guest
/// memory regions becomes several segments.
pub fn guest_segs<'m, M: GuestMemory + ?Sized>(
    mem: &'m M,
    data: &[DataSegment],
    access: Permissions,
) -> Result<IoSegs<'m>, ExecuteError> {
    let mut segs = IoSegs::new();
    for d in data {
        let bad = || ExecuteError::GuestMemory {
            addr: d.addr.0,
            len: u64::from(d.len),
        };
        let slices =
            GuestMemory::get_slices(mem, d.addr, d.len as usize, access).map_err(|_| bad())?;
        let mut covered = 0usize;
        for slice in slices {
            let slice = slice.map_err(|_| bad())?;
            // The guard only matters for Xen foreign mappings (feature not enabled here); for
            // ordinary mmap'ed guest memory the pointer is valid for as long as the region is.
            let ptr = slice.ptr_guard_mut().as_ptr();
            covered += slice.len();
            // SAFETY: `ptr..ptr + slice.len()` lies inside a guest memory region of `mem`
            // (get_slices checked the range). Regions of a GuestMemoryMmap are unmapped only
            // when the memory object is dropped, and `mem` is borrowed for 'm, so the mapping
            // stays valid for the segment's lifetime. The guest may access the same memory
            // concurrently: IoSeg users only move bytes with raw copies and system calls and
            // never form Rust references to it.
            segs.push(unsafe { IoSeg::from_raw(ptr, slice.len()) });
        }
        if covered != d.len as usize {
            return Err(bad());
        }
    }
    Ok(segs)
}

fn check_range(offset: u64, len: u64, capacity: u64) -> Result<(), ExecuteError> {
    match offset.checked_add(len) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ExecuteError::OutOfRange {
            offset,
            len,
            capacity,
        }),
    }
}

/// What a successful [`execute`] wrote into guest data buffers (bytes, status excluded).
pub type WrittenBytes = u32;

/// Executes a well-formed request. Returns the number of data bytes written into guest memory.
/// Range and read-only checks happen here, before the device is called; a request refused
/// here has not reached the device (see [`Rejection`]).
pub fn execute<M: GuestMemory + ?Sized>(
    req: &Request,
    mem: &M,
    dev: &dyn BlockDevice,
    ctx: &RequestCtx,
    params: &ExecuteParams,
) -> Result<WrittenBytes, Rejection> {
    let capacity = dev.capacity();
    let offset = req.sector.0.saturating_mul(SECTOR_SIZE);
    let written = u32::try_from(req.data_len).unwrap_or(u32::MAX);
    match req.request_type {
        RequestType::In => {
            check_range(offset, req.data_len, capacity).map_err(Rejection::Refused)?;
            let segs =
                guest_segs(mem, &req.data, Permissions::Write).map_err(Rejection::Refused)?;
            dev.read(ctx, offset, &segs).map_err(Rejection::failed)?;
            Ok(written)
        }
        RequestType::Out => {
            if dev.is_read_only() {
                return Err(Rejection::Refused(ExecuteError::ReadOnly));
            }
            check_range(offset, req.data_len, capacity).map_err(Rejection::Refused)?;
            let segs = guest_segs(mem, &req.data, Permissions::Read).map_err(Rejection::Refused)?;
            dev.write(ctx, offset, &segs).map_err(Rejection::failed)?;
            if params.write_through {
                dev.flush(ctx).map_err(Rejection::failed)?;
            }
            Ok(0)
        }
        RequestType::Flush => {
            dev.flush(ctx).map_err(Rejection::failed)?;
            Ok(0)
        }
        RequestType::GetId => {
            let mut pos = 0usize;
            for d in &req.data {
                let Some(chunk) = params.serial.get(pos..) else {
                    break;
                };
                let n = chunk.len().min(d.len as usize);
                let part = chunk.get(..n).unwrap_or_default();
                mem.write_slice(part, d.addr).map_err(|_| {
                    Rejection::Refused(ExecuteError::GuestMemory {
                        addr: d.addr.0,
                        len: n as u64,
                    })
                })?;
                pos += n;
            }
            Ok(ID_BYTES as u32)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            if dev.is_read_only() {
                return Err(Rejection::Refused(ExecuteError::ReadOnly));
            }
            // Validate every range before touching the device, so a bad request changes nothing.
            for r in &req.ranges {
                let off = r.sector.0.saturating_mul(SECTOR_SIZE);
                check_range(off, u64::from(r.num_sectors) * SECTOR_SIZE, capacity)
                    .map_err(Rejection::Refused)?;
            }
            for r in req.ranges.iter().filter(|r| r.num_sectors > 0) {
                let off = r.sector.0 * SECTOR_SIZE;
                let len = u64::from(r.num_sectors) * SECTOR_SIZE;
                if req.request_type == RequestType::Discard {
                    dev.discard(ctx, off, len).map_err(Rejection::failed)?;
                } else {
                    dev.write_zeroes(ctx, off, len, r.unmap)
                        .map_err(Rejection::failed)?;
                }
            }
            if params.write_through {
                dev.flush(ctx).map_err(Rejection::failed)?;
            }
            Ok(0)
        }
        // Parsing turns unknown types into an error; kept total for callers that build requests.
        RequestType::Unsupported(_) => Err(Rejection::Refused(ExecuteError::Device(
            BlockError::Unsupported,
        ))),
    }
}

/// Why [`execute`] failed, and whether the device saw the request.
#[derive(Debug)]
pub enum Rejection {
    /// Refused by the virtio layer before the device was called.
    Refused(ExecuteError),
    /// The device was called and failed.
    Failed(ExecuteError),
}

impl Rejection {
    fn failed(e: BlockError) -> Self {
        Rejection::Failed(ExecuteError::Device(e))
    }
}

/// Parses, executes and answers one descriptor chain: the status byte is written into guest
/// memory (when the chain has one), requests that never reach the device are reported through
/// [`BlockDevice::rejected`], and the returned [`Completion`] says what to `add_used`.
/// Never panics, whatever the chain holds.
///
/// A rejected request is reported with the status the guest received; a chain dropped without
/// a status byte is reported with `VIRTIO_BLK_S_IOERR` (what the guest's driver makes of it),
/// and one whose header could not be read with kind `RequestKind::Other(u32::MAX)`, sector 0.
pub fn process_chain<M>(
    chain: DescriptorChain<M>,
    dev: &dyn BlockDevice,
    ctx: &RequestCtx,
    params: &ExecuteParams,
) -> Completion
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    let mem = chain.memory();
    let (status_addr, result, reject_info) = match Request::parse(&chain, &params.limits) {
        Err(m) => {
            let info = RejectedRequest {
                kind: m
                    .header
                    .map(|h| RequestKind::from(h.request_type))
                    .unwrap_or(RequestKind::Other(u32::MAX)),
                sector: m.header.map(|h| h.sector.0).unwrap_or(0),
                len: m.data_len,
                status: STATUS_IOERR,
            };
            (
                m.status_addr,
                Err(ChainError::Malformed(m.error)),
                Some(info),
            )
        }
        Ok(req) => {
            debug!(
                "queue {} #{}: {:?} sector {} len {}",
                ctx.queue, ctx.index, req.request_type, req.sector, req.data_len
            );
            let info = RejectedRequest {
                kind: RequestKind::from(req.request_type),
                sector: req.sector.0,
                len: req.data_len,
                status: STATUS_IOERR,
            };
            match execute(&req, mem, dev, ctx, params) {
                Ok(n) => (Some(req.status_addr), Ok(n), None),
                Err(Rejection::Refused(e)) => (
                    Some(req.status_addr),
                    Err(ChainError::Execute(e)),
                    Some(info),
                ),
                Err(Rejection::Failed(e)) => {
                    (Some(req.status_addr), Err(ChainError::Execute(e)), None)
                }
            }
        }
    };
    finish_chain(head_index, mem, status_addr, result, reject_info, dev, ctx)
}

/// The end of [`process_chain`]: writes the status byte, reports a request refused before the
/// device, and says how to complete the chain.
fn finish_chain<M: GuestMemory + ?Sized>(
    head_index: u16,
    mem: &M,
    status_addr: Option<GuestAddress>,
    result: Result<WrittenBytes, ChainError>,
    reject_info: Option<RejectedRequest>,
    dev: &dyn BlockDevice,
    ctx: &RequestCtx,
) -> Completion {
    let (status, written) = match &result {
        Ok(n) => (STATUS_OK, *n),
        Err(e) => (e.status(), 0),
    };
    let delivered = status_addr.filter(|a| mem.write_obj(status, *a).is_ok());
    if let Some(mut info) = reject_info {
        if delivered.is_some() {
            info.status = status;
        }
        dev.rejected(ctx, &info);
    }
    match delivered {
        Some(_) => Completion {
            head_index,
            used_len: written.saturating_add(1),
            status: Some(status),
            error: result.err(),
        },
        None => {
            Completion {
                head_index,
                used_len: 0,
                status: None,
                error: Some(result.err().unwrap_or(ChainError::Execute(
                    ExecuteError::GuestMemory {
                        addr: status_addr.map(|a| a.0).unwrap_or(0),
                        len: 1,
                    },
                ))),
            }
        }
    }
}

/// Which of a batch's requests a device that prefers batches gets together
/// ([`BlockDevice::read_many`], [`BlockDevice::write_many`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchKind {
    /// Reads (`VIRTIO_BLK_T_IN`).
    Read,
    /// Writes (`VIRTIO_BLK_T_OUT`).
    Write,
}

/// A read or write request of a batch, parsed and checked, for [`BlockDevice::read_many`] or
/// [`BlockDevice::write_many`]: what [`process_chain`] would have passed to
/// [`BlockDevice::read`] or [`BlockDevice::write`].
pub struct Prepared<'m> {
    /// The request's context.
    pub ctx: RequestCtx,
    /// Byte offset on the device.
    pub offset: u64,
    /// The guest buffers to fill (a read) or to write from (a write).
    pub segs: IoSegs<'m>,
    head_index: u16,
    status_addr: GuestAddress,
    /// Bytes written into guest buffers on success (the data of a read; 0 for a write).
    len: WrittenBytes,
}

/// The request type in `chain`'s header (`VIRTIO_BLK_T_*`), read without parsing the rest of
/// the chain: what a queue worker needs to sort a batch. `None` when the first descriptor or
/// the type cannot be read; the chain is then answered by [`process_chain`], which says why.
pub fn peek_type<M>(chain: &DescriptorChain<M>) -> Option<u32>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let first = chain.clone().next()?;
    if first.len() < 4 {
        return None;
    }
    chain
        .memory()
        .read_obj::<u32>(first.addr())
        .ok()
        .map(u32::from_le)
}

/// `chain` parsed, when it is a write request (what [`prepare`] will take as a write, unless
/// the request is refused or must go alone); its `data_len` is the write's length. Hand it
/// to [`prepare`] so that the chain is not parsed twice.
pub fn parse_write<M>(chain: &DescriptorChain<M>, params: &ExecuteParams) -> Option<Request>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    parse_as(chain, params, RequestType::Out)
}

/// As [`parse_write`], for a read request; its `data_len` is the read's length.
pub fn parse_read<M>(chain: &DescriptorChain<M>, params: &ExecuteParams) -> Option<Request>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    parse_as(chain, params, RequestType::In)
}

fn parse_as<M>(
    chain: &DescriptorChain<M>,
    params: &ExecuteParams,
    t: RequestType,
) -> Option<Request>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    Request::parse(chain, &params.limits)
        .ok()
        .filter(|r| r.request_type == t)
}

/// Parses `chain` (unless `parsed`, what [`Request::parse`] made of it already, is given)
/// and, when it is a well-formed request of `kind` inside the device whose
/// buffers are in `mem` (the memory the chain was taken from), prepares it for
/// [`BlockDevice::read_many`] or [`BlockDevice::write_many`] (or for a transfer the caller
/// runs itself). Anything else - other request types, malformed chains, refused requests,
/// and writes to a read-only device or in write-through mode (each of those must be flushed
/// before it completes) - is `None`: the chain, which stays with the caller, then goes
/// through [`process_chain`], which answers it (and reports it) as usual.
pub fn prepare<'m, M>(
    chain: &DescriptorChain<M>,
    parsed: Option<Request>,
    mem: &'m M::Target,
    dev: &dyn BlockDevice,
    ctx: RequestCtx,
    params: &ExecuteParams,
    kind: BatchKind,
) -> Option<Prepared<'m>>
where
    M: Deref + Clone,
    M::Target: GuestMemory,
{
    let (want, access) = match kind {
        BatchKind::Read => (RequestType::In, Permissions::Write),
        BatchKind::Write => (RequestType::Out, Permissions::Read),
    };
    let req = match parsed.map_or_else(|| Request::parse(chain, &params.limits), Ok) {
        Ok(r) if r.request_type == want => r,
        _ => return None,
    };
    if kind == BatchKind::Write && (dev.is_read_only() || params.write_through) {
        return None;
    }
    let offset = req.sector.0.saturating_mul(SECTOR_SIZE);
    if check_range(offset, req.data_len, dev.capacity()).is_err() {
        return None;
    }
    let Ok(segs) = guest_segs(mem, &req.data, access) else {
        return None;
    };
    debug!(
        "queue {} #{}: {} sector {} len {} (batched)",
        ctx.queue,
        ctx.index,
        match kind {
            BatchKind::Read => "read",
            BatchKind::Write => "write",
        },
        req.sector,
        req.data_len
    );
    let len = match kind {
        BatchKind::Read => u32::try_from(req.data_len).unwrap_or(u32::MAX),
        BatchKind::Write => 0,
    };
    Some(Prepared {
        ctx,
        offset,
        segs,
        head_index: chain.head_index(),
        status_addr: req.status_addr,
        len,
    })
}

/// Completes a prepared request with the device's answer, as [`process_chain`] would have:
/// the status byte, and the used length (data and status) or a dropped chain.
pub fn finish<M: GuestMemory + ?Sized>(
    req: &Prepared<'_>,
    result: Result<(), BlockError>,
    mem: &M,
    dev: &dyn BlockDevice,
) -> Completion {
    finish_pending(&req.pending(), result, mem, dev)
}

/// What completing a [`Prepared`] request takes once its buffers are no longer borrowed:
/// for a request whose transfers the caller runs and collects itself.
#[derive(Debug, Clone, Copy)]
pub struct Pending {
    /// The request's context.
    pub ctx: RequestCtx,
    head_index: u16,
    status_addr: GuestAddress,
    len: WrittenBytes,
}

impl Prepared<'_> {
    /// The request's completion details, without its buffers.
    pub fn pending(&self) -> Pending {
        Pending {
            ctx: self.ctx,
            head_index: self.head_index,
            status_addr: self.status_addr,
            len: self.len,
        }
    }
}

/// As [`finish`], for a request known by its [`Pending`] details.
pub fn finish_pending<M: GuestMemory + ?Sized>(
    req: &Pending,
    result: Result<(), BlockError>,
    mem: &M,
    dev: &dyn BlockDevice,
) -> Completion {
    let result = result
        .map(|()| req.len)
        .map_err(|e| ChainError::Execute(ExecuteError::Device(e)));
    finish_chain(
        req.head_index,
        mem,
        Some(req.status_addr),
        result,
        None,
        dev,
        &req.ctx,
    )
}

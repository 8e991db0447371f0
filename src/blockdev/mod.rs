//! The storage interface the virtio-blk layer executes requests against.
//!
//! [`BlockDevice`] is the seam between the layers: `virtio_blk` parses descriptor chains and
//! calls it, knowing nothing of files; the image adapter ([`image_dev::ImageDevice`]) and the
//! record/replay wrappers (`crate::record`) implement it, knowing nothing of virtio.
//! All offsets and lengths are in bytes and are multiples of 512 (the virtio-blk sector size);
//! implementations re-check and return [`BlockError::Unaligned`] otherwise.

pub mod image_dev;
pub mod record_dev;
pub mod relocator;
pub mod replay_dev;
pub mod retainer;
pub mod syncer;

use std::cell::RefCell;

use crate::image::Extent;
use crate::iobuf::IoSeg;

/// Extents a thread's trace buffer keeps room for between reads (a 1 MiB read over 4 KiB
/// blocks needs 256 at most).
const TRACE_KEEP: usize = 1024;

thread_local! {
    /// The extents of the read being traced on this thread.
    static TRACE: RefCell<Vec<Extent>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's read-trace buffer, emptied: tracing a read (for the record log
/// or for relocation) then allocates nothing, since the buffer is reused from read to read.
/// A buffer that grew past [`TRACE_KEEP`] entries (a very fragmented read) is not kept.
pub(crate) fn with_trace<R>(f: impl FnOnce(&mut Vec<Extent>) -> R) -> R {
    TRACE.with(|t| {
        // A nested call cannot happen (nothing under a read calls back), but if it did it
        // gets a buffer of its own rather than a panic.
        let mut fallback = Vec::new();
        let mut guard = t.try_borrow_mut();
        let trace = match guard.as_deref_mut() {
            Ok(v) => v,
            Err(_) => &mut fallback,
        };
        trace.clear();
        let r = f(trace);
        if trace.capacity() > TRACE_KEEP {
            *trace = Vec::new();
        }
        r
    })
}

/// Identifies a request for devices that log or match requests (record/replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestCtx {
    /// Virtqueue index the request came from.
    pub queue: u16,
    /// Per-queue request index: 0 for the first request completed on this queue since the
    /// frontend connected, then 1, 2, ...
    pub index: u64,
}

impl RequestCtx {
    /// The context of calls the daemon makes on its own, not for a guest request (e.g. the
    /// flush when the driver switches the cache to write-through). Record/replay devices
    /// execute them without logging or matching them: they are not part of the guest's stream.
    /// Same value as `vhost_user::INTERNAL_CTX`.
    pub const INTERNAL: RequestCtx = RequestCtx {
        queue: u16::MAX,
        index: u64::MAX,
    };

    /// True for [`RequestCtx::INTERNAL`] (any context on queue `u16::MAX`).
    pub fn is_internal(&self) -> bool {
        self.queue == u16::MAX
    }
}

/// The kind of a virtio-blk request, as far as the storage layer cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_GET_ID.
    GetId,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// Any other type code.
    Other(u32),
}

/// A request the virtio layer completed without calling the device (malformed, unsupported),
/// reported so that a record log still sees every completed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RejectedRequest {
    /// The request type as parsed, when the header could be read.
    pub kind: RequestKind,
    /// Start sector from the request header (0 when unknown).
    pub sector: u64,
    /// Data length in bytes (0 when unknown).
    pub len: u64,
    /// The virtio-blk status byte sent back.
    pub status: u8,
}

/// Errors a block device returns; `virtio_blk` maps each to a virtio-blk status.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The range lies (partly) beyond the end of the device.
    #[error("range {offset}+{len} is beyond the end of the device ({capacity} bytes)")]
    OutOfRange {
        /// Start byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Device capacity in bytes.
        capacity: u64,
    },
    /// Offset or length is not a multiple of 512.
    #[error("offset {offset} or length {len} is not a multiple of 512")]
    Unaligned {
        /// Start byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A state-changing request on a read-only device.
    #[error("the device is read-only")]
    ReadOnly,
    /// The device does not support this operation.
    #[error("operation not supported")]
    Unsupported,
    /// A replayed request does not match the record log (see `crate::record`).
    #[error("replay diverged: {0}")]
    Diverged(String),
    /// The image engine failed.
    #[error(transparent)]
    Image(crate::image::ImageError),
    /// A host I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::image::ImageError> for BlockError {
    /// Range, alignment and read-only failures of the engine become the device-level variants
    /// (so the virtio layer maps them like any device's); everything else is wrapped.
    fn from(e: crate::image::ImageError) -> Self {
        use crate::image::ImageError;
        match e {
            ImageError::OutOfRange { offset, len, size } => BlockError::OutOfRange {
                offset,
                len,
                capacity: size,
            },
            ImageError::Unaligned { offset, len } => BlockError::Unaligned { offset, len },
            ImageError::ReadOnly => BlockError::ReadOnly,
            other => BlockError::Image(other),
        }
    }
}

/// A virtual block device as the virtio-blk layer sees it. Implementations are shared by all
/// queue workers (`&self`, `Send + Sync`) and must allow requests to run in parallel.
pub trait BlockDevice: Send + Sync {
    /// Capacity in bytes (a multiple of 512).
    fn capacity(&self) -> u64;
    /// The preferred block size in bytes (reported to the guest as `blk_size`).
    fn block_size(&self) -> u32;
    /// True when state-changing requests must be refused.
    fn is_read_only(&self) -> bool;
    /// Reads `total_len(segs)` bytes at `offset` into `segs`.
    fn read(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError>;
    /// Writes the bytes of `segs` at `offset`.
    fn write(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError>;
    /// Makes every completed request durable.
    fn flush(&self, ctx: &RequestCtx) -> Result<(), BlockError>;
    /// Discards `[offset, offset + len)`: afterwards it reads as zeros.
    fn discard(&self, ctx: &RequestCtx, offset: u64, len: u64) -> Result<(), BlockError>;
    /// Zeroes `[offset, offset + len)`; `unmap` says the guest allows deallocation.
    fn write_zeroes(
        &self,
        ctx: &RequestCtx,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), BlockError>;
    /// Called for every request completed without reaching the device. Default: nothing.
    fn rejected(&self, _ctx: &RequestCtx, _req: &RejectedRequest) {}
    /// Called once a queue worker has executed a batch of requests, before it completes them
    /// to the guest: a device that buffers metadata in memory can hand it to the host kernel
    /// here, so that completed requests survive the process being killed. Default: nothing.
    fn end_of_batch(&self) {}
    /// Lets the calling thread (a queue's worker, about to serve requests itself) poll for up
    /// to `window` for the completions of the disk transfers it waits for, instead of
    /// sleeping until it is woken; zero sleeps at once. Default: the engine's per-thread
    /// setting ([`crate::image::uring::set_completion_poll`]), which every device here
    /// reads and writes through.
    fn poll_completions_here(&self, window: std::time::Duration) {
        crate::image::uring::set_completion_poll(window);
    }
    /// Whether [`read_many`](Self::read_many) does better than one [`read`](Self::read)
    /// after another, so that a queue worker should hand the device a batch's reads together.
    /// Default: no.
    fn prefers_batched_reads(&self) -> bool {
        false
    }
    /// Whether a write of `len` bytes does better in [`write_many`](Self::write_many), with
    /// the other such writes of its batch, than in one [`write`](Self::write) after another,
    /// so that a queue worker should hand the device those writes together. Default: no.
    fn prefers_batched_writes(&self, _len: u64) -> bool {
        false
    }
    /// Resolves a read into disk transfers that the caller submits itself and completes
    /// later (a queue worker keeping many reads in flight on one ring, without a thread per
    /// read): see [`crate::image::Image::plan_read`], whose contract the plan carries (the
    /// caller keeps `segs`' memory valid until every transfer completed). `Ok(None)` when this
    /// device cannot, or when the read is better served by [`read`](Self::read) (which the
    /// caller then calls). Default: `Ok(None)`.
    fn plan_read(
        &self,
        _ctx: &RequestCtx,
        _offset: u64,
        _segs: &[IoSeg<'_>],
    ) -> Result<Option<crate::image::ReadPlan>, BlockError> {
        Ok(None)
    }
    /// After every transfer of a plan from [`plan_read`](Self::plan_read) completed whole,
    /// before the request completes: whether the bytes read are the request's answer (a
    /// device that logs reads logs it now); if not, the caller reads it again with
    /// [`read`](Self::read). Default: false.
    fn plan_done(&self, _ctx: &RequestCtx, _plan: &crate::image::ReadPlan) -> bool {
        false
    }
    /// Reads several independent requests (of one batch: none depends on another); results
    /// in request order, each what [`read`](Self::read) would have returned. Default: one
    /// `read` after another.
    fn read_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        reqs.iter()
            .map(|r| self.read(r.ctx, r.offset, r.segs))
            .collect()
    }
    /// Writes several independent requests (of one batch: the guest issued them all before
    /// any completed, so it cannot rely on an order among them; where two overlap, the later
    /// in the slice wins, as if they had run in that order). Results in request order, each
    /// what [`write`](Self::write) would have returned. Default: one `write` after another.
    fn write_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        reqs.iter()
            .map(|r| self.write(r.ctx, r.offset, r.segs))
            .collect()
    }
}

/// One request of a batch handed to [`BlockDevice::read_many`] or
/// [`BlockDevice::write_many`].
#[derive(Debug, Clone, Copy)]
pub struct BatchReq<'a> {
    /// The request.
    pub ctx: &'a RequestCtx,
    /// Byte offset on the device.
    pub offset: u64,
    /// Where the bytes go (a read) or come from (a write).
    pub segs: &'a [IoSeg<'a>],
}

impl<'a> BatchReq<'a> {
    /// The batch as the image engine takes it ([`crate::image::Image::read_many`],
    /// [`crate::image::Image::write_many`]): each request's offset and segments.
    pub fn ranges(reqs: &[BatchReq<'a>]) -> Vec<(u64, &'a [IoSeg<'a>])> {
        reqs.iter().map(|r| (r.offset, r.segs)).collect()
    }
}

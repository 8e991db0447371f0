//! [`RecordingDevice`]: a [`BlockDevice`] over an [`Image`] that records every request.
//!
//! Each request is executed on the image, then appended to the record log
//! ([`crate::record`]): a read with the extents of block ids that supplied its data (traced by
//! [`Image::read_vectored`], consistent with the seq it returns, or for a batch of reads with
//! `O_DIRECT` by [`Image::read_many`]), or with the data itself in full mode; a write with the
//! PBAs it was redirected to and a hash of its data; the others with their ranges. Requests
//! the virtio layer refused arrive through [`BlockDevice::rejected`] and are recorded too. A
//! guest flush makes the log durable before it completes.
//!
//! If the log cannot be written (disk full, I/O error), the VM keeps running: the error is
//! logged once and the log ends at its last complete frame, a valid prefix.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};

use crate::image::{BatchRead, BatchTrace, BatchWrite, Image, ReadPlan, WriteOutcome};
use crate::iobuf::{scatter, total_len, IoSeg};
use crate::record::format::{
    hash_segs, BodyRef, ExtentsRef, IndexKeying, LogHeader, LogStreams, RecordRef, WriteHash,
    WriteHasher, HASH_LEN, MAX_READ_DATA, VERSION,
};
use crate::record::writer::DEFAULT_SYNC_INTERVAL;

use super::relocator::{RelocPolicy, Relocator};
use super::retainer::{RetainError, Retainer};
use super::syncer::Syncer;
use crate::record::{LogWriter, RecordError, RecordMode, WriterStats};
use crate::units::{Seq, SECTOR_SIZE};

use super::image_dev::batched_writes_pay;
use super::{
    with_trace, BatchReq, BlockDevice, BlockError, RejectedRequest, RequestCtx, RequestKind,
};

/// VIRTIO_BLK_S_OK.
const STATUS_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR.
const STATUS_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP.
const STATUS_UNSUPP: u8 = 2;

/// The status the virtio layer reports for a device result (the same mapping as
/// `virtio_blk`'s `ChainError::status` for device errors).
pub fn status_of<T>(r: &Result<T, BlockError>) -> u8 {
    match r {
        Ok(_) => STATUS_OK,
        Err(BlockError::Unsupported) => STATUS_UNSUPP,
        Err(_) => STATUS_IOERR,
    }
}

/// The virtio-blk request type code of a request kind (virtio spec 5.2.6).
pub fn request_type_code(kind: RequestKind) -> u32 {
    match kind {
        RequestKind::Read => 0,
        RequestKind::Write => 1,
        RequestKind::Flush => 4,
        RequestKind::GetId => 8,
        RequestKind::Discard => 11,
        RequestKind::WriteZeroes => 13,
        RequestKind::Other(c) => c,
    }
}

/// A block device that executes requests on an image and records each one.
pub struct RecordingDevice {
    // Dropped first: their threads hold a reference to the image.
    reloc: Option<Relocator>,
    syncer: Option<Syncer>,
    retainer: Option<Retainer>,
    image: Arc<Image>,
    log: LogWriter,
    mode: RecordMode,
    /// An append failed: reported once, then silence (the writer logs I/O errors itself).
    append_failed: AtomicBool,
}

impl RecordingDevice {
    /// Starts recording `image` into a new log at `log_path` (an existing file is refused),
    /// syncing the log every five seconds ([`DEFAULT_SYNC_INTERVAL`]) and on every guest flush.
    pub fn new(image: Arc<Image>, log_path: &Path, mode: RecordMode) -> Result<Self, RecordError> {
        Self::with_sync_interval(image, log_path, mode, DEFAULT_SYNC_INTERVAL)
    }

    /// As [`new`](Self::new), with the interval of the periodic log sync (zero: only on guest
    /// flushes and at the end).
    pub fn with_sync_interval(
        image: Arc<Image>,
        log_path: &Path,
        mode: RecordMode,
        sync_interval: Duration,
    ) -> Result<Self, RecordError> {
        let created_unix_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        let header = LogHeader {
            version: VERSION,
            mode,
            block_size: image.block_size(),
            image_uuid: image.uuid(),
            start_seq: image.seq(),
            image_size: image.size(),
            created_unix_ns,
            write_hash: WriteHash::default(),
            // The daemon numbers requests on across reconnections (vhost_user::RequestCounters).
            indices: IndexKeying::Continuous,
            // Each request thread appends to a stream of its own (no shared lock per record).
            streams: LogStreams::PerThread,
        };
        let log = LogWriter::create(log_path, &header, sync_interval)?;
        info!(
            "recording to {} ({} mode, image seq {})",
            log_path.display(),
            mode.name(),
            header.start_seq
        );
        Ok(Self {
            reloc: None,
            syncer: None,
            retainer: None,
            image,
            log,
            mode,
            append_failed: AtomicBool::new(false),
        })
    }

    /// Also relocates, in the background, what `policy` asks for: every range a read found
    /// spread over at least `policy.on_read_min_runs` physical runs, and fragmented stretches
    /// while the device is idle (block-id mode; see [`Relocator`]). The log is unaffected: it
    /// names the blocks each read used, and a relocation never frees or changes those.
    pub fn with_relocation(mut self, policy: RelocPolicy) -> std::io::Result<Self> {
        if self.mode == RecordMode::BlockId {
            self.reloc = Relocator::start(&self.image, policy)?;
        }
        Ok(self)
    }

    /// Also runs the engine's periodic sync on a background thread (see [`Syncer`]).
    pub fn with_background_sync(mut self) -> std::io::Result<Self> {
        self.syncer = Syncer::start(&self.image)?;
        Ok(self)
    }

    /// Also reclaims, on a background thread, the history older than the last `keep_seqs`
    /// operations, but never any state from the one this recording started in (see
    /// [`Retainer`]): every block the log can name stays. Nothing when `keep_seqs` is 0.
    pub fn with_retention(mut self, keep_seqs: u64, reuse: bool) -> Result<Self, RetainError> {
        if keep_seqs > 0 {
            let floor = self.log.header().start_seq;
            self.retainer = Retainer::start(&self.image, keep_seqs, Some(floor), reuse)?;
        }
        Ok(self)
    }

    /// The image being recorded.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    /// The log's counters so far.
    pub fn log_stats(&self) -> WriterStats {
        self.log.stats()
    }

    /// Writes out and syncs everything recorded so far.
    pub fn sync_log(&self) -> Result<(), RecordError> {
        self.log.sync()
    }

    /// Ends the recording: writes out and syncs the log, returns its counters. (Dropping the
    /// device does the same, logging instead of returning an error.)
    pub fn finish(self) -> Result<WriterStats, RecordError> {
        let stats = self.log.finish()?;
        info!(
            "recording finished: {} records, {} bytes",
            stats.records, stats.bytes
        );
        Ok(stats)
    }

    fn append(&self, rec: &RecordRef<'_>) {
        if let Err(e) = self.log.append_ref(rec) {
            if !self.append_failed.swap(true, Ordering::Relaxed) {
                error!(
                    "record log: cannot record q{} #{}: {e}; later records are lost",
                    rec.queue, rec.index
                );
            }
        }
    }

    fn record(
        &self,
        ctx: &RequestCtx,
        offset: u64,
        len: u64,
        status: u8,
        seq: Seq,
        body: BodyRef<'_>,
    ) {
        self.append(&RecordRef {
            queue: ctx.queue,
            index: ctx.index,
            sector: offset / SECTOR_SIZE,
            len,
            status,
            seq,
            body,
        });
    }

    /// Writes one request whose data hashed to `hash` (taken before the write: guest memory
    /// may change under us) and records it.
    fn write_hashed(
        &self,
        ctx: &RequestCtx,
        offset: u64,
        segs: &[IoSeg<'_>],
        hash: [u8; HASH_LEN],
    ) -> Result<(), BlockError> {
        let res = self
            .image
            .write_vectored(offset, segs)
            .map_err(BlockError::from);
        self.record_write(ctx, offset, total_len(segs), &res, hash);
        res.map(|_| ())
    }

    /// Records a write's outcome: the blocks it was redirected to, or its failure.
    fn record_write(
        &self,
        ctx: &RequestCtx,
        offset: u64,
        len: u64,
        res: &Result<WriteOutcome, BlockError>,
        hash: [u8; HASH_LEN],
    ) {
        if let Some(r) = &self.reloc {
            r.note_written(offset, len);
        }
        let (seq, first_pba, blocks) = match res {
            Ok(o) => (o.seq, o.first_pba, o.blocks),
            Err(_) => (self.image.seq(), Default::default(), 0),
        };
        let body = BodyRef::Write {
            first_pba,
            blocks,
            hash,
        };
        self.record(ctx, offset, len, status_of(res), seq, body);
    }

    /// Full mode: read into a private buffer, log exactly those bytes, then hand them to the
    /// guest (guest memory may change under us; the log must hold what the guest got).
    /// Reads larger than [`MAX_READ_DATA`] (no Linux guest issues them) fail with IOERR, and
    /// are recorded as failed, rather than buffering an unbounded amount of guest data.
    fn read_full(&self, offset: u64, segs: &[IoSeg<'_>]) -> Result<(Seq, Vec<u8>), BlockError> {
        let total = total_len(segs);
        let len = usize::try_from(total)
            .ok()
            .filter(|_| total <= MAX_READ_DATA)
            .ok_or_else(|| {
                BlockError::Io(std::io::Error::other(format!(
                    "a {total}-byte read is larger than a full-mode record can carry"
                )))
            })?;
        let mut buf = vec![0u8; len];
        let seq = self
            .image
            .read_vectored(offset, &[IoSeg::from_mut_slice(&mut buf)], None)
            .map_err(BlockError::from)?;
        scatter(segs, 0, &buf);
        Ok((seq, buf))
    }
}

impl BlockDevice for RecordingDevice {
    fn end_of_batch(&self) {
        // As for a plain image: completed writes reach the page cache with their journal
        // records, so a killed recorder keeps them (the log itself is written out and synced
        // every five seconds).
        if let Err(e) = self.image.write_out_journal() {
            warn!("cannot write out the journal: {e}");
        }
        if let Some(r) = &self.reloc {
            r.note_activity();
        }
    }

    fn capacity(&self) -> u64 {
        self.image.size()
    }

    fn block_size(&self) -> u32 {
        self.image.block_size().bytes()
    }

    fn is_read_only(&self) -> bool {
        self.image.is_read_only()
    }

    fn read(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        let len = total_len(segs);
        match self.mode {
            RecordMode::BlockId => with_trace(|trace| {
                let r = match &self.reloc {
                    Some(rel) => rel.read_and_offer(&self.image, offset, segs, trace),
                    None => self.image.read_vectored(offset, segs, Some(&mut *trace)),
                }
                .map_err(BlockError::from);
                let (seq, extents) = match &r {
                    Ok(seq) => (*seq, &trace[..]),
                    Err(_) => (self.image.seq(), &[][..]),
                };
                let body = BodyRef::Read {
                    extents: ExtentsRef::Image(extents),
                    data: None,
                };
                self.record(ctx, offset, len, status_of(&r), seq, body);
                r.map(|_| ())
            }),
            RecordMode::Full => {
                let r = self.read_full(offset, segs);
                let (seq, data) = match &r {
                    Ok((seq, data)) => (*seq, Some(&data[..])),
                    Err(_) => (self.image.seq(), None),
                };
                let body = BodyRef::Read {
                    extents: ExtentsRef::Image(&[]),
                    data,
                };
                self.record(ctx, offset, len, status_of(&r), seq, body);
                r.map(|_| ())
            }
        }
    }

    fn write(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        let hash = hash_segs(self.log.header().write_hash, segs);
        self.write_hashed(ctx, offset, segs, hash)
    }

    /// As for a plain image ([`super::image_dev::ImageDevice`]), with `O_DIRECT` a batch's
    /// reads go to the disk together; in block-id mode only (a full-mode record carries the
    /// data, read into a private buffer one request at a time).
    fn prefers_batched_reads(&self) -> bool {
        self.mode == RecordMode::BlockId && self.image.is_direct()
    }

    /// In block-id mode with `O_DIRECT`, a read of fewer extents than relocation on read
    /// wants goes to the caller's ring; it is recorded when its transfers are done
    /// ([`plan_done`](Self::plan_done)), with the extents and the seq it was resolved at, as
    /// [`read`](Self::read) records one read.
    fn plan_read(
        &self,
        _ctx: &RequestCtx,
        offset: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<Option<ReadPlan>, BlockError> {
        if self.mode != RecordMode::BlockId {
            return Ok(None);
        }
        let max = Relocator::batch_read_limit(self.reloc.as_ref());
        self.image
            .plan_read(offset, segs, max, true)
            .map_err(BlockError::from)
    }

    fn plan_done(&self, ctx: &RequestCtx, plan: &ReadPlan) -> bool {
        if !self.image.plan_current(plan) {
            // Read again (and recorded then) through `read`.
            return false;
        }
        let body = BodyRef::Read {
            extents: ExtentsRef::Image(plan.extents()),
            data: None,
        };
        self.record(ctx, plan.offset(), plan.len(), STATUS_OK, plan.seq(), body);
        true
    }

    /// Reads the batch with one [`Image::read_many`] and records each read with the extents
    /// and the seq it was resolved at, as [`read`](Self::read) records one read; the reads the
    /// batch leaves alone go through `read` (which records them).
    fn read_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        if self.mode != RecordMode::BlockId {
            return reqs
                .iter()
                .map(|q| self.read(q.ctx, q.offset, q.segs))
                .collect();
        }
        let plain = BatchReq::ranges(reqs);
        let max = Relocator::batch_read_limit(self.reloc.as_ref());
        let mut trace = BatchTrace::default();
        let done = self.image.read_many(&plain, max, Some(&mut trace));
        done.into_iter()
            .zip(reqs)
            .enumerate()
            .map(|(i, (r, q))| {
                let r = match r {
                    Ok(BatchRead::Alone) => return self.read(q.ctx, q.offset, q.segs),
                    Ok(BatchRead::Done) => Ok(()),
                    Err(e) => Err(BlockError::from(e)),
                };
                let (seq, extents) = match &r {
                    Ok(()) => (
                        trace.seq,
                        trace.extents.get(i).map_or(&[][..], Vec::as_slice),
                    ),
                    Err(_) => (self.image.seq(), &[][..]),
                };
                let body = BodyRef::Read {
                    extents: ExtentsRef::Image(extents),
                    data: None,
                };
                self.record(q.ctx, q.offset, total_len(q.segs), status_of(&r), seq, body);
                r
            })
            .collect()
    }

    /// As for a plain image ([`super::image_dev::ImageDevice`]): the batch's writes go to
    /// [`Image::write_many`] together, each then recorded with the blocks it got.
    fn prefers_batched_writes(&self, len: u64) -> bool {
        batched_writes_pay(&self.image, len)
    }

    /// Each write's hash is taken before it is written (as [`write`](Self::write) does), or
    /// while a large direct batch's writes are in flight, from the data the engine copies out
    /// for its own checksum (`Image::write_many_seeing`): guest memory is read once for both.
    /// The records follow in request order, which is also the order of their seqs.
    fn write_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        let wh = self.log.header().write_hash;
        let mut hashers: Vec<Option<WriteHasher>> = reqs.iter().map(|_| None).collect();
        let plain = BatchReq::ranges(reqs);
        let done = self.image.write_many_seeing(&plain, &mut |i, piece| {
            if let (Some(h), Some(q)) = (hashers.get_mut(i), reqs.get(i)) {
                h.get_or_insert_with(|| WriteHasher::new(wh, total_len(q.segs)))
                    .update(piece);
            }
        });
        done.into_iter()
            .zip(reqs.iter().zip(hashers))
            .map(|(r, (q, h))| {
                // The engine showed only the writes it placed; the others are hashed here,
                // still before they are written.
                let hash = h.map_or_else(|| hash_segs(wh, q.segs), WriteHasher::finish);
                let res = match r {
                    Ok(BatchWrite::Alone) => {
                        return self.write_hashed(q.ctx, q.offset, q.segs, hash)
                    }
                    Ok(BatchWrite::Done(o)) => Ok(o),
                    Err(e) => Err(BlockError::from(e)),
                };
                self.record_write(q.ctx, q.offset, total_len(q.segs), &res, hash);
                res.map(|_| ())
            })
            .collect()
    }

    fn flush(&self, ctx: &RequestCtx) -> Result<(), BlockError> {
        // A read-only image has nothing to flush (and the engine refuses to).
        let res = if self.image.is_read_only() {
            Ok(())
        } else {
            self.image.flush().map_err(BlockError::from)
        };
        if !ctx.is_internal() {
            let seq = self.image.seq();
            self.record(ctx, 0, 0, status_of(&res), seq, BodyRef::Flush);
        }
        // The guest's flush covers the log: a run survives a crash up to its last flush.
        if let Err(e) = self.log.sync() {
            if !self.append_failed.swap(true, Ordering::Relaxed) {
                error!("record log: sync failed: {e}");
            }
        }
        res
    }

    fn discard(&self, ctx: &RequestCtx, offset: u64, len: u64) -> Result<(), BlockError> {
        let res = self.image.discard(offset, len).map_err(BlockError::from);
        let seq = res.as_ref().map_or_else(|_| self.image.seq(), |s| *s);
        self.record(ctx, offset, len, status_of(&res), seq, BodyRef::Discard);
        res.map(|_| ())
    }

    fn write_zeroes(
        &self,
        ctx: &RequestCtx,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), BlockError> {
        let res = self
            .image
            .write_zeroes(offset, len)
            .map_err(BlockError::from);
        let seq = res.as_ref().map_or_else(|_| self.image.seq(), |s| *s);
        self.record(
            ctx,
            offset,
            len,
            status_of(&res),
            seq,
            BodyRef::WriteZeroes { unmap },
        );
        res.map(|_| ())
    }

    fn rejected(&self, ctx: &RequestCtx, req: &RejectedRequest) {
        self.append(&RecordRef {
            queue: ctx.queue,
            index: ctx.index,
            sector: req.sector,
            len: req.len,
            status: req.status,
            seq: self.image.seq(),
            body: BodyRef::Rejected {
                req_type: request_type_code(req.kind),
            },
        });
    }
}

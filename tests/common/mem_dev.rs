//! An in-memory [`BlockDevice`] for the tests of the virtio and vhost-user layers: a byte
//! vector that counts flushes and remembers which requests, queues and rejections it saw.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rr_row::blockdev::{BatchReq, BlockDevice, BlockError, RejectedRequest, RequestCtx};
use rr_row::iobuf::{total_len, IoSeg};

/// A block device over a byte vector (4 KiB blocks).
pub struct MemDevice {
    /// The disk content; its length is the capacity.
    pub data: Mutex<Vec<u8>>,
    /// Whether the device says it is read-only.
    pub read_only: bool,
    /// Number of flushes served.
    pub flushes: AtomicUsize,
    /// `RequestCtx::index` of every read, write and rejected request, in arrival order.
    pub indices: Mutex<Vec<u64>>,
    /// The queues that served reads or writes, in order of first use.
    pub queues_seen: Mutex<Vec<u16>>,
    /// Every rejected request with its context.
    pub rejected: Mutex<Vec<(RequestCtx, RejectedRequest)>>,
    /// Whether the device asks for a batch's reads and writes together
    /// (`prefers_batched_reads`, `prefers_batched_writes`).
    pub batched: AtomicBool,
    /// The number of reads of every `read_many` call, in order.
    pub read_many_calls: Mutex<Vec<usize>>,
    /// The number of writes of every `write_many` call, in order.
    pub write_many_calls: Mutex<Vec<usize>>,
    /// The largest write the device asks to get in a batch (when `batched`).
    pub write_batch_max: std::sync::atomic::AtomicU64,
    /// Write-locked by a test to keep reads waiting inside the device.
    pub hold: std::sync::RwLock<()>,
    /// Reads that entered the device.
    pub reads_started: AtomicUsize,
    /// For every read, how long the thread that ran it would poll for a disk completion
    /// (`rr_row::image::uring::completion_poll`, as the queue's worker set it).
    pub read_polls: Mutex<Vec<std::time::Duration>>,
}

impl MemDevice {
    /// A device of `capacity` bytes, each holding `fill`.
    pub fn new(capacity: u64, fill: u8, read_only: bool) -> Arc<Self> {
        let len = usize::try_from(capacity).expect("capacity too big for memory");
        Arc::new(MemDevice {
            data: Mutex::new(vec![fill; len]),
            read_only,
            flushes: AtomicUsize::new(0),
            indices: Mutex::new(Vec::new()),
            queues_seen: Mutex::new(Vec::new()),
            rejected: Mutex::new(Vec::new()),
            batched: AtomicBool::new(false),
            read_many_calls: Mutex::new(Vec::new()),
            write_many_calls: Mutex::new(Vec::new()),
            write_batch_max: std::sync::atomic::AtomicU64::new(u64::MAX),
            hold: std::sync::RwLock::new(()),
            reads_started: AtomicUsize::new(0),
            read_polls: Mutex::new(Vec::new()),
        })
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        let capacity = self.capacity();
        match offset.checked_add(len) {
            Some(end) if end <= capacity => Ok(offset as usize..end as usize),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                capacity,
            }),
        }
    }

    fn seen(&self, ctx: &RequestCtx) {
        self.indices.lock().unwrap().push(ctx.index);
        let mut q = self.queues_seen.lock().unwrap();
        if !q.contains(&ctx.queue) {
            q.push(ctx.queue);
        }
    }
}

impl BlockDevice for MemDevice {
    fn capacity(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.reads_started.fetch_add(1, Ordering::SeqCst);
        self.read_polls
            .lock()
            .unwrap()
            .push(rr_row::image::uring::completion_poll());
        let _held = self.hold.read().unwrap_or_else(|e| e.into_inner());
        self.seen(ctx);
        let r = self.range(offset, total_len(segs))?;
        let data = self.data.lock().unwrap();
        let mut pos = r.start;
        for s in segs {
            assert!(s.copy_from(0, &data[pos..pos + s.len()]));
            pos += s.len();
        }
        Ok(())
    }
    fn write(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.seen(ctx);
        let r = self.range(offset, total_len(segs))?;
        let mut data = self.data.lock().unwrap();
        let mut pos = r.start;
        for s in segs {
            assert!(s.copy_to(0, &mut data[pos..pos + s.len()]));
            pos += s.len();
        }
        Ok(())
    }
    fn flush(&self, _: &RequestCtx) -> Result<(), BlockError> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn discard(&self, _: &RequestCtx, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, c: &RequestCtx, o: u64, l: u64, _: bool) -> Result<(), BlockError> {
        self.discard(c, o, l)
    }
    fn prefers_batched_reads(&self) -> bool {
        self.batched.load(Ordering::SeqCst)
    }
    fn prefers_batched_writes(&self, len: u64) -> bool {
        self.batched.load(Ordering::SeqCst) && len <= self.write_batch_max.load(Ordering::SeqCst)
    }
    fn read_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        self.read_many_calls.lock().unwrap().push(reqs.len());
        reqs.iter()
            .map(|r| self.read(r.ctx, r.offset, r.segs))
            .collect()
    }
    fn write_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        self.write_many_calls.lock().unwrap().push(reqs.len());
        reqs.iter()
            .map(|r| self.write(r.ctx, r.offset, r.segs))
            .collect()
    }
    fn rejected(&self, ctx: &RequestCtx, req: &RejectedRequest) {
        self.indices.lock().unwrap().push(ctx.index);
        self.rejected.lock().unwrap().push((*ctx, *req));
    }
}

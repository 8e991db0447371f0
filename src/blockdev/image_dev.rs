//! [`BlockDevice`] over an RR-Row [`Image`].
//!
//! A thin adapter: reads and writes go straight to the engine's vectored calls with the
//! caller's segments (guest memory, for the daemon), so no data is copied here. The engine's
//! range, alignment and read-only errors are turned into the matching [`BlockError`] variants;
//! everything else is passed through as [`BlockError::Image`].
//!
//! With [`ImageDevice::with_relocation`], a read that found its data spread over many physical
//! runs hands those extents to a background [`Relocator`]; with
//! [`ImageDevice::with_background_sync`] the engine's periodic sync runs on a [`Syncer`]
//! thread; with [`ImageDevice::with_retention`] a [`Retainer`] thread reclaims old history.

use std::sync::Arc;

use crate::image::{BatchRead, BatchWrite, Image, ReadPlan};
use crate::iobuf::{total_len, IoSeg};

use super::relocator::{RelocPolicy, Relocator};
use super::retainer::{RetainError, Retainer};
use super::syncer::Syncer;
use super::{with_trace, BatchReq, BlockDevice, BlockError, RequestCtx};

/// The largest buffered write a queue worker hands to [`Image::write_many`] with the rest of
/// its batch: measured, 4 KiB random writes gained 24-35% batched and 128 KiB sequential
/// writes lost 12% (docs/perf-notes.md, section 22); sizes between were not measured.
pub const BUFFERED_BATCH_MAX: u64 = 16 << 10;

/// Whether a `len`-byte write to `image` is better handed to [`Image::write_many`] with the
/// rest of its batch than written on its own: with `O_DIRECT` every write, buffered up to
/// [`BUFFERED_BATCH_MAX`] (shared by [`ImageDevice`] and the recorder).
pub(crate) fn batched_writes_pay(image: &Image, len: u64) -> bool {
    !image.is_read_only() && (image.is_direct() || len <= BUFFERED_BATCH_MAX)
}

/// A block device serving an open image.
pub struct ImageDevice {
    // Dropped first: the threads hold a reference to the image.
    reloc: Option<Relocator>,
    syncer: Option<Syncer>,
    retainer: Option<Retainer>,
    image: Arc<Image>,
}

impl std::fmt::Debug for ImageDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageDevice")
            .field("size", &self.image.size())
            .field("block_size", &self.image.block_size())
            .field("read_only", &self.image.is_read_only())
            .field(
                "relocate_min_runs",
                &self.reloc.as_ref().and_then(Relocator::min_runs),
            )
            .finish()
    }
}

impl ImageDevice {
    /// Wraps an open image.
    pub fn new(image: Image) -> Self {
        ImageDevice {
            reloc: None,
            syncer: None,
            retainer: None,
            image: Arc::new(image),
        }
    }

    /// Wraps an open image and relocates, in a background thread ([`Relocator`]), what
    /// `policy` asks for: every range a read found spread over at least
    /// `policy.on_read_min_runs` (>= 2) physical runs of data blocks, and, while the device
    /// is idle, every fragmented stretch of the disk. Read-only images get no relocation.
    pub fn with_relocation(image: Image, policy: RelocPolicy) -> std::io::Result<Self> {
        let mut dev = Self::new(image);
        dev.reloc = Relocator::start(&dev.image, policy)?;
        Ok(dev)
    }

    /// Also runs the engine's periodic sync on a background thread instead of in the request
    /// that crosses the unsynced limit (see [`Syncer`]). Nothing for read-only images.
    pub fn with_background_sync(mut self) -> std::io::Result<Self> {
        self.syncer = Syncer::start(&self.image)?;
        Ok(self)
    }

    /// Also reclaims, on a background thread, the history older than the last `keep_seqs`
    /// operations (see [`Retainer`]; `reuse`: reclaimed blocks serve new writes). Nothing when `keep_seqs` is 0 or the image read-only.
    pub fn with_retention(mut self, keep_seqs: u64, reuse: bool) -> Result<Self, RetainError> {
        if keep_seqs > 0 {
            self.retainer = Retainer::start(&self.image, keep_seqs, None, reuse)?;
        }
        Ok(self)
    }

    /// Tells the idle defragmenter that a write at `offset` landed (once the map holds it, so
    /// that a walk that looked at its window before looks again).
    fn note_written(&self, offset: u64, segs: &[IoSeg<'_>]) {
        if let Some(r) = &self.reloc {
            r.note_written(offset, total_len(segs));
        }
    }

    /// The image, for callers that need more than the block interface.
    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Stops the background threads and unwraps the image (e.g. to [`Image::close`] it); gives
    /// the shared image back if something else still holds it.
    pub fn into_image(mut self) -> Result<Image, Arc<Image>> {
        if let Some(mut r) = self.reloc.take() {
            r.stop();
        }
        drop(self.retainer.take());
        drop(self.syncer.take());
        Arc::try_unwrap(self.image)
    }
}

impl BlockDevice for ImageDevice {
    fn capacity(&self) -> u64 {
        self.image.size()
    }

    fn block_size(&self) -> u32 {
        self.image.block_size().bytes()
    }

    fn is_read_only(&self) -> bool {
        self.image.is_read_only()
    }

    fn read(&self, _ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        let Some(r) = self.reloc.as_ref().filter(|r| r.min_runs().is_some()) else {
            return self
                .image
                .read_vectored(offset, segs, None)
                .map(|_| ())
                .map_err(BlockError::from);
        };
        with_trace(|trace| {
            r.read_and_offer(&self.image, offset, segs, trace)
                .map(|_| ())
                .map_err(BlockError::from)
        })
    }

    /// With `O_DIRECT` every read waits for the disk: a batch's reads go to it together.
    /// Buffered reads are served from the page cache faster by the pool's threads in
    /// parallel (docs/perf-notes.md, section 22).
    fn prefers_batched_reads(&self) -> bool {
        self.image.is_direct()
    }

    /// A batch's writes go together: with `O_DIRECT` all of them, in one io_uring
    /// submission; buffered the small ones (up to [`BUFFERED_BATCH_MAX`]), as one `pwritev`
    /// per run of adjacent new blocks, since the pool's threads copy large writes into the
    /// page cache faster side by side (docs/perf-notes.md, section 22).
    fn prefers_batched_writes(&self, len: u64) -> bool {
        batched_writes_pay(&self.image, len)
    }

    /// With `O_DIRECT`, a read of fewer extents than relocation on read wants goes to the
    /// caller's ring; buffered reads are page-cache copies, better run by the pool's threads.
    fn plan_read(
        &self,
        _ctx: &RequestCtx,
        offset: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<Option<ReadPlan>, BlockError> {
        let max = Relocator::batch_read_limit(self.reloc.as_ref());
        self.image
            .plan_read(offset, segs, max, false)
            .map_err(BlockError::from)
    }

    fn plan_done(&self, _ctx: &RequestCtx, plan: &ReadPlan) -> bool {
        self.image.plan_current(plan)
    }

    fn read_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        let plain = BatchReq::ranges(reqs);
        let max = Relocator::batch_read_limit(self.reloc.as_ref());
        self.image
            .read_many(&plain, max, None)
            .into_iter()
            .zip(reqs)
            .map(|(r, q)| match r {
                Ok(BatchRead::Done) => Ok(()),
                Ok(BatchRead::Alone) => self.read(q.ctx, q.offset, q.segs),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    fn write_many(&self, reqs: &[BatchReq<'_>]) -> Vec<Result<(), BlockError>> {
        let plain = BatchReq::ranges(reqs);
        self.image
            .write_many(&plain)
            .into_iter()
            .zip(reqs)
            .map(|(r, q)| match r {
                Ok(BatchWrite::Done(_)) => {
                    self.note_written(q.offset, q.segs);
                    Ok(())
                }
                Ok(BatchWrite::Alone) => self.write(q.ctx, q.offset, q.segs),
                Err(e) => Err(e.into()),
            })
            .collect()
    }

    fn write(&self, _ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        let res = self.image.write_vectored(offset, segs);
        self.note_written(offset, segs);
        res.map(|_| ()).map_err(BlockError::from)
    }

    fn flush(&self, _ctx: &RequestCtx) -> Result<(), BlockError> {
        if self.image.is_read_only() {
            return Ok(());
        }
        self.image.flush().map_err(BlockError::from)
    }

    fn discard(&self, _ctx: &RequestCtx, offset: u64, len: u64) -> Result<(), BlockError> {
        self.image
            .discard(offset, len)
            .map(|_| ())
            .map_err(BlockError::from)
    }

    fn end_of_batch(&self) {
        // Completed writes then live in the page cache, journal included: a killed daemon
        // keeps them (a power cut still needs a flush).
        if let Err(e) = self.image.write_out_journal() {
            log::warn!("cannot write out the journal: {e}");
        }
        if let Some(r) = &self.reloc {
            r.note_activity();
        }
    }

    fn write_zeroes(
        &self,
        _ctx: &RequestCtx,
        offset: u64,
        len: u64,
        _unmap: bool,
    ) -> Result<(), BlockError> {
        // Zeroing is a mapping change in a redirect-on-write image: no data block is written
        // either way, so the UNMAP permission makes no difference.
        self.image
            .write_zeroes(offset, len)
            .map(|_| ())
            .map_err(BlockError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::OpenMode;

    fn create(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let path = dir.path().join("t.rrow");
        Image::create_small_for_test(&path);
        path
    }

    #[test]
    fn small_buffered_writes_and_every_direct_write_are_batched() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(&dir);
        let open = |mode, direct| {
            ImageDevice::new(
                Image::open_with_options(
                    &path,
                    mode,
                    &crate::image::OpenOptions {
                        direct,
                        shared_lock: false,
                    },
                )
                .unwrap(),
            )
        };
        let small = BUFFERED_BATCH_MAX;
        let large = BUFFERED_BATCH_MAX + 4096;
        let buffered = open(OpenMode::ReadWrite, false);
        assert!(buffered.prefers_batched_writes(4096));
        assert!(buffered.prefers_batched_writes(small));
        assert!(!buffered.prefers_batched_writes(large));
        assert!(!buffered.prefers_batched_reads());
        buffered.into_image().ok().unwrap().close().unwrap();
        let direct = open(OpenMode::ReadWrite, true);
        assert!(direct.prefers_batched_writes(large));
        assert!(direct.prefers_batched_reads());
        direct.into_image().ok().unwrap().close().unwrap();
        let ro = open(OpenMode::ReadOnly, false);
        assert!(!ro.prefers_batched_writes(4096));
    }

    #[test]
    fn block_calls_reach_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let path = create(&dir);
        let dev = ImageDevice::new(Image::open(&path, OpenMode::ReadWrite).unwrap());
        let ctx = RequestCtx::default();
        assert_eq!(dev.capacity(), 1 << 20);
        assert_eq!(dev.block_size(), 4096);
        assert!(!dev.is_read_only());

        let data: Vec<u8> = (0..1536u32).map(|i| (i % 253) as u8).collect();
        dev.write(
            &ctx,
            512,
            &[
                IoSeg::from_slice(&data[..512]),
                IoSeg::from_slice(&data[512..]),
            ],
        )
        .unwrap();
        let mut back = vec![0u8; 1536];
        dev.read(&ctx, 512, &[IoSeg::from_mut_slice(&mut back)])
            .unwrap();
        assert_eq!(back, data);

        dev.discard(&ctx, 1024, 512).unwrap();
        dev.write_zeroes(&ctx, 1536, 512, true).unwrap();
        dev.read(&ctx, 512, &[IoSeg::from_mut_slice(&mut back)])
            .unwrap();
        assert_eq!(&back[..512], &data[..512]);
        assert_eq!(&back[512..1536], &[0u8; 1024][..]);
        dev.flush(&ctx).unwrap();

        let mut buf = [0u8; 1024];
        assert!(matches!(
            dev.read(&ctx, (1 << 20) - 512, &[IoSeg::from_mut_slice(&mut buf)]),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.read(&ctx, 100, &[IoSeg::from_mut_slice(&mut buf)]),
            Err(BlockError::Unaligned { .. })
        ));
        let Ok(image) = dev.into_image() else {
            panic!("the device held the only reference")
        };
        image.close().unwrap();

        let ro = ImageDevice::new(Image::open(&path, OpenMode::ReadOnly).unwrap());
        assert!(ro.is_read_only());
        assert!(matches!(
            ro.write(&ctx, 0, &[IoSeg::from_slice(&[0u8; 512])]),
            Err(BlockError::ReadOnly)
        ));
        ro.flush(&ctx).unwrap();
        let mut first = vec![0u8; 512];
        ro.read(&ctx, 512, &[IoSeg::from_mut_slice(&mut first)])
            .unwrap();
        assert_eq!(first, data[..512]);
    }
}

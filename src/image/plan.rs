//! Reads planned for a caller that submits the disk transfers itself and collects their
//! completions later ([`Image::plan_read`]): the asynchronous read path of a queue worker that
//! keeps many requests in flight on one io_uring ring instead of one thread per request.
//!
//! A plan is the read's mapped extents turned into file transfers (descriptor, file offset,
//! and the caller's memory as iovecs). Everything that does not need the disk is done while
//! planning: zeroed extents are filled, base-image extents and pieces not aligned for
//! `O_DIRECT` are read at once, as [`Image::read_many`] does. The caller then owns the
//! transfers: it must keep the memory the iovecs point into valid, and the image open, until
//! every transfer has completed, and ask [`Image::plan_current`] afterwards whether the data
//! it read is still an answer (a reclaim running beside it may have given a block back).

use std::os::fd::RawFd;
use std::sync::atomic::Ordering;

use super::{blocks_spanned, check_range, rlock, shared, total_len, Extent, Image, ImageError};
use crate::iobuf::{as_iovecs, IoSeg};
use crate::units::{Pba, Seq};

/// One file transfer of a [`ReadPlan`]: `want` bytes from `off` of `fd` into `iovs`.
#[derive(Debug)]
pub struct Transfer {
    /// The image's descriptor (its `O_DIRECT` one for a direct image).
    pub fd: RawFd,
    /// Byte offset in the file.
    pub off: u64,
    /// Where the bytes go: the caller's memory, in order, no empty entry.
    pub iovs: Vec<libc::iovec>,
    /// Bytes the transfer must deliver (the sum of `iovs`' lengths); fewer means the file
    /// ended first, which the caller must not take as a complete read.
    pub want: u64,
    /// The first block the transfer reads (for the caller's error messages).
    pub pba: Pba,
}

// SAFETY: a transfer only describes memory (addresses and lengths, as `libc::iovec` holds
// them) and is never dereferenced by this crate outside the `unsafe` submission whose caller
// guarantees the memory (`RingReads::submit`); moving the description to another thread
// changes nothing about that memory's validity.
unsafe impl Send for Transfer {}

/// A read resolved into file transfers, for the caller to submit ([`Image::plan_read`]).
#[derive(Debug)]
pub struct ReadPlan {
    /// The transfers, in the order of the read's bytes; empty when nothing needs the disk.
    pub transfers: Vec<Transfer>,
    /// The read's byte offset on the disk.
    offset: u64,
    /// The read's length in bytes.
    len: u64,
    /// The reclaim generation the read was resolved at.
    gen: u64,
    /// The image's seq when the read was resolved.
    seq: Seq,
    /// The extents the read resolved to (kept when asked for: a recorder's trace).
    extents: Vec<Extent>,
}

impl ReadPlan {
    /// A plan of the given transfers, current whatever reclaims run (for tests of callers).
    #[cfg(test)]
    pub(crate) fn for_test(transfers: Vec<Transfer>) -> Self {
        ReadPlan {
            transfers,
            offset: 0,
            len: 0,
            gen: 0,
            seq: Seq(0),
            extents: Vec::new(),
        }
    }

    /// The read's byte offset on the disk.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The read's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a read of no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image's seq the read was resolved at: the state its data is from.
    pub fn seq(&self) -> Seq {
        self.seq
    }

    /// The extents the read resolved to, in order (exactly the blocks its data comes from),
    /// when the plan was made with `trace`; empty otherwise.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }
}

impl Image {
    /// Resolves a read of `segs` at byte `offset` into transfers the caller submits itself.
    /// `None` when this read is better served by [`read_vectored`](Image::read_vectored): a
    /// buffered image (its reads are page-cache copies), a read resolving to `max_extents`
    /// extents or more, or to as many as relocation on read wants when that is on
    /// (relocation needs the read's data in a private buffer), as [`Image::read_many`]
    /// leaves such reads alone. Range errors are returned as
    /// `read_vectored` returns them.
    ///
    /// The iovecs of the plan point into `segs`: the caller must keep that memory valid
    /// until every transfer it submitted has completed. With `trace`, the plan keeps the
    /// extents the read resolved to ([`ReadPlan::extents`], what a recorder logs).
    pub fn plan_read(
        &self,
        offset: u64,
        segs: &[IoSeg<'_>],
        max_extents: usize,
        trace: bool,
    ) -> Result<Option<ReadPlan>, ImageError> {
        if self.sh.direct.is_none() {
            return Ok(None);
        }
        let len = total_len(segs);
        check_range(self.sh.size, offset, len)?;
        let gen = self.sh.reclaim_gen.load(Ordering::SeqCst);
        if len == 0 {
            return Ok(Some(ReadPlan {
                transfers: Vec::new(),
                offset,
                len,
                gen,
                seq: self.seq(),
                extents: Vec::new(),
            }));
        }
        let bs = self.sh.bs.bytes_u64();
        let (first, n) = blocks_spanned(offset, len, bs);
        let mut ex = Vec::new();
        let seq = {
            let live = rlock(&self.live);
            live.map.extents(first, n, self.sh.base.is_some(), &mut ex);
            Seq(live.seq)
        };
        if ex.len() >= self.alone_from(max_extents) {
            return Ok(None);
        }
        let mut batch = shared::ReadBatch::default();
        self.sh
            .gather_extents(&ex, offset % bs, segs, true, &mut batch)?;
        let transfers = batch
            .reads
            .iter()
            .zip(&batch.wanted)
            .map(|(io, &(pba, want))| Transfer {
                fd: io.fd,
                off: io.off,
                iovs: as_iovecs(&io.segs)
                    .iter()
                    .filter(|v| v.iov_len > 0)
                    .copied()
                    .collect(),
                want,
                pba,
            })
            .collect();
        if !trace {
            ex = Vec::new();
        }
        Ok(Some(ReadPlan {
            transfers,
            offset,
            len,
            gen,
            seq,
            extents: ex,
        }))
    }

    /// After every transfer of `plan` has completed whole: whether the data is the read's
    /// answer. False when a reclaim ran since the plan was made (`serve --retain-seqs`): it
    /// may have given back, and with reuse rewritten, a block the plan read; the caller then
    /// reads again ([`read_vectored`](Image::read_vectored) resolves afresh).
    pub fn plan_current(&self, plan: &ReadPlan) -> bool {
        self.sh.reclaim_gen.load(Ordering::SeqCst) == plan.gen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{OpenMode, OpenOptions};

    fn open(dir: &tempfile::TempDir, direct: bool) -> Image {
        let path = dir.path().join("p.rrow");
        if !path.exists() {
            Image::create_small_for_test(&path);
        }
        Image::open_with_options(
            &path,
            OpenMode::ReadWrite,
            &OpenOptions {
                direct,
                shared_lock: false,
            },
        )
        .unwrap()
    }

    /// A page-aligned buffer, as guest memory is.
    struct Aligned(Vec<u8>, usize);

    impl Aligned {
        fn new(len: usize) -> Self {
            let v = vec![0u8; len + 4096];
            let skip = (4096 - v.as_ptr() as usize % 4096) % 4096;
            Aligned(v, skip)
        }
        fn bytes(&mut self, len: usize) -> &mut [u8] {
            &mut self.0[self.1..self.1 + len]
        }
    }

    /// Runs a plan's transfers with `preadv`, as the caller's ring would.
    fn run(plan: &ReadPlan) -> Vec<u64> {
        plan.transfers
            .iter()
            .map(|t| {
                // SAFETY: the iovecs point into the test's live buffer; fd is the image's.
                let n = unsafe {
                    libc::preadv(
                        t.fd,
                        t.iovs.as_ptr(),
                        t.iovs.len() as i32,
                        t.off as libc::off_t,
                    )
                };
                assert!(n >= 0, "{}", std::io::Error::last_os_error());
                n as u64
            })
            .collect()
    }

    #[test]
    fn a_planned_read_gives_the_data_a_plain_read_gives() {
        let dir = tempfile::tempdir().unwrap();
        let img = open(&dir, true);
        let mut w = Aligned::new(4 * 4096);
        for (i, b) in w.bytes(4 * 4096).iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        img.write_at(8192, w.bytes(4 * 4096)).unwrap();
        // One block overwritten: the range is three runs.
        let mut one = Aligned::new(4096);
        one.bytes(4096).fill(7);
        img.write_at(8192 + 4096, one.bytes(4096)).unwrap();
        let mut expect = vec![0u8; 6 * 4096];
        img.read_at(4096, &mut expect).unwrap();

        let mut got = Aligned::new(6 * 4096);
        let buf = got.bytes(6 * 4096);
        buf.fill(0xee);
        let segs = [IoSeg::from_mut_slice(buf)];
        let plan = img
            .plan_read(4096, &segs, usize::MAX, true)
            .unwrap()
            .unwrap();
        // The unwritten block was zeroed while planning; the three runs are transfers.
        assert_eq!(plan.transfers.len(), 3);
        let done = run(&plan);
        for (t, d) in plan.transfers.iter().zip(done) {
            assert_eq!(t.want, d);
        }
        assert!(img.plan_current(&plan));
        assert_eq!(got.bytes(6 * 4096), &expect[..]);
        // The trace is the map's view of the range, as the plain read's; seq and range too.
        let mut traced = Vec::new();
        let mut again = vec![0u8; 6 * 4096];
        img.read_vectored(
            4096,
            &[IoSeg::from_mut_slice(&mut again)],
            Some(&mut traced),
        )
        .unwrap();
        assert_eq!(plan.extents(), &traced[..]);
        assert_eq!(plan.seq(), img.seq());
        assert_eq!((plan.offset(), plan.len()), (4096, 6 * 4096));
        img.close().unwrap();
    }

    #[test]
    fn a_plan_made_before_a_reclaim_is_no_longer_current() {
        let dir = tempfile::tempdir().unwrap();
        let img = open(&dir, true);
        let mut w = Aligned::new(4096);
        for v in 1..=2u8 {
            w.bytes(4096).fill(v);
            img.write_at(0, w.bytes(4096)).unwrap();
        }
        img.flush().unwrap();
        let mut got = Aligned::new(4096);
        let segs = [IoSeg::from_mut_slice(got.bytes(4096))];
        let before = img.plan_read(0, &segs, usize::MAX, false).unwrap().unwrap();
        assert!(img.plan_current(&before));
        // The first version's block is given back: a read resolved before may have read a
        // block that now serves another write.
        img.reclaim(Seq(2), &[], &mut |_, _| {}).unwrap();
        assert!(!img.plan_current(&before));
        let after = img.plan_read(0, &segs, usize::MAX, false).unwrap().unwrap();
        assert!(img.plan_current(&after));
        img.close().unwrap();
    }

    #[test]
    fn reads_that_need_more_are_not_planned() {
        let dir = tempfile::tempdir().unwrap();
        let img = open(&dir, true);
        let mut w = Aligned::new(4096);
        for lba in [0u64, 2, 4] {
            w.bytes(4096).fill(lba as u8 + 1);
            img.write_at(lba * 4096, w.bytes(4096)).unwrap();
        }
        let mut got = Aligned::new(5 * 4096);
        let segs = [IoSeg::from_mut_slice(got.bytes(5 * 4096))];
        // Five extents (three mapped, two zeroed): over a limit of 4, and of relocation.
        assert!(img.plan_read(0, &segs, 4, false).unwrap().is_none());
        img.set_relocate_on_read(Some(4));
        assert!(img
            .plan_read(0, &segs, usize::MAX, false)
            .unwrap()
            .is_none());
        img.set_relocate_on_read(None);
        assert!(img
            .plan_read(0, &segs, usize::MAX, false)
            .unwrap()
            .is_some());
        // Out of range: the error a read gives.
        assert!(matches!(
            img.plan_read(1 << 20, &segs, usize::MAX, false),
            Err(ImageError::OutOfRange { .. })
        ));
        img.close().unwrap();
        // Buffered: never planned.
        let img = open(&dir, false);
        assert!(img
            .plan_read(0, &segs, usize::MAX, false)
            .unwrap()
            .is_none());
        img.close().unwrap();
    }
}

//! Direct data I/O: the image's data blocks read and written with `O_DIRECT`, past the host
//! page cache.
//!
//! With [`super::OpenOptions::direct`] on, an image holds a second descriptor of its file,
//! opened with `O_DIRECT`, and every data-block transfer goes through it: the full-block write
//! path, sub-block read-modify-writes, zeroing read-modify-writes, relocation copies, and every
//! read served from extents (live reads, snapshots, `read_block`, `read_extents` for replay).
//! The journal, the headers and the checkpoints stay on the ordinary buffered descriptor, and
//! [`super::Image::flush`] keeps its protocol: `fdatasync` of the file makes the data of
//! completed `O_DIRECT` writes durable as well (they were issued before the journal records
//! that name them), so docs/format.md's ordering holds unchanged.
//!
//! `O_DIRECT` wants the file offset, the memory address and the length of every segment
//! aligned. The alignment comes from `statx(STATX_DIOALIGN)` when the kernel reports it, and is
//! 4096 for both otherwise. Data blocks sit on aligned file offsets (the image refuses direct
//! I/O otherwise, see [`check_layout`]), so writes are always offset-aligned. A transfer whose
//! segments are not all aligned (odd guest buffers, 512-byte pieces on a 4096-byte device, a
//! read starting inside a sector) is *bounced*: copied through an aligned per-thread buffer
//! that is itself read or written with `O_DIRECT`. Nothing is ever sent through the page cache
//! silently.

use std::cell::RefCell;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use super::io::{preadv_full, pwritev_all};
use super::uring::{self, Io};
use super::ImageError;
use crate::iobuf::{gather, scatter, total_len, IoSeg, IoSegs, PageBuf};

/// Alignment assumed when the kernel does not report one (`STATX_DIOALIGN` needs Linux 6.1).
const FALLBACK_ALIGN: u64 = 4096;

/// Size of the per-thread bounce buffer (a transfer larger than this is bounced in pieces).
const BOUNCE_BYTES: usize = 256 << 10;

/// A descriptor of the image file opened with `O_DIRECT`, and the alignment it requires.
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    /// Alignment of memory addresses.
    mem_align: u64,
    /// Alignment of file offsets and of every segment's length.
    off_align: u64,
}

impl DirectFile {
    /// Opens `path` with `O_DIRECT` (read-only or read-write). A filesystem that refuses
    /// `O_DIRECT` gives [`ImageError::DirectUnsupported`].
    pub fn open(path: &Path, writable: bool) -> Result<DirectFile, ImageError> {
        let unsupported = |source| ImageError::DirectUnsupported {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .map_err(|e| {
                if e.raw_os_error() == Some(libc::EINVAL) {
                    unsupported(e)
                } else {
                    ImageError::io("cannot open the image for direct I/O", e)
                }
            })?;
        let (mem_align, off_align) = match dio_align(&file) {
            DioAlign::Reported { mem, offset } => (mem, offset),
            DioAlign::Unknown => (FALLBACK_ALIGN, FALLBACK_ALIGN),
            DioAlign::Unsupported => {
                return Err(unsupported(io::Error::from_raw_os_error(libc::EINVAL)));
            }
        };
        Ok(DirectFile {
            file,
            mem_align,
            off_align,
        })
    }

    /// The `O_DIRECT` descriptor, for reads queued on an io_uring ring: only with segments
    /// that [`is_aligned`](Self::is_aligned) accepts.
    pub(super) fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// True when `segs` at `off` can go to the kernel as they are.
    pub(super) fn is_aligned(&self, segs: &[IoSeg<'_>], off: u64) -> bool {
        off % self.off_align == 0
            && segs.iter().all(|s| {
                s.as_ptr() as u64 % self.mem_align == 0 && s.len() as u64 % self.off_align == 0
            })
    }

    /// One aligned transfer through this thread's io_uring ring when the thread polls for
    /// completions ([`uring::set_completion_poll`]: a queue's worker serving a lone request),
    /// so that its wait is polled instead of slept; `None` (nothing transferred) otherwise, or
    /// without a ring. Returns the bytes transferred, as `preadv` would. Nothing is built
    /// for the ring unless it is used: the other threads' transfers pay one thread-local read.
    fn single_through_ring(
        &self,
        segs: &[IoSeg<'_>],
        off: u64,
        write: bool,
    ) -> Option<io::Result<u64>> {
        if !uring::uses_ring_for_single() {
            return None;
        }
        let (fd, segs) = (self.raw_fd(), IoSegs::from_slice(segs));
        let mut ios = [if write {
            Io::write(fd, off, segs)
        } else {
            Io::read(fd, off, segs)
        }];
        let r = uring::run_all(&mut ios)?;
        Some(r.map(|()| ios.iter().map(|i| i.done).sum()))
    }

    /// Reads the segments' length at `off`. Returns the number of bytes read before end of
    /// file (less than the total only at end of file), like [`preadv_full`].
    pub fn read(&self, segs: &[IoSeg<'_>], off: u64) -> io::Result<u64> {
        if self.is_aligned(segs, off) {
            if let Some(r) = self.single_through_ring(segs, off, false) {
                return r;
            }
            return preadv_full(&self.file, segs, off);
        }
        let len = total_len(segs);
        let end = off
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(self.off_align))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        let start = off - off % self.off_align;
        with_bounce(self.bounce_align(), |buf| {
            let mut w = start;
            while w < end {
                let wl = (end - w).min(buf.len() as u64);
                let chunk = buf.get_mut(..wl as usize).unwrap_or(&mut []);
                let got = self.read_buf(chunk, w)?;
                // The part of the request this window holds, up to end of file.
                let from = off.max(w);
                let to = (off + len).min(w + got);
                if to > from {
                    let src = chunk
                        .get((from - w) as usize..(to - w) as usize)
                        .unwrap_or(&[]);
                    scatter(segs, from - off, src);
                }
                if got < wl {
                    return Ok(to.saturating_sub(off));
                }
                w += wl;
            }
            Ok(len)
        })
    }

    /// Writes all of the segments at `off`. The offset and the total length must be aligned
    /// (data blocks always are); the segments themselves may be anywhere.
    pub fn write(&self, segs: &[IoSeg<'_>], off: u64) -> io::Result<()> {
        if self.is_aligned(segs, off) {
            if let Some(r) = self.single_through_ring(segs, off, true) {
                return match r? {
                    n if n == total_len(segs) => Ok(()),
                    _ => Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the direct write stopped short",
                    )),
                };
            }
            return pwritev_all(&self.file, segs, off);
        }
        let len = total_len(segs);
        if off % self.off_align != 0 || len % self.off_align != 0 {
            // Never reached through the engine: data blocks lie on aligned offsets.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "direct write of {len} bytes at {off} is not aligned to {}",
                    self.off_align
                ),
            ));
        }
        with_bounce(self.bounce_align(), |buf| {
            let mut done = 0u64;
            while done < len {
                let n = (len - done).min(buf.len() as u64);
                let chunk = buf.get_mut(..n as usize).unwrap_or(&mut []);
                gather(segs, done, chunk);
                self.file.write_all_at(chunk, off + done)?;
                done += n;
            }
            Ok(())
        })
    }

    /// Writes a whole buffer of the engine's own (sub-block and relocation paths).
    pub fn write_buf(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.write(&[IoSeg::from_slice(buf)], off)
    }

    /// Reads into an aligned buffer until it is full or the file ends.
    fn read_buf(&self, buf: &mut [u8], off: u64) -> io::Result<u64> {
        let mut done = 0usize;
        while done < buf.len() {
            let rest = buf.get_mut(done..).unwrap_or(&mut []);
            match self.file.read_at(rest, off + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done as u64)
    }

    /// Alignment of the bounce buffer: both requirements, and at least a page's worth.
    fn bounce_align(&self) -> usize {
        self.mem_align.max(self.off_align).max(FALLBACK_ALIGN) as usize
    }
}

/// Runs `f` with this thread's aligned bounce buffer of [`BOUNCE_BYTES`] (made, or remade
/// for a larger alignment, on first use).
fn with_bounce<R>(align: usize, f: impl FnOnce(&mut [u8]) -> io::Result<R>) -> io::Result<R> {
    thread_local! {
        static BOUNCE: RefCell<Option<(usize, PageBuf)>> = const { RefCell::new(None) };
    }
    let fresh = || {
        PageBuf::aligned(BOUNCE_BYTES, align)
            .ok_or_else(|| io::Error::other("cannot align the bounce buffer"))
    };
    BOUNCE.with(|b| match b.try_borrow_mut() {
        Ok(mut slot) => {
            if !matches!(slot.as_ref(), Some((a, _)) if *a >= align) {
                *slot = Some((align, fresh()?));
            }
            match slot.as_mut() {
                Some((_, buf)) => f(buf.bytes_mut()),
                None => f(fresh()?.bytes_mut()),
            }
        }
        // Not reached (nothing re-enters while the buffer is lent), but stay correct.
        Err(_) => f(fresh()?.bytes_mut()),
    })
}

/// What `statx(STATX_DIOALIGN)` says about a file.
enum DioAlign {
    /// The required memory and offset alignments.
    Reported { mem: u64, offset: u64 },
    /// The kernel (or the filesystem) does not report them.
    Unknown,
    /// The file does not support direct I/O.
    Unsupported,
}

fn dio_align(file: &File) -> DioAlign {
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: statx writes at most one `struct statx` into `stx`, which is that large; the
    // empty path with AT_EMPTY_PATH names the open descriptor itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            stx.as_mut_ptr(),
        )
    };
    if r != 0 {
        return DioAlign::Unknown;
    }
    // SAFETY: the buffer was zero-initialised (a valid value for this plain-integer struct)
    // and statx succeeded.
    let stx = unsafe { stx.assume_init() };
    if stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return DioAlign::Unknown;
    }
    let (mem, offset) = (
        u64::from(stx.stx_dio_mem_align),
        u64::from(stx.stx_dio_offset_align),
    );
    if offset == 0 {
        return DioAlign::Unsupported;
    }
    if !mem.is_power_of_two() || !offset.is_power_of_two() {
        return DioAlign::Unknown;
    }
    DioAlign::Reported { mem, offset }
}

/// Checks that an image's layout suits direct I/O (and logs that direct I/O is on): data blocks must start on aligned offsets
/// and fill whole pages (a block smaller than a page would share its page with buffered
/// journal or checkpoint writes, and the kernel cannot keep a page that is written both ways
/// at once coherent).
pub fn check_layout(
    path: &Path,
    d: &DirectFile,
    block_size: u64,
    data_offset: u64,
) -> Result<(), ImageError> {
    let page = super::io::page_size().unwrap_or(4096);
    let need = d.off_align.max(page);
    if block_size % need != 0 || data_offset % need != 0 {
        return Err(ImageError::DirectUnsuitable {
            path: path.to_path_buf(),
            reason: format!(
                "direct I/O needs a block size that is a multiple of {need} bytes (the page \
                 size and the device's direct I/O alignment); this image's is {block_size}"
            ),
        });
    }
    log::info!(
        "{}: data blocks use direct I/O (memory alignment {}, offset and length alignment {})",
        path.display(),
        d.mem_align,
        d.off_align
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn direct_file(data: &[u8]) -> (tempfile::NamedTempFile, DirectFile) {
        // The build directory: on the test machines a disk filesystem, as the daemon's images.
        let mut t = tempfile::NamedTempFile::new_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target"))
            .unwrap();
        std::io::Write::write_all(&mut t, data).unwrap();
        t.as_file().sync_all().unwrap();
        let d = DirectFile::open(t.path(), true).unwrap();
        (t, d)
    }

    #[test]
    fn bounced_read_matches_the_file_at_any_offset_and_address() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let (_t, d) = direct_file(&data);
        let mut buf = vec![0u8; 9000];
        for (off, len) in [
            (0u64, 512usize),
            (512, 4096),
            (1, 3),
            (4095, 2),
            (100, 8000),
        ] {
            // An odd address inside `buf`.
            let dst = &mut buf[1..1 + len];
            let got = d.read(&[IoSeg::from_mut_slice(dst)], off).unwrap();
            assert_eq!(got, len as u64);
            assert_eq!(&buf[1..1 + len], &data[off as usize..off as usize + len]);
        }
        // Past the end: only what the file holds is counted.
        let mut tail = vec![0xaau8; 4096];
        let got = d
            .read(&[IoSeg::from_mut_slice(&mut tail[..1000])], 19_500)
            .unwrap();
        assert_eq!(got, 500);
        assert_eq!(&tail[..500], &data[19_500..]);
    }

    #[test]
    fn a_polling_thread_sends_single_aligned_transfers_through_its_ring() {
        use std::time::Duration;
        let data: Vec<u8> = (0..20_000u32).map(|i| (i * 13 + i / 241) as u8).collect();
        let (t, d) = direct_file(&data);
        let mut buf = PageBuf::new(8192);
        for window in [Duration::from_millis(100), Duration::ZERO] {
            uring::set_completion_poll(window);
            let before = uring::queued();
            // Aligned, past the end of the file: only what it holds is counted.
            let got = d
                .read(&[IoSeg::from_mut_slice(buf.bytes_mut())], 16384)
                .unwrap();
            assert_eq!(got, 20_000 - 16384);
            assert_eq!(&buf.bytes()[..got as usize], &data[16384..]);
            let mut w = PageBuf::new(4096);
            w.bytes_mut().fill(window.as_millis() as u8 + 1);
            d.write(&[IoSeg::from_slice(w.bytes())], 4096).unwrap();
            let back = std::fs::read(t.path()).unwrap();
            assert!(back[4096..8192]
                .iter()
                .all(|&b| b == window.as_millis() as u8 + 1));
            assert_eq!(back[8192..], data[8192..]);
            // Through the ring where the thread polls (the read twice: its remainder after the
            // short first transfer is asked for again and meets the end of the file; the write
            // once); `preadv`/`pwritev` where it does not.
            let queued = uring::queued() - before;
            assert_eq!(queued, if window.is_zero() { 0 } else { 3 }, "{window:?}");
        }
    }

    #[test]
    fn bounced_write_lands_every_byte() {
        let (t, d) = direct_file(&[0u8; 16384]);
        let src: Vec<u8> = (0..8193u32).map(|i| (i % 253) as u8).collect();
        // Three segments of odd lengths at odd addresses, 8192 bytes in total.
        let segs = [
            IoSeg::from_slice(&src[1..100]),
            IoSeg::from_slice(&src[100..5000]),
            IoSeg::from_slice(&src[5000..8193]),
        ];
        d.write(&segs, 4096).unwrap();
        let back = std::fs::read(t.path()).unwrap();
        assert_eq!(&back[4096..4096 + 8192], &src[1..8193]);
        assert!(back[..4096].iter().all(|&b| b == 0));
        // An unaligned file offset is refused, never written some other way.
        assert!(d.write(&[IoSeg::from_slice(&src[..512])], 100).is_err());
    }
}

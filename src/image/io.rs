//! Positioned vectored I/O on the image file: `preadv`/`pwritev` loops that finish short
//! transfers, straight into and out of the caller's segments.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::iobuf::{as_iovecs, copy_out, IoSeg};

const IOV_MAX: usize = 1024;

/// Advances an iovec list by `n` bytes, dropping finished entries.
pub(crate) fn advance(iovs: &mut Vec<libc::iovec>, mut n: usize) {
    let mut done = 0;
    for v in iovs.iter_mut() {
        if n == 0 {
            break;
        }
        if n >= v.iov_len {
            n -= v.iov_len;
            done += 1;
        } else {
            // SAFETY: n < iov_len, so the advanced pointer stays inside the same segment.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
            v.iov_len -= n;
            n = 0;
        }
    }
    iovs.drain(..done);
}

/// Reads exactly the segments' length at `offset`. Returns the number of bytes read before
/// end of file (less than the total only at EOF).
pub fn preadv_full(file: &File, segs: &[IoSeg<'_>], offset: u64) -> io::Result<u64> {
    let mut iovs: Vec<libc::iovec> = as_iovecs(segs)
        .iter()
        .filter(|v| v.iov_len > 0)
        .copied()
        .collect();
    let mut pos = offset;
    let mut total = 0u64;
    while !iovs.is_empty() {
        let cnt = iovs.len().min(IOV_MAX);
        let off = libc::off_t::try_from(pos)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        // SAFETY: each iovec describes memory valid for writes (IoSeg's constructor contract,
        // and `advance` keeps them inside their segments); the fd is open for the call.
        let r = unsafe { libc::preadv(file.as_raw_fd(), iovs.as_ptr(), cnt as libc::c_int, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            break;
        }
        let r = r as usize;
        advance(&mut iovs, r);
        pos += r as u64;
        total += r as u64;
    }
    Ok(total)
}

/// Writes all of the segments at `offset`.
pub fn pwritev_all(file: &File, segs: &[IoSeg<'_>], offset: u64) -> io::Result<()> {
    let mut iovs: Vec<libc::iovec> = as_iovecs(segs)
        .iter()
        .filter(|v| v.iov_len > 0)
        .copied()
        .collect();
    let mut pos = offset;
    while !iovs.is_empty() {
        let cnt = iovs.len().min(IOV_MAX);
        let off = libc::off_t::try_from(pos)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset overflow"))?;
        // SAFETY: each iovec describes memory valid for reads (IoSeg's constructor contract);
        // the fd is open for the call.
        let r = unsafe { libc::pwritev(file.as_raw_fd(), iovs.as_ptr(), cnt as libc::c_int, off) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "pwritev wrote nothing",
            ));
        }
        let r = r as usize;
        advance(&mut iovs, r);
        pos += r as u64;
    }
    Ok(())
}

/// crc32c of the bytes of `segs` (copied out through [`copy_out`]'s per-thread buffer: the
/// segments may be guest memory, which must not be borrowed as a Rust slice).
pub fn crc_segs(segs: &[IoSeg<'_>]) -> u32 {
    crc_segs_seeing(segs, &mut |_| {})
}

/// As [`crc_segs`], handing each piece of the copied data to `see` too (in order, as
/// [`copy_out`] cuts it), so a caller that needs the data does not copy it out again.
pub fn crc_segs_seeing(segs: &[IoSeg<'_>], see: &mut dyn FnMut(&[u8])) -> u32 {
    let mut crc = 0u32;
    copy_out(segs, &mut |piece| {
        crc = crate::crc::crc32c_append(crc, piece);
        see(piece);
    });
    crc
}

/// Takes an exclusive `flock` on the file (read-write opens); false when another open file
/// description holds a lock.
pub fn lock_exclusive(file: &File) -> io::Result<bool> {
    flock(file, libc::LOCK_EX)
}

/// Takes a shared `flock` on the file (`check`: no read-write user may be active).
pub fn lock_shared(file: &File) -> io::Result<bool> {
    flock(file, libc::LOCK_SH)
}

/// Tries for up to ~100 ms: a lock can be held briefly by a child process that inherited the
/// descriptor between its fork and its exec (descriptors are close-on-exec).
fn flock(file: &File, op: libc::c_int) -> io::Result<bool> {
    for attempt in 0..10 {
        // SAFETY: flock on an fd we own; no memory is involved.
        let r = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        if attempt < 9 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    Ok(false)
}

/// The system's page size, if it reports a sane one (a power of two).
pub fn page_size() -> Option<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().filter(|p| p.is_power_of_two())
}

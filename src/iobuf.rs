//! Scatter-gather buffer segments shared by every layer.
//!
//! An [`IoSeg`] is a pointer and a length, laid out exactly like `struct iovec`, so a slice of
//! them goes straight to `preadv`/`pwritev` with no copy. The daemon builds them over guest
//! memory (which the guest may change at any time, so no Rust reference to it is ever formed);
//! tests and tools build them over ordinary byte slices with the safe constructors.

use std::marker::PhantomData;

use smallvec::SmallVec;

/// The scatter-gather list of one request: up to four segments inline (a guest's read or
/// write has one or two data buffers), on the heap beyond, so building one per request costs
/// no allocation in the common case.
pub type IoSegs<'a> = SmallVec<[IoSeg<'a>; 4]>;

/// One segment of a scatter-gather list: memory valid for reads and writes of `len()` bytes for
/// the lifetime `'a`.
#[derive(Clone, Copy, Debug)]
#[repr(transparent)]
pub struct IoSeg<'a> {
    iov: libc::iovec,
    _life: PhantomData<&'a mut [u8]>,
}

// SAFETY: an IoSeg is a pointer/length pair into memory that the constructor's contract makes
// valid for 'a; sending it to another thread is no different from sending the `&mut [u8]` or
// the guest-memory mapping it was made from.
unsafe impl Send for IoSeg<'_> {}
// SAFETY: as above; shared access only hands out the pointer, all accesses go through
// `unsafe` code that upholds the constructor's contract.
unsafe impl Sync for IoSeg<'_> {}

impl<'a> IoSeg<'a> {
    /// A segment over a mutable byte slice (for reads into it, or writes from it).
    pub fn from_mut_slice(buf: &'a mut [u8]) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            },
            _life: PhantomData,
        }
    }

    /// A segment over a shared byte slice. Only valid as a write *source*: passing it to a
    /// read would write through a shared reference, so [`crate::iobuf`] users must not.
    /// The engine's write paths only ever read from their segments.
    pub fn from_slice(buf: &'a [u8]) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: buf.as_ptr() as *mut libc::c_void,
                iov_len: buf.len(),
            },
            _life: PhantomData,
        }
    }

    /// A segment over raw memory, e.g. a guest memory region.
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for all of `'a`, and must not be
    /// freed or unmapped during `'a`. Other parties (a guest vCPU) may access the memory
    /// concurrently; users of the segment only move bytes in and out of it with raw copies or
    /// system calls and never form a Rust reference to it.
    pub unsafe fn from_raw(ptr: *mut u8, len: usize) -> Self {
        Self {
            iov: libc::iovec {
                iov_base: ptr.cast(),
                iov_len: len,
            },
            _life: PhantomData,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.iov.iov_len
    }

    /// True when the segment is empty.
    pub fn is_empty(&self) -> bool {
        self.iov.iov_len == 0
    }

    /// Start of the segment.
    pub fn as_ptr(&self) -> *mut u8 {
        self.iov.iov_base.cast()
    }

    /// The sub-segment `[start, start + len)`, or `None` when it is out of bounds.
    pub fn sub(&self, start: usize, len: usize) -> Option<IoSeg<'a>> {
        let end = start.checked_add(len)?;
        if end > self.len() {
            return None;
        }
        // SAFETY: [start, end) lies inside this segment, which the constructor's contract makes
        // valid for 'a.
        Some(unsafe { IoSeg::from_raw(self.as_ptr().add(start), len) })
    }

    /// Copies `src` into the segment at `offset`. Panics never; returns false when out of bounds.
    pub fn copy_from(&self, offset: usize, src: &[u8]) -> bool {
        match offset.checked_add(src.len()) {
            Some(end) if end <= self.len() => {
                // SAFETY: bounds checked above; the segment is valid for writes (constructor
                // contract) and cannot overlap `src`, a Rust shared slice we own a borrow of.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr(),
                        self.as_ptr().add(offset),
                        src.len(),
                    )
                };
                true
            }
            _ => false,
        }
    }

    /// Copies bytes from the segment at `offset` into `dst`. Returns false when out of bounds.
    pub fn copy_to(&self, offset: usize, dst: &mut [u8]) -> bool {
        match offset.checked_add(dst.len()) {
            Some(end) if end <= self.len() => {
                // SAFETY: bounds checked above; the segment is valid for reads and `dst` is an
                // exclusive Rust borrow, so the two cannot overlap.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.as_ptr().add(offset),
                        dst.as_mut_ptr(),
                        dst.len(),
                    )
                };
                true
            }
            _ => false,
        }
    }

    /// Fills `len` bytes at `offset` with zeros. Returns false when out of bounds.
    pub fn zero(&self, offset: usize, len: usize) -> bool {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => {
                // SAFETY: bounds checked above; the segment is valid for writes.
                unsafe { std::ptr::write_bytes(self.as_ptr().add(offset), 0, len) };
                true
            }
            _ => false,
        }
    }
}

/// The segments as a slice of `iovec`, for `preadv`/`pwritev`.
pub fn as_iovecs<'s>(segs: &'s [IoSeg<'_>]) -> &'s [libc::iovec] {
    // SAFETY: IoSeg is repr(transparent) over libc::iovec, so the layouts are identical.
    unsafe { std::slice::from_raw_parts(segs.as_ptr().cast::<libc::iovec>(), segs.len()) }
}

/// Total length in bytes of a list of segments (saturating).
pub fn total_len(segs: &[IoSeg<'_>]) -> u64 {
    segs.iter()
        .fold(0u64, |a, s| a.saturating_add(s.len() as u64))
}

/// Bytes of the per-thread buffer [`copy_out`] copies data through.
pub const GATHER_LEN: usize = 16 * 1024;

/// Copies the bytes of `segs` out, in order, through a per-thread buffer of [`GATHER_LEN`]
/// bytes, and hands them to `f`: all of them in one call when they fit (every 4 KiB write,
/// however many segments it came in), else in pieces of at most that many bytes. The
/// segments may be guest memory, which must not be borrowed as a Rust slice; this is how
/// their data gets checksummed or hashed. The buffer is reused (zeroing a fresh one per
/// write cost more than the copy itself for 4 KiB writes); a call from inside `f` gets a
/// buffer of its own. Returns false, having handed out only what came before, if a segment
/// could not be copied (which the segments' own lengths rule out).
pub fn copy_out(segs: &[IoSeg<'_>], f: &mut dyn FnMut(&[u8])) -> bool {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; GATHER_LEN]);
    }
    BUF.with(|b| {
        let mut own = Vec::new();
        let mut guard = b.try_borrow_mut();
        let buf = match guard.as_deref_mut() {
            Ok(v) => v.as_mut_slice(),
            Err(_) => {
                own.resize(GATHER_LEN, 0);
                own.as_mut_slice()
            }
        };
        let mut fill = 0;
        for s in segs {
            let mut off = 0;
            while off < s.len() {
                let n = (s.len() - off).min(buf.len() - fill);
                let Some(dst) = buf.get_mut(fill..fill + n) else {
                    return false;
                };
                if !s.copy_to(off, dst) {
                    return false;
                }
                fill += n;
                off += n;
                if fill == buf.len() {
                    f(buf);
                    fill = 0;
                }
            }
        }
        if fill > 0 {
            f(buf.get(..fill).unwrap_or_default());
        }
        true
    })
}

/// Splits a scatter-gather list at byte range `[start, start + len)`, returning the segments
/// that cover exactly that range (empty when `len == 0`), or `None` when the range is out of
/// bounds.
pub fn slice_segs<'a>(segs: &[IoSeg<'a>], start: u64, len: u64) -> Option<IoSegs<'a>> {
    let mut out = IoSegs::new();
    let mut pos = 0u64;
    let end = start.checked_add(len)?;
    for s in segs {
        let s_start = pos;
        let s_end = pos + s.len() as u64;
        pos = s_end;
        if s_end <= start || s_start >= end {
            continue;
        }
        let a = start.max(s_start) - s_start;
        let b = end.min(s_end) - s_start;
        out.push(s.sub(a as usize, (b - a) as usize)?);
    }
    if pos < end {
        return None;
    }
    Some(out)
}

/// Copies `src` into the concatenated segments starting `at` bytes in (as much as both
/// hold).
pub fn scatter(segs: &[IoSeg<'_>], at: u64, src: &[u8]) {
    let mut pos = 0usize;
    for s in slice_segs(segs, at, src.len() as u64).unwrap_or_default() {
        if let Some(part) = src.get(pos..pos + s.len()) {
            s.copy_from(0, part);
        }
        pos += s.len();
    }
}

/// Fills `dst` from the concatenated segments starting `at` bytes in.
pub fn gather(segs: &[IoSeg<'_>], at: u64, dst: &mut [u8]) {
    let mut pos = 0usize;
    for s in slice_segs(segs, at, dst.len() as u64).unwrap_or_default() {
        if let Some(part) = dst.get_mut(pos..pos + s.len()) {
            s.copy_to(0, part);
        }
        pos += s.len();
    }
}

/// Alignment of a [`PageBuf`]: a page, which `O_DIRECT` accepts on the file systems in use
/// (a coarser requirement only sends the I/O through the engine's bounce buffer).
const PAGE: usize = 4096;

/// An aligned heap buffer (a window into an over-sized vector; no `unsafe`), page-aligned
/// unless made with [`PageBuf::aligned`], so that an `O_DIRECT` image reads into it and
/// writes from it as it is, without a bounce buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBuf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageBuf {
    /// `len` zeroed bytes, page-aligned.
    pub fn new(len: usize) -> PageBuf {
        // `align_offset` may give up; the buffer then stays unaligned, which only costs
        // direct I/O a bounce.
        Self::aligned(len, PAGE).unwrap_or_else(|| PageBuf {
            mem: vec![0u8; len],
            start: 0,
            len,
        })
    }

    /// `len` zeroed bytes starting at a multiple of `align` (a power of two); `None` when the
    /// allocation's address cannot be aligned so.
    pub fn aligned(len: usize, align: usize) -> Option<PageBuf> {
        let mem = vec![0u8; len.checked_add(align)?];
        let start = mem.as_ptr().align_offset(align);
        (start <= align).then_some(PageBuf { mem, start, len })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        self.mem
            .get(self.start..self.start + self.len)
            .unwrap_or(&[])
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        self.mem
            .get_mut(self.start..self.start + self.len)
            .unwrap_or(&mut [])
    }

    /// The concatenation of `parts`.
    pub fn concat(parts: &[PageBuf]) -> PageBuf {
        let mut out = PageBuf::new(parts.iter().map(PageBuf::len).sum());
        let mut at = 0;
        for p in parts {
            if let Some(dst) = out.bytes_mut().get_mut(at..at + p.len) {
                dst.copy_from_slice(p.bytes());
            }
            at += p.len;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_crosses_segments() {
        let mut a = [1u8; 4];
        let mut b = [2u8; 4];
        let segs = [IoSeg::from_mut_slice(&mut a), IoSeg::from_mut_slice(&mut b)];
        let s = slice_segs(&segs, 2, 4).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].len(), 2);
        assert_eq!(s[1].len(), 2);
        assert!(slice_segs(&segs, 6, 4).is_none());
        assert_eq!(total_len(&segs), 8);
        assert!(s[1].zero(0, 2));
        assert!(!s[1].zero(1, 2));
        drop(s);
        assert_eq!(b, [0, 0, 2, 2]);
    }

    #[test]
    fn aligned_buffers_start_where_asked_and_hold_len_zeroed_bytes() {
        for (len, align) in [(0, 512), (1, 512), (4096, 4096), (100_000, 65536)] {
            let mut b = PageBuf::aligned(len, align).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(
                b.bytes().as_ptr().align_offset(align),
                0,
                "{len} at {align}"
            );
            assert!(b.bytes().iter().all(|&x| x == 0));
            b.bytes_mut().fill(7);
            assert!(b.bytes().iter().all(|&x| x == 7));
        }
        assert!(
            PageBuf::aligned(usize::MAX, 4096).is_none(),
            "too large: no panic"
        );
        assert_eq!(PageBuf::new(8192).bytes().as_ptr().align_offset(4096), 0);
    }

    /// The pieces `copy_out` hands out, as (length, bytes).
    fn copied_out(segs: &[IoSeg<'_>]) -> (Vec<usize>, Vec<u8>) {
        let (mut lens, mut bytes) = (Vec::new(), Vec::new());
        assert!(copy_out(segs, &mut |p| {
            lens.push(p.len());
            bytes.extend_from_slice(p);
        }));
        (lens, bytes)
    }

    #[test]
    fn copy_out_hands_out_the_data_in_order_whole_when_it_fits() {
        let data: Vec<u8> = (0..3 * GATHER_LEN + 100)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        // Cut into segments of uneven sizes, some empty, as a guest's chain may give them.
        for cuts in [
            vec![0, 4096],
            vec![0, 512, 512, 1000, 4096],
            vec![0, GATHER_LEN],
            vec![0, 1, GATHER_LEN + 1],
            vec![0, 100, GATHER_LEN - 1, GATHER_LEN + 7, 3 * GATHER_LEN + 100],
            vec![0, 0],
        ] {
            let segs: Vec<IoSeg<'_>> = cuts
                .windows(2)
                .map(|w| IoSeg::from_slice(&data[w[0]..w[1]]))
                .collect();
            let total = *cuts.last().unwrap();
            let (lens, bytes) = copied_out(&segs);
            assert_eq!(bytes, &data[..total], "{cuts:?}");
            // Full pieces but the last; one piece when it all fits; none for no data.
            let want: Vec<usize> = (0..total.div_ceil(GATHER_LEN))
                .map(|k| (total - k * GATHER_LEN).min(GATHER_LEN))
                .collect();
            assert_eq!(lens, want, "{cuts:?}");
        }
    }

    #[test]
    fn copy_out_inside_copy_out_gets_its_own_buffer() {
        let a = vec![1u8; 5000];
        let b = vec![2u8; 3000];
        let (sa, sb) = ([IoSeg::from_slice(&a)], [IoSeg::from_slice(&b)]);
        let mut outer = Vec::new();
        assert!(copy_out(&sa, &mut |p| {
            let (_, inner) = copied_out(&sb);
            assert_eq!(inner, b);
            outer.extend_from_slice(p);
        }));
        assert_eq!(
            outer, a,
            "the outer data was not overwritten by the inner call"
        );
    }
}

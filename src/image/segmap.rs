//! The journal's current segment mapped into the daemon's memory.
//!
//! Every batch ends with the journal's records written out to the image file (so a killed
//! daemon keeps every completed write: they live in the page cache). With `pwrite` that is a
//! buffered write, and ext4 takes the inode lock exclusively for every buffered write, while an
//! `O_DIRECT` data write holds it shared for as long as it runs. With two queues, or with a
//! pipelined queue's request threads, one thread's journal write-out waited for another's
//! disk write, and every data write queued behind the waiting write-out (docs/perf-notes.md,
//! section 29: 4 KiB direct writes at QD1 on two queues had a p99 of 1.3x raw's, and 168 us
//! against 236 us with no write-out at all).
//!
//! A store into a shared mapping of the file takes no inode lock: the page is already in the
//! page cache, marked dirty by the kernel's `page_mkwrite` at the first store after each
//! writeback, and `fdatasync` writes it out like any other dirty page. So the journal copies
//! its records into a mapping of the segment it appends to; what a killed process leaves in
//! the page cache, and what a sync makes durable, is byte for byte what `pwrite` gave.
//!
//! A fault on such a mapping cannot return an error, only raise `SIGBUS` (no space for a block,
//! or a read error bringing a page back). So a segment is mapped only after its blocks are
//! allocated (`fallocate`, mode 0: allocates, never changes a byte) and its pages locked in
//! memory (`mlock`, which reports errors instead of faulting): stores then need neither a
//! block nor a read. Where any step fails (another file system, `RLIMIT_MEMLOCK`), the
//! journal keeps using `pwrite` for that segment.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;

/// One journal segment, mapped shared and locked in memory.
pub struct SegMap {
    /// Start of the mapping (page aligned; at or before the segment's start).
    base: NonNull<u8>,
    /// Length of the mapping in bytes.
    map_len: usize,
    /// Offset of the segment's first byte inside the mapping.
    delta: usize,
    /// Length of the segment in bytes.
    seg_len: usize,
    /// The segment's first slot (which segment this is).
    seg_slot: u64,
}

// SAFETY: the mapping is owned by this value alone (nothing else holds its address), is only
// written through `&mut self`, and can be unmapped from any thread.
unsafe impl Send for SegMap {}

impl SegMap {
    /// Maps the `seg_len` bytes of `file` at `off` (the segment starting at `seg_slot`):
    /// allocates their blocks, maps them shared, and locks the pages in memory.
    pub fn new(file: &File, off: u64, seg_len: u64, seg_slot: u64) -> io::Result<SegMap> {
        let page = super::io::page_size().ok_or_else(|| io::Error::other("no page size"))?;
        let map_off = off & !(page - 1);
        let delta = off - map_off;
        let map_len = delta
            .checked_add(seg_len)
            .and_then(|l| usize::try_from(l).ok())
            .ok_or_else(|| io::Error::other("segment too large to map"))?;
        let (Ok(off_t), Ok(len_t), Ok(map_off_t)) = (
            libc::off_t::try_from(off),
            libc::off_t::try_from(seg_len),
            libc::off_t::try_from(map_off),
        ) else {
            return Err(io::Error::other("segment offset out of range"));
        };
        let fd = file.as_raw_fd();
        // SAFETY: plain system call on a descriptor we own; mode 0 allocates blocks for
        // holes and extends nothing that is already allocated (the range is inside the file).
        if unsafe { libc::fallocate(fd, 0, off_t, len_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new mapping at an address of the kernel's choice; it aliases no Rust
        // object. The file is open read-write, so MAP_SHARED with PROT_WRITE is allowed.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                map_off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base =
            NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap gave null"))?;
        let map = SegMap {
            base,
            map_len,
            delta: delta as usize,
            seg_len: seg_len as usize,
            seg_slot,
        };
        // SAFETY: the range is exactly the mapping made above.
        if unsafe { libc::mlock(addr, map_len) } != 0 {
            return Err(io::Error::last_os_error()); // `map` unmaps on drop
        }
        Ok(map)
    }

    /// The first slot of the mapped segment.
    pub fn seg_slot(&self) -> u64 {
        self.seg_slot
    }

    /// Copies `bytes` to offset `at` of the segment; false (nothing copied) if they do not
    /// fit inside it.
    pub fn write(&mut self, at: u64, bytes: &[u8]) -> bool {
        let Some(start) = usize::try_from(at).ok().filter(|&a| {
            a.checked_add(bytes.len())
                .is_some_and(|end| end <= self.seg_len)
        }) else {
            return false;
        };
        // SAFETY: `delta + start .. delta + start + bytes.len()` lies inside the mapping
        // (checked against the segment's length, which the mapping covers after `delta`);
        // the pages are allocated and locked (see `new`), so the stores cannot fault into
        // SIGBUS; `bytes` is ordinary memory, which cannot overlap a mapping we own alone.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.base.as_ptr().add(self.delta + start),
                bytes.len(),
            );
        }
        true
    }
}

impl Drop for SegMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing else refers to.
        // Dirty pages stay in the page cache (a mapping's stores are file data).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.map_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn stores_are_file_data_at_unaligned_segment_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        f.set_len(64 * 1024).unwrap();
        // A segment of 8 KiB at 5 KiB + 512: neither end on a page boundary.
        let off = 5 * 1024 + 512;
        let mut m = SegMap::new(&f, off, 8192, 7).unwrap();
        assert_eq!(m.seg_slot(), 7);
        assert!(m.write(0, b"first"));
        assert!(m.write(8192 - 4, b"last"));
        // Past the segment's end: refused, nothing copied.
        assert!(!m.write(8192 - 3, b"last"));
        assert!(!m.write(u64::MAX, b"x"));
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(&buf, b"first");
        let mut buf = [0u8; 4];
        f.read_exact_at(&mut buf, off + 8192 - 4).unwrap();
        assert_eq!(&buf, b"last");
        // The bytes around the segment were not touched.
        let mut around = [0xffu8; 1];
        f.read_exact_at(&mut around, off - 1).unwrap();
        assert_eq!(around, [0]);
        f.read_exact_at(&mut around, off + 8192).unwrap();
        assert_eq!(around, [0]);
        drop(m);
        // Unmapping loses nothing.
        let mut buf = [0u8; 5];
        f.read_exact_at(&mut buf, off).unwrap();
        assert_eq!(&buf, b"first");
    }

    #[test]
    fn a_file_that_cannot_be_mapped_writable_is_refused_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 16384]).unwrap();
        let ro = File::open(&p).unwrap();
        assert!(SegMap::new(&ro, 4096, 4096, 1).is_err());
    }
}

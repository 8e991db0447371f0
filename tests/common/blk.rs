//! A vhost-user-blk frontend for tests, built on the `blkio` crate (libblkio's
//! virtio-blk-vhost-user driver).
//!
//! Every I/O buffer lives in one memory region allocated and mapped through blkio (the backend
//! can only reach memory in its table); tests address it by byte offset through [`Mem`].
//! Requests are submitted in batches and their completions collected with a timeout, so a
//! backend that stops answering fails the test instead of hanging it (the vhost-user handshake
//! itself has no timeout: run clients under [`super::with_watchdog`]).

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};

/// How long a batch of requests may take to complete.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// `-EIO`: what blkio reports for VIRTIO_BLK_S_IOERR.
pub const EIO: i32 = -libc::EIO;
/// `-ENOTSUP`: what blkio reports for VIRTIO_BLK_S_UNSUPP.
pub const ENOTSUP: i32 = -libc::ENOTSUP;

/// Client settings.
#[derive(Clone, Copy, Debug)]
pub struct ClientOpts {
    /// Number of queues to start.
    pub queues: usize,
    /// Ring size of each queue.
    pub queue_size: usize,
    /// Open the device read-only (required by blkio when the device offers VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Bytes of buffer memory (a multiple of the page size).
    pub mem: usize,
}

impl Default for ClientOpts {
    fn default() -> Self {
        ClientOpts {
            queues: 1,
            queue_size: 128,
            read_only: false,
            mem: 16 << 20,
        }
    }
}

impl ClientOpts {
    /// `queues` read-write queues of `queue_size` entries and `mem` bytes of buffer memory.
    pub fn new(queues: usize, queue_size: usize, mem: usize) -> ClientOpts {
        ClientOpts {
            queues,
            queue_size,
            read_only: false,
            mem,
        }
    }
}

/// The buffer memory region shared with the backend, addressed by byte offset.
///
/// It is `Copy` so that threads can each use their own disjoint window of it.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    addr: usize,
    len: usize,
}

impl Mem {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, off: usize, len: usize) {
        assert!(
            off.checked_add(len).is_some_and(|end| end <= self.len),
            "buffer {off}+{len} outside the {}-byte region",
            self.len
        );
    }

    /// Address of byte `off`.
    pub fn ptr(&self, off: usize) -> *mut u8 {
        self.check(off, 0);
        (self.addr + off) as *mut u8
    }

    /// The `len` bytes at `off` as a slice, for tests that hand buffers to blkio themselves.
    ///
    /// # Safety
    /// The slice aliases the shared region: the caller must not create overlapping slices that
    /// are alive at the same time, nor use the slice after the [`Client`] is dropped.
    pub unsafe fn slice(&self, off: usize, len: usize) -> &'static mut [u8] {
        self.check(off, len);
        // SAFETY: the range is inside the mapped region (checked above); the caller guarantees
        // its lifetime and exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(off), len) }
    }

    /// Copies `data` into the region at `off`.
    pub fn fill(&self, off: usize, data: &[u8]) {
        self.check(off, data.len());
        // SAFETY: the range is inside the mapped region (checked above), which lives as long as
        // the Client; the source is a distinct Rust slice, so the two do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(off), data.len()) };
    }

    /// Copies `len` bytes out of the region at `off`.
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        self.check(off, len);
        let mut v = vec![0u8; len];
        // SAFETY: as in `fill`, with source and destination swapped.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(off), v.as_mut_ptr(), len) };
        v
    }
}

/// One request, its buffers given as (region offset, length) pairs.
#[derive(Clone, Debug)]
pub enum Req {
    /// Read `len` bytes at disk `offset` into region offset `buf`.
    Read { offset: u64, buf: usize, len: usize },
    /// Read into several segments.
    Readv {
        offset: u64,
        segs: Vec<(usize, usize)>,
    },
    /// Write `len` bytes from region offset `buf` at disk `offset`.
    Write { offset: u64, buf: usize, len: usize },
    /// Write from several segments.
    Writev {
        offset: u64,
        segs: Vec<(usize, usize)>,
    },
    /// Flush.
    Flush,
    /// Discard a range.
    Discard { offset: u64, len: u64 },
    /// Write zeroes to a range; `unmap` allows the backend to deallocate.
    WriteZeroes { offset: u64, len: u64, unmap: bool },
    /// Read into an arbitrary address, which need not be in any mapped region (hostile).
    ReadRaw {
        offset: u64,
        addr: usize,
        len: usize,
    },
}

/// A connected, started blkio instance with its queues and buffer region.
pub struct Client {
    // Field order matters: queues must be dropped before the Blkio instance.
    queues: Vec<Blkioq>,
    mem: Mem,
    capacity: u64,
    blkio: Blkio,
}

impl Client {
    /// Connects to the vhost-user socket `path` and starts `opts.queues` queues.
    ///
    /// Retries the connection for a moment while the backend is between bind() and listen().
    pub fn connect(path: &Path, opts: ClientOpts) -> Result<Client, blkio::Error> {
        let path_str = path.to_str().expect("socket path is not UTF-8");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut blkio = loop {
            let mut b = Blkio::new("virtio-blk-vhost-user")?;
            b.set_str("path", path_str)?;
            b.set_bool("read-only", opts.read_only)?;
            match b.connect() {
                Ok(()) => break b,
                Err(e)
                    if (e.errno() == Errno::CONNREFUSED || e.errno() == Errno::NOENT)
                        && Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e),
            }
        };
        blkio.set_i32(
            "num-queues",
            i32::try_from(opts.queues).expect("too many queues"),
        )?;
        blkio.set_i32(
            "queue-size",
            i32::try_from(opts.queue_size).expect("queue too big"),
        )?;
        let region = blkio.alloc_mem_region(opts.mem)?;
        let started = blkio.start()?;
        blkio.map_mem_region(&region)?;
        let capacity = blkio.get_u64("capacity")?;
        Ok(Client {
            queues: started.queues,
            mem: Mem {
                addr: region.addr,
                len: region.len,
            },
            capacity,
            blkio,
        })
    }

    /// Like [`Client::connect`], failing the test with blkio's message on error.
    pub fn open(path: &Path, opts: ClientOpts) -> Client {
        Client::connect(path, opts).unwrap_or_else(|e| {
            panic!(
                "cannot connect to {}: {e} ({:?})",
                path.display(),
                e.errno()
            )
        })
    }

    /// Disk capacity in bytes, as the device's config space says.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The blkio instance, to read the device's properties ("max-segments", "flush-needed"...).
    pub fn blkio(&self) -> &Blkio {
        &self.blkio
    }

    /// The buffer region.
    pub fn mem(&self) -> Mem {
        self.mem
    }

    /// Queue `i`.
    pub fn queue(&mut self, i: usize) -> Queue<'_> {
        Queue {
            q: &mut self.queues[i],
            mem: self.mem,
        }
    }

    /// blkio's queue `i` itself, for tests that submit requests directly (see [`wait_one`]).
    pub fn raw_queue(&mut self, i: usize) -> &mut Blkioq {
        &mut self.queues[i]
    }

    /// All of blkio's queues, e.g. to hand one to each thread of a scope.
    pub fn raw_queues(&mut self) -> &mut [Blkioq] {
        &mut self.queues
    }

    /// All queues at once, e.g. to hand one to each thread of a scope.
    pub fn queues(&mut self) -> Vec<Queue<'_>> {
        let mem = self.mem;
        self.queues.iter_mut().map(|q| Queue { q, mem }).collect()
    }

    /// Runs `f(i, queue i)` for every queue at once, each on a thread of its own; returns
    /// what each returned, in queue order (a panic in one fails the test).
    pub fn on_each_queue<T, F>(&mut self, f: F) -> Vec<T>
    where
        T: Send,
        F: Fn(usize, Queue<'_>) -> T + Sync,
    {
        let f = &f;
        std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .queues()
                .into_iter()
                .enumerate()
                .map(|(i, q)| scope.spawn(move || f(i, q)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("queue thread panicked"))
                .collect()
        })
    }
}

/// A queue of a [`Client`] plus its buffer region.
pub struct Queue<'a> {
    q: &'a mut Blkioq,
    mem: Mem,
}

impl Queue<'_> {
    /// The buffer region.
    pub fn mem(&self) -> Mem {
        self.mem
    }

    /// Puts `reqs` on the ring (or blkio's backlog); returns the iovec arrays, which must live
    /// until the requests complete.
    fn enqueue(&mut self, reqs: &[Req]) -> Vec<Vec<libc::iovec>> {
        let mem = self.mem;
        let iov = |segs: &[(usize, usize)]| -> Vec<libc::iovec> {
            segs.iter()
                .map(|&(off, len)| {
                    mem.check(off, len);
                    libc::iovec {
                        iov_base: mem.ptr(off).cast(),
                        iov_len: len,
                    }
                })
                .collect()
        };
        let mut iovecs: Vec<Vec<libc::iovec>> = Vec::new();
        for (i, r) in reqs.iter().enumerate() {
            let f = ReqFlags::empty();
            match r {
                Req::Read { offset, buf, len } => {
                    mem.check(*buf, *len);
                    self.q.read(*offset, mem.ptr(*buf), *len, i, f);
                }
                Req::Write { offset, buf, len } => {
                    mem.check(*buf, *len);
                    self.q.write(*offset, mem.ptr(*buf), *len, i, f);
                }
                Req::Readv { offset, segs } => {
                    iovecs.push(iov(segs));
                    let v = iovecs.last().expect("just pushed");
                    self.q.readv(*offset, v.as_ptr(), v.len() as u32, i, f);
                }
                Req::Writev { offset, segs } => {
                    iovecs.push(iov(segs));
                    let v = iovecs.last().expect("just pushed");
                    self.q.writev(*offset, v.as_ptr(), v.len() as u32, i, f);
                }
                Req::Flush => self.q.flush(i, f),
                Req::Discard { offset, len } => self.q.discard(*offset, *len, i, f),
                Req::WriteZeroes { offset, len, unmap } => {
                    let f = if *unmap { f } else { ReqFlags::NO_UNMAP };
                    self.q.write_zeroes(*offset, *len, i, f);
                }
                Req::ReadRaw { offset, addr, len } => {
                    self.q.read(*offset, *addr as *mut u8, *len, i, f);
                }
            }
        }
        iovecs
    }

    /// Submits `reqs` together and waits for all of them; returns each one's result
    /// (0 or a negative errno) in order. Fails the test after [`REQUEST_TIMEOUT`].
    pub fn submit(&mut self, reqs: &[Req]) -> Vec<i32> {
        // Kept alive until every request has completed.
        let _iovecs = self.enqueue(reqs);
        let mut results: Vec<Option<i32>> = vec![None; reqs.len()];
        let mut done = 0;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        let mut completions: Vec<MaybeUninit<Completion>> = (0..reqs.len().max(1))
            .map(|_| MaybeUninit::uninit())
            .collect();
        while done < reqs.len() {
            let mut left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "{} of {} requests still uncompleted after {REQUEST_TIMEOUT:?}",
                reqs.len() - done,
                reqs.len()
            );
            let n = self
                .q
                .do_io(&mut completions, 1, Some(&mut left), None)
                .unwrap_or_else(|e| panic!("blkio do_io failed: {e} ({:?})", e.errno()));
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n completions.
                let c = unsafe { c.assume_init_ref() };
                let slot = &mut results[c.user_data];
                assert!(slot.is_none(), "request {} completed twice", c.user_data);
                *slot = Some(c.ret);
                done += 1;
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("all completed"))
            .collect()
    }

    /// Submits `reqs` and returns without waiting for any completion: the requests are in
    /// flight when the caller then drops the client (a frontend that vanishes mid-I/O).
    pub fn submit_and_abandon(&mut self, reqs: &[Req]) {
        let iovecs = self.enqueue(reqs);
        let mut none: [MaybeUninit<Completion>; 0] = [];
        self.q
            .do_io(&mut none, 0, None, None)
            .unwrap_or_else(|e| panic!("blkio do_io failed: {e}"));
        // The backend may still read the iovec arrays: leak them rather than free them.
        std::mem::forget(iovecs);
    }

    /// Submits one request and returns its result.
    pub fn one(&mut self, req: Req) -> i32 {
        self.submit(std::slice::from_ref(&req))[0]
    }

    /// Writes random bytes at disk `offset` from the buffer segments `segs` (region offset,
    /// length), asserts success and records the bytes in `model` (the whole disk). `op` names
    /// the operation in failure messages.
    pub fn writev_random(
        &mut self,
        rng: &mut impl rand::RngCore,
        model: &mut [u8],
        offset: u64,
        segs: &[(usize, usize)],
        op: usize,
    ) {
        let len: usize = segs.iter().map(|s| s.1).sum();
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let mut pos = 0;
        for &(b, l) in segs {
            self.mem.fill(b, &data[pos..pos + l]);
            pos += l;
        }
        let r = self.one(Req::Writev {
            offset,
            segs: segs.to_vec(),
        });
        assert_eq!(
            r, 0,
            "op {op}: write {len} at {offset} in segments {segs:?} failed"
        );
        let o = offset as usize;
        model[o..o + len].copy_from_slice(&data);
    }

    /// Reads disk `offset` into the buffer segments `segs` (poisoned first), asserts success
    /// and that the bytes equal `model` (the whole disk).
    pub fn readv_check(&mut self, model: &[u8], offset: u64, segs: &[(usize, usize)], op: usize) {
        let len: usize = segs.iter().map(|s| s.1).sum();
        for &(b, l) in segs {
            self.mem.fill(b, &vec![0xa5; l]);
        }
        let r = self.one(Req::Readv {
            offset,
            segs: segs.to_vec(),
        });
        assert_eq!(
            r, 0,
            "op {op}: read {len} at {offset} in segments {segs:?} failed"
        );
        let mut got = Vec::with_capacity(len);
        for &(b, l) in segs {
            got.extend(self.mem.read(b, l));
        }
        let o = offset as usize;
        assert!(
            got == model[o..o + len],
            "op {op}: read {len} at {offset} (segments {segs:?}) differs from what was written"
        );
    }

    /// Writes `data` at disk `offset` through the region at `buf`; asserts success.
    pub fn write_ok(&mut self, offset: u64, buf: usize, data: &[u8]) {
        self.mem.fill(buf, data);
        let len = data.len();
        let r = self.one(Req::Write { offset, buf, len });
        assert_eq!(r, 0, "write of {len} bytes at {offset} failed");
    }

    /// Reads `len` bytes at disk `offset` through the region at `buf`; asserts success.
    pub fn read_ok(&mut self, offset: u64, buf: usize, len: usize) -> Vec<u8> {
        let r = self.one(Req::Read { offset, buf, len });
        assert_eq!(r, 0, "read of {len} bytes at {offset} failed");
        self.mem.read(buf, len)
    }

    /// Flushes; asserts success.
    pub fn flush_ok(&mut self) {
        assert_eq!(self.one(Req::Flush), 0, "flush failed");
    }

    /// Discards `len` bytes at `offset`; asserts success.
    pub fn discard_ok(&mut self, offset: u64, len: u64) {
        let r = self.one(Req::Discard { offset, len });
        assert_eq!(r, 0, "discard of {len} bytes at {offset} failed");
    }

    /// Writes zeroes to `len` bytes at `offset` (deallocation allowed if `unmap`); asserts
    /// success.
    pub fn write_zeroes_ok(&mut self, offset: u64, len: u64, unmap: bool) {
        let r = self.one(Req::WriteZeroes { offset, len, unmap });
        assert_eq!(r, 0, "write-zeroes of {len} bytes at {offset} failed");
    }
}

/// Waits for one completion on a raw blkio queue and returns its result (0 or a negative
/// errno). Fails the test after [`REQUEST_TIMEOUT`].
pub fn wait_one(q: &mut Blkioq) -> i32 {
    let mut c = [MaybeUninit::uninit()];
    let mut left = REQUEST_TIMEOUT;
    let n = q
        .do_io(&mut c, 1, Some(&mut left), None)
        .unwrap_or_else(|e| panic!("blkio do_io failed: {e} ({:?})", e.errno()));
    assert_eq!(n, 1, "no completion within {REQUEST_TIMEOUT:?}");
    // SAFETY: do_io initialised the first n = 1 completions.
    unsafe { c[0].assume_init_read() }.ret
}

//! A queue's reads in flight on one io_uring ring: the worker submits a read's transfers and
//! goes back to the available ring; the completions come back on an eventfd the worker's
//! epoll loop watches (or while it polls), and the worker completes each request when its
//! last transfer is in.
//!
//! With `--direct` and pipelining, every read used to be handed to a request thread that
//! submitted it and slept until the disk was done: a futex wake-up and two context switches
//! per read on top of the disk's own completion (docs/perf-notes.md, section 40). Here the
//! queue's worker keeps all of them in flight itself, as qemu-storage-daemon's event loop
//! does.
//!
//! This module knows the ring and the transfers ([`ReadPlan`]) only; what an in-flight read
//! carries besides (the virtio chain, its status byte) is the caller's `T`.
//!
//! **Safety rule.** The kernel writes into the memory a submitted plan's iovecs point at and
//! reads its iovec arrays until the transfer completes. [`RingReads::submit`] is `unsafe`:
//! the caller promises that the memory stays valid for as long as the ring holds the read's
//! `T` (the `T` itself keeps it mapped: a chain holds its guest memory). The ring keeps the
//! plan (and so the iovec arrays) and the `T` until the last completion, and dropping a
//! `RingReads` first waits for every transfer in flight.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use io_uring::{opcode, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::image::ReadPlan;

/// Submission entries of a queue's ring. Reads whose transfers do not fit beside those in
/// flight go the threaded way.
const ENTRIES: u32 = 256;

// A completion names its transfer in the low 16 bits of its user data: a read has fewer
// transfers than the ring has entries.
const _: () = assert!(ENTRIES <= 1 << 16);

/// A read in flight.
struct Entry<T> {
    item: T,
    plan: ReadPlan,
    /// Transfers not completed yet.
    left: usize,
    /// Every completed transfer delivered all its bytes.
    whole: bool,
}

/// One queue's ring of reads in flight (see the module documentation).
pub struct RingReads<T> {
    ring: IoUring,
    /// Signalled by the kernel for every completion it posts.
    event: EventFd,
    /// Reads in flight, by slot; `free` lists the empty slots.
    entries: Vec<Option<Entry<T>>>,
    free: Vec<usize>,
    /// Transfers submitted (or queued for submission) and not completed.
    transfers: usize,
}

/// A read whose transfers have all completed: its `T`, its plan, and whether every transfer
/// delivered all its bytes (if not, or if an error came back, the caller reads it again the
/// ordinary way; the bytes already in its buffers are overwritten then).
pub struct Done<T> {
    /// What the caller submitted with the read.
    pub item: T,
    /// The read's plan.
    pub plan: ReadPlan,
    /// True when every transfer completed whole.
    pub whole: bool,
}

impl<T> RingReads<T> {
    /// A ring, with its completion eventfd registered; fails where io_uring cannot be used.
    ///
    /// A plain ring: any thread may wait for its completions, which the kernel posts even
    /// after the submitting thread has exited (a queue's worker ends before its backend is
    /// dropped). Deferred completions (`DEFER_TASKRUN`, which only the submitting thread may
    /// collect) measured no faster here (docs/perf-notes.md, section 40).
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder().dontfork().build(ENTRIES)?;
        let event = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        Ok(RingReads {
            ring,
            event,
            entries: Vec::new(),
            free: Vec::new(),
            transfers: 0,
        })
    }

    /// The eventfd that becomes readable when a completion is posted.
    pub fn event_fd(&self) -> RawFd {
        self.event.as_raw_fd()
    }

    /// Clears the eventfd (after it fired; completions are then taken with [`Self::reap`]).
    pub fn clear_event(&self) {
        let _ = self.event.read();
    }

    /// Reads in flight.
    pub fn len(&self) -> usize {
        self.entries.len() - self.free.len()
    }

    /// True when no read is in flight.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether completions are waiting to be taken (no system call).
    pub fn completed(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// Queues the transfers of `plan` (submitted by the next [`Self::flush`]); gives
    /// `item` and `plan` back when they do not fit beside the transfers in flight. A plan with
    /// no transfer is not queued either: the caller completes it at once.
    ///
    /// # Safety
    ///
    /// The memory every iovec of `plan` points into must stay valid for writes until the
    /// read is returned by [`Self::reap`] (or the ring is dropped): `item` must keep it so,
    /// or the caller must otherwise. The descriptors of the plan must stay open as long.
    pub unsafe fn submit(&mut self, item: T, plan: ReadPlan) -> Result<(), (T, ReadPlan)> {
        let n = plan.transfers.len();
        let room = (self.ring.params().sq_entries() as usize).saturating_sub(self.transfers);
        if n == 0 || n > room {
            return Err((item, plan));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.entries.push(None);
                self.entries.len() - 1
            }
        };
        // Transfers queued, and whether all of them were.
        let mut queued = 0usize;
        for (i, t) in plan.transfers.iter().enumerate() {
            let sqe = match t.iovs.as_slice() {
                [one] => opcode::Read::new(
                    types::Fd(t.fd),
                    one.iov_base.cast::<u8>(),
                    u32::try_from(one.iov_len).unwrap_or(u32::MAX),
                )
                .offset(t.off)
                .build(),
                v => opcode::Readv::new(
                    types::Fd(t.fd),
                    v.as_ptr(),
                    u32::try_from(v.len()).unwrap_or(u32::MAX),
                )
                .offset(t.off)
                .build(),
            }
            .user_data(((slot as u64) << 16) | i as u64);
            // SAFETY: the entry points at `t.iovs`, a heap array owned by the plan, which
            // the ring keeps (in `entries`, moved but never reallocated) until this transfer's
            // completion is taken, or straight at the memory of its one iovec; that memory is
            // valid for writes until then by this function's contract.
            if unsafe { self.ring.submission().push(&sqe) }.is_err() {
                break;
            }
            queued += 1;
        }
        self.transfers += queued;
        // The room check leaves space for every transfer of the plan, so all are queued; if
        // one were not, the read is kept until those queued complete, and comes back as not
        // whole (read again the ordinary way).
        let whole = queued == n;
        if queued == 0 {
            self.free.push(slot);
            return Err((item, plan));
        }
        if let Some(e) = self.entries.get_mut(slot) {
            *e = Some(Entry {
                item,
                plan,
                left: queued,
                whole,
            });
        }
        Ok(())
    }

    /// Hands the queued transfers to the kernel (one `io_uring_enter`, no wait).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes every completion posted so far into `done` (reads whose last transfer came
    /// back); no system call.
    pub fn reap(&mut self, done: &mut Vec<Done<T>>) {
        let mut cq = self.ring.completion();
        cq.sync();
        for cqe in &mut cq {
            let slot = (cqe.user_data() >> 16) as usize;
            let t = (cqe.user_data() & 0xffff) as usize;
            let Some(Some(e)) = self.entries.get_mut(slot) else {
                continue;
            };
            let want = e.plan.transfers.get(t).map_or(u64::MAX, |t| t.want);
            if u64::try_from(cqe.result()).ok() != Some(want) {
                e.whole = false;
            }
            e.left = e.left.saturating_sub(1);
            self.transfers = self.transfers.saturating_sub(1);
            if e.left == 0 {
                if let Some(e) = self.entries.get_mut(slot).and_then(Option::take) {
                    self.free.push(slot);
                    done.push(Done {
                        item: e.item,
                        plan: e.plan,
                        whole: e.whole,
                    });
                }
            }
        }
    }
}

impl<T> Drop for RingReads<T> {
    /// Waits for every transfer in flight (their reads are dropped, not completed: the
    /// connection is going away), so no memory they point into is released before the kernel
    /// is done with it.
    fn drop(&mut self) {
        let mut done = Vec::new();
        let _ = self.flush();
        while self.transfers > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    // The kernel may still write into memory this process is about to free.
                    log::error!("cannot wait for the reads in flight: {e}");
                    std::process::abort();
                }
            }
            self.reap(&mut done);
            done.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    use crate::image::Transfer;
    use crate::units::Pba;

    /// A plan reading `len` bytes at `off` of `fd` into `buf` (two iovecs when `split`).
    fn plan(fd: RawFd, off: u64, buf: &mut [u8], split: bool) -> ReadPlan {
        let len = buf.len();
        let iovs = if split {
            let (a, b) = buf.split_at_mut(len / 2);
            vec![
                libc::iovec {
                    iov_base: a.as_mut_ptr().cast(),
                    iov_len: a.len(),
                },
                libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                },
            ]
        } else {
            vec![libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            }]
        };
        ReadPlan::for_test(vec![Transfer {
            fd,
            off,
            iovs,
            want: len as u64,
            pba: Pba(0),
        }])
    }

    /// Waits for the eventfd, then takes completions, until `n` reads are done; fails if
    /// the eventfd stays quiet for 10 s while reads are in flight (an event loop would then
    /// sleep forever).
    fn collect(r: &mut RingReads<usize>, n: usize) -> Vec<Done<usize>> {
        let mut done = Vec::new();
        while done.len() < n {
            let mut pfd = libc::pollfd {
                fd: r.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, 10_000) };
            assert_eq!(ready, 1, "the ring's eventfd never fired");
            r.clear_event();
            r.reap(&mut done);
        }
        done
    }

    #[test]
    fn reads_complete_whole_through_the_eventfd_and_short_ones_say_so() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 239) as u8).collect();
        f.write_all(&data).unwrap();
        let fd = f.as_raw_fd();
        let mut r: RingReads<usize> = RingReads::new().unwrap();
        assert!(r.is_empty());
        let mut bufs: Vec<Vec<u8>> = (0..4).map(|_| vec![0u8; 8192]).collect();
        let mut tail = vec![0u8; 8192];
        for (i, b) in bufs.iter_mut().enumerate() {
            let p = plan(fd, i as u64 * 8192, b, i % 2 == 1);
            // SAFETY: the buffers outlive the ring's use of them (collected below).
            assert!(unsafe { r.submit(i, p) }.is_ok());
        }
        // The last 4 KiB of the file and 4 KiB past its end: a short read.
        let p = plan(fd, 60 * 1024, &mut tail, false);
        // SAFETY: as above.
        assert!(unsafe { r.submit(99, p) }.is_ok());
        assert_eq!(r.len(), 5);
        r.flush().unwrap();
        let done = collect(&mut r, 5);
        assert!(r.is_empty());
        for d in &done {
            assert_eq!(d.whole, d.item != 99, "read {}", d.item);
        }
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(&b[..], &data[i * 8192..(i + 1) * 8192], "read {i}");
        }
        assert_eq!(&tail[..4096], &data[60 * 1024..]);
    }

    #[test]
    fn a_plan_that_does_not_fit_is_given_back_and_a_drop_on_another_thread_waits_for_what_is_in_flight(
    ) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&vec![5u8; 4096]).unwrap();
        let fd = f.as_raw_fd();
        let mut r: RingReads<usize> = RingReads::new().unwrap();
        // No transfer: given back, for the caller to complete.
        // SAFETY: an empty plan points at nothing.
        assert!(unsafe { r.submit(0, ReadPlan::for_test(Vec::new())) }.is_err());
        // More transfers than the ring has room for.
        let mut bufs: Vec<Vec<u8>> = (0..ENTRIES + 1).map(|_| vec![0u8; 512]).collect();
        let big: Vec<Transfer> = bufs
            .iter_mut()
            .map(|b| Transfer {
                fd,
                off: 0,
                iovs: vec![libc::iovec {
                    iov_base: b.as_mut_ptr().cast(),
                    iov_len: b.len(),
                }],
                want: 512,
                pba: Pba(0),
            })
            .collect();
        // SAFETY: given back at once, never submitted.
        let back = unsafe { r.submit(1, ReadPlan::for_test(big)) };
        assert!(matches!(back, Err((1, _))));
        // Reads in flight when the ring goes: the drop waits for them.
        let mut b = vec![0u8; 4096];
        // SAFETY: `b` outlives the ring (dropped below, before `b`).
        assert!(unsafe { r.submit(2, plan(fd, 0, &mut b, false)) }.is_ok());
        // Another thread may collect its completions (a worker that exited leaves its reads
        // to whoever drops the ring): the drop below runs on one.
        r.flush().unwrap();
        std::thread::scope(|sc| {
            sc.spawn(move || drop(r));
        });
        assert_eq!(b, vec![5u8; 4096]);
    }
}

//! The vhost-user backend's queue handling, without a frontend: a split virtqueue is laid out in
//! guest memory with virtio-queue's `MockSplitQueue`, handed to [`BlkBackend::handle_event`]
//! through a `VringRwLock`, and the used ring, the call eventfd, the per-queue request indices
//! and the once-per-kind warnings are checked.

mod common;

use std::fs::File;
use std::os::unix::io::FromRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::mem_dev::MemDevice;
use rr_row::vhost_user::{BackendConfig, BlkBackend, GuestMem};
use rr_row::virtio_blk::{serial_bytes, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const CAPACITY: u64 = 1 << 20;
const W: u16 = VRING_DESC_F_WRITE as u16;
const N: u16 = VRING_DESC_F_NEXT as u16;

/// Captures warn-level records for the assertions on once-per-kind logging.
struct Capture(Mutex<Vec<String>>);

impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            self.0.lock().unwrap().push(r.args().to_string());
        }
    }
    fn flush(&self) {}
}

/// The captured warnings, cleared, and a lock that keeps every other test that warns from
/// running meanwhile (the logger is global to the test binary; the backend's once-per-kind
/// warnings are per backend).
fn captured_alone() -> (std::sync::MutexGuard<'static, ()>, &'static Capture) {
    static ALONE: Mutex<()> = Mutex::new(());
    let g = ALONE.lock().unwrap_or_else(|e| e.into_inner());
    let c = captured();
    c.0.lock().unwrap().clear();
    (g, c)
}

fn captured() -> &'static Capture {
    static CAPTURE: OnceLock<&'static Capture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let c: &'static Capture = Box::leak(Box::new(Capture(Mutex::new(Vec::new()))));
        log::set_logger(c).unwrap();
        log::set_max_level(log::LevelFilter::Warn);
        c
    })
}

struct Setup {
    mem: GuestMem,
    dev: Arc<MemDevice>,
    backend: BlkBackend,
    call: EventFd,
}

fn setup() -> Setup {
    setup_threads(1)
}

fn setup_threads(io_threads: u16) -> Setup {
    setup_with(io_threads, Duration::ZERO)
}

fn setup_with(io_threads: u16, poll_max: Duration) -> Setup {
    setup_config(BackendConfig {
        io_threads,
        poll_max,
        ..BackendConfig::new(1, 256, serial_bytes("b"))
    })
}

fn setup_config(cfg: BackendConfig) -> Setup {
    let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let mem = GuestMemoryAtomic::new(mmap);
    let dev = MemDevice::new(CAPACITY, 0x77, false);
    let backend = BlkBackend::new(dev.clone(), cfg, mem.clone()).unwrap();
    Setup {
        mem,
        dev,
        backend,
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
    }
}

/// One request: (type, sector, data len, data writable, status address).
fn chain(
    m: &GuestMemoryMmap,
    i: u64,
    t: u32,
    sector: u64,
    len: u32,
    status: u64,
) -> Vec<RawDescriptor> {
    let hdr = 0x10_0000 + i * 0x100;
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(hdr)).unwrap();
    let data = data_at(i).0;
    let dflags = if t == VIRTIO_BLK_T_IN { W } else { 0 };
    vec![
        RawDescriptor::from(SplitDescriptor::new(hdr, 16, N, 0)),
        RawDescriptor::from(SplitDescriptor::new(data, len, dflags | N, 0)),
        RawDescriptor::from(SplitDescriptor::new(status, 1, W, 0)),
    ]
}

/// A backend over a device that prefers batches (`io_threads` request threads, `pipeline`d or
/// not), with the driver's FLUSH feature taken if `writeback`; the device holds at each byte
/// the number of its 512-byte sector, and the data buffer of each even (write) request `i` of
/// [`writes_and_reads`] holds [`written`]`(i)`.
fn batched_setup(io_threads: u16, pipeline: bool, writeback: bool) -> Setup {
    let s = setup_config(BackendConfig {
        io_threads,
        pipeline,
        ..BackendConfig::new(1, 256, serial_bytes("b"))
    });
    if writeback {
        s.backend.acked_features(1 << VIRTIO_BLK_F_FLUSH);
    }
    s.dev.batched.store(true, Ordering::SeqCst);
    for (i, b) in s.dev.data.lock().unwrap().iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    let m = s.mem.memory();
    for i in (0..8).step_by(2) {
        m.write_slice(&written(i), data_at(i)).unwrap();
    }
    s
}

/// The data buffer of request `i` of [`chain`].
fn data_at(i: u64) -> GuestAddress {
    GuestAddress(0x20_0000 + i * 0x1_0000)
}

/// What write request `i` of [`batched_setup`] writes.
fn written(i: u64) -> Vec<u8> {
    vec![0xc0 | i as u8; 4096]
}

/// Checks that read request `i` (4 KiB at sector `8 i`) of [`batched_setup`] got the device's
/// data.
fn assert_read_data(m: &GuestMemoryMmap, i: u64) {
    assert_read_data_len(m, i, 4096);
}

/// As [`assert_read_data`], for a read of `len` bytes at sector `8 i`.
fn assert_read_data_len(m: &GuestMemoryMmap, i: u64, len: u32) {
    let mut got = vec![0u8; len as usize];
    m.read_slice(&mut got, data_at(i)).unwrap();
    let want: Vec<u8> = (0..u64::from(len))
        .map(|b| ((i * 4096 + b) / 512) as u8)
        .collect();
    assert!(got == want, "read {i} data");
}

/// Checks that the device saw requests `0..n` (its reads, writes and refusals), each once.
fn assert_each_once(s: &Setup, n: u64) {
    let mut seen = s.dev.indices.lock().unwrap().clone();
    seen.sort_unstable();
    assert_eq!(
        seen,
        (0..n).collect::<Vec<u64>>(),
        "each request exactly once"
    );
}

/// `n` requests of 4 KiB at sector `8 i`: writes at even `i`, reads at odd `i`, the status
/// of request `i` at `0x30_0000 + 16 i`.
fn writes_and_reads(m: &GuestMemoryMmap, n: u64) -> Vec<Vec<RawDescriptor>> {
    (0..n)
        .map(|i| {
            let t = if i % 2 == 0 {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            chain(m, i, t, i * 8, 4096, 0x30_0000 + i * 16)
        })
        .collect()
}

/// Lays out chains back to back in the descriptor table (fixing up the `next` indices), and
/// returns a vring over the queue.
fn queue(s: &Setup, chains: &[Vec<RawDescriptor>], event_idx: bool) -> VringRwLock<GuestMem> {
    let m = s.mem.memory();
    let q = MockSplitQueue::create(&*m, GuestAddress(0), 256);
    let mut idx = 0u16;
    for c in chains {
        let fixed: Vec<RawDescriptor> = c
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let d = SplitDescriptor::from(*d);
                let last = k == c.len() - 1;
                let flags = if last { d.flags() & !N } else { d.flags() | N };
                RawDescriptor::from(SplitDescriptor::new(
                    d.addr().0,
                    d.len(),
                    flags,
                    idx + k as u16 + 1,
                ))
            })
            .collect();
        q.add_desc_chains(&fixed, idx).unwrap();
        idx += c.len() as u16;
    }
    let vring = VringRwLock::new(s.mem.clone(), 256).unwrap();
    vring.set_queue_size(256);
    vring
        .set_queue_info(q.desc_table_addr().0, q.avail_addr().0, q.used_addr().0)
        .unwrap();
    vring.set_queue_event_idx(event_idx);
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    // SAFETY: dup() returns a new descriptor we own exclusively and hand to the File.
    let fd = unsafe { libc::dup(std::os::unix::io::AsRawFd::as_raw_fd(&s.call)) };
    assert!(fd >= 0);
    // SAFETY: `fd` is a fresh, owned, open descriptor.
    vring.set_call(Some(unsafe { File::from_raw_fd(fd) }));
    s.backend.set_event_idx(event_idx);
    vring
}

/// The guest's kick on queue 0: the worker's `handle_event` for `vring`, which must succeed.
fn kick(s: &Setup, vring: &VringRwLock<GuestMem>) {
    s.backend
        .handle_event(0, EventSet::IN, std::slice::from_ref(vring), 0)
        .unwrap();
}

fn used_idx(vring: &VringRwLock<GuestMem>) -> u16 {
    vring.queue_used_idx().unwrap()
}

/// Waits (at most 30 s, then fails naming `what`) until the used ring holds `n` chains.
fn wait_used(vring: &VringRwLock<GuestMem>, n: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while used_idx(vring) < n {
        assert!(Instant::now() < deadline, "{what} never completed");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Stops the ring as a frontend's GET_VRING_BASE does (marked not ready, then `stop_vring`, on
/// another thread) while the device holds requests: the stop must still wait 100 ms later,
/// with `completed` chains in the used ring. Then releases `held`; returns the used index the
/// stop left.
fn stop_while_held(
    s: &Setup,
    vring: &VringRwLock<GuestMem>,
    held: std::sync::RwLockWriteGuard<'_, ()>,
    completed: u16,
) -> u16 {
    vring.set_queue_ready(false);
    std::thread::scope(|sc| {
        let stopper = sc.spawn(|| {
            s.backend.stop_vring(0).unwrap();
            used_idx(vring)
        });
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !stopper.is_finished(),
            "GET_VRING_BASE returned with requests in flight"
        );
        assert_eq!(used_idx(vring), completed);
        drop(held);
        stopper.join().unwrap()
    })
}

/// The frontend's GET_VRING_BASE (the ring marked not ready, then `stop_vring`) returns only
/// once the request the worker took is in the used ring, and a stopped ring gives the worker
/// nothing more.
#[test]
fn get_vring_base_waits_for_the_requests_in_flight() {
    let s = setup();
    let m = s.mem.memory();
    let chains = vec![chain(&m, 0, VIRTIO_BLK_T_IN, 0, 4096, 0x30_0000)];
    let vring = queue(&s, &chains, true);
    let held = s.dev.hold.write().unwrap();
    std::thread::scope(|sc| {
        let worker = sc.spawn(|| {
            s.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
                .unwrap()
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while s.dev.reads_started.load(Ordering::SeqCst) == 0 {
            assert!(
                Instant::now() < deadline,
                "the read never reached the device"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            stop_while_held(&s, &vring, held, 0),
            1,
            "the read is in the used ring when the stop returns"
        );
        worker.join().unwrap();
    });
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
        STATUS_OK
    );
    // A stopped ring with a new request published: a kick takes nothing.
    let s = setup();
    let m = s.mem.memory();
    let vring = queue(
        &s,
        &[chain(&m, 0, VIRTIO_BLK_T_IN, 0, 4096, 0x30_0000)],
        true,
    );
    vring.set_queue_ready(false);
    kick(&s, &vring);
    assert_eq!(used_idx(&vring), 0);
    assert_eq!(s.dev.reads_started.load(Ordering::SeqCst), 0);
    s.backend.stop_vring(0).unwrap();
}

/// With `pipeline`, the worker hands a batch to the request threads and returns to the ring:
/// the batch's writes complete (and are signalled) while its reads still wait for the device,
/// a stop waits for the reads, and every request completes once with the right data.
#[test]
fn a_pipelined_worker_does_not_wait_for_a_batch_and_each_part_completes_on_its_own() {
    for event_idx in [false, true] {
        let s = batched_setup(4, true, true);
        let m = s.mem.memory();
        let status = |i: u64| 0x30_0000 + i * 16;
        for i in 0..8u64 {
            m.write_obj(0xffu8, GuestAddress(status(i))).unwrap();
        }
        let vring = queue(&s, &writes_and_reads(&m, 8), event_idx);
        let held = s.dev.hold.write().unwrap();
        // The worker returns with the reads still held by the device: it did not wait.
        kick(&s, &vring);
        wait_used(&vring, 4, "the writes");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(used_idx(&vring), 4, "only the writes are complete");
        assert!(
            s.call.read().is_ok(),
            "the writes were signalled on their own"
        );
        for i in 0..8u64 {
            let st: u8 = m.read_obj(GuestAddress(status(i))).unwrap();
            if i % 2 == 0 {
                assert_eq!(st, STATUS_OK, "write {i}");
            } else {
                assert_eq!(st, 0xff, "read {i} is not complete yet");
            }
        }
        assert_eq!(*s.dev.read_many_calls.lock().unwrap(), vec![4]);
        assert_eq!(*s.dev.write_many_calls.lock().unwrap(), vec![4]);
        assert_eq!(
            stop_while_held(&s, &vring, held, 4),
            8,
            "all complete when the stop returns"
        );
        if !event_idx {
            // (With EVENT_IDX the driver's used_event, still 0, asked for one signal only.)
            assert!(s.call.read().is_ok(), "the reads were signalled");
        }
        for i in (1..8).step_by(2) {
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
                STATUS_OK
            );
            assert_read_data(&m, i);
        }
        assert_each_once(&s, 8);
    }
}

#[test]
fn a_batch_is_completed_and_signalled_once() {
    // 4 request threads: the batch's requests run in parallel, still one signal per batch.
    for (event_idx, threads) in [(false, 1), (true, 1), (false, 4), (true, 4)] {
        let s = setup_threads(threads);
        let m = s.mem.memory();
        let status = |i: u64| 0x30_0000 + i * 16;
        let chains = writes_and_reads(&m, 8);
        let vring = queue(&s, &chains, event_idx);
        kick(&s, &vring);
        assert_eq!(used_idx(&vring), 8, "event_idx={event_idx}");
        for i in 0..8u64 {
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
                STATUS_OK
            );
        }
        assert_eq!(
            s.call.read().unwrap(),
            1,
            "one signal per batch (event_idx={event_idx})"
        );
        let mut seen = s.dev.indices.lock().unwrap().clone();
        if threads == 1 {
            assert_eq!(
                seen,
                (0..8).collect::<Vec<u64>>(),
                "one thread runs in order"
            );
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (0..8).collect::<Vec<u64>>(),
            "each request exactly once"
        );
        // The used ring says how much each chain wrote: data + status for reads, status for
        // writes.
        let used = vring.get_ref().get_queue().used_ring();
        for i in 0..8u64 {
            let len: u32 = m.read_obj(GuestAddress(used + 4 + 8 * i + 4)).unwrap();
            assert_eq!(len, if i % 2 == 0 { 1 } else { 4097 });
        }
        // A second kick with nothing new completes nothing and signals nothing.
        kick(&s, &vring);
        assert_eq!(used_idx(&vring), 8);
        assert!(s.call.read().is_err(), "no signal without completions");
    }
}

/// A memory table the frontend sends while the queues serve (`SET_MEM_TABLE`: vhost-user-backend
/// replaces the contents of the shared `GuestMemoryAtomic`, then calls `update_memory`) is what
/// the next batch reads, for every request thread: the queue's copy of the region table is made
/// anew, not kept from before.
#[test]
fn a_new_memory_table_is_what_the_next_batch_reads() {
    for threads in [1, 4] {
        let s = setup_threads(threads);
        let m = s.mem.memory();
        m.write_slice(&[0xaa; 4096], data_at(0)).unwrap();
        let vring = queue(
            &s,
            &[chain(&m, 0, VIRTIO_BLK_T_OUT, 0, 4096, 0x30_0000)],
            false,
        );
        kick(&s, &vring);
        wait_used(&vring, 1, "the write in the first memory");
        // New memory at the same guest addresses, holding a queue of its own: two writes
        // of other data. The old memory still holds the old queue, with its chain in it.
        let fresh = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        s.mem.lock().unwrap().replace(fresh);
        s.backend.update_memory(s.mem.clone()).unwrap();
        let m2 = s.mem.memory();
        for i in 1..3u64 {
            m2.write_slice(&[0xb0 | i as u8; 4096], data_at(i)).unwrap();
        }
        let chains: Vec<_> = (1..3u64)
            .map(|i| chain(&m2, i, VIRTIO_BLK_T_OUT, i * 8, 4096, 0x30_0000 + i * 16))
            .collect();
        let vring2 = queue(&s, &chains, false);
        kick(&s, &vring2);
        wait_used(&vring2, 2, "the writes in the new memory");
        for i in 1..3u64 {
            assert_eq!(
                m2.read_obj::<u8>(GuestAddress(0x30_0000 + i * 16)).unwrap(),
                STATUS_OK
            );
        }
        let data = s.dev.data.lock().unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0xaa), "threads={threads}");
        for i in 1..3usize {
            assert!(
                data[i * 4096..(i + 1) * 4096]
                    .iter()
                    .all(|&b| b == 0xb0 | i as u8),
                "write {i} took its data from the new memory (threads={threads})"
            );
        }
    }
}

#[test]
fn a_batchs_reads_and_writes_go_to_a_device_that_prefers_them_together() {
    // 8 well-formed requests (reads at odd i, writes at even i), a read past the end, a read
    // whose buffer lies outside guest memory, a write past the end: the 4 good reads reach
    // `read_many` in one call and the 4 good writes `write_many` in one call; everything
    // else, the refused requests included, is answered as always. In write-through mode (the
    // driver did not take VIRTIO_BLK_F_FLUSH) every write goes alone, each flushed before it
    // completes.
    // Its refused requests warn: not beside the tests that count warnings.
    let (_alone, _) = captured_alone();
    for (threads, writeback) in [(1, true), (4, true), (4, false)] {
        let s = batched_setup(threads, false, writeback);
        let m = s.mem.memory();
        let status = |i: u64| 0x30_0000 + i * 16;
        let mut chains = writes_and_reads(&m, 8);
        chains.push(chain(
            &m,
            8,
            VIRTIO_BLK_T_IN,
            CAPACITY / 512,
            4096,
            status(8),
        ));
        let mut bad = chain(&m, 9, VIRTIO_BLK_T_IN, 0, 4096, status(9));
        bad[1] = RawDescriptor::from(SplitDescriptor::new(0x2000_0000, 4096, W | N, 0));
        chains.push(bad);
        chains.push(chain(
            &m,
            10,
            VIRTIO_BLK_T_OUT,
            CAPACITY / 512 - 4,
            4096,
            status(10),
        ));
        let vring = queue(&s, &chains, true);
        kick(&s, &vring);
        assert_eq!(used_idx(&vring), 11);
        assert_eq!(*s.dev.read_many_calls.lock().unwrap(), vec![4]);
        if writeback {
            assert_eq!(*s.dev.write_many_calls.lock().unwrap(), vec![4]);
            assert_eq!(s.dev.flushes.load(Ordering::SeqCst), 0);
        } else {
            assert!(s.dev.write_many_calls.lock().unwrap().is_empty());
            assert_eq!(s.dev.flushes.load(Ordering::SeqCst), 4, "write-through");
        }
        assert_eq!(s.call.read().unwrap(), 1, "one signal per batch");
        let used = vring.get_ref().get_queue().used_ring();
        let mut lens = std::collections::HashMap::new();
        for k in 0..11u64 {
            let id: u32 = m.read_obj(GuestAddress(used + 4 + 8 * k)).unwrap();
            let len: u32 = m.read_obj(GuestAddress(used + 4 + 8 * k + 4)).unwrap();
            lens.insert(id, len);
        }
        for i in 0..11u64 {
            let st: u8 = m.read_obj(GuestAddress(status(i))).unwrap();
            let len = lens[&(i as u32 * 3)];
            match i {
                8..=10 => assert_eq!((st, len), (STATUS_IOERR, 1), "refused request {i}"),
                _ if i % 2 == 1 => {
                    assert_eq!((st, len), (STATUS_OK, 4097), "read {i}");
                    assert_read_data(&m, i);
                }
                _ => {
                    assert_eq!((st, len), (STATUS_OK, 1), "write {i}");
                    let at = (i * 4096) as usize;
                    assert!(
                        s.dev.data.lock().unwrap()[at..at + 4096] == written(i)[..],
                        "write {i} data"
                    );
                }
            }
        }
        assert_each_once(&s, 11);
        let refused: Vec<u64> = s
            .dev
            .rejected
            .lock()
            .unwrap()
            .iter()
            .map(|(c, _)| c.index)
            .collect();
        assert_eq!(refused.len(), 3, "{refused:?}");
    }
}

#[test]
fn a_batchs_other_requests_run_alone_each_once() {
    // A flush among a batch's reads and writes: the flush, which no batch takes, runs alone,
    // once, and the reads and the writes still reach the device together, each once.
    let s = batched_setup(2, false, true);
    let m = s.mem.memory();
    let mut chains = writes_and_reads(&m, 4);
    chains.push(chain(&m, 4, VIRTIO_BLK_T_FLUSH, 0, 0, 0x30_0000 + 4 * 16));
    let vring = queue(&s, &chains, true);
    kick(&s, &vring);
    assert_eq!(used_idx(&vring), 5);
    assert_eq!(*s.dev.read_many_calls.lock().unwrap(), vec![2]);
    assert_eq!(*s.dev.write_many_calls.lock().unwrap(), vec![2]);
    assert_eq!(s.dev.flushes.load(Ordering::SeqCst), 1, "the flush, once");
    for i in 0..5u64 {
        let st: u8 = m.read_obj(GuestAddress(0x30_0000 + i * 16)).unwrap();
        assert_eq!(st, STATUS_OK, "request {i}");
    }
    for i in [1u64, 3] {
        assert_read_data(&m, i);
    }
    assert_each_once(&s, 4);
}

#[test]
fn only_the_writes_the_device_wants_batched_go_to_write_many() {
    // The device batches writes of up to 4 KiB: of 3 writes of 4 KiB and 2 of 8 KiB, the
    // small ones reach `write_many` in one call, the large ones are written on their own.
    let s = setup_threads(2);
    s.backend.acked_features(1 << VIRTIO_BLK_F_FLUSH);
    s.dev.batched.store(true, Ordering::SeqCst);
    s.dev.write_batch_max.store(4096, Ordering::SeqCst);
    let m = s.mem.memory();
    let status = |i: u64| 0x30_0000 + i * 16;
    let len = |i: u64| if i % 2 == 0 { 4096 } else { 8192 };
    let chains: Vec<_> = (0..5u64)
        .map(|i| {
            m.write_slice(
                &vec![0x10 + i as u8; len(i) as usize],
                GuestAddress(0x20_0000 + i * 0x1_0000),
            )
            .unwrap();
            chain(&m, i, VIRTIO_BLK_T_OUT, i * 16, len(i), status(i))
        })
        .collect();
    let vring = queue(&s, &chains, true);
    kick(&s, &vring);
    assert_eq!(used_idx(&vring), 5);
    assert_eq!(*s.dev.write_many_calls.lock().unwrap(), vec![3]);
    let data = s.dev.data.lock().unwrap();
    for i in 0..5u64 {
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
            STATUS_OK
        );
        let at = (i * 16 * 512) as usize;
        assert!(
            data[at..at + len(i) as usize]
                .iter()
                .all(|&b| b == 0x10 + i as u8),
            "write {i}"
        );
    }
}

/// Pipelined, a batch's reads go to the device in parts of at most 8 (each completed on its
/// own); not pipelined, in one `read_many`.
#[test]
fn a_pipelined_batchs_reads_go_in_parts_of_at_most_eight() {
    for pipeline in [false, true] {
        let s = batched_setup(4, pipeline, true);
        let m = s.mem.memory();
        let chains: Vec<_> = (0..12u64)
            .map(|i| chain(&m, i, VIRTIO_BLK_T_IN, i * 8, 4096, 0x30_0000 + i * 16))
            .collect();
        let vring = queue(&s, &chains, true);
        kick(&s, &vring);
        wait_used(&vring, 12, "the reads");
        let mut parts = s.dev.read_many_calls.lock().unwrap().clone();
        parts.sort_unstable();
        let want = if pipeline { vec![4, 8] } else { vec![12] };
        assert_eq!(parts, want, "pipeline={pipeline}");
        for i in 0..12u64 {
            assert_eq!(
                m.read_obj::<u8>(GuestAddress(0x30_0000 + i * 16)).unwrap(),
                STATUS_OK
            );
            assert_read_data(&m, i);
        }
    }
}

/// Pipelined, a part also ends at 64 KiB of reads: large reads each complete on their own,
/// small ones still go eight (or as many as fit) to a part; each with its own data.
#[test]
fn a_pipelined_batchs_large_reads_go_in_parts_of_their_own() {
    let s = batched_setup(4, true, true);
    let m = s.mem.memory();
    let k = 1024u32;
    let lens = [4 * k, 4 * k, 64 * k, 32 * k, 32 * k, 4 * k];
    let chains: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(i, &len)| {
            let i = i as u64;
            chain(&m, i, VIRTIO_BLK_T_IN, i * 8, len, 0x30_0000 + i * 16)
        })
        .collect();
    let vring = queue(&s, &chains, true);
    kick(&s, &vring);
    wait_used(&vring, lens.len() as u16, "the reads");
    let mut parts = s.dev.read_many_calls.lock().unwrap().clone();
    parts.sort_unstable();
    assert_eq!(parts, vec![1, 1, 2, 2], "[4K 4K] [64K] [32K 32K] [4K]");
    assert_each_once(&s, lens.len() as u64);
    for (i, &len) in lens.iter().enumerate() {
        let i = i as u64;
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x30_0000 + i * 16)).unwrap(),
            STATUS_OK
        );
        assert_read_data_len(&m, i, len);
    }
}

/// A lone read is not batched; pipelined or not, it runs on the worker, so it is complete
/// and signalled when the kick's handling returns.
#[test]
fn a_batch_of_one_read_is_not_batched() {
    for pipeline in [false, true] {
        let s = setup_config(BackendConfig {
            io_threads: if pipeline { 4 } else { 1 },
            pipeline,
            ..BackendConfig::new(1, 256, serial_bytes("b"))
        });
        s.dev.batched.store(true, Ordering::SeqCst);
        let m = s.mem.memory();
        let vring = queue(
            &s,
            &[chain(&m, 0, VIRTIO_BLK_T_IN, 0, 4096, 0x30_0000)],
            true,
        );
        kick(&s, &vring);
        assert_eq!(used_idx(&vring), 1, "pipeline={pipeline}");
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            STATUS_OK
        );
        assert_eq!(s.call.read().unwrap(), 1);
        assert!(s.dev.read_many_calls.lock().unwrap().is_empty());
    }
}

#[test]
fn a_request_published_while_the_worker_polls_is_served_without_a_kick() {
    // A window far longer than the test's delay, so the outcome does not depend on timing:
    // the second request is published 50 ms after the kick for the first, with no kick of
    // its own, and must still be served inside the same `handle_event` call (which then
    // polls one more window before it returns).
    let s = setup_with(1, Duration::from_millis(1000));
    let m = s.mem.memory();
    let status = |i: u64| 0x30_0000 + i * 16;
    let chains: Vec<_> = (0..2u64)
        .map(|i| chain(&m, i, VIRTIO_BLK_T_IN, i * 8, 4096, status(i)))
        .collect();
    let vring = queue(&s, &chains, true);
    // Both chains are laid out; only the first is published yet.
    let avail_idx = GuestAddress(vring.get_ref().get_queue().avail_ring() + 2);
    m.store(1u16.to_le(), avail_idx, Ordering::Release).unwrap();
    let guest = s.mem.clone();
    let publisher = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        guest
            .memory()
            .store(2u16.to_le(), avail_idx, Ordering::Release)
            .unwrap();
    });
    let started = Instant::now();
    kick(&s, &vring);
    let took = started.elapsed();
    publisher.join().unwrap();
    assert_eq!(used_idx(&vring), 2, "the polled request was served");
    for i in 0..2u64 {
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
            STATUS_OK
        );
    }
    assert!(
        took >= Duration::from_millis(50),
        "handle_event returned only after the second request was published"
    );
    // The mock driver's used_event stays 0: it asked for a call after the first completion
    // only, and gets exactly that one.
    assert_eq!(s.call.read().unwrap(), 1, "calls follow used_event");
    assert_eq!(*s.dev.indices.lock().unwrap(), vec![0, 1]);
}

#[test]
fn a_worker_without_event_idx_never_polls() {
    // Without VIRTIO_RING_F_EVENT_IDX the driver kicks for every request anyway: the worker
    // returns after the batch even with a polling window configured.
    let s = setup_with(1, Duration::from_secs(30));
    let m = s.mem.memory();
    let chains = vec![chain(&m, 0, VIRTIO_BLK_T_IN, 0, 4096, 0x30_0000)];
    let vring = queue(&s, &chains, false);
    let started = Instant::now();
    kick(&s, &vring);
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(used_idx(&vring), 1);
}

#[test]
fn a_lone_request_polls_for_the_disk_while_its_queue_polls_and_batches_never_do() {
    let window = Duration::from_micros(64);
    let reads = |m: &GuestMemoryMmap, n: u64| -> Vec<_> {
        (0..n)
            .map(|i| chain(m, i, VIRTIO_BLK_T_IN, i * 8, 4096, 0x30_0000 + i * 16))
            .collect()
    };
    // `n` reads in one batch on a queue served by its worker alone: the windows they saw.
    let served = |n: u64, event_idx: bool, poll_max: Duration| -> Vec<Duration> {
        let s = setup_with(1, poll_max);
        let vring = queue(&s, &reads(&s.mem.memory(), n), event_idx);
        kick(&s, &vring);
        assert_eq!(u64::from(used_idx(&vring)), n);
        let polls = s.dev.read_polls.lock().unwrap().clone();
        polls
    };
    // A lone request runs on the worker, which waits for its disk transfer polling for the
    // largest window while its queue polls (EVENT_IDX, a window configured)...
    assert_eq!(served(1, true, window), vec![window]);
    // ... and sleeps without EVENT_IDX, or with polling off.
    assert_eq!(served(1, false, window), vec![Duration::ZERO]);
    assert_eq!(served(1, true, Duration::ZERO), vec![Duration::ZERO]);
    // A batch the worker runs itself sleeps: the kernel may need the CPU for its transfers.
    assert_eq!(served(3, true, window), vec![Duration::ZERO; 3]);
    // Pipelined, a batch goes to the request threads: none of them polls.
    let s = setup_config(BackendConfig {
        io_threads: 4,
        pipeline: true,
        poll_max: window,
        ..BackendConfig::new(1, 256, serial_bytes("b"))
    });
    let vring = queue(&s, &reads(&s.mem.memory(), 6), true);
    kick(&s, &vring);
    wait_used(&vring, 6, "the batch");
    let polls = s.dev.read_polls.lock().unwrap().clone();
    assert_eq!(polls.len(), 6);
    assert!(polls.iter().all(Duration::is_zero), "{polls:?}");
}

#[test]
fn hostile_chains_are_completed_and_warned_about_once_per_kind() {
    let (_alone, log) = captured_alone();
    let s = setup();
    let m = s.mem.memory();
    let status = |i: u64| 0x30_0000 + i * 16;
    let mut chains = Vec::new();
    // Three reads past the end, two unknown types, one good read, one chain without a
    // writable status (dropped).
    for i in 0..3u64 {
        chains.push(chain(
            &m,
            i,
            VIRTIO_BLK_T_IN,
            CAPACITY / 512,
            4096,
            status(i),
        ));
    }
    for i in 3..5u64 {
        chains.push(chain(&m, i, 0x4242, 0, 512, status(i)));
    }
    chains.push(chain(&m, 5, VIRTIO_BLK_T_IN, 0, 512, status(5)));
    let mut dropped = chain(&m, 6, VIRTIO_BLK_T_OUT, 0, 512, status(6));
    dropped[2] = RawDescriptor::from(SplitDescriptor::new(status(6), 1, 0, 0));
    chains.push(dropped);
    m.write_obj(0xeeu8, GuestAddress(status(6))).unwrap();

    let vring = queue(&s, &chains, true);
    kick(&s, &vring);
    assert_eq!(used_idx(&vring), 7, "every chain is completed");
    for i in 0..3 {
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
            STATUS_IOERR
        );
    }
    for i in 3..5 {
        assert_eq!(
            m.read_obj::<u8>(GuestAddress(status(i))).unwrap(),
            STATUS_UNSUPP
        );
    }
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(status(5))).unwrap(),
        STATUS_OK
    );
    assert_eq!(m.read_obj::<u8>(GuestAddress(status(6))).unwrap(), 0xee);
    let used = vring.get_ref().get_queue().used_ring();
    let dropped_len: u32 = m.read_obj(GuestAddress(used + 4 + 8 * 6 + 4)).unwrap();
    assert_eq!(dropped_len, 0, "a dropped chain is completed with length 0");
    assert_eq!(
        *s.dev.indices.lock().unwrap(),
        (0..7).collect::<Vec<u64>>(),
        "every chain got the next request index, rejected ones included"
    );

    let lines = log.0.lock().unwrap().clone();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("beyond the end of the device"), 1, "{lines:?}");
    assert_eq!(count("unsupported request type 16962"), 1, "{lines:?}");
    assert_eq!(
        count("status descriptor is not device-writable"),
        1,
        "{lines:?}"
    );
}

#[test]
fn config_space_and_features_follow_the_device() {
    let s = setup();
    let f = s.backend.features();
    for bit in [1u32, 2, 6, 9, 10, 11, 12, 13, 14, 28, 29, 30, 32] {
        if bit == 1 {
            assert_eq!(f & (1 << bit), 0, "SIZE_MAX is not offered");
        } else {
            assert_ne!(f & (1 << bit), 0, "feature bit {bit}");
        }
    }
    assert_eq!(f & (1 << 5), 0, "RO only for read-only devices");
    let cfg = s.backend.get_config(0, 8);
    assert_eq!(u64::from_le_bytes(cfg.try_into().unwrap()), CAPACITY / 512);
    assert_eq!(s.backend.get_config(0x1000, 4), vec![0; 4]);
    // Writing the cache mode requires CONFIG_WCE to be negotiated.
    assert!(s.backend.set_config(32, &[0]).is_err());
    s.backend.acked_features(f);
    assert_eq!(s.backend.get_config(32, 1), vec![1]);
    s.backend.set_config(32, &[0]).unwrap();
    assert_eq!(s.backend.get_config(32, 1), vec![0]);
    assert_eq!(
        s.dev.flushes.load(Ordering::SeqCst),
        1,
        "entering write-through flushes"
    );
    assert!(s.backend.set_config(0, &[0; 8]).is_err());
    let p = s.backend.protocol_features();
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    assert!(p.contains(P::CONFIG | P::MQ | P::REPLY_ACK | P::CONFIGURE_MEM_SLOTS));
    assert_eq!(s.backend.queues_per_thread(), vec![1]);
}

#[test]
fn a_corrupt_available_ring_does_not_spin_the_worker() {
    let (_alone, log) = captured_alone();
    let s = setup();
    let m = s.mem.memory();
    let chains = vec![chain(&m, 0, VIRTIO_BLK_T_IN, 0, 512, 0x30_0000)];
    let vring = queue(&s, &chains, true);
    // avail.idx 1000 entries ahead of the device on a 256-entry ring.
    let avail = vring.get_ref().get_queue().avail_ring();
    m.write_obj(1000u16.to_le(), GuestAddress(avail + 2))
        .unwrap();
    let backend = Arc::new(s.backend);
    let (tx, rx) = std::sync::mpsc::channel();
    let b = backend.clone();
    let v = vring.clone();
    std::thread::spawn(move || {
        let r = b.handle_event(0, EventSet::IN, std::slice::from_ref(&v), 0);
        let _ = tx.send(r.is_ok());
    });
    let ok = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("handle_event must return on a corrupt ring");
    assert!(ok);
    assert_eq!(
        used_idx(&vring),
        0,
        "nothing is completed from a corrupt ring"
    );
    let lines = log.0.lock().unwrap().clone();
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("cannot read the available ring"))
            .count(),
        1,
        "{lines:?}"
    );
}

#[test]
fn a_used_ring_outside_guest_memory_is_survived() {
    for event_idx in [false, true] {
        let s = setup();
        let m = s.mem.memory();
        let chains = vec![chain(&m, 0, VIRTIO_BLK_T_IN, 0, 512, 0x30_0000)];
        let vring = queue(&s, &chains, event_idx);
        let (desc, avail) = {
            let st = vring.get_ref();
            (st.get_queue().desc_table(), st.get_queue().avail_ring())
        };
        vring.set_queue_info(desc, avail, 0x4000_0000).unwrap();
        s.backend
            .handle_event(0, EventSet::IN, std::slice::from_ref(&vring), 0)
            .expect("a broken ring must not kill the worker");
    }
}

/// A device that delegates to an image device but never vouches for a ring read's data
/// afterwards, as when a reclaim ran beside every read; counts the ordinary reads.
struct NeverCurrent(
    rr_row::blockdev::image_dev::ImageDevice,
    Arc<std::sync::atomic::AtomicU64>,
);

impl rr_row::blockdev::BlockDevice for NeverCurrent {
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn block_size(&self) -> u32 {
        self.0.block_size()
    }
    fn is_read_only(&self) -> bool {
        self.0.is_read_only()
    }
    fn read(
        &self,
        ctx: &rr_row::blockdev::RequestCtx,
        offset: u64,
        segs: &[rr_row::iobuf::IoSeg<'_>],
    ) -> Result<(), rr_row::blockdev::BlockError> {
        self.1.fetch_add(1, Ordering::SeqCst);
        self.0.read(ctx, offset, segs)
    }
    fn write(
        &self,
        ctx: &rr_row::blockdev::RequestCtx,
        offset: u64,
        segs: &[rr_row::iobuf::IoSeg<'_>],
    ) -> Result<(), rr_row::blockdev::BlockError> {
        self.0.write(ctx, offset, segs)
    }
    fn flush(
        &self,
        ctx: &rr_row::blockdev::RequestCtx,
    ) -> Result<(), rr_row::blockdev::BlockError> {
        self.0.flush(ctx)
    }
    fn discard(
        &self,
        ctx: &rr_row::blockdev::RequestCtx,
        offset: u64,
        len: u64,
    ) -> Result<(), rr_row::blockdev::BlockError> {
        self.0.discard(ctx, offset, len)
    }
    fn write_zeroes(
        &self,
        ctx: &rr_row::blockdev::RequestCtx,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), rr_row::blockdev::BlockError> {
        self.0.write_zeroes(ctx, offset, len, unmap)
    }
    fn prefers_batched_reads(&self) -> bool {
        self.0.prefers_batched_reads()
    }
    fn plan_read(
        &self,
        ctx: &rr_row::blockdev::RequestCtx,
        offset: u64,
        segs: &[rr_row::iobuf::IoSeg<'_>],
    ) -> Result<Option<rr_row::image::ReadPlan>, rr_row::blockdev::BlockError> {
        self.0.plan_read(ctx, offset, segs)
    }
}

/// Pipelined reads of a direct image on the queue's io_uring ring: `n` reads of 4 KiB at
/// sector `8 i` (the image's first 12 blocks hold each sector's number, the rest was never
/// written), one read past the end, and a kick; then the ring's completions are handed to
/// the backend as its event loop would. Returns the guest memory, how many completion events
/// the ring raised (those handled, and one still pending), and (for a device that never vouches for a ring read) how many reads the
/// request threads ran.
fn ring_reads_served(current: bool, registered: bool, n: u64) -> (GuestMemoryMmap, u32, u64) {
    use rr_row::blockdev::image_dev::ImageDevice;
    use rr_row::image::{CreateOptions, Image, OpenMode, OpenOptions};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ring.rrow");
    let img = Image::create(
        &path,
        &CreateOptions {
            size: CAPACITY,
            block_size: rr_row::units::BlockSize::DEFAULT,
            base: None,
        },
    )
    .unwrap();
    let data: Vec<u8> = (0..12 * 4096u64).map(|b| (b / 512) as u8).collect();
    img.write_at(0, &data).unwrap();
    img.close().unwrap();
    let img = Image::open_with_options(
        &path,
        OpenMode::ReadWrite,
        &OpenOptions {
            direct: true,
            shared_lock: false,
        },
    )
    .unwrap();
    let image_dev = ImageDevice::new(img);
    let reread = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let dev: Arc<dyn rr_row::blockdev::BlockDevice> = if current {
        Arc::new(image_dev)
    } else {
        Arc::new(NeverCurrent(image_dev, reread.clone()))
    };
    let mmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
    let mem = GuestMemoryAtomic::new(mmap);
    let backend = BlkBackend::new(
        dev,
        BackendConfig {
            io_threads: 4,
            pipeline: true,
            ring_reads: true,
            ..BackendConfig::new(1, 256, serial_bytes("r"))
        },
        mem.clone(),
    )
    .unwrap();
    let fds = backend.ring_read_fds();
    assert_eq!(fds.len(), 1, "one ring for the one queue");
    let (q, fd) = fds[0];
    assert_eq!(q, 0);
    if registered {
        backend.ring_registered(0);
    }
    let m = mem.memory();
    let mut chains: Vec<Vec<RawDescriptor>> = (0..n)
        .map(|i| chain(&m, i, VIRTIO_BLK_T_IN, i * 8, 4096, 0x30_0000 + i * 16))
        .collect();
    chains.push(chain(
        &m,
        n,
        VIRTIO_BLK_T_IN,
        CAPACITY / 512,
        4096,
        0x30_0000 + n * 16,
    ));
    for i in 0..=n {
        m.write_slice(&[0xee; 4096], data_at(i)).unwrap();
    }
    let s = Setup {
        mem: mem.clone(),
        dev: MemDevice::new(512, 0, false),
        backend,
        call: EventFd::new(EFD_NONBLOCK).unwrap(),
    };
    let vring = queue(&s, &chains, true);
    kick(&s, &vring);
    // The worker's event loop: the ring's eventfd wakes it for the ring's event.
    let mut events = 0u32;
    let deadline = Instant::now() + Duration::from_secs(30);
    while u64::from(used_idx(&vring)) < n + 1 {
        assert!(Instant::now() < deadline, "ring reads never completed");
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, a 10 ms timeout.
        if unsafe { libc::poll(&mut pfd, 1, 10) } == 1 {
            events += 1;
            s.backend
                .handle_event(
                    s.backend.ring_event(),
                    EventSet::IN,
                    std::slice::from_ref(&vring),
                    0,
                )
                .unwrap();
        }
    }
    // The worker may have taken every completion itself right after submitting (it looks
    // once before going back to sleep), leaving the event raised but unhandled.
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    if unsafe { libc::poll(&mut pfd, 1, 0) } == 1 {
        events += 1;
    }
    drop(s);
    ((*m).clone(), events, reread.load(Ordering::SeqCst))
}

#[test]
fn ring_reads_complete_with_the_disks_data_through_the_rings_event() {
    let n = 16u64;
    for (current, registered) in [(true, true), (false, true), (true, false)] {
        let (m, events, reread) = ring_reads_served(current, registered, n);
        for i in 0..n {
            let status: u8 = m.read_obj(GuestAddress(0x30_0000 + i * 16)).unwrap();
            assert_eq!(status, STATUS_OK, "read {i} ({current}, {registered})");
            let mut got = vec![0u8; 4096];
            m.read_slice(&mut got, data_at(i)).unwrap();
            // Blocks 0..12 hold their sectors' numbers; the others were never written.
            let want: Vec<u8> = (0..4096u64)
                .map(|b| {
                    if i < 12 {
                        ((i * 4096 + b) / 512) as u8
                    } else {
                        0
                    }
                })
                .collect();
            assert!(got == want, "read {i} data ({current}, {registered})");
        }
        let past: u8 = m.read_obj(GuestAddress(0x30_0000 + n * 16)).unwrap();
        assert_eq!(past, STATUS_IOERR, "the read past the end fails as always");
        if registered {
            // The written blocks' reads went to the disk through the ring, which raised its
            // event (the never-written ones completed while planned); reads the device did
            // not vouch for were read again by the request threads, right all the same.
            assert!(events > 0, "the ring's event was raised ({current})");
            if !current {
                // Every read the ring took, or that was served while planned (the
                // never-written blocks), is read again; the one past the end never
                // reaches the device.
                assert_eq!(reread, n, "each planned read was read again");
            }
        } else {
            // An unregistered ring is never used: the request threads served every read.
            assert_eq!(events, 0);
        }
    }
}

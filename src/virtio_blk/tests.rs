//! Request parsing and execution tested without a VM: descriptor chains are built with
//! virtio-queue's `MockSplitQueue` over a `GuestMemoryMmap`, and executed against an in-memory
//! block device. Every malformed-chain case asserts its exact status byte (or that the chain
//! was dropped) and the exact error variant.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use proptest::prelude::*;
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::bindings::virtio_ring::{
    VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::blockdev::{BlockDevice, BlockError, RejectedRequest, RequestCtx, RequestKind};
use crate::iobuf::{total_len, IoSeg};

use super::execute::{process_chain, ChainError, Completion, ExecuteError, ExecuteParams};
use super::request::{Limits, RequestError, RequestType};
use super::{serial_bytes, STATUS_IOERR, STATUS_OK, STATUS_UNSUPP};

const MEM_SIZE: usize = 0x100_0000;
const HDR: u64 = 0x10_0000;
const DATA: u64 = 0x20_0000;
const DATA2: u64 = 0x28_0000;
const STATUS: u64 = 0x30_0000;
const TABLE: u64 = 0x40_0000;
const CAPACITY: u64 = 1 << 20;
const R: u16 = 0;
const W: u16 = VRING_DESC_F_WRITE as u16;

/// A block device over a byte vector, recording what it was asked.
struct MemDevice {
    data: Mutex<Vec<u8>>,
    read_only: bool,
    flushes: AtomicUsize,
    calls: AtomicUsize,
    rejected: Mutex<Vec<RejectedRequest>>,
}

impl MemDevice {
    fn new(read_only: bool) -> Self {
        MemDevice {
            data: Mutex::new((0..CAPACITY).map(|i| (i % 251) as u8).collect()),
            read_only,
            flushes: AtomicUsize::new(0),
            calls: AtomicUsize::new(0),
            rejected: Mutex::new(Vec::new()),
        }
    }

    fn range(&self, offset: u64, len: u64) -> Result<std::ops::Range<usize>, BlockError> {
        if offset % 512 != 0 || len % 512 != 0 {
            return Err(BlockError::Unaligned { offset, len });
        }
        match offset.checked_add(len) {
            Some(end) if end <= CAPACITY => Ok(offset as usize..end as usize),
            _ => Err(BlockError::OutOfRange {
                offset,
                len,
                capacity: CAPACITY,
            }),
        }
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        self.data.lock().unwrap()[offset as usize..offset as usize + len].to_vec()
    }
}

impl BlockDevice for MemDevice {
    fn capacity(&self) -> u64 {
        CAPACITY
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn is_read_only(&self) -> bool {
        self.read_only
    }
    fn read(&self, _: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = self.range(offset, total_len(segs))?;
        let data = self.data.lock().unwrap();
        let mut pos = r.start;
        for s in segs {
            assert!(s.copy_from(0, &data[pos..pos + s.len()]));
            pos += s.len();
        }
        Ok(())
    }
    fn write(&self, _: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
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
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = self.range(offset, len)?;
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn write_zeroes(&self, _: &RequestCtx, o: u64, l: u64, _unmap: bool) -> Result<(), BlockError> {
        self.discard(&RequestCtx::default(), o, l)
    }
    fn rejected(&self, _: &RequestCtx, req: &RejectedRequest) {
        self.rejected.lock().unwrap().push(*req);
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn params() -> ExecuteParams {
    ExecuteParams {
        limits: Limits {
            seg_max: 8,
            max_dwz_segments: 4,
            max_dwz_sectors: 1 << 12,
        },
        serial: serial_bytes("rr-row-test-serial"),
        write_through: false,
    }
}

fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

fn header(m: &GuestMemoryMmap, addr: u64, t: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&t.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(addr)).unwrap();
}

fn dwz(m: &GuestMemoryMmap, addr: u64, segs: &[(u64, u32, u32)]) -> u32 {
    for (i, (sector, n, flags)) in segs.iter().enumerate() {
        let mut e = [0u8; 16];
        e[0..8].copy_from_slice(&sector.to_le_bytes());
        e[8..12].copy_from_slice(&n.to_le_bytes());
        e[12..16].copy_from_slice(&flags.to_le_bytes());
        m.write_slice(&e, GuestAddress(addr + 16 * i as u64))
            .unwrap();
    }
    16 * segs.len() as u32
}

/// Runs a chain built by `build_desc_chain` (NEXT flags and indices filled in).
fn run(m: &GuestMemoryMmap, dev: &MemDevice, descs: &[RawDescriptor]) -> Completion {
    run_with(m, dev, descs, &params())
}

fn run_with(
    m: &GuestMemoryMmap,
    dev: &MemDevice,
    descs: &[RawDescriptor],
    p: &ExecuteParams,
) -> Completion {
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(m, 256);
    let chain = q.build_desc_chain(descs).unwrap();
    process_chain(chain, dev, &RequestCtx { queue: 0, index: 7 }, p)
}

fn status_byte(m: &GuestMemoryMmap) -> u8 {
    m.read_obj(GuestAddress(STATUS)).unwrap()
}

/// Asserts a chain failed with `status` written to the status byte and the given error.
fn assert_failed(m: &GuestMemoryMmap, c: &Completion, status: u8, want: &RequestError) {
    assert_eq!(c.status, Some(status), "{:?}", c.error);
    assert_eq!(c.used_len, 1);
    assert_eq!(status_byte(m), status);
    match &c.error {
        Some(ChainError::Malformed(e)) => assert_eq!(e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

fn assert_dropped(m: &GuestMemoryMmap, c: &Completion, want: &RequestError) {
    assert_eq!(c.status, None);
    assert_eq!(c.used_len, 0);
    assert_eq!(status_byte(m), 0xff, "nothing may be written");
    match &c.error {
        Some(ChainError::Malformed(e)) => assert_eq!(e, want),
        other => panic!("expected {want:?}, got {other:?}"),
    }
}

// ---- happy paths -------------------------------------------------------------------------

#[test]
fn write_then_read_multi_segment() {
    let m = mem();
    let dev = MemDevice::new(false);
    let pattern: Vec<u8> = (0..1536u32).map(|i| (i * 7 % 256) as u8).collect();
    m.write_slice(&pattern[..512], GuestAddress(DATA)).unwrap();
    m.write_slice(&pattern[512..], GuestAddress(DATA2)).unwrap();
    header(&m, HDR, VIRTIO_BLK_T_OUT, 3);
    let c = run(
        &m,
        &dev,
        &[
            d(HDR, 16, R),
            d(DATA, 512, R),
            d(DATA2, 1024, R),
            d(STATUS, 1, W),
        ],
    );
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len, 1);
    assert_eq!(dev.bytes(3 * 512, 1536), pattern);

    header(&m, HDR, VIRTIO_BLK_T_IN, 3);
    m.write_slice(&[0u8; 1536], GuestAddress(DATA)).unwrap();
    let c = run(
        &m,
        &dev,
        &[
            d(HDR, 16, R),
            d(DATA, 1024, W),
            d(DATA2, 512, W),
            d(STATUS, 1, W),
        ],
    );
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len, 1536 + 1);
    let mut back = vec![0u8; 1536];
    m.read_slice(&mut back[..1024], GuestAddress(DATA)).unwrap();
    m.read_slice(&mut back[1024..], GuestAddress(DATA2))
        .unwrap();
    assert_eq!(back, pattern);
    assert_eq!(status_byte(&m), STATUS_OK);
}

#[test]
fn header_split_and_status_sharing_a_data_descriptor() {
    // ANY_LAYOUT: header over two descriptors, data and status in one writable descriptor.
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 1);
    let expect = dev.bytes(512, 512);
    m.write_obj(0xffu8, GuestAddress(DATA + 512)).unwrap();
    let q = MockSplitQueue::new(&m, 256);
    let chain = q
        .build_desc_chain(&[d(HDR, 10, R), d(HDR + 10, 6, R), d(DATA, 513, W)])
        .unwrap();
    let c = process_chain(chain, &dev, &RequestCtx::default(), &params());
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len, 513);
    let mut back = vec![0u8; 512];
    m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, expect);
    assert_eq!(
        m.read_obj::<u8>(GuestAddress(DATA + 512)).unwrap(),
        STATUS_OK
    );
}

#[test]
fn header_and_data_in_one_descriptor() {
    // ANY_LAYOUT the other way round: an OUT whose header and data share a descriptor.
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 2);
    m.write_slice(&[0x42; 512], GuestAddress(HDR + 16)).unwrap();
    let c = run(&m, &dev, &[d(HDR, 16 + 512, R), d(STATUS, 1, W)]);
    assert_eq!(c.status, Some(STATUS_OK), "{:?}", c.error);
    assert_eq!(dev.bytes(1024, 512), vec![0x42; 512]);
}

#[test]
fn indirect_descriptors_are_followed() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 8);
    m.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
    let nf = VRING_DESC_F_NEXT as u16;
    let table = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, nf, 1)),
        RawDescriptor::from(SplitDescriptor::new(DATA, 1024, nf, 2)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W, 0)),
    ];
    for (i, t) in table.iter().enumerate() {
        m.write_obj(*t, GuestAddress(TABLE + 16 * i as u64))
            .unwrap();
    }
    let c = run(&m, &dev, &[d(TABLE, 48, VRING_DESC_F_INDIRECT as u16)]);
    assert_eq!(c.status, Some(STATUS_OK), "{:?}", c.error);
    assert_eq!(dev.bytes(8 * 512, 1024), vec![0xab; 1024]);
}

#[test]
fn flush_reaches_the_device() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(STATUS, 1, W)]);
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn write_through_flushes_every_write() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let p = ExecuteParams {
        write_through: true,
        ..params()
    };
    let c = run_with(
        &m,
        &dev,
        &[d(HDR, 16, R), d(DATA, 512, R), d(STATUS, 1, W)],
        &p,
    );
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(dev.flushes.load(Ordering::SeqCst), 1);
}

#[test]
fn get_id_returns_the_zero_padded_serial() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    m.write_slice(&[0xee; 20], GuestAddress(DATA)).unwrap();
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 20, W), d(STATUS, 1, W)]);
    assert_eq!(c.status, Some(STATUS_OK));
    assert_eq!(c.used_len, 21);
    let mut id = [0u8; 20];
    m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id[..18], b"rr-row-test-serial");
    assert_eq!(&id[18..], &[0, 0]);
}

#[test]
fn discard_and_write_zeroes_zero_their_ranges() {
    let m = mem();
    let dev = MemDevice::new(false);
    for (t, flags) in [
        (VIRTIO_BLK_T_DISCARD, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 1),
    ] {
        *dev.data.lock().unwrap() = vec![0x55; CAPACITY as usize];
        header(&m, HDR, t, 0);
        let len = dwz(&m, DATA, &[(2, 2, flags), (10, 1, flags)]);
        let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
        assert_eq!(c.status, Some(STATUS_OK), "type {t} flags {flags}");
        assert_eq!(dev.bytes(1024, 1024), vec![0; 1024]);
        assert_eq!(dev.bytes(5120, 512), vec![0; 512]);
        assert_eq!(dev.bytes(512, 512), vec![0x55; 512]);
        assert_eq!(dev.bytes(2048, 512), vec![0x55; 512]);
    }
}

#[test]
fn read_only_device_serves_reads_and_flushes() {
    let m = mem();
    let dev = MemDevice::new(true);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 1, W)]);
    assert_eq!(c.status, Some(STATUS_OK));
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(STATUS, 1, W)]);
    assert_eq!(c.status, Some(STATUS_OK));
}

// ---- refused by execution ------------------------------------------------------------------

fn assert_refused(m: &GuestMemoryMmap, c: &Completion, is: fn(&ExecuteError) -> bool) {
    assert_eq!(c.status, Some(STATUS_IOERR));
    assert_eq!(status_byte(m), STATUS_IOERR);
    match &c.error {
        Some(ChainError::Execute(e)) => assert!(is(e), "{e:?}"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn read_past_the_end_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, CAPACITY / 512 - 1);
    let c = run(
        &m,
        &dev,
        &[d(HDR, 16, R), d(DATA, 1024, W), d(STATUS, 1, W)],
    );
    assert_refused(&m, &c, |e| matches!(e, ExecuteError::OutOfRange { .. }));
    assert_eq!(
        dev.calls.load(Ordering::SeqCst),
        0,
        "the device is not called"
    );
    let rej = dev.rejected.lock().unwrap();
    assert_eq!(rej.len(), 1);
    assert_eq!(rej[0].kind, RequestKind::Read);
    assert_eq!(rej[0].sector, CAPACITY / 512 - 1);
    assert_eq!(rej[0].len, 1024);
    assert_eq!(rej[0].status, STATUS_IOERR);
}

#[test]
fn discard_past_the_end_changes_nothing() {
    let m = mem();
    let dev = MemDevice::new(false);
    let before = dev.bytes(0, 1024);
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = dwz(&m, DATA, &[(0, 2, 0), (CAPACITY / 512, 1, 0)]);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
    assert_refused(&m, &c, |e| matches!(e, ExecuteError::OutOfRange { .. }));
    assert_eq!(
        dev.bytes(0, 1024),
        before,
        "validated before the first range ran"
    );
}

#[test]
fn writes_on_a_read_only_device_are_ioerr() {
    let m = mem();
    let dev = MemDevice::new(true);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 512, R), d(STATUS, 1, W)]);
    assert_refused(&m, &c, |e| matches!(e, ExecuteError::ReadOnly));
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        header(&m, HDR, t, 0);
        let len = dwz(&m, DATA, &[(0, 1, 0)]);
        let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
        assert_refused(&m, &c, |e| matches!(e, ExecuteError::ReadOnly));
    }
    assert_eq!(dev.calls.load(Ordering::SeqCst), 0);
}

// ---- malformed chains: dropped (no status byte can be written) -----------------------------

#[test]
fn broken_indirect_head_is_an_empty_chain() {
    let m = mem();
    let dev = MemDevice::new(false);
    // An indirect table length that is not a multiple of 16.
    let c = run(&m, &dev, &[d(TABLE, 20, VRING_DESC_F_INDIRECT as u16)]);
    assert_dropped(&m, &c, &RequestError::EmptyChain);
    assert_eq!(dev.rejected.lock().unwrap().len(), 1);
}

#[test]
fn looping_chain_is_dropped() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let nf = VRING_DESC_F_NEXT as u16;
    let q = MockSplitQueue::new(&m, 16);
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(HDR, 16, nf, 1)),
        RawDescriptor::from(SplitDescriptor::new(STATUS, 1, W | nf, 0)),
    ];
    let chain = q.build_multiple_desc_chains(&descs).unwrap();
    let c = process_chain(chain, &dev, &RequestCtx::default(), &params());
    assert_dropped(&m, &c, &RequestError::ChainTruncated);
}

#[test]
fn next_index_outside_the_table_is_dropped() {
    let m = mem();
    let dev = MemDevice::new(false);
    m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let q = MockSplitQueue::new(&m, 16);
    let descs = [RawDescriptor::from(SplitDescriptor::new(
        HDR,
        16,
        VRING_DESC_F_NEXT as u16,
        200,
    ))];
    let chain = q.build_multiple_desc_chains(&descs).unwrap();
    let c = process_chain(chain, &dev, &RequestCtx::default(), &params());
    assert_dropped(&m, &c, &RequestError::ChainTruncated);
}

#[test]
fn read_only_status_descriptor_is_dropped() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 1, R)]);
    assert_dropped(&m, &c, &RequestError::StatusNotWritable);
}

#[test]
fn empty_status_descriptor_is_dropped() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(STATUS, 0, W)]);
    assert_dropped(&m, &c, &RequestError::StatusTooShort);
}

#[test]
fn status_outside_guest_memory_is_dropped() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let out = MEM_SIZE as u64 + 0x1000;
    let c = run(&m, &dev, &[d(HDR, 16, R), d(out, 1, W)]);
    assert_dropped(&m, &c, &RequestError::StatusOutOfMemory(out));
}

#[test]
fn missing_status_descriptor_is_dropped() {
    // A lone header: the last descriptor is device-readable.
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R)]);
    assert_dropped(&m, &c, &RequestError::StatusNotWritable);
}

// ---- malformed chains: completed with a status ---------------------------------------------

#[test]
fn too_many_descriptors_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let mut descs = vec![d(HDR, 16, R)];
    descs.extend((0..9).map(|i| d(DATA + 512 * i, 512, W)));
    descs.push(d(STATUS, 1, W));
    let c = run(&m, &dev, &descs);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::TooManyDescriptors { count: 11, max: 10 },
    );
}

#[test]
fn data_outside_guest_memory_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let out = MEM_SIZE as u64 - 256;
    let c = run(&m, &dev, &[d(HDR, 16, R), d(out, 512, W), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::DescriptorOutOfMemory {
            addr: out,
            len: 512,
        },
    );
    assert_eq!(dev.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn writable_header_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let c = run(&m, &dev, &[d(HDR, 16, W), d(DATA, 512, W), d(STATUS, 1, W)]);
    assert_failed(&m, &c, STATUS_IOERR, &RequestError::HeaderNotReadable);
}

#[test]
fn readable_after_writable_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let c = run(
        &m,
        &dev,
        &[
            d(HDR, 16, R),
            d(DATA, 512, W),
            d(DATA2, 512, R),
            d(STATUS, 1, W),
        ],
    );
    assert_failed(&m, &c, STATUS_IOERR, &RequestError::ReadableAfterWritable);
}

#[test]
fn short_header_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_FLUSH, 0);
    let c = run(&m, &dev, &[d(HDR, 8, R), d(STATUS, 1, W)]);
    assert_failed(&m, &c, STATUS_IOERR, &RequestError::HeaderTooShort(8));
}

#[test]
fn data_in_the_wrong_direction_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_IN, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 512, R), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::DataWrongDirection {
            request_type: RequestType::In,
            writable: false,
            len: 512,
        },
    );
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 512, W), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::DataWrongDirection {
            request_type: RequestType::Out,
            writable: true,
            len: 512,
        },
    );
    assert_eq!(dev.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn unaligned_data_length_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_OUT, 0);
    let c = run(
        &m,
        &dev,
        &[d(HDR, 16, R), d(DATA, 1000, R), d(STATUS, 1, W)],
    );
    assert_failed(&m, &c, STATUS_IOERR, &RequestError::UnalignedLength(1000));
}

#[test]
fn sector_overflow_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    let sector = u64::MAX / 512;
    header(&m, HDR, VIRTIO_BLK_T_IN, sector);
    let c = run(
        &m,
        &dev,
        &[d(HDR, 16, R), d(DATA, 1024, W), d(STATUS, 1, W)],
    );
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::SectorOverflow { sector, len: 1024 },
    );
}

#[test]
fn small_get_id_buffer_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_GET_ID, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 10, W), d(STATUS, 1, W)]);
    assert_failed(&m, &c, STATUS_IOERR, &RequestError::GetIdBufferTooSmall(10));
}

#[test]
fn malformed_segment_arrays_are_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, 20, R), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::SegmentArrayMalformed(20),
    );
    let c = run(&m, &dev, &[d(HDR, 16, R), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::SegmentArrayMalformed(0),
    );
}

#[test]
fn too_many_segments_is_unsupp() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = dwz(&m, DATA, &[(0, 1, 0); 5]);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_UNSUPP,
        &RequestError::TooManySegments { count: 5, max: 4 },
    );
}

#[test]
fn reserved_or_unmap_flags_on_discard_are_unsupp() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = dwz(&m, DATA, &[(0, 1, 1)]);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
    assert_failed(&m, &c, STATUS_UNSUPP, &RequestError::SegmentFlags(1));
    header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = dwz(&m, DATA, &[(0, 1, 0x4)]);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
    assert_failed(&m, &c, STATUS_UNSUPP, &RequestError::SegmentFlags(4));
    assert_eq!(dev.calls.load(Ordering::SeqCst), 0);
}

#[test]
fn oversized_segment_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let len = dwz(&m, DATA, &[(0, (1 << 12) + 1, 0)]);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::SegmentTooLarge {
            num_sectors: (1 << 12) + 1,
            max: 1 << 12,
        },
    );
}

#[test]
fn segment_sector_overflow_is_ioerr() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let len = dwz(&m, DATA, &[(u64::MAX, 1, 0)]);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(DATA, len, R), d(STATUS, 1, W)]);
    assert_failed(
        &m,
        &c,
        STATUS_IOERR,
        &RequestError::SectorOverflow {
            sector: u64::MAX,
            len: 512,
        },
    );
}

#[test]
fn unknown_type_is_unsupp_and_reported() {
    let m = mem();
    let dev = MemDevice::new(false);
    header(&m, HDR, 99, 5);
    let c = run(&m, &dev, &[d(HDR, 16, R), d(STATUS, 1, W)]);
    assert_failed(&m, &c, STATUS_UNSUPP, &RequestError::UnsupportedType(99));
    let rej = dev.rejected.lock().unwrap();
    assert_eq!(rej.len(), 1);
    assert_eq!(rej[0].kind, RequestKind::Other(99));
    assert_eq!(rej[0].sector, 5);
    assert_eq!(rej[0].status, STATUS_UNSUPP);
}

// ---- random chains -------------------------------------------------------------------------

fn arb_desc() -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        prop_oneof![
            Just(HDR),
            Just(DATA),
            Just(STATUS),
            Just(TABLE),
            0u64..(2 * MEM_SIZE as u64),
            Just(u64::MAX - 8),
        ],
        prop_oneof![
            Just(1u32),
            Just(16),
            Just(512),
            Just(4096),
            0u32..70000,
            Just(u32::MAX)
        ],
        0u16..8,
        0u16..40,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Whatever the descriptors say, execution never panics, always completes the chain, and a
    /// reported status is the byte found in guest memory.
    #[test]
    fn random_chains_always_complete(
        descs in proptest::collection::vec(arb_desc(), 1..12),
        t in prop_oneof![Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), Just(VIRTIO_BLK_T_FLUSH),
                         Just(VIRTIO_BLK_T_GET_ID), Just(VIRTIO_BLK_T_DISCARD),
                         Just(VIRTIO_BLK_T_WRITE_ZEROES), any::<u32>()],
        sector in prop_oneof![0u64..4096, any::<u64>()],
        table in proptest::collection::vec(arb_desc(), 0..6),
        seg in (any::<u64>(), any::<u32>(), any::<u32>()),
        read_only in any::<bool>(),
    ) {
        let m = mem();
        let dev = MemDevice::new(read_only);
        header(&m, HDR, t, sector);
        dwz(&m, DATA, &[seg, (sector, 8, 0)]);
        for (i, (addr, len, flags, next)) in table.iter().enumerate() {
            m.write_obj(RawDescriptor::from(SplitDescriptor::new(*addr, *len, *flags, *next)),
                        GuestAddress(TABLE + 16 * i as u64)).unwrap();
        }
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(a, l, f, n)| RawDescriptor::from(SplitDescriptor::new(*a, *l, *f, *n)))
            .collect();
        let q = MockSplitQueue::new(&m, 32);
        let chain = q.build_multiple_desc_chains(&raw).unwrap();
        let c = process_chain(chain, &dev, &RequestCtx::default(), &params());
        match c.status {
            Some(s) => {
                prop_assert!(s == STATUS_OK || s == STATUS_IOERR || s == STATUS_UNSUPP);
                prop_assert!(c.used_len >= 1);
                prop_assert_eq!(s == STATUS_OK, c.error.is_none());
            }
            None => {
                prop_assert_eq!(c.used_len, 0);
                prop_assert!(c.error.is_some());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Linear chains of random descriptors: when a status is reported it is the byte at the end
    /// of the last descriptor, and a chain is dropped exactly when that descriptor cannot hold
    /// a status.
    #[test]
    fn linear_chains_report_status_in_place(
        descs in proptest::collection::vec(
            (prop_oneof![Just(HDR), Just(DATA), Just(DATA2), 0u64..(2 * MEM_SIZE as u64)],
             prop_oneof![Just(1u32), Just(16), Just(20), Just(512), Just(4096), 0u32..9000],
             any::<bool>()),
            1..12),
        t in prop_oneof![Just(VIRTIO_BLK_T_IN), Just(VIRTIO_BLK_T_OUT), Just(VIRTIO_BLK_T_FLUSH),
                         Just(VIRTIO_BLK_T_GET_ID), Just(VIRTIO_BLK_T_DISCARD),
                         Just(VIRTIO_BLK_T_WRITE_ZEROES), any::<u32>()],
        sector in prop_oneof![0u64..4096, any::<u64>()],
        status_in_memory in any::<bool>(),
    ) {
        let m = mem();
        let dev = MemDevice::new(false);
        header(&m, HDR, t, sector);
        dwz(&m, DATA, &[(sector, 8, 0)]);
        let mut raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|(a, l, w)| d(*a, *l, if *w { W } else { R }))
            .collect();
        let status_addr = if status_in_memory { STATUS } else { MEM_SIZE as u64 + 5 };
        raw.push(d(status_addr, 1, W));
        m.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        let q = MockSplitQueue::new(&m, 32);
        let chain = q.build_desc_chain(&raw).unwrap();
        let c = process_chain(chain, &dev, &RequestCtx::default(), &params());
        if status_in_memory {
            let s = c.status.expect("a usable status byte is always written");
            prop_assert_eq!(status_byte(&m), s);
            prop_assert!(c.used_len >= 1);
        } else {
            prop_assert_eq!(c.status, None);
            prop_assert_eq!(c.used_len, 0);
            prop_assert!(matches!(
                c.error,
                Some(ChainError::Malformed(RequestError::StatusOutOfMemory(_)))
            ));
        }
    }
}

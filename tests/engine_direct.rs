//! The image engine with direct data I/O (`OpenOptions { direct: true }`): every data path
//! (full-block and sub-block writes, zeroing, reads over fragmented extents, `read_block`,
//! `read_extents`, snapshots, relocation) with aligned and unaligned buffers, reopening after
//! a close, a drop and a simulated crash, `check`, the refusals, and a property test that a
//! random sequence of operations gives the same bytes with direct I/O on and off.
//!
//! Images live in a temporary directory on the disk filesystem (the tests run on ext4).

mod common;

use common::image::create_image;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rr_row::image::{Extent, Image, ImageError, OpenMode, OpenOptions};
use rr_row::iobuf::IoSeg;
use rr_row::units::{Lba, Seq};

const BS: u64 = 4096;
const DIRECT: OpenOptions = OpenOptions {
    direct: true,
    shared_lock: false,
};

/// A temporary directory next to the build (on the disk filesystem, like real images).
fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Creates an image of `blocks` 4 KiB blocks and reopens it with direct I/O.
fn direct_image(path: &std::path::Path, blocks: u64) -> Image {
    create_image(path, blocks * BS, BS as u32).close().unwrap();
    let img = Image::open_with_options(path, OpenMode::ReadWrite, &DIRECT).unwrap();
    assert!(img.is_direct());
    img
}

/// A byte buffer whose first byte sits at `misalign` bytes past a 4096-byte boundary.
struct Buf {
    mem: Vec<u8>,
    start: usize,
    len: usize,
}

impl Buf {
    fn new(len: usize, misalign: usize) -> Buf {
        let mem = vec![0u8; len + 2 * 4096 + misalign];
        let start = mem.as_ptr().align_offset(4096) + misalign;
        Buf { mem, start, len }
    }
    fn filled(data: &[u8], misalign: usize) -> Buf {
        let mut b = Buf::new(data.len(), misalign);
        b.as_mut().copy_from_slice(data);
        b
    }
    fn as_ref(&self) -> &[u8] {
        &self.mem[self.start..self.start + self.len]
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.mem[self.start..self.start + self.len]
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// Reads `len` bytes at `off` into a buffer at `misalign`, split into segments of the given
/// lengths (the last one takes the rest).
fn read_split(img: &Image, off: u64, len: usize, misalign: usize, cuts: &[usize]) -> Vec<u8> {
    let mut b = Buf::new(len, misalign);
    {
        let mut rest = b.as_mut();
        let mut segs = Vec::new();
        for &c in cuts {
            let (a, r) = rest.split_at_mut(c.min(rest.len()));
            segs.push(IoSeg::from_mut_slice(a));
            rest = r;
        }
        segs.push(IoSeg::from_mut_slice(rest));
        img.read_vectored(off, &segs, None).unwrap();
    }
    b.as_ref().to_vec()
}

/// Writes `data` at `off` from a buffer at `misalign`, split into segments at `cuts`.
fn write_split(img: &Image, off: u64, data: &[u8], misalign: usize, cuts: &[usize]) {
    let b = Buf::filled(data, misalign);
    let mut rest = b.as_ref();
    let mut segs = Vec::new();
    for &c in cuts {
        let (a, r) = rest.split_at(c.min(rest.len()));
        segs.push(IoSeg::from_slice(a));
        rest = r;
    }
    segs.push(IoSeg::from_slice(rest));
    img.write_vectored(off, &segs).unwrap();
}

#[test]
fn aligned_and_unaligned_buffers_read_back_what_was_written() {
    let d = tmpdir();
    let path = d.path().join("a.rrow");
    let img = direct_image(&path, 64);
    let mut model = vec![0u8; 64 * BS as usize];
    let put = |model: &mut Vec<u8>, off: u64, data: &[u8]| {
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };
    // Full blocks: page-aligned, 512-aligned, odd address; one and several segments.
    let cases: [(u64, usize, usize, &[usize]); 6] = [
        (0, 4 * BS as usize, 0, &[]),
        (8 * BS, 2 * BS as usize, 512, &[]),
        (12 * BS, 3 * BS as usize, 1, &[]),
        (16 * BS, 2 * BS as usize, 0, &[100, 3996]),
        (20 * BS, BS as usize, 7, &[512, 1024]),
        (24 * BS, 4 * BS as usize, 1536, &[4096, 8192]),
    ];
    for (i, &(off, len, mis, cuts)) in cases.iter().enumerate() {
        let data = pattern(i as u64, len);
        write_split(&img, off, &data, mis, cuts);
        put(&mut model, off, &data);
    }
    // Sub-block writes (read-modify-write): 512 bytes inside a block, across a boundary,
    // from odd and aligned buffers.
    for (i, &(off, len, mis)) in [
        (BS + 1536, 512usize, 0usize),
        (9 * BS - 1024, 2048, 3),
        (30 * BS + 512, 3072, 512),
        (40 * BS + 3584, 512 * 5, 4095),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(100 + i as u64, len);
        write_split(&img, off, &data, mis, &[]);
        put(&mut model, off, &data);
    }
    // Zeroing inside written blocks (sub-block read-modify-write) and discards.
    img.write_zeroes(2 * BS + 512, 1024).unwrap();
    model[(2 * BS + 512) as usize..(2 * BS + 1536) as usize].fill(0);
    img.discard(13 * BS, BS + 512).unwrap();
    model[(13 * BS) as usize..(14 * BS + 512) as usize].fill(0);

    // Reads: whole disk aligned and odd, and pieces starting inside blocks and sectors.
    assert_eq!(read_split(&img, 0, model.len(), 0, &[]), model);
    assert_eq!(read_split(&img, 0, model.len(), 1, &[4097, 512]), model);
    for &(off, len, mis) in &[
        (512u64, 512usize, 0usize),
        (BS + 1024, 4096, 3),
        (9 * BS - 512, 8192 + 1024, 512),
        (41 * BS + 512, 512, 4095),
    ] {
        let got = read_split(&img, off, len, mis, &[512.min(len)]);
        assert_eq!(
            got,
            &model[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
    img.close().unwrap();
    let rep = Image::check(&path, false).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
}

/// Writes 64 blocks, then overwrites a scattered subset one block at a time, so the range is
/// backed by many short runs. Returns the model.
fn fragment(img: &Image, seed: u64) -> Vec<u8> {
    let mut model = pattern(seed, 64 * BS as usize);
    img.write_at(0, &model).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..40 {
        let b = rng.gen_range(0..64u64);
        let data = pattern(rng.gen(), BS as usize);
        img.write_at(b * BS, &data).unwrap();
        model[(b * BS) as usize..((b + 1) * BS) as usize].copy_from_slice(&data);
    }
    model
}

fn mapped_runs(img: &Image, lba: u64, n: u64) -> usize {
    img.resolve(Lba(lba), n).unwrap().len()
}

#[test]
fn reads_across_fragmented_extents_and_by_block_id() {
    let d = tmpdir();
    let path = d.path().join("f.rrow");
    let img = direct_image(&path, 64);
    let first = img.write_at(0, &pattern(7, 64 * BS as usize)).unwrap();
    let old = pattern(7, 64 * BS as usize);
    let model = fragment(&img, 9);
    assert!(mapped_runs(&img, 0, 64) >= 8);
    assert_eq!(read_split(&img, 0, model.len(), 0, &[]), model);
    assert_eq!(
        read_split(&img, 512, model.len() - 1024, 1, &[3, 509]),
        &model[512..model.len() - 512]
    );

    // The first write's blocks are still there, by block id, whatever the map says now.
    let mut b = Buf::new(BS as usize, 1);
    for i in [0u64, 5, 63] {
        img.read_block(rr_row::units::Pba(first.first_pba.0 + i), b.as_mut())
            .unwrap();
        assert_eq!(b.as_ref(), &old[(i * BS) as usize..((i + 1) * BS) as usize]);
    }
    // read_extents, as replay uses it: the live extents with a skip, into odd segments.
    let ex = img.resolve(Lba(3), 20).unwrap();
    let mut out = Buf::new(20 * BS as usize - 1024, 3);
    {
        let (a, r) = out.as_mut().split_at_mut(1000);
        img.read_extents(
            &ex,
            512,
            &[IoSeg::from_mut_slice(a), IoSeg::from_mut_slice(r)],
        )
        .unwrap();
    }
    assert_eq!(
        out.as_ref(),
        &model[(3 * BS + 512) as usize..(23 * BS - 512) as usize]
    );
    // A block id that is not a data block is refused, as without direct I/O.
    let mut one = vec![0u8; BS as usize];
    assert!(matches!(
        img.read_block(rr_row::units::Pba(u64::MAX / 2), &mut one),
        Err(ImageError::UnknownPba(_))
    ));
    // A snapshot reads through the same path.
    let snap = img.state_at(Seq(first.seq.0)).unwrap();
    let mut s = Buf::new(64 * BS as usize, 5);
    snap.read_at(0, s.as_mut()).unwrap();
    assert_eq!(s.as_ref(), old);
    img.close().unwrap();
}

#[test]
fn relocation_copies_through_direct_io() {
    let d = tmpdir();
    let path = d.path().join("r.rrow");
    let img = direct_image(&path, 64);
    let model = fragment(&img, 11);
    let before = img.resolve(Lba(0), 64).unwrap();
    assert!(before.len() >= 8);
    let seq = img.seq();
    // Background-style relocation (what serve does) of the whole range.
    assert!(img.relocate_extents(Lba(0), &before).unwrap());
    assert_eq!(mapped_runs(&img, 0, 64), 1);
    assert_eq!(img.seq(), seq, "a relocation takes no seq");
    assert_eq!(read_split(&img, 0, model.len(), 1, &[]), model);
    // Relocation on read, served from a private copy, from an odd buffer.
    let model2 = fragment(&img, 12);
    img.set_relocate_on_read(Some(2));
    assert_eq!(read_split(&img, 0, model2.len(), 3, &[]), model2);
    assert_eq!(mapped_runs(&img, 0, 64), 1);
    img.flush().unwrap();
    img.close().unwrap();
    let img = Image::open_with_options(&path, OpenMode::ReadOnly, &DIRECT).unwrap();
    assert_eq!(read_split(&img, 0, model2.len(), 0, &[]), model2);
    drop(img);
    let rep = Image::check(&path, false).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
}

#[test]
fn reopen_after_close_and_after_drop_without_close() {
    let d = tmpdir();
    let path = d.path().join("o.rrow");
    let img = direct_image(&path, 32);
    let model = fragment_small(&img, 1);
    img.close().unwrap();
    // Reopened with and without direct I/O: the same bytes.
    for opts in [DIRECT, OpenOptions::default()] {
        let img = Image::open_with_options(&path, OpenMode::ReadWrite, &opts).unwrap();
        assert_eq!(img.is_direct(), opts.direct);
        assert_eq!(read_split(&img, 0, model.len(), 1, &[]), model);
        img.close().unwrap();
    }
    // Dropped without close: the engine writes out the journal and syncs.
    let img = Image::open_with_options(&path, OpenMode::ReadWrite, &DIRECT).unwrap();
    let more = pattern(2, 3 * BS as usize);
    write_split(&img, 4 * BS, &more, 1, &[]);
    let mut model = model;
    model[(4 * BS) as usize..(7 * BS) as usize].copy_from_slice(&more);
    drop(img);
    let img = Image::open_with_options(&path, OpenMode::ReadWrite, &DIRECT).unwrap();
    assert_eq!(read_split(&img, 0, model.len(), 0, &[]), model);
    img.close().unwrap();
    let rep = Image::check(&path, false).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
}

fn fragment_small(img: &Image, seed: u64) -> Vec<u8> {
    let n = img.size() as usize;
    let mut model = pattern(seed, n);
    write_split(img, 0, &model, 0, &[]);
    let data = pattern(seed + 1, 1024);
    write_split(img, BS + 512, &data, 3, &[]);
    model[(BS + 512) as usize..(BS + 1536) as usize].copy_from_slice(&data);
    model
}

#[test]
fn crash_keeps_flushed_data_and_at_most_loses_unflushed_data() {
    let d = tmpdir();
    let path = d.path().join("c.rrow");
    let img = direct_image(&path, 32);
    let flushed = pattern(3, 16 * BS as usize);
    write_split(&img, 0, &flushed, 1, &[]);
    img.flush().unwrap();
    let seq_flushed = img.seq();
    let later = pattern(4, 8 * BS as usize);
    write_split(&img, 16 * BS, &later, 0, &[]);
    let sub = pattern(5, 512);
    write_split(&img, 2 * BS + 512, &sub, 0, &[]);
    // The process "dies": nothing of the image's in-memory state reaches the file (its
    // descriptors stay open, so the exclusive lock too: the survivor opens read-only).
    std::mem::forget(img);
    let img = Image::open_with_options(&path, OpenMode::ReadOnly, &DIRECT).unwrap();
    assert!(img.seq() >= seq_flushed);
    let got = read_split(&img, 0, 32 * BS as usize, 0, &[]);
    // Flushed data stays (except where a later, completed write may have replaced it).
    let mut with_sub = flushed.clone();
    with_sub[(2 * BS + 512) as usize..(2 * BS + 1024) as usize].copy_from_slice(&sub);
    let head = &got[..16 * BS as usize];
    assert!(head == &flushed[..] || head == &with_sub[..]);
    // The unflushed write is either entirely there or entirely absent.
    let tail = &got[16 * BS as usize..24 * BS as usize];
    assert!(tail == &later[..] || tail.iter().all(|&b| b == 0));
}

#[test]
fn direct_io_is_refused_where_it_cannot_work() {
    let d = tmpdir();
    // Blocks smaller than a page would share pages with buffered journal writes.
    let small = d.path().join("s.rrow");
    create_image(&small, 64 * 512, 512).close().unwrap();
    match Image::open_with_options(&small, OpenMode::ReadWrite, &DIRECT) {
        Err(ref e @ ImageError::DirectUnsuitable { ref path, .. }) => {
            let msg = e.to_string();
            assert_eq!(path, &small);
            assert!(msg.contains("--direct"), "{msg}");
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a 512-byte block image opened with direct I/O"),
    }
    // The image still opens without direct I/O.
    Image::open(&small, OpenMode::ReadWrite)
        .unwrap()
        .close()
        .unwrap();
}

/// A filesystem that refuses O_DIRECT fails the open with an error that names the file (the
/// CLI prints it before the message) and says to drop `--direct`. tmpfs accepts O_DIRECT since Linux 6.6 (so /dev/shm no longer
/// serves), procfs refuses it on every kernel: its files are not images, but the direct
/// descriptor is opened before the header is read, so the refusal is what the open reports.
#[test]
fn a_filesystem_without_o_direct_fails_the_open_cleanly() {
    let path = std::path::Path::new("/proc/version");
    match Image::open_with_options(path, OpenMode::ReadOnly, &DIRECT) {
        Err(ref e @ ImageError::DirectUnsupported { ref path, .. }) => {
            let msg = e.to_string();
            assert_eq!(path, std::path::Path::new("/proc/version"));
            assert!(
                msg.contains("O_DIRECT") && msg.contains("drop --direct"),
                "{msg}"
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("/proc/version opened as an image"),
    }
}

#[test]
fn parallel_writers_with_unaligned_buffers_share_nothing() {
    let d = tmpdir();
    let path = d.path().join("p.rrow");
    let img = direct_image(&path, 128);
    let models: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..4u64)
            .map(|t| {
                let img = &img;
                s.spawn(move || {
                    // Each thread owns 32 blocks; odd buffers force the bounce path.
                    let base = t * 32 * BS;
                    let mut model = vec![0u8; 32 * BS as usize];
                    let mut rng = StdRng::seed_from_u64(t);
                    for _ in 0..40 {
                        let off = rng.gen_range(0..32 * 8u64) * 512;
                        let len = (rng.gen_range(1..=16u64) * 512).min(32 * BS - off);
                        let data = pattern(rng.gen(), len as usize);
                        write_split(img, base + off, &data, rng.gen_range(0..4096), &[]);
                        model[off as usize..(off + len) as usize].copy_from_slice(&data);
                        let back = read_split(img, base + off, len as usize, 1, &[]);
                        assert_eq!(back, data);
                    }
                    model
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let all = read_split(&img, 0, 128 * BS as usize, 0, &[]);
    assert_eq!(all, models.concat());
    img.close().unwrap();
}

/// One operation of the cross-check.
#[derive(Debug, Clone)]
enum Op {
    /// Write `sectors` sectors at `sector` from a buffer `misalign` bytes off a page.
    Write {
        sector: u64,
        sectors: u64,
        misalign: usize,
        seed: u64,
    },
    Discard {
        sector: u64,
        sectors: u64,
    },
    Zero {
        sector: u64,
        sectors: u64,
    },
    Read {
        sector: u64,
        sectors: u64,
        misalign: usize,
    },
    Flush,
    Reopen,
}

const PROP_BLOCKS: u64 = 16;
const PROP_SECTORS: u64 = PROP_BLOCKS * BS / 512;

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..PROP_SECTORS).prop_flat_map(|s| (Just(s), 1..=(PROP_SECTORS - s).min(24)))
}

fn misalign() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(512), Just(1), 0usize..4096]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), misalign(), any::<u64>()).prop_map(|((sector, sectors), misalign, seed)| Op::Write { sector, sectors, misalign, seed }),
        // Whole-block writes, the path the daemon takes most.
        3 => (0..PROP_BLOCKS, 1..=4u64, misalign(), any::<u64>()).prop_map(|(b, n, misalign, seed)| {
            let n = n.min(PROP_BLOCKS - b);
            Op::Write { sector: b * 8, sectors: n * 8, misalign, seed }
        }),
        1 => range().prop_map(|(sector, sectors)| Op::Discard { sector, sectors }),
        1 => range().prop_map(|(sector, sectors)| Op::Zero { sector, sectors }),
        3 => (range(), misalign()).prop_map(|((sector, sectors), misalign)| Op::Read { sector, sectors, misalign }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// The same random operations on two images, one with direct I/O and one without: every
    /// read, the whole disk at the end, every old block by id and every past state are equal.
    #[test]
    fn direct_and_buffered_images_hold_the_same_bytes(ops in prop::collection::vec(op(), 1..40)) {
        let d = tmpdir();
        let pd = d.path().join("d.rrow");
        let pb = d.path().join("b.rrow");
        let mut a = direct_image(&pd, PROP_BLOCKS);
        create_image(&pb, PROP_BLOCKS * BS, BS as u32).close().unwrap();
        let mut b = Image::open(&pb, OpenMode::ReadWrite).unwrap();
        let mut pbas = Vec::new();
        for op in &ops {
            match *op {
                Op::Write { sector, sectors, misalign, seed } => {
                    let data = pattern(seed, (sectors * 512) as usize);
                    let buf = Buf::filled(&data, misalign);
                    let wa = a.write_at(sector * 512, buf.as_ref()).unwrap();
                    let wb = b.write_at(sector * 512, &data).unwrap();
                    prop_assert_eq!(wa.seq, wb.seq);
                    prop_assert_eq!(wa.blocks, wb.blocks);
                    pbas.push((wa.first_pba, wb.first_pba, wa.blocks));
                }
                Op::Discard { sector, sectors } => {
                    prop_assert_eq!(a.discard(sector * 512, sectors * 512).unwrap(),
                        b.discard(sector * 512, sectors * 512).unwrap());
                }
                Op::Zero { sector, sectors } => {
                    prop_assert_eq!(a.write_zeroes(sector * 512, sectors * 512).unwrap(),
                        b.write_zeroes(sector * 512, sectors * 512).unwrap());
                }
                Op::Read { sector, sectors, misalign } => {
                    let len = (sectors * 512) as usize;
                    let ra = read_split(&a, sector * 512, len, misalign, &[]);
                    let mut rb = vec![0u8; len];
                    b.read_at(sector * 512, &mut rb).unwrap();
                    prop_assert_eq!(ra, rb);
                }
                Op::Flush => {
                    a.flush().unwrap();
                    b.flush().unwrap();
                }
                Op::Reopen => {
                    a.close().unwrap();
                    b.close().unwrap();
                    a = Image::open_with_options(&pd, OpenMode::ReadWrite, &DIRECT).unwrap();
                    b = Image::open(&pb, OpenMode::ReadWrite).unwrap();
                }
            }
        }
        let all = (PROP_BLOCKS * BS) as usize;
        let mut rb = vec![0u8; all];
        b.read_at(0, &mut rb).unwrap();
        prop_assert_eq!(&read_split(&a, 0, all, 3, &[]), &rb);
        let mut x = Buf::new(BS as usize, 1);
        let mut y = vec![0u8; BS as usize];
        for &(pa, pb, n) in &pbas {
            for i in 0..n {
                a.read_block(rr_row::units::Pba(pa.0 + i), x.as_mut()).unwrap();
                b.read_block(rr_row::units::Pba(pb.0 + i), &mut y).unwrap();
                prop_assert_eq!(x.as_ref(), &y[..]);
            }
        }
        prop_assert_eq!(a.seq(), b.seq());
        for s in 0..=a.seq().0 {
            let mut sa = vec![0u8; all];
            a.state_at(Seq(s)).unwrap().read_at(0, &mut sa).unwrap();
            b.state_at(Seq(s)).unwrap().read_at(0, &mut rb).unwrap();
            prop_assert_eq!(&sa, &rb, "state at seq {}", s);
        }
        a.close().unwrap();
        b.close().unwrap();
        prop_assert!(Image::check(&pd, false).unwrap().is_clean());
    }
}

#[test]
fn extents_describe_the_same_blocks_with_direct_io_on() {
    // resolve() is map-only; a cheap guard that reads through extents of every kind agree
    // with resolve's view: Zero extents read as zeros even where old data sits on disk.
    let d = tmpdir();
    let path = d.path().join("z.rrow");
    let img = direct_image(&path, 8);
    img.write_at(0, &pattern(1, 8 * BS as usize)).unwrap();
    img.discard(2 * BS, 2 * BS).unwrap();
    let ex = img.resolve(Lba(0), 8).unwrap();
    assert!(ex.iter().any(|e| matches!(e, Extent::Zero { .. })));
    let got = read_split(&img, 0, 8 * BS as usize, 1, &[]);
    assert!(got[(2 * BS) as usize..(4 * BS) as usize]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(
        &got[..(2 * BS) as usize],
        &pattern(1, 8 * BS as usize)[..(2 * BS) as usize]
    );
    img.close().unwrap();
}

/// Bytes of `path` in the page cache, as `fincore` (util-linux) counts them.
fn cached_bytes(path: &std::path::Path) -> u64 {
    let out = std::process::Command::new(common::require_tool("fincore"))
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// What direct I/O is for: data written and read never enters the page cache (the kernel
/// may fall back to buffered I/O on its own for some files; this would show it). The same
/// work without direct I/O leaves it all cached, which shows the measurement works.
#[test]
fn data_blocks_stay_out_of_the_page_cache() {
    let d = tmpdir();
    let mb = 1usize << 20;
    let mut cached = Vec::new();
    for opts in [DIRECT, OpenOptions::default()] {
        let path = d.path().join(format!("pc-{}.rrow", opts.direct));
        create_image(&path, 32 << 20, BS as u32).close().unwrap();
        let img = Image::open_with_options(&path, OpenMode::ReadWrite, &opts).unwrap();
        for i in 0..8u64 {
            write_split(&img, i * mb as u64, &pattern(i, mb), 0, &[]);
        }
        // An odd buffer and a sub-block write go through the bounce buffer.
        write_split(&img, 9 * mb as u64, &pattern(9, mb), 1, &[]);
        write_split(&img, 10 * mb as u64 + 512, &pattern(10, 1024), 0, &[]);
        img.flush().unwrap();
        let got = read_split(&img, 0, 11 * mb, 0, &[]);
        assert_eq!(&got[..mb], &pattern(0, mb)[..]);
        cached.push(cached_bytes(&path));
        img.close().unwrap();
    }
    // About 9 MiB of data was written and 11 MiB read; the journal segment (1 MiB, buffered)
    // and headers are cached either way.
    assert!(
        cached[0] < 3 * mb as u64,
        "direct: {} bytes cached",
        cached[0]
    );
    assert!(
        cached[1] >= 9 * mb as u64,
        "buffered: {} bytes cached",
        cached[1]
    );
}

/// With direct I/O, preallocation only reserves: the file grows ahead of the allocation
/// counter (so appends are writes inside the file, which ext4 runs in parallel), nothing of the
/// reserved range enters the page cache, and the content, a reopen after a crash and `check`
/// are unchanged.
#[test]
fn preallocation_with_direct_io_reserves_without_caching() {
    let d = tmpdir();
    let mb = 1usize << 20;
    let path = d.path().join("pre.rrow");
    create_image(&path, 32 << 20, BS as u32).close().unwrap();
    let img = Image::open_with_options(&path, OpenMode::ReadWrite, &DIRECT).unwrap();
    // Asked to cache as well: a direct image only reserves.
    img.set_preallocate(16 << 20, true).unwrap();
    for i in 0..4u64 {
        write_split(&img, i * mb as u64, &pattern(i, mb), 0, &[]);
    }
    assert!(
        common::wait_until(std::time::Duration::from_secs(30), || {
            std::fs::metadata(&path).unwrap().len() >= 16 << 20
        }),
        "preallocation never happened"
    );
    img.flush().unwrap();
    assert!(
        cached_bytes(&path) < 3 * mb as u64,
        "{} bytes cached: the reserved range was read into the page cache",
        cached_bytes(&path)
    );
    let seq = img.seq();
    drop(img); // a crash: no close
    let img = Image::open_with_options(&path, OpenMode::ReadWrite, &DIRECT).unwrap();
    assert_eq!(img.seq(), seq);
    let got = read_split(&img, 0, 4 * mb, 0, &[]);
    for i in 0..4usize {
        assert_eq!(&got[i * mb..(i + 1) * mb], &pattern(i as u64, mb)[..]);
    }
    img.close().unwrap();
    let rep = Image::check(&path, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

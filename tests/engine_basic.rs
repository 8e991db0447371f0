//! Basic engine behaviour: create, write, read, reopen, history, state_at, base images.

mod common;

use common::image::create_image;
use rr_row::image::{CreateOptions, Extent, HistoryKind, Image, ImageError, OpenMode};
use rr_row::units::{BlockSize, Lba, Seq};

fn opts(size: u64) -> CreateOptions {
    CreateOptions {
        size,
        block_size: BlockSize::DEFAULT,
        base: None,
    }
}

#[test]
fn write_read_reopen() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.rrow");
    let img = Image::create(&p, &opts(1 << 20)).unwrap();
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let w = img.write_at(4096, &data).unwrap();
    assert_eq!(w.seq, Seq(1));
    assert_eq!(w.blocks, 2);
    let sub = vec![0xabu8; 512];
    let w2 = img.write_at(4096 + 512, &sub).unwrap();
    assert_eq!(w2.seq, Seq(2));
    let mut buf = vec![0u8; 8192];
    img.read_at(4096, &mut buf).unwrap();
    let mut expect = data.clone();
    expect[512..1024].fill(0xab);
    assert_eq!(buf, expect);
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(2));
    let mut buf2 = vec![0u8; 8192];
    img.read_at(4096, &mut buf2).unwrap();
    assert_eq!(buf2, expect);
    let h = img.history(Lba(1)).unwrap();
    assert_eq!(h.len(), 2);
    assert_eq!(h[0].kind, HistoryKind::Write);
    let snap = img.state_at(Seq(1)).unwrap();
    let mut b3 = vec![0u8; 8192];
    snap.read_at(4096, &mut b3).unwrap();
    assert_eq!(b3, data);
    let mut blk = vec![0u8; 4096];
    img.read_block(w.first_pba, &mut blk).unwrap();
    assert_eq!(&blk[..], &data[..4096]);
    assert!(matches!(
        img.read_block(rr_row::units::Pba(0), &mut blk),
        Err(ImageError::UnknownPba(_))
    ));
    assert!(matches!(
        img.read_block(rr_row::units::Pba(1 << 40), &mut blk),
        Err(ImageError::UnknownPba(_))
    ));
}

#[test]
fn discard_and_base() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    std::fs::write(&base, vec![7u8; 10000]).unwrap();
    let p = d.path().join("b.rrow");
    let mut o = opts(64 * 1024);
    o.base = Some(base.clone());
    let img = Image::create(&p, &o).unwrap();
    let mut buf = vec![0u8; 16384];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf[..10000].iter().all(|&b| b == 7));
    assert!(buf[10000..].iter().all(|&b| b == 0));
    img.discard(512, 8192).unwrap();
    img.read_at(0, &mut buf).unwrap();
    assert!(buf[..512].iter().all(|&b| b == 7));
    assert!(buf[512..8704].iter().all(|&b| b == 0));
    assert!(buf[8704..10000].iter().all(|&b| b == 7));
    let ex = img.resolve(Lba(0), 4).unwrap();
    assert!(matches!(ex[0], Extent::Mapped { .. }));
    img.close().unwrap();
    std::fs::write(&base, vec![7u8; 100]).unwrap();
    assert!(matches!(
        Image::open(&p, OpenMode::ReadOnly),
        Err(ImageError::BaseSizeChanged { .. })
    ));
}

fn new_image(dir: &std::path::Path, size: u64, bs: u32) -> (std::path::PathBuf, Image) {
    let p = dir.join("x.rrow");
    let img = create_image(&p, size, bs);
    (p, img)
}

#[test]
fn open_after_a_checkpoint_replays_only_the_tail() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), 4 << 20, 4096);
    for i in 0..200u64 {
        img.write_at((i % 1024) * 4096, &[i as u8; 4096]).unwrap();
    }
    img.flush().unwrap();
    img.checkpoint().unwrap();
    for i in 0..3u64 {
        img.write_at(i * 4096, &[0xee; 4096]).unwrap();
    }
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(203));
    // Three write records and a flush marker, not the 200 records before the checkpoint.
    let rec = 16 + 8 + 32 + 4;
    assert_eq!(img.replayed_bytes(), 3 * rec + 20);
    let mut b = [0u8; 4096];
    img.read_at(4096 * 150, &mut b).unwrap();
    assert_eq!(b, [150u8; 4096]);
    // History still reaches back past the checkpoint.
    assert_eq!(img.history(Lba(0)).unwrap().len(), 2);
    drop(img);
    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    img.close().unwrap();
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.replayed_bytes(), 0);
}

#[test]
fn the_journal_spans_several_segments() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), 1 << 20, 512);
    // 60-byte records: 1 MiB segments fill after about 17 000 writes.
    let n = 40_000u64;
    for i in 0..n {
        img.write_at((i % 2048) * 512, &(i as u32).to_le_bytes().repeat(128))
            .unwrap();
        if i % 5000 == 0 {
            img.flush().unwrap();
        }
    }
    assert!(img.info().unwrap().journal_segments >= 3);
    drop(img);
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(n));
    let h = img.history(Lba(7)).unwrap();
    assert_eq!(h.len() as u64, n / 2048 + 1);
    let s = img.state_at(Seq(n - 2048)).unwrap();
    let mut b = [0u8; 512];
    s.read_at(7 * 512, &mut b).unwrap();
    let want = ((n - 2048 - 1 - 7) / 2048 * 2048 + 7) as u32;
    assert!(b.chunks(4).all(|c| c == want.to_le_bytes()));
    let r = Image::check(&p, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.seq, n);
}

#[test]
fn concurrent_writers_and_sub_block_writers_lose_nothing() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), 1 << 20, 4096);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let img = &img;
            s.spawn(move || {
                for i in 0..100u64 {
                    // Full blocks of this thread's own region.
                    let blk = t * 64 + (i % 60);
                    img.write_at(blk * 4096, &[(t * 10 + 1) as u8; 4096])
                        .unwrap();
                    // One sector of the shared block 255: concurrent read-modify-writes.
                    img.write_at(255 * 4096 + t * 512, &[(i + 1) as u8; 512])
                        .unwrap();
                }
            });
            s.spawn(move || {
                let mut b = vec![0u8; 8192];
                for _ in 0..100 {
                    img.read_at(255 * 4096, &mut b[..4096]).unwrap();
                }
            });
        }
    });
    let mut b = vec![0u8; 4096];
    img.read_at(255 * 4096, &mut b).unwrap();
    for t in 0..4 {
        assert!(
            b[t * 512..(t + 1) * 512].iter().all(|&x| x == 100),
            "sector {t}: {:?}",
            &b[t * 512..t * 512 + 8]
        );
    }
    assert!(b[2048..].iter().all(|&x| x == 0));
    for t in 0..4u64 {
        img.read_at(t * 64 * 4096, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == (t * 10 + 1) as u8));
    }
    assert_eq!(img.seq(), Seq(800));
    img.close().unwrap();
    assert!(Image::check(&p, false).unwrap().is_clean());
}

#[test]
fn errors_are_typed() {
    let d = tempfile::tempdir().unwrap();
    let (p, img) = new_image(d.path(), 1 << 20, 4096);
    let mut b = vec![0u8; 4096];
    assert!(matches!(
        img.read_at(100, &mut b),
        Err(ImageError::Unaligned { .. })
    ));
    assert!(matches!(
        img.read_at(1 << 20, &mut b),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.write_at(u64::MAX - 511, &b[..512]),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.discard(0, (1 << 20) + 512),
        Err(ImageError::OutOfRange { .. })
    ));
    assert!(matches!(
        img.read_block(rr_row::units::Pba(0), &mut b[..512]),
        Err(ImageError::BadBuffer { .. })
    ));
    let w = img.write_at(0, &b).unwrap();
    // Extents from an untrusted log: metadata slots and unallocated slots are refused.
    let segs = [rr_row::iobuf::IoSeg::from_mut_slice(&mut b)];
    assert!(matches!(
        img.read_extents(
            &[Extent::Mapped {
                pba: rr_row::units::Pba(3),
                blocks: 1
            }],
            0,
            &segs
        ),
        Err(ImageError::UnknownPba(_))
    ));
    assert!(matches!(
        img.read_extents(
            &[Extent::Mapped {
                pba: w.first_pba,
                blocks: 1
            }],
            512,
            &segs
        ),
        Err(ImageError::ExtentsTooShort { .. })
    ));
    assert!(matches!(
        Image::open(&p, OpenMode::ReadWrite),
        Err(ImageError::Locked)
    ));
    // check refuses an image in use; read-only opens (info, export, history) are allowed.
    assert!(matches!(Image::check(&p, false), Err(ImageError::Locked)));
    assert!(Image::open(&p, OpenMode::ReadOnly).is_ok());
    assert!(matches!(
        Image::create(&p, &opts(1 << 20)),
        Err(ImageError::AlreadyExists { .. })
    ));
    assert!(matches!(
        img.state_at(Seq(5)),
        Err(ImageError::SeqInFuture { .. })
    ));
    drop(img);
    let ro = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert!(matches!(ro.write_at(0, &b), Err(ImageError::ReadOnly)));
    assert!(matches!(ro.discard(0, 512), Err(ImageError::ReadOnly)));
    let q = d.path().join("bad.rrow");
    for (size, bs) in [(0u64, 4096u32), (1000, 4096), (1u64 << 62, 512)] {
        assert!(matches!(
            Image::create(
                &q,
                &CreateOptions {
                    size,
                    block_size: BlockSize::new(bs).unwrap(),
                    base: None
                }
            ),
            Err(ImageError::InvalidOptions(_))
        ));
        assert!(!q.exists());
    }
}

#[test]
fn traced_reads_name_the_blocks_that_supplied_the_data() {
    let d = tempfile::tempdir().unwrap();
    let (_p, img) = new_image(d.path(), 1 << 20, 4096);
    let w = img.write_at(8192, &[5u8; 8192]).unwrap();
    let mut b = vec![0u8; 4096 * 3];
    let mut trace = Vec::new();
    let seq = img
        .read_vectored(
            4096 + 512,
            &[rr_row::iobuf::IoSeg::from_mut_slice(&mut b[..8192])],
            Some(&mut trace),
        )
        .unwrap();
    assert_eq!(seq, w.seq);
    assert_eq!(
        trace,
        vec![
            Extent::Zero { blocks: 1 },
            Extent::Mapped {
                pba: w.first_pba,
                blocks: 2
            }
        ]
    );
    // Replaying the trace gives the same bytes even after the disk moved on.
    img.write_at(8192, &[6u8; 4096]).unwrap();
    let mut again = vec![0u8; 8192];
    img.read_extents(
        &trace,
        512,
        &[rr_row::iobuf::IoSeg::from_mut_slice(&mut again)],
    )
    .unwrap();
    assert_eq!(&again[..], &b[..8192]);
}

#[test]
fn map_memory_stays_within_eight_bytes_per_written_block() {
    let d = tempfile::tempdir().unwrap();
    // A 64 GiB disk, of which 16 MiB (4096 blocks) is written in one region.
    let (_p, img) = new_image(d.path(), 64 << 30, 4096);
    let empty = img.map_memory_bytes();
    let chunk = vec![1u8; 1 << 20];
    for i in 0..16u64 {
        img.write_at((5 << 30) + i * (1 << 20), &chunk).unwrap();
    }
    let used = img.map_memory_bytes() - empty;
    assert_eq!(img.info().unwrap().live_blocks, 4096);
    assert!(used <= 4096 * 8, "{used} bytes for 4096 blocks");
    // The directory costs 26 bytes per 4096 blocks of virtual disk.
    assert!(empty <= (64 << 30) / 4096 / 4096 * 26, "{empty}");
    // Scattered single blocks cost the same: one packed 8-byte entry each.
    let before = img.map_memory_bytes();
    let mut x = 1u64;
    for _ in 0..4096 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let blk = (x >> 20) % ((64 << 30) / 4096);
        img.write_at(blk * 4096, &chunk[..4096]).unwrap();
    }
    let live = img.info().unwrap().live_blocks - 4096;
    let used = img.map_memory_bytes() - before;
    assert!(used <= live * 9, "{used} bytes for {live} scattered blocks");
}

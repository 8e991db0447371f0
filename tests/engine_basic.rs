//! Basic engine behaviour: create, write, read, reopen, history, state_at, base images.

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

//! Retention: `Image::reclaim` gives back the blocks of versions no kept state needs.

mod common;

use common::image::create_image;
use rr_row::image::{Image, ImageError, OpenMode};
use rr_row::units::{Pba, Seq};

fn allocated(p: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn overwritten_versions_before_the_horizon_are_given_back_and_later_states_stay() {
    let d = common::tempdir();
    let p = d.path().join("a.rrow");
    let img = create_image(&p, 8 << 20, 4096);
    // Four full passes over the disk: seqs 1..=2048*4 (one 4 KiB write per seq).
    let mut first_pbas = Vec::new();
    for pass in 0..4u8 {
        for b in 0..2048u64 {
            let w = img.write_at(b * 4096, &[pass + 1; 4096]).unwrap();
            if pass == 0 {
                first_pbas.push(w.first_pba);
            }
        }
    }
    img.flush().unwrap();
    let keep = Seq(2048 * 3 + 1); // the first write of the fourth pass
    let before_states: Vec<Vec<u8>> = [keep.0, keep.0 + 100, img.seq().0 - 1]
        .iter()
        .map(|&s| {
            let snap = img.state_at(Seq(s)).unwrap();
            let mut buf = vec![0u8; 8 << 20];
            snap.read_at(0, &mut buf).unwrap();
            buf
        })
        .collect();
    let used_before = allocated(&p);
    let rep = img.reclaim(keep, &[], &mut |_, _| {}).unwrap();
    // Passes 1 and 2 entirely, and pass 3's LBA 0 (superseded by the keep-from write itself);
    // pass 3's other versions are live at the keep-from state.
    assert_eq!(rep.plan.blocks, 2 * 2048 + 1);
    assert_eq!(rep.horizon, keep.0);
    assert!(allocated(&p) + rep.plan.bytes * 9 / 10 <= used_before);
    for (i, &s) in [keep.0, keep.0 + 100, img.seq().0 - 1].iter().enumerate() {
        let snap = img.state_at(Seq(s)).unwrap();
        let mut buf = vec![0u8; 8 << 20];
        snap.read_at(0, &mut buf).unwrap();
        assert!(buf == before_states[i], "state {s} changed");
    }
    assert!(matches!(
        img.state_at(Seq(keep.0 - 1)),
        Err(ImageError::HistoryReclaimed { .. })
    ));
    let mut blk = vec![0u8; 4096];
    assert!(matches!(
        img.read_block(first_pbas[5], &mut blk),
        Err(ImageError::Reclaimed { pba, .. }) if pba == first_pbas[5]
    ));
    let h = img.history(rr_row::units::Lba(5)).unwrap();
    assert_eq!(h.len(), 4);
    assert_eq!(
        h.iter().map(|e| e.reclaimed).collect::<Vec<_>>(),
        [true, true, false, false]
    );
    img.close().unwrap();
    let r = Image::check(&p, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(r.reclaimed_blocks, 2 * 2048 + 1);
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.info().unwrap().history_horizon, keep.0);
    assert!(matches!(
        img.read_block(first_pbas[5], &mut blk),
        Err(ImageError::Reclaimed { .. })
    ));
    let _ = Pba(0);
}

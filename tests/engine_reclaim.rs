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

// ---------------------------------------------------------------------------------------------
// Helpers of the tests below.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use common::reclaim as rc;
use rr_row::image::format::{Header, RecKind, Reclaimed, Record, INCOMPAT_RECLAIM};
use rr_row::image::Extent;
use rr_row::iobuf::IoSeg;
use rr_row::units::Lba;

const BS: u64 = 4096;

/// Content of LBA `lba` written by pass `pass`: distinct for every (pass, LBA), never zero.
fn fill(pass: u64, lba: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| ((pass * 31 + lba * 7 + i / 512) % 255 + 1) as u8)
        .collect()
}

/// A disk of `blocks` blocks written over `n` times, one full-block write per seq: pass `p`
/// writes LBA `l` at seq `p * blocks + l + 1`.
struct Passes {
    img: Image,
    /// Block id of every (pass, LBA).
    pbas: Vec<Vec<u64>>,
    /// The disk as of every seq.
    snaps: Vec<Vec<u8>>,
}

fn passes(path: &Path, blocks: u64, n: u64) -> Passes {
    let img = create_image(path, blocks * BS, BS as u32);
    let mut model = vec![0u8; (blocks * BS) as usize];
    let mut snaps = vec![model.clone()];
    let mut pbas = Vec::new();
    for p in 0..n {
        let mut row = Vec::new();
        for l in 0..blocks {
            let d = fill(p, l);
            row.push(img.write_at(l * BS, &d).unwrap().first_pba.0);
            model[(l * BS) as usize..((l + 1) * BS) as usize].copy_from_slice(&d);
            snaps.push(model.clone());
        }
        pbas.push(row);
    }
    Passes { img, pbas, snaps }
}

impl Passes {
    /// Appends one full-block write of `data` at `lba` to the image and the model.
    fn write(&mut self, lba: u64, data: &[u8]) -> u64 {
        let w = self.img.write_at(lba * BS, data).unwrap();
        let mut m = self.snaps.last().unwrap().clone();
        m[(lba * BS) as usize..(lba * BS) as usize + data.len()].copy_from_slice(data);
        self.snaps.push(m);
        assert_eq!(w.seq.0 as usize, self.snaps.len() - 1);
        w.first_pba.0
    }
}

/// The image's horizon is `horizon`; every state from it on reads as the model, every
/// earlier one is refused with `HistoryReclaimed`; the current disk reads as the model.
fn assert_states(img: &Image, snaps: &[Vec<u8>], horizon: u64) {
    assert_eq!(img.info().unwrap().history_horizon, horizon);
    assert_eq!(img.seq().0 as usize, snaps.len() - 1);
    for s in 0..snaps.len() as u64 {
        match rc::state(img, s) {
            Ok(d) => {
                assert!(
                    s >= horizon,
                    "state {s} before the horizon {horizon} is readable"
                );
                assert!(d == snaps[s as usize], "state {s} differs from the model");
            }
            Err(ImageError::HistoryReclaimed {
                requested,
                horizon: h,
            }) => {
                assert!(s < horizon, "state {s} refused (horizon {horizon})");
                assert_eq!((requested, h), (Seq(s), Seq(horizon)));
            }
            Err(e) => panic!("state {s}: {e}"),
        }
    }
    assert!(rc::disk(img) == *snaps.last().unwrap());
}

fn assert_reclaimed(img: &Image, pba: u64) {
    match rc::block(img, pba) {
        Err(ImageError::Reclaimed { pba: p, .. }) => assert_eq!(p, Pba(pba)),
        Err(e) => panic!("block {pba}: {e}"),
        Ok(_) => panic!("block {pba} is readable although it was reclaimed"),
    }
}

fn check_clean(p: &Path) -> rr_row::image::CheckReport {
    let r = Image::check(p, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
    r
}

fn corrupt_what(p: &Path) -> (u64, String) {
    match Image::open(p, OpenMode::ReadOnly) {
        Err(ImageError::Corrupt { offset, what }) => (offset, what),
        Err(e) => panic!("expected a Corrupt error, got: {e}"),
        Ok(_) => panic!("the damaged image opened"),
    }
}

fn reclaim_record(seq: u64, horizon: u64, runs: Vec<(u64, u64)>) -> Record {
    Record {
        kind: RecKind::Reclaim,
        seq,
        pieces: Vec::new(),
        link: None,
        nonce: None,
        reclaim: Some(Reclaimed { horizon, runs }),
    }
}

// ---------------------------------------------------------------------------------------------
// Crash consistency.

/// The blocks a reclaim with keep-from 33 gives back from three passes over 16 blocks: all
/// of pass 1, and pass 2's LBA 0 (superseded by seq 33 itself).
fn first_pass_and_one(run: &Passes) -> BTreeSet<u64> {
    let mut s: BTreeSet<u64> = run.pbas[0].iter().copied().collect();
    s.insert(run.pbas[1][0]);
    s
}

#[test]
fn a_crash_between_commit_and_punch_recovers_the_reclaimed_set_from_the_journal_tail() {
    let d = common::tempdir();
    let p = d.path().join("c.rrow");
    let run = passes(&p, 16, 3);
    let keep = 33;
    let plan = run.img.plan_reclaim(Seq(keep), &[]).unwrap();
    let gone = first_pass_and_one(&run);
    assert_eq!(rc::slots(&plan.runs), gone);
    run.img.commit_reclaim(&plan).unwrap();
    // Killed here: the file holds what commit_reclaim synced, and no hole was punched.
    let crashed = std::fs::read(&p).unwrap();
    let Passes { img, pbas, snaps } = run;
    drop(img);
    let cp = d.path().join("crashed.rrow");
    std::fs::write(&cp, &crashed).unwrap();

    // The reclaimed set is not in any checkpoint: the one that set the feature bit was taken
    // before the reclaim records, which sit in the journal tail after it.
    let hdr = rc::current_header(&crashed);
    assert_ne!(hdr.incompat & INCOMPAT_RECLAIM, 0);
    assert_eq!(
        rc::checkpoint(&crashed).reclaimed,
        Some(Reclaimed::default())
    );
    let tail: Vec<_> = rc::records(&crashed)
        .into_iter()
        .filter(|r| r.kind == 8)
        .collect();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].seq, 48);
    assert!(tail[0].pos >= rc::seg0(&crashed) + hdr.jpos.offset);
    // The data of a reclaimed block is still in the file.
    let off = (hdr.data_offset + pbas[0][3] * BS) as usize;
    assert!(crashed[off..off + BS as usize] == fill(0, 3)[..]);

    let img = Image::open(&cp, OpenMode::ReadOnly).unwrap();
    assert!(img.replayed_bytes() > 0);
    assert_eq!(img.info().unwrap().reclaimed_blocks, gone.len() as u64);
    assert_states(&img, &snaps, keep);
    for &b in &gone {
        assert_reclaimed(&img, b);
    }
    assert_eq!(rc::block(&img, pbas[1][3]).unwrap(), fill(1, 3));
    drop(img);
    assert_eq!(check_clean(&cp).reclaimed_blocks, gone.len() as u64);

    // Carrying on: nothing is planned twice, the committed plan can still be punched, and a
    // later reclaim works.
    let img = Image::open(&cp, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.plan_reclaim(Seq(keep), &[]).unwrap().blocks, 0);
    let before = rc::allocated(&cp);
    img.punch_reclaimed(&plan, &mut |_, _| {}).unwrap();
    assert!(rc::allocated(&cp) + plan.bytes * 9 / 10 <= before);
    let f = std::fs::read(&cp).unwrap();
    assert!(f[off..off + BS as usize].iter().all(|&b| b == 0));
    let rep = img.reclaim(Seq(48), &[], &mut |_, _| {}).unwrap();
    let pass2: BTreeSet<u64> = pbas[1][1..].iter().copied().collect();
    assert_eq!(rc::slots(&rep.plan.runs), pass2);
    assert_eq!(rep.horizon, 48);
    assert_states(&img, &snaps, 48);
    img.close().unwrap();
    assert_eq!(check_clean(&cp).reclaimed_blocks, 32);
}

#[test]
fn operations_recovered_past_the_last_flush_are_made_durable_before_a_reclaim_can_rely_on_them() {
    // Found by the reclaim model: seqs 5 and 6 reach the file but no flush marker vouches
    // for them; the next open keeps them (their data verifies). A reclaim keeping from seq 6
    // then gives back seq 5's block (superseded at 6) and LBA 0's old versions. Had the open
    // not vouched for 5 and 6, the recovery after the next crash would find seq 5's block
    // punched, drop 5 and 6 and the reclaim records after them, and states 1-3 would be
    // readable again - over punched blocks.
    let d = common::tempdir();
    let p = d.path().join("t.rrow");
    let img = create_image(&p, 4 * BS, BS as u32);
    for v in 0..4u8 {
        img.write_at(0, &[v + 1; BS as usize]).unwrap();
    }
    // A first reclaim sets the feature bit (with a checkpoint), so that the one below
    // appends its records without one.
    let first = img.reclaim(Seq(2), &[], &mut |_, _| {}).unwrap();
    assert_eq!(first.plan.blocks, 1);
    img.write_at(BS, &[5u8; BS as usize]).unwrap();
    img.write_at(BS, &[6u8; BS as usize]).unwrap();
    drop(img); // the records are written out, never flushed
    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.seq(), Seq(6));
    let rep = img.reclaim(Seq(6), &[], &mut |_, _| {}).unwrap();
    assert_eq!(
        rep.plan.blocks, 3,
        "LBA 0's second and third versions and LBA 1's first"
    );
    drop(img); // a crash: no close
    let r = check_clean(&p);
    assert_eq!(r.seq, 6);
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.history_horizon(), Seq(6));
    let mut disk = vec![0u8; 2 * BS as usize];
    img.read_at(0, &mut disk).unwrap();
    assert!(disk[..BS as usize].iter().all(|&b| b == 4));
    assert!(disk[BS as usize..].iter().all(|&b| b == 6));
}

#[test]
fn a_crash_before_the_reclaim_records_are_durable_leaves_nothing_reclaimed() {
    let d = common::tempdir();
    let p = d.path().join("c.rrow");
    let run = passes(&p, 16, 3);
    let keep = 33;
    let plan = run.img.plan_reclaim(Seq(keep), &[]).unwrap();
    run.img.commit_reclaim(&plan).unwrap();
    let committed = std::fs::read(&p).unwrap();
    let Passes { img, pbas, snaps } = run;
    drop(img);
    let rec = *rc::records(&committed)
        .iter()
        .find(|r| r.kind == 8)
        .unwrap();
    let seg_end = (rc::seg0(&committed) + rc::current_header(&committed).seg_bytes()) as usize;
    // The record never reached the disk, or only its first bytes did.
    for cut in [rec.pos, rec.pos + 17, rec.pos + rec.len / 2] {
        let mut f = committed.clone();
        assert!(f[cut as usize..rec.end() as usize].iter().any(|&b| b != 0));
        f[cut as usize..seg_end].fill(0);
        let cp = d.path().join(format!("cut{cut}.rrow"));
        std::fs::write(&cp, &f).unwrap();
        let img = Image::open(&cp, OpenMode::ReadOnly).unwrap();
        assert_eq!(img.info().unwrap().reclaimed_blocks, 0, "cut at {cut}");
        assert_states(&img, &snaps, 0);
        assert_eq!(rc::block(&img, pbas[0][3]).unwrap(), fill(0, 3));
        drop(img);
        let r = check_clean(&cp);
        assert_eq!(r.reclaimed_blocks, 0);
        // The reclaim can simply be run again.
        let img = Image::open(&cp, OpenMode::ReadWrite).unwrap();
        let rep = img.reclaim(Seq(keep), &[], &mut |_, _| {}).unwrap();
        assert_eq!(rc::slots(&rep.plan.runs), rc::slots(&plan.runs));
        assert_states(&img, &snaps, keep);
        img.close().unwrap();
        check_clean(&cp);
    }
}

// ---------------------------------------------------------------------------------------------
// Persistence paths.

#[test]
fn the_reclaimed_set_survives_close_and_later_reclaim_records_replay_after_the_checkpoint() {
    let d = common::tempdir();
    let p = d.path().join("p.rrow");
    let mut run = passes(&p, 16, 4);
    let rep1 = run.img.reclaim(Seq(32), &[], &mut |_, _| {}).unwrap();
    let pass1: BTreeSet<u64> = run.pbas[0].iter().copied().collect();
    assert_eq!(rc::slots(&rep1.plan.runs), pass1);
    let Passes { img, pbas, snaps } = run;
    img.close().unwrap();
    // Closed: the checkpoint carries the reclaimed section and nothing is left to replay.
    let f = std::fs::read(&p).unwrap();
    assert_eq!(
        rc::checkpoint(&f).reclaimed,
        Some(Reclaimed {
            horizon: 32,
            runs: rep1.plan.runs.clone()
        })
    );
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.replayed_bytes(), 0);
    assert_eq!(img.info().unwrap().reclaimed_blocks, 16);
    assert_states(&img, &snaps, 32);
    assert_reclaimed(&img, pbas[0][7]);
    drop(img);

    // A second reclaim after more writes, then an unclean stop: its record is in the journal
    // after the checkpoint, which still holds only the first set.
    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    run = Passes { img, pbas, snaps };
    for l in 0..8 {
        run.write(l, &fill(9, l));
    }
    let rep2 = run.img.reclaim(Seq(64), &[], &mut |_, _| {}).unwrap();
    let pass23: BTreeSet<u64> = run.pbas[1].iter().chain(&run.pbas[2]).copied().collect();
    assert_eq!(rc::slots(&rep2.plan.runs), pass23);
    let Passes { img, pbas, snaps } = run;
    drop(img);
    let f = std::fs::read(&p).unwrap();
    assert_eq!(
        rc::checkpoint(&f).reclaimed,
        Some(Reclaimed {
            horizon: 32,
            runs: rep1.plan.runs.clone()
        })
    );
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert!(img.replayed_bytes() > 0);
    assert_eq!(img.info().unwrap().reclaimed_blocks, 48);
    assert_states(&img, &snaps, 64);
    assert_reclaimed(&img, pbas[0][0]);
    assert_reclaimed(&img, pbas[2][15]);
    assert_eq!(rc::block(&img, pbas[3][15]).unwrap(), fill(3, 15));
    drop(img);
    assert_eq!(check_clean(&p).reclaimed_blocks, 48);
}

#[test]
fn check_repair_rebuilding_the_map_from_the_journal_keeps_the_reclaimed_set() {
    let d = common::tempdir();
    let p = d.path().join("r.rrow");
    let run = passes(&p, 16, 3);
    let rep = run.img.reclaim(Seq(33), &[], &mut |_, _| {}).unwrap();
    let gone = first_pass_and_one(&run);
    assert_eq!(rc::slots(&rep.plan.runs), gone);
    let Passes { img, pbas, snaps } = run;
    img.close().unwrap();
    // Damage the checkpoint (a byte of its map runs): the header's crc no longer matches.
    let mut f = std::fs::read(&p).unwrap();
    let (off, len) = rc::checkpoint_at(&f);
    assert!(len > 60);
    f[(off + 56) as usize] ^= 0x10;
    std::fs::write(&p, &f).unwrap();
    let (at, what) = corrupt_what(&p);
    assert_eq!(at, off, "{what}");
    assert_eq!(Image::check(&p, false).unwrap().exit_code(), 2);
    let r = Image::check(&p, true).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    assert!(
        r.repaired
            .iter()
            .any(|s| s.contains("rebuilt the map from the whole journal")),
        "{r:?}"
    );
    // The rebuilt image still knows what was given back, and its new checkpoint says so.
    let f = std::fs::read(&p).unwrap();
    assert_eq!(
        rc::checkpoint(&f).reclaimed,
        Some(Reclaimed {
            horizon: 33,
            runs: rep.plan.runs.clone()
        })
    );
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.info().unwrap().reclaimed_blocks, gone.len() as u64);
    assert_states(&img, &snaps, 33);
    for &b in &gone {
        assert_reclaimed(&img, b);
    }
    assert_eq!(rc::block(&img, pbas[1][1]).unwrap(), fill(1, 1));
    drop(img);
    assert_eq!(check_clean(&p).reclaimed_blocks, gone.len() as u64);
}

// ---------------------------------------------------------------------------------------------
// Damage.

/// Three passes over 16 blocks with pass 1 reclaimed, closed; returns the header.
fn reclaimed_image(p: &Path) -> Header {
    let run = passes(p, 16, 3);
    run.img.reclaim(Seq(32), &[], &mut |_, _| {}).unwrap();
    run.img.close().unwrap();
    rc::current_header(&std::fs::read(p).unwrap())
}

#[test]
fn a_reclaim_record_naming_slots_past_the_allocation_counter_is_corruption() {
    let d = common::tempdir();
    let p = d.path().join("x.rrow");
    let hdr = reclaimed_image(&p);
    let clean = std::fs::read(&p).unwrap();
    let next = hdr.next_free_slot;
    for run in [(next + 10, 2), (next - 1, 2)] {
        std::fs::write(&p, &clean).unwrap();
        let rec = rc::append_record(&p, &reclaim_record(48, 48, vec![run]));
        let (at, what) = corrupt_what(&p);
        assert!(what.contains("past the allocated slots"), "{what}");
        assert_eq!(at, rec.end(), "{what}");
        assert_eq!(Image::check(&p, false).unwrap().exit_code(), 2);
        assert!(matches!(
            Image::open(&p, OpenMode::ReadWrite),
            Err(ImageError::Corrupt { .. })
        ));
    }
    // The same record naming blocks that may be reclaimed is accepted.
    std::fs::write(&p, &clean).unwrap();
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    let victim = img.history(Lba(5)).unwrap()[1].pba.unwrap().0;
    drop(img);
    rc::append_record(&p, &reclaim_record(48, 40, vec![(victim, 1)]));
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.info().unwrap().history_horizon, 40);
    assert_reclaimed(&img, victim);
}

#[test]
fn a_reclaim_record_naming_journal_or_checkpoint_slots_is_corruption() {
    let d = common::tempdir();
    let p = d.path().join("j.rrow");
    let hdr = reclaimed_image(&p);
    let clean = std::fs::read(&p).unwrap();
    let ckpt = hdr.ckpt.unwrap().slot;
    for run in [(0, 1), (hdr.seg_slots as u64 - 1, 3), (ckpt, 1)] {
        std::fs::write(&p, &clean).unwrap();
        rc::append_record(&p, &reclaim_record(48, 48, vec![run]));
        let (_, what) = corrupt_what(&p);
        assert!(
            what.contains("overlap journal or checkpoint slots"),
            "{run:?}: {what}"
        );
    }
}

#[test]
fn a_checkpoint_whose_reclaimed_section_names_slots_past_the_allocation_counter_is_corruption() {
    use rr_row::image::format::Checkpoint;
    let d = common::tempdir();
    let p = d.path().join("k.rrow");
    let mut hdr = reclaimed_image(&p);
    let mut f = std::fs::read(&p).unwrap();
    let mut ck = rc::checkpoint(&f);
    assert_eq!(ck.reclaimed.as_ref().unwrap().runs.len(), 1);
    ck.reclaimed.as_mut().unwrap().runs[0] = (hdr.next_free_slot + 1, 1);
    let (bytes, crc) = ck.encode(&hdr.uuid);
    let (off, len) = rc::checkpoint_at(&f);
    assert_eq!(bytes.len() as u64, len);
    f[off as usize..(off + len) as usize].copy_from_slice(&bytes);
    std::fs::write(&p, &f).unwrap();
    // A valid checkpoint crc, as the header records it.
    let mut c = hdr.ckpt.unwrap();
    c.crc = crc;
    hdr.ckpt = Some(c);
    rc::write_headers(&p, &hdr);
    let (at, what) = corrupt_what(&p);
    assert!(what.contains("past the allocated slots"), "{what}");
    assert_eq!(at, off);
    assert_eq!(Checkpoint::decode(&bytes, &hdr.uuid, true).unwrap(), ck);
}

#[test]
fn a_reclaim_record_in_an_image_without_the_reclaim_feature_is_corruption() {
    let d = common::tempdir();
    // An image that never reclaimed, with a well-formed reclaim record appended.
    let p = d.path().join("n.rrow");
    let img = create_image(&p, 16 * BS, BS as u32);
    let old = img.write_at(0, &fill(0, 0)).unwrap().first_pba.0;
    img.write_at(0, &fill(1, 0)).unwrap();
    img.close().unwrap();
    assert_eq!(rc::current_header(&std::fs::read(&p).unwrap()).incompat, 0);
    let rec = rc::append_record(&p, &reclaim_record(2, 2, vec![(old, 1)]));
    let (at, what) = corrupt_what(&p);
    assert!(what.contains("without the reclaim feature"), "{what}");
    assert_eq!(at, rec.end());

    // An image that did reclaim, with the feature bit cleared.
    let q = d.path().join("m.rrow");
    let mut hdr = reclaimed_image(&q);
    hdr.incompat &= !INCOMPAT_RECLAIM;
    rc::write_headers(&q, &hdr);
    corrupt_what(&q);
}

#[test]
fn an_unknown_incompatible_feature_bit_is_still_refused() {
    let d = common::tempdir();
    let p = d.path().join("u.rrow");
    let mut hdr = reclaimed_image(&p);
    assert_eq!(hdr.incompat, INCOMPAT_RECLAIM);
    Image::open(&p, OpenMode::ReadOnly).unwrap();
    // Bit 1 (reuse) is known; bit 2 is not.
    for bits in [INCOMPAT_RECLAIM | 4, 4, 1 << 63] {
        hdr.incompat = bits;
        rc::write_headers(&p, &hdr);
        for mode in [OpenMode::ReadOnly, OpenMode::ReadWrite] {
            match Image::open(&p, mode) {
                Err(ImageError::UnsupportedFeatures { bits: b }) => {
                    assert_eq!(b, bits & !INCOMPAT_RECLAIM)
                }
                Err(e) => panic!("bits {bits:#x}: {e}"),
                Ok(_) => panic!("bits {bits:#x}: the image opened"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Replay safety and per-block reclaim.

#[test]
fn check_blocks_and_read_extents_name_the_first_reclaimed_block() {
    let d = common::tempdir();
    let p = d.path().join("e.rrow");
    let img = create_image(&p, 16 * BS, BS as u32);
    let four: Vec<u8> = (0..4).flat_map(|l| fill(0, l)).collect();
    let w = img.write_at(0, &four).unwrap();
    let pb = w.first_pba.0;
    img.write_at(BS, &fill(1, 1)).unwrap();
    img.write_at(2 * BS, &fill(1, 2)).unwrap();
    // Seq 3: LBAs 0 and 3 still map the first write's blocks, 1 and 2 were overwritten.
    let rep = img.reclaim(Seq(3), &[], &mut |_, _| {}).unwrap();
    assert_eq!(rep.plan.runs, vec![(pb + 1, 2)]);
    let reclaimed_at = |r: Result<(), ImageError>| match r {
        Err(ImageError::Reclaimed { pba, horizon }) => {
            assert_eq!(horizon, Seq(3));
            Some(pba.0)
        }
        Err(e) => panic!("{e}"),
        Ok(()) => None,
    };
    assert_eq!(reclaimed_at(img.check_blocks(Pba(pb), 4)), Some(pb + 1));
    assert_eq!(reclaimed_at(img.check_blocks(Pba(pb + 2), 2)), Some(pb + 2));
    assert_eq!(reclaimed_at(img.check_blocks(Pba(pb), 1)), None);
    assert_eq!(reclaimed_at(img.check_blocks(Pba(pb + 3), 1)), None);
    let read = |ex: &[Extent]| {
        let n: u64 = ex.iter().map(Extent::blocks).sum();
        let mut b = vec![0u8; (n * BS) as usize];
        img.read_extents(ex, 0, &[IoSeg::from_mut_slice(&mut b)])
            .map(|_| b)
    };
    let ex = [
        Extent::Mapped {
            pba: Pba(pb),
            blocks: 1,
        },
        Extent::Zero { blocks: 1 },
        Extent::Mapped {
            pba: Pba(pb + 2),
            blocks: 2,
        },
    ];
    assert_eq!(reclaimed_at(read(&ex).map(|_| ())), Some(pb + 2));
    assert_eq!(
        reclaimed_at(
            read(&[Extent::Mapped {
                pba: Pba(pb),
                blocks: 4
            }])
            .map(|_| ())
        ),
        Some(pb + 1)
    );
    let kept = read(&[
        Extent::Mapped {
            pba: Pba(pb),
            blocks: 1,
        },
        Extent::Mapped {
            pba: Pba(pb + 3),
            blocks: 1,
        },
    ])
    .unwrap();
    assert!(kept[..BS as usize] == fill(0, 0)[..] && kept[BS as usize..] == fill(0, 3)[..]);
    img.close().unwrap();
    // The first write's piece is reclaimed only in part: that is no damage.
    assert_eq!(check_clean(&p).reclaimed_blocks, 2);
}

#[test]
fn a_write_partly_pinned_by_a_kept_log_is_reclaimed_block_by_block() {
    let d = common::tempdir();
    let p = d.path().join("pin.rrow");
    let img = create_image(&p, 16 * BS, BS as u32);
    let four: Vec<u8> = (0..4).flat_map(|l| fill(0, l)).collect();
    let pb = img.write_at(0, &four).unwrap().first_pba.0;
    let four2: Vec<u8> = (0..4).flat_map(|l| fill(1, l)).collect();
    img.write_at(0, &four2).unwrap();
    // A kept log read LBA 1 at seq 1.
    let rep = img.reclaim(Seq(2), &[(pb + 1, 1)], &mut |_, _| {}).unwrap();
    assert_eq!(rep.plan.runs, vec![(pb, 1), (pb + 2, 2)]);
    assert_eq!(rep.plan.pinned_blocks, 1);
    assert_eq!(rc::block(&img, pb + 1).unwrap(), fill(0, 1));
    assert_reclaimed(&img, pb);
    assert_reclaimed(&img, pb + 3);
    img.close().unwrap();
    assert_eq!(check_clean(&p).reclaimed_blocks, 3);
}

#[test]
fn a_snapshot_taken_before_a_reclaim_fails_rather_than_reading_holes() {
    let d = common::tempdir();
    let p = d.path().join("s.rrow");
    let run = passes(&p, 8, 2);
    let old = run.img.state_at(Seq(7)).unwrap();
    let kept = run.img.state_at(Seq(12)).unwrap();
    // Keep-from 12: pass 1's LBAs 0..=3 go.
    let rep = run.img.reclaim(Seq(12), &[], &mut |_, _| {}).unwrap();
    assert_eq!(rep.plan.blocks, 4);
    let mut b = vec![0u8; BS as usize];
    match old.read_at(0, &mut b) {
        Err(ImageError::Reclaimed { pba, .. }) => assert_eq!(pba, Pba(run.pbas[0][0])),
        Err(e) => panic!("{e}"),
        Ok(()) => panic!("a reclaimed block read as {:?}..", &b[..4]),
    }
    // What the view reads that was not reclaimed is still there.
    old.read_at(5 * BS, &mut b).unwrap();
    assert_eq!(b, fill(0, 5));
    let mut all = vec![0u8; (8 * BS) as usize];
    kept.read_at(0, &mut all).unwrap();
    assert!(all == run.snaps[12]);
}

#[test]
fn blocks_a_read_returned_in_the_keep_from_state_survive_its_relocation() {
    let d = common::tempdir();
    let p = d.path().join("rel.rrow");
    let img = create_image(&p, 16 * BS, BS as u32);
    img.write_at(0, &fill(0, 0)).unwrap();
    img.write_at(8 * BS, &fill(0, 8)).unwrap();
    img.write_at(BS, &fill(0, 1)).unwrap();
    let before = img.resolve(Lba(0), 2).unwrap();
    assert_eq!(before.len(), 2);
    // A read in state 3 (as a recorder would log it) relocates LBAs 0 and 1 into one run.
    img.set_relocate_on_read(Some(2));
    let mut trace = Vec::new();
    let mut buf = vec![0u8; 2 * BS as usize];
    let s = img
        .read_vectored(0, &[IoSeg::from_mut_slice(&mut buf)], Some(&mut trace))
        .unwrap();
    img.set_relocate_on_read(None);
    assert_eq!((s, &trace), (Seq(3), &before));
    let after = img.resolve(Lba(0), 2).unwrap();
    assert_eq!(after.len(), 1);
    assert_ne!(after, before);
    // Keep-from 3 keeps what logs recorded from seq 3 on read: the blocks the read returned
    // (and the copy the live map now uses).
    let rep = img.reclaim(Seq(3), &[], &mut |_, _| {}).unwrap();
    assert_eq!(rep.plan.blocks, 0);
    for e in before.iter().chain(&after) {
        if let Extent::Mapped { pba, blocks } = *e {
            img.check_blocks(pba, blocks).unwrap();
        }
    }
    let Extent::Mapped { pba, .. } = before[1] else {
        panic!("{before:?}")
    };
    assert_eq!(rc::block(&img, pba.0).unwrap(), fill(0, 1));
    // Once both LBAs are overwritten, keep-from 4 gives back the old blocks and the copy.
    img.write_at(0, &[fill(1, 0), fill(1, 1)].concat()).unwrap();
    let rep = img.reclaim(Seq(4), &[], &mut |_, _| {}).unwrap();
    assert_eq!(rep.plan.blocks, 4);
    for e in before.iter().chain(&after) {
        if let Extent::Mapped { pba, blocks } = *e {
            assert!(matches!(
                img.check_blocks(pba, blocks),
                Err(ImageError::Reclaimed { .. })
            ));
        }
    }
    img.close().unwrap();
    assert_eq!(check_clean(&p).reclaimed_blocks, 4);
}

// ---------------------------------------------------------------------------------------------
// Repeated reclaims.

#[test]
fn a_second_reclaim_gives_back_only_what_became_unneeded() {
    let d = common::tempdir();
    let p = d.path().join("2.rrow");
    let run = passes(&p, 16, 4);
    let img = &run.img;
    let pin = (run.pbas[0][3], 1);
    let pass = |i: usize| -> BTreeSet<u64> { run.pbas[i].iter().copied().collect() };
    // Keep-from 32 (end of pass 2), pass 1's LBA 3 pinned.
    let r1 = img.reclaim(Seq(32), &[pin], &mut |_, _| {}).unwrap();
    let mut want = pass(0);
    want.remove(&pin.0);
    assert_eq!(rc::slots(&r1.plan.runs), want);
    assert_eq!((r1.plan.pinned_blocks, r1.horizon), (1, 32));
    // Higher keep-from: exactly pass 2 is new; the pinned block is still held.
    let before = rc::allocated(&p);
    let r2 = img.reclaim(Seq(48), &[pin], &mut |_, _| {}).unwrap();
    assert_eq!(rc::slots(&r2.plan.runs), pass(1));
    assert_eq!((r2.plan.pinned_blocks, r2.horizon), (1, 48));
    assert!(r2.allocated_after + r2.plan.bytes * 9 / 10 <= before);
    // Lower keep-from, same pin: nothing new, the horizon stays.
    let r3 = img.reclaim(Seq(20), &[pin], &mut |_, _| {}).unwrap();
    assert_eq!((r3.plan.blocks, r3.horizon), (0, 48));
    assert_eq!(img.plan_reclaim(Seq(48), &[pin]).unwrap().blocks, 0);
    // Lower keep-from without the pin: only the block the pin held, and the horizon stays.
    let r4 = img.reclaim(Seq(20), &[], &mut |_, _| {}).unwrap();
    assert_eq!((r4.plan.runs.clone(), r4.horizon), (vec![pin], 48));
    assert_states(img, &run.snaps, 48);
    assert_eq!(img.info().unwrap().reclaimed_blocks, 32);
    let Passes { img, .. } = run;
    img.close().unwrap();
    let f = std::fs::read(&p).unwrap();
    assert_eq!(rc::checkpoint(&f).reclaimed.unwrap().horizon, 48);
    assert_eq!(check_clean(&p).reclaimed_blocks, 32);
}

#[test]
fn punching_needs_a_committed_plan_and_a_read_only_image_only_plans() {
    let d = common::tempdir();
    let p = d.path().join("o.rrow");
    let run = passes(&p, 8, 2);
    let plan = run.img.plan_reclaim(Seq(16), &[]).unwrap();
    assert_eq!(plan.blocks, 8);
    assert!(matches!(
        run.img.punch_reclaimed(&plan, &mut |_, _| {}),
        Err(ImageError::InvalidOptions(_))
    ));
    assert_eq!(rc::block(&run.img, run.pbas[0][2]).unwrap(), fill(0, 2));
    assert_states(&run.img, &run.snaps, 0);
    let Passes { img, snaps, .. } = run;
    img.close().unwrap();
    let ro = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(ro.plan_reclaim(Seq(16), &[]).unwrap(), plan);
    assert!(matches!(
        ro.commit_reclaim(&plan),
        Err(ImageError::ReadOnly)
    ));
    assert!(matches!(
        ro.reclaim(Seq(16), &[], &mut |_, _| {}),
        Err(ImageError::ReadOnly)
    ));
    assert!(matches!(
        ro.plan_reclaim(Seq(17), &[]),
        Err(ImageError::SeqInFuture { .. })
    ));
    assert_states(&ro, &snaps, 0);
}

#[test]
fn a_reclaim_of_many_runs_is_split_over_records_that_all_replay() {
    const N: u64 = 9000;
    let d = common::tempdir();
    let p = d.path().join("many.rrow");
    let img = create_image(&p, N * 512, 512);
    let all: Vec<u8> = (0..N * 512).map(|i| (i / 512 % 251 + 1) as u8).collect();
    let first = img.write_at(0, &all).unwrap().first_pba.0;
    // Every other block overwritten: the first write's piece is given back one block in two.
    for l in (0..N).step_by(2) {
        img.write_at(l * 512, &[0xee; 512]).unwrap();
    }
    let seq = img.seq();
    let plan = img.plan_reclaim(seq, &[]).unwrap();
    assert_eq!(plan.runs.len() as u64, N / 2);
    assert_eq!(plan.runs[7], (first + 14, 1));
    img.commit_reclaim(&plan).unwrap();
    let crashed = std::fs::read(&p).unwrap();
    drop(img);
    let recs: Vec<_> = rc::records(&crashed)
        .into_iter()
        .filter(|r| r.kind == 8)
        .collect();
    assert!(recs.len() >= 2, "{} reclaim record(s)", recs.len());
    let cp = d.path().join("many-crashed.rrow");
    std::fs::write(&cp, &crashed).unwrap();
    let img = Image::open(&cp, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.info().unwrap().reclaimed_blocks, N / 2);
    assert_eq!(img.info().unwrap().history_horizon, seq.0);
    // The first and the last runs (named by different records) are both reclaimed.
    let mut b = vec![0u8; 512];
    for l in [0, N - 2] {
        assert!(matches!(
            img.read_block(Pba(first + l), &mut b),
            Err(ImageError::Reclaimed { .. })
        ));
    }
    img.read_block(Pba(first + N - 1), &mut b).unwrap();
    assert!(b.iter().all(|&x| x == ((N - 1) % 251 + 1) as u8));
    drop(img);
    assert_eq!(check_clean(&cp).reclaimed_blocks, N / 2);
}

// ---------------------------------------------------------------------------------------------
// Concurrency.

#[test]
fn reclaims_concurrent_with_writes_and_relocating_reads_keep_every_later_state() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    const BLOCKS: u64 = 32;
    let d = common::tempdir();
    let p = d.path().join("cc.rrow");
    let img = create_image(&p, BLOCKS * BS, BS as u32);
    for l in 0..BLOCKS {
        img.write_at(l * BS, &fill(0, l)).unwrap();
    }
    img.flush().unwrap();
    // (seq, LBA, content) of every write; (seq, extents, data) of every read.
    let writes = Mutex::new(Vec::new());
    let reads = Mutex::new(Vec::new());
    let writers_left = AtomicUsize::new(2);
    std::thread::scope(|s| {
        for half in 0..2u64 {
            let (img, writes, left) = (&img, &writes, &writers_left);
            s.spawn(move || {
                for i in 0..300u64 {
                    let l = half * BLOCKS / 2 + (i * 7) % (BLOCKS / 2);
                    let data = fill(i + 1 + half * 1000, l);
                    let w = img.write_at(l * BS, &data).unwrap();
                    writes.lock().unwrap().push((w.seq.0, l, data));
                }
                left.fetch_sub(1, Ordering::SeqCst);
            });
        }
        let (img2, reads2, left2) = (&img, &reads, &writers_left);
        s.spawn(move || {
            img2.set_relocate_on_read(Some(2));
            while left2.load(Ordering::SeqCst) > 0 {
                let mut buf = vec![0u8; (BLOCKS * BS) as usize];
                let mut trace = Vec::new();
                let seq = img2
                    .read_vectored(0, &[IoSeg::from_mut_slice(&mut buf)], Some(&mut trace))
                    .unwrap();
                reads2.lock().unwrap().push((seq.0, trace, buf));
            }
        });
        loop {
            img.reclaim(img.seq(), &[], &mut |_, _| {}).unwrap();
            if writers_left.load(Ordering::SeqCst) == 0 {
                break;
            }
        }
    });
    img.set_relocate_on_read(None);
    // However the threads ran, some history is given back (this one alone would).
    img.reclaim(Seq(img.seq().0 - 50), &[], &mut |_, _| {})
        .unwrap();
    // The model: the initial pass, then the writes in seq order.
    let mut writes = writes.into_inner().unwrap();
    writes.sort_by_key(|w| w.0);
    let mut model: Vec<u8> = (0..BLOCKS).flat_map(|l| fill(0, l)).collect();
    let mut snaps = vec![vec![0u8; (BLOCKS * BS) as usize]; BLOCKS as usize + 1];
    snaps[BLOCKS as usize] = model.clone();
    for (seq, l, data) in &writes {
        assert_eq!(*seq as usize, snaps.len());
        model[(l * BS) as usize..((l + 1) * BS) as usize].copy_from_slice(data);
        snaps.push(model.clone());
    }
    // Whatever the reads returned in states from the horizon on is still there by block id.
    let verify = |img: &Image| {
        let horizon = img.info().unwrap().history_horizon;
        assert!(horizon > BLOCKS);
        assert_states(img, &snaps, horizon);
        let reads = reads.lock().unwrap();
        for (seq, trace, data) in reads.iter().filter(|r| r.0 >= horizon) {
            assert!(data == &snaps[*seq as usize], "a read at seq {seq}");
            let mut at = 0usize;
            for e in trace {
                if let Extent::Mapped { pba, blocks } = *e {
                    for k in 0..blocks {
                        let b = rc::block(img, pba.0 + k).unwrap();
                        let o = at + (k * BS) as usize;
                        assert!(b[..] == data[o..o + BS as usize], "block {}", pba.0 + k);
                    }
                }
                at += (e.blocks() * BS) as usize;
            }
        }
    };
    verify(&img);
    img.close().unwrap();
    check_clean(&p);
    verify(&Image::open(&p, OpenMode::ReadOnly).unwrap());
}

// ---------------------------------------------------------------------------------------------
// Model test.

mod model {
    //! Random writes (whole and sub-block), discards, write-zeroes, flushes and reads (some
    //! relocating), with one or two reclaims at random keep-from seqs and random pinned runs
    //! taken from what earlier reads returned (as a kept record log pins them). The model is
    //! the disk as of every seq. After each reclaim, and again after a close or an unclean
    //! stop and a reopen: every state from the horizon on reads as the model and every earlier
    //! one is refused; pinned blocks, blocks read in states from the horizon on and blocks
    //! written from the horizon on read their content; every reclaimed block is refused; the
    //! blocks a reclaim must give back are given back; a view taken before the reclaim reads
    //! the model or fails, never anything else; `check` is clean. Half the images have a base.

    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use rand::{Rng, SeedableRng};

    const BLOCKS: u64 = 8;
    const SIZE: u64 = BLOCKS * BS;
    const SECTORS: u64 = SIZE / 512;

    #[derive(Debug, Clone)]
    enum Op {
        /// `len` sectors at sector `off`.
        Write {
            off: u64,
            len: u64,
            seed: u64,
        },
        WriteBlocks {
            blk: u64,
            blocks: u64,
            seed: u64,
        },
        Discard {
            off: u64,
            len: u64,
        },
        WriteZeroes {
            off: u64,
            len: u64,
        },
        Flush,
        /// A traced read of `blocks` blocks at `blk`; relocating when `relocate`.
        Read {
            blk: u64,
            blocks: u64,
            relocate: bool,
        },
        /// `keep` picks the keep-from seq, `pin` the percentage of traced blocks pinned,
        /// `seed` which ones and the seq of the view taken before; `stop` what happens after:
        /// a close and a reopen, a drop (a crash) and a reopen, or nothing (the image stays
        /// open, so the next reclaim plans from the same cursor, as `serve --retain-seqs`
        /// does).
        Reclaim {
            keep: u64,
            pin: u8,
            seed: u64,
            stop: Stop,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..SECTORS, 1u64..20, any::<u64>())
                .prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
            4 => (0..BLOCKS, 1u64..4, any::<u64>())
                .prop_map(|(blk, blocks, seed)| Op::WriteBlocks { blk, blocks, seed }),
            1 => (0..SECTORS, 1u64..40).prop_map(|(off, len)| Op::Discard { off, len }),
            1 => (0..SECTORS, 1u64..40).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
            1 => Just(Op::Flush),
            3 => (0..BLOCKS, 1u64..=BLOCKS, any::<bool>())
                .prop_map(|(blk, blocks, relocate)| Op::Read { blk, blocks, relocate }),
        ]
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Stop {
        Close,
        Crash,
        StayOpen,
    }

    fn reclaim_op() -> impl Strategy<Value = Op> {
        (
            any::<u64>(),
            0u8..=100,
            any::<u64>(),
            prop_oneof![Just(Stop::Close), Just(Stop::Crash), Just(Stop::StayOpen)],
        )
            .prop_map(|(keep, pin, seed, stop)| Op::Reclaim {
                keep,
                pin,
                seed,
                stop,
            })
    }

    /// The operations with one to three reclaims inserted at random places, the checkpoint
    /// threshold (small: flushes and commits take checkpoints on their own), and whether the
    /// image has a base.
    fn case() -> impl Strategy<Value = (Vec<Op>, u64, bool)> {
        (
            prop::collection::vec(op(), 10..40),
            prop::collection::vec((any::<Index>(), reclaim_op()), 1..=3),
            prop_oneof![Just(u64::MAX), Just(2048u64)],
            any::<bool>(),
        )
            .prop_map(|(mut ops, reclaims, ckpt, base)| {
                for (at, r) in reclaims {
                    let i = at.index(ops.len() + 1);
                    ops.insert(i, r);
                }
                (ops, ckpt, base)
            })
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| r.gen()).collect()
    }

    /// A block of a state: (block id, seq, LBA); its content is the model's LBA at that seq.
    type Known = (u64, u64, u64);

    #[derive(Default)]
    struct Model {
        snaps: Vec<Vec<u8>>,
        /// Blocks writes returned.
        written: Vec<Known>,
        /// Blocks reads returned (what a record log holds).
        traced: Vec<Known>,
        /// Pinned blocks (kept logs are kept: pins accumulate) and what they hold.
        pinned: HashMap<u64, (u64, u64)>,
        reclaimed: BTreeSet<u64>,
        horizon: u64,
        /// Reclaimed slots are handed to the allocator after every reclaim.
        reuse: bool,
        /// Reclaimed blocks that writes or relocations took again.
        reused: u64,
    }

    impl Model {
        fn content(&self, seq: u64, lba: u64) -> &[u8] {
            &self.snaps[seq as usize][(lba * BS) as usize..((lba + 1) * BS) as usize]
        }

        fn push(&mut self, img: &Image, f: impl FnOnce(&mut Vec<u8>)) {
            let mut m = self.snaps.last().unwrap().clone();
            f(&mut m);
            self.snaps.push(m);
            assert_eq!(img.seq().0 as usize, self.snaps.len() - 1);
        }

        fn verify(&self, img: &Image) {
            let info = img.info().unwrap();
            assert_eq!(info.reclaimed_blocks, self.reclaimed.len() as u64);
            assert_states(img, &self.snaps, self.horizon);
            for (&pba, &(seq, lba)) in &self.pinned {
                assert!(
                    rc::block(img, pba).unwrap() == self.content(seq, lba),
                    "pinned {pba}"
                );
            }
            for &(pba, seq, lba) in self.traced.iter().chain(&self.written) {
                if seq >= self.horizon {
                    let got = rc::block(img, pba)
                        .unwrap_or_else(|e| panic!("block {pba} of state {seq}: {e}"));
                    assert!(got == self.content(seq, lba), "block {pba} of state {seq}");
                }
            }
            for &pba in &self.reclaimed {
                assert_reclaimed(img, pba);
                assert!(matches!(
                    img.check_blocks(Pba(pba), 1),
                    Err(ImageError::Reclaimed { .. })
                ));
            }
        }
    }

    impl Model {
        /// Blocks `pba .. pba + n` were just named by a write or a relocation: those that were
        /// reclaimed are reused, and every version they held before is gone from the model.
        fn named(&mut self, pba: u64, n: u64) {
            let reused: BTreeSet<u64> = (pba..pba + n)
                .filter(|b| self.reclaimed.contains(b))
                .collect();
            if reused.is_empty() {
                return;
            }
            assert!(self.reuse, "block {pba}+{n} reused without reuse on");
            for b in &reused {
                self.reclaimed.remove(b);
            }
            self.reused += reused.len() as u64;
            self.written.retain(|(b, _, _)| !reused.contains(b));
            self.traced.retain(|(b, _, _)| !reused.contains(b));
            assert!(self.pinned.keys().all(|b| !reused.contains(b)));
        }
    }

    fn run(ops: &[Op], ckpt: u64, base: bool, reuse: bool) {
        let d = common::tempdir();
        let p = d.path().join("m.rrow");
        let mut disk0 = vec![0u8; SIZE as usize];
        let base = base.then(|| {
            // Shorter than the disk, and not block-aligned: its tail reads zeros.
            let b = pattern(0x5a, (SIZE - SIZE / 3) as usize);
            disk0[..b.len()].copy_from_slice(&b);
            let bp = d.path().join("base.raw");
            std::fs::write(&bp, &b).unwrap();
            bp
        });
        let opts = rr_row::image::CreateOptions {
            size: SIZE,
            block_size: rr_row::units::BlockSize::new(BS as u32).unwrap(),
            base,
        };
        let mut img = Some(Image::create(&p, &opts).unwrap());
        img.as_ref().unwrap().set_checkpoint_threshold(ckpt);
        let mut m = Model {
            snaps: vec![disk0],
            reuse,
            ..Model::default()
        };
        for op in ops {
            let i = img.as_ref().unwrap();
            match *op {
                Op::Write { off, len, seed } => {
                    let len = len.min(SECTORS - off);
                    let data = pattern(seed, (len * 512) as usize);
                    let w = i.write_at(off * 512, &data).unwrap();
                    m.named(w.first_pba.0, w.blocks);
                    let lba = off * 512 / BS;
                    m.push(i, |s| {
                        s[(off * 512) as usize..((off + len) * 512) as usize].copy_from_slice(&data)
                    });
                    for k in 0..w.blocks {
                        m.written.push((w.first_pba.0 + k, w.seq.0, lba + k));
                    }
                }
                Op::WriteBlocks { blk, blocks, seed } => {
                    let n = blocks.min(BLOCKS - blk);
                    let data = pattern(seed, (n * BS) as usize);
                    let w = i.write_at(blk * BS, &data).unwrap();
                    m.named(w.first_pba.0, w.blocks);
                    m.push(i, |s| {
                        s[(blk * BS) as usize..((blk + n) * BS) as usize].copy_from_slice(&data)
                    });
                    for k in 0..n {
                        m.written.push((w.first_pba.0 + k, w.seq.0, blk + k));
                    }
                }
                Op::Discard { off, len } | Op::WriteZeroes { off, len } => {
                    let len = len.min(SECTORS - off);
                    if matches!(op, Op::Discard { .. }) {
                        i.discard(off * 512, len * 512).unwrap();
                    } else {
                        i.write_zeroes(off * 512, len * 512).unwrap();
                    }
                    m.push(i, |s| {
                        s[(off * 512) as usize..((off + len) * 512) as usize].fill(0)
                    });
                }
                Op::Flush => i.flush().unwrap(),
                Op::Read {
                    blk,
                    blocks,
                    relocate,
                } => {
                    let n = blocks.min(BLOCKS - blk);
                    i.set_relocate_on_read(relocate.then_some(2));
                    let mut buf = vec![0u8; (n * BS) as usize];
                    let mut trace = Vec::new();
                    let seq = i
                        .read_vectored(
                            blk * BS,
                            &[IoSeg::from_mut_slice(&mut buf)],
                            Some(&mut trace),
                        )
                        .unwrap();
                    i.set_relocate_on_read(None);
                    assert_eq!(seq, i.seq());
                    // A relocation names new blocks (maybe reused ones) for the range.
                    for e in i.resolve(Lba(blk), n).unwrap() {
                        if let Extent::Mapped { pba, blocks } = e {
                            m.named(pba.0, blocks);
                        }
                    }
                    let want = &m.snaps[seq.0 as usize];
                    assert!(buf[..] == want[(blk * BS) as usize..((blk + n) * BS) as usize]);
                    let mut lba = blk;
                    for e in trace {
                        if let Extent::Mapped { pba, blocks } = e {
                            for k in 0..blocks {
                                m.traced.push((pba.0 + k, seq.0, lba + k));
                            }
                        }
                        lba += e.blocks();
                    }
                }
                Op::Reclaim {
                    keep,
                    pin,
                    seed,
                    stop,
                } => {
                    let cur = i.seq().0;
                    // Half of them near the current seq, where most versions are superseded.
                    let keep = if keep % 2 == 0 {
                        (keep / 2) % (cur + 1)
                    } else {
                        cur - (keep / 2) % (cur / 4 + 1)
                    };
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                    for &(pba, seq, lba) in &m.traced {
                        if rng.gen_range(0..100) < pin && !m.reclaimed.contains(&pba) {
                            m.pinned.insert(pba, (seq, lba));
                        }
                    }
                    let pins: Vec<(u64, u64)> = m.pinned.keys().map(|&b| (b, 1)).collect();
                    let view_seq = rng.gen_range(m.horizon..=cur);
                    let view = i.state_at(Seq(view_seq)).unwrap();
                    let rep = i.reclaim(Seq(keep), &pins, &mut |_, _| {}).unwrap();
                    let got = rc::slots(&rep.plan.runs);
                    assert!(got.is_disjoint(&m.reclaimed), "reclaimed twice");
                    assert!(
                        m.pinned.keys().all(|b| !got.contains(b)),
                        "a pinned block went"
                    );
                    let horizon = if got.is_empty() {
                        m.horizon
                    } else {
                        m.horizon.max(keep)
                    };
                    assert_eq!(rep.horizon, horizon);
                    // Liveness: a block written up to the keep-from state that this state
                    // does not map, no pin holds and no read in that state returned is given
                    // back (now or by an earlier reclaim).
                    if keep >= m.horizon {
                        let at_keep: BTreeSet<u64> = i
                            .state_at(Seq(keep))
                            .unwrap()
                            .resolve(Lba(0), BLOCKS)
                            .unwrap()
                            .iter()
                            .filter_map(|e| match *e {
                                Extent::Mapped { pba, blocks } => Some(pba.0..pba.0 + blocks),
                                _ => None,
                            })
                            .flatten()
                            .collect();
                        for &(pba, seq, _) in &m.written {
                            let read_at_keep =
                                m.traced.iter().any(|&(b, s, _)| b == pba && s == keep);
                            if seq <= keep
                                && !at_keep.contains(&pba)
                                && !m.pinned.contains_key(&pba)
                                && !read_at_keep
                            {
                                assert!(
                                    got.contains(&pba) || m.reclaimed.contains(&pba),
                                    "block {pba} (seq {seq}) was kept by keep-from {keep}"
                                );
                            }
                        }
                    }
                    m.reclaimed.extend(got);
                    m.horizon = horizon;
                    let mut buf = vec![0u8; SIZE as usize];
                    match view.read_at(0, &mut buf) {
                        Ok(()) => assert!(buf == m.snaps[view_seq as usize], "view {view_seq}"),
                        Err(ImageError::Reclaimed { .. }) => assert!(view_seq < horizon),
                        Err(e) => panic!("view {view_seq}: {e}"),
                    }
                    // The view holds the file (and its lock) like the image does.
                    drop(view);
                    m.verify(i);
                    if stop == Stop::StayOpen {
                        // The reclaim is durable: with reuse its slots serve the next writes
                        // at once, and the next reclaim plans on from the same cursor.
                        if reuse {
                            i.set_reuse_reclaimed(true);
                            assert_eq!(
                                i.reuse_reclaimed(&rep.plan.runs).unwrap(),
                                rc::slots(&rep.plan.runs).len() as u64
                            );
                        }
                        continue;
                    }
                    // Stop (cleanly or not), check, reopen, verify again.
                    let i = img.take().unwrap();
                    if stop == Stop::Close {
                        i.close().unwrap();
                    } else {
                        drop(i);
                    }
                    let r = check_clean(&p);
                    // Versions whose blocks were reused count as reclaimed too.
                    assert_eq!(r.reclaimed_blocks, m.reclaimed.len() as u64 + m.reused);
                    let i = Image::open(&p, OpenMode::ReadWrite).unwrap();
                    i.set_checkpoint_threshold(ckpt);
                    m.verify(&i);
                    if reuse {
                        i.set_reuse_reclaimed(true);
                        assert_eq!(i.reuse_all_reclaimed().unwrap(), m.reclaimed.len() as u64);
                        assert_eq!(i.free_blocks(), m.reclaimed.len() as u64);
                    }
                    img = Some(i);
                }
            }
        }
        let i = img.take().unwrap();
        assert!(rc::disk(&i) == *m.snaps.last().unwrap());
        i.close().unwrap();
        check_clean(&p);
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 100, ..ProptestConfig::default() })]

        #[test]
        fn reclaim_keeps_every_state_from_the_horizon_and_gives_back_the_rest(
            (ops, ckpt, base) in case()
        ) {
            run(&ops, ckpt, base, false);
        }

        /// The same with every reclaimed block handed to the allocator: later writes and
        /// relocations take them, their old versions are gone, every state from the horizon
        /// still reads the model, and `check` is clean after every stop.
        #[test]
        fn reclaimed_blocks_reused_by_later_writes_keep_every_state_from_the_horizon(
            (ops, ckpt, base) in case()
        ) {
            run(&ops, ckpt, base, true);
        }
    }
}

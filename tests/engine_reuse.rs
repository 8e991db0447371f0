//! Reuse of reclaimed slots (`Image::set_reuse_reclaimed`, `serve --retain-seqs`): writes
//! take the slots of reclaimed versions instead of growing the file, and everything that could
//! still name an old version (history, `check`, block-id reads, views, record logs) knows it
//! is gone. The model-based test is in engine_reclaim.rs (`reclaimed_blocks_reused_...`).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::image::create_image;
use common::reclaim as rc;
use rr_row::image::format::{INCOMPAT_RECLAIM, INCOMPAT_REUSE};
use rr_row::image::{Image, ImageError, OpenMode};
use rr_row::units::{Lba, Seq};

const BS: u64 = 4096;

fn fill(pass: u64, lba: u64) -> Vec<u8> {
    (0..BS)
        .map(|i| ((pass * 31 + lba * 7 + i / 512) % 251 + 1) as u8)
        .collect()
}

/// Writes every block of the disk once with pass `pass`'s pattern; returns the block ids.
fn pass(img: &Image, blocks: u64, pass: u64) -> Vec<u64> {
    (0..blocks)
        .map(|l| img.write_at(l * BS, &fill(pass, l)).unwrap().first_pba.0)
        .collect()
}

fn disk_of(blocks: u64, pass: u64) -> Vec<u8> {
    (0..blocks).flat_map(|l| fill(pass, l)).collect()
}

/// Reclaims everything before the current state and hands it to the allocator.
fn reclaim_and_reuse(img: &Image) -> BTreeSet<u64> {
    let plan = img.plan_reclaim(img.seq(), &[]).unwrap();
    img.commit_reclaim(&plan).unwrap();
    img.set_reuse_reclaimed(true);
    assert_eq!(img.reuse_reclaimed(&plan.runs).unwrap(), plan.blocks);
    // Offering the same runs again adds nothing (no slot is ever handed out twice).
    assert_eq!(img.reuse_reclaimed(&plan.runs).unwrap(), 0);
    rc::slots(&plan.runs)
}

fn incompat(p: &Path) -> u64 {
    rc::current_header(&std::fs::read(p).unwrap()).incompat
}

#[test]
fn writes_take_reclaimed_slots_and_the_file_stops_growing() {
    let d = common::tempdir();
    let p = d.path().join("r.rrow");
    let blocks = 64;
    let img = create_image(&p, blocks * BS, BS as u32);
    let first = pass(&img, blocks, 0);
    pass(&img, blocks, 1);
    let freed = reclaim_and_reuse(&img);
    assert_eq!(freed, first.iter().copied().collect());
    assert_eq!(img.free_blocks(), blocks);
    assert_eq!(incompat(&p), INCOMPAT_RECLAIM | INCOMPAT_REUSE);
    let len = std::fs::metadata(&p).unwrap().len();

    // The third pass lands in the first pass's slots, in order (next-fit keeps a sequential
    // writer sequential). Half-way, offering every reclaimed run again hands out nothing that
    // is live or already given out.
    let mut third = pass(&img, blocks / 2, 2);
    assert_eq!(img.reuse_all_reclaimed().unwrap(), 0);
    third.extend(
        (blocks / 2..blocks).map(|l| img.write_at(l * BS, &fill(2, l)).unwrap().first_pba.0),
    );
    assert_eq!(third, first);
    assert_eq!(img.free_blocks(), 0);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len, "the file grew");
    assert!(rc::disk(&img) == disk_of(blocks, 2));
    let info = img.info().unwrap();
    assert_eq!(info.reclaimed_blocks, 0, "reused slots are live again");

    // The free list is empty now: the next pass appends.
    let fourth = pass(&img, blocks, 3);
    assert!(fourth.iter().all(|b| !first.contains(b)));
    img.close().unwrap();

    // Reopened: the reuse replays from the journal (and checkpoints), the content is the
    // last pass, and check is clean, counting the versions reuse overwrote as reclaimed.
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert!(rc::disk(&img) == disk_of(blocks, 3));
    assert_eq!(img.info().unwrap().reclaimed_blocks, 0);
    drop(img);
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
    assert_eq!(rep.reclaimed_blocks, blocks, "pass 0's versions");
    assert_eq!(rep.unverifiable_blocks, 0);
}

#[test]
fn history_views_and_block_reads_never_pass_the_new_data_off_as_the_old_version() {
    let d = common::tempdir();
    let p = d.path().join("h.rrow");
    let img = create_image(&p, 8 * BS, BS as u32);
    let v1 = img.write_at(0, &fill(0, 0)).unwrap(); // seq 1, LBA 0
    img.write_at(0, &fill(1, 0)).unwrap(); // seq 2 supersedes it
    let view = img.state_at(Seq(1)).unwrap();
    let mut buf = vec![0u8; BS as usize];
    view.read_at(0, &mut buf).unwrap();
    assert!(buf == fill(0, 0));
    reclaim_and_reuse(&img);
    // LBA 5 takes v1's slot.
    let w = img.write_at(5 * BS, &fill(9, 5)).unwrap();
    assert_eq!(w.first_pba, v1.first_pba);

    // history: LBA 0's first version is gone; LBA 5's write is live and readable by id.
    let h0 = img.history(Lba(0)).unwrap();
    assert_eq!(h0.len(), 2);
    assert!(h0[0].reclaimed, "{h0:?}");
    assert!(!h0[1].reclaimed);
    let h5 = img.history(Lba(5)).unwrap();
    assert!(!h5[0].reclaimed);
    assert_eq!(rc::block(&img, w.first_pba.0).unwrap(), fill(9, 5));

    // The view of seq 1 was overtaken: it fails, never returning LBA 5's data as LBA 0's.
    match view.read_at(0, &mut buf) {
        Err(ImageError::HistoryReclaimed { requested, .. }) => assert_eq!(requested, Seq(1)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        img.state_at(Seq(1)),
        Err(ImageError::HistoryReclaimed { .. })
    ));

    // The reuse index answers what replay asks: a read of that slot in state 1 is gone, a
    // read in state 3 (after the reuse) is the new data.
    let idx = img.reborn_index().unwrap();
    assert_eq!(idx.len(), 1);
    assert_eq!(
        idx.reused_after_seq(v1.first_pba.0, 1, 1),
        Some(v1.first_pba.0)
    );
    assert_eq!(idx.reused_after_seq(v1.first_pba.0, 1, w.seq.0), None);
    drop(view);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn a_crash_after_reuse_recovers_from_the_journal_tail_and_from_a_checkpoint() {
    let d = common::tempdir();
    let p = d.path().join("c.rrow");
    let blocks = 32;
    let img = create_image(&p, blocks * BS, BS as u32);
    let first = pass(&img, blocks, 0);
    pass(&img, blocks, 1);
    reclaim_and_reuse(&img);
    // Half the disk goes into reused slots, then a flush: durable, but only in the journal
    // tail after the checkpoint that set the reuse bit.
    for l in 0..blocks / 2 {
        let w = img.write_at(l * BS, &fill(2, l)).unwrap();
        assert!(first.contains(&w.first_pba.0));
    }
    img.flush().unwrap();
    let crashed = std::fs::read(&p).unwrap();
    let cp = d.path().join("crashed.rrow");
    std::fs::write(&cp, &crashed).unwrap();
    // Carrying on in the original: a checkpoint, then the rest of the pass.
    img.checkpoint().unwrap();
    for l in blocks / 2..blocks {
        img.write_at(l * BS, &fill(2, l)).unwrap();
    }
    img.close().unwrap();

    let mut want = disk_of(blocks, 2);
    want[(blocks / 2 * BS) as usize..]
        .copy_from_slice(&disk_of(blocks, 1)[(blocks / 2 * BS) as usize..]);
    for (path, disk, reclaimed) in [(&cp, want, blocks / 2), (&p, disk_of(blocks, 2), 0)] {
        let img = Image::open(path, OpenMode::ReadWrite).unwrap();
        assert!(rc::disk(&img) == disk, "{}", path.display());
        assert_eq!(img.info().unwrap().reclaimed_blocks, reclaimed);
        // What is still reclaimed is reusable after the reopen; nothing live is.
        img.set_reuse_reclaimed(true);
        assert_eq!(img.reuse_all_reclaimed().unwrap(), reclaimed);
        img.close().unwrap();
        let rep = Image::check(path, false).unwrap();
        assert!(
            rep.problems.is_empty(),
            "{}: {:?}",
            path.display(),
            rep.problems
        );
    }
}

#[test]
fn a_reuse_record_in_an_image_without_the_reuse_bit_is_corruption() {
    let d = common::tempdir();
    let p = d.path().join("b.rrow");
    let img = create_image(&p, 8 * BS, BS as u32);
    pass(&img, 8, 0);
    pass(&img, 8, 1);
    reclaim_and_reuse(&img);
    // The reusing write sits in the journal tail (a crash after its flush): recovery meets it.
    img.write_at(0, &fill(2, 0)).unwrap();
    img.flush().unwrap();
    let tail = d.path().join("tail.rrow");
    std::fs::write(&tail, std::fs::read(&p).unwrap()).unwrap();
    // Closed: a checkpoint covers it, and only `check`'s walk of the whole journal meets it.
    img.close().unwrap();
    for path in [&tail, &p] {
        let mut hdr = rc::current_header(&std::fs::read(path).unwrap());
        hdr.incompat &= !INCOMPAT_REUSE;
        rc::write_headers(path, &hdr);
    }
    match Image::open(&tail, OpenMode::ReadOnly) {
        Err(ImageError::Corrupt { what, .. }) => {
            assert!(what.contains("without the reuse feature"), "{what}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("the image opened"),
    }
    let rep = Image::check(&p, false).unwrap();
    assert_eq!(rep.exit_code(), 2, "{rep:?}");
    assert!(
        rep.problems
            .iter()
            .any(|w| w.contains("without the reuse feature")),
        "{:?}",
        rep.problems
    );
    // The reuse bit without the reclaim bit is refused too.
    let mut hdr = rc::current_header(&std::fs::read(&p).unwrap());
    hdr.incompat = INCOMPAT_REUSE;
    rc::write_headers(&p, &hdr);
    assert!(Image::open(&p, OpenMode::ReadOnly).is_err());
}

#[test]
fn a_slot_reused_after_the_keep_from_state_is_never_planned_again() {
    // The stale-candidate case: the reclaim that freed a slot was committed at seq 8 with
    // keep-from 6; after a reopen, a plan with keep-from 7 walks only up to seq 7, so it sees
    // the slot displaced but not the reclaim record - while a write has reused the slot since.
    // It must not be reclaimed a second time while live.
    let d = common::tempdir();
    let p = d.path().join("s.rrow");
    let img = create_image(&p, 4 * BS, BS as u32);
    let first = pass(&img, 4, 0); // seqs 1..=4
    let second = pass(&img, 4, 1); // seqs 5..=8: LBA l of pass 0 superseded at seq 5 + l
    let plan = img.plan_reclaim(Seq(6), &[]).unwrap();
    assert_eq!(rc::slots(&plan.runs), first[..2].iter().copied().collect());
    img.commit_reclaim(&plan).unwrap();
    img.set_reuse_reclaimed(true);
    img.reuse_reclaimed(&plan.runs).unwrap();
    let w = img.write_at(3 * BS, &fill(2, 3)).unwrap(); // seq 9 reuses LBA 0's old slot
    assert_eq!(w.first_pba.0, first[0]);
    img.close().unwrap();
    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    let plan = img.plan_reclaim(Seq(7), &[]).unwrap();
    assert_eq!(
        rc::slots(&plan.runs),
        [first[2]].into_iter().collect(),
        "only LBA 2's first version is newly unneeded at seq 7"
    );
    img.commit_reclaim(&plan).unwrap();
    assert_eq!(rc::disk(&img)[3 * BS as usize..], fill(2, 3)[..]);
    // A second plan of the same open image walks its cursor on over the reclaim record and
    // the reusing write (the first plan purged the cursor, so this one does not look past
    // it): the reused slot is live and stays out; LBA 3's two superseded versions (seq 8
    // displaced pass 0's, seq 9 pass 1's) come in.
    let plan = img.plan_reclaim(Seq(9), &[]).unwrap();
    assert_eq!(
        rc::slots(&plan.runs),
        [first[3], second[3]].into_iter().collect(),
        "at seq 9"
    );
    img.commit_reclaim(&plan).unwrap();
    assert_eq!(rc::disk(&img)[3 * BS as usize..], fill(2, 3)[..]);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn slots_reclaimed_before_a_reopen_and_reused_after_the_first_plan_are_never_planned() {
    // After a reopen the cursor holds slots displaced before it that records after it
    // reclaimed; its first plan past the horizon purges them. A later plan of the same open
    // image stops before the records that reuse them (its keep-from is older), so only
    // that purge keeps them out: planned, they would be live data given back.
    let d = common::tempdir();
    let p = d.path().join("r.rrow");
    let img = create_image(&p, 4 * BS, BS as u32);
    let first = pass(&img, 4, 0); // seqs 1..=4
    pass(&img, 4, 1); // seqs 5..=8
    let plan = img.plan_reclaim(Seq(6), &[]).unwrap();
    assert_eq!(rc::slots(&plan.runs), first[..2].iter().copied().collect());
    img.commit_reclaim(&plan).unwrap();
    img.close().unwrap();

    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    let plan = img.plan_reclaim(Seq(7), &[]).unwrap();
    assert_eq!(rc::slots(&plan.runs), [first[2]].into_iter().collect());
    img.commit_reclaim(&plan).unwrap();
    img.set_reuse_reclaimed(true);
    assert_eq!(img.reuse_all_reclaimed().unwrap(), 3);
    // Seqs 9 and 10 take two of LBA 0..2's first slots.
    let mut model = disk_of(4, 1);
    let mut reused = BTreeSet::new();
    for l in 0..2u64 {
        let w = img.write_at(l * BS, &fill(3, l)).unwrap();
        reused.insert(w.first_pba.0);
        model[(l * BS) as usize..((l + 1) * BS) as usize].copy_from_slice(&fill(3, l));
    }
    assert!(reused.is_subset(&first[..3].iter().copied().collect()));
    let plan = img.plan_reclaim(Seq(8), &[]).unwrap();
    assert_eq!(
        rc::slots(&plan.runs),
        [first[3]].into_iter().collect(),
        "only LBA 3's first version is newly unneeded at seq 8"
    );
    img.commit_reclaim(&plan).unwrap();
    assert!(rc::disk(&img) == model);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

#[test]
fn reuse_follows_concurrent_writers_and_every_live_block_reads_back() {
    // Writers overwrite a small disk from two threads while the test reclaims and feeds the
    // allocator; the disk must end as the model (each LBA written by one thread only).
    let d = common::tempdir();
    let p = d.path().join("t.rrow");
    let blocks = 128;
    let img = std::sync::Arc::new(create_image(&p, blocks * BS, BS as u32));
    img.set_reuse_reclaimed(true);
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let img = std::sync::Arc::clone(&img);
            std::thread::spawn(move || {
                for round in 0..30u64 {
                    for l in (t..blocks).step_by(2) {
                        img.write_at(l * BS, &fill(round, l)).unwrap();
                    }
                }
            })
        })
        .collect();
    let mut reused_any = false;
    while threads.iter().any(|t| !t.is_finished()) {
        // Only durable states may be given up beside writers.
        img.flush().unwrap();
        let keep = img.durable_seq();
        let plan = img.plan_reclaim(keep, &[]).unwrap();
        if plan.blocks > 0 {
            let ticket = img.commit_reclaim_unsynced(&plan).unwrap();
            img.sync_journal().unwrap();
            assert!(img.is_durable(ticket));
            reused_any |= img.reuse_reclaimed(&plan.runs).unwrap() > 0;
        }
        // Offering everything again while writes are in flight (the rule that keeps a slot a
        // writer holds from being handed out twice is pinned by freelist.rs's unit test; the
        // race window here is too short to hit reliably).
        img.reuse_all_reclaimed().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(reused_any);
    assert!(rc::disk(&img) == disk_of(blocks, 29));
    let img = std::sync::Arc::try_unwrap(img).ok().unwrap();
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.problems.is_empty(), "{:?}", rep.problems);
}

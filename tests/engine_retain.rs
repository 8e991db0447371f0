//! Reclaim on an image that is in use: plans of one open image continue from where the last
//! one stopped and give the same answer as a plan from scratch, and reclaims running while
//! other threads write never take a block the current state needs.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::image::create_image;
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use rr_row::image::{Image, OpenMode};
use rr_row::units::Seq;

const SIZE: u64 = 4 << 20;

fn scribble(img: &Image, rng: &mut StdRng, n: usize) {
    let blocks = SIZE / 4096;
    for _ in 0..n {
        let b = rng.gen_range(0..blocks);
        let len = rng.gen_range(1..=4u64).min(blocks - b);
        let mut data = vec![0u8; (len * 4096) as usize];
        rng.fill_bytes(&mut data);
        img.write_at(b * 4096, &data).unwrap();
        if rng.gen_ratio(1, 20) {
            img.discard(b * 4096, 4096).unwrap();
        }
    }
}

#[test]
fn a_plan_continued_from_the_last_one_equals_a_plan_from_scratch() {
    let d = common::tempdir();
    let p = d.path().join("i.rrow");
    let img = create_image(&p, SIZE, 4096);
    let mut rng = StdRng::seed_from_u64(11);
    scribble(&img, &mut rng, 3000);
    let h1 = Seq(img.seq().0 - 500);
    img.reclaim(h1, &[], &mut |_, _| {}).unwrap();
    for round in 0..3 {
        scribble(&img, &mut rng, 1500);
        // A dry plan first: it moves the cursor without reclaiming.
        let h = Seq(img.seq().0 - 300 * (round + 1));
        let continued = img.plan_reclaim(Seq(h.0 - 50), &[]).unwrap();
        let continued2 = img.plan_reclaim(h, &[]).unwrap();
        img.flush().unwrap();
        let fresh = Image::open(&p, OpenMode::ReadOnly)
            .unwrap()
            .plan_reclaim(h, &[])
            .unwrap();
        assert_eq!(continued2.runs, fresh.runs, "round {round}");
        assert!(continued2.blocks >= continued.blocks);
        img.commit_reclaim(&continued2).unwrap();
        img.punch_reclaimed(&continued2, &mut |_, _| {}).unwrap();
    }
    // A keep-from older than the cursor is planned from scratch: nothing new to give back.
    let back = img.plan_reclaim(h1, &[]).unwrap();
    assert_eq!(back.blocks, 0);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
}

#[test]
fn reclaims_racing_writers_never_take_live_blocks() {
    let d = common::tempdir();
    let p = d.path().join("race.rrow");
    let img = Arc::new(create_image(&p, SIZE, 4096));
    let blocks = SIZE / 4096;
    let stop = Arc::new(AtomicBool::new(false));
    let reclaimer = {
        let (img, stop) = (img.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                let seq = img.seq().0;
                if seq > 200 {
                    let r = img.reclaim(Seq(seq - 100), &[], &mut |_, _| {}).unwrap();
                    n += u64::from(r.plan.blocks > 0);
                }
            }
            n
        })
    };
    // Two writers, each owning half of the disk, so each knows its half's current content.
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let img = img.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(w);
                let half = blocks / 2;
                let mut model = vec![0u8; (half * 4096) as usize];
                for _ in 0..6000 {
                    let b = rng.gen_range(0..half);
                    let blk = &mut model[(b * 4096) as usize..((b + 1) * 4096) as usize];
                    rng.fill_bytes(blk);
                    img.write_at((w * half + b) * 4096, blk).unwrap();
                }
                model
            })
        })
        .collect();
    let models: Vec<Vec<u8>> = writers.into_iter().map(|t| t.join().unwrap()).collect();
    stop.store(true, Ordering::SeqCst);
    let reclaims = reclaimer.join().unwrap();
    assert!(reclaims > 0, "no reclaim ran while the writers wrote");
    let mut got = vec![0u8; SIZE as usize];
    img.read_at(0, &mut got).unwrap();
    assert!(got == models.concat(), "a reclaim took live data");
    let img = Arc::try_unwrap(img).ok().unwrap();
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert!(rep.is_clean(), "{:?}", rep.problems);
    assert!(rep.reclaimed_blocks > 0);
}

#[test]
fn a_reclaim_with_nothing_to_give_back_leaves_the_image_as_older_builds_read_it() {
    let d = common::tempdir();
    let p = d.path().join("noop.rrow");
    let img = create_image(&p, SIZE, 4096);
    // Every block written once: no version is superseded.
    for b in 0..SIZE / 4096 {
        img.write_at(b * 4096, &[b as u8; 4096]).unwrap();
    }
    let rep = img.reclaim(img.seq(), &[], &mut |_, _| {}).unwrap();
    assert_eq!(rep.plan.blocks, 0);
    assert_eq!(rep.horizon, 0);
    assert_eq!(img.history_horizon(), Seq(0));
    // Every state is still there.
    assert!(img.state_at(Seq(1)).is_ok());
    img.close().unwrap();
    let hdr = common::reclaim::current_header(&std::fs::read(&p).unwrap());
    assert_eq!(
        hdr.incompat, 0,
        "the reclaim feature bit was set for nothing"
    );
}

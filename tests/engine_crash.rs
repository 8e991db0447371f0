//! Crash consistency of the image engine.
//!
//! (a) The journal cut at every record boundary and inside every record (the bytes after the
//!     cut never reached the disk): the image opens at exactly the last complete record, which
//!     is at or after the last flush.
//! (b) Power cut: starting from the file as it was right after a flush, an arbitrary subset of
//!     the pages written later reaches the disk: the image opens at a state equal to the model
//!     at some seq >= that flush.
//! (c) Stale records beyond a torn tail are never applied, even when the zeroing of the tail
//!     after recovery never reached the disk.
//! (d) Truncating the whole file anywhere: open and reads fail cleanly or show a model state.

mod common;

use common::image::create_image;
use rand::{Rng, SeedableRng};
use rr_row::image::{Image, ImageError, OpenMode};
use rr_row::units::Seq;

const BS: u64 = 4096;
const SIZE: u64 = 64 * BS;
const SEG0: u64 = 64 * 1024;

struct Run {
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    snaps: Vec<Vec<u8>>,
    /// Seq at each flush, and the file bytes right after it.
    flushes: Vec<(u64, Vec<u8>)>,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len).map(|_| r.gen()).collect()
}

/// A workload of full-block and sub-block writes, discards and write-zeroes, with flushes.
fn workload(seed: u64, ops: usize, checkpoint_at: Option<usize>) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.rrow");
    let img = create_image(&path, SIZE, BS as u32);
    img.set_checkpoint_threshold(u64::MAX);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; SIZE as usize];
    let mut snaps = vec![model.clone()];
    let mut flushes = vec![(0, std::fs::read(&path).unwrap())];
    for i in 0..ops {
        if Some(i) == checkpoint_at {
            img.flush().unwrap();
            img.checkpoint().unwrap();
        }
        let sectors = SIZE / 512;
        let off = rng.gen_range(0..sectors);
        let len = rng.gen_range(1..=(sectors - off).min(24));
        let (o, l) = (off * 512, len * 512);
        match rng.gen_range(0..10) {
            0..=3 => {
                let b = rng.gen_range(0..SIZE / BS);
                let n = rng.gen_range(1..=(SIZE / BS - b).min(3));
                let data = pattern(rng.gen(), (n * BS) as usize);
                img.write_at(b * BS, &data).unwrap();
                model[(b * BS) as usize..((b + n) * BS) as usize].copy_from_slice(&data);
            }
            4..=6 => {
                let data = pattern(rng.gen(), l as usize);
                img.write_at(o, &data).unwrap();
                model[o as usize..(o + l) as usize].copy_from_slice(&data);
            }
            7 => {
                img.discard(o, l).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
            _ => {
                img.write_zeroes(o, l).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
            }
        }
        snaps.push(model.clone());
        if rng.gen_range(0..5) == 0 {
            img.flush().unwrap();
            flushes.push((snaps.len() as u64 - 1, std::fs::read(&path).unwrap()));
        }
    }
    // Dropping writes the buffered records out (a clean shutdown without a checkpoint).
    drop(img);
    Run {
        dir,
        path,
        snaps,
        flushes,
    }
}

/// (offset in file, length, kind, seq) of every record of journal segment 0.
fn records(file: &[u8]) -> Vec<(u64, u64, u8, u64)> {
    let mut out = Vec::new();
    let mut pos = SEG0 + 64;
    loop {
        let p = pos as usize;
        let len = u32::from_le_bytes(file[p..p + 4].try_into().unwrap()) as u64;
        if len == 0 {
            break;
        }
        let kind = file[p + 4];
        let seq = u64::from_le_bytes(file[p + 8..p + 16].try_into().unwrap());
        out.push((pos, len, kind, seq));
        pos += len;
    }
    out
}

/// Opens `bytes` as an image (read-only) and returns its seq after checking the whole disk
/// equals the model at that seq.
fn open_state(dir: &std::path::Path, bytes: &[u8], snaps: &[Vec<u8>]) -> u64 {
    let p = dir.join("cut.rrow");
    std::fs::write(&p, bytes).unwrap();
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    let s = img.seq().0;
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(0, &mut buf).unwrap();
    assert!(
        buf == snaps[s as usize],
        "state at seq {s} differs from the model"
    );
    s
}

#[test]
fn journal_cut_at_every_record_boundary_and_inside_records() {
    let run = workload(1, 60, None);
    let file = std::fs::read(&run.path).unwrap();
    let recs = records(&file);
    assert!(recs.len() > 60, "{} records", recs.len());
    let seg_end = (SEG0 + 1024 * 1024) as usize;
    let mut cuts = Vec::new();
    for &(pos, len, _, _) in &recs {
        for c in [pos, pos + 1, pos + len / 2, pos + len - 1] {
            cuts.push(c);
        }
    }
    let last = recs.last().unwrap();
    cuts.push(last.0 + last.1);
    for cut in cuts {
        let mut f = file.clone();
        f[cut as usize..seg_end].fill(0);
        // The last state-changing record the cut left intact (the bytes it zeroed may have
        // been zeros already, e.g. the top byte of a crc).
        let intact = |r: &&(u64, u64, u8, u64)| {
            r.0 + r.1 <= cut
                || file[cut as usize..(r.0 + r.1) as usize]
                    .iter()
                    .all(|&b| b == 0)
        };
        let complete = recs
            .iter()
            .filter(|r| intact(r) && (1..=3).contains(&r.2))
            .map(|r| r.3)
            .max()
            .unwrap_or(0);
        let s = open_state(run.dir.path(), &f, &run.snaps);
        assert_eq!(s, complete, "cut at {cut}");
    }
}

#[test]
fn journal_cut_before_a_checkpoint_is_detected_by_check() {
    let run = workload(2, 40, Some(20));
    let file = std::fs::read(&run.path).unwrap();
    let recs = records(&file);
    // A cut inside the part of the journal the checkpoint covers: open uses the checkpoint
    // (the state at the checkpoint, seq 20) but check reports the damaged history.
    let cut = recs.iter().find(|r| r.3 == 5).unwrap().0 + 3;
    let mut f = file.clone();
    f[cut as usize..(SEG0 + 1024 * 1024) as usize].fill(0);
    let s = open_state(run.dir.path(), &f, &run.snaps);
    assert_eq!(s, 20);
    let r = Image::check(&run.dir.path().join("cut.rrow"), false).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:?}");
}

#[test]
fn power_cut_keeps_a_state_at_or_after_the_last_flush() {
    let run = workload(3, 50, None);
    let fin = std::fs::read(&run.path).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(33);
    let mut seen = std::collections::BTreeSet::new();
    // Between one flush and the next, any subset of the pages written may reach the disk;
    // the next flush's fdatasync then makes all of them durable.
    for (k, (flush_seq, at_flush)) in run.flushes.iter().enumerate() {
        let fin = run.flushes.get(k + 1).map_or(&fin, |(_, f)| f);
        for trial in 0..40 {
            let mut f = vec![0u8; fin.len()];
            let keep_p: f64 = [0.0, 0.5, 0.9, 1.0][trial % 4];
            for (i, page) in fin.chunks(4096).enumerate() {
                let start = i * 4096;
                let old = at_flush.get(start..(start + page.len()).min(at_flush.len()));
                let dst = &mut f[start..start + page.len()];
                if rng.gen_bool(keep_p) {
                    dst.copy_from_slice(page);
                } else if let Some(o) = old {
                    dst[..o.len()].copy_from_slice(o);
                }
            }
            let s = open_state(run.dir.path(), &f, &run.snaps);
            assert!(
                s >= *flush_seq,
                "recovered seq {s} is before the last flush at seq {flush_seq}"
            );
            seen.insert(s);
        }
    }
    // The trials reach more than one state (the test exercises dropped tails).
    assert!(seen.len() > run.flushes.len(), "{seen:?}");
}

#[test]
fn stale_records_beyond_a_torn_tail_are_never_applied() {
    let run = workload(4, 30, None);
    let crashed = std::fs::read(&run.path).unwrap();
    let recs = records(&crashed);
    let last_flush = recs.iter().rposition(|r| r.2 == 4).unwrap();
    // Tear the first record after the last flush marker (one byte of its payload).
    let torn = recs[last_flush + 1];
    assert!((1..=3).contains(&torn.2));
    let mut f = crashed.clone();
    f[(torn.0 + 20) as usize] ^= 0xff;
    std::fs::write(&run.path, &f).unwrap();
    let before = torn.3 - 1;
    // Recover read-write and write one new record over the torn one.
    let img = Image::open(&run.path, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.seq(), Seq(before));
    let data = pattern(99, BS as usize);
    img.write_at(0, &data).unwrap();
    drop(img);
    let mut after = std::fs::read(&run.path).unwrap();
    let new = records(&after);
    let end = new.last().unwrap().0 + new.last().unwrap().1;
    // Undo the zeroing of the stale tail, as if it never reached the disk.
    after[end as usize..(SEG0 + 1024 * 1024) as usize]
        .copy_from_slice(&f[end as usize..(SEG0 + 1024 * 1024) as usize]);
    assert!(after[end as usize..end as usize + 64]
        .iter()
        .any(|&b| b != 0));
    let p = run.dir.path().join("stale.rrow");
    std::fs::write(&p, &after).unwrap();
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(before + 1));
    let mut expect = run.snaps[before as usize].clone();
    expect[..BS as usize].copy_from_slice(&data);
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf == expect);
}

#[test]
fn a_damaged_record_before_a_flush_marker_is_corruption() {
    let run = workload(5, 30, None);
    let file = std::fs::read(&run.path).unwrap();
    let recs = records(&file);
    let first_flush = recs.iter().position(|r| r.2 == 4).unwrap();
    let victim = recs[..first_flush]
        .iter()
        .rfind(|r| (1..=3).contains(&r.2))
        .unwrap();
    let mut f = file.clone();
    f[(victim.0 + 24) as usize] ^= 0x40;
    std::fs::write(&run.path, &f).unwrap();
    match Image::open(&run.path, OpenMode::ReadOnly) {
        Err(ImageError::Corrupt { offset, .. }) => assert_eq!(offset, victim.0),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a damaged durable record was accepted"),
    }
    // The image is untouched by the failed open; check --repair rolls back loudly.
    assert_eq!(std::fs::read(&run.path).unwrap(), f);
    let r = Image::check(&run.path, false).unwrap();
    assert_eq!(r.exit_code(), 2);
    assert_eq!(std::fs::read(&run.path).unwrap(), f);
    let r = Image::check(&run.path, true).unwrap();
    assert_eq!(r.exit_code(), 3, "{r:?}");
    let img = Image::open(&run.path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(victim.3 - 1));
}

#[test]
fn truncated_files_fail_cleanly_or_show_a_model_state() {
    let run = workload(6, 20, None);
    let file = std::fs::read(&run.path).unwrap();
    let p = run.dir.path().join("t.rrow");
    let mut cuts: Vec<usize> = vec![0, 7, 8, 100, 4095, 4096, 4100, 8191, 8192, 65536, 65600];
    cuts.extend((0..20).map(|i| 65536 + i * 64 * 1024));
    cuts.extend((0..20).map(|i| file.len() - i * 3000));
    for cut in cuts {
        let cut = cut.min(file.len());
        std::fs::write(&p, &file[..cut]).unwrap();
        match Image::open(&p, OpenMode::ReadOnly) {
            Err(e) => {
                let msg = e.to_string();
                assert!(!msg.is_empty() && !msg.contains('\n'), "{msg}");
            }
            Ok(img) => {
                let mut buf = vec![0u8; SIZE as usize];
                match img.read_at(0, &mut buf) {
                    Ok(_) => assert!(run.snaps.contains(&buf), "cut at {cut}"),
                    Err(e) => assert!(matches!(e, ImageError::Truncated { .. }), "{e}"),
                }
            }
        }
    }
}

/// Builds W1, W2 (no flush), then appends by hand a flush marker vouching for `marker_seq`,
/// as a flush that synced after W1 but appended its marker after W2 would.
fn two_writes_then_marker(marker_seq: u64) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    use rr_row::image::format::{encode_record, RecKind, Record};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rrow");
    let img = create_image(&path, SIZE, BS as u32);
    img.write_at(0, &[1u8; BS as usize]).unwrap();
    img.write_at(BS, &[2u8; BS as usize]).unwrap();
    drop(img);
    let mut f = std::fs::read(&path).unwrap();
    let recs = records(&f);
    let (pos, len, _, _) = *recs.iter().filter(|r| r.2 == 1).nth(1).unwrap();
    let end = (pos + len) as usize;
    let prev = u32::from_le_bytes(f[end - 4..end].try_into().unwrap());
    let (marker, _) = encode_record(
        &Record {
            kind: RecKind::Flush,
            seq: marker_seq,
            pieces: Vec::new(),
            link: None,
            nonce: None,
            reclaim: None,
        },
        prev,
    );
    f[end..end + marker.len()].copy_from_slice(&marker);
    std::fs::write(&path, &f).unwrap();
    (dir, path, f)
}

#[test]
fn a_flush_marker_vouches_only_for_the_seq_it_names() {
    // The marker after W2 names seq 1: W2 is still verified against its data.
    let (_d, path, mut f) = two_writes_then_marker(1);
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(2));
    drop(img);
    // W2's data block never reached the disk: W2 is dropped although a marker follows it.
    let w2_data = f.len() - BS as usize;
    f[w2_data..].fill(0);
    std::fs::write(&path, &f).unwrap();
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(1));
    let mut b = vec![0u8; (2 * BS) as usize];
    img.read_at(0, &mut b).unwrap();
    assert!(b[..BS as usize].iter().all(|&x| x == 1));
    assert!(b[BS as usize..].iter().all(|&x| x == 0));
}

#[test]
fn a_torn_record_is_damage_only_if_a_marker_vouches_for_it() {
    for (marker_seq, damaged) in [(1u64, false), (2, true)] {
        let (_d, path, mut f) = two_writes_then_marker(marker_seq);
        let w2 = *records(&f).iter().filter(|r| r.2 == 1).nth(1).unwrap();
        f[(w2.0 + 30) as usize] ^= 0x08;
        std::fs::write(&path, &f).unwrap();
        match Image::open(&path, OpenMode::ReadOnly) {
            Ok(img) => {
                assert!(!damaged, "marker {marker_seq}: damage accepted");
                assert_eq!(img.seq(), Seq(1));
            }
            Err(ImageError::Corrupt { offset, .. }) => {
                assert!(damaged, "marker {marker_seq}: torn tail refused");
                assert_eq!(offset, w2.0);
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

#[test]
fn flushes_concurrent_with_writes_keep_every_flushed_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cf.rrow");
    let img = create_image(&path, SIZE, BS as u32);
    let flushed = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let start = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            start.wait();
            for i in 0..400u64 {
                img.write_at((i % 64) * BS, &[(i % 251) as u8; BS as usize])
                    .unwrap();
                if i % 50 == 0 {
                    std::thread::yield_now();
                }
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        s.spawn(|| {
            start.wait();
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let before = img.seq().0;
                img.flush().unwrap();
                flushed.store(before, std::sync::atomic::Ordering::SeqCst);
            }
        });
    });
    let at_last_flush = flushed.load(std::sync::atomic::Ordering::SeqCst);
    drop(img);
    // Markers may name a seq older than records before them; recovery still gets everything.
    let f = std::fs::read(&path).unwrap();
    let recs = records(&f);
    assert!(recs.iter().any(|r| r.2 == 4));
    let vouched = recs.iter().filter(|r| r.2 == 4).map(|r| r.3).max().unwrap();
    assert!(vouched >= at_last_flush, "{vouched} < {at_last_flush}");
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(400));
    drop(img);
    assert!(Image::check(&path, false).unwrap().is_clean());
    // Lose everything after the last marker: the last flush's writes survive.
    let last = recs.iter().rfind(|r| r.2 == 4).unwrap();
    let mut cut = f.clone();
    cut[(last.0 + last.1) as usize..(SEG0 + 1024 * 1024) as usize].fill(0);
    std::fs::write(&path, &cut).unwrap();
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert!(img.seq().0 >= at_last_flush);
}

#[test]
fn a_crash_right_after_a_segment_roll_recovers_and_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("roll.rrow");
    let blocks = 256u64;
    let img = create_image(&path, blocks * 512, 512);
    // 60-byte write records: segment 0 (1 MiB) fills after about 17 400 of them.
    let n = 17_600u64;
    let value = |i: u64| ((i * 7) % 251) as u8;
    for i in 0..n {
        img.write_at((i % blocks) * 512, &[value(i); 512]).unwrap();
    }
    img.flush().unwrap();
    drop(img);
    let f = std::fs::read(&path).unwrap();
    let recs = records(&f);
    let link = *recs.iter().find(|r| r.2 == 5).expect("segment 0 is linked");
    let p = (link.0 + 16) as usize;
    let slot = u64::from_le_bytes(f[p..p + 8].try_into().unwrap());
    let at_link = link.3;
    assert!(at_link < n);
    let state = |seq: u64| {
        let mut m = vec![0u8; (blocks * 512) as usize];
        for i in 0..seq {
            let o = ((i % blocks) * 512) as usize;
            m[o..o + 512].fill(value(i));
        }
        m
    };
    // The new segment never reached the disk.
    let seg = (SEG0 + slot * 512) as usize;
    let mut cut = f.clone();
    cut[seg..seg + (1 << 20)].fill(0);
    std::fs::write(&path, &cut).unwrap();
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(at_link));
    let mut buf = vec![0u8; (blocks * 512) as usize];
    img.read_at(0, &mut buf).unwrap();
    assert!(buf == state(at_link));
    drop(img);
    // A read-write open rewrites the segment and goes on appending in it.
    let img = Image::open(&path, OpenMode::ReadWrite).unwrap();
    img.write_at(0, &[0xaa; 512]).unwrap();
    img.flush().unwrap();
    drop(img);
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(at_link + 1));
    let mut want = state(at_link);
    want[..512].fill(0xaa);
    img.read_at(0, &mut buf).unwrap();
    assert!(buf == want);
    drop(img);
    assert!(Image::check(&path, false).unwrap().is_clean());
}

#[test]
fn a_guest_that_never_flushes_still_gets_durable_points() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nf.rrow");
    let img = create_image(&path, SIZE, BS as u32);
    img.set_unsynced_limit(4 * BS);
    for i in 0..20u64 {
        img.write_at(i * BS, &[i as u8 + 1; BS as usize]).unwrap();
    }
    drop(img);
    let f = std::fs::read(&path).unwrap();
    let recs = records(&f);
    let markers: Vec<u64> = recs.iter().filter(|r| r.2 == 4).map(|r| r.3).collect();
    assert_eq!(markers, vec![4, 8, 12, 16, 20]);
    // Losing everything after the fourth marker keeps seq 16.
    let m = recs.iter().filter(|r| r.2 == 4).nth(3).unwrap();
    let mut cut = f.clone();
    cut[(m.0 + m.1) as usize..(SEG0 + 1024 * 1024) as usize].fill(0);
    std::fs::write(&path, &cut).unwrap();
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    assert_eq!(img.seq(), Seq(16));
}

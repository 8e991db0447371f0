//! The engine's performance features keep every guarantee: relocation on read (content, seq,
//! history, old block ids, `state_at`, crash recovery and `check` unchanged) and preallocation
//! ahead of the allocation counter (content and recovery unchanged), and dropping superseded
//! versions from the page cache (they leave the cache; content and history unchanged).

mod common;

use std::time::Duration;

use common::wait_until;
use rand::{Rng, SeedableRng};
use rr_row::image::{CreateOptions, Extent, Image, OpenMode};
use rr_row::units::{BlockSize, Lba, Pba, Seq};

const BS: usize = 4096;
const BLOCKS: usize = 256;

fn create(p: &std::path::Path) -> Image {
    Image::create(
        p,
        &CreateOptions {
            size: (BLOCKS * BS) as u64,
            block_size: BlockSize::DEFAULT,
            base: None,
        },
    )
    .unwrap()
}

/// Fills the disk sequentially, then overwrites random single blocks (so every range is
/// physically fragmented); returns the expected content.
fn fragment(img: &Image, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut model = vec![0u8; BLOCKS * BS];
    rng.fill(&mut model[..]);
    img.write_at(0, &model).unwrap();
    for _ in 0..BLOCKS {
        let b = rng.gen_range(0..BLOCKS);
        let blk = &mut model[b * BS..(b + 1) * BS];
        rng.fill(blk);
        img.write_at((b * BS) as u64, blk).unwrap();
    }
    model
}

fn mapped_runs(img: &Image, lba: u64, n: u64) -> usize {
    img.resolve(Lba(lba), n)
        .unwrap()
        .iter()
        .filter(|e| matches!(e, Extent::Mapped { .. }))
        .count()
}

#[test]
fn relocation_on_read_keeps_content_seq_history_and_old_blocks() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.rrow");
    let img = create(&p);
    let model = fragment(&img, 1);
    img.flush().unwrap();
    let seq = img.seq();
    let before = img.resolve(Lba(0), BLOCKS as u64).unwrap();
    let hist: Vec<_> = (0..BLOCKS as u64)
        .map(|l| img.history(Lba(l)).unwrap())
        .collect();
    assert!(mapped_runs(&img, 32, 32) >= 4, "the setup must fragment");

    img.set_relocate_on_read(Some(4));
    // A 128 KiB read, not block-aligned at its start, in two segments.
    let mut a = vec![0u8; 512 * 3];
    let mut b = vec![0u8; 32 * BS - 512 * 3];
    let off = 32 * BS + 512 * 3;
    let len = a.len() + b.len();
    let ret = img
        .read_vectored(
            off as u64,
            &[
                rr_row::iobuf::IoSeg::from_mut_slice(&mut a),
                rr_row::iobuf::IoSeg::from_mut_slice(&mut b),
            ],
            None,
        )
        .unwrap();
    assert_eq!(ret, seq);
    assert_eq!([a, b].concat(), &model[off..off + len]);
    // The blocks the read touched (32..65) are now one contiguous run.
    assert_eq!(mapped_runs(&img, 32, 33), 1);
    assert_eq!(img.seq(), seq, "a relocation takes no seq");

    // Read everything (relocating as it goes) and compare.
    let mut all = vec![0u8; BLOCKS * BS];
    for c in all.chunks_mut(32 * BS).enumerate() {
        img.read_at((c.0 * 32 * BS) as u64, c.1).unwrap();
    }
    assert_eq!(all, model);
    assert!(mapped_runs(&img, 0, BLOCKS as u64) <= BLOCKS / 32 + 2);

    // History is unchanged (relocations are not versions); old block ids keep their data.
    for (l, h) in hist.iter().enumerate() {
        assert_eq!(&img.history(Lba(l as u64)).unwrap(), h);
    }
    let mut blk = vec![0u8; BS];
    let mut lba = 0usize;
    for e in &before {
        let Extent::Mapped { pba, blocks } = *e else {
            panic!("unexpected extent {e:?}");
        };
        for i in 0..blocks {
            img.read_block(Pba(pba.0 + i), &mut blk).unwrap();
            assert_eq!(blk, model[lba * BS..(lba + 1) * BS]);
            lba += 1;
        }
    }
    // The disk as of an earlier seq still reads as it did.
    let snap = img.state_at(Seq(1)).unwrap();
    let mut s = vec![0u8; BLOCKS * BS];
    snap.read_at(0, &mut s).unwrap();
    let mut img2 = vec![0u8; BLOCKS * BS];
    img.state_at(seq).unwrap().read_at(0, &mut img2).unwrap();
    assert_eq!(img2, model);
    assert_ne!(s, model, "seq 1 is the prefill, before the overwrites");
    drop(snap); // a snapshot shares the open file (and its lock)

    // Survives a clean close and a reopen, and check is clean.
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.seq(), seq);
    assert!(mapped_runs(&img, 0, BLOCKS as u64) <= BLOCKS / 32 + 2);
    let mut again = vec![0u8; BLOCKS * BS];
    img.read_at(0, &mut again).unwrap();
    assert_eq!(again, model);
}

#[test]
fn relocation_whose_data_never_reached_the_disk_is_dropped_by_recovery() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.rrow");
    let img = create(&p);
    let model = fragment(&img, 2);
    img.flush().unwrap();
    let seq = img.seq();
    img.set_relocate_on_read(Some(2));
    let mut buf = vec![0u8; 64 * BS];
    img.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, model[..64 * BS]);
    assert_eq!(mapped_runs(&img, 0, 64), 1);
    let Extent::Mapped { pba, .. } = img.resolve(Lba(0), 1).unwrap()[0] else {
        panic!("not mapped");
    };
    // Write the journal out (as a reader walking it would), then "lose" the relocated data:
    // a power cut after the record but before the data reached the disk.
    img.history(Lba(0)).unwrap();
    drop(img);
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::os::unix::fs::FileExt;
    let off = 65536 + pba.0 * BS as u64;
    f.write_all_at(&vec![0u8; 64 * BS], off).unwrap();
    drop(f);

    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.seq(), seq, "a flushed write is never lost");
    let mut all = vec![0u8; BLOCKS * BS];
    img.read_at(0, &mut all).unwrap();
    assert_eq!(all, model, "the unverifiable relocation was dropped");
    assert!(mapped_runs(&img, 0, 64) > 1);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

#[test]
fn relocation_yields_to_a_concurrent_change() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("w.rrow");
    let img = std::sync::Arc::new(create(&p));
    let model = std::sync::Mutex::new(fragment(&img, 3));
    img.set_relocate_on_read(Some(2));
    std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut rng = rand::rngs::StdRng::seed_from_u64(9);
            for _ in 0..400 {
                let b = rng.gen_range(0..BLOCKS);
                let mut m = model.lock().unwrap();
                let blk = &mut m[b * BS..(b + 1) * BS];
                rng.fill(blk);
                img.write_at((b * BS) as u64, blk).unwrap();
            }
        });
        let mut buf = vec![0u8; 16 * BS];
        for i in 0..400 {
            img.read_at(((i % 16) * 16 * BS) as u64, &mut buf).unwrap();
        }
        writer.join().unwrap();
    });
    let mut all = vec![0u8; BLOCKS * BS];
    img.read_at(0, &mut all).unwrap();
    assert_eq!(all, *model.lock().unwrap());
    assert_eq!(img.seq(), Seq(1 + BLOCKS as u64 + 400));
    std::sync::Arc::into_inner(img).unwrap().close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

#[test]
fn read_only_images_never_relocate() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("ro.rrow");
    let img = create(&p);
    let model = fragment(&img, 4);
    img.close().unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    img.set_relocate_on_read(Some(2));
    img.set_preallocate(1 << 20, true).unwrap();
    let mut all = vec![0u8; BLOCKS * BS];
    img.read_at(0, &mut all).unwrap();
    assert_eq!(all, model);
    assert!(mapped_runs(&img, 0, BLOCKS as u64) > BLOCKS / 4);
    drop(img);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
}

/// Preallocation reserves the file ahead of the allocation counter (the default), or with
/// `cache` also reads it into the page cache; either way the content, a reopen after a crash
/// and `check` are unchanged.
fn preallocation_changes_nothing_but_the_file_length(cache: bool) {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("p.rrow");
    let img = create(&p);
    img.set_preallocate(8 << 20, cache).unwrap();
    let model = fragment(&img, 5);
    // The thread works in the background: wait (bounded) until it has extended the file.
    // Without it the file ends near 3 MiB (1 MiB journal segment, 2 MiB of data blocks).
    assert!(
        wait_until(Duration::from_secs(30), || std::fs::metadata(&p)
            .unwrap()
            .len()
            >= 8 << 20),
        "preallocation never happened"
    );
    // The last MiB of the file lies past every written slot: only the cached mode reads it
    // into the page cache (readahead may complete after the call returns).
    let len = std::fs::metadata(&p).unwrap().len();
    let tail = len - (1 << 20);
    if cache {
        assert!(
            wait_until(Duration::from_secs(30), || resident_pages(
                &p,
                tail,
                1 << 20
            ) > 0),
            "the reserved range never entered the page cache"
        );
    } else {
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            resident_pages(&p, tail, 1 << 20),
            0,
            "reserving read the range into the page cache"
        );
    }
    let seq = img.seq();
    let mut all = vec![0u8; BLOCKS * BS];
    img.read_at(0, &mut all).unwrap();
    assert_eq!(all, model);
    img.flush().unwrap();
    // A crash (no close): recovery ignores the prepared zeros past the allocation counter.
    drop(img);
    let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
    assert_eq!(img.seq(), seq);
    img.read_at(0, &mut all).unwrap();
    assert_eq!(all, model);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

#[test]
fn preallocation_reserves_ahead_and_changes_nothing_else() {
    preallocation_changes_nothing_but_the_file_length(false);
}

#[test]
fn preallocation_with_cached_pages_changes_nothing_else() {
    preallocation_changes_nothing_but_the_file_length(true);
}

/// How many of the file's pages in `[off, off + len)` are in the page cache (mincore over a
/// read-only shared mapping).
fn resident_pages(path: &std::path::Path, off: u64, len: usize) -> usize {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: sysconf has no memory arguments.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    assert_eq!(off as usize % page, 0);
    // SAFETY: a fresh read-only shared mapping of an open file; it is unmapped below and never
    // read through (mincore only asks the kernel about residency).
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            off as libc::off_t,
        )
    };
    assert_ne!(addr, libc::MAP_FAILED);
    let mut vec = vec![0u8; len.div_ceil(page)];
    // SAFETY: addr/len is the mapping made above; vec has one byte per page of it.
    let r = unsafe { libc::mincore(addr, len, vec.as_mut_ptr()) };
    // SAFETY: unmaps exactly the mapping made above.
    unsafe { libc::munmap(addr, len) };
    assert_eq!(r, 0);
    vec.iter().filter(|b| *b & 1 != 0).count()
}

#[test]
fn superseded_versions_leave_the_page_cache_and_keep_their_content() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.rrow");
    let img = create(&p);
    img.set_drop_superseded(true).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut v1 = vec![0u8; BLOCKS * BS];
    rng.fill(&mut v1[..]);
    let w1 = img.write_at(0, &v1).unwrap();
    img.flush().unwrap();
    let old_off = rr_row::image::format::DATA_OFFSET + w1.first_pba.0 * BS as u64;
    assert_eq!(
        resident_pages(&p, old_off, v1.len()),
        BLOCKS,
        "a buffered write leaves its pages cached"
    );
    // Overwrite everything (in 4 writes of 256 KiB: runs large enough to be dropped), sync.
    let mut v2 = vec![0u8; BLOCKS * BS];
    rng.fill(&mut v2[..]);
    for (i, c) in v2.chunks(BLOCKS * BS / 4).enumerate() {
        img.write_at((i * c.len()) as u64, c).unwrap();
    }
    img.flush().unwrap();
    // The dropping thread runs on its own schedule (at most 200 ms after a sync).
    wait_until(Duration::from_secs(10), || {
        img.dropped_from_cache().1 >= BLOCKS as u64
    });
    assert_eq!(
        img.dropped_from_cache().1,
        BLOCKS as u64,
        "every superseded block dropped"
    );
    assert_eq!(
        resident_pages(&p, old_off, v1.len()),
        0,
        "superseded versions still cached"
    );
    // Nothing changed: the live data, the old versions by block id, and the past state.
    let mut got = vec![0u8; v2.len()];
    img.read_at(0, &mut got).unwrap();
    assert!(got == v2);
    let mut blk = vec![0u8; BS];
    for b in [0usize, 17, BLOCKS - 1] {
        img.read_block(Pba(w1.first_pba.0 + b as u64), &mut blk)
            .unwrap();
        assert!(
            blk[..] == v1[b * BS..(b + 1) * BS],
            "old version of block {b}"
        );
    }
    let snap = img.state_at(w1.seq).unwrap();
    snap.read_at(0, &mut got).unwrap();
    assert!(got == v1);
    drop(snap);
    img.close().unwrap();
    let rep = Image::check(&p, false).unwrap();
    assert_eq!(rep.status, "clean", "{:?}", rep.problems);
}

#[test]
fn small_scattered_superseded_versions_are_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.rrow");
    let img = create(&p);
    img.set_drop_superseded(true).unwrap();
    let model = fragment(&img, 9);
    img.flush().unwrap();
    // A single 4 KiB overwrite supersedes one block: below the size worth a system call.
    img.write_at(0, &[1u8; BS]).unwrap();
    img.flush().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let mut got = vec![0u8; model.len()];
    img.read_at(0, &mut got).unwrap();
    assert!(got[..BS].iter().all(|&b| b == 1) && got[BS..] == model[BS..]);
    assert_eq!(img.dropped_from_cache(), (0, 0));
}

/// Writes `n` 64 KiB chunks of distinct bytes from the start of the disk.
fn write_chunks(img: &Image, n: usize, tag: u8) {
    for i in 0..n {
        let chunk = vec![tag.wrapping_add(i as u8); 16 * BS];
        img.write_at((i * 16 * BS) as u64, &chunk).unwrap();
    }
}

#[test]
fn the_periodic_sync_runs_inline_unless_deferred() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(&dir.path().join("a.img"));
    img.set_unsynced_limit(256 * 1024);
    // Inline (the default): the write that crosses 256 KiB syncs before it returns.
    write_chunks(&img, 4, 1);
    assert_eq!(img.durable_seq(), Seq(4), "the 4th 64 KiB write synced");
    // Nobody is waiting for due syncs: wait_sync_due returns at once and runs nothing.
    assert!(!img.wait_sync_due(Duration::from_secs(60)).unwrap());

    // Deferred: crossing the limit only asks ...
    img.set_deferred_sync(true);
    write_chunks(&img, 5, 2);
    assert_eq!(img.durable_seq(), Seq(4), "no write synced by itself");
    // ... and the background caller runs it.
    assert!(img.wait_sync_due(Duration::ZERO).unwrap());
    assert_eq!(img.durable_seq(), Seq(9));
    assert!(
        !img.wait_sync_due(Duration::ZERO).unwrap(),
        "one request, one sync"
    );

    // A background caller that falls behind: at twice the limit the write syncs itself.
    write_chunks(&img, 7, 3);
    assert_eq!(img.durable_seq(), Seq(9), "below twice the limit");
    write_chunks(&img, 1, 4);
    assert_eq!(
        img.durable_seq(),
        Seq(17),
        "the write reaching twice the limit synced"
    );
    img.close().unwrap();
}

#[test]
fn a_background_syncer_keeps_the_data_durable_and_the_image_reopens_intact() {
    use rr_row::blockdev::image_dev::ImageDevice;
    use rr_row::blockdev::BlockDevice;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.img");
    let img = create(&path);
    img.set_unsynced_limit(128 * 1024);
    let dev = ImageDevice::new(img).with_background_sync().unwrap();
    write_chunks(dev.image(), 16, 7);
    // The syncer runs on its own thread: wait (generously) for it to catch up.
    assert!(
        wait_until(Duration::from_secs(60), || dev.image().durable_seq()
            >= Seq(15)),
        "the syncer made the writes durable"
    );
    assert!(dev.capacity() > 0);
    let img = dev
        .into_image()
        .ok()
        .expect("the syncer let go of the image");
    img.close().unwrap();
    let img = Image::open(&path, OpenMode::ReadOnly).unwrap();
    let mut got = vec![0u8; 16 * 16 * BS];
    img.read_at(0, &mut got).unwrap();
    for (i, c) in got.chunks(16 * BS).enumerate() {
        assert!(
            c.iter().all(|&b| b == 7u8.wrapping_add(i as u8)),
            "chunk {i}"
        );
    }
}

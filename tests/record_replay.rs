//! RecordingDevice and ReplayingDevice against a real image in a tempdir: record a mixed
//! workload, overwrite the disk in a later session, replay the same request stream, and compare
//! every byte; divergences at the right index; the live image untouched by a replay.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::image::{create_image, write_random};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use rr_row::blockdev::record_dev::RecordingDevice;
use rr_row::blockdev::relocator::RelocPolicy;
use rr_row::blockdev::replay_dev::{DivergencePolicy, ReplayError, ReplayingDevice};
use rr_row::blockdev::{
    BatchReq, BlockDevice, BlockError, RejectedRequest, RequestCtx, RequestKind,
};
use rr_row::image::{CreateOptions, Image, OpenMode, OpenOptions};
use rr_row::iobuf::{IoSeg, PageBuf};
use rr_row::record::format::{LogHeader, HASH_LEN, VERSION};
use rr_row::record::{
    LogExtent, LogReader, LogWriter, ReadBody, Record, RecordBody, RecordMode, ReplayIndex,
};
use rr_row::units::{BlockSize, Pba, Seq};

const SIZE: u64 = 8 << 20;
const BS: u64 = 4096;

#[derive(Clone, Debug)]
enum Op {
    Read { off: u64, lens: Vec<usize> },
    Write { off: u64, data: Vec<Vec<u8>> },
    Discard { off: u64, len: u64 },
    Zeroes { off: u64, len: u64, unmap: bool },
    Flush,
    Reject { sector: u64, len: u64 },
}

/// A request with the queue it goes to.
#[derive(Clone, Debug)]
struct Req {
    queue: u16,
    op: Op,
}

impl Op {
    /// A one-segment read of `len` bytes at `off`.
    fn read(off: u64, len: usize) -> Op {
        Op::Read {
            off,
            lens: vec![len],
        }
    }

    /// A one-segment write of `data` at `off`.
    fn write(off: u64, data: Vec<u8>) -> Op {
        Op::Write {
            off,
            data: vec![data],
        }
    }
}

impl Req {
    /// `op` on queue 0.
    fn q0(op: Op) -> Req {
        Req { queue: 0, op }
    }
}

/// A deterministic mixed workload over two queues: aligned, sub-block and multi-segment reads
/// and writes, reads of never-written and base-backed blocks, discards, write-zeroes, flushes,
/// and requests the virtio layer rejected.
fn workload(seed: u64, n: usize) -> Vec<Req> {
    let mut rng = StdRng::seed_from_u64(seed);
    let sectors = SIZE / 512;
    (0..n)
        .map(|_| {
            let queue = rng.gen_range(0..2u16);
            let nsec = rng.gen_range(1..=64u64);
            let sector = rng.gen_range(0..sectors - nsec);
            let off = sector * 512;
            let len = nsec * 512;
            let split = |rng: &mut StdRng| -> Vec<usize> {
                let mut lens = Vec::new();
                let mut left = len as usize;
                while left > 0 {
                    let l = (rng.gen_range(1..=8usize) * 512).min(left);
                    lens.push(l);
                    left -= l;
                }
                lens
            };
            let op = match rng.gen_range(0..100) {
                0..=44 => Op::Read {
                    off,
                    lens: split(&mut rng),
                },
                45..=84 => {
                    let lens = split(&mut rng);
                    let data = lens
                        .iter()
                        .map(|&l| {
                            let mut d = vec![0u8; l];
                            rng.fill(&mut d[..]);
                            d
                        })
                        .collect();
                    Op::Write { off, data }
                }
                85..=89 => Op::Discard { off, len },
                90..=94 => Op::Zeroes {
                    off,
                    len,
                    unmap: rng.gen(),
                },
                95..=97 => Op::Flush,
                _ => Op::Reject {
                    sector: sectors + 5,
                    len,
                },
            };
            Req { queue, op }
        })
        .collect()
}

/// What the guest saw for one request: the data of a successful read, or the error text.
type Seen = Result<Option<Vec<u8>>, String>;

/// Runs the requests against a device, numbering them per queue like the virtio layer does.
fn run(dev: &dyn BlockDevice, reqs: &[Req]) -> Vec<Seen> {
    run_with(dev, reqs, 1)
}

/// As [`run`], but up to `batch` consecutive writes go to the device together in one
/// `write_many` call, and up to `batch` consecutive reads in one `read_many` call, as a
/// queue worker hands them over.
fn run_with(dev: &dyn BlockDevice, reqs: &[Req], batch: usize) -> Vec<Seen> {
    let mut next = [0u64; 2];
    let ctxs: Vec<RequestCtx> = reqs
        .iter()
        .map(|r| {
            let ctx = RequestCtx {
                queue: r.queue,
                index: next[usize::from(r.queue)],
            };
            next[usize::from(r.queue)] += 1;
            ctx
        })
        .collect();
    let mut out: Vec<Seen> = Vec::with_capacity(reqs.len());
    let mut i = 0;
    // How many of the next requests (at most `batch`) are of one kind.
    let run_of = |from: usize, kind: fn(&Op) -> bool| {
        reqs[from..]
            .iter()
            .take(batch)
            .take_while(|r| kind(&r.op))
            .count()
    };
    while i < reqs.len() {
        let reads = run_of(i, |op| matches!(op, Op::Read { .. }));
        if batch > 1 && reads > 0 {
            out.extend(read_batch(dev, &reqs[i..i + reads], &ctxs[i..i + reads]));
            i += reads;
            continue;
        }
        let writes = run_of(i, |op| matches!(op, Op::Write { .. }));
        if batch > 1 && writes > 0 {
            let segs: Vec<Vec<IoSeg<'_>>> = reqs[i..i + writes]
                .iter()
                .map(|r| match &r.op {
                    Op::Write { data, .. } => data.iter().map(|d| IoSeg::from_slice(d)).collect(),
                    _ => unreachable!(),
                })
                .collect();
            let many = batch_reqs(&reqs[i..i + writes], &ctxs[i..], &segs);
            out.extend(
                dev.write_many(&many)
                    .into_iter()
                    .map(|r| r.map(|()| None).map_err(|e| e.to_string())),
            );
            i += writes;
            continue;
        }
        out.push(run_one(dev, &ctxs[i], &reqs[i].op));
        i += 1;
    }
    out
}

/// A batch of reads or writes as a queue worker hands it to the device: each request with its
/// context and segments.
fn batch_reqs<'a>(
    reqs: &[Req],
    ctxs: &'a [RequestCtx],
    segs: &'a [Vec<IoSeg<'a>>],
) -> Vec<BatchReq<'a>> {
    reqs.iter()
        .zip(ctxs)
        .zip(segs)
        .map(|((r, ctx), segs)| BatchReq {
            ctx,
            offset: match r.op {
                Op::Read { off, .. } | Op::Write { off, .. } => off,
                _ => unreachable!("only reads and writes are batched"),
            },
            segs,
        })
        .collect()
}

/// Reads (only) handed to the device in one `read_many` call, each segment in a buffer that
/// starts on a page, as guest memory does.
fn read_batch(dev: &dyn BlockDevice, reqs: &[Req], ctxs: &[RequestCtx]) -> Vec<Seen> {
    // Per request, one page-aligned buffer per segment, filled with a marker the read replaces.
    let mut mem: Vec<Vec<PageBuf>> = reqs
        .iter()
        .map(|r| match &r.op {
            Op::Read { lens, .. } => lens
                .iter()
                .map(|&l| {
                    let mut b = PageBuf::new(l);
                    b.bytes_mut().fill(0xee);
                    b
                })
                .collect(),
            _ => unreachable!(),
        })
        .collect();
    let res = {
        let segs: Vec<Vec<IoSeg<'_>>> = mem
            .iter_mut()
            .map(|b| {
                b.iter_mut()
                    .map(|p| IoSeg::from_mut_slice(p.bytes_mut()))
                    .collect()
            })
            .collect();
        dev.read_many(&batch_reqs(reqs, ctxs, &segs))
    };
    res.into_iter()
        .zip(&mem)
        .map(|(r, b)| {
            r.map(|()| Some(b.iter().flat_map(|p| p.bytes().iter().copied()).collect()))
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn run_one(dev: &dyn BlockDevice, ctx: &RequestCtx, op: &Op) -> Seen {
    let res: Result<Option<Vec<u8>>, BlockError> = match op {
        Op::Read { off, lens } => {
            let mut bufs: Vec<Vec<u8>> = lens.iter().map(|&l| vec![0xee; l]).collect();
            let res = {
                let segs: Vec<IoSeg<'_>> =
                    bufs.iter_mut().map(|b| IoSeg::from_mut_slice(b)).collect();
                dev.read(ctx, *off, &segs)
            };
            res.map(|()| Some(bufs.concat()))
        }
        Op::Write { off, data } => {
            let segs: Vec<IoSeg<'_>> = data.iter().map(|d| IoSeg::from_slice(d)).collect();
            dev.write(ctx, *off, &segs).map(|()| None)
        }
        Op::Discard { off, len } => dev.discard(ctx, *off, *len).map(|()| None),
        Op::Zeroes { off, len, unmap } => dev.write_zeroes(ctx, *off, *len, *unmap).map(|()| None),
        Op::Flush => dev.flush(ctx).map(|()| None),
        Op::Reject { sector, len } => {
            dev.rejected(
                ctx,
                &RejectedRequest {
                    kind: RequestKind::Read,
                    sector: *sector,
                    len: *len,
                    status: 1,
                },
            );
            Ok(None)
        }
    };
    res.map_err(|e| e.to_string())
}

fn whole_disk(img: &Image) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE as usize];
    img.read_at(0, &mut buf).unwrap();
    buf
}

fn new_image(dir: &Path, base: bool) -> Arc<Image> {
    let base = base.then(|| {
        let p = dir.join("base.raw");
        // A base shorter than the disk: blocks past its end read as zeros.
        let data: Vec<u8> = (0..SIZE / 2).map(|i| (i % 253) as u8 ^ 0x5a).collect();
        std::fs::write(&p, data).unwrap();
        p
    });
    let img = Image::create(
        &dir.join("disk.rrow"),
        &CreateOptions {
            size: SIZE,
            block_size: BlockSize::new(BS as u32).unwrap(),
            base,
        },
    )
    .unwrap();
    // Some history before recording starts.
    for i in 0..64u64 {
        img.write_at(i * 3 * BS, &vec![(i + 1) as u8; BS as usize])
            .unwrap();
    }
    Arc::new(img)
}

/// Closes `img` and opens it again with direct data I/O.
fn reopen_direct(dir: &Path, img: Arc<Image>) -> Arc<Image> {
    Arc::try_unwrap(img)
        .unwrap_or_else(|_| panic!("the image is still shared"))
        .close()
        .unwrap();
    let img = Image::open_with_options(
        &dir.join("disk.rrow"),
        OpenMode::ReadWrite,
        &OpenOptions {
            direct: true,
            shared_lock: false,
        },
    )
    .unwrap();
    assert!(img.is_direct());
    Arc::new(img)
}

/// A later session that overwrites the whole disk.
fn overwrite(img: &Image, seed: u64) {
    write_random(img, seed, 256 << 10, 256 << 10);
    img.discard(0, 64 << 10).unwrap();
}

/// A later session overwrites the disk (`overwrite` with `seed`); then `reqs` replayed from
/// `log` complete as `recorded` (a failed request fails again, maybe with another message)
/// and the replay reports no divergence.
fn replays_as_recorded_after_overwrite(
    img: &Arc<Image>,
    log: &Path,
    reqs: &[Req],
    recorded: &[Seen],
    seed: u64,
) {
    overwrite(img, seed);
    img.flush().unwrap();
    let dev = ReplayingDevice::open(Arc::clone(img), log, DivergencePolicy::Stop).unwrap();
    let replayed = run(&dev, reqs);
    for (i, (a, b)) in recorded.iter().zip(&replayed).enumerate() {
        match (a, b) {
            (Err(_), Err(_)) => {}
            _ => assert_eq!(a, b, "request {i} ({:?})", reqs[i].op),
        }
    }
    let s = dev.summary();
    assert!(s.is_clean(), "{s}");
}

/// Every record of the log at `log`, in file order.
fn log_records(log: &Path) -> Vec<Record> {
    LogReader::open(log)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A block-id recorder of `img` into `log`, synced only on flushes and at the end.
fn recorder(img: &Arc<Image>, log: &Path) -> RecordingDevice {
    RecordingDevice::with_sync_interval(Arc::clone(img), log, RecordMode::BlockId, Duration::ZERO)
        .unwrap()
}

fn record(img: &Arc<Image>, log: &Path, mode: RecordMode, reqs: &[Req]) -> Vec<Seen> {
    let dev =
        RecordingDevice::with_sync_interval(Arc::clone(img), log, mode, Duration::ZERO).unwrap();
    let seen = run(&dev, reqs);
    let stats = dev.finish().unwrap();
    assert_eq!(stats.records as usize, reqs.len());
    seen
}

fn record_overwrite_replay(mode: RecordMode, base: bool) {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), base);
    let log = dir.path().join("run.log");
    let reqs = workload(7, 1500);
    let recorded = record(&img, &log, mode, &reqs);
    let reads = recorded.iter().filter(|s| matches!(s, Ok(Some(_)))).count();
    assert!(reads > 500, "{reads} reads succeeded");

    if base && mode == RecordMode::BlockId {
        let log_recs = log_records(&log);
        let kinds = |want: fn(&LogExtent) -> bool| {
            log_recs.iter().any(|r| match &r.body {
                RecordBody::Read(b) => b.extents.iter().any(want),
                _ => false,
            })
        };
        assert!(kinds(|e| matches!(e, LogExtent::Base { .. })));
        assert!(kinds(|e| matches!(e, LogExtent::Mapped { .. })));
        assert!(kinds(|e| matches!(e, LogExtent::Zero { .. })));
    }

    overwrite(&img, 99);
    img.flush().unwrap();
    let before = whole_disk(&img);
    // The later session really changed what those reads would return now.
    let changed = reqs
        .iter()
        .zip(&recorded)
        .filter(|(r, seen)| match (&r.op, seen) {
            (Op::Read { off, .. }, Ok(Some(d))) => {
                before[*off as usize..*off as usize + d.len()] != d[..]
            }
            _ => false,
        })
        .count();
    assert!(
        changed * 10 > reads * 9,
        "only {changed} of {reads} reads changed"
    );
    let seq_before = img.seq();

    let dev = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap();
    let replayed = run(&dev, &reqs);
    for (i, (a, b)) in recorded.iter().zip(&replayed).enumerate() {
        assert_eq!(a, b, "request {i} ({:?})", reqs[i].op);
    }
    let s = dev.summary();
    assert!(s.is_clean(), "{s}");
    assert_eq!(s.matched as usize, reqs.len());

    // The replay changed nothing.
    assert_eq!(img.seq(), seq_before);
    assert!(whole_disk(&img) == before, "the live image changed");
}

#[test]
fn block_id_replay_after_overwrite_returns_the_recorded_bytes() {
    record_overwrite_replay(RecordMode::BlockId, false);
}

#[test]
fn block_id_replay_over_a_base_image() {
    record_overwrite_replay(RecordMode::BlockId, true);
}

#[test]
fn full_mode_replay_after_overwrite_returns_the_recorded_bytes() {
    record_overwrite_replay(RecordMode::Full, false);
}

#[test]
fn block_id_log_is_a_small_fraction_of_full_mode() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    // Read-only workload: 4 KiB random reads.
    let mut rng = StdRng::seed_from_u64(3);
    let reqs: Vec<Req> = (0..2000)
        .map(|_| Req::q0(Op::read(rng.gen_range(0..SIZE / BS) * BS, BS as usize)))
        .collect();
    let a = dir.path().join("a.log");
    let b = dir.path().join("b.log");
    record(&img, &a, RecordMode::BlockId, &reqs);
    record(&img, &b, RecordMode::Full, &reqs);
    let (sa, sb) = (
        std::fs::metadata(&a).unwrap().len(),
        std::fs::metadata(&b).unwrap().len(),
    );
    assert!(sa * 100 < sb, "block-id {sa} bytes, full {sb} bytes");
}

#[test]
fn a_different_request_stops_the_replay_at_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("run.log");
    let reqs = workload(11, 300);
    let recorded = record(&img, &log, RecordMode::BlockId, &reqs);
    overwrite(&img, 5);

    // Change the 100th request into a read of another sector.
    let mut changed = reqs.clone();
    let k = 100;
    changed[k].op = Op::read(4096 * 7 + 512, 1024);
    let q = changed[k].queue;
    let index = changed[..k].iter().filter(|r| r.queue == q).count() as u64;

    let dev = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap();
    let replayed = run(&dev, &changed);
    assert_eq!(&replayed[..k], &recorded[..k]);
    for (i, r) in replayed[k..].iter().enumerate() {
        if !matches!(changed[k + i].op, Op::Reject { .. }) {
            assert!(
                r.is_err(),
                "request {} succeeded after the divergence",
                k + i
            );
        }
    }
    let s = dev.summary();
    assert!(s.stopped);
    assert_eq!(s.divergences, 1);
    let d = &s.first_divergences[0];
    assert_eq!((d.queue, d.index), (q, index));
    assert!(d.recorded.is_some());
    assert!(d.replayed.starts_with("read sector=57 len=1024"), "{d}");
    assert_eq!(s.matched as usize, k);
}

#[test]
fn continue_serves_divergent_reads_from_the_replay_point_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("run.log");
    // Queue 0 only: write A, read it, write B elsewhere, then reads.
    let a = vec![0xaau8; BS as usize];
    let b = vec![0xbbu8; BS as usize];
    let reqs = vec![
        Req::q0(Op::write(10 * BS, a.clone())),
        Req::q0(Op::read(10 * BS, BS as usize)),
        Req::q0(Op::write(20 * BS, b.clone())),
        Req::q0(Op::read(20 * BS, BS as usize)),
    ];
    let recorded = record(&img, &log, RecordMode::BlockId, &reqs);
    overwrite(&img, 8);
    let seq_before = img.seq();
    let disk_before = whole_disk(&img);

    let mut changed = reqs.clone();
    // Request 1 now reads block 11 (never written in the recording: the snapshot at the replay
    // point - after write A - has the pre-recording content, zeros) and writes different data.
    changed[1].op = Op::read(11 * BS, BS as usize);
    changed[2].op = Op::write(20 * BS, vec![0xcc; BS as usize]);
    let dev = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Continue).unwrap();
    let replayed = run(&dev, &changed);
    assert_eq!(replayed[0], recorded[0]);
    assert_eq!(replayed[1], Ok(Some(vec![0u8; BS as usize])));
    assert_eq!(replayed[2], Ok(None));
    // Request 3 matches again and is served from the log: the recorded B, not the live disk.
    assert_eq!(replayed[3], Ok(Some(b)));
    let s = dev.summary();
    assert!(!s.stopped);
    assert_eq!(s.divergences, 2);
    assert_eq!(
        s.first_divergences
            .iter()
            .map(|d| d.index)
            .collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert!(s.first_divergences[1].reason.contains("hash"));
    assert_eq!(img.seq(), seq_before);
    assert!(whole_disk(&img) == disk_before);
}

#[test]
fn more_requests_than_recorded_diverge() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("run.log");
    let reqs = workload(2, 50);
    record(&img, &log, RecordMode::BlockId, &reqs);
    let mut longer = reqs.clone();
    longer.push(Req {
        queue: 1,
        op: Op::Flush,
    });
    let dev = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap();
    let out = run(&dev, &longer);
    assert!(out.last().unwrap().is_err());
    let s = dev.summary();
    assert_eq!(s.divergences, 1);
    assert!(s.first_divergences[0].recorded.is_none());
    assert!(s.first_divergences[0]
        .reason
        .contains("more requests than recorded"));
    assert_eq!(s.unreplayed(), 0);
}

#[test]
fn a_killed_recorder_leaves_a_replayable_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("run.log");
    let reqs = workload(4, 3000);
    let recorded = record(&img, &log, RecordMode::BlockId, &reqs);
    // Cut the log in the middle of its last frame, as a kill -9 during a write would.
    let bytes = std::fs::read(&log).unwrap();
    let cut = dir.path().join("cut.log");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let idx = ReplayIndex::open(&cut).unwrap();
    assert!(idx.torn_tail().is_some());
    let n = idx.len() as usize;
    assert!(n > 0 && n < reqs.len(), "{n} records survived");
    // Records are appended in request order here (one thread), so the prefix is the first n.
    let dev = ReplayingDevice::new(Arc::clone(&img), idx, DivergencePolicy::Stop).unwrap();
    let replayed = run(&dev, &reqs[..n]);
    assert_eq!(&replayed[..], &recorded[..n]);
    assert!(dev.summary().is_clean());
}

fn crafted_log(path: &Path, img: &Image, start_seq: Seq, recs: &[Record]) {
    let w = LogWriter::create(
        path,
        &LogHeader {
            version: VERSION,
            mode: RecordMode::BlockId,
            block_size: img.block_size(),
            image_uuid: img.uuid(),
            start_seq,
            image_size: img.size(),
            created_unix_ns: 0,
            write_hash: rr_row::record::format::WriteHash::default(),
            indices: rr_row::record::IndexKeying::default(),
            streams: rr_row::record::LogStreams::default(),
        },
        Duration::ZERO,
    )
    .unwrap();
    for r in recs {
        w.append(r).unwrap();
    }
    w.finish().unwrap();
}

fn read_rec(index: u64, extents: Vec<LogExtent>, seq: u64) -> Record {
    Record {
        queue: 0,
        index,
        sector: 0,
        len: BS,
        status: 0,
        seq: Seq(seq),
        body: RecordBody::Read(ReadBody {
            extents,
            data: None,
        }),
    }
}

#[test]
fn missing_history_is_refused_naming_the_first_missing_block() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let seq = img.seq().get();
    let good = img.resolve(rr_row::units::Lba(0), 1).unwrap();
    let good = LogExtent::from(&good[0]);
    let log = dir.path().join("missing.log");
    crafted_log(
        &log,
        &img,
        img.seq(),
        &[
            read_rec(0, vec![good], seq),
            read_rec(
                1,
                vec![LogExtent::Mapped {
                    pba: Pba(1 << 30),
                    blocks: 4,
                }],
                seq,
            ),
        ],
    );
    let e = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop)
        .err()
        .expect("replay must be refused");
    match &e {
        ReplayError::MissingHistory {
            pba, queue, index, ..
        } => assert_eq!((*pba, *queue, *index), (1 << 30, 0, 1)),
        other => panic!("{other}"),
    }
    assert!(e.to_string().contains("block 1073741824"), "{e}");
}

#[test]
fn a_log_of_another_image_or_from_the_future_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let other_dir = tempfile::tempdir().unwrap();
    let other = new_image(other_dir.path(), false);
    let log = dir.path().join("other.log");
    crafted_log(&log, &other, other.seq(), &[]);
    assert!(matches!(
        ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop),
        Err(ReplayError::WrongImage { .. })
    ));

    let log = dir.path().join("future.log");
    let future = img.seq().get() + 10;
    crafted_log(&log, &img, img.seq(), &[read_rec(0, vec![], future)]);
    let e = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop)
        .err()
        .expect("refused");
    assert!(matches!(e, ReplayError::FutureSeq { .. }), "{e}");

    let log = dir.path().join("garbage.log");
    std::fs::write(&log, vec![0x42; 4096]).unwrap();
    let e = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop)
        .err()
        .expect("refused");
    assert_eq!(
        e.to_string(),
        "cannot replay the record log: not an RR-Row record log (bad magic)"
    );
}

#[test]
fn recorded_writes_carry_their_blocks_and_hash() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("w.log");
    let data = vec![0x17u8; 2 * BS as usize];
    let reqs = vec![
        Req::q0(Op::write(5 * BS, data.clone())),
        Req::q0(Op::read(5 * BS, 2 * BS as usize)),
    ];
    record(&img, &log, RecordMode::BlockId, &reqs);
    let recs = log_records(&log);
    let RecordBody::Write {
        first_pba,
        blocks,
        hash,
    } = recs[0].body
    else {
        panic!("{}", recs[0]);
    };
    assert_eq!(blocks, 2);
    // The default write hash is XXH3-128 (docs/record-log.md).
    assert_eq!(hash, xxhash_rust::xxh3::xxh3_128(&data).to_le_bytes());
    assert_eq!(hash.len(), HASH_LEN);
    let RecordBody::Read(ref b) = recs[1].body else {
        panic!("{}", recs[1]);
    };
    assert_eq!(
        b.extents,
        vec![LogExtent::Mapped {
            pba: first_pba,
            blocks: 2
        }]
    );
    assert_eq!(recs[1].seq, recs[0].seq);
    let mut blk = vec![0u8; BS as usize];
    img.read_block(first_pba, &mut blk).unwrap();
    assert_eq!(blk, data[..BS as usize]);
    // The image opened read-only is enough for a replay.
    img.flush().unwrap();
    drop(img);
    let ro = Arc::new(Image::open(&dir.path().join("disk.rrow"), OpenMode::ReadOnly).unwrap());
    let dev = ReplayingDevice::open(ro, &log, DivergencePolicy::Stop).unwrap();
    let out = run(&dev, &reqs);
    assert_eq!(out[1], Ok(Some(data)));
}

#[test]
fn daemon_initiated_flushes_are_neither_recorded_nor_matched() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("internal.log");
    let data = vec![0x42u8; BS as usize];
    let w = |index| RequestCtx { queue: 0, index };
    let dev = recorder(&img, &log);
    dev.write(&w(0), 0, &[IoSeg::from_slice(&data)]).unwrap();
    dev.flush(&RequestCtx::INTERNAL).unwrap();
    let mut buf = vec![0u8; BS as usize];
    dev.read(&w(1), 0, &[IoSeg::from_mut_slice(&mut buf)])
        .unwrap();
    assert_eq!(dev.finish().unwrap().records, 2);

    let dev = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap();
    dev.flush(&RequestCtx::INTERNAL).unwrap();
    dev.write(&w(0), 0, &[IoSeg::from_slice(&data)]).unwrap();
    let mut back = vec![0u8; BS as usize];
    dev.read(&w(1), 0, &[IoSeg::from_mut_slice(&mut back)])
        .unwrap();
    dev.flush(&RequestCtx::INTERNAL).unwrap();
    assert_eq!(back, data);
    assert!(dev.summary().is_clean(), "{}", dev.summary());
}

#[test]
fn full_mode_refuses_reads_too_large_to_log_and_records_the_failure() {
    let dir = tempfile::tempdir().unwrap();
    let img = Arc::new(create_image(&dir.path().join("big.rrow"), 128 << 20, 4096));
    let log = dir.path().join("big.log");
    let dev = RecordingDevice::with_sync_interval(
        Arc::clone(&img),
        &log,
        RecordMode::Full,
        Duration::ZERO,
    )
    .unwrap();
    let mut big = vec![0u8; (64 << 20) + 4096];
    let ctx = RequestCtx { queue: 0, index: 0 };
    assert!(dev
        .read(&ctx, 0, &[IoSeg::from_mut_slice(&mut big)])
        .is_err());
    let ctx = RequestCtx { queue: 0, index: 1 };
    dev.read(&ctx, 0, &[IoSeg::from_mut_slice(&mut big[..64 << 20])])
        .unwrap();
    dev.finish().unwrap();
    let recs = log_records(&log);
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].status, 1);
    assert_eq!(recs[0].body, RecordBody::Read(ReadBody::default()));
    assert_eq!(recs[1].status, 0);
    assert!(
        matches!(&recs[1].body, RecordBody::Read(b) if b.data.as_ref().map(Vec::len) == Some(64 << 20))
    );
}

#[test]
fn relocation_while_recording_keeps_the_log_replayable() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    // Fragment the first MiB: write it whole, then overwrite every other block.
    let mut rng = StdRng::seed_from_u64(5);
    let mut whole = vec![0u8; 1 << 20];
    rng.fill(&mut whole[..]);
    img.write_at(0, &whole).unwrap();
    for b in (0..256u64).step_by(2) {
        let mut blk = vec![0u8; BS as usize];
        rng.fill(&mut blk[..]);
        img.write_at(b * BS, &blk).unwrap();
    }
    let runs = |img: &Image| {
        img.resolve(rr_row::units::Lba(0), 256)
            .unwrap()
            .iter()
            .filter(|e| matches!(e, rr_row::image::Extent::Mapped { .. }))
            .count()
    };
    let before_runs = runs(&img);
    assert!(before_runs > 100, "{before_runs} runs");
    // Read the fragmented MiB in 64 KiB pieces, three times over: the first pass hands the
    // ranges to the relocation thread, later passes may read relocated blocks.
    let reqs: Vec<Req> = (0..3)
        .flat_map(|_| (0..16u64).map(|i| Req::q0(Op::read(i * (64 << 10), 64 << 10))))
        .collect();
    let log = dir.path().join("reloc.log");
    let dev = recorder(&img, &log)
        .with_relocation(RelocPolicy::on_read(4))
        .unwrap();
    let recorded = run(&dev, &reqs);
    // The relocation thread works on its own schedule; finishing the recording waits for the
    // relocations already queued.
    dev.finish().unwrap();
    assert!(
        runs(&img) <= 16,
        "{} runs left after relocation",
        runs(&img)
    );

    overwrite(&img, 3);
    img.flush().unwrap();
    let dev = ReplayingDevice::open(Arc::clone(&img), &log, DivergencePolicy::Stop).unwrap();
    let replayed = run(&dev, &reqs);
    assert_eq!(
        recorded, replayed,
        "a replayed read differs from the recording"
    );
    let s = dev.summary();
    assert!(s.is_clean(), "{s}");
}

/// With `O_DIRECT`, a batch's reads go to the image together (`read_many`, as a queue
/// worker hands them over) and each is recorded with the extents and seq it read: the
/// recording replays byte for byte after the disk is overwritten, and every read recorded
/// from the batch names the block ids a single read would have named.
#[test]
fn batched_direct_reads_are_recorded_with_their_extents_and_replay() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let img = reopen_direct(dir.path(), new_image(dir.path(), true));
    let log = dir.path().join("batched-reads.log");
    // The mixed workload, with each run of 24 requests reordered so that its reads come
    // first: batches of up to 16 reads of every shape (sub-block, several segments,
    // never-written and base-backed blocks, fragmented data) beside the other requests.
    let mut reqs = workload(17, 2400);
    for chunk in reqs.chunks_mut(24) {
        chunk.sort_by_key(|r| !matches!(r.op, Op::Read { .. }));
    }
    reqs.push(Req::q0(Op::read(SIZE - BS, 2 * BS as usize)));
    let dev = recorder(&img, &log);
    assert!(dev.prefers_batched_reads());
    let recorded = run_with(&dev, &reqs, 16);
    let stats = dev.finish().unwrap();
    assert_eq!(stats.records as usize, reqs.len());
    assert!(
        matches!(recorded.last(), Some(Err(_))),
        "the read past the end fails"
    );
    let reads = recorded
        .iter()
        .zip(&reqs)
        .filter(|(s, r)| matches!(r.op, Op::Read { .. }) && matches!(s, Ok(Some(_))))
        .count();
    assert!(reads > 900, "{reads} reads succeeded");

    // Every recorded read's mapped blocks hold what the guest got from them.
    let recs = log_records(&log);
    let mut mapped = 0;
    for (r, seen) in recs.iter().zip(&recorded) {
        let (RecordBody::Read(b), Ok(Some(data))) = (&r.body, seen) else {
            continue;
        };
        let first = r.sector * 512 / BS;
        let skip = (r.sector * 512 % BS) as usize;
        let mut lba = first;
        for e in &b.extents {
            if let LogExtent::Mapped { pba, blocks } = e {
                for k in 0..*blocks {
                    let mut got = vec![0u8; BS as usize];
                    img.read_block(Pba(pba.0 + k), &mut got).unwrap();
                    let at = ((lba + k - first) * BS) as usize;
                    for (j, byte) in got.iter().enumerate() {
                        let Some(pos) = (at + j).checked_sub(skip) else {
                            continue;
                        };
                        if let Some(want) = data.get(pos) {
                            assert_eq!(byte, want, "record {r}: block {k} of an extent");
                        }
                    }
                    mapped += 1;
                }
            }
            lba += e.blocks();
        }
    }
    assert!(mapped > 1000, "{mapped} recorded blocks checked");

    replays_as_recorded_after_overwrite(&img, &log, &reqs, &recorded, 5);
}

/// Writes handed to the recorder in batches (`write_many`, as a queue worker does) are each
/// recorded with the blocks they got and their hash, a failed one as failed, and the run
/// replays after an overwrite like a recording of single writes.
#[test]
fn batched_writes_are_recorded_with_their_own_blocks_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let img = new_image(dir.path(), false);
    let log = dir.path().join("batched.log");
    let mut rng = StdRng::seed_from_u64(21);
    let blocks = SIZE / BS;
    let mut reqs: Vec<Req> = Vec::new();
    for round in 0..60u64 {
        // A batch of writes: mostly whole blocks (the batched path), some overlapping, some
        // sub-block or in several segments (those go alone inside write_many).
        for _ in 0..rng.gen_range(1..=12) {
            let n = rng.gen_range(1..=4u64);
            let lba = rng.gen_range(0..blocks - n);
            let mut d = vec![0u8; (n * BS) as usize];
            rng.fill(&mut d[..]);
            let op = match rng.gen_range(0..10) {
                0 => Op::write(lba * BS + 512, d[..1024].to_vec()),
                1 => {
                    let (a, b) = d.split_at(BS as usize);
                    Op::Write {
                        off: lba * BS,
                        data: vec![a.to_vec(), b.to_vec()],
                    }
                }
                _ => Op::write(lba * BS, d),
            };
            reqs.push(Req {
                queue: (round % 2) as u16,
                op,
            });
        }
        if round == 30 {
            // Past the end of the disk: fails, and is recorded as failed.
            reqs.push(Req::q0(Op::write(SIZE, vec![1u8; BS as usize])));
        }
        for _ in 0..4 {
            let lba = rng.gen_range(0..blocks - 8);
            reqs.push(Req::q0(Op::read(lba * BS, 8 * BS as usize)));
        }
        if round % 10 == 9 {
            reqs.push(Req::q0(Op::Flush));
        }
    }
    let dev = recorder(&img, &log);
    let recorded = run_with(&dev, &reqs, 16);
    let stats = dev.finish().unwrap();
    assert_eq!(stats.records as usize, reqs.len());
    assert_eq!(recorded.iter().filter(|s| s.is_err()).count(), 1);

    let recs = log_records(&log);
    let mut checked = 0;
    for (r, req) in recs.iter().zip(&reqs) {
        let (
            RecordBody::Write {
                first_pba,
                blocks,
                hash,
            },
            Op::Write { off, data },
        ) = (&r.body, &req.op)
        else {
            continue;
        };
        let all = data.concat();
        assert_eq!(*hash, xxhash_rust::xxh3::xxh3_128(&all).to_le_bytes());
        if *off >= SIZE {
            assert_ne!(r.status, 0, "{r}");
            assert_eq!(*blocks, 0);
            continue;
        }
        assert_eq!(r.status, 0, "{r}");
        if *off % BS == 0 && all.len() as u64 % BS == 0 {
            // Whole blocks: the recorded blocks hold exactly the written data.
            assert_eq!(*blocks, all.len() as u64 / BS, "{r}");
            for (k, want) in all.chunks(BS as usize).enumerate() {
                let mut got = vec![0u8; BS as usize];
                img.read_block(Pba(first_pba.0 + k as u64), &mut got)
                    .unwrap();
                assert!(got == want, "record {r}: block {k} differs");
            }
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked} whole-block writes checked");

    replays_as_recorded_after_overwrite(&img, &log, &reqs, &recorded, 8);
}

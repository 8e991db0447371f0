//! Record log files: writer/reader round trips, torn tails at every byte, corruption.

use std::path::Path;
use std::time::{Duration, Instant};

use rr_row::record::format::{LogHeader, HASH_LEN, HEADER_LEN, VERSION};
use rr_row::record::{
    LogExtent, LogReader, LogWriter, ReadBody, Record, RecordBody, RecordError, RecordMode,
    ReplayIndex,
};
use rr_row::units::{BlockSize, Lba, Pba, Seq};

fn header(mode: RecordMode) -> LogHeader {
    LogHeader {
        version: VERSION,
        mode,
        block_size: BlockSize::DEFAULT,
        image_uuid: *b"0123456789abcdef",
        start_seq: Seq(10),
        image_size: 64 << 20,
        created_unix_ns: 1,
        write_hash: rr_row::record::format::WriteHash::default(),
        indices: rr_row::record::IndexKeying::default(),
        streams: rr_row::record::LogStreams::default(),
    }
}

/// A mixed stream: reads with several extent kinds, writes, flushes, discards, rejections.
fn workload(n: u64, full: bool) -> Vec<Record> {
    (0..n)
        .map(|i| {
            let sector = (i * 7919) % 100_000 * 8;
            let (len, body) = match i % 7 {
                0..=2 => {
                    let b = if full {
                        ReadBody {
                            extents: vec![],
                            data: Some(vec![(i % 251) as u8; 4096]),
                        }
                    } else {
                        ReadBody {
                            extents: vec![
                                LogExtent::Mapped {
                                    pba: Pba(1000 + i * 3),
                                    blocks: 1,
                                },
                                LogExtent::Zero { blocks: 2 },
                                LogExtent::Base {
                                    lba: Lba(sector / 8 + 3),
                                    blocks: 1,
                                },
                            ],
                            data: None,
                        }
                    };
                    (if full { 4096 } else { 16384 }, RecordBody::Read(b))
                }
                3 => (
                    8192,
                    RecordBody::Write {
                        first_pba: Pba(5000 + i),
                        blocks: 2,
                        hash: [(i % 256) as u8; HASH_LEN],
                    },
                ),
                4 => (0, RecordBody::Flush),
                5 => (1 << 20, RecordBody::WriteZeroes { unmap: i % 2 == 0 }),
                _ => (1000, RecordBody::Rejected { req_type: 99 }),
            };
            Record {
                queue: (i % 3) as u16,
                index: i / 3,
                sector,
                len,
                status: if i % 11 == 0 { 1 } else { 0 },
                seq: Seq(10 + i / 7),
                body,
            }
        })
        .collect()
}

fn write_log(path: &Path, mode: RecordMode, recs: &[Record], sync_every: usize) {
    let w = LogWriter::create(path, &header(mode), Duration::ZERO).unwrap();
    for (i, r) in recs.iter().enumerate() {
        w.append(r).unwrap();
        if sync_every > 0 && i % sync_every == sync_every - 1 {
            w.sync().unwrap();
        }
    }
    let st = w.finish().unwrap();
    assert_eq!(st.records, recs.len() as u64);
    assert_eq!(st.bytes, std::fs::metadata(path).unwrap().len());
}

fn read_all(bytes: &[u8]) -> Result<(Vec<Record>, Option<u64>), RecordError> {
    let mut r = LogReader::new(bytes, bytes.len() as u64)?;
    let mut out = Vec::new();
    while let Some(rec) = r.next_record()? {
        out.push(rec);
    }
    Ok((out, r.torn_tail().map(|t| t.dropped_bytes)))
}

/// Offsets at which each frame ends, and the number of records before each.
fn frame_ends(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut r = LogReader::new(bytes, bytes.len() as u64).unwrap();
    let mut ends = Vec::new();
    let mut count = 0;
    let mut last_frames = 0;
    while let Some(_rec) = r.next_record().unwrap() {
        if r.frames() != last_frames {
            if last_frames > 0 {
                ends.push((r.frame_offset() as usize, count));
            }
            last_frames = r.frames();
        }
        count += 1;
    }
    ends.push((bytes.len(), count));
    ends
}

#[test]
fn block_id_and_full_logs_round_trip_across_many_frames() {
    let dir = tempfile::tempdir().unwrap();
    for (mode, full) in [(RecordMode::BlockId, false), (RecordMode::Full, true)] {
        let path = dir.path().join(format!("{}.log", mode.name()));
        let recs = workload(20_000, full);
        write_log(&path, mode, &recs, 0);
        let mut r = LogReader::open(&path).unwrap();
        assert_eq!(r.header(), &header(mode));
        let back: Vec<Record> = r.by_ref().collect::<Result<_, _>>().unwrap();
        assert_eq!(back, recs);
        assert!(r.frames() > 1, "frames {}", r.frames());
        assert_eq!(r.torn_tail(), None);
    }
}

#[test]
fn existing_log_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.log");
    std::fs::write(&path, b"precious").unwrap();
    let e = LogWriter::create(&path, &header(RecordMode::BlockId), Duration::ZERO);
    assert!(matches!(e, Err(RecordError::Exists(_))));
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    // New logs are private to their owner.
    let fresh = dir.path().join("fresh.log");
    drop(LogWriter::create(&fresh, &header(RecordMode::BlockId), Duration::ZERO).unwrap());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn truncation_at_every_byte_leaves_the_prefix_of_complete_frames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.log");
    let recs = workload(120, false);
    write_log(&path, RecordMode::BlockId, &recs, 5);
    let bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    assert!(ends.len() > 20);
    for cut in 0..=bytes.len() {
        let res = read_all(&bytes[..cut]);
        if cut < HEADER_LEN {
            assert!(
                matches!(res, Err(RecordError::Truncated { .. })),
                "cut {cut}: {res:?}"
            );
            continue;
        }
        let (got, dropped) = res.unwrap_or_else(|e| panic!("cut {cut}: {e}"));
        // The last frame boundary at or before the cut.
        let (end, n) = std::iter::once((HEADER_LEN, 0))
            .chain(ends.iter().copied())
            .rfind(|&(e, _)| e <= cut)
            .unwrap();
        assert_eq!(got.len(), n, "cut {cut}");
        assert_eq!(&got[..], &recs[..n], "cut {cut}");
        let expect_dropped = (cut > end).then_some((cut - end) as u64);
        assert_eq!(dropped, expect_dropped, "cut {cut}");
    }
}

#[test]
fn corruption_is_an_error_in_the_middle_and_a_torn_tail_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.log");
    let recs = workload(60, false);
    write_log(&path, RecordMode::BlockId, &recs, 10);
    let bytes = std::fs::read(&path).unwrap();
    let ends = frame_ends(&bytes);
    let last_start = ends[ends.len() - 2].0;
    for i in 0..bytes.len() {
        let mut b = bytes.clone();
        b[i] ^= 0x20;
        let res = read_all(&b);
        if i < HEADER_LEN {
            assert!(
                matches!(
                    res,
                    Err(RecordError::BadMagic
                        | RecordError::HeaderChecksum { .. }
                        | RecordError::UnsupportedVersion { .. })
                ),
                "byte {i}: {res:?}"
            );
        } else if i < last_start {
            // A damaged length field may point past the end: then it reads as a torn tail,
            // which drops everything after it; anything else is a checksum error.
            match res {
                Err(RecordError::CorruptFrame { .. }) => {}
                Ok((got, Some(dropped))) => {
                    assert!(recs.starts_with(&got), "byte {i}");
                    assert!(dropped as usize > bytes.len() - last_start, "byte {i}");
                }
                other => panic!("byte {i}: {other:?}"),
            }
        } else {
            let (got, dropped) = res.unwrap_or_else(|e| panic!("byte {i}: {e}"));
            assert_eq!(got.len(), ends[ends.len() - 2].1, "byte {i}");
            assert_eq!(dropped, Some((bytes.len() - last_start) as u64));
        }
    }
}

#[test]
fn a_zero_filled_tail_is_torn_not_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("z.log");
    let recs = workload(30, false);
    write_log(&path, RecordMode::BlockId, &recs, 0);
    let mut bytes = std::fs::read(&path).unwrap();
    let good = bytes.len();
    bytes.resize(good + 20_000, 0);
    let (got, dropped) = read_all(&bytes).unwrap();
    assert_eq!(got, recs);
    assert_eq!(dropped, Some(20_000));
}

#[test]
fn a_future_version_and_garbage_are_refused_clearly() {
    let mut h = header(RecordMode::BlockId).encode();
    h[8] = 7;
    let e = read_all(&h).unwrap_err();
    assert_eq!(
        e.to_string(),
        "record log format version 7 is not supported (this build reads version 1)"
    );
    let e = read_all(&[0x55; 500]).unwrap_err();
    assert_eq!(e.to_string(), "not an RR-Row record log (bad magic)");
}

#[test]
fn queue_threads_append_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mt.log");
    let w = LogWriter::create(
        &path,
        &header(RecordMode::BlockId),
        Duration::from_millis(20),
    )
    .unwrap();
    std::thread::scope(|s| {
        for q in 0..4u16 {
            let w = &w;
            s.spawn(move || {
                for i in 0..5000u64 {
                    let r = Record {
                        queue: q,
                        index: i,
                        sector: i * 8,
                        len: 4096,
                        status: 0,
                        seq: Seq(i),
                        body: RecordBody::Read(ReadBody {
                            extents: vec![LogExtent::Mapped {
                                pba: Pba(u64::from(q) * 1_000_000 + i),
                                blocks: 1,
                            }],
                            data: None,
                        }),
                    };
                    w.append(&r).unwrap();
                    if i % 1000 == 0 {
                        w.sync().unwrap();
                    }
                }
            });
        }
    });
    drop(w);
    let idx = ReplayIndex::open(&path).unwrap();
    assert_eq!(idx.len(), 20_000);
    for q in 0..4u16 {
        assert_eq!(idx.queue_len(q), 5000);
        for i in [0u64, 1, 2500, 4999] {
            let (pos, r) = idx.get(q, (0, i, 0)).unwrap();
            assert_eq!(pos as u64, i);
            assert_eq!(r.queue, q);
            assert_eq!(r.index, i);
            let RecordBody::Read(b) = r.body else {
                panic!("not a read")
            };
            assert_eq!(
                b.extents,
                vec![LogExtent::Mapped {
                    pba: Pba(u64::from(q) * 1_000_000 + i),
                    blocks: 1
                }]
            );
        }
    }
}

#[test]
fn the_periodic_sync_writes_out_a_partial_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.log");
    let w = LogWriter::create(
        &path,
        &header(RecordMode::BlockId),
        Duration::from_millis(10),
    )
    .unwrap();
    w.append(&workload(1, false)[0]).unwrap();
    // No explicit sync: the timer must write the frame. Generous deadline, not a speed test.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&path).unwrap().len() == HEADER_LEN as u64 || w.stats().syncs == 0 {
        assert!(Instant::now() < deadline, "the periodic sync never ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (got, dropped) = read_all(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(dropped, None);
}

/// A flush record of queue 0 (the sector only tells records apart).
fn flush_rec(index: u64, sector: u64) -> Record {
    Record {
        queue: 0,
        index,
        sector,
        len: 0,
        status: 0,
        seq: Seq(0),
        body: RecordBody::Flush,
    }
}

#[test]
fn per_connection_logs_key_repeated_indexes_and_reconnections_apart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.log");
    let mk = flush_rec;
    // A log of the first format (feature bit 0 clear). First connection: indexes 0..3, index
    // 1 calling the device twice; the second connection starts again at 0.
    let recs = vec![mk(0, 1), mk(1, 2), mk(1, 9), mk(2, 3), mk(0, 4), mk(1, 5)];
    let h = LogHeader {
        indices: rr_row::record::IndexKeying::PerConnection,
        streams: rr_row::record::LogStreams::Single,
        ..header(RecordMode::BlockId)
    };
    let w = LogWriter::create(&path, &h, Duration::ZERO).unwrap();
    for r in &recs {
        w.append(r).unwrap();
    }
    w.finish().unwrap();
    let idx = ReplayIndex::open(&path).unwrap();
    assert_eq!(idx.get(0, (0, 1, 0)).unwrap().1.sector, 2);
    assert_eq!(idx.get(0, (0, 1, 1)).unwrap().1.sector, 9);
    assert_eq!(idx.get(0, (0, 2, 0)).unwrap().1.sector, 3);
    assert_eq!(idx.get(0, (1, 0, 0)).unwrap().1.sector, 4);
    assert_eq!(idx.get(0, (1, 1, 0)).unwrap().1.sector, 5);
    assert!(idx.get(0, (1, 2, 0)).is_none());
    assert!(idx.get(1, (0, 0, 0)).is_none());
}

#[test]
fn continuous_logs_find_requests_recorded_out_of_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.log");
    let mk = flush_rec;
    // Requests of one batch ran in parallel: logged out of index order, and request 3's two
    // calls interleaved with request 2's.
    let recs = vec![mk(1, 1), mk(0, 2), mk(3, 3), mk(2, 4), mk(3, 5), mk(4, 6)];
    write_log(&path, RecordMode::BlockId, &recs, 0);
    let idx = ReplayIndex::open(&path).unwrap();
    for (key, sector) in [
        ((0, 0, 0), 2),
        ((0, 1, 0), 1),
        ((0, 2, 0), 4),
        ((0, 3, 0), 3),
        ((0, 3, 1), 5),
        ((0, 4, 0), 6),
    ] {
        assert_eq!(idx.get(0, key).unwrap().1.sector, sector, "{key:?}");
    }
    assert!(idx.get(0, (1, 0, 0)).is_none());
    assert_eq!(idx.queue_len(0), 6);
}

/// A log whose frames come from several streams: request 0's second call is written after
/// 200,000 other requests of its queue (its thread's frame was written early by a sync, its
/// next one late). Its calls keep their numbers. (`QueueEpoch`, which bounds how far apart in
/// the log one request's calls are - true of single-stream logs - would number the second call
/// 0 again; per-thread streams have no such bound, so the index does not use it.)
#[test]
fn calls_of_one_request_any_distance_apart_keep_their_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("far.log");
    let w = LogWriter::create(&path, &header(RecordMode::BlockId), Duration::ZERO).unwrap();
    let far = 200_000u64;
    w.append(&flush_rec(0, 1)).unwrap();
    w.sync().unwrap();
    for i in 1..=far {
        w.append(&flush_rec(i, 10 + i)).unwrap();
    }
    w.sync().unwrap();
    w.append(&flush_rec(0, 2)).unwrap();
    w.finish().unwrap();

    let mut windowed = rr_row::record::QueueEpoch::new(rr_row::record::IndexKeying::Continuous);
    let keys: Vec<_> = std::iter::once(0)
        .chain(1..=far)
        .chain(std::iter::once(0))
        .map(|i| windowed.key(i))
        .collect();
    assert_eq!(keys.last(), Some(&(0, 0, 0)), "the windowed keying forgets");

    let idx = ReplayIndex::open(&path).unwrap();
    assert_eq!(idx.len(), far + 2);
    assert_eq!(idx.get(0, (0, 0, 0)).unwrap().1.sector, 1);
    assert_eq!(idx.get(0, (0, 0, 1)).unwrap().1.sector, 2);
    assert_eq!(idx.get(0, (0, far, 0)).unwrap().1.sector, 10 + far);
    assert!(idx.get(0, (0, 0, 2)).is_none());
}

/// A log as the writer made it before per-thread streams: header feature bits 0 only, one
/// stream whose records of a queue are out of order only within a batch. Built byte by byte
/// (header, then `len crc payload` frames of records encoded with a delta state reset per
/// frame), so it does not depend on today's writer.
#[test]
fn single_stream_logs_still_read_and_replay() {
    use rr_row::record::format::{frame_header, Codec};
    let h = LogHeader {
        streams: rr_row::record::LogStreams::Single,
        ..header(RecordMode::BlockId)
    };
    let mut bytes = h.encode().to_vec();
    assert_eq!(bytes[12..16], [1, 0, 0, 0]);
    let recs = workload(300, false);
    for frame in recs.chunks(70) {
        let mut c = Codec::new(BlockSize::DEFAULT);
        let mut payload = Vec::new();
        for r in frame {
            c.encode(r, &mut payload).unwrap();
        }
        bytes.extend_from_slice(&frame_header(&payload).unwrap());
        bytes.extend_from_slice(&payload);
    }
    let (got, dropped) = read_all(&bytes).unwrap();
    assert_eq!(got, recs);
    assert_eq!(dropped, None);
    let r = LogReader::new(&bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(r.header().streams, rr_row::record::LogStreams::Single);
    let idx = ReplayIndex::build(r).unwrap();
    assert_eq!(idx.len(), 300);
    for r in &recs {
        let (_, got) = idx.get(r.queue, (0, r.index, 0)).unwrap();
        assert_eq!(&got, r);
    }
}

/// Threads that append to one writer: with per-thread streams each thread's records reach the
/// file in frames of their own; with a single stream (the first logs) they share one frame.
#[test]
fn threads_get_frames_of_their_own_unless_the_log_has_one_stream() {
    for (streams, max_frames) in [
        (rr_row::record::LogStreams::PerThread, 4),
        (rr_row::record::LogStreams::Single, 1),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.log");
        let h = LogHeader {
            streams,
            ..header(RecordMode::BlockId)
        };
        let w = LogWriter::create(&path, &h, Duration::ZERO).unwrap();
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|s| {
            for q in 0..4u16 {
                let (w, barrier) = (&w, &barrier);
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..100 {
                        w.append(&Record {
                            queue: q,
                            ..flush_rec(i, i)
                        })
                        .unwrap();
                    }
                    // Every thread has appended before any thread's records are written.
                    barrier.wait();
                });
            }
        });
        let st = w.finish().unwrap();
        assert_eq!(st.records, 400);
        // Four threads get four streams, unless two of their numbers (given per process, in
        // the order threads first append) are STREAMS apart; one stream means one frame.
        assert!(
            (1..=max_frames).contains(&st.frames),
            "{streams:?}: {} frames",
            st.frames
        );
        if streams == rr_row::record::LogStreams::Single {
            assert_eq!(st.frames, 1);
        }
        let idx = ReplayIndex::open(&path).unwrap();
        for q in 0..4u16 {
            assert_eq!(idx.queue_len(q), 100);
        }
    }
}

mod props {
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = Record> {
        let extent = prop_oneof![
            (any::<u64>(), 1u64..1 << 40).prop_map(|(p, b)| LogExtent::Mapped {
                pba: Pba(p),
                blocks: b
            }),
            (1u64..1 << 40).prop_map(|b| LogExtent::Zero { blocks: b }),
            (any::<u64>(), 1u64..1 << 40).prop_map(|(l, b)| LogExtent::Base {
                lba: Lba(l),
                blocks: b
            }),
        ];
        let body = prop_oneof![
            prop::collection::vec(extent, 0..4).prop_map(|extents| RecordBody::Read(ReadBody {
                extents,
                data: None
            })),
            (any::<u64>(), 1u64..1000, any::<[u8; HASH_LEN]>()).prop_map(|(p, b, hash)| {
                RecordBody::Write {
                    first_pba: Pba(p),
                    blocks: b,
                    hash,
                }
            }),
            Just(RecordBody::Flush),
            Just(RecordBody::Discard),
            any::<bool>().prop_map(|unmap| RecordBody::WriteZeroes { unmap }),
            any::<u32>().prop_map(|req_type| RecordBody::Rejected { req_type }),
        ];
        (
            0u16..4,
            0u64..1000,
            any::<u64>(),
            0u64..1 << 20,
            0u8..4,
            any::<u64>(),
            body,
        )
            .prop_map(|(queue, index, sector, len, status, seq, body)| Record {
                queue,
                index,
                sector,
                len: len * 512,
                status,
                seq: Seq(seq),
                body,
            })
    }

    /// A thread's records: its own queue, indices counting up, every other request making two
    /// calls (like a write followed by the flush of a write-through cache), and some records
    /// large enough (full-mode data) that frames fill up and are written by the thread itself.
    fn thread_records(q: u16, bodies: Vec<(RecordBody, bool, bool)>) -> Vec<(Record, bool)> {
        let mut index = 0u64;
        let mut out = Vec::new();
        for (i, (body, sync, big)) in bodies.into_iter().enumerate() {
            let (len, body) = if big {
                let data = vec![i as u8; 24 * 1024];
                (
                    data.len() as u64,
                    RecordBody::Read(ReadBody {
                        extents: vec![],
                        data: Some(data),
                    }),
                )
            } else {
                (4096, body)
            };
            out.push((
                Record {
                    queue: q,
                    index,
                    sector: i as u64,
                    len,
                    status: 0,
                    seq: Seq(i as u64),
                    body,
                },
                sync,
            ));
            // Odd records start a new request; even ones after the first are second calls.
            if i % 2 == 1 {
                index += 1;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Many threads appending at once (each syncing now and then, some filling frames):
        /// the file holds exactly the records appended, each thread's in its order; every cut
        /// of the file holds a prefix of each thread's records; and the replay index finds
        /// every call of every request under its number.
        #[test]
        fn concurrent_appends_read_back_exactly(
            threads in prop::collection::vec(
                prop::collection::vec(
                    (arb_record().prop_map(|r| r.body), prop::bool::weighted(0.05),
                     prop::bool::weighted(0.1)),
                    1..120,
                ),
                2..7,
            ),
            cut_frac in 0.0f64..1.0,
        ) {
            let per_thread: Vec<Vec<(Record, bool)>> = threads
                .into_iter()
                .enumerate()
                .map(|(q, b)| thread_records(q as u16, b))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("c.log");
            let w = LogWriter::create(&path, &header(RecordMode::Full), Duration::ZERO).unwrap();
            let barrier = std::sync::Barrier::new(per_thread.len());
            std::thread::scope(|s| {
                for recs in &per_thread {
                    let (w, barrier) = (&w, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        for (r, sync) in recs {
                            w.append(r).unwrap();
                            if *sync {
                                w.sync().unwrap();
                            }
                        }
                    });
                }
            });
            let st = w.finish().unwrap();
            let total: usize = per_thread.iter().map(Vec::len).sum();
            prop_assert_eq!(st.records, total as u64);
            let bytes = std::fs::read(&path).unwrap();
            prop_assert_eq!(st.bytes, bytes.len() as u64);

            let by_queue = |recs: &[Record]| -> Vec<Vec<Record>> {
                let mut v = vec![Vec::new(); per_thread.len()];
                for r in recs {
                    v[usize::from(r.queue)].push(r.clone());
                }
                v
            };
            let (got, dropped) = read_all(&bytes).unwrap();
            prop_assert_eq!(dropped, None);
            prop_assert_eq!(got.len(), total);
            let got = by_queue(&got);
            for (q, recs) in per_thread.iter().enumerate() {
                let want: Vec<Record> = recs.iter().map(|(r, _)| r.clone()).collect();
                prop_assert_eq!(&got[q], &want, "thread {}", q);
            }

            let cut = HEADER_LEN + ((bytes.len() - HEADER_LEN) as f64 * cut_frac) as usize;
            let (got, _) = read_all(&bytes[..cut]).unwrap();
            for (q, part) in by_queue(&got).iter().enumerate() {
                let want: Vec<Record> = per_thread[q].iter().map(|(r, _)| r.clone()).collect();
                prop_assert!(want.starts_with(part), "thread {}: not a prefix", q);
            }

            let idx = ReplayIndex::open(&path).unwrap();
            prop_assert_eq!(idx.len(), total as u64);
            for recs in &per_thread {
                let mut sub = 0u32;
                let mut prev = None;
                for (r, _) in recs {
                    sub = if prev == Some(r.index) { sub + 1 } else { 0 };
                    prev = Some(r.index);
                    let found = idx.get(r.queue, (0, r.index, sub)).map(|(_, f)| f);
                    prop_assert_eq!(found.as_ref(), Some(r));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Whatever the records and wherever the syncs cut frames, the file reads back the same,
        /// and every cut of it reads back a prefix.
        #[test]
        fn files_round_trip_and_cuts_give_prefixes(
            recs in prop::collection::vec((arb_record(), any::<bool>()), 1..60),
            cut_frac in 0.0f64..1.0,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("p.log");
            let w = LogWriter::create(&path, &header(RecordMode::BlockId), Duration::ZERO).unwrap();
            for (r, sync) in &recs {
                w.append(r).unwrap();
                if *sync {
                    w.sync().unwrap();
                }
            }
            drop(w);
            let bytes = std::fs::read(&path).unwrap();
            let all: Vec<Record> = recs.iter().map(|(r, _)| r.clone()).collect();
            let (got, dropped) = read_all(&bytes).unwrap();
            prop_assert_eq!(&got, &all);
            prop_assert_eq!(dropped, None);
            let cut = HEADER_LEN + ((bytes.len() - HEADER_LEN) as f64 * cut_frac) as usize;
            let (got, _) = read_all(&bytes[..cut]).unwrap();
            prop_assert!(all.starts_with(&got));
        }
    }
}

#[test]
fn an_unencodable_record_is_refused_and_leaves_the_log_intact() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.log");
    let recs = workload(10, false);
    let w = LogWriter::create(&path, &header(RecordMode::BlockId), Duration::ZERO).unwrap();
    w.append(&recs[0]).unwrap();
    let mut bad = recs[1].clone();
    bad.body = RecordBody::Read(ReadBody {
        extents: vec![
            LogExtent::Mapped {
                pba: Pba(77),
                blocks: 1,
            },
            LogExtent::Zero { blocks: u64::MAX },
        ],
        data: None,
    });
    assert!(matches!(w.append(&bad), Err(RecordError::Encode(_))));
    let mut short = recs[1].clone();
    short.body = RecordBody::Read(ReadBody {
        extents: vec![],
        data: Some(vec![1, 2, 3]),
    });
    assert!(matches!(w.append(&short), Err(RecordError::Encode(_))));
    for r in &recs[1..] {
        w.append(r).unwrap();
    }
    w.finish().unwrap();
    let (got, dropped) = read_all(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(got, recs);
    assert_eq!(dropped, None);
}

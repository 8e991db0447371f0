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

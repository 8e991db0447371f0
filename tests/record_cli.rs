//! `rr-row log info` and `rr-row log dump` on real logs, torn logs and garbage.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::image::create_image;
use common::rr_row_output;
use rr_row::blockdev::record_dev::RecordingDevice;
use rr_row::blockdev::{BlockDevice, RequestCtx};
use rr_row::iobuf::IoSeg;
use rr_row::record::{LogReader, RecordMode};
use rr_row::units::BlockSize;

/// Records 300 4 KiB reads, 50 writes and a flush on a fresh image; returns the log path.
fn make_log(dir: &Path, mode: RecordMode, name: &str) -> std::path::PathBuf {
    let img_path = dir.join(format!("{name}.rrow"));
    let img = Arc::new(create_image(&img_path, 4 << 20, 4096));
    let log = dir.join(format!("{name}.log"));
    let dev =
        RecordingDevice::with_sync_interval(Arc::clone(&img), &log, mode, Duration::ZERO).unwrap();
    let mut index = 0u64;
    let mut ctx = || {
        index += 1;
        RequestCtx {
            queue: 0,
            index: index - 1,
        }
    };
    for i in 0..50u64 {
        let data = vec![i as u8; 4096];
        dev.write(&ctx(), i * 4096, &[IoSeg::from_slice(&data)])
            .unwrap();
    }
    for i in 0..300u64 {
        let mut buf = vec![0u8; 4096];
        dev.read(&ctx(), (i % 100) * 4096, &[IoSeg::from_mut_slice(&mut buf)])
            .unwrap();
    }
    dev.flush(&ctx()).unwrap();
    dev.finish().unwrap();
    log
}

#[test]
fn info_reports_counts_bytes_and_the_full_mode_cost() {
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path(), RecordMode::BlockId, "a");
    let full = make_log(dir.path(), RecordMode::Full, "b");
    let out = rr_row_output(&["log", "info", log.to_str().unwrap(), "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header"]["mode"], "block-id");
    assert_eq!(v["header"]["request_indices"], "continuous");
    assert_eq!(v["header"]["streams"], "per-thread");
    assert_eq!(v["records"], 351);
    assert_eq!(v["kinds"]["read"]["count"], 300);
    assert_eq!(v["kinds"]["write"]["count"], 50);
    assert_eq!(v["kinds"]["flush"]["count"], 1);
    assert_eq!(v["kinds"]["read"]["request_bytes"], 300 * 4096);
    let size = std::fs::metadata(&log).unwrap().len();
    assert_eq!(v["file_bytes"], size);
    // The estimate of the same run in full mode is the size of the real full-mode log.
    let full_size = std::fs::metadata(&full).unwrap().len();
    assert_eq!(v["full_mode_bytes"], full_size);

    let out = rr_row_output(&["log", "info", full.to_str().unwrap(), "--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["header"]["mode"], "full");
    assert!(v["full_mode_bytes"].is_null());

    let out = rr_row_output(&["log", "info", log.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("record mode:    block-id"), "{text}");
    assert!(text.contains("same run in full mode:"), "{text}");
}

#[test]
fn dump_prints_one_line_per_record() {
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path(), RecordMode::BlockId, "a");
    let recs: Vec<_> = LogReader::open(&log)
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let out = rr_row_output(&["log", "dump", log.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), recs.len());
    for (l, r) in lines.iter().zip(&recs) {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        assert_eq!(v["index"], r.index);
        assert_eq!(v["kind"], r.kind_name());
        assert_eq!(v["sector"], r.sector);
    }
    let out = rr_row_output(&["log", "dump", log.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("# record log v1 mode=block-id"));
    assert_eq!(lines.len(), recs.len() + 1);
    assert_eq!(lines[1], recs[0].to_string());
}

#[test]
fn torn_and_broken_logs_are_reported_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path(), RecordMode::BlockId, "a");
    let bytes = std::fs::read(&log).unwrap();

    let torn = dir.path().join("torn.log");
    std::fs::write(&torn, &bytes[..bytes.len() - 10]).unwrap();
    let out = rr_row_output(&["log", "info", torn.to_str().unwrap(), "--output", "json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["torn_tail"]["dropped_bytes"], bytes.len() - 10 - 80);
    let out = rr_row_output(&["log", "dump", torn.to_str().unwrap()]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("torn tail"));

    let garbage = dir.path().join("garbage.log");
    std::fs::write(&garbage, b"this is not a log at all, not even close").unwrap();
    for cmd in ["info", "dump"] {
        let out = rr_row_output(&["log", cmd, garbage.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains("not an RR-Row record log"), "{err}");
    }

    let missing = dir.path().join("nope.log");
    let out = rr_row_output(&["log", "info", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("No such file"));
}

#[test]
fn info_on_a_log_damaged_in_the_middle_reports_the_readable_part_and_fails() {
    use rr_row::record::format::{LogHeader, VERSION};
    use rr_row::record::{LogWriter, Record, RecordBody};
    use rr_row::units::Seq;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("d.log");
    let w = LogWriter::create(
        &log,
        &LogHeader {
            version: VERSION,
            mode: RecordMode::BlockId,
            block_size: BlockSize::DEFAULT,
            image_uuid: [1; 16],
            start_seq: Seq(0),
            image_size: 1 << 20,
            created_unix_ns: 0,
            write_hash: rr_row::record::format::WriteHash::default(),
            indices: rr_row::record::IndexKeying::default(),
            streams: rr_row::record::LogStreams::default(),
        },
        Duration::ZERO,
    )
    .unwrap();
    for i in 0..30u64 {
        w.append(&Record {
            queue: 0,
            index: i,
            sector: i * 8,
            len: 4096,
            status: 0,
            seq: Seq(0),
            body: RecordBody::Discard,
        })
        .unwrap();
        if i % 10 == 9 {
            w.sync().unwrap();
        }
    }
    w.finish().unwrap();
    // Three frames of ten records; damage the second one's payload.
    let mut bytes = std::fs::read(&log).unwrap();
    let first_len = u32::from_le_bytes(bytes[80..84].try_into().unwrap()) as usize;
    let second = 80 + 8 + first_len;
    bytes[second + 10] ^= 0xff;
    std::fs::write(&log, &bytes).unwrap();
    let out = rr_row_output(&["log", "info", log.to_str().unwrap(), "--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["records"], 10);
    let damage = v["damage"].as_str().unwrap();
    assert!(
        damage.contains(&format!("frame at byte {second} is corrupt")),
        "{damage}"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("checksum mismatch"), "{err}");
}

//! The paper's headline, in-process: the same request streams recorded in block-id and full
//! mode through `RecordingDevice` (the code the daemon runs), and the log sizes compared.
//! Read-heavy runs must cost at most 1% of the full log. `cargo test --test record_sizes --
//! --nocapture` prints the table quoted in docs/record-log.md.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::image::{create_image, write_random};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use rr_row::blockdev::record_dev::RecordingDevice;
use rr_row::blockdev::{BlockDevice, RequestCtx};
use rr_row::image::Image;
use rr_row::iobuf::IoSeg;
use rr_row::record::RecordMode;

const SIZE: u64 = 64 << 20;

#[derive(Clone, Copy)]
enum Op {
    Read(u64, usize),
    Write(u64, usize),
}

fn image(dir: &Path) -> Arc<Image> {
    let img = create_image(&dir.join("disk.rrow"), SIZE, 4096);
    // A fully written disk, as after an OS install.
    write_random(&img, 9, 1 << 20, 1 << 20);
    Arc::new(img)
}

fn record(img: &Arc<Image>, log: &Path, mode: RecordMode, ops: &[Op]) -> u64 {
    let dev =
        RecordingDevice::with_sync_interval(Arc::clone(img), log, mode, Duration::ZERO).unwrap();
    let mut buf = vec![0x5au8; 1 << 20];
    for (i, op) in ops.iter().enumerate() {
        let ctx = RequestCtx {
            queue: 0,
            index: i as u64,
        };
        match *op {
            Op::Read(off, len) => dev
                .read(&ctx, off, &[IoSeg::from_mut_slice(&mut buf[..len])])
                .unwrap(),
            Op::Write(off, len) => dev
                .write(&ctx, off, &[IoSeg::from_slice(&buf[..len])])
                .unwrap(),
        }
        if i % 1000 == 999 {
            dev.flush(&ctx).unwrap();
        }
    }
    dev.finish().unwrap().bytes
}

fn workloads() -> Vec<(&'static str, Vec<Op>, bool)> {
    let mut rng = StdRng::seed_from_u64(1);
    let blocks = SIZE / 4096;
    let rand4k: Vec<Op> = (0..20_000)
        .map(|_| Op::Read(rng.gen_range(0..blocks) * 4096, 4096))
        .collect();
    let seq64k: Vec<Op> = (0..4096u64)
        .map(|i| Op::Read(i * 65536 % SIZE, 65536))
        .collect();
    let mix: Vec<Op> = (0..20_000)
        .map(|_| {
            let off = rng.gen_range(0..blocks) * 4096;
            if rng.gen_range(0..10) < 7 {
                Op::Read(off, 4096)
            } else {
                Op::Write(off, 4096)
            }
        })
        .collect();
    vec![
        ("random 4 KiB reads", rand4k, true),
        ("sequential 64 KiB reads", seq64k, true),
        ("70/30 random 4 KiB read/write", mix, false),
    ]
}

#[test]
fn block_id_logs_are_at_most_one_percent_of_full_logs_for_read_heavy_runs() {
    println!("| workload | requests | block-id log | full log | block-id / full |");
    println!("|---|---:|---:|---:|---:|");
    for (name, ops, read_heavy) in workloads() {
        let dir = tempfile::tempdir().unwrap();
        let img = image(dir.path());
        let a = record(&img, &dir.path().join("a.log"), RecordMode::BlockId, &ops);
        let b = record(&img, &dir.path().join("b.log"), RecordMode::Full, &ops);
        let ratio = a as f64 / b as f64;
        println!(
            "| {name} | {} | {a} B | {b} B | {:.3}% |",
            ops.len(),
            100.0 * ratio
        );
        if read_heavy {
            assert!(ratio <= 0.01, "{name}: {a} vs {b} bytes");
        } else {
            assert!(ratio < 0.05, "{name}: {a} vs {b} bytes");
        }
    }
}

//! Record and replay end to end with a real Linux guest (Debian's kernel under QEMU TCG) whose
//! disk is `rr-row serve`.
//!
//! `a_guest_run_replays_with_the_recorded_checksums`:
//! - The image is created over a 16 MiB raw base image (random bytes), so the guest reads base
//!   blocks, never-written (zero) blocks and blocks written by itself.
//! - Boot 1 (`serve --record`) runs the `workload` phase of `tests/guest/record-init.sh`: it
//!   reads regions with O_DIRECT and prints their SHA-256, writes a pattern (128 KiB requests,
//!   then fsync: a FLUSH), makes writes that start or end inside a 4 KiB block, discards a MiB,
//!   and prints the sums again.
//! - Boot 2 (plain serve) overwrites the first 40 MiB with random data: the sums change.
//! - Boot 3 (`serve --replay` of boot 1's log, `--on-divergence stop`) runs the same phase:
//!   the guest must print exactly the sums of boot 1, the daemon must log no divergence and
//!   exit 0 (every record matched), and the image must be unchanged (seq, exported bytes).
//!
//! What makes the guest send the same request stream on every boot (a replay matches requests
//! by queue and per-queue index, and checks kind, sector and length):
//! - One vCPU and one virtqueue: with several, requests spread over queues by whichever CPU
//!   the scheduler ran the process on, and the per-queue order changes from boot to boot.
//! - I/O scheduler `none`: requests reach the ring in the order the process issued them.
//! - Every data request is O_DIRECT (busybox `dd iflag=direct/oflag=direct`) from one process
//!   at a time: no page cache (a cached read sends nothing), no readahead (its size depends on
//!   history), no background writeback (its timing is not the program's). `conv=fsync` gives an
//!   explicit FLUSH at a fixed point.
//! - No filesystem is mounted on the disk (ext4's journal commits run on a 5 s timer).
//! - The data written comes from a pattern file in the initramfs, never /dev/urandom: a replay
//!   checks every write's hash.
//! - What the guest does by itself at boot was checked in the recorded log, not assumed: the
//!   first records are Linux's partition scan when virtio_blk loads (4 KiB reads at sectors 0,
//!   8 and 24), and SeaBIOS, which starts the device before Linux, sends no request (the kernel
//!   is booted with `-kernel`). The scan's reads depend only on what the disk returns, which the
//!   replay reproduces. The test requires the replay to match every record of the log with no
//!   divergence, so any boot-time request that differed would fail it; nothing in the daemon's
//!   checking is relaxed for this test.
//!
//! `guest_boot_and_file_copy_log_sizes`: the log-size headline for a guest (docs/log-size.md).
//! A setup boot makes ext4 on the disk with a 24 MiB file; the image is copied twice; the same
//! boot (mount, `cp` of the file, sync, unmount) is recorded once in `block-id` mode and once in
//! `full` mode. The block-id log must be at most 1% of the full one. With
//! `RR_ROW_LOG_SIZES_OUT=FILE` set, the sizes are also written there as JSON (scripts/log-sizes.py
//! uses that).
//!
//! Needs the assets of `scripts/guest-assets.sh` (`RR_ROW_TEST_ASSETS`); fails if they are
//! missing.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::daemon::{start_rr_row, Daemon, ServeOpts};
use common::guest::{boot, build_initramfs, Assets, GuestOpts, GuestRun};
use common::{arg, export, image_seq, log_info, rr_row, tempdir};
use rand::{RngCore, SeedableRng};

const DISK_SIZE: u64 = 64 << 20;
const BASE_SIZE: usize = 16 << 20;
const PATTERN_LEN: usize = 8 << 20;
const BOOT_LIMIT: Duration = Duration::from_secs(100);
const EXIT_LIMIT: Duration = Duration::from_secs(30);
const INIT: &str = include_str!("guest/record-init.sh");

fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

fn guest_opts(dir: &Path, daemon: &Daemon, initramfs: &Path, phase: &str, n: u32) -> GuestOpts {
    GuestOpts {
        socket: daemon.socket().to_owned(),
        initramfs: initramfs.to_owned(),
        cmdline: format!("rrrow.phase={phase}"),
        cpus: 1,
        mem_mib: 256,
        console_log: dir.join(format!("console-{n}-{phase}.log")),
        limit: BOOT_LIMIT,
    }
}

/// The phase finished without a failure, on the one queue the deterministic replay needs.
fn assert_phase_done(run: &GuestRun, phase: &str) {
    run.assert_phase_done(phase);
    assert_eq!(run.report("queues"), "1", "console:\n{}", run.console);
}

/// Every `sum-*` report of a boot, in order.
fn sums(run: &GuestRun) -> Vec<(String, String)> {
    run.console
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("RRROW: sum-"))
        .filter_map(|(_, rest)| rest.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn serve(dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
    let mut o = ServeOpts::new(image, DISK_SIZE);
    o.queues = 1;
    o.extra = extra.iter().map(|s| (*s).to_owned()).collect();
    // Per-request debug lines of the virtio layer, to compare request streams on failure.
    o.rust_log = Some("info,rr_row::virtio_blk=debug");
    start_rr_row(dir, &o)
}

/// SIGTERM, and the exit code must be `code`; returns the daemon's whole log (the log file
/// of `common::daemon::start_rr_row` in `dir`).
fn stop(daemon: Daemon, dir: &Path, code: i32) -> String {
    let status = daemon.signal_and_wait(libc::SIGTERM, EXIT_LIMIT);
    let log = std::fs::read_to_string(dir.join("rr-row.log")).unwrap_or_default();
    assert_eq!(
        status.code(),
        Some(code),
        "rr-row serve exited with {status}; its log:\n{log}"
    );
    log
}

fn create_image(image: &Path, base: Option<&Path>) {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "create".as_ref(),
        arg(image),
        "--size".as_ref(),
        "64M".as_ref(),
    ];
    if let Some(b) = base {
        args.push("--base".as_ref());
        args.push(arg(b));
    }
    let (code, o, e) = rr_row(&args);
    assert_eq!(code, 0, "rr-row create: {o}{e}");
}

fn sha256_hex(data: &[u8]) -> String {
    let out = std::process::Command::new(common::require_tool("sha256sum"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().expect("stdin").write_all(data)?;
            c.wait_with_output()
        })
        .expect("cannot run sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

#[test]
fn a_guest_run_replays_with_the_recorded_checksums() {
    let assets = Assets::get();
    let dir = tempdir();
    let d = dir.path();
    let base = d.join("base.raw");
    let base_data = random_bytes(0xba5e, BASE_SIZE);
    std::fs::write(&base, &base_data).expect("write the base image");
    let image = d.join("disk.rrow");
    create_image(&image, Some(&base));
    let log = d.join("boot1.log");
    let initramfs = d.join("initramfs.cpio");
    build_initramfs(
        &assets,
        INIT,
        &[("pattern.bin", &random_bytes(0x7a77, PATTERN_LEN))],
        &initramfs,
    );

    // Boot 1: record.
    let daemon = serve(d, &image, &["--record", log.to_str().expect("UTF-8 path")]);
    let run1 = boot(&assets, &guest_opts(d, &daemon, &initramfs, "workload", 1));
    stop(daemon, d, 0);
    assert_phase_done(&run1, "workload");
    let sums1 = sums(&run1);
    assert_eq!(sums1.len(), 10, "console:\n{}", run1.console);
    // The first read of the base region saw the base image.
    assert_eq!(sums1[0], ("base".into(), sha256_hex(&base_data[..8 << 20])));
    assert_eq!(sums1[2], ("zero".into(), sha256_hex(&[0u8; 4 << 20])));
    // The writes changed what the guest read back.
    assert_ne!(sums1[1], sums1[6], "the pattern write changed nothing");
    assert_ne!(sums1[3], sums1[8], "the sub-block writes changed nothing");
    let info = log_info(&log);
    let kinds = info["kinds"].as_object().expect("kinds");
    for k in ["read", "write", "flush", "discard"] {
        assert!(
            kinds.get(k).is_some_and(|v| v["count"].as_u64() > Some(0)),
            "boot 1 recorded no {k}: {info}"
        );
    }

    // The guest's reads came from all three sources: base image, written blocks, zeros.
    let (code, out, err) = rr_row(&[
        "log".as_ref(),
        "dump".as_ref(),
        arg(&log),
        "--output".as_ref(),
        "json".as_ref(),
    ]);
    assert_eq!(code, 0, "rr-row log dump: {err}");
    for source in ["base", "mapped", "zero"] {
        assert!(
            out.contains(&format!("{{\"{source}\":")),
            "no read of boot 1 was served from a {source} extent"
        );
    }

    // Boot 2: a later session overwrites the first 40 MiB.
    let daemon = serve(d, &image, &[]);
    let run2 = boot(&assets, &guest_opts(d, &daemon, &initramfs, "overwrite", 2));
    stop(daemon, d, 0);
    assert_phase_done(&run2, "overwrite");
    let sums2 = sums(&run2);
    assert_eq!(sums2.len(), 5, "console:\n{}", run2.console);
    for (a, b) in sums2.iter().zip(&sums1[5..]) {
        assert_ne!(a, b, "the overwrite left region {} as boot 1 left it", a.0);
    }
    let seq = image_seq(&image);
    let before = export(&image, &d.join("before.raw"));

    // Boot 3: replay boot 1's log with the same guest.
    let daemon = serve(d, &image, &["--replay", log.to_str().expect("UTF-8 path")]);
    let run3 = boot(&assets, &guest_opts(d, &daemon, &initramfs, "workload", 3));
    let text = daemon.log_text();
    assert!(
        !text.contains("diverged"),
        "the replayed guest diverged from the recorded one:\n{}",
        text.lines()
            .filter(|l| l.contains("diverged") || l.contains("replay"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let text = stop(daemon, d, 0);
    assert_phase_done(&run3, "workload");
    assert_eq!(
        sums(&run3),
        sums1,
        "the replayed guest read other data than the recorded one"
    );
    let summary = text
        .lines()
        .find(|l| l.contains("replay: "))
        .unwrap_or_else(|| panic!("no replay summary in the daemon's log:\n{text}"));
    let records = info["records"].as_u64().expect("records");
    assert!(
        summary.contains(&format!(
            "{records} of {records} records matched, 0 divergences"
        )),
        "{summary}"
    );
    assert_eq!(image_seq(&image), seq, "the replay changed the image's seq");
    assert!(
        export(&image, &d.join("after.raw")) == before,
        "the replay changed the disk"
    );
    eprintln!(
        "record/replay guest: {records} records, log {} bytes; boots took {:?}, {:?}, {:?}",
        info["file_bytes"], run1.elapsed, run2.elapsed, run3.elapsed
    );
}

/// Sizes of one recorded guest run.
struct Recorded {
    file_bytes: u64,
    records: u64,
    full_estimate: Option<u64>,
}

fn record_copy(
    assets: &Assets,
    d: &Path,
    image: &Path,
    initramfs: &Path,
    mode: &str,
) -> (Recorded, String) {
    let log = d.join(format!("copy-{mode}.log"));
    let daemon = serve(
        d,
        image,
        &[
            "--record",
            log.to_str().expect("UTF-8 path"),
            "--record-mode",
            mode,
        ],
    );
    let n = if mode == "full" { 3 } else { 2 };
    let run = boot(assets, &guest_opts(d, &daemon, initramfs, "copy", n));
    stop(daemon, d, 0);
    assert_phase_done(&run, "copy");
    let info = log_info(&log);
    (
        Recorded {
            file_bytes: info["file_bytes"].as_u64().expect("file_bytes"),
            records: info["records"].as_u64().expect("records"),
            full_estimate: info["full_mode_bytes"].as_u64(),
        },
        run.report("sum-dst"),
    )
}

#[test]
fn guest_boot_and_file_copy_log_sizes() {
    let assets = Assets::get();
    let dir = tempdir();
    let d = dir.path();
    let initramfs = d.join("initramfs.cpio");
    build_initramfs(&assets, INIT, &[], &initramfs);
    let image = d.join("setup.rrow");
    create_image(&image, None);
    let daemon = serve(d, &image, &[]);
    let run = boot(&assets, &guest_opts(d, &daemon, &initramfs, "mkfs", 1));
    stop(daemon, d, 0);
    assert_phase_done(&run, "mkfs");
    let src = run.report("sum-src");

    let copies: Vec<PathBuf> = ["block-id", "full"]
        .iter()
        .map(|m| {
            let p = d.join(format!("{m}.rrow"));
            std::fs::copy(&image, &p).expect("copy the image");
            p
        })
        .collect();
    let (ids, sum_ids) = record_copy(&assets, d, &copies[0], &initramfs, "block-id");
    let (full, sum_full) = record_copy(&assets, d, &copies[1], &initramfs, "full");
    assert_eq!(sum_ids, src, "the copy differs from the source file");
    assert_eq!(sum_full, src, "the copy differs from the source file");
    let ratio = ids.file_bytes as f64 / full.file_bytes as f64;
    eprintln!(
        "guest boot + 24 MiB file copy: block-id log {} B ({} records), full log {} B ({} \
         records), ratio {:.4}%",
        ids.file_bytes,
        ids.records,
        full.file_bytes,
        full.records,
        100.0 * ratio
    );
    assert!(
        full.file_bytes > 24 << 20,
        "a full-mode log must hold the file's data it read"
    );
    assert!(
        ratio <= 0.01,
        "block-id log {} B is more than 1% of the full log {} B",
        ids.file_bytes,
        full.file_bytes
    );
    if let Some(out) = std::env::var_os("RR_ROW_LOG_SIZES_OUT") {
        let v = serde_json::json!({
            "workload": "guest boot + 24 MiB file copy (ext4)",
            "block_id": {"file_bytes": ids.file_bytes, "records": ids.records,
                         "full_mode_estimate": ids.full_estimate},
            "full": {"file_bytes": full.file_bytes, "records": full.records},
        });
        std::fs::write(&out, v.to_string()).expect("write RR_ROW_LOG_SIZES_OUT");
    }
}

//! End-to-end: a real Linux guest (Debian's kernel under QEMU TCG) uses `rr-row serve` as its
//! vhost-user-blk disk.
//!
//! Boot 1 writes a known 8 MiB pattern through the block layer with O_DIRECT (two concurrent
//! writers pinned to the two vCPUs, so both virtqueues are busy) and reads it back,
//! makes an ext4 filesystem with e2fsprogs' mke2fs, writes files (one rewritten in place, one
//! deleted and trimmed), records their SHA-256 sums, syncs and powers off. The daemon is then
//! stopped with SIGTERM (exit 0), `rr-row check` must find the image clean, and the pattern
//! must be in the exported image at the right place. Boot 2, on a fresh daemon over the same
//! image, reads the pattern again, runs `e2fsck -fn`, and checks every file's sum.
//!
//! The same two boots also run against qemu-storage-daemon exporting a raw file, which
//! validates the harness itself, against `rr-row serve --retain-seqs` on an image whose
//! whole first history was given back, so that the guest's writes land in reused blocks, and
//! against `rr-row serve --direct`, whose queues are pipelined (each request thread completes
//! and signals the guest on its own).
//!
//! Needs the assets of `scripts/guest-assets.sh` (`RR_ROW_TEST_ASSETS`); fails if they are
//! missing.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::daemon::{Daemon, Peer, ServeOpts};
use common::guest::{boot, build_initramfs, Assets, GuestOpts, GuestRun};
use rand::{RngCore, SeedableRng};

const DISK_SIZE: u64 = 128 << 20;
const PATTERN_OFFSET: usize = 100 << 20;
const PATTERN_LEN: usize = 8 << 20;
/// The `--serial` the guest must read back (GET_ID) from /sys/block/vda/serial.
const SERIAL: &str = "rr-row-e2e";
const BOOT_LIMIT: Duration = Duration::from_secs(100);

fn sha256_hex(data: &[u8], dir: &Path) -> String {
    let f = dir.join("sha-input");
    std::fs::write(&f, data).expect("cannot write the hash input");
    let out = Command::new(common::require_tool("sha256sum"))
        .arg(&f)
        .output()
        .expect("cannot run sha256sum");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_owned()
}

fn guest_opts(dir: &Path, socket: &Path, initramfs: &Path, phase: &str) -> GuestOpts {
    GuestOpts {
        socket: socket.to_owned(),
        initramfs: initramfs.to_owned(),
        cmdline: format!("rrrow.phase={phase}"),
        cpus: 2,
        mem_mib: 256,
        console_log: dir.join(format!("console-{phase}.log")),
        limit: BOOT_LIMIT,
    }
}

/// Parses the guest's `sum <sha256>  ./path` lines into sorted (path, sum) pairs.
fn file_sums(run: &GuestRun) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = run
        .reports("sum")
        .iter()
        .map(|l| {
            let (sum, path) = l.split_once(char::is_whitespace).expect("sum line");
            (path.trim().to_owned(), sum.to_owned())
        })
        .collect();
    v.sort();
    v
}

fn start_backend(backend: Peer, dir: &Path, image: &Path, extra: &[&str]) -> Daemon {
    let mut opts = ServeOpts::new(image, DISK_SIZE);
    opts.queues = 2;
    opts.extra = vec!["--serial".into(), SERIAL.into()];
    opts.extra.extend(extra.iter().map(|s| s.to_string()));
    // Per-request debug lines ("queue Q #N: ...") show which virtqueues carried I/O.
    opts.rust_log = Some("info,rr_row::virtio_blk=debug");
    backend.start(dir, &opts)
}

/// Stops the backend (SIGTERM must give exit 0) and returns the disk's bytes as the host sees
/// them: for rr-row, after `rr-row check` finds the image clean, through `rr-row export`.
fn stop_and_read_disk(backend: Peer, daemon: Daemon, dir: &Path, image: &Path) -> Vec<u8> {
    let status = daemon.signal_and_wait(libc::SIGTERM, Duration::from_secs(20));
    match backend {
        Peer::RrRow => {
            assert!(
                status.success(),
                "rr-row serve exited with {status} on SIGTERM"
            );
            let (code, out, err) = common::rr_row(&["check".as_ref(), common::arg(image)]);
            assert_eq!(code, 0, "rr-row check after the guest run: {out}{err}");
            let raw = dir.join("export.raw");
            let _ = std::fs::remove_file(&raw);
            let (code, out, err) = common::rr_row(&[
                "export".as_ref(),
                common::arg(image),
                common::arg(&raw),
                "--quiet".as_ref(),
            ]);
            assert_eq!(code, 0, "rr-row export: {out}{err}");
            std::fs::read(&raw).expect("cannot read the export")
        }
        // qemu-storage-daemon's own exit status on SIGTERM is not what is under test here.
        Peer::QsdRaw => std::fs::read(image).expect("cannot read the raw image"),
    }
}

/// Reclaimed blocks of an rr-row image (`rr-row info --output json`).
fn reclaimed_blocks(image: &Path) -> u64 {
    common::json_of(&[
        "info".as_ref(),
        common::arg(image),
        "--output".as_ref(),
        "json".as_ref(),
    ])["reclaimed_blocks"]
        .as_u64()
        .expect("reclaimed_blocks")
}

/// An rr-row image whose whole disk was written twice with 1 MiB writes of noise, and whose
/// history before the last state was given back (`rr-row reclaim --keep-from latest`): a
/// daemon with `--retain-seqs` starts with a disk's worth of reclaimed blocks to reuse.
fn image_with_given_back_history(image: &Path) -> u64 {
    let img = common::image::create_image(image, DISK_SIZE, 4096);
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..2 {
        for off in (0..DISK_SIZE).step_by(1 << 20) {
            rng.fill_bytes(&mut buf);
            img.write_at(off, &buf).expect("prefill");
        }
    }
    img.close().expect("close");
    let (code, out, err) = common::rr_row(&[
        "reclaim".as_ref(),
        common::arg(image),
        "--keep-from".as_ref(),
        "latest".as_ref(),
        "--quiet".as_ref(),
    ]);
    assert_eq!(code, 0, "rr-row reclaim: {out}{err}");
    let n = reclaimed_blocks(image);
    assert_eq!(n, DISK_SIZE / 4096, "the first pass is given back");
    n
}

fn two_boots(backend: Peer) {
    two_boots_with(backend, false, false)
}

/// The two boots; with `reuse`, on an rr-row image with given-back history served with
/// `--retain-seqs`, checking that boot 1's writes took reclaimed blocks; with `direct`, served
/// with `--direct` (O_DIRECT, pipelined queues), checking that the daemon said so.
fn two_boots_with(backend: Peer, reuse: bool, direct: bool) {
    let assets = Assets::get();
    let dir = common::tempdir();
    let image = dir.path().join("disk.img");
    backend.prepare_image(&image, DISK_SIZE);
    let mut extra: Vec<&str> = Vec::new();
    if reuse {
        extra.extend(["--retain-seqs", "100000"]);
    }
    if direct {
        extra.push("--direct");
    }
    let extra = &extra[..];
    let reclaimed_before = reuse.then(|| image_with_given_back_history(&image));

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5252_524f_5721);
    let mut pattern = vec![0u8; PATTERN_LEN];
    rng.fill_bytes(&mut pattern);
    let pattern_sum = sha256_hex(&pattern, dir.path());
    let initramfs = dir.path().join("initramfs.cpio");
    build_initramfs(
        &assets,
        include_str!("guest/init.sh"),
        &[("pattern.bin", &pattern)],
        &initramfs,
    );

    // Boot 1: write.
    let daemon = start_backend(backend, dir.path(), &image, extra);
    let run1 = boot(
        &assets,
        &guest_opts(dir.path(), daemon.socket(), &initramfs, "write"),
    );
    run1.assert_phase_done("write");
    assert_eq!(run1.report("disk-bytes"), DISK_SIZE.to_string());
    assert_eq!(
        run1.report("queues"),
        "2",
        "the guest should use both queues"
    );
    assert!(
        run1.report("mke2fs").starts_with("mke2fs 1."),
        "the guest must run e2fsprogs' mke2fs, not busybox's"
    );
    assert_eq!(run1.report("pattern-read"), pattern_sum);
    let sums1 = file_sums(&run1);
    let names: Vec<&str> = sums1.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        ["./big", "./dir/small", "./dir/sub/medium", "./pattern.bin"]
    );
    assert_eq!(sums1[3].1, pattern_sum);
    assert_eq!(
        run1.report("fstrim"),
        "ok",
        "the disk should accept discards"
    );

    if backend == Peer::RrRow {
        assert_eq!(
            daemon.serves_pipelined(),
            direct,
            "pipelined queues with --direct only"
        );
        let log = daemon.log_text();
        for q in 0..2 {
            assert!(
                log.contains(&format!("queue {q} #")),
                "virtqueue {q} carried no request during boot 1 (daemon log lacks \"queue {q} #\")"
            );
        }
    }

    // What the guest wrote is on the disk, at the right place.
    let disk = stop_and_read_disk(backend, daemon, dir.path(), &image);
    assert_eq!(disk.len() as u64, DISK_SIZE);
    assert!(
        disk[PATTERN_OFFSET..PATTERN_OFFSET + PATTERN_LEN] == pattern[..],
        "the disk does not hold the guest's pattern at byte {PATTERN_OFFSET}"
    );
    // ext4's superblock magic (0xEF53 at byte 1024 + 0x38).
    assert_eq!(&disk[1024 + 0x38..1024 + 0x3a], &[0x53, 0xef]);

    if let Some(before) = reclaimed_before {
        let after = reclaimed_blocks(&image);
        assert!(
            after < before,
            "boot 1's writes reused no reclaimed block ({before} reclaimed before, {after} after)"
        );
        eprintln!(
            "boot 1 reused {} of {before} reclaimed blocks",
            before - after
        );
    }

    // Boot 2: verify, on a fresh daemon over the same image.
    let daemon = start_backend(backend, dir.path(), &image, extra);
    let run2 = boot(
        &assets,
        &guest_opts(dir.path(), daemon.socket(), &initramfs, "verify"),
    );
    run2.assert_phase_done("verify");
    assert_eq!(run2.report("pattern-read"), pattern_sum);
    assert_eq!(
        run2.report("fsck-rc"),
        "0",
        "e2fsck found problems:\n{}",
        run2.console
    );
    assert_eq!(file_sums(&run2), sums1, "files changed across the reboot");
    assert_eq!(run2.report("sums-check"), "ok");
    let disk2 = stop_and_read_disk(backend, daemon, dir.path(), &image);
    assert!(
        disk2 == disk,
        "a read-only verification boot changed the disk"
    );
    eprintln!(
        "{backend:?}: boot 1 took {:?}, boot 2 {:?}",
        run1.elapsed, run2.elapsed
    );
}

#[test]
fn guest_on_rr_row_writes_pattern_and_ext4_then_finds_them_after_reboot() {
    two_boots(Peer::RrRow);
}

#[test]
fn guest_on_rr_row_reusing_given_back_blocks_writes_and_finds_its_data_after_reboot() {
    two_boots_with(Peer::RrRow, true, false);
}

/// The same two boots with `--direct`: O_DIRECT data I/O and pipelined queues, whose request
/// threads complete and signal on their own (a lost signal would hang the guest's I/O).
#[test]
fn guest_on_rr_row_with_direct_pipelined_queues_writes_and_finds_its_data_after_reboot() {
    two_boots_with(Peer::RrRow, false, true);
}

#[test]
fn reference_guest_on_qemu_storage_daemon_raw() {
    two_boots(Peer::QsdRaw);
}

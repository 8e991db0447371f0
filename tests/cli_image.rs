//! The image commands of the `rr-row` binary on good and bad input: every command on a
//! missing file, a wrong magic, a future version, a truncated header, a corrupt checkpoint or
//! journal, size overflow and out-of-range LBAs fails with one clear line, a non-zero exit, no
//! panic and the image bytes unchanged. Plus the export round trip checked by `qemu-img compare`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rr_row::image::format::Header;
use rr_row::image::{CreateOptions, Image, OpenMode};
use rr_row::units::BlockSize;

fn rr(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rr-row"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Asserts a clean one-line failure.
fn assert_fails(o: &Output, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what}: succeeded");
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(err.starts_with("rr-row: "), "{what}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{what}: {err}");
}

/// Runs every read command on `img` and asserts each fails cleanly without touching it.
fn all_commands_fail(img: &Path, what: &str) {
    let before = std::fs::read(img).ok();
    let out = img.with_extension("out");
    for args in [
        vec!["info", s(img)],
        vec!["info", s(img), "--output", "json"],
        vec!["check", s(img)],
        vec!["export", s(img), s(&out), "--quiet"],
        vec!["history", s(img), "--lba", "0"],
    ] {
        let o = rr(&args);
        if args[0] == "check" && before.is_some() && o.status.code() == Some(2) {
            // check reports damage with exit code 2 and its findings on stdout.
            let text = String::from_utf8_lossy(&o.stdout);
            assert!(text.contains("corrupt"), "{what}: {text}");
            assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"));
        } else {
            assert_fails(&o, &format!("{what}: {args:?}"));
        }
        assert_eq!(
            std::fs::read(img).ok(),
            before,
            "{what}: {args:?} changed the image"
        );
    }
}

fn make_image(dir: &Path, name: &str, checkpoint: bool) -> PathBuf {
    let p = dir.join(name);
    let img = Image::create(
        &p,
        &CreateOptions {
            size: 1 << 20,
            block_size: BlockSize::DEFAULT,
            base: None,
        },
    )
    .unwrap();
    for i in 0..8u64 {
        img.write_at(i * 4096, &[i as u8 + 1; 4096]).unwrap();
        img.flush().unwrap();
    }
    if checkpoint {
        img.close().unwrap();
    } else {
        drop(img);
    }
    p
}

fn header(p: &Path) -> Header {
    let b = std::fs::read(p).unwrap();
    let a = Header::decode(&b[..4096]).unwrap();
    let bb = Header::decode(&b[4096..8192]).unwrap();
    if bb.generation > a.generation {
        bb
    } else {
        a
    }
}

#[test]
fn missing_file() {
    let d = tempfile::tempdir().unwrap();
    all_commands_fail(&d.path().join("nope.rrow"), "missing file");
}

#[test]
fn wrong_magic_and_empty_file() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("junk.rrow");
    std::fs::write(&p, vec![0x42u8; 100_000]).unwrap();
    all_commands_fail(&p, "wrong magic");
    let o = rr(&["info", s(&p)]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not an RR-Row image"));
    std::fs::write(&p, b"").unwrap();
    all_commands_fail(&p, "empty file");
}

#[test]
fn future_version() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "v.rrow", true);
    let mut b = std::fs::read(&p).unwrap();
    b[8] = 2;
    b[4096 + 8] = 2;
    std::fs::write(&p, &b).unwrap();
    all_commands_fail(&p, "future version");
    let err = String::from_utf8_lossy(&rr(&["info", s(&p)]).stderr).to_string();
    assert!(
        err.contains("version 2") && err.contains("version 1"),
        "{err}"
    );
}

#[test]
fn truncated_header() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "t.rrow", true);
    let b = std::fs::read(&p).unwrap();
    for cut in [4, 5000] {
        std::fs::write(&p, &b[..cut]).unwrap();
        all_commands_fail(&p, &format!("truncated at {cut}"));
        let err = String::from_utf8_lossy(&rr(&["info", s(&p)]).stderr).to_string();
        assert!(err.contains("truncated"), "{err}");
    }
}

#[test]
fn both_headers_damaged() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "h.rrow", true);
    let mut b = std::fs::read(&p).unwrap();
    b[50] ^= 1;
    b[4096 + 50] ^= 1;
    std::fs::write(&p, &b).unwrap();
    all_commands_fail(&p, "both headers damaged");
    // Even --repair cannot invent a header: it fails and leaves the file alone.
    let o = rr(&["check", s(&p), "--repair"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read(&p).unwrap(), b);
}

#[test]
fn one_damaged_header_copy_is_a_warning_and_is_repaired() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "h1.rrow", true);
    let mut b = std::fs::read(&p).unwrap();
    let h = header(&p);
    // Damage the copy not in use.
    let other = if Header::decode(&b[..4096]).unwrap().generation == h.generation {
        4096
    } else {
        0
    };
    b[other + 60] ^= 1;
    std::fs::write(&p, &b).unwrap();
    let o = rr(&["check", s(&p)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("warning: header copy"));
    assert_eq!(std::fs::read(&p).unwrap(), b);
    let o = rr(&["check", s(&p), "--repair"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = rr(&["check", s(&p)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("warning"));
}

#[test]
fn corrupt_checkpoint_and_repair() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "c.rrow", true);
    let h = header(&p);
    let ck = h.ckpt.unwrap();
    let off = (h.data_offset + ck.slot * 4096 + 30) as usize;
    let mut b = std::fs::read(&p).unwrap();
    b[off] ^= 0x10;
    std::fs::write(&p, &b).unwrap();
    all_commands_fail(&p, "corrupt checkpoint");
    let err = String::from_utf8_lossy(&rr(&["info", s(&p)]).stderr).to_string();
    assert!(
        err.contains("checkpoint") && err.contains(&format!("{}", off - 30)),
        "{err}"
    );
    // The journal holds the whole history: --repair rebuilds the map from it, losing nothing.
    let o = rr(&["check", s(&p), "--repair"]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert_eq!(rr(&["check", s(&p)]).status.code(), Some(0));
    let img = Image::open(&p, OpenMode::ReadOnly).unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..8u64 {
        img.read_at(i * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == i as u8 + 1));
    }
}

#[test]
fn corrupt_journal() {
    let d = tempfile::tempdir().unwrap();
    // Without a checkpoint the damage is in the part of the journal open replays.
    let p = make_image(d.path(), "j.rrow", false);
    let mut b = std::fs::read(&p).unwrap();
    let rec = 65536 + 64 + 20; // inside the first record, which a flush marker follows
    b[rec] ^= 0x01;
    std::fs::write(&p, &b).unwrap();
    all_commands_fail(&p, "corrupt journal");
    let err = String::from_utf8_lossy(&rr(&["info", s(&p)]).stderr).to_string();
    assert!(err.contains("corrupt at byte offset 65600"), "{err}");
}

#[test]
fn corrupt_journal_behind_a_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let p = make_image(d.path(), "jc.rrow", true);
    let mut b = std::fs::read(&p).unwrap();
    b[65536 + 64 + 20] ^= 0x01;
    std::fs::write(&p, &b).unwrap();
    // The current state comes from the checkpoint; the damaged history is reported by check
    // and refused by history.
    let o = rr(&["check", s(&p)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stdout).contains("65600"));
    assert_fails(&rr(&["history", s(&p), "--lba", "0"]), "history");
    assert_fails(
        &rr(&[
            "export",
            s(&p),
            s(&d.path().join("o.raw")),
            "--at",
            "1",
            "--quiet",
        ]),
        "export --at",
    );
    assert_eq!(std::fs::read(&p).unwrap(), b);
}

#[test]
fn bad_sizes_and_ranges() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("s.rrow");
    for size in ["99999999999T", "1.5G", "abc", "1000", "0", "16P"] {
        let o = rr(&["create", s(&p), "--size", size]);
        assert!(!o.status.success(), "size {size}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{err}");
        assert!(!p.exists(), "size {size} left a file");
    }
    let o = rr(&["create", s(&p), "--size", "1M", "--block-size", "3000"]);
    assert_fails(&o, "block size");
    let img = make_image(d.path(), "r.rrow", true);
    let before = std::fs::read(&img).unwrap();
    for lba in ["256", "18446744073709551615"] {
        let o = rr(&["history", s(&img), "--lba", lba]);
        assert_fails(&o, "lba out of range");
        assert!(String::from_utf8_lossy(&o.stderr).contains("beyond the end"));
    }
    let o = rr(&["export", s(&img), s(&d.path().join("x.raw")), "--at", "99"]);
    assert_fails(&o, "export --at future");
    let o = rr(&["create", s(&img), "--size", "1M"]);
    assert_fails(&o, "create over an existing file");
    let o = rr(&["export", s(&img), s(&img)]);
    assert_fails(&o, "export onto itself");
    assert_eq!(std::fs::read(&img).unwrap(), before);
}

#[test]
fn commands_work_on_a_good_image() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("g.rrow");
    let o = rr(&["create", s(&p), "--size", "4M", "--block-size", "64K"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    {
        let img = Image::open(&p, OpenMode::ReadWrite).unwrap();
        img.write_at(65536, &[7u8; 65536]).unwrap();
        img.discard(65536, 512).unwrap();
        img.close().unwrap();
    }
    let o = rr(&["info", s(&p), "--output", "json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["virtual_size"], 4 << 20);
    assert_eq!(v["block_size"], 65536);
    assert_eq!(v["seq"], 2);
    assert_eq!(v["live_blocks"], 1);
    assert_eq!(v["retained_blocks"], 2);
    assert!(v["map_memory_bytes"].as_u64().unwrap() > 0);
    let o = rr(&["history", s(&p), "--lba", "1", "--output", "json"]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let vers = v["versions"].as_array().unwrap();
    assert_eq!(vers.len(), 2);
    assert_eq!(vers[0]["kind"], "write");
    assert_eq!(vers[1]["kind"], "discard");
    assert_eq!(vers[1]["seq"], 2);
    let o = rr(&["check", s(&p), "--output", "json"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["status"], "clean");
    assert_eq!(v["verified_blocks"], 2);
}

fn qemu_compare(a: &Path, b: &Path) -> bool {
    let o = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", s(a), s(b)])
        .output()
        .expect("qemu-img is part of the test set-up (Debian package qemu-utils)");
    o.status.success()
}

#[test]
fn export_round_trip_with_qemu_img_compare() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.raw");
    let size = 8u64 << 20;
    // A base shorter than the disk, with a pattern.
    let base_bytes: Vec<u8> = (0..3 << 20).map(|i: u32| (i / 4096) as u8 | 1).collect();
    std::fs::write(&base, &base_bytes).unwrap();
    let p = d.path().join("e.rrow");
    let img = Image::create(
        &p,
        &CreateOptions {
            size,
            block_size: BlockSize::DEFAULT,
            base: Some(base.clone()),
        },
    )
    .unwrap();
    let mut model = vec![0u8; size as usize];
    model[..base_bytes.len()].copy_from_slice(&base_bytes);
    let mut rng = 12345u64;
    let mut next = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        rng >> 33
    };
    let mut at_seq_10 = Vec::new();
    for i in 0..40 {
        let off = next() % (size / 512 - 64) * 512;
        let len = (next() % 64 + 1) * 512;
        if i % 7 == 3 {
            img.discard(off, len).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            img.write_at(off, &data).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        if img.seq().0 == 10 {
            at_seq_10 = model.clone();
        }
    }
    img.close().unwrap();
    let want = d.path().join("want.raw");
    std::fs::write(&want, &model).unwrap();
    let got = d.path().join("got.raw");
    let o = rr(&["export", s(&p), s(&got), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(qemu_compare(&want, &got));
    // The export is sparse where the disk reads zeros.
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(&got).unwrap();
    assert_eq!(md.len(), size);
    assert!(
        md.blocks() * 512 < size,
        "{} bytes allocated",
        md.blocks() * 512
    );
    // As of a past seq.
    std::fs::write(&want, &at_seq_10).unwrap();
    let o = rr(&["export", s(&p), s(&got), "--quiet", "--at", "10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(qemu_compare(&want, &got));
    // And the comparison is not vacuous: a different image is reported as different.
    std::fs::write(&want, &model).unwrap();
    assert!(!qemu_compare(&want, &got));
}

#[test]
fn a_torn_tail_is_recovered_not_reported_as_damage() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("torn.rrow");
    {
        let img = Image::create(
            &p,
            &CreateOptions {
                size: 1 << 20,
                block_size: BlockSize::DEFAULT,
                base: None,
            },
        )
        .unwrap();
        img.write_at(0, &[1u8; 4096]).unwrap();
        img.flush().unwrap();
        img.write_at(4096, &[2u8; 4096]).unwrap();
    }
    // Tear the last record (after the last flush marker), as a power cut could.
    let mut b = std::fs::read(&p).unwrap();
    let seg = &b[65536..65536 + (1 << 20)];
    let end = seg.iter().rposition(|&x| x != 0).unwrap() + 65536;
    b[end - 10] ^= 0x20;
    std::fs::write(&p, &b).unwrap();
    let o = rr(&["check", s(&p)]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("torn record") && out.contains("clean at seq 1"),
        "{out}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), b);
    let o = rr(&["check", s(&p), "--repair"]);
    assert_eq!(o.status.code(), Some(3));
    let o = rr(&["check", s(&p)]);
    assert_eq!(o.status.code(), Some(0));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("warning"));
}

#[test]
fn info_shows_every_field() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("b.raw");
    std::fs::write(&base, vec![1u8; 8192]).unwrap();
    let p = d.path().join("i.rrow");
    let o = rr(&["create", s(&p), "--size", "8M", "--base", s(&base)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = rr(&["info", s(&p)]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    for field in [
        "virtual size: 8.0 MiB (8388608 bytes)",
        "file size:",
        "block size: 4096",
        "seq: 0",
        "live blocks: 0",
        "retained blocks: 0",
        "journal:",
        "base: ",
        "map memory:",
    ] {
        assert!(out.contains(field), "{field} missing from:\n{out}");
    }
    assert!(out.contains(s(&base)));
    // The base is checked at every open.
    std::fs::remove_file(&base).unwrap();
    let o = rr(&["info", s(&p)]);
    assert_fails(&o, "missing base");
    assert!(String::from_utf8_lossy(&o.stderr).contains("base image"));
}

//! `rr-row create|info|check|export|history`: image commands.
//!
//! Every command but `create` and `check --repair` opens the image read-only, so a damaged
//! image is never written to without `--repair`.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use super::{
    CheckArgs, CliError, CliResult, CreateArgs, ExportArgs, HistoryArgs, InfoArgs, OutputFormat,
};
use crate::image::{CreateOptions, Extent, HistoryKind, Image, ImageInfo, OpenMode};
use crate::iobuf::IoSeg;
use crate::units::{BlockSize, Lba, Seq};

fn open_ro(path: &std::path::Path) -> Result<Image, CliError> {
    Image::open(path, OpenMode::ReadOnly).map_err(|e| CliError::ctx(path.display(), e))
}

fn to_json(v: &impl serde::Serialize) -> Result<String, CliError> {
    serde_json::to_string_pretty(v).map_err(|e| CliError::ctx("cannot encode JSON", e))
}

fn human_size(b: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {} ({b} bytes)", U.get(i).unwrap_or(&"B"))
    }
}

fn print_info(path: &std::path::Path, i: &ImageInfo, out: OutputFormat) -> Result<(), CliError> {
    if out == OutputFormat::Json {
        println!("{}", to_json(i)?);
        return Ok(());
    }
    println!("image: {}", path.display());
    println!("format: rr-row version {}", i.format_version);
    println!("uuid: {}", i.uuid);
    println!("virtual size: {}", human_size(i.virtual_size));
    println!("file size: {}", human_size(i.file_size));
    println!("disk usage: {}", human_size(i.allocated_bytes));
    println!("block size: {}", i.block_size);
    println!("seq: {}", i.seq);
    println!("live blocks: {}", i.live_blocks);
    println!("retained blocks: {}", i.retained_blocks);
    if i.history_horizon > 0 {
        println!(
            "history: states from seq {} on ({} blocks of older versions reclaimed)",
            i.history_horizon, i.reclaimed_blocks
        );
    } else {
        println!("history: every state since creation");
    }
    println!(
        "journal: {} in {} segment(s), {} since the last checkpoint",
        human_size(i.journal_bytes),
        i.journal_segments,
        human_size(i.journal_bytes_since_checkpoint)
    );
    match i.checkpoint_seq {
        Some(s) => println!("checkpoint: seq {s}"),
        None => println!("checkpoint: none"),
    }
    match (&i.base, i.base_size) {
        (Some(b), Some(s)) => println!("base: {b} ({})", human_size(s)),
        _ => println!("base: none"),
    }
    println!("map memory: {}", human_size(i.map_memory_bytes));
    Ok(())
}

/// `rr-row create`.
pub fn create(a: &CreateArgs) -> CliResult {
    let bs = u32::try_from(a.block_size)
        .ok()
        .and_then(BlockSize::new)
        .ok_or_else(|| {
            CliError(format!(
                "invalid block size {}: expected a power of two from 512 to 64K",
                a.block_size
            ))
        })?;
    let img = Image::create(
        &a.image,
        &CreateOptions {
            size: a.size,
            block_size: bs,
            base: a.base.clone(),
        },
    )
    .map_err(|e| CliError::ctx(a.image.display(), e))?;
    let info = img
        .info()
        .map_err(|e| CliError::ctx(a.image.display(), e))?;
    img.close()
        .map_err(|e| CliError::ctx(a.image.display(), e))?;
    if a.output == OutputFormat::Json {
        println!("{}", to_json(&info)?);
    } else {
        println!(
            "Formatting '{}', fmt=rr-row size={} block_size={}{}",
            a.image.display(),
            info.virtual_size,
            info.block_size,
            info.base
                .as_deref()
                .map(|b| format!(" base={b}"))
                .unwrap_or_default()
        );
    }
    Ok(0)
}

/// `rr-row info`.
pub fn info(a: &InfoArgs) -> CliResult {
    let img = open_ro(&a.image)?;
    let i = img
        .info()
        .map_err(|e| CliError::ctx(a.image.display(), e))?;
    print_info(&a.image, &i, a.output)?;
    Ok(0)
}

/// `rr-row check`: exit 0 clean, 2 corrupt, 3 repaired (1: could not run).
pub fn check(a: &CheckArgs) -> CliResult {
    let r = Image::check(&a.image, a.repair).map_err(|e| CliError::ctx(a.image.display(), e))?;
    if a.output == OutputFormat::Json {
        println!("{}", to_json(&r)?);
    } else {
        for p in &r.problems {
            println!("ERROR: {p}");
        }
        for w in &r.warnings {
            println!("warning: {w}");
        }
        for f in &r.repaired {
            println!("REPAIRED: {f}");
        }
        println!(
            "{}: {} at seq {}; {} journal records and {} data blocks verified{}",
            a.image.display(),
            r.status,
            r.seq,
            r.records,
            r.verified_blocks,
            if r.unverifiable_blocks > 0 {
                format!(
                    " ({} reclaimed blocks skipped; {} blocks not verifiable because they were \
                     written together with reclaimed ones)",
                    r.reclaimed_blocks, r.unverifiable_blocks
                )
            } else if r.reclaimed_blocks > 0 {
                format!(" ({} reclaimed blocks skipped)", r.reclaimed_blocks)
            } else {
                String::new()
            }
        );
        if !r.problems.is_empty() && !a.repair {
            println!("run `rr-row check --repair` to repair what can be repaired");
        }
    }
    Ok(r.exit_code())
}

/// `rr-row export`: the disk (as of `--at`) as a sparse raw file.
pub fn export(a: &ExportArgs) -> CliResult {
    let img = open_ro(&a.image)?;
    let ctx = |e| CliError::ctx(a.image.display(), e);
    let snap = match a.at {
        Some(s) => Some(img.state_at(Seq(s)).map_err(ctx)?),
        None => None,
    };
    if let (Ok(x), Ok(y)) = (a.image.canonicalize(), a.output.canonicalize()) {
        if x == y {
            return Err(CliError("refusing to export an image onto itself".into()));
        }
    }
    let out = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&a.output)
        .map_err(|e| CliError::ctx(a.output.display(), e))?;
    let size = img.size();
    let bs = img.block_size().bytes_u64();
    out.set_len(size)
        .map_err(|e| CliError::ctx(a.output.display(), e))?;
    let total_blocks = size.div_ceil(bs);
    let bar = super::progress_bar(a.quiet, size, "");
    let chunk_blocks = ((4u64 << 20) / bs).max(1);
    let mut buf = Vec::new();
    let mut lba = 0u64;
    while lba < total_blocks {
        let n = chunk_blocks.min(total_blocks - lba);
        let ex = match &snap {
            Some(s) => s.resolve(Lba(lba), n),
            None => img.resolve(Lba(lba), n),
        }
        .map_err(ctx)?;
        let mut at = lba;
        for e in ex {
            let blocks = e.blocks();
            let start = at * bs;
            let len = (blocks * bs).min(size - start);
            at += blocks;
            if matches!(e, Extent::Zero { .. }) {
                continue;
            }
            buf.resize(len as usize, 0);
            img.read_extents(&[e], 0, &[IoSeg::from_mut_slice(&mut buf)])
                .map_err(ctx)?;
            if buf.iter().all(|&b| b == 0) {
                continue;
            }
            out.write_all_at(&buf, start)
                .map_err(|e| CliError::ctx(a.output.display(), e))?;
        }
        lba += n;
        bar.set_position((lba * bs).min(size));
    }
    out.sync_all()
        .map_err(|e| CliError::ctx(a.output.display(), e))?;
    bar.finish_and_clear();
    log::info!(
        "exported {} as of seq {} to {}",
        a.image.display(),
        snap.as_ref().map_or(img.seq(), |s| s.seq()),
        a.output.display()
    );
    Ok(0)
}

/// `rr-row history --lba N`.
pub fn history(a: &HistoryArgs) -> CliResult {
    let img = open_ro(&a.image)?;
    let bs = img.block_size().bytes_u64();
    let blocks = img.size().div_ceil(bs);
    if a.lba >= blocks {
        return Err(CliError(format!(
            "{}: lba {} is beyond the end of the disk ({blocks} blocks of {bs} bytes)",
            a.image.display(),
            a.lba
        )));
    }
    let h = img
        .history(Lba(a.lba))
        .map_err(|e| CliError::ctx(a.image.display(), e))?;
    let kind = |k: HistoryKind| match k {
        HistoryKind::Write => "write",
        HistoryKind::Discard => "discard",
        HistoryKind::WriteZeroes => "write-zeroes",
    };
    if a.output == OutputFormat::Json {
        let v: Vec<serde_json::Value> = h
            .iter()
            .map(|e| {
                serde_json::json!({
                    "seq": e.seq.0,
                    "kind": kind(e.kind),
                    "pba": e.pba.map(|p| p.0),
                    "reclaimed": e.reclaimed,
                })
            })
            .collect();
        println!(
            "{}",
            to_json(&serde_json::json!({ "lba": a.lba, "versions": v }))?
        );
        return Ok(0);
    }
    if h.is_empty() {
        println!(
            "lba {}: never written (reads the base image or zeros)",
            a.lba
        );
        return Ok(0);
    }
    println!("{:>10}  {:<12}  pba", "seq", "kind");
    for e in &h {
        println!(
            "{:>10}  {:<12}  {}",
            e.seq.0,
            kind(e.kind),
            match (e.pba, e.reclaimed) {
                (None, _) => "zeros".to_string(),
                (Some(p), false) => p.0.to_string(),
                (Some(p), true) => format!("{} (reclaimed)", p.0),
            }
        );
    }
    Ok(0)
}

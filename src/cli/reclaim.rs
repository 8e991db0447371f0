//! `rr-row reclaim`: retention. Gives the blocks of versions that no kept state and no kept
//! record log needs back to the file system (the engine's `Image::reclaim`); this layer reads
//! the kept logs for the blocks they pin, shows progress and prints the outcome.

use std::io::IsTerminal;
use std::path::Path;

use super::{CliError, CliResult, KeepFrom, OutputFormat, ReclaimArgs};
use crate::image::{Image, OpenMode, ReclaimPlan};
use crate::record::{LogExtent, LogReader, RecordBody};
use crate::units::Seq;

/// What one kept log pins.
#[derive(Debug, serde::Serialize)]
struct KeptLog {
    path: String,
    records: u64,
    /// Block-id runs its reads returned (merged later).
    #[serde(skip)]
    runs: Vec<(u64, u64)>,
    blocks: u64,
}

/// Reads a record log made on `img` and collects the block ids its reads returned.
fn pinned_by(img: &Image, log: &Path) -> Result<KeptLog, CliError> {
    let ctx = |e| CliError::ctx(format!("record log {}", log.display()), e);
    let mut r = LogReader::open(log).map_err(ctx)?;
    let h = *r.header();
    if h.image_uuid != img.uuid() {
        return Err(CliError(format!(
            "record log {} was made on image {}, not on this image ({})",
            log.display(),
            uuid::Uuid::from_bytes(h.image_uuid),
            uuid::Uuid::from_bytes(img.uuid())
        )));
    }
    let mut kept = KeptLog {
        path: log.display().to_string(),
        records: 0,
        runs: Vec::new(),
        blocks: 0,
    };
    while let Some(rec) = r.next_record().map_err(ctx)? {
        kept.records += 1;
        if let RecordBody::Read(b) = &rec.body {
            for e in &b.extents {
                if let LogExtent::Mapped { pba, blocks } = *e {
                    kept.runs.push((pba.get(), blocks));
                    kept.blocks += blocks;
                }
            }
        }
    }
    if let Some(t) = r.torn_tail() {
        // On stderr: only `serve` installs a logger.
        eprintln!(
            "rr-row: warning: record log {}: torn tail, {} bytes dropped at byte {}; the blocks \
             the records before it read are kept",
            log.display(),
            t.dropped_bytes,
            t.offset
        );
    }
    Ok(kept)
}

fn spinner(quiet: bool, msg: &'static str) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let s = indicatif::ProgressBar::new_spinner();
    s.set_message(msg);
    s.enable_steady_tick(std::time::Duration::from_millis(120));
    s
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// `rr-row reclaim`.
pub fn reclaim(a: &ReclaimArgs) -> CliResult {
    let ctx = |e| CliError::ctx(a.image.display(), e);
    // Everything the user can get wrong is checked on a read-only open first: opening the
    // image read-write already appends to its journal, and a refused reclaim changes nothing.
    let ro = Image::open(&a.image, OpenMode::ReadOnly).map_err(ctx)?;
    if let KeepFrom::Seq(s) = a.keep_from {
        if Seq(s) > ro.seq() {
            return Err(ctx(crate::image::ImageError::SeqInFuture {
                requested: Seq(s),
                current: ro.seq(),
            }));
        }
    }
    let mut kept = Vec::new();
    let mut pinned = Vec::new();
    for log in &a.keep_logs {
        let mut k = pinned_by(&ro, log)?;
        pinned.append(&mut k.runs);
        kept.push(k);
    }
    let img = if a.dry_run {
        ro
    } else {
        drop(ro);
        Image::open(&a.image, OpenMode::ReadWrite).map_err(ctx)?
    };
    let keep_from = match a.keep_from {
        KeepFrom::Latest => img.seq(),
        KeepFrom::Seq(s) => Seq(s),
    };
    let before = img.info().map_err(ctx)?;
    let sp = spinner(a.quiet, "scanning the journal");
    let plan = img.plan_reclaim(keep_from, &pinned).map_err(ctx)?;
    sp.finish_and_clear();
    if !a.dry_run {
        img.commit_reclaim(&plan).map_err(ctx)?;
        // Every reclaimed block, not only this plan's: earlier reclaims that a crash or a
        // failed punch left unpunched get their space back too.
        let bar = super::progress_bar(a.quiet, 0, "punching holes ");
        img.punch_all_reclaimed(&mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .map_err(ctx)?;
        bar.finish_and_clear();
    }
    let after = img.info().map_err(ctx)?;
    img.close().map_err(ctx)?;
    print_outcome(
        a,
        &plan,
        &kept,
        before.allocated_bytes,
        after.allocated_bytes,
        after.history_horizon,
    )?;
    Ok(0)
}

fn print_outcome(
    a: &ReclaimArgs,
    plan: &ReclaimPlan,
    kept: &[KeptLog],
    before: u64,
    after: u64,
    horizon: u64,
) -> Result<(), CliError> {
    if a.output == OutputFormat::Json {
        let v = serde_json::json!({
            "dry_run": a.dry_run,
            "keep_from": plan.keep_from,
            "seq": plan.seq,
            "history_horizon": horizon,
            "reclaimed_blocks": plan.blocks,
            "reclaimed_bytes": plan.bytes,
            "runs": plan.runs.len(),
            "pinned_blocks": plan.pinned_blocks,
            "kept_logs": kept,
            "allocated_bytes_before": before,
            "allocated_bytes_after": after,
        });
        let s =
            serde_json::to_string_pretty(&v).map_err(|e| CliError::ctx("cannot encode JSON", e))?;
        println!("{s}");
        return Ok(());
    }
    let verb = if a.dry_run {
        "would give back"
    } else {
        "gave back"
    };
    println!(
        "{}: {verb} {} ({} blocks in {} runs) of versions only states before seq {} needed",
        a.image.display(),
        mib(plan.bytes),
        plan.blocks,
        plan.runs.len(),
        plan.keep_from
    );
    for k in kept {
        println!(
            "kept log {}: {} records, {} blocks read",
            k.path, k.records, k.blocks
        );
    }
    if plan.pinned_blocks > 0 {
        println!(
            "{} old blocks stay because kept logs read them",
            plan.pinned_blocks
        );
    }
    if !a.dry_run {
        println!("disk usage: {} -> {}", mib(before), mib(after));
        if plan.blocks > 0 {
            println!(
                "states before seq {horizon} can no longer be exported; record logs made before \
                 it replay only if they were kept with --keep-log"
            );
        }
    }
    Ok(())
}

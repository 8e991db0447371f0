//! `check`: full verification of an image (headers, checkpoint, every journal record, every
//! data block's checksum, block references) and the repairs that are safe.

use std::path::Path;

use super::format::{self, RecKind};
use super::map::Map;
use super::{apply, zero_value, Image, ImageError, OpenFlags, OpenMode, RebornIndex};

/// The outcome of [`Image::check`].
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckReport {
    /// "clean", "corrupt" or "repaired".
    pub status: String,
    /// The image's seq after the check (and repair).
    pub seq: u64,
    /// Journal records verified.
    pub records: u64,
    /// Data blocks whose checksum was verified.
    pub verified_blocks: u64,
    /// Data blocks named by the journal whose versions were reclaimed (not verified: their
    /// content is gone).
    pub reclaimed_blocks: u64,
    /// Data blocks still in use whose checksum cannot be verified because the write that
    /// made them also wrote blocks that were reclaimed since (its crc covers them all).
    pub unverifiable_blocks: u64,
    /// Damage found (and not repaired).
    pub problems: Vec<String>,
    /// Things worth knowing that are not damage (e.g. a torn tail after a crash).
    pub warnings: Vec<String>,
    /// What `--repair` did.
    pub repaired: Vec<String>,
}

impl CheckReport {
    /// True when no unrepaired damage was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Exit code convention of `rr-row check`: 0 clean, 2 corrupt, 3 repaired.
    pub fn exit_code(&self) -> i32 {
        if !self.problems.is_empty() {
            2
        } else if !self.repaired.is_empty() {
            3
        } else {
            0
        }
    }

    fn finish(mut self) -> Self {
        self.status = match self.exit_code() {
            2 => "corrupt",
            3 => "repaired",
            _ => "clean",
        }
        .to_string();
        self
    }
}

fn damage(e: &ImageError) -> bool {
    matches!(e, ImageError::Corrupt { .. } | ImageError::Truncated { .. })
}

pub(crate) fn check(path: &Path, repair: bool) -> Result<CheckReport, ImageError> {
    // Checking an image a daemon is writing to would report its moving tail as damage.
    let guard =
        std::fs::File::open(path).map_err(|e| ImageError::io("cannot open the image", e))?;
    if !super::io::lock_shared(&guard).map_err(|e| ImageError::io("cannot lock the image", e))? {
        return Err(ImageError::Locked);
    }
    let mut rep = CheckReport::default();
    let opened = Image::open_with(path, OpenMode::ReadOnly, OpenFlags::default());
    if repair {
        // Repairs open the image read-write, which takes the exclusive lock.
        drop(guard);
    }
    let img = match opened {
        Ok(img) => img,
        Err(e) if damage(&e) => {
            if !repair {
                rep.problems.push(e.to_string());
                return Ok(rep.finish());
            }
            let attempts = [
                (
                    OpenFlags {
                        ignore_ckpt: false,
                        rollback: true,
                    },
                    "rolled the journal back to the last intact record",
                ),
                (
                    OpenFlags {
                        ignore_ckpt: true,
                        rollback: false,
                    },
                    "rebuilt the map from the whole journal (the checkpoint was damaged)",
                ),
                (
                    OpenFlags {
                        ignore_ckpt: true,
                        rollback: true,
                    },
                    "rebuilt the map from the whole journal and rolled it back to the last \
                     intact record",
                ),
            ];
            let mut fixed = None;
            for (fl, what) in attempts {
                if let Ok(img) = Image::open_with(path, OpenMode::ReadWrite, fl) {
                    fixed = Some((img, what));
                    break;
                }
            }
            let Some((img, what)) = fixed else {
                rep.problems.push(e.to_string());
                rep.problems
                    .push("no repair could make the image open; it is left unchanged".into());
                return Ok(rep.finish());
            };
            log::warn!("REPAIR of {}: {e}; {what}", path.display());
            rep.repaired.push(format!("{e}: {what}"));
            if let Some(r) = &img.notes.rolled_back {
                rep.repaired.push(format!(
                    "LOST: every operation from the damaged record at {r}"
                ));
            }
            img.checkpoint()?;
            img.rewrite_headers()?;
            img.close()?;
            Image::open_with(path, OpenMode::ReadOnly, OpenFlags::default())?
        }
        Err(e) => return Err(e),
    };
    verify(&img, &mut rep);
    let needs_fix =
        img.notes.damaged_header.is_some() || img.notes.torn.is_some() || img.notes.dropped > 0;
    if repair && rep.problems.is_empty() && needs_fix {
        drop(img);
        let rw = Image::open_with(path, OpenMode::ReadWrite, OpenFlags::default())?;
        if let Some((c, what)) = &rw.notes.damaged_header {
            rw.rewrite_headers()?;
            rep.repaired.push(format!(
                "rewrote header copy {} ({what})",
                if *c == 0 { "A" } else { "B" }
            ));
        }
        if rw.notes.torn.is_some() || rw.notes.dropped > 0 {
            rep.repaired
                .push("cleared the torn journal tail left by an unclean shutdown".into());
        }
        rep.seq = rw.seq().0;
        rw.close()?;
    }
    Ok(rep.finish())
}

fn verify(img: &Image, rep: &mut CheckReport) {
    let n = &img.notes;
    if let Some((c, what)) = &n.damaged_header {
        rep.warnings.push(format!(
            "header copy {} is invalid ({what}); the other copy is in use",
            if *c == 0 { "A" } else { "B" }
        ));
    }
    if let Some(t) = &n.torn {
        rep.warnings.push(format!(
            "the journal ends with a torn record ({t}): an unclean shutdown, recovered"
        ));
    }
    if n.dropped > 0 {
        rep.warnings.push(format!(
            "{} record(s) after the last flush are dropped: their data never reached the disk",
            n.dropped
        ));
    }
    rep.seq = img.seq().0;
    let sh = &img.sh;
    let zero = zero_value(sh);
    let mut map = Map::new(sh.blocks);
    let mut refs: Vec<(u64, u64)> = Vec::new();
    let mut problems = Vec::new();
    let mut records = 0u64;
    let mut verified = 0u64;
    let mut reclaimed = 0u64;
    let mut unverifiable = 0u64;
    // Pieces are verified after the walk: a later write may have reused a piece's slots.
    let mut pieces: Vec<(u64, u64, u64, u64, u32)> = Vec::new();
    let mut reborn = RebornIndex::builder();
    let incompat = super::lock(&img.journal).hdr.incompat;
    let res = img.walk_all(|r, _| {
        records += 1;
        let (ordinal, reused) = reborn.visit(r);
        if reused && incompat & format::INCOMPAT_REUSE == 0 {
            problems.push(format!(
                "seq {}: a record reuses reclaimed blocks in an image without the reuse feature",
                r.seq
            ));
        }
        if r.kind.maps() {
            apply(&mut map, r, zero);
        }
        for p in &r.pieces {
            let Some(pba) = p.pba else { continue };
            if let Err(e) = sh.check_data(pba, p.blocks) {
                problems.push(format!("seq {}: {e}", r.seq));
                continue;
            }
            // A reuse names slots an earlier piece named too: only the first naming counts
            // towards "referenced twice".
            if !reused {
                refs.push((pba, p.blocks));
            }
            pieces.push((r.seq, ordinal, pba, p.blocks, p.data_crc));
        }
        if r.kind == RecKind::Link && r.link.is_none() {
            problems.push("link record without a target".into());
        }
        Ok(true)
    });
    if let Err(e) = res {
        problems.push(e.to_string());
    }
    let reborn = reborn.finish();
    for (seq, ordinal, pba, blocks, crc) in pieces {
        if sh.any_reclaimed(pba, blocks)
            || reborn.reused_after_record(pba, blocks, ordinal).is_some()
        {
            // A reclaimed version's content is gone (a hole, data a crash left before the
            // hole was punched, or a later write's data). The piece's crc covers all its
            // blocks, so blocks of a partly reclaimed piece that are still there cannot be
            // verified either.
            let gone = gone_blocks(sh, &reborn, pba, blocks, ordinal);
            reclaimed += gone;
            unverifiable += blocks - gone;
            continue;
        }
        match sh.data_crc(pba, blocks) {
            Ok(Some(c)) if c == crc => verified += blocks,
            Ok(_) => problems.push(format!(
                "seq {seq}: data blocks {pba}+{blocks} do not match their checksum"
            )),
            Err(e) => problems.push(format!("seq {seq}: {e}")),
        }
    }
    refs.sort_unstable();
    for w in refs.windows(2) {
        if let [a, b] = w {
            if a.0 + a.1 > b.0 {
                problems.push(format!(
                    "data blocks {}+{} and {}+{} are referenced twice",
                    a.0, a.1, b.0, b.1
                ));
                break;
            }
        }
    }
    if problems.is_empty() {
        let live = super::rlock(&img.live);
        if !live.map.same_as(&map) {
            problems.push(
                "the checkpointed map disagrees with the map rebuilt from the journal".into(),
            );
        }
        // The current state must never map a reclaimed block.
        for (lba, count, e) in live.map.runs() {
            if e < 2 {
                continue;
            }
            if let Some(p) = sh.first_reclaimed(e - 2, count) {
                problems.push(format!(
                    "block {p}, mapped by LBA {} of the current state, is reclaimed",
                    lba + (p - (e - 2))
                ));
                break;
            }
        }
    }
    rep.records = records;
    rep.verified_blocks = verified;
    rep.reclaimed_blocks = reclaimed;
    rep.unverifiable_blocks = unverifiable;
    rep.problems.extend(problems);
}

/// Blocks of `[pba, pba + n)` whose version named at `ordinal` is gone: reclaimed now, or
/// reused by a later record.
fn gone_blocks(
    sh: &super::shared::Shared,
    reborn: &RebornIndex,
    pba: u64,
    n: u64,
    ordinal: u64,
) -> u64 {
    (pba..pba + n)
        .filter(|&b| {
            sh.first_reclaimed(b, 1).is_some()
                || reborn.reused_after_record(b, 1, ordinal).is_some()
        })
        .count() as u64
}

//! [`ReplayingDevice`]: a [`BlockDevice`] that serves a re-executed VM from a record log.
//!
//! Each request is matched with the recorded one by queue and per-queue index (see
//! [`crate::record::QueueEpoch`]); kind, sector and length must agree, and for a write the hash
//! of the data too. A matched read is answered from the recorded extents with
//! [`Image::read_extents`] - the retained history, not the live map - or, for a full-mode log,
//! from the data in the log. Writes, discards and write-zeroes never reach the image: the live
//! image after a replay is byte for byte what it was before (serve can even open it read-only).
//! A recorded failure is replayed as the same failure.
//!
//! A divergence (a mismatch, a different hash, a request the log does not have) is logged at
//! warn with the request and both versions and counted in [`ReplaySummary`]. Then, by
//! [`DivergencePolicy`]: `Stop` fails it and every later request with IOERR; `Continue` serves
//! it from the image as of the replay point - the state at the highest seq the matched records
//! saw (an `Image::state_at` snapshot), i.e. what the recorded VM's disk held when the replay
//! left the recorded path - and goes on matching. The live image would be the wrong answer:
//! it holds whatever later sessions wrote. Writes of a diverged guest are dropped.
//!
//! Opening checks up front that the log belongs to the image and that the history it needs is
//! still there, naming the first missing block.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use log::{info, warn};

use crate::image::{Extent, Image, ImageError, RebornIndex, Snapshot};
use crate::iobuf::{slice_segs, total_len, IoSeg};
use crate::record::format::{hash_segs, status_name, HASH_LEN};
use crate::record::{
    CallKey, LogExtent, QueueEpoch, Record, RecordBody, RecordError, RecordMode, ReplayIndex,
    TornTail,
};
use crate::units::{Pba, Seq, SECTOR_SIZE};

use super::record_dev::request_type_code;
use super::{BlockDevice, BlockError, RejectedRequest, RequestCtx};

/// At most this many divergences are kept for the summary (all are counted and logged).
const KEPT_DIVERGENCES: usize = 100;

/// Chunk size used to serve diverged reads from a snapshot.
const SNAPSHOT_CHUNK: usize = 1 << 20;

/// What a replay does when the guest's requests stop matching the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DivergencePolicy {
    /// Fail the divergent request and every later one with IOERR.
    #[default]
    Stop,
    /// Serve the divergent request from the image as of the replay point and go on.
    Continue,
}

/// Why a log cannot be replayed on an image.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The log cannot be read.
    #[error("cannot replay the record log: {0}")]
    Log(#[from] RecordError),
    /// The image failed.
    #[error("image error while preparing the replay: {0}")]
    Image(#[from] ImageError),
    /// The log was recorded on another image.
    #[error("the record log was made on image {log}, not on this image ({image})")]
    WrongImage {
        /// UUID in the log header.
        log: String,
        /// UUID of the image.
        image: String,
    },
    /// Block size or size of the image differ from the recorded ones.
    #[error("the record log was made on a disk of {log_size} bytes in {log_bs}-byte blocks; this image has {image_size} bytes in {image_bs}-byte blocks")]
    Geometry {
        /// Recorded disk size.
        log_size: u64,
        /// Recorded block size.
        log_bs: u32,
        /// Image size.
        image_size: u64,
        /// Image block size.
        image_bs: u32,
    },
    /// The log refers to image states the image does not have.
    #[error(
        "the record log refers to image seq {seq}, but the image's history ends at seq {image_seq}"
    )]
    FutureSeq {
        /// Highest seq in the log.
        seq: u64,
        /// The image's seq.
        image_seq: u64,
    },
    /// A block the log needs cannot be read any more.
    #[error("history the record log needs is missing: block {pba} (read by queue {queue} request {index}) cannot be read: {source}")]
    MissingHistory {
        /// The first missing PBA.
        pba: u64,
        /// Queue of the first record that needs it.
        queue: u16,
        /// Index of that record.
        index: u64,
        /// The image's error.
        source: ImageError,
    },
}

/// One divergence between the replayed guest and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// Queue of the request.
    pub queue: u16,
    /// Per-queue index of the request.
    pub index: u64,
    /// What differs.
    pub reason: String,
    /// The recorded request (`None`: the log has no such request).
    pub recorded: Option<String>,
    /// The replayed request.
    pub replayed: String,
}

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "queue {} request {}: {}; recorded: {}; replayed: {}",
            self.queue,
            self.index,
            self.reason,
            self.recorded.as_deref().unwrap_or("nothing"),
            self.replayed
        )
    }
}

/// The outcome of a replay so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    /// Records in the log.
    pub records: u64,
    /// Records matched by a replayed request.
    pub matched: u64,
    /// Divergences counted.
    pub divergences: u64,
    /// The first divergences (at most 100).
    pub first_divergences: Vec<Divergence>,
    /// Requests failed because the replay had stopped at an earlier divergence.
    pub failed_after_stop: u64,
    /// True when the replay stopped (policy `Stop` and a divergence happened).
    pub stopped: bool,
}

impl ReplaySummary {
    /// Records never replayed.
    pub fn unreplayed(&self) -> u64 {
        self.records.saturating_sub(self.matched)
    }

    /// True when every record was replayed and nothing diverged.
    pub fn is_clean(&self) -> bool {
        self.divergences == 0 && self.unreplayed() == 0
    }
}

impl std::fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "replay: {} of {} records matched, {} divergences, {} records not replayed",
            self.matched,
            self.records,
            self.divergences,
            self.unreplayed()
        )?;
        if self.stopped {
            write!(
                f,
                ", stopped at the first divergence ({} later requests failed)",
                self.failed_after_stop
            )?;
        }
        if let Some(d) = self.first_divergences.first() {
            write!(f, "; first divergence: {d}")?;
        }
        Ok(())
    }
}

/// A replayed request, as far as matching cares.
struct Actual {
    kind: &'static str,
    sector: u64,
    len: u64,
    hash: Option<[u8; HASH_LEN]>,
    unmap: Option<bool>,
    req_type: Option<u32>,
    status: Option<u8>,
}

impl std::fmt::Display for Actual {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} sector={} len={}", self.kind, self.sector, self.len)?;
        if let Some(s) = self.status {
            write!(f, " status={}", status_name(s))?;
        }
        if let Some(h) = &self.hash {
            write!(f, " hash=")?;
            h.iter().try_for_each(|b| write!(f, "{b:02x}"))?;
        }
        if let Some(u) = self.unmap {
            write!(f, " unmap={u}")?;
        }
        if let Some(t) = self.req_type {
            write!(f, " type={t}")?;
        }
        Ok(())
    }
}

/// What the caller does after a lookup.
enum Outcome {
    /// Matched: serve the recorded request.
    Matched(Record),
    /// Diverged under `Continue`: serve from the replay-point snapshot / drop the write.
    Continue,
}

#[derive(Default)]
struct DivergenceLog {
    count: u64,
    kept: Vec<Divergence>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn uuid_str(u: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*u).hyphenated().to_string()
}

/// A block device that replays a record log over an image.
pub struct ReplayingDevice {
    image: Arc<Image>,
    index: ReplayIndex,
    policy: DivergencePolicy,
    epochs: Mutex<Vec<QueueEpoch>>,
    matched: AtomicU64,
    stopped: AtomicBool,
    failed_after_stop: AtomicU64,
    divergences: Mutex<DivergenceLog>,
    /// Highest seq seen by a matched record (the replay point).
    replay_point: AtomicU64,
    snapshot: Mutex<Option<(Seq, Arc<Snapshot>)>>,
}

impl ReplayingDevice {
    /// Opens `log` for replay over `image`: indexes it and checks that it belongs to the
    /// image and that the history it needs is still readable.
    pub fn open(
        image: Arc<Image>,
        log: &Path,
        policy: DivergencePolicy,
    ) -> Result<Self, ReplayError> {
        let index = ReplayIndex::open(log)?;
        Self::new(image, index, policy)
    }

    /// As [`open`](Self::open), from an index already built.
    pub fn new(
        image: Arc<Image>,
        index: ReplayIndex,
        policy: DivergencePolicy,
    ) -> Result<Self, ReplayError> {
        let h = *index.header();
        if h.image_uuid != image.uuid() {
            return Err(ReplayError::WrongImage {
                log: uuid_str(&h.image_uuid),
                image: uuid_str(&image.uuid()),
            });
        }
        if h.block_size != image.block_size() || h.image_size != image.size() {
            return Err(ReplayError::Geometry {
                log_size: h.image_size,
                log_bs: h.block_size.bytes(),
                image_size: image.size(),
                image_bs: image.block_size().bytes(),
            });
        }
        if let Some(TornTail {
            offset,
            dropped_bytes,
        }) = index.torn_tail()
        {
            warn!(
                "record log: torn tail at byte {offset} ({dropped_bytes} bytes dropped): \
                 replaying the {} records before it",
                index.len()
            );
        }
        check_history(&image, &index)?;
        info!(
            "replaying {} records ({} mode, recorded from image seq {}; image now at seq {})",
            index.len(),
            h.mode.name(),
            h.start_seq,
            image.seq()
        );
        Ok(Self {
            image,
            replay_point: AtomicU64::new(h.start_seq.get()),
            index,
            policy,
            epochs: Mutex::new(Vec::new()),
            matched: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            failed_after_stop: AtomicU64::new(0),
            divergences: Mutex::new(DivergenceLog::default()),
            snapshot: Mutex::new(None),
        })
    }

    /// The replay's outcome so far (call it when the frontend disconnects and at exit).
    pub fn summary(&self) -> ReplaySummary {
        let d = lock(&self.divergences);
        ReplaySummary {
            records: self.index.len(),
            matched: self.matched.load(Ordering::Relaxed),
            divergences: d.count,
            first_divergences: d.kept.clone(),
            failed_after_stop: self.failed_after_stop.load(Ordering::Relaxed),
            stopped: self.stopped.load(Ordering::Relaxed),
        }
    }

    /// The image being replayed on.
    pub fn image(&self) -> &Arc<Image> {
        &self.image
    }

    fn key(&self, ctx: &RequestCtx) -> CallKey {
        let mut e = lock(&self.epochs);
        let q = usize::from(ctx.queue);
        if e.len() <= q {
            e.resize(q + 1, QueueEpoch::new(self.index.header().indices));
        }
        e.get_mut(q)
            .map_or((0, ctx.index, 0), |qe| qe.key(ctx.index))
    }

    fn check_stopped(&self) -> Result<(), BlockError> {
        if self.stopped.load(Ordering::Acquire) {
            self.failed_after_stop.fetch_add(1, Ordering::Relaxed);
            return Err(BlockError::Diverged(
                "the replay stopped at an earlier divergence".into(),
            ));
        }
        Ok(())
    }

    /// Looks the request up and compares it with the record; reports a divergence.
    fn matching(
        &self,
        ctx: &RequestCtx,
        actual: &Actual,
        same: impl Fn(&Record) -> Result<(), String>,
    ) -> Result<Outcome, BlockError> {
        let key = self.key(ctx);
        let rec = self.index.get(ctx.queue, key).map(|(_, r)| r);
        let verdict = match &rec {
            None => Err("the log has no such request (more requests than recorded)".to_string()),
            Some(r) if r.kind_name() != actual.kind => Err(format!(
                "a {} where the log has a {}",
                actual.kind,
                r.kind_name()
            )),
            Some(r) if r.sector != actual.sector || r.len != actual.len => {
                Err("sector or length differs".to_string())
            }
            Some(r) => same(r),
        };
        match (verdict, rec) {
            (Ok(()), Some(r)) => {
                self.matched.fetch_add(1, Ordering::Relaxed);
                self.replay_point.fetch_max(r.seq.get(), Ordering::Relaxed);
                Ok(Outcome::Matched(r))
            }
            (Ok(()), None) => Err(BlockError::Diverged(
                "internal: match without record".into(),
            )),
            (Err(reason), rec) => self.diverge(Divergence {
                queue: ctx.queue,
                index: ctx.index,
                reason,
                recorded: rec.map(|r| r.to_string()),
                replayed: actual.to_string(),
            }),
        }
    }

    fn diverge(&self, d: Divergence) -> Result<Outcome, BlockError> {
        warn!("replay diverged at {d}");
        let msg = d.to_string();
        {
            let mut log = lock(&self.divergences);
            log.count += 1;
            if log.kept.len() < KEPT_DIVERGENCES {
                log.kept.push(d);
            }
        }
        match self.policy {
            DivergencePolicy::Stop => {
                if !self.stopped.swap(true, Ordering::AcqRel) {
                    warn!("replay stopped: this and every later request fail with IOERR");
                }
                Err(BlockError::Diverged(msg))
            }
            DivergencePolicy::Continue => Ok(Outcome::Continue),
        }
    }

    /// The image as of the replay point, built once per replay point.
    fn snapshot(&self) -> Result<Arc<Snapshot>, BlockError> {
        let seq = Seq(self.replay_point.load(Ordering::Relaxed));
        let mut g = lock(&self.snapshot);
        if let Some((s, snap)) = g.as_ref() {
            if *s == seq {
                return Ok(Arc::clone(snap));
            }
        }
        let snap = Arc::new(self.image.state_at(seq).map_err(BlockError::from)?);
        *g = Some((seq, Arc::clone(&snap)));
        Ok(snap)
    }

    fn read_from_snapshot(&self, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        let snap = self.snapshot()?;
        let total = total_len(segs);
        let mut buf = vec![0u8; SNAPSHOT_CHUNK.min(usize::try_from(total).unwrap_or(usize::MAX))];
        let mut done = 0u64;
        while done < total {
            let n = (total - done).min(buf.len() as u64);
            let chunk = buf.get_mut(..n as usize).unwrap_or_default();
            snap.read_at(offset + done, chunk)
                .map_err(BlockError::from)?;
            let dst = slice_segs(segs, done, n).ok_or(BlockError::OutOfRange {
                offset,
                len: total,
                capacity: self.image.size(),
            })?;
            let mut pos = 0usize;
            for s in &dst {
                s.copy_from(0, chunk.get(pos..pos + s.len()).unwrap_or_default());
                pos += s.len();
            }
            done += n;
        }
        Ok(())
    }
}

impl Drop for ReplayingDevice {
    /// Reports the summary when the replay ends (the daemon drops the device at exit).
    fn drop(&mut self) {
        let s = self.summary();
        if s.is_clean() {
            info!("{s}");
        } else {
            warn!("{s}");
            for d in s.first_divergences.iter().skip(1) {
                warn!("  divergence at {d}");
            }
        }
    }
}

/// The error a recorded failure is replayed as.
fn recorded_failure(status: u8) -> BlockError {
    match status {
        2 => BlockError::Unsupported,
        s => BlockError::Io(std::io::Error::other(format!(
            "the recorded request failed ({})",
            status_name(s)
        ))),
    }
}

/// Checks that every seq the log refers to exists and that the first and last block of every
/// mapped extent (deduplicated) can be read. Reading every block would cost as much as the
/// replay; reclamation frees whole runs, so the ends of each run are what goes first.
fn check_history(image: &Image, index: &ReplayIndex) -> Result<(), ReplayError> {
    let image_seq = image.seq().get();
    let mut max_seq = index.header().start_seq.get();
    let mut first_err: Option<ReplayError> = None;
    let mut checked: HashSet<u64> = HashSet::new();
    let mut block = vec![0u8; image.block_size().bytes() as usize];
    let block_id = index.header().mode == RecordMode::BlockId;
    // Slots reclaimed and then written again hold other data than the log read from them.
    let reborn = if block_id {
        image.reborn_index()?
    } else {
        RebornIndex::default()
    };
    index.for_each(|r| {
        max_seq = max_seq.max(r.seq.get());
        if first_err.is_some() || !block_id {
            return;
        }
        let RecordBody::Read(b) = &r.body else {
            return;
        };
        for e in &b.extents {
            let LogExtent::Mapped { pba, blocks } = *e else {
                continue;
            };
            if blocks == 0 {
                continue;
            }
            let missing = |pba: u64, source: ImageError| ReplayError::MissingHistory {
                pba,
                queue: r.queue,
                index: r.index,
                source,
            };
            // The whole run must still be there (a reclaim may have taken part of it) ...
            if let Err(source) = image.check_blocks(Pba(pba.get()), blocks) {
                let p = match source {
                    ImageError::Reclaimed { pba, .. } => pba.0,
                    _ => pba.get(),
                };
                first_err = Some(missing(p, source));
                return;
            }
            // ... and no later write may have reused it ...
            if let Some(p) = reborn.reused_after_seq(pba.get(), blocks, r.seq.get()) {
                first_err = Some(missing(
                    p,
                    ImageError::Reclaimed {
                        pba: Pba(p),
                        horizon: image.history_horizon(),
                    },
                ));
                return;
            }
            // ... and its ends must read (the file must not have been truncated).
            for p in [pba.get(), pba.get().saturating_add(blocks - 1)] {
                if !checked.insert(p) {
                    continue;
                }
                if let Err(source) = image.read_block(Pba(p), &mut block) {
                    first_err = Some(missing(p, source));
                    return;
                }
            }
        }
    });
    if max_seq > image_seq {
        return Err(ReplayError::FutureSeq {
            seq: max_seq,
            image_seq,
        });
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl BlockDevice for ReplayingDevice {
    fn capacity(&self) -> u64 {
        self.image.size()
    }

    fn block_size(&self) -> u32 {
        self.image.block_size().bytes()
    }

    /// Never read-only: the replayed guest must be able to issue the writes it recorded (they
    /// are verified and dropped).
    fn is_read_only(&self) -> bool {
        false
    }

    fn read(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.check_stopped()?;
        let actual = Actual {
            kind: "read",
            sector: offset / SECTOR_SIZE,
            len: total_len(segs),
            hash: None,
            unmap: None,
            req_type: None,
            status: None,
        };
        match self.matching(ctx, &actual, |_| Ok(()))? {
            Outcome::Matched(r) => {
                if r.status != 0 {
                    return Err(recorded_failure(r.status));
                }
                let RecordBody::Read(b) = r.body else {
                    return Err(BlockError::Diverged(
                        "internal: read record expected".into(),
                    ));
                };
                if let Some(data) = b.data {
                    let mut pos = 0usize;
                    for s in segs {
                        s.copy_from(0, data.get(pos..pos + s.len()).unwrap_or_default());
                        pos += s.len();
                    }
                    return Ok(());
                }
                let extents: Vec<Extent> = b.extents.iter().map(Extent::from).collect();
                let skip = offset % self.image.block_size().bytes_u64();
                self.image
                    .read_extents(&extents, skip, segs)
                    .map_err(BlockError::from)?;
                Ok(())
            }
            Outcome::Continue => self.read_from_snapshot(offset, segs),
        }
    }

    fn write(&self, ctx: &RequestCtx, offset: u64, segs: &[IoSeg<'_>]) -> Result<(), BlockError> {
        self.check_stopped()?;
        let hash = hash_segs(self.index.header().write_hash, segs);
        let actual = Actual {
            kind: "write",
            sector: offset / SECTOR_SIZE,
            len: total_len(segs),
            hash: Some(hash),
            unmap: None,
            req_type: None,
            status: None,
        };
        let same = |r: &Record| match r.body {
            RecordBody::Write { hash: h, .. } if h == hash => Ok(()),
            _ => Err("the written data differs (hash mismatch)".to_string()),
        };
        match self.matching(ctx, &actual, same)? {
            Outcome::Matched(r) if r.status != 0 => Err(recorded_failure(r.status)),
            Outcome::Matched(_) | Outcome::Continue => Ok(()),
        }
    }

    fn flush(&self, ctx: &RequestCtx) -> Result<(), BlockError> {
        if ctx.is_internal() {
            // Not a guest request, and the replay changes nothing that would need flushing.
            return Ok(());
        }
        self.check_stopped()?;
        let actual = Actual {
            kind: "flush",
            sector: 0,
            len: 0,
            hash: None,
            unmap: None,
            req_type: None,
            status: None,
        };
        match self.matching(ctx, &actual, |_| Ok(()))? {
            Outcome::Matched(r) if r.status != 0 => Err(recorded_failure(r.status)),
            _ => Ok(()),
        }
    }

    fn discard(&self, ctx: &RequestCtx, offset: u64, len: u64) -> Result<(), BlockError> {
        self.check_stopped()?;
        let actual = Actual {
            kind: "discard",
            sector: offset / SECTOR_SIZE,
            len,
            hash: None,
            unmap: None,
            req_type: None,
            status: None,
        };
        match self.matching(ctx, &actual, |_| Ok(()))? {
            Outcome::Matched(r) if r.status != 0 => Err(recorded_failure(r.status)),
            _ => Ok(()),
        }
    }

    fn write_zeroes(
        &self,
        ctx: &RequestCtx,
        offset: u64,
        len: u64,
        unmap: bool,
    ) -> Result<(), BlockError> {
        self.check_stopped()?;
        let actual = Actual {
            kind: "write-zeroes",
            sector: offset / SECTOR_SIZE,
            len,
            hash: None,
            unmap: Some(unmap),
            req_type: None,
            status: None,
        };
        let same = |r: &Record| match r.body {
            RecordBody::WriteZeroes { unmap: u } if u == unmap => Ok(()),
            _ => Err("the unmap flag differs".to_string()),
        };
        match self.matching(ctx, &actual, same)? {
            Outcome::Matched(r) if r.status != 0 => Err(recorded_failure(r.status)),
            _ => Ok(()),
        }
    }

    fn rejected(&self, ctx: &RequestCtx, req: &RejectedRequest) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let req_type = request_type_code(req.kind);
        let actual = Actual {
            kind: "rejected",
            sector: req.sector,
            len: req.len,
            hash: None,
            unmap: None,
            req_type: Some(req_type),
            status: Some(req.status),
        };
        let same = |r: &Record| match r.body {
            RecordBody::Rejected { req_type: t } if t == req_type && r.status == req.status => {
                Ok(())
            }
            _ => Err("the request type or status differs".to_string()),
        };
        // The virtio layer already answered; a divergence here is only reported.
        let _ = self.matching(ctx, &actual, same);
    }
}

//! The RR-Row image engine: redirect-on-write, retained history, crash-consistent journal.
//!
//! An image is one file (docs/format.md specifies it byte by byte): two header copies, then a
//! data area of block-sized slots handed out by one append-only counter. Every write goes to
//! freshly allocated slots (its PBAs); the journal, itself a chain of slot runs, records every
//! state-changing operation with its seq, so the disk as of any seq can be rebuilt
//! ([`Image::state_at`]) and every version of a block listed ([`Image::history`]).
//! Checkpoints of the LBA map bound the work of opening an image.
//!
//! This module knows nothing of virtio or vhost-user.
//!
//! ```
//! use rr_row::image::{CreateOptions, Extent, Image, OpenMode};
//! use rr_row::units::{BlockSize, Lba, Seq};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.rrow");
//! let opts = CreateOptions { size: 1 << 20, block_size: BlockSize::DEFAULT, base: None };
//! let img = Image::create(&path, &opts)?;
//! let first = img.write_at(0, &[1u8; 4096])?;
//! img.write_at(0, &[2u8; 4096])?; // redirected: a new block, the old one is kept
//! img.flush()?;
//!
//! let mut buf = [0u8; 4096];
//! img.read_at(0, &mut buf)?;
//! assert_eq!(buf, [2u8; 4096]);
//! img.read_block(first.first_pba, &mut buf)?; // by block id, whatever the map says now
//! assert_eq!(buf, [1u8; 4096]);
//! img.state_at(Seq(1))?.read_at(0, &mut buf)?; // the disk as of seq 1
//! assert_eq!(buf, [1u8; 4096]);
//! assert!(matches!(img.resolve(Lba(0), 1)?[..], [Extent::Mapped { .. }]));
//! img.close()?;
//! assert_eq!(Image::open(&path, OpenMode::ReadOnly)?.seq(), Seq(2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod cache;
mod check;
mod direct;
mod error;
pub mod format;
mod freelist;
mod io;
mod journal;
mod map;
mod plan;
mod prealloc;
mod reclaim;
mod segmap;
mod shared;
pub mod uring;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use check::CheckReport;
pub use error::ImageError;
use format::{
    check_seg_header, encode_seg_header, Checkpoint, CkptRef, Header, HeaderFault, JPos, Piece,
    RecKind, Record, DATA_OFFSET, HEADER_B_OFFSET, HEADER_SIZE, MAX_BASE_PATH, MAX_BLOCKS,
    SEG_HEADER_SIZE, VERSION,
};
use journal::{Journal, Step, Stop, Walker};
use map::Map;
pub use plan::{ReadPlan, Transfer};
pub use reclaim::{RebornBuilder, RebornIndex, ReclaimPlan, ReclaimReport};
use shared::{Base, Shared};

use crate::iobuf::{total_len, IoSeg, IoSegs, PageBuf};
use crate::units::{BlockSize, Lba, Pba, Seq};

/// Journal bytes after which a flush also takes a checkpoint.
pub const DEFAULT_CHECKPOINT_THRESHOLD: u64 = 64 << 20;
/// Data bytes written without a flush after which the engine syncs by itself.
pub const DEFAULT_UNSYNCED_LIMIT: u64 = 1 << 30;

/// Parameters of [`Image::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// Block size.
    pub block_size: BlockSize,
    /// Read-only raw base image; unwritten blocks read from it (zeros past its end).
    pub base: Option<PathBuf>,
}

/// Options of [`Image::open_with_options`] beyond the [`OpenMode`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Read and write data blocks with `O_DIRECT` through a second descriptor of the file,
    /// keeping them out of the host page cache (the journal, headers and checkpoints stay
    /// buffered; the base image too). Buffers that are not aligned for `O_DIRECT` are copied
    /// through an aligned bounce buffer. Needs a filesystem that supports `O_DIRECT`
    /// ([`ImageError::DirectUnsupported`] otherwise) and a block size that is a multiple of
    /// the page size ([`ImageError::DirectUnsuitable`] otherwise).
    pub direct: bool,
    /// Read-only opens: hold a shared lock on the file while open (when no read-write user
    /// holds it), so that nothing can open it read-write meanwhile - in particular no
    /// reclaim can take blocks a replay reads. Without it a read-only open takes no lock.
    pub shared_lock: bool,
}

/// How to open an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read and write (takes an exclusive lock on the file).
    ReadWrite,
    /// Read only: nothing is ever written to the file.
    ReadOnly,
}

/// What [`Image::read_many`] did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRead {
    /// Read.
    Done,
    /// Not read: the caller reads it on its own (too fragmented for the batch, or the batch
    /// could not tell its outcome).
    Alone,
}

/// What [`Image::read_many`] resolved, for a caller that records it (`serve --record`): the
/// same facts [`Image::read_vectored`]'s trace and seq give for one request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchTrace {
    /// The image's seq when the batch was resolved (all of it under one hold of the map):
    /// every request of the batch read the state after that operation.
    pub seq: Seq,
    /// Each request's extents, in request order: the block ids its data came from. Empty
    /// for a request that was not read in the batch ([`BatchRead::Alone`], an error) or
    /// that has no bytes.
    pub extents: Vec<Vec<Extent>>,
}

/// What [`Image::write_many`] did with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchWrite {
    /// Written and committed.
    Done(WriteOutcome),
    /// Not written: the caller writes it on its own (not whole aligned blocks, or the image
    /// has no direct descriptor and ring to batch with).
    Alone,
}

/// Block-granular description of what backs consecutive LBAs, in LBA order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// PBAs `pba .. pba + blocks`, consecutive.
    Mapped {
        /// First block id.
        pba: Pba,
        /// Number of blocks.
        blocks: u64,
    },
    /// Reads zeros (never written without a base, discarded, zeroed).
    Zero {
        /// Number of blocks.
        blocks: u64,
    },
    /// Reads the raw base image at these LBAs (zeros past its end).
    Base {
        /// First LBA in the base.
        lba: Lba,
        /// Number of blocks.
        blocks: u64,
    },
}

impl Extent {
    /// Number of blocks the extent covers.
    pub fn blocks(&self) -> u64 {
        match *self {
            Extent::Mapped { blocks, .. }
            | Extent::Zero { blocks }
            | Extent::Base { blocks, .. } => blocks,
        }
    }
}

/// The result of a write: its seq and the run of new PBAs holding the blocks it touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    /// The write's seq.
    pub seq: Seq,
    /// First new PBA.
    pub first_pba: Pba,
    /// Number of new blocks (covering every block the write touched, whole).
    pub blocks: u64,
}

/// What an operation did to one LBA, as listed by [`Image::history`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryKind {
    /// Written with data.
    Write,
    /// Discarded.
    Discard,
    /// Zeroed.
    WriteZeroes,
}

/// One version of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The operation's seq.
    pub seq: Seq,
    /// Which operation.
    pub kind: HistoryKind,
    /// The block id holding this version, or None when it reads as zeros.
    pub pba: Option<Pba>,
    /// The version's data block was reclaimed: its content is gone.
    pub reclaimed: bool,
}

/// Image metadata, as shown by `rr-row info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ImageInfo {
    /// Format version.
    pub format_version: u32,
    /// UUID.
    pub uuid: String,
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// Bytes the file occupies on disk.
    pub allocated_bytes: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// Current seq.
    pub seq: u64,
    /// Blocks the current map points at.
    pub live_blocks: u64,
    /// Data blocks retained in the file (current and old versions).
    pub retained_blocks: u64,
    /// Journal segments.
    pub journal_segments: u64,
    /// Bytes of journal segments.
    pub journal_bytes: u64,
    /// Journal bytes written since the latest checkpoint.
    pub journal_bytes_since_checkpoint: u64,
    /// Seq of the latest checkpoint (None when there is none).
    pub checkpoint_seq: Option<u64>,
    /// Header generation.
    pub header_generation: u64,
    /// Base image path as stored.
    pub base: Option<String>,
    /// Base image size.
    pub base_size: Option<u64>,
    /// Memory used by the in-memory map.
    pub map_memory_bytes: u64,
    /// Whether the image is open read-only.
    pub read_only: bool,
    /// States before this seq can no longer be rebuilt (0: no history was reclaimed).
    pub history_horizon: u64,
    /// Data blocks whose versions were reclaimed (holes in the file).
    pub reclaimed_blocks: u64,
}

struct Live {
    map: Map,
    seq: u64,
}

/// What opening found, for `check`.
#[derive(Debug, Default, Clone)]
pub(crate) struct OpenNotes {
    /// A header copy that failed validation.
    damaged_header: Option<(u8, String)>,
    /// Bytes of torn journal tail and the records dropped.
    torn: Option<String>,
    /// Records dropped after the last flush marker because their data did not verify.
    dropped: u64,
    /// Recovery rolled back over damaged durable records (repair only).
    rolled_back: Option<String>,
    /// Journal bytes replayed at open.
    replayed_bytes: u64,
}

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct OpenFlags {
    ignore_ckpt: bool,
    rollback: bool,
}

/// An open RR-Row image. `Send + Sync`: reads run in parallel, writes allocate and write their
/// data in parallel and serialize only their journal commit.
pub struct Image {
    sh: Arc<Shared>,
    live: RwLock<Live>,
    journal: Mutex<Journal>,
    seq: AtomicU64,
    read_only: bool,
    ckpt_threshold: AtomicU64,
    unsynced_limit: AtomicU64,
    sync_due: std::sync::atomic::AtomicBool,
    /// Periodic syncs are left to a background caller of [`Image::wait_sync_due`].
    deferred_sync: std::sync::atomic::AtomicBool,
    /// Set when a periodic sync is due and [`Image::wait_sync_due`] should run it.
    sync_request: Mutex<bool>,
    sync_wake: std::sync::Condvar,
    relocate_min_extents: AtomicU64,
    prealloc: Mutex<Option<prealloc::Preallocator>>,
    dropper: Mutex<Option<cache::CacheDropper>>,
    /// Where the last reclaim plan stopped (see `reclaim.rs`).
    reclaim_cursor: Mutex<Option<reclaim::Cursor>>,
    /// Tickets of file syncs: taken under the journal mutex once the journal is written out
    /// (`sync_started`), and recorded once that sync completed (`sync_done`, the highest).
    /// Journal bytes appended before a ticket was taken are durable once it is done.
    sync_started: AtomicU64,
    sync_done: AtomicU64,
    notes: OpenNotes,
    path: PathBuf,
    closed: bool,
}

/// A read-only view of an image as of a past seq, with its own map.
pub struct Snapshot {
    sh: Arc<Shared>,
    map: Map,
    seq: u64,
    /// [`Shared::revived`] when the view was taken.
    revived: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
fn rlock<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|e| e.into_inner())
}
fn wlock<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(|e| e.into_inner())
}

/// Describes LBAs `lba .. lba + blocks` of `map` as extents (shared by the live image and
/// its snapshots).
fn resolve_in(sh: &Shared, map: &Map, lba: Lba, blocks: u64) -> Result<Vec<Extent>, ImageError> {
    let bs = sh.bs.bytes_u64();
    if lba.0.checked_add(blocks).map_or(true, |e| e > sh.blocks) {
        return Err(ImageError::OutOfRange {
            offset: lba.0.saturating_mul(bs),
            len: blocks.saturating_mul(bs),
            size: sh.size,
        });
    }
    let mut ex = Vec::new();
    map.extents(lba.0, blocks, sh.base.is_some(), &mut ex);
    Ok(ex)
}

fn check_range(size: u64, offset: u64, len: u64) -> Result<(), ImageError> {
    if offset % 512 != 0 || len % 512 != 0 {
        return Err(ImageError::Unaligned { offset, len });
    }
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

/// The first block and the number of blocks that `len > 0` bytes at `offset` touch.
fn blocks_spanned(offset: u64, len: u64, bs: u64) -> (u64, u64) {
    let first = offset / bs;
    (first, (offset + len - 1) / bs - first + 1)
}

fn zero_value(sh: &Shared) -> u64 {
    if sh.base.is_some() {
        map::ZERO
    } else {
        0
    }
}

fn apply(map: &mut Map, rec: &Record, zero: u64) {
    for p in &rec.pieces {
        map.set_range(p.lba, p.blocks, p.pba, zero);
    }
}

fn resolve_base_path(image: &Path, stored: &str) -> PathBuf {
    let p = PathBuf::from(stored);
    if p.is_absolute() {
        p
    } else {
        image.parent().map(|d| d.join(&p)).unwrap_or(p)
    }
}

/// Opens the base image `stored` (as recorded for `image`) read-only: its resolved path, the
/// file and its size.
fn open_base(image: &Path, stored: &str) -> Result<(PathBuf, File, u64), ImageError> {
    let resolved = resolve_base_path(image, stored);
    let unavailable = |e| ImageError::BaseUnavailable {
        path: resolved.clone(),
        source: e,
    };
    let f = File::open(&resolved).map_err(unavailable)?;
    let size = f.metadata().map_err(unavailable)?.len();
    Ok((resolved, f, size))
}

#[cfg(test)]
impl Image {
    /// Unit tests' image: 1 MiB of default-size blocks, no base, created at `path` and closed.
    pub(crate) fn create_small_for_test(path: &Path) {
        let opts = CreateOptions {
            size: 1 << 20,
            block_size: crate::units::BlockSize::DEFAULT,
            base: None,
        };
        Image::create(path, &opts).unwrap().close().unwrap();
    }
}

impl Image {
    /// Creates a new image; refuses an existing file.
    pub fn create(path: &Path, opts: &CreateOptions) -> Result<Image, ImageError> {
        let bs = opts.block_size;
        if opts.size == 0 || opts.size % 512 != 0 {
            return Err(ImageError::InvalidOptions(format!(
                "size {} is not a positive multiple of 512",
                opts.size
            )));
        }
        if opts.size.div_ceil(bs.bytes_u64()) > MAX_BLOCKS {
            return Err(ImageError::InvalidOptions(format!(
                "size {} is too large: at most {} blocks of {} bytes",
                opts.size, MAX_BLOCKS, bs
            )));
        }
        let (base_path, base_size) = match &opts.base {
            None => (None, 0),
            Some(b) => {
                let s = b.to_str().ok_or_else(|| {
                    ImageError::InvalidOptions("base path is not valid UTF-8".into())
                })?;
                if s.len() > MAX_BASE_PATH {
                    return Err(ImageError::InvalidOptions(
                        "base path is longer than 1024 bytes".into(),
                    ));
                }
                let (_, _, size) = open_base(path, s)?;
                (Some(s.to_string()), size)
            }
        };
        let seg_slots = ((1u64 << 20) / bs.bytes_u64()).max(1);
        let uuid = *uuid::Uuid::new_v4().as_bytes();
        let hdr = Header {
            incompat: 0,
            compat: 0,
            generation: 1,
            block_size: bs,
            seg_slots: seg_slots as u32,
            size: opts.size,
            uuid,
            data_offset: DATA_OFFSET,
            first_seg_slot: 0,
            ckpt: None,
            ckpt_seq: 0,
            jpos: JPos {
                seg_slot: 0,
                seg_index: 0,
                offset: SEG_HEADER_SIZE,
                crc: Header::chain_seed(&uuid),
            },
            next_free_slot: seg_slots,
            base_size,
            base_path,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    ImageError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    ImageError::io("cannot create the image", e)
                }
            })?;
        let res = (|| -> std::io::Result<()> {
            use std::os::unix::fs::FileExt;
            let h = hdr.encode();
            file.write_all_at(&h, 0)?;
            file.write_all_at(&h, HEADER_B_OFFSET)?;
            let mut seg = vec![0u8; (seg_slots * bs.bytes_u64()) as usize];
            let sh = encode_seg_header(&uuid, 0);
            if let Some(d) = seg.get_mut(..sh.len()) {
                d.copy_from_slice(&sh);
            }
            file.write_all_at(&seg, DATA_OFFSET)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                if let Ok(d) = File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        })();
        drop(file);
        if let Err(e) = res {
            let _ = std::fs::remove_file(path);
            return Err(ImageError::io("cannot create the image", e));
        }
        log::info!(
            "created image {} ({} bytes, block size {})",
            path.display(),
            opts.size,
            bs
        );
        Image::open(path, OpenMode::ReadWrite)
    }

    /// Opens an image, recovering from an unclean shutdown (see docs/format.md).
    pub fn open(path: &Path, mode: OpenMode) -> Result<Image, ImageError> {
        Self::open_with(path, mode, OpenFlags::default())
    }

    /// Opens an image like [`Image::open`], with [`OpenOptions`].
    pub fn open_with_options(
        path: &Path,
        mode: OpenMode,
        opts: &OpenOptions,
    ) -> Result<Image, ImageError> {
        Self::open_inner(path, mode, OpenFlags::default(), opts)
    }

    /// True when data blocks are read and written with `O_DIRECT` ([`OpenOptions::direct`]).
    pub fn is_direct(&self) -> bool {
        self.sh.direct.is_some()
    }

    pub(crate) fn open_with(
        path: &Path,
        mode: OpenMode,
        fl: OpenFlags,
    ) -> Result<Image, ImageError> {
        Self::open_inner(path, mode, fl, &OpenOptions::default())
    }

    fn open_inner(
        path: &Path,
        mode: OpenMode,
        fl: OpenFlags,
        opts: &OpenOptions,
    ) -> Result<Image, ImageError> {
        let rw = mode == OpenMode::ReadWrite;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(rw)
            .open(path)
            .map_err(|e| ImageError::io("cannot open the image", e))?;
        if rw
            && !io::lock_exclusive(&file).map_err(|e| ImageError::io("cannot lock the image", e))?
        {
            return Err(ImageError::Locked);
        }
        if !rw
            && opts.shared_lock
            && !io::lock_shared(&file).map_err(|e| ImageError::io("cannot lock the image", e))?
        {
            log::warn!(
                "{} is open read-write by another process: it may change (and, with retention, \
                 reclaim history) while this read-only user reads it",
                path.display()
            );
        }
        let direct = match opts.direct {
            true => Some(direct::DirectFile::open(path, rw)?),
            false => None,
        };
        let (hdr, hdr_copy, damaged) = read_header(&file)?;
        if let Some(d) = &direct {
            direct::check_layout(path, d, hdr.block_size.bytes_u64(), hdr.data_offset)?;
        }
        let mut notes = OpenNotes {
            damaged_header: damaged,
            ..OpenNotes::default()
        };
        let base = match &hdr.base_path {
            None => None,
            Some(p) => {
                let (resolved, f, size) = open_base(path, p)?;
                if size != hdr.base_size {
                    return Err(ImageError::BaseSizeChanged {
                        path: resolved,
                        expected: hdr.base_size,
                        found: size,
                    });
                }
                Some(Base { file: f, size })
            }
        };
        let file_len = file
            .metadata()
            .map_err(|e| ImageError::io("cannot stat the image", e))?
            .len();
        // Journal segments are written whole when they are started: the file must reach the
        // end of the first one and of the one replay starts in.
        let seg_bytes = u64::from(hdr.seg_slots) * hdr.block_size.bytes_u64();
        let need = [hdr.first_seg_slot, hdr.jpos.seg_slot]
            .iter()
            .map(|&s| {
                s.saturating_mul(hdr.block_size.bytes_u64())
                    .saturating_add(hdr.data_offset)
                    .saturating_add(seg_bytes)
            })
            .max()
            .unwrap_or(0);
        if file_len < need {
            return Err(ImageError::Truncated {
                what: format!("the file is {file_len} bytes but its journal reaches byte {need}"),
            });
        }
        let sh = Shared {
            file,
            direct,
            base,
            bs: hdr.block_size,
            size: hdr.size,
            blocks: hdr.blocks(),
            data_offset: hdr.data_offset,
            uuid: hdr.uuid,
            seg_slots: u64::from(hdr.seg_slots),
            next_slot: AtomicU64::new(hdr.next_free_slot),
            meta: RwLock::new(vec![(hdr.first_seg_slot, u64::from(hdr.seg_slots))]),
            prealloc: Arc::default(),
            drop_state: Arc::default(),
            reclaimed: RwLock::default(),
            has_reclaimed: std::sync::atomic::AtomicBool::new(false),
            punched: Mutex::default(),
            reclaim_gen: AtomicU64::new(0),
            reuse: std::sync::atomic::AtomicBool::new(false),
            free: Mutex::default(),
            revived: AtomicU64::new(0),
            direct_writes: AtomicU64::new(0),
        };
        let zero = zero_value(&sh);
        let mut map = Map::new(sh.blocks);
        let mut next_slot = hdr.next_free_slot;
        let (start, start_seq) = match hdr.ckpt {
            Some(c) if !fl.ignore_ckpt => {
                let ck = load_checkpoint(&sh, &hdr, c, file_len)?;
                for &(l, n, e) in &ck.runs {
                    let bad = l.checked_add(n).map_or(true, |end| end > sh.blocks)
                        || n == 0
                        || e == 0
                        || (e >= 2 && (e - 2).checked_add(n).map_or(true, |end| end > next_slot));
                    if bad {
                        return Err(ImageError::corrupt(
                            sh.slot_off(c.slot).unwrap_or(0),
                            format!("checkpoint run {l}+{n} -> {e} is out of bounds"),
                        ));
                    }
                    if e >= 2 {
                        map.set_range(l, n, Some(e - 2), zero);
                    } else {
                        map.set_range(l, n, None, map::ZERO);
                    }
                }
                let mut meta = ck.meta.clone();
                meta.sort_unstable();
                *wlock(&sh.meta) = meta;
                if let Some(r) = &ck.reclaimed {
                    reclaim::validate(&sh, r, next_slot)
                        .map_err(|w| ImageError::corrupt(sh.slot_off(c.slot).unwrap_or(0), w))?;
                    sh.add_reclaimed(r);
                }
                (hdr.jpos, hdr.ckpt_seq)
            }
            Some(_) => (hdr.journal_start(), 0),
            None => (hdr.jpos, hdr.ckpt_seq),
        };

        // Replay the journal after the checkpoint up to the first invalid record.
        let mut w = Walker::new(&sh, start, start_seq)?;
        let mut recs: Vec<(Record, JPos)> = Vec::new();
        let mut replayed = 0u64;
        let stop = loop {
            match w.next_step()? {
                Step::Rec(r, len) => {
                    replayed += len as u64;
                    recs.push((r, w.pos));
                }
                Step::Stop(s) => break s,
            }
        };
        if let Stop::Torn {
            at,
            what,
            plausible,
        } = &stop
        {
            if w.flush_marker_after(*plausible, w.seq) {
                let msg = format!("{what}, but a later flush marker shows the record was durable");
                if fl.rollback {
                    log::warn!(
                        "ROLLING BACK: journal record at byte offset {at} is damaged ({msg}); \
                         every operation from there on is discarded"
                    );
                    notes.rolled_back = Some(format!("byte offset {at}: {msg}"));
                } else {
                    return Err(ImageError::corrupt(*at, msg));
                }
            } else {
                notes.torn = Some(format!("byte offset {at}: {what}"));
            }
        }
        if let Stop::BadSegment { at, what } = &stop {
            notes.torn = Some(format!("byte offset {at}: {what}"));
        }
        // A flush marker with seq S vouches for every record with seq <= S (and their data).
        // Later records are kept only while their data verifies.
        let durable = recs
            .iter()
            .filter(|(r, _)| r.kind == RecKind::Flush)
            .fold(start_seq, |d, (r, _)| d.max(r.seq));
        let mut keep = recs.len();
        'verify: for (i, (r, _)) in recs.iter().enumerate() {
            // A relocation appended in state R is covered by a flush marker only when that
            // marker vouches for a later state (a marker for R itself may have been synced
            // before the relocation was appended).
            let trusted = match r.kind {
                RecKind::Relocate => r.seq < durable,
                k => !k.changes_state() || r.seq <= durable,
            };
            if trusted {
                continue;
            }
            for p in &r.pieces {
                if let Some(pba) = p.pba {
                    if sh.data_crc(pba, p.blocks)? != Some(p.data_crc) {
                        keep = i;
                        break 'verify;
                    }
                }
            }
        }
        if keep < recs.len() {
            notes.dropped = (recs.len() - keep) as u64;
            log::info!(
                "recovery: dropped {} journal record(s) after the last flush whose data did not \
                 reach the disk",
                notes.dropped
            );
        }
        let end = if keep == recs.len() {
            w.pos
        } else if keep == 0 {
            start
        } else {
            recs.get(keep - 1).map_or(start, |(_, p)| *p)
        };
        let mut seq = start_seq;
        let mut segments = rlock(&sh.meta)
            .iter()
            .filter(|&&(_, c)| c == sh.seg_slots)
            .count() as u64;
        for (r, at) in recs.iter().take(keep) {
            if r.kind.maps() {
                apply(&mut map, r, zero);
                // A record naming reclaimed slots reuses them (feature bit 1 only).
                for p in &r.pieces {
                    let Some(pba) = p.pba else { continue };
                    if !sh.any_reclaimed(pba, p.blocks) {
                        continue;
                    }
                    if hdr.incompat & format::INCOMPAT_REUSE == 0 {
                        let off = sh.slot_off(at.seg_slot).unwrap_or(0) + at.offset;
                        return Err(ImageError::corrupt(
                            off,
                            format!(
                                "journal record before byte offset {off}: seq {} names reclaimed \
                                 blocks {pba}+{} in an image without the reuse feature",
                                r.seq, p.blocks
                            ),
                        ));
                    }
                    sh.revive(pba, p.blocks);
                }
            }
            if let Some(rc) = &r.reclaim {
                let bad = if hdr.incompat & format::INCOMPAT_RECLAIM == 0 {
                    Err("a reclaim record in an image without the reclaim feature".to_string())
                } else {
                    reclaim::validate(&sh, rc, next_slot)
                };
                bad.map_err(|w| {
                    let off = sh.slot_off(at.seg_slot).unwrap_or(0) + at.offset;
                    ImageError::corrupt(
                        off,
                        format!("journal record before byte offset {off}: {w}"),
                    )
                })?;
                sh.add_reclaimed(rc);
            }
            if r.kind.changes_state() {
                seq = r.seq;
            }
            for p in &r.pieces {
                if let Some(pba) = p.pba {
                    next_slot = next_slot.max(pba + p.blocks);
                }
            }
            if let Some((slot, _)) = r.link {
                next_slot = next_slot.max(slot + sh.seg_slots);
                if !sh.overlaps_meta(slot, sh.seg_slots) {
                    sh.add_meta(slot, sh.seg_slots);
                    segments += 1;
                }
            }
        }
        sh.next_slot.store(next_slot, Ordering::SeqCst);
        if let Some(t) = &notes.torn {
            log::info!("recovery: journal ends with a torn record at {t}");
        }
        notes.replayed_bytes = replayed;
        let since_ckpt = replayed;

        if rw {
            // Make the recovered end the durable end: fix the segment header, zero the stale
            // tail so nothing left behind can ever be read as a record.
            let seg_off = sh
                .slot_off(end.seg_slot)
                .ok_or_else(|| ImageError::corrupt(0, "journal offset overflows"))?;
            let seg = sh.read_segment(end.seg_slot)?;
            let mut rewrite_tail = false;
            if check_seg_header(&seg, &sh.uuid, end.seg_index).is_err() {
                // A segment the crash left unwritten: write it whole (header and zeros).
                sh.pwrite(&encode_seg_header(&sh.uuid, end.seg_index), seg_off)
                    .map_err(|e| ImageError::io("cannot write a journal segment header", e))?;
                rewrite_tail = true;
            }
            let tail = sh.seg_bytes() - end.offset;
            let stale = seg
                .get(end.offset as usize..)
                .is_some_and(|t| t.iter().any(|&b| b != 0));
            if stale || rewrite_tail {
                sh.pwrite(&vec![0u8; tail as usize], seg_off + end.offset)
                    .map_err(|e| ImageError::io("cannot clear the journal tail", e))?;
            }
            sh.file
                .sync_data()
                .map_err(|e| ImageError::io("cannot sync the image", e))?;
        }

        let mut journal = Journal {
            pos: end,
            written: end.offset,
            buf: Vec::new(),
            seq,
            durable_seq: seq,
            unsynced: 0,
            sync_requested: false,
            since_ckpt,
            failed: false,
            hdr,
            hdr_copy,
            segments,
            map: journal::SegMapState::Unmapped,
        };
        if rw {
            // Re-seed the chain: nothing a previous run left anywhere can validate after this.
            let epoch = Record {
                kind: RecKind::Epoch,
                seq,
                pieces: Vec::new(),
                link: None,
                nonce: Some(*uuid::Uuid::new_v4().as_bytes()),
                reclaim: None,
            };
            journal.append(&sh, &epoch)?;
            if seq > durable {
                // Records after the last flush marker were kept because their data verified,
                // and the sync above made them durable. Vouch for them now, before anything
                // can change the blocks they name: a reclaim that gives back a block one of
                // them superseded would otherwise let the next recovery fail to verify that
                // record, fall back before it - and before the reclaim records - and find
                // the states the reclaim gave up readable again, over punched or reused blocks.
                journal.append(&sh, &Record::flush_marker(seq))?;
                journal.write_out(&sh)?;
                sh.file
                    .sync_data()
                    .map_err(|e| ImageError::io("cannot sync the image", e))?;
                log::info!(
                    "recovery: {} operation(s) after the last flush verified and made durable",
                    seq - durable
                );
            }
        }
        log::info!(
            "opened image {} ({}, seq {}, {} bytes of journal replayed)",
            path.display(),
            if rw { "read-write" } else { "read-only" },
            seq,
            replayed
        );
        // What a previous process wrote is at least as old as this open: treat it as synced
        // for dropping superseded versions from the page cache (a dirty page is skipped anyway).
        sh.drop_state.synced(sh.next_slot.load(Ordering::SeqCst));
        Ok(Image {
            sh: Arc::new(sh),
            live: RwLock::new(Live { map, seq }),
            journal: Mutex::new(journal),
            seq: AtomicU64::new(seq),
            read_only: !rw,
            ckpt_threshold: AtomicU64::new(DEFAULT_CHECKPOINT_THRESHOLD),
            unsynced_limit: AtomicU64::new(DEFAULT_UNSYNCED_LIMIT),
            sync_due: std::sync::atomic::AtomicBool::new(false),
            deferred_sync: std::sync::atomic::AtomicBool::new(false),
            sync_request: Mutex::new(false),
            sync_wake: std::sync::Condvar::new(),
            relocate_min_extents: AtomicU64::new(0),
            prealloc: Mutex::new(None),
            dropper: Mutex::new(None),
            reclaim_cursor: Mutex::new(None),
            sync_started: AtomicU64::new(0),
            sync_done: AtomicU64::new(0),
            notes,
            path: path.to_path_buf(),
            closed: false,
        })
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.sh.size
    }

    /// Block size.
    pub fn block_size(&self) -> BlockSize {
        self.sh.bs
    }

    /// The image's UUID.
    pub fn uuid(&self) -> [u8; 16] {
        self.sh.uuid
    }

    /// True when opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The current seq.
    pub fn seq(&self) -> Seq {
        Seq(self.seq.load(Ordering::SeqCst))
    }

    /// Bytes of memory the live map uses.
    pub fn map_memory_bytes(&self) -> u64 {
        rlock(&self.live).map.memory_bytes()
    }

    /// The history horizon: states before this seq can no longer be rebuilt (0: no history
    /// was reclaimed).
    pub fn history_horizon(&self) -> Seq {
        Seq(self.sh.horizon())
    }

    /// Sets the journal size after which a flush takes a checkpoint.
    pub fn set_checkpoint_threshold(&self, bytes: u64) {
        self.ckpt_threshold.store(bytes, Ordering::SeqCst);
    }

    /// Sets how many data bytes may be written without a flush before the engine syncs on its
    /// own (bounding the work of recovery after a crash).
    pub fn set_unsynced_limit(&self, bytes: u64) {
        self.unsynced_limit.store(bytes, Ordering::SeqCst);
    }

    /// Leaves the periodic sync to a background thread (`true`) or runs it in the operation
    /// that crosses the unsynced limit (`false`, the default).
    ///
    /// When deferred, an operation that takes the unsynced data past the limit only asks for
    /// a sync, which the thread looping on [`Image::wait_sync_due`] then runs while requests
    /// go on; an operation that takes it past twice the limit (the thread has fallen behind)
    /// still syncs itself, so recovery never has more than that to verify.
    pub fn set_deferred_sync(&self, on: bool) {
        self.deferred_sync.store(on, Ordering::SeqCst);
        if !on {
            // A request nobody will serve any more: the next crossing syncs inline.
            *lock(&self.sync_request) = false;
            self.sync_wake.notify_all();
        }
    }

    /// Waits up to `timeout` for a periodic sync to fall due (see
    /// [`Image::set_deferred_sync`]) and runs it; says whether it ran one. Returns at once
    /// when syncs are not deferred (or stop being deferred meanwhile). Errors are those of
    /// [`Image::flush`].
    pub fn wait_sync_due(&self, timeout: std::time::Duration) -> Result<bool, ImageError> {
        let due = {
            let g = lock(&self.sync_request);
            let (mut g, _) = self
                .sync_wake
                .wait_timeout_while(g, timeout, |due| {
                    !*due && self.deferred_sync.load(Ordering::SeqCst)
                })
                .unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *g)
        };
        if due {
            self.flush()?;
        }
        Ok(due)
    }

    /// The seq that the last completed flush made durable: a crash now loses nothing up to it.
    pub fn durable_seq(&self) -> Seq {
        Seq(lock(&self.journal).durable_seq)
    }

    /// Books `bytes` of newly committed data against the unsynced limit (journal mutex held);
    /// sets `sync_due` when the caller must sync once it has released the mutex, or asks the
    /// background syncer.
    fn count_unsynced(&self, j: &mut Journal, bytes: u64) {
        j.unsynced = j.unsynced.saturating_add(bytes);
        let limit = self.unsynced_limit.load(Ordering::SeqCst);
        if j.unsynced < limit {
            return;
        }
        if self.deferred_sync.load(Ordering::SeqCst) && j.unsynced < limit.saturating_mul(2) {
            if !j.sync_requested {
                j.sync_requested = true;
                *lock(&self.sync_request) = true;
                self.sync_wake.notify_one();
            }
            return;
        }
        j.unsynced = 0;
        self.sync_due.store(true, Ordering::SeqCst);
    }

    /// Turns relocation on read on (`Some(n)`, n >= 2) or off (`None`, the default).
    ///
    /// When on, a read whose blocks are all data blocks spread over at least `n` physically
    /// separate runs is served from a private copy, and that copy is appended as one
    /// contiguous run and committed as a relocation record (docs/format.md): the map then
    /// points those LBAs at the new run, so the next read of the range is one system call.
    /// Content, seq and every old block id stay as they were (record logs and `state_at`
    /// remain valid). Read-only images never relocate.
    pub fn set_relocate_on_read(&self, min_extents: Option<usize>) {
        let v = min_extents.map_or(0, |n| n.max(2) as u64);
        self.relocate_min_extents.store(v, Ordering::Relaxed);
    }

    /// Keeps about `bytes` of the file just ahead of the allocation counter reserved, from a
    /// background thread (0, the default, turns it off), so that appends are writes inside
    /// the file: they neither extend it nor change its size on every write, and with direct
    /// I/O ext4 runs them in parallel. With `cache`, an image with buffered data I/O also has
    /// the reserved range read into the page cache, so writes copy into cached pages instead
    /// of fresh ones (small folios, which slow later large reads of that data;
    /// docs/perf-notes.md, sections 2 and 31); direct images never cache it. The file is up
    /// to `bytes` longer than its allocated slots (read as zeros, reused by the next open).
    /// Read-only images ignore it.
    pub fn set_preallocate(&self, bytes: u64, cache: bool) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        self.sh
            .prealloc
            .reserve_only
            .store(self.is_direct() || !cache, Ordering::Relaxed);
        self.sh.prealloc.window.store(bytes, Ordering::Relaxed);
        let mut p = lock(&self.prealloc);
        if bytes > 0 && p.is_none() {
            *p = Some(
                prealloc::Preallocator::start(Arc::clone(&self.sh))
                    .map_err(|e| ImageError::io("cannot start the preallocation thread", e))?,
            );
        }
        // Wakes the thread to act on the new window.
        self.sh.prealloc.note_alloc(
            self.sh.next_slot.load(Ordering::SeqCst),
            self.sh.bs.bytes_u64(),
        );
        Ok(())
    }

    /// Drops block versions that no LBA maps any more (overwritten, discarded or relocated)
    /// from the host page cache once a sync has made them clean, from a background thread
    /// (see `cache.rs`): their pages are reused by later writes instead of crowding out live
    /// data. Changes no byte of the image; history reads of dropped versions come from the
    /// disk. Read-only images ignore it.
    pub fn set_drop_superseded(&self, on: bool) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        let mut d = lock(&self.dropper);
        if on && d.is_none() {
            *d = Some(
                cache::CacheDropper::start(Arc::clone(&self.sh))
                    .map_err(|e| ImageError::io("cannot start the cache-dropping thread", e))?,
            );
        }
        self.sh.drop_state.enabled.store(on, Ordering::Relaxed);
        if !on {
            *d = None;
        }
        Ok(())
    }

    /// `(runs, blocks)` of superseded versions handed to the kernel to drop from the page
    /// cache since the image was opened.
    pub fn dropped_from_cache(&self) -> (u64, u64) {
        self.sh.drop_state.dropped()
    }

    /// Journal bytes the last open replayed (after the checkpoint).
    pub fn replayed_bytes(&self) -> u64 {
        self.notes.replayed_bytes
    }

    /// Reads `buf.len()` bytes at `offset`; returns the seq of the state read.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<Seq, ImageError> {
        self.read_vectored(offset, &[IoSeg::from_mut_slice(buf)], None)
    }

    /// Writes `buf` at `offset`.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<WriteOutcome, ImageError> {
        self.write_vectored(offset, &[IoSeg::from_slice(buf)])
    }

    /// Reads into `segs`; when `trace` is given, pushes the extents (covering every block
    /// touched, in order) that supplied the data, consistent with the returned seq.
    pub fn read_vectored(
        &self,
        offset: u64,
        segs: &[IoSeg<'_>],
        trace: Option<&mut Vec<Extent>>,
    ) -> Result<Seq, ImageError> {
        let len = total_len(segs);
        check_range(self.sh.size, offset, len)?;
        if len == 0 {
            return Ok(self.seq());
        }
        let bs = self.sh.bs.bytes_u64();
        let (first, n) = blocks_spanned(offset, len, bs);
        let mut ex = Vec::new();
        let seq = loop {
            // A reclaim running beside this read (serve --retain-seqs) may give back and punch
            // a block the read resolved, if the block is overwritten meanwhile: then resolve
            // again (the read overlapped that overwrite; the new data is a right answer, zeros
            // are not).
            let gen = self.sh.reclaim_gen.load(Ordering::SeqCst);
            ex.clear();
            let seq = {
                let live = rlock(&self.live);
                live.map.extents(first, n, self.sh.base.is_some(), &mut ex);
                live.seq
            };
            let min = self.relocate_min_extents.load(Ordering::Relaxed);
            if min != 0
                && !self.read_only
                && ex.len() as u64 >= min
                && ex.iter().all(|e| matches!(e, Extent::Mapped { .. }))
            {
                self.read_relocating(first, &ex, offset % bs, segs)?;
            } else {
                self.sh.read_extents(&ex, offset % bs, segs)?;
            }
            // With reuse a block reclaimed meanwhile may even hold new data by now, so any
            // reclaim during the read (at most one a second) means resolving again.
            if self.sh.reclaim_gen.load(Ordering::SeqCst) == gen {
                break seq;
            }
        };
        if let Some(t) = trace {
            t.extend_from_slice(&ex);
        }
        Ok(Seq(seq))
    }

    /// How many extents make a read go alone instead of with a batch (or a caller's ring):
    /// `max_extents`, or fewer when relocation on read wants such reads (it needs their data
    /// in a private buffer).
    fn alone_from(&self, max_extents: usize) -> usize {
        let reloc = self.relocate_min_extents.load(Ordering::Relaxed);
        match usize::try_from(reloc) {
            Ok(r) if r != 0 && !self.read_only => max_extents.min(r),
            _ => max_extents,
        }
    }

    /// Reads several requests at once, each as [`read_vectored`](Self::read_vectored) would
    /// (without a trace). The mapped extents of all of them are gathered for one io_uring
    /// submission (with a direct descriptor, their disk reads overlap, as a batch of
    /// requests does in qemu-storage-daemon); zeroed and base extents, and extents whose
    /// buffers are not aligned for `O_DIRECT`, are served at once. A request resolving to
    /// `max_extents` extents or more (or as many as relocation on read wants, when that is
    /// on) is left for the caller to read on its own ([`BatchRead::Alone`]), as is every
    /// request of the batch when the submission fails as a whole or a reclaim ran beside it.
    /// Results in request order. With `trace`, also the seq the batch was resolved at and
    /// each request's extents (those of a request that is [`BatchRead::Done`] are exactly the
    /// blocks its data came from).
    pub fn read_many(
        &self,
        reqs: &[(u64, &[IoSeg<'_>])],
        max_extents: usize,
        trace: Option<&mut BatchTrace>,
    ) -> Vec<Result<BatchRead, ImageError>> {
        let bs = self.sh.bs.bytes_u64();
        let gen = self.sh.reclaim_gen.load(Ordering::SeqCst);
        let limit = self.alone_from(max_extents);
        // Resolve every request under one read lock of the map.
        let mut resolved: Vec<Result<Option<Vec<Extent>>, ImageError>> = Vec::new();
        let seq = {
            let live = rlock(&self.live);
            for &(offset, segs) in reqs {
                let len = total_len(segs);
                resolved.push(check_range(self.sh.size, offset, len).map(|()| {
                    (len > 0).then(|| {
                        let (first, n) = blocks_spanned(offset, len, bs);
                        let mut ex = Vec::new();
                        live.map.extents(first, n, self.sh.base.is_some(), &mut ex);
                        ex
                    })
                }));
            }
            live.seq
        };
        let mut traced: Vec<Vec<Extent>> = Vec::new();
        let mut out = Vec::with_capacity(reqs.len());
        let mut batch = shared::ReadBatch::default();
        // For each request gathered: its index and its reads in the batch.
        let mut spans: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (i, (&(offset, segs), r)) in reqs.iter().zip(resolved).enumerate() {
            // The extents this request read, kept only for a trace.
            let mut read = Vec::new();
            match r {
                Err(e) => out.push(Err(e)),
                Ok(None) => out.push(Ok(BatchRead::Done)),
                Ok(Some(ex)) if ex.len() >= limit => out.push(Ok(BatchRead::Alone)),
                Ok(Some(ex)) => {
                    let from = batch.len();
                    match self
                        .sh
                        .gather_extents(&ex, offset % bs, segs, true, &mut batch)
                    {
                        Ok(()) => {
                            spans.push((i, from..batch.len()));
                            out.push(Ok(BatchRead::Done));
                            read = ex;
                        }
                        Err(e) => {
                            batch.truncate(from);
                            out.push(Err(e));
                        }
                    }
                }
            }
            if trace.is_some() {
                traced.push(read);
            }
        }
        if !batch.is_empty() {
            let failed = self.sh.submit_batch(&mut batch).is_err();
            for (i, range) in &spans {
                if let Some(slot) = out.get_mut(*i) {
                    if failed {
                        *slot = Ok(BatchRead::Alone);
                    } else if let Some(e) = batch.short_in(range.clone()) {
                        *slot = Err(e);
                    }
                }
            }
        }
        // A reclaim beside the batch may have given back (and, with reuse, rewritten) a block
        // it resolved: read those requests again on their own, as `read_vectored` would.
        if self.sh.reclaim_gen.load(Ordering::SeqCst) != gen {
            for (i, _) in &spans {
                if let Some(slot) = out.get_mut(*i) {
                    *slot = Ok(BatchRead::Alone);
                }
            }
        }
        if let Some(t) = trace {
            // Only what was read in the batch is traced.
            for (ex, r) in traced.iter_mut().zip(&out) {
                if !matches!(r, Ok(BatchRead::Done)) {
                    ex.clear();
                }
            }
            t.seq = Seq(seq);
            t.extents = traced;
        }
        out
    }

    /// Writes several requests at once, each as [`write_vectored`](Self::write_vectored)
    /// would: every request of whole, aligned blocks gets its new blocks, all their data is
    /// written, and the records of those that landed are committed in request order under
    /// one hold of the journal lock. Where two requests overlap, the later one wins. Each
    /// run of adjacent new blocks (consecutive requests allocated one after the other) is
    /// written as one vectored write: with a direct (`O_DIRECT`) descriptor, runs of up to
    /// [`MAX_DIRECT_RUN`] bytes all go to the disk in one io_uring submission (the writes
    /// overlap, with no thread per request); buffered, one `pwritev` per run. A request that
    /// is not whole blocks, or whose buffers are not aligned for `O_DIRECT`, is left to the
    /// caller ([`BatchWrite::Alone`]), as is every request when a direct image's thread has
    /// no ring. A request whose data did not land fails alone; its blocks go back to the
    /// allocator. Results in request order.
    pub fn write_many(&self, reqs: &[(u64, &[IoSeg<'_>])]) -> Vec<Result<BatchWrite, ImageError>> {
        self.write_many_seeing(reqs, &mut |_, _| {})
    }

    /// As [`write_many`](Self::write_many), and shows the caller the data of every write the
    /// batch places, as it copies that data out for the checksum its journal record carries:
    /// `see(i, piece)` for request `i`, the pieces of a request in order and adding up to its
    /// length, all of it in one piece up to [`crate::iobuf::GATHER_LEN`] bytes. A caller that
    /// needs the data too (a recorder's hash of it) then does not copy it out of guest memory
    /// a second time. With `O_DIRECT` this happens once the batch's writes are submitted, so
    /// that the work overlaps the disk's instead of delaying it (docs/perf-notes.md, section
    /// 39); buffered, before the writes. Requests the batch leaves to the caller
    /// ([`BatchWrite::Alone`]) or refuses are not shown. `see` must not change the requests'
    /// buffers.
    pub fn write_many_seeing(
        &self,
        reqs: &[(u64, &[IoSeg<'_>])],
        see: &mut dyn FnMut(usize, &[u8]),
    ) -> Vec<Result<BatchWrite, ImageError>> {
        if self.read_only {
            return reqs.iter().map(|_| Err(ImageError::ReadOnly)).collect();
        }
        let direct = match &self.sh.direct {
            Some(d) if uring::available() => Some(d),
            Some(_) => return reqs.iter().map(|_| Ok(BatchWrite::Alone)).collect(),
            None => None,
        };
        let fd = direct.map_or_else(
            || std::os::fd::AsRawFd::as_raw_fd(&self.sh.file),
            |d| d.raw_fd(),
        );
        let bs = self.sh.bs.bytes_u64();
        let mut out: Vec<Result<BatchWrite, ImageError>> = Vec::with_capacity(reqs.len());
        let mut ios: Vec<uring::Io<'_>> = Vec::new();
        // For each write placed: its request, first block, blocks, LBA and data CRC (computed
        // below: before the writes, or while they are in flight).
        let mut placed: Vec<(usize, u64, u64, u64, Option<u32>)> = Vec::new();
        for (i, &(offset, segs)) in reqs.iter().enumerate() {
            let len = total_len(segs);
            if let Err(e) = check_range(self.sh.size, offset, len) {
                out.push(Err(e));
                continue;
            }
            if len == 0 {
                out.push(Ok(BatchWrite::Done(WriteOutcome {
                    seq: self.seq(),
                    first_pba: Pba(0),
                    blocks: 0,
                })));
                continue;
            }
            // Offset 0 stands for the slot's, which is always aligned.
            if offset % bs != 0 || len % bs != 0 || direct.is_some_and(|d| !d.is_aligned(segs, 0)) {
                out.push(Ok(BatchWrite::Alone));
                continue;
            }
            let n = len / bs;
            let first = match self.sh.alloc_data(n) {
                Ok(f) => f,
                Err(e) => {
                    out.push(Err(e));
                    continue;
                }
            };
            let Some(off) = self.sh.slot_off(first) else {
                self.sh.release_data(first, n);
                out.push(Err(ImageError::Full));
                continue;
            };
            placed.push((i, first, n, offset / bs, None));
            ios.push(uring::Io::write(fd, off, IoSegs::from_slice(segs)));
            // Replaced below, once the data has landed and its record is committed.
            out.push(Ok(BatchWrite::Alone));
        }
        if placed.is_empty() {
            return out;
        }
        // The records' CRCs, the data shown to the caller with them: before buffered writes,
        // while direct ones are in flight. Does its work once however often it is called.
        let mut prepare = || {
            for p in placed.iter_mut().filter(|p| p.4.is_none()) {
                if let Some(&(_, segs)) = reqs.get(p.0) {
                    p.4 = Some(io::crc_segs_seeing(segs, &mut |piece| see(p.0, piece)));
                }
            }
        };
        let landed = match direct {
            Some(d) => {
                // While the disk works, also bring the map entries the commits below will set
                // into the caches (a cache miss per write under the map's write lock otherwise).
                let mut in_flight = || {
                    prepare();
                    self.warm_map(reqs);
                };
                self.write_batch_direct(d, &ios, &mut in_flight)
            }
            None => {
                prepare();
                self.write_batch_buffered(&ios)
            }
        };
        // Nothing left to do here: both arms above ran it. Kept so that no
        // record can go out without its CRC.
        prepare();
        drop(ios);
        let mut j = lock(&self.journal);
        for (&(i, first, n, lba, crc), res) in placed.iter().zip(landed) {
            let crc = crc.unwrap_or_default();
            let result = match res {
                Err(e) => {
                    self.sh.release_data(first, n);
                    Err(ImageError::io("cannot write data blocks", e))
                }
                Ok(()) => self
                    .commit_write(&mut j, lba, n, first, crc)
                    .map(BatchWrite::Done),
            };
            if let Some(slot) = out.get_mut(i) {
                *slot = result;
            }
        }
        drop(j);
        self.background_sync();
        out
    }

    /// Reads the live map's entries of the blocks `reqs` write, so that their commits find
    /// them in the caches ([`Map::warm`]).
    fn warm_map(&self, reqs: &[(u64, &[IoSeg<'_>])]) {
        let bs = self.sh.bs.bytes_u64();
        let live = rlock(&self.live);
        for &(offset, segs) in reqs {
            live.map.warm(offset / bs, total_len(segs).div_ceil(bs));
        }
    }

    /// The data of [`Self::write_many`] through the page cache: one `pwritev` per run of
    /// writes whose blocks follow each other in the file; a run that fails fails all its
    /// writes.
    fn write_batch_buffered(&self, ios: &[uring::Io<'_>]) -> Vec<std::io::Result<()>> {
        let mut landed = Vec::with_capacity(ios.len());
        for run in adjacent_runs(ios, u64::MAX) {
            let first_off = ios.get(run.start).map_or(0, |w| w.off);
            let segs = run_segs(ios, run.clone());
            match io::pwritev_all(&self.sh.file, &segs, first_off) {
                Ok(()) => landed.extend(run.map(|_| Ok(()))),
                Err(e) => landed.extend(run.map(|_| Err(shared::copy_io_error(&e)))),
            }
        }
        landed
    }

    /// The data of [`Self::write_many`] with `O_DIRECT`: each run of writes whose blocks
    /// follow each other in the file (up to [`MAX_DIRECT_RUN`] bytes) becomes one vectored
    /// write, and all of them go in one io_uring submission. The disk then takes one request
    /// where it took one per guest write, and the file system converts one reserved range
    /// per run (docs/perf-notes.md, section 25). A run that stops short fails the writes it
    /// did not cover whole.
    fn write_batch_direct(
        &self,
        d: &direct::DirectFile,
        ios: &[uring::Io<'_>],
        during: &mut dyn FnMut(),
    ) -> Vec<std::io::Result<()>> {
        let runs = adjacent_runs(ios, MAX_DIRECT_RUN);
        let mut merged: Vec<uring::Io<'_>> = runs
            .iter()
            .map(|run| {
                let (fd, off) = ios.get(run.start).map_or((-1, 0), |w| (w.fd, w.off));
                uring::Io::write(fd, off, run_segs(ios, run.clone()))
            })
            .collect();
        let res = self.sh.write_direct_batch(d, &mut merged, during);
        let mut landed = Vec::with_capacity(ios.len());
        for ((run, w), r) in runs.into_iter().zip(&merged).zip(res) {
            let lens = ios
                .get(run)
                .unwrap_or(&[])
                .iter()
                .map(|x| total_len(&x.segs));
            landed.extend(run_results(lens, w.done, r));
        }
        landed
    }

    /// Writes the bytes of `segs` at `offset` into new blocks.
    pub fn write_vectored(
        &self,
        offset: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<WriteOutcome, ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let len = total_len(segs);
        check_range(self.sh.size, offset, len)?;
        if len == 0 {
            return Ok(WriteOutcome {
                seq: self.seq(),
                first_pba: Pba(0),
                blocks: 0,
            });
        }
        let bs = self.sh.bs.bytes_u64();
        let lba = offset / bs;
        if offset % bs == 0 && len % bs == 0 {
            // Full blocks: allocate, write the data outside any lock, then commit.
            let n = len / bs;
            let first = self.sh.alloc_data(n)?;
            let crc = io::crc_segs(segs);
            let off = self.sh.slot_off(first).ok_or(ImageError::Full)?;
            self.sh.write_data(segs, off).map_err(|e| {
                self.sh.release_data(first, n);
                ImageError::io("cannot write data blocks", e)
            })?;
            let outcome = self.commit_write(&mut lock(&self.journal), lba, n, first, crc)?;
            self.background_sync();
            return Ok(outcome);
        }
        // Sub-block: read-modify-write of the touched blocks into new ones, serialized by the
        // journal mutex so that concurrent read-modify-writes cannot lose each other's bytes.
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        let last = (offset + len - 1) / bs;
        let n = last - lba + 1;
        let mut buf = vec![0u8; (n * bs) as usize];
        let head = offset % bs;
        if head != 0 || len < bs {
            self.read_current(lba, buf.get_mut(..bs as usize).unwrap_or(&mut []))?;
        }
        if (offset + len) % bs != 0 && n > 1 {
            let t = ((n - 1) * bs) as usize;
            self.read_current(last, buf.get_mut(t..).unwrap_or(&mut []))?;
        }
        {
            let dst = buf
                .get_mut(head as usize..(head + len) as usize)
                .unwrap_or(&mut []);
            let mut pos = 0usize;
            for s in segs {
                let d = dst.get_mut(pos..pos + s.len()).unwrap_or(&mut []);
                s.copy_to(0, d);
                pos += s.len();
            }
        }
        let first = self.sh.alloc_data(n)?;
        let off = self.sh.slot_off(first).ok_or(ImageError::Full)?;
        self.sh.write_data_buf(&buf, off).map_err(|e| {
            self.sh.release_data(first, n);
            ImageError::io("cannot write data blocks", e)
        })?;
        let outcome = self.commit_write(&mut j, lba, n, first, crate::crc::crc32c(&buf))?;
        drop(j);
        self.background_sync();
        Ok(outcome)
    }

    /// Commits the write of LBAs `lba..lba + n` into new blocks `first..` whose data has
    /// landed (journal mutex held).
    fn commit_write(
        &self,
        j: &mut Journal,
        lba: u64,
        n: u64,
        first: u64,
        data_crc: u32,
    ) -> Result<WriteOutcome, ImageError> {
        let seq = self.commit(
            j,
            RecKind::Write,
            vec![Piece {
                lba,
                blocks: n,
                pba: Some(first),
                data_crc,
            }],
        )?;
        Ok(WriteOutcome {
            seq,
            first_pba: Pba(first),
            blocks: n,
        })
    }

    /// Serves a fragmented read from a private copy of its whole blocks, then relocates that
    /// copy (a failed relocation is logged and ignored: the read itself succeeded).
    fn read_relocating(
        &self,
        lba: u64,
        ex: &[Extent],
        head: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<(), ImageError> {
        let bs = self.sh.bs.bytes_u64();
        let blocks: u64 = ex.iter().map(Extent::blocks).sum();
        let mut buf = vec![0u8; (blocks * bs) as usize];
        self.sh
            .read_extents(ex, 0, &[IoSeg::from_mut_slice(&mut buf)])?;
        let mut pos = head as usize;
        for s in segs {
            let src = buf.get(pos..pos + s.len()).ok_or(ImageError::BadBuffer {
                expected: blocks * bs,
                got: (pos + s.len()) as u64,
            })?;
            s.copy_from(0, src);
            pos += s.len();
        }
        match self.relocate(lba, ex, &buf) {
            Ok(true) => log::trace!("relocated blocks {lba}+{blocks} ({} runs)", ex.len()),
            Ok(false) => log::trace!("relocation of {lba}+{blocks} lost a race; skipped"),
            Err(e) => log::debug!("relocation of blocks {lba}+{blocks} failed: {e}"),
        }
        Ok(())
    }

    /// Relocates LBAs `lba ..` (as many blocks as `expected` covers), which a read found
    /// backed by the data-block extents `expected`, into one new contiguous run, if the map
    /// still holds exactly those extents (see [`Image::set_relocate_on_read`] for what a
    /// relocation keeps). Reads the old blocks itself (they are immutable), so it can run
    /// later and on another thread than the read. Returns whether it committed; `false`
    /// when the map changed meanwhile or `expected` is not all data blocks.
    pub fn relocate_extents(&self, lba: Lba, expected: &[Extent]) -> Result<bool, ImageError> {
        self.relocate_extents_from(lba, expected, None)
    }

    /// As [`relocate_extents`](Self::relocate_extents), with the blocks' content already at
    /// hand: `data`, when it is exactly as long as `expected`, is written instead of reading
    /// the old blocks again (a reader that just read them, e.g. into guest memory, hands over
    /// a private copy). The caller vouches that `data` is the content of `expected`; the
    /// commit still happens only if the map holds `expected`.
    pub fn relocate_extents_from(
        &self,
        lba: Lba,
        expected: &[Extent],
        data: Option<&[u8]>,
    ) -> Result<bool, ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let blocks: u64 = expected.iter().map(Extent::blocks).sum();
        if blocks == 0 || !expected.iter().all(|e| matches!(e, Extent::Mapped { .. })) {
            return Ok(false);
        }
        // Cheap early exit for a stale request (relocate() checks again under the lock).
        if self.resolve(lba, blocks)? != expected {
            return Ok(false);
        }
        if let Some(data) = data.filter(|d| d.len() as u64 == blocks * self.sh.bs.bytes_u64()) {
            return self.relocate(lba.0, expected, data);
        }
        // Page-aligned, so that with `O_DIRECT` the scattered reads go to the disk together
        // through the ring and the run is written with one call, not through the bounce
        // buffer piece by piece (any other buffer would still work, slowly).
        let mut buf = PageBuf::new((blocks * self.sh.bs.bytes_u64()) as usize);
        self.sh
            .read_extents(expected, 0, &[IoSeg::from_mut_slice(buf.bytes_mut())])?;
        self.relocate(lba.0, expected, buf.bytes())
    }

    /// Appends `data` (the current content of LBAs `lba..`, backed by `expected`) as one new
    /// run and points the map at it, if the map still holds `expected`. Returns whether it
    /// committed. Takes no seq: the disk's content does not change.
    fn relocate(&self, lba: u64, expected: &[Extent], data: &[u8]) -> Result<bool, ImageError> {
        let bs = self.sh.bs.bytes_u64();
        let n = data.len() as u64 / bs;
        if n == 0 {
            return Ok(false);
        }
        let first = self.sh.alloc_data(n)?;
        let off = self.sh.slot_off(first).ok_or(ImageError::Full)?;
        self.sh.write_data_buf(data, off).map_err(|e| {
            self.sh.release_data(first, n);
            ImageError::io("cannot write relocated blocks", e)
        })?;
        let crc = crate::crc::crc32c(data);
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        // Every map change happens under the journal mutex: checking here and applying below
        // cannot interleave with a write, discard or another relocation.
        let mut now = Vec::with_capacity(expected.len());
        rlock(&self.live)
            .map
            .extents(lba, n, self.sh.base.is_some(), &mut now);
        if now != expected {
            self.sh.release_data(first, n);
            return Ok(false);
        }
        let rec = Record {
            kind: RecKind::Relocate,
            seq: j.seq,
            pieces: vec![Piece {
                lba,
                blocks: n,
                pba: Some(first),
                data_crc: crc,
            }],
            link: None,
            nonce: None,
            reclaim: None,
        };
        j.append(&self.sh, &rec)?;
        self.revive_named(&rec);
        let old = {
            let mut live = wlock(&self.live);
            let old = self.superseded(&live.map, &rec);
            apply(&mut live.map, &rec, zero_value(&self.sh));
            old
        };
        self.sh.drop_state.superseded(&old, self.sh.bs.bytes_u64());
        self.count_unsynced(&mut j, n * bs);
        drop(j);
        self.background_sync();
        Ok(true)
    }

    /// Reads whole block `lba` of the current state into `buf` (one block).
    fn read_current(&self, lba: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let mut ex = Vec::new();
        rlock(&self.live)
            .map
            .extents(lba, 1, self.sh.base.is_some(), &mut ex);
        self.sh.read_extents(&ex, 0, &[IoSeg::from_mut_slice(buf)])
    }

    /// Makes the reclaimed slots an appended record names live again (reuse; journal mutex
    /// held, so the in-memory reclaimed set follows the journal's order).
    fn revive_named(&self, rec: &Record) {
        for p in &rec.pieces {
            if let Some(pba) = p.pba {
                self.sh.revive(pba, p.blocks);
            }
        }
    }

    /// The data-block runs that `rec` takes out of the live map (empty when superseded
    /// versions are not being dropped from the page cache).
    fn superseded(&self, map: &Map, rec: &Record) -> Vec<(u64, u64)> {
        if !self.sh.drop_state.enabled.load(Ordering::Relaxed) {
            return Vec::new();
        }
        let mut ex = Vec::new();
        for p in &rec.pieces {
            map.extents(p.lba, p.blocks, self.sh.base.is_some(), &mut ex);
        }
        ex.iter()
            .filter_map(|e| match e {
                Extent::Mapped { pba, blocks } => Some((pba.0, *blocks)),
                _ => None,
            })
            .collect()
    }

    /// Appends the record and applies it to the map (journal mutex held).
    fn commit(
        &self,
        j: &mut Journal,
        kind: RecKind,
        pieces: Vec<Piece>,
    ) -> Result<Seq, ImageError> {
        if j.failed {
            return Err(ImageError::Failed);
        }
        let seq = j.seq + 1;
        let rec = Record {
            kind,
            seq,
            pieces,
            link: None,
            nonce: None,
            reclaim: None,
        };
        j.append(&self.sh, &rec)?;
        j.seq = seq;
        self.revive_named(&rec);
        let zero = zero_value(&self.sh);
        let old = {
            let mut live = wlock(&self.live);
            let old = self.superseded(&live.map, &rec);
            apply(&mut live.map, &rec, zero);
            live.seq = seq;
            old
        };
        self.sh.drop_state.superseded(&old, self.sh.bs.bytes_u64());
        self.seq.store(seq, Ordering::SeqCst);
        // A guest that never flushes still gets its data synced now and then (so recovery
        // never has to verify more than the unsynced limit of data) and checkpoints (so that
        // opening stays bounded).
        // The caller syncs once it has released the journal mutex, when this says so.
        let data = rec
            .pieces
            .iter()
            .filter(|p| p.pba.is_some())
            .map(|p| p.blocks.saturating_mul(self.sh.bs.bytes_u64()))
            .sum::<u64>();
        self.count_unsynced(j, data);
        let limit = self.ckpt_threshold.load(Ordering::SeqCst).saturating_mul(2);
        if j.since_ckpt >= limit {
            if let Err(e) = self.checkpoint_locked(j) {
                log::warn!("checkpoint failed: {e}");
            }
        }
        Ok(Seq(seq))
    }

    /// Discards `[offset, offset + len)`: afterwards it reads as zeros.
    pub fn discard(&self, offset: u64, len: u64) -> Result<Seq, ImageError> {
        self.zero_range(offset, len, RecKind::Discard)
    }

    /// Zeroes `[offset, offset + len)`.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<Seq, ImageError> {
        self.zero_range(offset, len, RecKind::WriteZeroes)
    }

    fn zero_range(&self, offset: u64, len: u64, kind: RecKind) -> Result<Seq, ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(self.sh.size, offset, len)?;
        if len == 0 {
            return Ok(self.seq());
        }
        let bs = self.sh.bs.bytes_u64();
        let end = offset + len;
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        // The part of the last block beyond the disk's end counts as covered.
        let partial_head = offset % bs != 0;
        let partial_tail = end % bs != 0 && end != self.sh.size;
        let b0 = offset / bs;
        let b1 = (end - 1) / bs;
        let mut pieces = Vec::new();
        // (lba, zero from, zero to) of blocks that need a read-modify-write.
        let mut rmw: Vec<(u64, u64, u64)> = Vec::new();
        let mut full = (b0, b1 + 1);
        if b0 == b1 {
            if partial_head || partial_tail {
                rmw.push((b0, offset % bs, offset % bs + len));
                full = (b0, b0);
            }
        } else {
            if partial_head {
                rmw.push((b0, offset % bs, bs));
                full.0 = b0 + 1;
            }
            if partial_tail {
                rmw.push((b1, 0, end % bs));
                full.1 = b1;
            }
        }
        let mut rmw_pieces = Vec::new();
        for &(l, from, to) in &rmw {
            let mut buf = vec![0u8; bs as usize];
            self.read_current(l, &mut buf)?;
            if let Some(z) = buf.get_mut(from as usize..to as usize) {
                z.fill(0);
            }
            if buf.iter().all(|&b| b == 0) {
                rmw_pieces.push(Piece {
                    lba: l,
                    blocks: 1,
                    pba: None,
                    data_crc: 0,
                });
                continue;
            }
            let slot = self.sh.alloc(1)?;
            let off = self.sh.slot_off(slot).ok_or(ImageError::Full)?;
            self.sh
                .write_data_buf(&buf, off)
                .map_err(|e| ImageError::io("cannot write data blocks", e))?;
            rmw_pieces.push(Piece {
                lba: l,
                blocks: 1,
                pba: Some(slot),
                data_crc: crate::crc::crc32c(&buf),
            });
        }
        let mut rp = rmw_pieces.into_iter();
        if partial_head || (b0 == b1 && partial_tail) {
            pieces.extend(rp.next());
        }
        if full.1 > full.0 {
            pieces.push(Piece {
                lba: full.0,
                blocks: full.1 - full.0,
                pba: None,
                data_crc: 0,
            });
        }
        pieces.extend(rp);
        let seq = self.commit(&mut j, kind, pieces)?;
        drop(j);
        self.background_sync();
        Ok(seq)
    }

    /// Syncs (outside the journal mutex) when a commit found too much unflushed data.
    fn background_sync(&self) {
        if self.sync_due.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.flush() {
                log::warn!("periodic sync failed: {e}");
            }
        }
    }

    /// Writes buffered journal records to the file (no sync): completed operations then
    /// survive the process being killed, though not a power cut (that takes [`Image::flush`]).
    /// Cheap when nothing is buffered.
    pub fn write_out_journal(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        j.write_out(&self.sh)
    }

    /// Makes every completed operation durable (write out the journal, fdatasync, then append
    /// a flush marker); takes a checkpoint when the journal since the last one is large.
    pub fn flush(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Ok(());
        }
        let target = {
            let mut j = lock(&self.journal);
            if j.failed {
                return Err(ImageError::Failed);
            }
            if j.seq <= j.durable_seq {
                // Nothing that takes a seq is unflushed (relocated copies are checked by
                // their crc on recovery instead): nothing to count any more.
                j.unsynced = 0;
                j.sync_requested = false;
                return Ok(());
            }
            j.write_out(&self.sh)?;
            (j.seq, j.unsynced, self.sync_ticket())
        };
        let (target, covered, ticket) = target;
        // Sync without holding the journal mutex: other operations keep committing meanwhile.
        // Every record up to `target` (and every record before them in the chain) is in the
        // file, and their data blocks were written before they were committed.
        let mark = self.sh.next_slot.load(Ordering::SeqCst);
        if let Err(e) = self.sync_file(ticket) {
            lock(&self.journal).failed = true;
            return Err(e);
        }
        self.sh.drop_state.synced(mark);
        let mut j = lock(&self.journal);
        // Data committed while the sync ran is not covered by it.
        j.unsynced = j.unsynced.saturating_sub(covered);
        j.sync_requested = false;
        if target > j.durable_seq {
            j.append(&self.sh, &Record::flush_marker(target))?;
            j.durable_seq = target;
        }
        if j.since_ckpt >= self.ckpt_threshold.load(Ordering::SeqCst) {
            self.checkpoint_locked(&mut j)?;
        }
        Ok(())
    }

    /// The ticket of a sync about to start; taken with the journal mutex held, once the
    /// journal is written out, so that it covers every record appended before it.
    fn sync_ticket(&self) -> u64 {
        self.sync_started.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// `fdatasync` of the image file; on success `ticket`'s records are durable.
    fn sync_file(&self, ticket: u64) -> Result<(), ImageError> {
        self.sh
            .file
            .sync_data()
            .map_err(|e| ImageError::io("cannot sync the image", e))?;
        self.sync_done.fetch_max(ticket, Ordering::SeqCst);
        Ok(())
    }

    /// Takes a checkpoint now (read-write images only).
    pub fn checkpoint(&self) -> Result<(), ImageError> {
        if self.read_only {
            return Err(ImageError::ReadOnly);
        }
        let mut j = lock(&self.journal);
        self.checkpoint_locked(&mut j)
    }

    fn checkpoint_locked(&self, j: &mut Journal) -> Result<(), ImageError> {
        if j.failed {
            return Err(ImageError::Failed);
        }
        j.write_out(&self.sh)?;
        let sync = |j: &mut Journal| -> Result<(), ImageError> {
            let ticket = self.sync_ticket();
            self.sync_file(ticket).inspect_err(|_| j.failed = true)
        };
        sync(j)?;
        let runs = rlock(&self.live).map.runs();
        let mut meta = self.sh.meta_runs();
        let reclaimed = (j.hdr.incompat & format::INCOMPAT_RECLAIM != 0).then(|| {
            self.sh
                .reclaimed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .to_reclaimed()
        });
        let len = Checkpoint::encoded_len(
            runs.len(),
            meta.len() + 1,
            reclaimed.as_ref().map(|r| r.runs.len()),
        ) as u64;
        let slots = len.div_ceil(self.sh.bs.bytes_u64());
        let slot = self.sh.alloc(slots)?;
        meta.push((slot, slots));
        meta.sort_unstable();
        let ck = Checkpoint {
            seq: j.seq,
            runs,
            meta,
            reclaimed,
        };
        let (bytes, crc) = ck.encode(&self.sh.uuid);
        let off = self.sh.slot_off(slot).ok_or(ImageError::Full)?;
        self.sh
            .pwrite(&bytes, off)
            .map_err(|e| ImageError::io("cannot write a checkpoint", e))?;
        sync(j)?;
        self.sh.add_meta(slot, slots);
        let mut hdr = j.hdr.clone();
        hdr.generation += 1;
        hdr.ckpt = Some(CkptRef {
            slot,
            len: bytes.len() as u64,
            crc,
        });
        hdr.ckpt_seq = j.seq;
        hdr.jpos = j.pos;
        hdr.next_free_slot = self.sh.next_slot.load(Ordering::SeqCst);
        let copy = 1 - j.hdr_copy;
        self.write_header(&hdr, copy)
            .inspect_err(|_| j.failed = true)?;
        sync(j)?;
        j.hdr = hdr;
        j.hdr_copy = copy;
        j.since_ckpt = 0;
        j.durable_seq = j.seq;
        j.unsynced = 0;
        j.sync_requested = false;
        log::debug!("checkpoint at seq {} ({} bytes)", j.seq, bytes.len());
        Ok(())
    }

    fn write_header(&self, hdr: &Header, copy: u8) -> Result<(), ImageError> {
        let off = if copy == 0 { 0 } else { HEADER_B_OFFSET };
        self.sh
            .pwrite(&hdr.encode(), off)
            .map_err(|e| ImageError::io("cannot write the image header", e))
    }

    /// Rewrites both header copies (repair of a damaged copy).
    pub(crate) fn rewrite_headers(&self) -> Result<(), ImageError> {
        let mut j = lock(&self.journal);
        for _ in 0..2 {
            let mut hdr = j.hdr.clone();
            hdr.generation += 1;
            let copy = 1 - j.hdr_copy;
            self.write_header(&hdr, copy)?;
            self.sh
                .file
                .sync_data()
                .map_err(|e| ImageError::io("cannot sync the image", e))?;
            j.hdr = hdr;
            j.hdr_copy = copy;
        }
        Ok(())
    }

    /// Describes LBAs `lba .. lba + blocks` of the current state as extents.
    pub fn resolve(&self, lba: Lba, blocks: u64) -> Result<Vec<Extent>, ImageError> {
        resolve_in(&self.sh, &rlock(&self.live).map, lba, blocks)
    }

    /// Reads one data block by id; `buf` must be one block long.
    pub fn read_block(&self, pba: Pba, buf: &mut [u8]) -> Result<(), ImageError> {
        if buf.len() as u64 != self.sh.bs.bytes_u64() {
            return Err(ImageError::BadBuffer {
                expected: self.sh.bs.bytes_u64(),
                got: buf.len() as u64,
            });
        }
        self.sh.read_extents_checked(
            &[Extent::Mapped { pba, blocks: 1 }],
            0,
            &[IoSeg::from_mut_slice(buf)],
        )
    }

    /// Checks that blocks `pba .. pba + blocks` are data blocks of this image whose content
    /// is still there (not reclaimed), without reading them.
    pub fn check_blocks(&self, pba: Pba, blocks: u64) -> Result<(), ImageError> {
        self.sh.check_data(pba.0, blocks)?;
        self.sh
            .check_not_reclaimed(&[Extent::Mapped { pba, blocks }])
    }

    /// Fills `segs` with the bytes of the concatenated extents starting `skip` bytes into the
    /// first one (what replay uses: the live map is not consulted). Blocks whose version was
    /// reclaimed fail with [`ImageError::Reclaimed`].
    pub fn read_extents(
        &self,
        extents: &[Extent],
        skip: u64,
        segs: &[IoSeg<'_>],
    ) -> Result<(), ImageError> {
        self.sh.read_extents_checked(extents, skip, segs)
    }

    /// Writes buffered journal records to the file and returns the journal's end.
    fn journal_end(&self) -> Result<(JPos, u64), ImageError> {
        let mut j = lock(&self.journal);
        if !self.read_only && !j.failed {
            j.write_out(&self.sh)?;
        }
        Ok((j.pos, j.seq))
    }

    /// Walks the whole journal from its first record to its current end.
    pub(crate) fn walk_all(
        &self,
        f: impl FnMut(&Record, JPos) -> Result<bool, ImageError>,
    ) -> Result<(), ImageError> {
        let start = lock(&self.journal).hdr.journal_start();
        self.walk_from(start, 0, f)
    }

    /// Walks the journal from `start` (a record boundary reached in state `seq`) to its
    /// current end; `f` gets each record and the position right after it, and stops the walk
    /// by returning false.
    pub(crate) fn walk_from(
        &self,
        start: JPos,
        seq: u64,
        mut f: impl FnMut(&Record, JPos) -> Result<bool, ImageError>,
    ) -> Result<(), ImageError> {
        let (end, _) = self.journal_end()?;
        let mut w = Walker::new(&self.sh, start, seq)?;
        while !(w.pos.seg_slot == end.seg_slot && w.pos.offset == end.offset) {
            let at = w.file_pos();
            match w.next_step()? {
                Step::Rec(r, _) => {
                    if !f(&r, w.pos)? {
                        return Ok(());
                    }
                }
                Step::Stop(s) => {
                    let what = match s {
                        Stop::End => "journal ends early".to_string(),
                        Stop::Torn { what, .. } | Stop::BadSegment { what, .. } => what,
                    };
                    return Err(ImageError::corrupt(
                        at,
                        format!("{what} in the durable part of the journal"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// A read-only view of the disk as of `seq` (rebuilt from the whole journal).
    pub fn state_at(&self, seq: Seq) -> Result<Snapshot, ImageError> {
        let cur = self.seq();
        if seq > cur {
            return Err(ImageError::SeqInFuture {
                requested: seq,
                current: cur,
            });
        }
        let horizon = self.sh.horizon();
        if seq.0 < horizon {
            return Err(ImageError::HistoryReclaimed {
                requested: seq,
                horizon: Seq(horizon),
            });
        }
        let zero = zero_value(&self.sh);
        let mut map = Map::new(self.sh.blocks);
        let revived = self.sh.revived.load(Ordering::SeqCst);
        self.walk_all(|r, _| {
            if r.kind.maps() {
                if r.seq > seq.0 {
                    return Ok(false);
                }
                // Relocations preserve content: applying them only picks other block ids.
                apply(&mut map, r, zero);
            }
            Ok(true)
        })?;
        Ok(Snapshot {
            sh: Arc::clone(&self.sh),
            map,
            seq: seq.0,
            revived,
        })
    }

    /// Every version block `lba` ever had, oldest first.
    pub fn history(&self, lba: Lba) -> Result<Vec<HistoryEntry>, ImageError> {
        if lba.0 >= self.sh.blocks {
            let bs = self.sh.bs.bytes_u64();
            return Err(ImageError::OutOfRange {
                offset: lba.0.saturating_mul(bs),
                len: bs,
                size: self.sh.size,
            });
        }
        let mut out = Vec::new();
        let mut ordinals = Vec::new();
        let mut reborn = RebornIndex::builder();
        self.walk_all(|r, _| {
            let (ordinal, _) = reborn.visit(r);
            let kind = match r.kind {
                RecKind::Write => HistoryKind::Write,
                RecKind::Discard => HistoryKind::Discard,
                RecKind::WriteZeroes => HistoryKind::WriteZeroes,
                _ => return Ok(true),
            };
            for p in &r.pieces {
                if lba.0 >= p.lba && lba.0 - p.lba < p.blocks {
                    let pba = p.pba.map(|b| b + (lba.0 - p.lba));
                    out.push(HistoryEntry {
                        seq: Seq(r.seq),
                        kind,
                        pba: pba.map(Pba),
                        reclaimed: pba.is_some_and(|b| self.sh.first_reclaimed(b, 1).is_some()),
                    });
                    ordinals.push(ordinal);
                }
            }
            Ok(true)
        })?;
        // A version whose slot a later write reused is gone too.
        let reborn = reborn.finish();
        if !reborn.is_empty() {
            for (e, &o) in out.iter_mut().zip(&ordinals) {
                if let Some(b) = e.pba {
                    e.reclaimed |= reborn.reused_after_record(b.0, 1, o).is_some();
                }
            }
        }
        Ok(out)
    }

    /// Image metadata and statistics.
    pub fn info(&self) -> Result<ImageInfo, ImageError> {
        let md = self
            .sh
            .file
            .metadata()
            .map_err(|e| ImageError::io("cannot stat the image", e))?;
        use std::os::unix::fs::MetadataExt;
        let (hdr, since, segments) = {
            let j = lock(&self.journal);
            (j.hdr.clone(), j.since_ckpt, j.segments)
        };
        let meta_slots: u64 = self.sh.meta_runs().iter().map(|&(_, c)| c).sum();
        let reclaimed_blocks: u64 = rlock(&self.sh.reclaimed).runs.blocks();
        let (live_blocks, mem, seq) = {
            let l = rlock(&self.live);
            (l.map.mapped(), l.map.memory_bytes(), l.seq)
        };
        Ok(ImageInfo {
            format_version: VERSION,
            uuid: uuid::Uuid::from_bytes(self.sh.uuid).to_string(),
            virtual_size: self.sh.size,
            file_size: md.len(),
            allocated_bytes: md.blocks() * 512,
            block_size: self.sh.bs.bytes(),
            seq,
            live_blocks,
            retained_blocks: self
                .sh
                .next_slot
                .load(Ordering::SeqCst)
                .saturating_sub(meta_slots)
                .saturating_sub(reclaimed_blocks),
            journal_segments: segments,
            journal_bytes: segments * self.sh.seg_bytes(),
            journal_bytes_since_checkpoint: since,
            checkpoint_seq: hdr.ckpt.map(|_| hdr.ckpt_seq),
            header_generation: hdr.generation,
            base: hdr.base_path.clone(),
            base_size: hdr.base_path.as_ref().map(|_| hdr.base_size),
            map_memory_bytes: mem,
            read_only: self.read_only,
            history_horizon: self.sh.horizon(),
            reclaimed_blocks,
        })
    }

    /// Verifies an image (and repairs what can be repaired when `repair` is set).
    pub fn check(path: &Path, repair: bool) -> Result<CheckReport, ImageError> {
        check::check(path, repair)
    }

    /// Flushes and takes a checkpoint, so the next open replays nothing.
    pub fn close(mut self) -> Result<(), ImageError> {
        self.closed = true;
        if self.read_only {
            return Ok(());
        }
        let mut j = lock(&self.journal);
        if j.failed {
            return Err(ImageError::Failed);
        }
        if j.since_ckpt > 0 || j.hdr.ckpt.is_none() || j.seq != j.hdr.ckpt_seq {
            self.checkpoint_locked(&mut j)?;
        }
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        if self.closed || self.read_only {
            return;
        }
        let mut j = lock(&self.journal);
        if j.failed {
            return;
        }
        let res = j.write_out(&self.sh).and_then(|_| {
            self.sh
                .file
                .sync_data()
                .map_err(|e| ImageError::io("cannot sync the image", e))
        });
        if let Err(e) = res {
            log::error!("closing {}: {e}", self.path.display());
        }
    }
}

impl Snapshot {
    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        self.sh.size
    }

    /// The seq this view shows.
    pub fn seq(&self) -> Seq {
        Seq(self.seq)
    }

    /// Reads `buf.len()` bytes at `offset` as of this view's seq. Fails with
    /// [`ImageError::Reclaimed`] when a reclaim since the view was taken gave back a block
    /// the range reads.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let len = buf.len() as u64;
        check_range(self.sh.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let bs = self.sh.bs.bytes_u64();
        let (first, n) = blocks_spanned(offset, len, bs);
        let mut ex = Vec::new();
        self.map.extents(first, n, self.sh.base.is_some(), &mut ex);
        // A view taken before a reclaim may name blocks it gave back: their holes read as
        // zeros, which must not pass for the old content. Once the horizon has passed the
        // view and slots were reused since it was taken, a block it names may hold a new
        // write's data: then the view is gone as a whole.
        self.check_not_overtaken()?;
        self.sh
            .read_extents_checked(&ex, offset % bs, &[IoSeg::from_mut_slice(buf)])?;
        self.check_not_overtaken()
    }

    /// Fails with [`ImageError::HistoryReclaimed`] when slots were reused since this view was
    /// taken and the history horizon has passed its seq.
    fn check_not_overtaken(&self) -> Result<(), ImageError> {
        let horizon = self.sh.horizon();
        if horizon > self.seq && self.sh.revived.load(Ordering::SeqCst) != self.revived {
            return Err(ImageError::HistoryReclaimed {
                requested: Seq(self.seq),
                horizon: Seq(horizon),
            });
        }
        Ok(())
    }

    /// Describes LBAs `lba .. lba + blocks` as of this view's seq.
    pub fn resolve(&self, lba: Lba, blocks: u64) -> Result<Vec<Extent>, ImageError> {
        resolve_in(&self.sh, &self.map, lba, blocks)
    }
}

#[allow(dead_code)]
fn assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Image>();
    is::<Snapshot>();
}

/// Reads both header copies; returns the winner, its copy index and what was wrong with the
/// other one, if anything.
#[allow(clippy::type_complexity)]
fn read_header(file: &File) -> Result<(Header, u8, Option<(u8, String)>), ImageError> {
    use std::os::unix::fs::FileExt;
    let len = file
        .metadata()
        .map_err(|e| ImageError::io("cannot stat the image", e))?
        .len();
    let mut b = vec![0u8; 2 * HEADER_SIZE];
    let mut got = 0usize;
    while got < b.len() {
        match file.read_at(b.get_mut(got..).unwrap_or(&mut []), got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ImageError::io("cannot read the image header", e)),
        }
    }
    if got < 8 {
        return Err(ImageError::Truncated {
            what: format!("the file is {len} bytes, too short for a header"),
        });
    }
    let a = Header::decode(b.get(..HEADER_SIZE.min(got)).unwrap_or(&[]));
    let bb = Header::decode(b.get(HEADER_SIZE..got.max(HEADER_SIZE)).unwrap_or(&[]));
    let describe = |f: &HeaderFault| match f {
        HeaderFault::BadMagic(_) => "bad magic".to_string(),
        HeaderFault::Version(v) => format!("format version {v}"),
        HeaderFault::Features(b) => format!("unknown incompatible features {b:#x}"),
        HeaderFault::Invalid(s) => s.clone(),
    };
    match (a, bb) {
        (Ok(x), Ok(y)) => Ok(if y.generation > x.generation {
            (y, 1, None)
        } else {
            (x, 0, None)
        }),
        (Ok(x), Err(f)) => Ok((x, 0, Some((1, describe(&f))))),
        (Err(f), Ok(y)) => Ok((y, 1, Some((0, describe(&f))))),
        (Err(fa), Err(fb)) => Err(match (&fa, &fb) {
            (HeaderFault::BadMagic(m), _) => ImageError::BadMagic { found: *m },
            (HeaderFault::Version(v), _) | (_, HeaderFault::Version(v)) => {
                ImageError::UnsupportedVersion {
                    found: *v,
                    supported: VERSION,
                }
            }
            (HeaderFault::Features(b), _) | (_, HeaderFault::Features(b)) => {
                ImageError::UnsupportedFeatures { bits: *b }
            }
            _ if (got as u64) < 2 * HEADER_SIZE as u64 => ImageError::Truncated {
                what: format!(
                    "the file is {len} bytes, shorter than its two {HEADER_SIZE}-byte headers"
                ),
            },
            _ => ImageError::corrupt(
                0,
                format!(
                    "both header copies are invalid (A: {}; B: {})",
                    describe(&fa),
                    describe(&fb)
                ),
            ),
        }),
    }
}

fn load_checkpoint(
    sh: &Shared,
    hdr: &Header,
    c: CkptRef,
    file_len: u64,
) -> Result<Checkpoint, ImageError> {
    let off = sh
        .slot_off(c.slot)
        .ok_or_else(|| ImageError::corrupt(0, "checkpoint offset overflows"))?;
    if off.checked_add(c.len).map_or(true, |e| e > file_len) {
        return Err(ImageError::Truncated {
            what: format!(
                "the checkpoint at byte offset {off} ({} bytes) lies past the end of the file \
                 ({file_len} bytes)",
                c.len
            ),
        });
    }
    let mut b = vec![0u8; c.len as usize];
    sh.pread_padded(&mut b, off)?;
    if crate::crc::crc32c(b.get(..b.len().saturating_sub(4)).unwrap_or(&[]))
        != format::rd_u32(&b, b.len().saturating_sub(4)).unwrap_or(0)
        || format::rd_u32(&b, b.len().saturating_sub(4)) != Some(c.crc)
    {
        return Err(ImageError::corrupt(off, "checkpoint checksum mismatch"));
    }
    let ck = Checkpoint::decode(&b, &sh.uuid, hdr.incompat & format::INCOMPAT_RECLAIM != 0)
        .map_err(|w| ImageError::corrupt(off, w))?;
    if ck.seq != hdr.ckpt_seq {
        return Err(ImageError::corrupt(
            off,
            format!(
                "checkpoint holds seq {} but the header says {}",
                ck.seq, hdr.ckpt_seq
            ),
        ));
    }
    Ok(ck)
}

/// The longest run of adjacent writes that [`Image::write_many`] merges into one `O_DIRECT`
/// write: 32 writes of 4 KiB, 8 of 128 KiB.
pub const MAX_DIRECT_RUN: u64 = 1 << 20;

/// The runs of `ios` (in order) whose data follow each other in the same file, each at most
/// `max_len` bytes unless a single write is longer.
fn adjacent_runs(ios: &[uring::Io<'_>], max_len: u64) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut start = 0;
    while let Some(first) = ios.get(start) {
        let mut len = total_len(&first.segs);
        let mut next = first.off.saturating_add(len);
        let mut end = start + 1;
        while let Some(w) = ios.get(end).filter(|w| w.off == next && w.fd == first.fd) {
            let l = total_len(&w.segs);
            if len.saturating_add(l) > max_len {
                break;
            }
            len += l;
            next = w.off.saturating_add(l);
            end += 1;
        }
        runs.push(start..end);
        start = end;
    }
    runs
}

/// What each write of a merged run gets: all `Ok` when the run landed; otherwise `Ok` for
/// the leading writes (of lengths `lens`) that the `done` bytes written cover whole, and the
/// run's error for the rest.
fn run_results(
    lens: impl Iterator<Item = u64>,
    done: u64,
    res: std::io::Result<()>,
) -> Vec<std::io::Result<()>> {
    let mut end = 0u64;
    lens.map(|l| {
        end = end.saturating_add(l);
        match &res {
            Ok(()) => Ok(()),
            Err(_) if end <= done => Ok(()),
            Err(e) => Err(shared::copy_io_error(e)),
        }
    })
    .collect()
}

/// The segments of the writes `run` of `ios`, one after the other.
fn run_segs<'a>(ios: &[uring::Io<'a>], run: std::ops::Range<usize>) -> IoSegs<'a> {
    ios.get(run)
        .unwrap_or(&[])
        .iter()
        .flat_map(|w| w.segs.iter().copied())
        .collect()
}

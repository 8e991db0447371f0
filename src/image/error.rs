//! Errors of the image engine: one enum, each variant named after what failed.

use std::path::PathBuf;

use crate::units::{Pba, Seq};

/// Errors of the image engine.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A host I/O error, with what the engine was doing.
    #[error("{context}: {source}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with the RR-Row magic.
    #[error("not an RR-Row image (bad magic {found:02x?})")]
    BadMagic {
        /// The first eight bytes found.
        found: [u8; 8],
    },
    /// The image was written by a newer format version.
    #[error(
        "image format version {found} is not supported (this rr-row supports version {supported})"
    )]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
        /// Highest version this build supports.
        supported: u32,
    },
    /// The image uses incompatible features this build does not know.
    #[error("image uses unknown incompatible features (bits {bits:#x})")]
    UnsupportedFeatures {
        /// The unknown bits.
        bits: u64,
    },
    /// Metadata that was durable fails validation.
    #[error("image is corrupt at byte offset {offset}: {what}")]
    Corrupt {
        /// Byte offset in the image file where the damage was found.
        offset: u64,
        /// What was wrong.
        what: String,
    },
    /// The file is shorter than its metadata says.
    #[error("image file is truncated: {what}")]
    Truncated {
        /// What is missing.
        what: String,
    },
    /// A byte range lies (partly) outside the virtual disk.
    #[error("range {offset}+{len} is beyond the end of the disk ({size} bytes)")]
    OutOfRange {
        /// Start offset in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Virtual disk size in bytes.
        size: u64,
    },
    /// An offset or length is not a multiple of 512.
    #[error("offset {offset} or length {len} is not a multiple of 512")]
    Unaligned {
        /// Start offset in bytes.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A state-changing operation on an image opened read-only.
    #[error("the image is open read-only")]
    ReadOnly,
    /// A physical block that is not a data block of this image.
    #[error("block id {0} is not a data block of this image")]
    UnknownPba(Pba),
    /// A sequence number the image has not reached.
    #[error("sequence number {requested} is beyond the image's current sequence number {current}")]
    SeqInFuture {
        /// The requested seq.
        requested: Seq,
        /// The image's seq.
        current: Seq,
    },
    /// A state before the image's history horizon (its history was reclaimed).
    #[error("the history before seq {horizon} was reclaimed (rr-row reclaim): the disk as of seq {requested} can no longer be rebuilt")]
    HistoryReclaimed {
        /// The requested seq.
        requested: Seq,
        /// The image's history horizon.
        horizon: Seq,
    },
    /// A data block whose content was given back to the file system by a reclaim.
    #[error("block id {pba} held a version that was reclaimed (rr-row reclaim, history before seq {horizon}): its content is gone")]
    Reclaimed {
        /// The first reclaimed block asked for.
        pba: Pba,
        /// The image's history horizon.
        horizon: Seq,
    },
    /// Bad creation parameters.
    #[error("invalid image parameters: {0}")]
    InvalidOptions(String),
    /// `create` refuses to overwrite.
    #[error("the file already exists")]
    AlreadyExists {
        /// The existing path.
        path: PathBuf,
    },
    /// The base image cannot be opened.
    #[error("base image {}: {source}", path.display())]
    BaseUnavailable {
        /// The base path as resolved.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The base image changed size since the image was created.
    #[error("base image {} changed size: {found} bytes, the image was created over {expected}", path.display())]
    BaseSizeChanged {
        /// The base path as resolved.
        path: PathBuf,
        /// Size recorded at creation.
        expected: u64,
        /// Size now.
        found: u64,
    },
    /// Another process has the image open read-write.
    #[error("image is locked by another process (already open read-write)")]
    Locked,
    /// A buffer of the wrong size was passed.
    #[error("buffer of {got} bytes where {expected} are needed")]
    BadBuffer {
        /// Required length.
        expected: u64,
        /// Given length.
        got: u64,
    },
    /// The extents passed to `read_extents` cover fewer bytes than requested.
    #[error("extents cover {have} bytes but {need} are needed")]
    ExtentsTooShort {
        /// Bytes the extents cover after the skip.
        have: u64,
        /// Bytes requested.
        need: u64,
    },
    /// The data area has no block ids left.
    #[error("the image is full: no block ids are left")]
    Full,
    /// The filesystem holding the image refuses `O_DIRECT`.
    // The path is a field for library users; the message leaves it to the caller's context
    // (the CLI prefixes every image error with the path).
    #[error(
        "the filesystem does not support direct I/O (O_DIRECT): {source}; drop --direct to use \
         the page cache"
    )]
    DirectUnsupported {
        /// The image path.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
    /// Direct I/O cannot be used with this image's layout.
    #[error("{reason}; drop --direct to use the page cache")]
    DirectUnsuitable {
        /// The image path.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// An earlier journal write failed; the image refuses further changes until reopened.
    #[error("the image's journal failed earlier; reopen the image")]
    Failed,
}

impl ImageError {
    /// Wraps an I/O error with context.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ImageError::Io {
            context: context.into(),
            source,
        }
    }

    /// A corruption error at `offset`.
    pub(crate) fn corrupt(offset: u64, what: impl Into<String>) -> Self {
        ImageError::Corrupt {
            offset,
            what: what.into(),
        }
    }
}

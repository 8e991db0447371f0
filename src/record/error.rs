//! Errors of the record log module.

/// Errors of reading or writing a record log.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// A host I/O error on the log file.
    #[error("I/O error on the record log: {0}")]
    Io(#[from] std::io::Error),
    /// The file does not start with the record log magic.
    #[error("not an RR-Row record log (bad magic)")]
    BadMagic,
    /// The log was written by a newer format version than this program reads.
    #[error(
        "record log format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// Version found in the header.
        found: u16,
        /// Highest version this build reads.
        supported: u16,
    },
    /// The header sets incompatible feature flags this build does not know.
    #[error("record log uses unknown incompatible features {0:#x}")]
    UnknownFeatures(u32),
    /// The header's checksum does not match its content.
    #[error(
        "record log header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
    )]
    HeaderChecksum {
        /// Checksum stored in the header.
        stored: u32,
        /// Checksum computed over the header.
        computed: u32,
    },
    /// A header field holds an invalid value.
    #[error("invalid record log header: {0}")]
    BadHeader(String),
    /// The file is shorter than a header.
    #[error("record log is truncated: {found} bytes, a header needs {needed}")]
    Truncated {
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        found: u64,
    },
    /// A frame in the middle of the log is damaged (more data follows it, so this is not a
    /// torn tail left by a crash).
    #[error("record log frame at byte {offset} is corrupt: {reason}")]
    CorruptFrame {
        /// File offset of the frame.
        offset: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A frame's checksum is right but a record in it cannot be decoded.
    #[error("record log frame at byte {offset} holds an invalid record: {reason}")]
    BadRecord {
        /// File offset of the frame.
        offset: u64,
        /// What is wrong with the record.
        reason: String,
    },
    /// A value is too large to encode (a bug in the caller, not reachable from guest input).
    #[error("cannot encode record: {0}")]
    Encode(&'static str),
    /// The log file already exists (logs are never overwritten).
    #[error("record log {0} already exists")]
    Exists(std::path::PathBuf),
    /// An earlier write to the log failed; the log ends at the last complete frame.
    #[error("the record log stopped after an earlier write error: {0}")]
    Stopped(String),
}

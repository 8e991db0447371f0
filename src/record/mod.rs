//! Record logs: what a recorded VM's disk requests were, with block ids instead of data.
//!
//! While a VM is recorded, every completed virtio-blk request becomes one [`Record`] in a log
//! file: queue, per-queue index, type, sector, length, status and the image seq it saw, plus
//! for a read the extents of physical blocks (PBAs) that supplied its data, for a write the
//! blocks it was redirected to and a hash of its data. Replay re-reads the data by block id from
//! the image's retained history. The byte-exact format is specified in `docs/record-log.md`.
//!
//! - [`format`](mod@format): header, frames and the record encoding (varints, delta-encoded PBAs).
//! - [`writer`]: [`LogWriter`], shared by all queue threads (each appends to a stream of its
//!   own), bounded memory, periodic sync.
//! - [`reader`]: [`LogReader`], an iterator over records that stops cleanly at a torn tail, and
//!   [`ReplayIndex`], the records grouped per queue in index order for replay.
//!
//! This module knows nothing of virtio or vhost: requests come in as plain values.

mod error;
pub mod format;
pub mod reader;
pub mod writer;

pub use error::RecordError;
pub use format::{
    BodyRef, ExtentsRef, IndexKeying, LogExtent, LogHeader, LogStreams, ReadBody, Record,
    RecordBody, RecordMode, RecordRef,
};
pub use reader::{CallKey, LogReader, QueueEpoch, ReplayIndex, TornTail};
pub use writer::{LogWriter, WriterStats};

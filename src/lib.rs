//! RR-Row: a redirect-on-write VM disk for record/replay, served as a vhost-user-blk backend.
//!
//! Layers, each depending only on the ones below it:
//! - [`units`], [`iobuf`], [`crc`]: units, scatter-gather segments, the CRC-32C of every
//!   on-disk and log structure.
//! - [`image`]: the on-disk redirect-on-write image engine. Knows nothing of virtio.
//! - [`record`]: the record log format (block ids instead of data). Knows nothing of virtio.
//! - [`blockdev`]: the [`blockdev::BlockDevice`] trait the virtio layer executes against, and
//!   its implementations over an image (plain, recording, replaying).
//! - [`virtio_blk`]: virtio-blk request parsing and execution. Knows nothing of files.
//! - [`vhost_user`]: the vhost-user-blk backend and daemon loop gluing the two.
//! - [`cli`]: the thin `rr-row` command line.
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod blockdev;
pub mod cli;
pub mod crc;
pub mod image;
pub mod iobuf;
pub mod record;
pub mod units;
pub mod vhost_user;
pub mod virtio_blk;

//! The vhost-user-blk backend and the daemon loop: the glue between the vhost-user protocol
//! (rust-vmm `vhost`, `vhost-user-backend`) and the virtio-blk request layer
//! ([`crate::virtio_blk`]), serving any [`BlockDevice`](crate::blockdev::BlockDevice).

pub mod backend;
pub mod daemon;
pub mod poll;
pub mod pool;
pub mod ring_reads;

pub use backend::{BackendConfig, BlkBackend, GuestMem, RequestCounters};

use crate::blockdev::RequestCtx;

/// The context of operations the daemon starts itself rather than the guest: the flush after a
/// frontend disconnects, and the flush when the driver switches the cache to write-through.
/// Queue `u16::MAX` never names a real virtqueue, so a recording device can tell them apart.
pub const INTERNAL_CTX: RequestCtx = RequestCtx {
    queue: u16::MAX,
    index: u64::MAX,
};
pub use daemon::{run, stop_on_signals, DaemonConfig, DaemonError, StopHandle};

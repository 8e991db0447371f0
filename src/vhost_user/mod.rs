//! The vhost-user-blk backend and the daemon loop: the glue between the vhost-user protocol
//! (rust-vmm `vhost`, `vhost-user-backend`) and the virtio-blk request layer
//! ([`crate::virtio_blk`]), serving any [`BlockDevice`](crate::blockdev::BlockDevice).

pub mod backend;
pub mod daemon;

pub use backend::{BackendConfig, BlkBackend, GuestMem};
pub use daemon::{run, stop_on_signals, DaemonConfig, DaemonError, StopHandle};

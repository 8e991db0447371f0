//! The vhost-user-blk backend and the daemon loop.

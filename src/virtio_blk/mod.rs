//! virtio-blk request parsing and execution (virtio spec 1.2, section 5.2).

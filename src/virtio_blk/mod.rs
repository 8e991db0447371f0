//! virtio-blk request parsing and execution (virtio spec 1.2, section 5.2).
//!
//! Three steps, one way: [`request`] turns a descriptor chain into a plain [`Request`] (or a
//! typed [`RequestError`] saying exactly what was malformed), [`execute`] runs it against a
//! [`BlockDevice`](crate::blockdev::BlockDevice) moving data straight between guest memory and
//! the device, and [`config`] is the device configuration space the guest reads. Nothing here
//! knows about files, images or the vhost-user protocol.

pub mod config;
pub mod execute;
pub mod request;

pub use config::{BlkConfig, ConfigParams};
pub use execute::{process_chain, ChainError, Completion, ExecuteError, ExecuteParams};
pub use request::{Limits, Malformed, Request, RequestError, RequestType};

/// VIRTIO_BLK_S_OK: the request succeeded.
pub const STATUS_OK: u8 = 0;
/// VIRTIO_BLK_S_IOERR: the request failed (bad input or device error).
pub const STATUS_IOERR: u8 = 1;
/// VIRTIO_BLK_S_UNSUPP: the request type or one of its flags is not supported.
pub const STATUS_UNSUPP: u8 = 2;

/// Length of a GET_ID answer (VIRTIO_BLK_ID_BYTES): the serial, zero padded.
pub const ID_BYTES: usize = 20;

/// Turns a user-given serial into the 20-byte GET_ID answer: truncated to 20 bytes, zero padded.
pub fn serial_bytes(serial: &str) -> [u8; ID_BYTES] {
    let mut out = [0u8; ID_BYTES];
    for (o, b) in out.iter_mut().zip(serial.as_bytes()) {
        *o = *b;
    }
    out
}

#[cfg(test)]
mod tests;

//! [`BlockDevice`](super::BlockDevice) over an RR-Row [`Image`](crate::image::Image).

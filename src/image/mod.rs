//! The RR-Row image engine: redirect-on-write, retained history, crash-consistent journal.

mod error;
pub use error::ImageError;

//! Errors of the image engine.

/// Errors of the image engine.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A host I/O error.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

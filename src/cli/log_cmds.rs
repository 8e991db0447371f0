//! `rr-row log info|dump`: record log inspection.

use std::path::Path;

use super::{CliError, CliResult, OutputFormat};

/// `rr-row log info`.
pub fn info(_log: &Path, _output: OutputFormat) -> CliResult {
    Err(CliError("log info: not implemented yet".into()))
}
/// `rr-row log dump`.
pub fn dump(_log: &Path, _output: OutputFormat) -> CliResult {
    Err(CliError("log dump: not implemented yet".into()))
}

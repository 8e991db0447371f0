//! `rr-row create|info|check|export|history`: image commands.

use super::{CheckArgs, CliError, CliResult, CreateArgs, ExportArgs, HistoryArgs, InfoArgs};

/// `rr-row create`.
pub fn create(_a: &CreateArgs) -> CliResult {
    Err(CliError("create: not implemented yet".into()))
}
/// `rr-row info`.
pub fn info(_a: &InfoArgs) -> CliResult {
    Err(CliError("info: not implemented yet".into()))
}
/// `rr-row check`.
pub fn check(_a: &CheckArgs) -> CliResult {
    Err(CliError("check: not implemented yet".into()))
}
/// `rr-row export`.
pub fn export(_a: &ExportArgs) -> CliResult {
    Err(CliError("export: not implemented yet".into()))
}
/// `rr-row history`.
pub fn history(_a: &HistoryArgs) -> CliResult {
    Err(CliError("history: not implemented yet".into()))
}

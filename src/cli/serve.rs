//! `rr-row serve`: the vhost-user-blk daemon.

use super::{CliError, CliResult, ServeArgs};

/// `rr-row serve`.
pub fn serve(_a: &ServeArgs) -> CliResult {
    Err(CliError("serve: not implemented yet".into()))
}

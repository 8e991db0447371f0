//! `rr-row`: thin entry point; everything lives in the library.

use clap::Parser;

fn main() {
    let cli = rr_row::cli::Cli::parse();
    std::process::exit(rr_row::cli::run(cli));
}

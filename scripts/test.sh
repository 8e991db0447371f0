#!/usr/bin/env bash
# The RR-Row test command: ./scripts/test.sh
#
# On a fresh Debian 12 machine (as root, or with sudo), installs what the tests need through
# scripts/guest-assets.sh (idempotent; fast once done), then runs, stopping at the first
# failure: rustfmt, clippy with warnings denied, rustdoc with warnings denied, and the whole
# cargo test suite (unit, property, integration with the blkio client, and the real-guest
# end-to-end test), ignored tests included: nothing is skipped.
#
# Arguments are passed to `cargo test` after `--`, e.g. `./scripts/test.sh guest_e2e` would
# only filter test names; see docs/testing.md for running one tier.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*" >&2; }

step "test assets (scripts/guest-assets.sh)"
scripts/guest-assets.sh
export RR_ROW_TEST_ASSETS="${RR_ROW_TEST_ASSETS:-$PWD/.test-assets}"

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --quiet -- -D warnings

step "cargo doc --no-deps (warnings denied)"
RUSTDOCFLAGS=-Dwarnings cargo doc --no-deps --quiet

step "perf-matrix self-test (run orders, fio jobs)"
python3 scripts/perf-matrix.py --self-test

step "cargo test (all tests, ignored ones included)"
cargo test --quiet -- --include-ignored "$@"

step "all checks passed"

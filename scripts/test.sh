#!/usr/bin/env bash
# The one command a newcomer runs: installs what a fresh Debian/Ubuntu machine
# lacks for building gatebill (C/C++ toolchain, libclang for RocksDB's
# bindings, cmake), then checks formatting, lints, and runs every default test.
#
#   scripts/test.sh            # install if needed, fmt, clippy, tests
#   SKIP_INSTALL=1 scripts/test.sh
#
# CARGO_TARGET_DIR defaults to ~/.cache/gatebill-target so repeated runs (and
# CI on the same machine) reuse the ~11-minute RocksDB C++ build.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=scripts/setup.sh
. scripts/setup.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
echo "==> CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --locked --all-targets
echo "==> all checks passed"

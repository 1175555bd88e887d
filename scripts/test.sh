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

need=()
command -v cc >/dev/null || need+=(build-essential)
command -v c++ >/dev/null || need+=(g++)
command -v make >/dev/null || need+=(make)
command -v cmake >/dev/null || need+=(cmake)
command -v pkg-config >/dev/null || need+=(pkg-config)
command -v clang >/dev/null || need+=(clang)
ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || need+=(libclang-dev)
command -v python3 >/dev/null || need+=(python3)
if [ "${SKIP_INSTALL:-0}" != 1 ] && [ ${#need[@]} -gt 0 ]; then
  echo "==> installing: ${need[*]}"
  sudo_cmd=""
  [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${need[@]}"
fi
if ! command -v cargo >/dev/null; then
  echo "==> installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
echo "==> CARGO_TARGET_DIR=$CARGO_TARGET_DIR"
echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --locked --all-targets
echo "==> all checks passed"

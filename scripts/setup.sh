#!/usr/bin/env bash
# Installs what a fresh Debian/Ubuntu machine lacks to build gatebill: the
# C/C++ toolchain, cmake, clang and libclang (RocksDB's bindings), pkg-config,
# via apt-get (with sudo when not root), and Rust via rustup when cargo is
# missing. Does nothing when everything is there. Sourced by test.sh and demo.sh.
#   SKIP_INSTALL=1  skip the apt-get step
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


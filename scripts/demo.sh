#!/usr/bin/env bash
# The demo in one command: installs what is missing (scripts/setup.sh), then
# runs `gatebill demo`: an embedded broker, a month of generated traffic, the
# worker until the traffic is consumed, and the bill table read back.
# Extra arguments go to `gatebill demo` (see `gatebill demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
# One build serves the demo and scripts/test.sh: the tests unify the features of
# the dev-dependencies with the normal ones (Cargo's resolver 2), so a plain
# `cargo run` would resolve another feature set and scripts/test.sh would
# compile RocksDB's C++ a second time. Building every target here resolves the
# same set the test step does.
# Cargo's own progress is shown (no --quiet): the first build compiles
# RocksDB's C++ and runs for minutes without another word otherwise.
if [ ! -x "$CARGO_TARGET_DIR/debug/gatebill" ]; then
  echo "demo.sh: building gatebill (the first build compiles RocksDB's C++: about 11 minutes on two cores; later runs take seconds)" >&2
else
  echo "demo.sh: building gatebill (RocksDB is built already: only what changed is compiled)" >&2
fi
cargo build --locked --all-targets
exec "$CARGO_TARGET_DIR/debug/gatebill" demo "$@"

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
cargo run --locked --quiet -- demo "$@"

#!/usr/bin/env bash
# Long crash-equivalence run (issue: "prove it under faults"): 1,000,000
# generated messages (2% duplicates, 1% malformed) over 64 partitions of the
# in-process mock cluster, the worker as a child process SIGKILLed at 20
# random moments inside its processing and restarted each time, then left to
# finish. Asserts the final bills equal the pure core's, the summed usage
# equals the generator's truth, and every malformed message reached the
# dead-letter topic. Prints the figures RELIABILITY.md reports.
#
#   scripts/chaos.sh                 # defaults below
#   EVENTS=200000 KILLS=10 scripts/chaos.sh
#
# 64 partitions and 10,000 accounts with mild skew keep each partition under
# the mock cluster's ~5 MB limit (the test checks every partition's log still
# starts at offset 0).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
export GATEBILL_CHAOS_EVENTS="${EVENTS:-1000000}"
export GATEBILL_CHAOS_KILLS="${KILLS:-20}"
export GATEBILL_CHAOS_PARTITIONS="${PARTITIONS:-64}"
export GATEBILL_CHAOS_SEED="${SEED:-7}"
# Many accounts, mild skew: no partition may outgrow the mock's ~5 MB.
export GATEBILL_CHAOS_ACCOUNTS="${ACCOUNTS:-10000}"
export GATEBILL_CHAOS_SKEW="${SKEW:-0.5}"
# Production-like batching and emission: recomputing thousands of dirty
# bills every 500 ms (the short test's setting) would dominate the run.
export GATEBILL_CHAOS_BATCH="${BATCH:-5000}"
export GATEBILL_CHAOS_EMIT_MS="${EMIT_MS:-5000}"
cargo test --locked --release --test chaos -- --nocapture 2>&1 | grep -E -A2 "chaos:|test result|panicked|assert"

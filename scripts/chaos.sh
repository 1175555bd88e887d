#!/usr/bin/env bash
# Long reliability runs; each prints the figures RELIABILITY.md reports.
#
# crash    1,000,000 generated messages (2% duplicates, 1% malformed) over 64
#          partitions of the in-process mock cluster; the worker, a child
#          process, SIGKILLed at 20 random moments inside its processing and
#          restarted each time, then left to finish (tests/chaos.rs).
# scaling  200,000 messages over 24 partitions of the mock cluster; 1 -> 3 ->
#          2 `gatebill run` processes in one group, one SIGKILLed, partitions
#          restored from the changelog at every move (tests/scaling.rs).
# zombie   200,000 messages over 8 partitions of tansu; a worker SIGSTOPped
#          while it owns every partition, a replacement with the same
#          transactional.id takes over, the paused one resumed: it must stop
#          fenced with nothing it writes landing (tests/zombie.rs).
#
# Each asserts the final bills equal the pure core's, the summed usage the
# generator's truth, and every malformed message dead-lettered.
#
#   scripts/chaos.sh                       # all three, sizes below
#   ONLY=zombie scripts/chaos.sh           # one of crash, scaling, zombie
#   EVENTS=200000 KILLS=10 ONLY=crash scripts/chaos.sh
#
# Partitions and accounts keep each mock partition under its ~5 MB limit
# (the tests check every partition's log still starts at offset 0).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
ONLY="${ONLY:-crash scaling zombie}"
show() { grep -E -A2 "chaos:|scaling:|zombie:|test result|panicked|assert"; }

if [[ " $ONLY " == *" crash "* ]]; then
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
  echo "==> crash: $GATEBILL_CHAOS_EVENTS messages, $GATEBILL_CHAOS_KILLS kills"
  cargo test --locked --release --test chaos -- --nocapture 2>&1 | show
fi
if [[ " $ONLY " == *" scaling "* ]]; then
  export GATEBILL_SCALING_EVENTS="${SCALING_EVENTS:-200000}"
  export GATEBILL_SCALING_PARTITIONS="${SCALING_PARTITIONS:-24}"
  export GATEBILL_SCALING_ACCOUNTS="${SCALING_ACCOUNTS:-2000}"
  export GATEBILL_SCALING_BATCH="${SCALING_BATCH:-500}"
  echo "==> scaling: $GATEBILL_SCALING_EVENTS messages, $GATEBILL_SCALING_PARTITIONS partitions"
  cargo test --locked --release --test scaling -- --nocapture 2>&1 | show
fi
if [[ " $ONLY " == *" zombie "* ]]; then
  export GATEBILL_ZOMBIE_EVENTS="${ZOMBIE_EVENTS:-200000}"
  export GATEBILL_ZOMBIE_PARTITIONS="${ZOMBIE_PARTITIONS:-8}"
  export GATEBILL_ZOMBIE_BATCH="${ZOMBIE_BATCH:-500}"
  echo "==> zombie: $GATEBILL_ZOMBIE_EVENTS messages, $GATEBILL_ZOMBIE_PARTITIONS partitions (tansu)"
  cargo test --locked --release --test zombie -- --ignored --nocapture 2>&1 | show
fi

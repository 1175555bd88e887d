#!/usr/bin/env bash
# One benchmark command: prints a table and writes it to BENCHMARKS.md with
# the machine, versions and command line. Every figure comes from this run.
#
#   scripts/bench.sh                     # 5,000,000 events, 100,000 accounts
#   EVENTS=1000000 scripts/bench.sh      # smaller
#   BROKER_EVENTS=1000000 (default)      # events preloaded into the broker
#
# Rows:
#   core path   replay --input-file over a generated NDJSON file (skewed, 30
#               days, 1% duplicates), dedupe on and off: events/s, CPU s per
#               million events (user+sys), peak RSS, state size on disk
#   scaling     core path (dedupe on) at 1x, 2x, 4x the events
#   floor       `gatebill count-topic`: a consumer that only reads and counts a
#               topic preloaded into the embedded broker (log start offsets
#               checked to be 0, else it refuses to count)
#   end to end  `gatebill replay` over that topic: events/s, ratio to floor
# The Quix Streams peer row is not implemented yet (see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
command -v /usr/bin/time >/dev/null || { [ "$(id -u)" = 0 ] && apt-get install -y -qq time >/dev/null || sudo apt-get install -y -qq time >/dev/null; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
EVENTS="${EVENTS:-5000000}"
ACCOUNTS="${ACCOUNTS:-100000}"
BROKER_EVENTS="${BROKER_EVENTS:-1000000}"
PARTITIONS="${PARTITIONS:-64}"
cargo build --locked --release --quiet --bin gatebill
BIN="$CARGO_TARGET_DIR/release/gatebill"
WORK="$(mktemp -d)"
trap 'kill $BROKER_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
ROWS=()

# measure NAME EVENTS CMD...: runs CMD under /usr/bin/time, appends a row.
measure() {
  local name="$1" n="$2" state="$3"; shift 3
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }
  read -r wall user sys rss_kb <"$WORK/time"
  local size="-"
  [ -n "$state" ] && [ -d "$state" ] && size="$(du -sm "$state" | cut -f1) MB"
  ROWS+=("$(awk -v n="$n" -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss_kb" -v name="$name" -v size="$size" \
    'BEGIN { printf "| %s | %d | %.0f | %.2f | %.0f MB | %s |", name, n, n / w, (u + s) / (n / 1e6), r / 1024, size }')")
  echo "${ROWS[-1]}"
}

gen_file() { "$BIN" gen --events "$1" --accounts "$ACCOUNTS" --days 30 --duplicates 0.01 --malformed 0 --output-file "$2" >/dev/null; }

echo "generating $EVENTS events ..."
gen_file "$EVENTS" "$WORK/events.ndjson"
cat >"$WORK/nodedupe.toml" <<TOML
[worker]
dedupe = false
batch_size = 50000
TOML
cat >"$WORK/dedupe.toml" <<TOML
[worker]
batch_size = 50000
TOML
measure "core path, dedupe off" "$EVENTS" "$WORK/s-off" "$BIN" replay --config "$WORK/nodedupe.toml" --input-file "$WORK/events.ndjson" --output-file "$WORK/b-off.ndjson" --state-dir "$WORK/s-off"
measure "core path, dedupe on" "$EVENTS" "$WORK/s-on" "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events.ndjson" --output-file "$WORK/b-on.ndjson" --state-dir "$WORK/s-on"
ACCOUNT_HOURS=$(python3 - "$WORK/events.ndjson" <<'PY'
import json, sys
seen = set()
for line in open(sys.argv[1], 'rb'):
    try:
        e = json.loads(line)
    except Exception:
        continue
    # Asia/Shanghai has no DST: local hour = (ms/1000 + 8h) // 3600
    seen.add((e["account_id"], (e["time"] // 1000 + 8 * 3600) // 3600))
print(len(seen))
PY
)
STATE_OFF_BYTES=$(du -sb "$WORK/s-off" | cut -f1)
rm -rf "$WORK/s-off" "$WORK/s-on"
for mult in 2 4; do
  n=$((EVENTS * mult))
  gen_file "$n" "$WORK/events-$mult.ndjson"
  measure "scaling ${mult}x, dedupe on" "$n" "$WORK/s-$mult" "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events-$mult.ndjson" --output-file "$WORK/b-$mult.ndjson" --state-dir "$WORK/s-$mult"
  rm -rf "$WORK/events-$mult.ndjson" "$WORK/s-$mult"
done

echo "preloading $BROKER_EVENTS events into the embedded broker ($PARTITIONS partitions) ..."
"$BIN" dev-broker --partitions "$PARTITIONS" >"$WORK/broker.out" 2>/dev/null &
BROKER_PID=$!
for _ in $(seq 50); do grep -q bootstrap= "$WORK/broker.out" 2>/dev/null && break; sleep 0.2; done
export GATEBILL_BROKERS="$(head -1 "$WORK/broker.out" | cut -d= -f2)"
"$BIN" gen --events "$BROKER_EVENTS" --accounts "$ACCOUNTS" --days 30 --duplicates 0.01 --malformed 0 --no-accounts >/dev/null
measure "floor: read and count" "$BROKER_EVENTS" "" "$BIN" count-topic --topic gateway-events
FLOOR_ROW="${ROWS[-1]}"
measure "end to end: replay from the broker" "$BROKER_EVENTS" "$WORK/s-e2e" "$BIN" replay --config "$WORK/dedupe.toml" --state-dir "$WORK/s-e2e" --metrics-address ""
E2E_ROW="${ROWS[-1]}"
RATIO=$(awk -F'|' -v f="$FLOOR_ROW" -v e="$E2E_ROW" 'BEGIN { split(f, a, "|"); split(e, b, "|"); printf "%.0f%%", 100 * b[4] / a[4] }')

{
  echo "# Benchmarks"
  echo
  echo "Command: \`EVENTS=$EVENTS ACCOUNTS=$ACCOUNTS BROKER_EVENTS=$BROKER_EVENTS PARTITIONS=$PARTITIONS scripts/bench.sh\`, $(date -u +%Y-%m-%d)"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr); $(rustc --version); gatebill $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| run | events | events/s | CPU s per million events | peak RSS | state on disk |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "End to end / floor: $RATIO. Active account-hours: $ACCOUNT_HOURS; state without dedupe keys: $STATE_OFF_BYTES bytes = $(awk -v b="$STATE_OFF_BYTES" -v h="$ACCOUNT_HOURS" 'BEGIN { printf "%.1f", b / h }') bytes per account-hour (RocksDB directory incl. WAL and logs)."
} >"$WORK/table.md"
cat "$WORK/table.md"
if [ -f BENCHMARKS.md ] && grep -q '^## Analysis' BENCHMARKS.md; then
  { cat "$WORK/table.md"; echo; sed -n '/^## Analysis/,$p' BENCHMARKS.md; } >"$WORK/new.md"
  mv "$WORK/new.md" BENCHMARKS.md
else
  cp "$WORK/table.md" BENCHMARKS.md
fi

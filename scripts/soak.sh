#!/usr/bin/env bash
# Load held (issue 12, item 7): `gatebill run` against tansu for DURATION
# seconds while `gatebill gen --rate RATE` offers a steady load, sampling the
# worker's RSS and consumer lag every SAMPLE seconds; then the worker drains,
# emits and stops, and scripts/soak_report.py prints:
#   - RSS over time, and its drift after warm-up (the first quarter): the
#     spread of every sample, the last quarter's peak against the second
#     quarter's (the memtables' fill-and-flush sawtooth does not count), and
#     RSS less RocksDB's reported memtables and block cache, and the peaks
#     less the block cache alone (it fills toward its fixed capacity);
#   - consumer lag over time (its maximum);
#   - event-to-bill latency p50 / p99 / max: from each event's append time
#     on the input topic to the first bill record on the output topic whose
#     usage includes it (bills are per account-month, events counted in
#     partition order);
#   - whether the latest bill per key equals the reference (the same
#     generated history replayed from a file with its accounts file).
#
#   scripts/soak.sh                              # 5 minutes at 10,000 msg/s
#   DURATION=1800 RATE=20000 scripts/soak.sh     # the issue's 30 minutes
#   PARTITIONS=8 ACCOUNTS=20000 SAMPLE=5 (defaults)
#   KEEP=1 scripts/soak.sh                       # keep the work directory
#                                                # (samples, logs, reference)
#
# Event times run from 26 hours ago to 2 hours ago, in order, so that both a
# closed and an open month can occur; duplicates and malformed messages are
# off, so that each key's bills count its events one to one; the dedupe
# window is one hour of event time (see below). Figures are
# computed from what was read back, never from RATE x DURATION.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
DURATION="${DURATION:-300}"
RATE="${RATE:-10000}"
ACCOUNTS="${ACCOUNTS:-20000}"
PARTITIONS="${PARTITIONS:-8}"
SAMPLE="${SAMPLE:-5}"
EVENTS=$((RATE * DURATION))
GATEBILL_TANSU="${GATEBILL_TANSU:-$(command -v tansu || true)}"
[ -n "$GATEBILL_TANSU" ] || { echo "tansu not found: scripts/setup.sh installs it" >&2; exit 1; }
python3 -c 'import confluent_kafka' 2>/dev/null || pip_install confluent-kafka
cargo build --locked --release --quiet --bin gatebill
BIN="$CARGO_TARGET_DIR/release/gatebill"
WORK="$(mktemp -d)"
TANSU_PID="" WORKER_PID="" GEN_PID=""
[ -z "${KEEP:-}" ] || echo "soak: the work directory (samples.txt: the samples as taken) is kept at $WORK"
trap 'kill $GEN_PID $WORKER_PID $TANSU_PID 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$WORK"' EXIT
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
PORT="$(free_port)"
METRICS_PORT="$(free_port)"
"$GATEBILL_TANSU" broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$PORT" >"$WORK/tansu.log" 2>&1 &
TANSU_PID=$!
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
export GATEBILL_BROKERS="127.0.0.1:$PORT"
cat >"$WORK/soak.toml" <<EOF
[kafka]
partitions = $PARTITIONS
group_id = "gatebill-soak"
[worker]
state_dir = "$WORK/state"
# The run compresses a day of event time into minutes: with the default
# 72-hour dedupe window the kept request ids would grow for the whole run.
# One hour (and the 1,000,000-message window) keeps it at its steady size.
dedupe_window_hours = 1
[metrics]
address = "127.0.0.1:$METRICS_PORT"
EOF
START="$(date -u -d '-26 hours' +%Y-%m-%dT%H:%M:%SZ)"
GEN=(gen --config "$WORK/soak.toml" --events "$EVENTS" --accounts "$ACCOUNTS" --start "$START" --days 1 --duplicates 0 --malformed 0 --seed 11)

echo "soak: $EVENTS messages at $RATE/s over $PARTITIONS partitions of tansu, $ACCOUNTS accounts, events from $START"
RUST_LOG=warn "$BIN" run --config "$WORK/soak.toml" 2>"$WORK/worker.log" &
WORKER_PID=$!
sleep 2
"$BIN" "${GEN[@]}" --rate "$RATE" >"$WORK/gen.out" 2>"$WORK/gen.err" &
GEN_PID=$!
STARTED=$(date +%s)
# The metrics endpoint (an absent one, while the worker starts, reads as nothing).
metrics() { curl -s "127.0.0.1:$METRICS_PORT/metrics" || true; }
lag() { metrics | awk '/^gatebill_partition_lag\{/ { s += $2 } END { print s + 0 }'; }
produced() { metrics | awk '/^gatebill_records_produced_total\{topic="gateway-bills"\}/ { print $2 }' | tail -1; }
# RocksDB's memory by kind, MB: memtables block_cache table_readers; then
# the dedupe mirror's request-id hashes, MB.
rocksdb_mb() {
  metrics | awk '/^gatebill_rocksdb_memory_bytes\{/ { split($1, a, "\""); m[a[2]] = $2 }
    /^gatebill_dedupe_memory_bytes / { d = $2 }
    END { printf "%d %d %d %d", m["memtables"] / 1048576, m["block_cache"] / 1048576, m["table_readers"] / 1048576, d / 1048576 }'
}
sample() { # t rss_kb lag bills_produced phase memtables_mb block_cache_mb table_readers_mb dedupe_mb
  local p; p="$(produced)"
  echo "$(($(date +%s) - STARTED)) $(ps -o rss= -p "$WORKER_PID" | tr -d ' ') $(lag) ${p:-0} $1 $(rocksdb_mb)" >>"$WORK/samples.txt"
}
while kill -0 "$GEN_PID" 2>/dev/null; do
  kill -0 "$WORKER_PID" || { echo "the worker exited:"; tail -20 "$WORK/worker.log"; exit 1; }
  sample load
  sleep "$SAMPLE"
done
wait "$GEN_PID" || { cat "$WORK/gen.err"; exit 1; }
GEN_PID=""
# Drain: until the lag is 0, then one provisional interval (60 s) and a few
# emit intervals, so every key's last change is out.
while [ "$(lag)" != 0 ]; do sample drain; sleep "$SAMPLE"; done
for _ in $(seq $(((60 + 15) / SAMPLE))); do sample drain; sleep "$SAMPLE"; done
kill -TERM "$WORKER_PID"
wait "$WORKER_PID" || { echo "the worker did not stop cleanly:"; tail -20 "$WORK/worker.log"; exit 1; }
WORKER_PID=""

# The reference: the same history from a file, with its accounts file.
"$BIN" "${GEN[@]}" --output-file "$WORK/ref.ndjson" >/dev/null
RUST_LOG=warn "$BIN" replay --input-file "$WORK/ref.ndjson" --accounts-file "$WORK/ref.accounts.ndjson" \
  --output-file "$WORK/ref-bills.ndjson" --state-dir "$WORK/ref-state" --metrics-address "" >/dev/null
python3 scripts/soak_report.py "$GATEBILL_BROKERS" "$WORK/samples.txt" "$WORK/ref-bills.ndjson" "$DURATION" "$RATE"

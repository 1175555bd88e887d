#!/usr/bin/env bash
# One benchmark command: prints a table and writes it to BENCHMARKS.md with
# the machine, versions and command line. Every figure comes from this run.
#
#   scripts/bench.sh                      # 5,000,000 events, 100,000 accounts
#   EVENTS=1000000 scripts/bench.sh       # smaller
#   BROKER_EVENTS=500000 (default)        # preloaded into the embedded broker
#   PEER_EVENTS=500000 (default)          # preloaded into tansu for the peer rows
#   PEER=0 scripts/bench.sh               # skip tansu and Quix Streams
#   BIG=0 scripts/bench.sh                # skip the 1,000,000-account row
#   BIG_EVENTS=20000000 BIG_ACCOUNTS=1000000 (defaults of that row)
#   CHANGELOG=0 scripts/bench.sh          # skip the changelog rows (tansu)
#   CHANGELOG_EVENTS=2000000 (default)    # events of each changelog row
#
# Rows:
#   core path    replay --input-file over a generated NDJSON file (skewed, 30
#                days, 1% duplicates), dedupe off and on: events/s, CPU s per
#                million events (user+sys of the process), peak RSS, state
#   scaling      core path (dedupe on) at 2x and 4x the events
#   cores        core path (dedupe on) pinned to 1 core and to 2 (taskset),
#                so the table says what a second core buys; the same for the
#                transactional Kafka replay
#   big          BIG_ACCOUNTS account records (an accounts file) plus
#                BIG_EVENTS events: the accounts table, interner and bill
#                states in memory, peak RSS
#   floor        `gatebill count-topic`: a consumer with the worker's client
#                settings that only reads and counts a preloaded topic (log
#                start offsets checked to be 0, else it refuses to count)
#   end to end   `gatebill replay` over that topic: events/s, CPU, ratio to floor
#   same events  core path over the topic's events written to a file, so the
#                Kafka path's CPU per event is compared at equal events per bill
#   peer         scripts/peer_quix.py, the same account-month aggregation in
#                Quix Streams (RocksDB state), over the same topic on tansu,
#                beside gatebill's replay of that topic
#   changelog    scripts/changelog-rows.sh: a `run` worker over the same
#                stream spread over 1 day and over 30 days of event time, on
#                tansu: changelog bytes and worker CPU per event, restore rates
# State per account-hour: `gatebill compact` of the dedupe-off state, bytes
# of every column family except dedupe, over the active account-hours.
# The embedded broker keeps at most ~100,000 message sets per partition, so
# its rows use BROKER_EVENTS over PARTITIONS partitions; tansu keeps all.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup.sh
[ -x /usr/bin/time ] || apt_install time >/dev/null
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
EVENTS="${EVENTS:-5000000}"
ACCOUNTS="${ACCOUNTS:-100000}"
BROKER_EVENTS="${BROKER_EVENTS:-500000}"
PEER_EVENTS="${PEER_EVENTS:-500000}"
PARTITIONS="${PARTITIONS:-64}"
PEER="${PEER:-1}"
BIG="${BIG:-1}"
BIG_EVENTS="${BIG_EVENTS:-20000000}"
BIG_ACCOUNTS="${BIG_ACCOUNTS:-1000000}"
BATCH="${BATCH:-500000}"
cargo build --locked --release --quiet --bin gatebill
BIN="$CARGO_TARGET_DIR/release/gatebill"
WORK="$(mktemp -d)"
BROKER_PID="" TANSU_PID=""
trap 'kill $BROKER_PID $TANSU_PID 2>/dev/null || true; rm -rf "$WORK"' EXIT
ROWS=()

# measure NAME EVENTS STATE_DIR CMD...: runs CMD under /usr/bin/time, appends a row.
measure() {
  local name="$1" n="$2" state="$3"; shift 3
  /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "$@" >"$WORK/out" 2>"$WORK/err" || { cat "$WORK/err"; exit 1; }
  read -r wall user sys rss_kb <"$WORK/time"
  # Rates come from what the command says it read ("counted N of", "replayed
  # N messages"), not from what was offered: tansu's end offsets stop short.
  local read_n
  read_n="$(grep -oE '^(counted|replayed) [0-9]+' "$WORK/out" | grep -oE '[0-9]+' | head -1 || true)"
  if [ -n "$read_n" ] && [ "$read_n" != "$n" ]; then
    echo "  note: $name read $read_n of $n messages; its rates use $read_n" >&2
    name="$name (read $read_n of $n)"
    n="$read_n"
  fi
  local size="-"
  [ -n "$state" ] && [ -d "$state" ] && size="$(du -sm "$state" | cut -f1) MB"
  ROWS+=("$(awk -v n="$n" -v w="$wall" -v u="$user" -v s="$sys" -v r="$rss_kb" -v name="$name" -v size="$size" \
    'BEGIN { printf "| %s | %d | %.0f | %.2f | %.0f MB | %s |", name, n, n / w, (u + s) / (n / 1e6), r / 1024, size }')")
  echo "${ROWS[-1]}"
}
# bill_cpu: the CPU per bill the last measured command logged (every thread,
# from the end of its input to its last bill written or acknowledged).
bill_cpu() {
  sed 's/\x1b\[[0-9;]*m//g' "$WORK/err" | grep -oE 'bills=[0-9]+ cpu_us_per_bill=[0-9.]+' | tail -1 |
    awk -F'[= ]' '{ printf "%.1f us per bill (%d bills)", $4, $2 }'
}
# field ROW N: the Nth column of a table row.
field() { awk -F'|' -v n="$2" '{ gsub(/ /, "", $(n + 1)); print $(n + 1) }' <<<"$1"; }

gen_file() { "$BIN" gen --events "$1" --accounts "$ACCOUNTS" --days 30 --duplicates 0.01 --malformed 0 --output-file "$2" >/dev/null; }

echo "generating $EVENTS events ..."
gen_file "$EVENTS" "$WORK/events.ndjson"
printf '[worker]\ndedupe = false\nfile_batch_size = %s\n' "$BATCH" >"$WORK/nodedupe.toml"
printf '[worker]\nfile_batch_size = %s\n' "$BATCH" >"$WORK/dedupe.toml"
printf '[worker]\nbatch_size = 50000\n' >"$WORK/broker.toml"
measure "core path, dedupe off" "$EVENTS" "$WORK/s-off" "$BIN" replay --config "$WORK/nodedupe.toml" --input-file "$WORK/events.ndjson" --accounts-file "$WORK/events.accounts.ndjson" --output-file "$WORK/b-off.ndjson" --state-dir "$WORK/s-off"
CORE_OFF="${ROWS[-1]}"
measure "core path, dedupe on" "$EVENTS" "$WORK/s-on" "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events.ndjson" --accounts-file "$WORK/events.accounts.ndjson" --output-file "$WORK/b-on.ndjson" --state-dir "$WORK/s-on"
CORE_BILL="$(bill_cpu)"
CORE_ON="${ROWS[-1]}"
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
# compacted_bytes STATE_DIR: bytes of every column family but dedupe after `gatebill compact`.
compacted_bytes() {
  "$BIN" compact --state-dir "$1" >"$WORK/compact.txt"
  awk -F'|' '/\| [a-z]/ && $2 !~ /column family|dedupe/ { gsub(/ /, "", $3); s += $3 } END { print s }' "$WORK/compact.txt"
}
# What cores buy: the same run pinned to one core, then to two.
CORES_LINE="Cores: taskset not found, rows skipped."
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  measure "core path, dedupe on, 1 core (taskset -c 0)" "$EVENTS" "$WORK/s-c1" taskset -c 0 "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events.ndjson" --accounts-file "$WORK/events.accounts.ndjson" --output-file "$WORK/b-c1.ndjson" --state-dir "$WORK/s-c1"
  ONE_CORE="${ROWS[-1]}"
  measure "core path, dedupe on, 2 cores (taskset -c 0,1)" "$EVENTS" "$WORK/s-c2" taskset -c 0,1 "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events.ndjson" --accounts-file "$WORK/events.accounts.ndjson" --output-file "$WORK/b-c2.ndjson" --state-dir "$WORK/s-c2"
  TWO_CORES="${ROWS[-1]}"
  CORES_LINE=$(awk -v a="$(field "$ONE_CORE" 3)" -v b="$(field "$TWO_CORES" 3)" 'BEGIN { printf "Cores: 2 cores run the core path at %.2fx the events/s of 1 core.", b / a }')
  rm -rf "$WORK/s-c1" "$WORK/s-c2" "$WORK"/b-c*.ndjson*
fi
STATE_BYTES=$(compacted_bytes "$WORK/s-off")
SCALING="1x: $(compacted_bytes "$WORK/s-on") bytes"
rm -rf "$WORK/s-off" "$WORK/s-on" "$WORK"/b-*.ndjson*
for mult in 2 4; do
  n=$((EVENTS * mult))
  gen_file "$n" "$WORK/events-$mult.ndjson"
  measure "scaling ${mult}x, dedupe on" "$n" "$WORK/s-$mult" "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events-$mult.ndjson" --accounts-file "$WORK/events-$mult.accounts.ndjson" --output-file "$WORK/b-$mult.ndjson" --state-dir "$WORK/s-$mult"
  SCALING="$SCALING, ${mult}x: $(compacted_bytes "$WORK/s-$mult") bytes"
  rm -rf "$WORK/events-$mult.ndjson" "$WORK/s-$mult" "$WORK"/b-*.ndjson*
done

BIG_LINE="Large row skipped (BIG=0)."
if [ "$BIG" = 1 ]; then
  echo "generating $BIG_EVENTS events over $BIG_ACCOUNTS accounts ..."
  "$BIN" gen --events "$BIG_EVENTS" --accounts "$BIG_ACCOUNTS" --skew 0.5 --days 30 --duplicates 0.01 --malformed 0 --output-file "$WORK/big.ndjson" >/dev/null
  measure "$BIG_ACCOUNTS accounts + $BIG_EVENTS events, dedupe on" "$BIG_EVENTS" "$WORK/s-big" "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/big.ndjson" --accounts-file "$WORK/big.accounts.ndjson" --output-file "$WORK/b-big.ndjson" --state-dir "$WORK/s-big"
  BIG_ROW="${ROWS[-1]}"
  BIG_LINE="$BIG_ACCOUNTS accounts + $BIG_EVENTS events (skew 0.5): $(wc -l <"$WORK/b-big.ndjson") bills, peak RSS $(field "$BIG_ROW" 5) (target <= 1 GB)."
  rm -rf "$WORK/big.ndjson" "$WORK/big.accounts.ndjson" "$WORK/s-big" "$WORK"/b-big.ndjson*
fi

echo "preloading $BROKER_EVENTS events into the embedded broker ($PARTITIONS partitions) ..."
"$BIN" dev-broker --partitions "$PARTITIONS" >"$WORK/broker.out" 2>/dev/null &
BROKER_PID=$!
for _ in $(seq 50); do grep -q bootstrap= "$WORK/broker.out" 2>/dev/null && break; sleep 0.2; done
GATEBILL_BROKERS="$(head -1 "$WORK/broker.out" | cut -d= -f2)" "$BIN" gen --events "$BROKER_EVENTS" --accounts "$ACCOUNTS" --days 30 --duplicates 0.01 --malformed 0 --no-accounts >/dev/null
export GATEBILL_BROKERS="$(head -1 "$WORK/broker.out" | cut -d= -f2)"
measure "floor: read and count (embedded broker)" "$BROKER_EVENTS" "" "$BIN" count-topic --topic gateway-events
FLOOR_ROW="${ROWS[-1]}"
measure "end to end: replay (embedded broker)" "$BROKER_EVENTS" "$WORK/s-e2e" "$BIN" replay --config "$WORK/broker.toml" --state-dir "$WORK/s-e2e" --metrics-address ""
E2E_ROW="${ROWS[-1]}"
E2E_BILL="$(bill_cpu)"
# What the transactional run wrote to the changelog, per input event.
"$BIN" count-topic --topic gatebill-changelog >"$WORK/changelog.txt"
CHANGELOG_BYTES=$(grep -o '([0-9]* bytes' "$WORK/changelog.txt" | tr -dc 0-9)
CHANGELOG_RECORDS=$(awk '{ print $2 }' "$WORK/changelog.txt")
# The same replay without transactions (the outbox and an idempotent producer).
printf '[kafka]\ntransactions = false\n[worker]\nbatch_size = 50000\n' >"$WORK/broker-notx.toml"
measure "end to end: replay, no transactions (embedded broker)" "$BROKER_EVENTS" "$WORK/s-e2e-notx" "$BIN" replay --config "$WORK/broker-notx.toml" --state-dir "$WORK/s-e2e-notx" --metrics-address ""
E2E_NOTX_ROW="${ROWS[-1]}"
NOTX_BILL="$(bill_cpu)"
# The core path over the very events of the broker rows (the same generator
# arguments, written to a file; no accounts file, as the topic has none), so
# the Kafka path's cost is compared at the same events per bill: the core
# rows above bill about 50 events per bill, the broker's topic about 8.
gen_file "$BROKER_EVENTS" "$WORK/broker-events.ndjson"
measure "core path, the broker rows' events (file, dedupe on)" "$BROKER_EVENTS" "$WORK/s-same" "$BIN" replay --config "$WORK/dedupe.toml" --input-file "$WORK/broker-events.ndjson" --no-accounts --output-file "$WORK/b-same.ndjson" --state-dir "$WORK/s-same"
SAME_ROW="${ROWS[-1]}"
SAME_BILLS=$(wc -l <"$WORK/b-same.ndjson")
SAME_LINE=$(awk -v k="$(field "$E2E_ROW" 4)" -v c="$(field "$SAME_ROW" 4)" -v kb="$(grep -oE '[0-9]+ bills' <<<"$E2E_BILL" | grep -oE '[0-9]+')" -v cb="$SAME_BILLS" -v n="$BROKER_EVENTS" \
  'BEGIN { printf "Kafka end to end (transactions) / core path over the same %d events: %.2fx (%.2f vs %.2f CPU-s per million events; %d and %d bills).", n, k / c, k, c, kb, cb }')
rm -rf "$WORK/s-same" "$WORK/broker-events.ndjson"
# What cores buy on the Kafka path: the transactional replay pinned to one
# core, then to two (librdkafka's threads, decoding and emission share them).
KAFKA_CORES_LINE=""
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
  measure "end to end: replay, 1 core (taskset -c 0)" "$BROKER_EVENTS" "$WORK/s-k1" taskset -c 0 "$BIN" replay --config "$WORK/broker.toml" --state-dir "$WORK/s-k1" --metrics-address ""
  K_ONE="${ROWS[-1]}"
  measure "end to end: replay, 2 cores (taskset -c 0,1)" "$BROKER_EVENTS" "$WORK/s-k2" taskset -c 0,1 "$BIN" replay --config "$WORK/broker.toml" --state-dir "$WORK/s-k2" --metrics-address ""
  K_TWO="${ROWS[-1]}"
  KAFKA_CORES_LINE=$(awk -v a="$(field "$K_ONE" 3)" -v b="$(field "$K_TWO" 3)" 'BEGIN { printf "On the Kafka path (embedded broker, transactions) 2 cores run at %.2fx the events/s of 1 core.", b / a }')
  rm -rf "$WORK/s-k1" "$WORK/s-k2"
fi
# Restore rate: a `run` worker bills the topic and stops cleanly (SIGTERM
# after RESTORE_WAIT s); a second one with an empty state directory in the
# same group restores every partition from the changelog.
RESTORE_WAIT="${RESTORE_WAIT:-30}"
# A short session timeout: the second worker is assigned the partitions soon
# after the first leaves (the mock cluster waits out the session otherwise).
printf '[kafka.properties]\n"session.timeout.ms" = "6000"\n"heartbeat.interval.ms" = "500"\n[worker]\nbatch_size = 50000\n' >"$WORK/run.toml"
"$BIN" run --config "$WORK/run.toml" --state-dir "$WORK/s-run1" --group-id bench-restore --metrics-address "" 2>"$WORK/run1.log" &
RUN_PID=$!; sleep "$RESTORE_WAIT"; kill -TERM $RUN_PID; wait $RUN_PID || true
"$BIN" run --config "$WORK/run.toml" --state-dir "$WORK/s-run2" --group-id bench-restore --metrics-address "" 2>"$WORK/run2.log" &
RUN_PID=$!; sleep "$RESTORE_WAIT"; kill -TERM $RUN_PID; wait $RUN_PID || true
RESTORE_LINE=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/run2.log" | awk '/partition restored from the changelog/ {
    for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "account_months") m += kv[2]; if (kv[1] == "seconds") s += kv[2]; if (kv[1] == "records") r += kv[2]; if (kv[1] == "bytes") b += kv[2] }
    n++ }
  END { if (n == 0 || s == 0) print "no partition was restored (see run2.log)"; else printf "%d partitions restored: %d changelog records (%d bytes), %d account-months in %.2f s of restore = %.0f account-months/s", n, r, b, m, s, m / s }')
echo "restore: $RESTORE_LINE"
kill $BROKER_PID; BROKER_PID=""
unset GATEBILL_BROKERS

PEER_LINE="Peer rows skipped (PEER=0)."
if [ "$PEER" = 1 ]; then
  TANSU="${GATEBILL_TANSU:-$(command -v tansu || echo "$HOME/.cache/tansu/bin/tansu")}"
  if [ ! -x "$TANSU" ]; then
    echo "installing tansu (a Kafka-compatible broker; about 12 minutes) ..."
    cargo install tansu --locked --features dynostore --root "$HOME/.cache/tansu" --quiet
  fi
  python3 -c 'import quixstreams' 2>/dev/null || pip_install quixstreams
  PORT=$((20000 + RANDOM % 20000))
  "$TANSU" broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$PORT" --advertised-listener-url "tcp://127.0.0.1:$PORT" >"$WORK/tansu.log" 2>&1 &
  TANSU_PID=$!
  sleep 2
  export GATEBILL_BROKERS="127.0.0.1:$PORT"
  echo "preloading $PEER_EVENTS events into tansu ..."
  "$BIN" gen --events "$PEER_EVENTS" --accounts "$ACCOUNTS" --days 30 --duplicates 0.01 --malformed 0 --no-accounts >/dev/null
  measure "floor: read and count (tansu)" "$PEER_EVENTS" "" "$BIN" count-topic --topic gateway-events
  TANSU_FLOOR="${ROWS[-1]}"
  measure "end to end: replay (tansu)" "$PEER_EVENTS" "$WORK/s-tansu" "$BIN" replay --config "$WORK/broker.toml" --state-dir "$WORK/s-tansu" --metrics-address ""
  TANSU_E2E="${ROWS[-1]}"
  measure "peer: Quix Streams $(python3 -c 'import quixstreams; print(quixstreams.__version__)' 2>/dev/null) (tansu)" "$PEER_EVENTS" "$WORK/s-quix" \
    python3 scripts/peer_quix.py "$GATEBILL_BROKERS" gateway-events "$PEER_EVENTS" "$WORK/s-quix"
  QUIX="${ROWS[-1]}"
  PEER_LINE=$(awk -v g="$(field "$TANSU_E2E" 4)" -v q="$(field "$QUIX" 4)" -v gr="$(field "$TANSU_E2E" 3)" -v qr="$(field "$QUIX" 3)" -v f="$(field "$TANSU_FLOOR" 3)" \
    'BEGIN { printf "Peer, same tansu topic: gatebill uses %.1fx less CPU per event than Quix Streams and runs %.1fx faster; gatebill end to end on tansu = %.0f%% of its floor.", q / g, gr / qr, 100 * gr / f }')
fi

CHANGELOG_TABLE="Changelog rows skipped (CHANGELOG=0)." CHANGELOG_COMMAND=""
if [ "${CHANGELOG:-1}" = 1 ]; then
  # shellcheck source=scripts/changelog-rows.sh
  . scripts/changelog-rows.sh
  trap 'kill $BROKER_PID $TANSU_PID $CL_PIDS 2>/dev/null || true; rm -rf "$WORK"' EXIT
  ACCOUNTS=2000 changelog_rows "$BIN" "${CHANGELOG_EVENTS:-2000000}" 8 "$WORK"
fi

RATIO=$(awk -v f="$(field "$FLOOR_ROW" 3)" -v e="$(field "$E2E_ROW" 3)" 'BEGIN { printf "%.0f%%", 100 * e / f }')
{
  echo "# Benchmarks"
  echo
  echo "Command: \`EVENTS=$EVENTS ACCOUNTS=$ACCOUNTS BROKER_EVENTS=$BROKER_EVENTS PEER_EVENTS=$PEER_EVENTS PARTITIONS=$PARTITIONS BATCH=$BATCH PEER=$PEER BIG=$BIG BIG_EVENTS=$BIG_EVENTS BIG_ACCOUNTS=$BIG_ACCOUNTS scripts/bench.sh\`, $(date -u +%Y-%m-%d)"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr); $(rustc --version); gatebill $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo "| run | events | events/s | CPU s per million events | peak RSS | state on disk |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "End to end / floor (embedded broker): $RATIO. $SAME_LINE $PEER_LINE"
  echo
  echo "$CORES_LINE $KAFKA_CORES_LINE $BIG_LINE"
  echo
  echo "CPU per bill emitted (every thread, from the end of the input to the last bill acknowledged; the replay logs it as cpu_us_per_bill): Kafka replay with transactions $E2E_BILL; without transactions (outbox) $NOTX_BILL; core path, dedupe on (bills written to the NDJSON file) $CORE_BILL."
  echo
  echo "Transactions (kafka.transactions, the default) against none, same topic: $(field "$E2E_ROW" 3) vs $(field "$E2E_NOTX_ROW" 3) events/s, $(field "$E2E_ROW" 4) vs $(field "$E2E_NOTX_ROW" 4) CPU-s per million events. Changelog written by the transactional replay: $CHANGELOG_RECORDS records, $CHANGELOG_BYTES bytes of keys and values = $(awk -v b="$CHANGELOG_BYTES" -v n="$BROKER_EVENTS" 'BEGIN { printf "%.1f", b / n }') bytes per event. Restore (a \`run\` worker with an empty state directory after another stopped): $RESTORE_LINE."
  echo
  echo "Compacted state without dedupe keys, dedupe-on runs (\`gatebill compact\`; the table's last column is the directory as the run left it, with dedupe hashes awaiting compaction and the WAL): $SCALING."
  echo
  echo "Changelog by event-time spread ($CHANGELOG_COMMAND):"
  echo
  echo "$CHANGELOG_TABLE"
  echo
  echo "State after the dedupe-off core run, compacted (\`gatebill compact\`), every column family but dedupe: $STATE_BYTES bytes over $ACCOUNT_HOURS active account-hours = $(awk -v b="$STATE_BYTES" -v h="$ACCOUNT_HOURS" 'BEGIN { printf "%.1f", b / h }') bytes per account-hour."
} >"$WORK/table.md"
cat "$WORK/table.md"
if [ -f BENCHMARKS.md ] && grep -q '^## Analysis' BENCHMARKS.md; then
  { cat "$WORK/table.md"; echo; sed -n '/^## Analysis/,$p' BENCHMARKS.md; } >"$WORK/new.md"
  mv "$WORK/new.md" BENCHMARKS.md
else
  cp "$WORK/table.md" BENCHMARKS.md
fi

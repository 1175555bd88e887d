#!/usr/bin/env bash
# Alternating A/B of two gatebill release binaries on the bench's core-path
# and Kafka-replay rows, for changes that must not move them (a refactor:
# issue 26). Identical runs on the 2-core machine differ by up to 30%
# (BENCHMARKS.md), so a change under ~10% shows only when the two binaries
# take turns: BASE, NEW, BASE, NEW ... ROUNDS times per row.
#
#   scripts/ab.sh BASE_BIN NEW_BIN [ROUNDS]     # ROUNDS defaults to 3
#
# Rows (the bench's, scripts/bench.sh, same generator arguments and configs):
#   core        `replay --input-file` of CORE_EVENTS generated events
#               (`gen --accounts ACCOUNTS --days 30 --duplicates 0.01
#               --malformed 0`, with its accounts file), dedupe on,
#               `worker.file_batch_size = BATCH`, bills to an NDJSON
#               --output-file: the bench's "core path, dedupe on" row
#   kafka-tx    `replay` of KAFKA_EVENTS events preloaded into the embedded
#               broker (`gatebill dev-broker`, PARTITIONS partitions; `gen
#               ... --no-accounts`), `worker.batch_size = 50000`, transactions
#               on (the default): "end to end: replay (embedded broker)"
#   kafka-notx  the same with `kafka.transactions = false` (outbox and an
#               idempotent producer): "end to end: replay, no transactions"
#
# Each run: a fresh state directory; Kafka runs a freshly started and
# preloaded broker, so every run of a row sees the same broker state. The
# inputs are generated, and the broker run, by BASE_BIN for both sides: only
# the measured `replay` differs.
#
# Measured per run, of the replay process alone (`/usr/bin/time`): user+sys
# CPU seconds, wall seconds, peak RSS; from its log, the CPU per bill
# (cpu_us_per_bill); from its summary line ("replayed N messages ...: B
# billed, D duplicates, R dead-lettered, E bill records emitted"), the counts,
# which must be equal in every run of a row; on the core row also the md5 of
# the sorted bills file, which must be equal too. The 1-minute load average
# at each run's start is printed: above ~0.3 something else was using the
# CPUs. The end: every run, then per row the medians of BASE and NEW and the
# relative difference, beside each side's spread ((max - min) / median).
# Exits 1 when counts or bills differ between runs.
#
# Environment (defaults = the bench's rows):
#   CORE_EVENTS=5000000 ACCOUNTS=100000 BATCH=500000
#   KAFKA_EVENTS=500000 PARTITIONS=64     (the embedded broker keeps ~5 MB
#                                          per partition: 500,000 events of
#                                          ~350 bytes over 64 fit, 1M do not)
#   AB_ROWS="core kafka-tx kafka-notx"    (a subset runs only those rows)
#   KEEP=1                                (keep the work directory)
#   TMPDIR                                (where the work directory goes;
#                                          the core row needs ~400 bytes per
#                                          event: 2 GB at 5M events)
# At the defaults one round (each row once per binary) takes about 60 s on a
# quiet machine, 85 s while a cargo build runs beside it: a core run 8-16 s
# wall, a Kafka run 6-9 s plus ~3 s to start and preload its broker; the
# core input takes 5-10 s more to generate, once.
set -euo pipefail

if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
BASE_BIN="$(realpath "$1")"
NEW_BIN="$(realpath "$2")"
ROUNDS="${3:-3}"
for b in "$BASE_BIN" "$NEW_BIN"; do
  [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }
done
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || { echo "ROUNDS must be a positive integer, not '$ROUNDS'" >&2; exit 2; }
[ -x /usr/bin/time ] || { echo "needs /usr/bin/time (apt-get install time)" >&2; exit 2; }
command -v python3 >/dev/null || { echo "needs python3 (for the summary)" >&2; exit 2; }

CORE_EVENTS="${CORE_EVENTS:-5000000}"
ACCOUNTS="${ACCOUNTS:-100000}"
BATCH="${BATCH:-500000}"
KAFKA_EVENTS="${KAFKA_EVENTS:-500000}"
PARTITIONS="${PARTITIONS:-64}"
AB_ROWS="${AB_ROWS:-core kafka-tx kafka-notx}"
for row in $AB_ROWS; do
  case "$row" in core | kafka-tx | kafka-notx) ;; *) echo "unknown row in AB_ROWS: $row" >&2; exit 2 ;; esac
done

# Only what this script passes reaches the binaries: no GATEBILL_* settings
# (a GATEBILL_CONFIG or GATEBILL_BROKERS of the caller's shell) and the
# default log filter (cpu_us_per_bill is logged at info).
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^(GATEBILL_|RUST_LOG$)' || true)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/gatebill-ab.XXXXXX")"
BROKER_PID=""
cleanup() {
  stop_broker
  if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# start_broker: a fresh embedded broker (librdkafka's mock cluster), as the
# bench starts it, preloaded with KAFKA_EVENTS events; sets BROKERS.
start_broker() {
  # A new file each time: the loop below must not read the last broker's
  # address before the new process has truncated it.
  rm -f "$WORK/broker.out"
  "$BASE_BIN" dev-broker --partitions "$PARTITIONS" >"$WORK/broker.out" 2>/dev/null &
  BROKER_PID=$!
  for _ in $(seq 150); do grep -q bootstrap= "$WORK/broker.out" 2>/dev/null && break; sleep 0.2; done
  BROKERS="$(grep -m1 bootstrap= "$WORK/broker.out" | cut -d= -f2 || true)"
  [ -n "$BROKERS" ] || { echo "the embedded broker did not start" >&2; exit 1; }
  GATEBILL_BROKERS="$BROKERS" "$BASE_BIN" gen --events "$KAFKA_EVENTS" --accounts "$ACCOUNTS" --days 30 \
    --duplicates 0.01 --malformed 0 --no-accounts >/dev/null
}
stop_broker() {
  if [ -n "$BROKER_PID" ]; then
    kill "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=""
  fi
}

# The inputs and configuration files, once (bench.sh's).
printf '[worker]\nfile_batch_size = %s\n' "$BATCH" >"$WORK/dedupe.toml"
printf '[worker]\nbatch_size = 50000\n' >"$WORK/broker.toml"
printf '[kafka]\ntransactions = false\n[worker]\nbatch_size = 50000\n' >"$WORK/broker-notx.toml"
if [[ " $AB_ROWS " == *" core "* ]]; then
  echo "generating $CORE_EVENTS events over $ACCOUNTS accounts in $WORK ..."
  "$BASE_BIN" gen --events "$CORE_EVENTS" --accounts "$ACCOUNTS" --days 30 --duplicates 0.01 --malformed 0 \
    --output-file "$WORK/events.ndjson" >/dev/null
fi
# Both binaries in the page cache before the first run, so BASE (always
# first) does not pay for loading them.
cat "$BASE_BIN" "$NEW_BIN" >/dev/null

RESULTS="$WORK/results.tsv"
: >"$RESULTS"

# run_one ROW SIDE ROUND BIN: one measured replay; appends a line to RESULTS.
run_one() {
  local row="$1" side="$2" round="$3" bin="$4"
  local state="$WORK/state" bills="$WORK/bills.ndjson"
  local -a cmd env_brokers=()
  rm -rf "$state" "$bills" "$bills.dead-letters"
  case "$row" in
    core)
      cmd=("$bin" replay --config "$WORK/dedupe.toml" --input-file "$WORK/events.ndjson"
        --accounts-file "$WORK/events.accounts.ndjson" --output-file "$bills" --state-dir "$state")
      ;;
    kafka-tx | kafka-notx)
      start_broker
      env_brokers=("GATEBILL_BROKERS=$BROKERS")
      local config="$WORK/broker.toml"
      [ "$row" = kafka-notx ] && config="$WORK/broker-notx.toml"
      cmd=("$bin" replay --config "$config" --state-dir "$state" --metrics-address "")
      ;;
  esac
  sync
  local load
  load="$(cut -d' ' -f1 /proc/loadavg)"
  if ! env "${env_brokers[@]}" /usr/bin/time -f "%e %U %S %M" -o "$WORK/time" "${cmd[@]}" >"$WORK/out" 2>"$WORK/err"; then
    echo "$row $side round $round failed: ${cmd[*]}" >&2
    tail -n 30 "$WORK/err" >&2
    exit 1
  fi
  stop_broker
  local wall user sys rss_kb counts us_per_bill md5="-"
  read -r wall user sys rss_kb <"$WORK/time"
  counts="$(sed -nE 's/^replayed ([0-9]+) messages in .*: ([0-9]+) billed, ([0-9]+) duplicates, ([0-9]+) dead-lettered, ([0-9]+) bill records emitted.*/\1 \2 \3 \4 \5/p' "$WORK/out")"
  [ -n "$counts" ] || { echo "$row $side round $round: no summary line in its output:" >&2; cat "$WORK/out" >&2; exit 1; }
  us_per_bill="$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/err" | grep -oE 'cpu_us_per_bill=[0-9.]+' | tail -1 | cut -d= -f2 || true)"
  if [ "$row" = core ]; then
    md5="$(LC_ALL=C sort "$bills" | md5sum | cut -c1-12)"
  fi
  # shellcheck disable=SC2086 # counts: five numbers, one field each
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$side" "$round" $counts \
    "$user" "$sys" "$wall" "$rss_kb" "${us_per_bill:--}" "$md5" "$load" >>"$RESULTS"
  awk -F'\t' 'END { printf "  %-10s %-4s round %s: %s events, %s bills, user+sys %.2f s, wall %.2f s, peak RSS %.0f MB, %s us/bill, load %s\n",
    $1, $2, $3, $4, $8, $9 + $10, $11, $12 / 1024, $13, $15 }' "$RESULTS"
  rm -rf "$state" "$bills" "$bills.dead-letters"
}

echo "A/B: BASE=$BASE_BIN NEW=$NEW_BIN, $ROUNDS round(s), rows: $AB_ROWS"
[ "$BASE_BIN" = "$NEW_BIN" ] && echo "(BASE and NEW are the same file: an A/A run, its differences are noise)"
echo "machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg) at start"
STARTED=$SECONDS
for row in $AB_ROWS; do
  echo "row $row:"
  for round in $(seq "$ROUNDS"); do
    run_one "$row" BASE "$round" "$BASE_BIN"
    run_one "$row" NEW "$round" "$NEW_BIN"
  done
done
echo "all runs took $((SECONDS - STARTED)) s; load average $(cut -d' ' -f1-3 /proc/loadavg) at the end"
echo

python3 - "$RESULTS" "$BASE_BIN" "$NEW_BIN" <<'PY'
import statistics
import sys

path, base_bin, new_bin = sys.argv[1:4]
cols = ["row", "side", "round", "events", "billed", "duplicates", "dead", "bills",
        "user", "sys", "wall", "rss_kb", "us_per_bill", "md5", "load"]
runs = [dict(zip(cols, line.rstrip("\n").split("\t"))) for line in open(path)]
for r in runs:
    r["cpu"] = float(r["user"]) + float(r["sys"])
    r["wall"] = float(r["wall"])
    r["rss_mb"] = int(r["rss_kb"]) / 1024
    r["us"] = None if r["us_per_bill"] == "-" else float(r["us_per_bill"])

print(f"BASE = {base_bin}\nNEW  = {new_bin}\n")
print("| row | binary | round | events | bills | user+sys s | wall s | peak RSS MB | us/bill | load |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for r in runs:
    us = "-" if r["us"] is None else f"{r['us']:.1f}"
    print(f"| {r['row']} | {r['side']} | {r['round']} | {r['events']} | {r['bills']} | {r['cpu']:.2f} "
          f"| {r['wall']:.2f} | {r['rss_mb']:.0f} | {us} | {r['load']} |")

def spread(xs):
    return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 and statistics.median(xs) else None

def pct(x):
    return "-" if x is None else f"{100 * x:+.1f}%"

print("\nMedians per row (diff = (NEW - BASE) / BASE; spread = (max - min) / median of that side's runs):\n")
print("| row | measure | BASE | NEW | diff | BASE spread | NEW spread |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
ok = True
rows = list(dict.fromkeys(r["row"] for r in runs))
for row in rows:
    mine = [r for r in runs if r["row"] == row]
    for key, name, fmt in [("cpu", "user+sys s", "{:.2f}"), ("wall", "wall s", "{:.2f}"),
                           ("rss_mb", "peak RSS MB", "{:.0f}"), ("us", "us per bill", "{:.1f}")]:
        b = [r[key] for r in mine if r["side"] == "BASE" and r[key] is not None]
        n = [r[key] for r in mine if r["side"] == "NEW" and r[key] is not None]
        if not b or not n:
            continue
        mb, mn = statistics.median(b), statistics.median(n)
        print(f"| {row} | {name} | {fmt.format(mb)} | {fmt.format(mn)} | {pct((mn - mb) / mb if mb else None)} "
              f"| {pct(spread(b))} | {pct(spread(n))} |")

print()
for row in rows:
    mine = [r for r in runs if r["row"] == row]
    counts = {(r["events"], r["billed"], r["duplicates"], r["dead"], r["bills"]) for r in mine}
    if len(counts) == 1:
        e, bi, d, x, bl = next(iter(counts))
        line = f"{row}: every run read {e} messages: {bi} billed, {d} duplicates, {x} dead-lettered, {bl} bills"
    else:
        ok = False
        line = f"{row}: COUNTS DIFFER between runs: " + "; ".join(
            f"{r['side']} {r['round']}: {r['events']}/{r['billed']}/{r['duplicates']}/{r['dead']}/{r['bills']}" for r in mine)
    md5s = {r["md5"] for r in mine if r["md5"] != "-"}
    if len(md5s) == 1:
        line += f"; bills identical in every run (sorted, md5 {next(iter(md5s))}...)"
    elif len(md5s) > 1:
        ok = False
        line += "; BILLS DIFFER between runs: " + ", ".join(f"{r['side']} {r['round']} {r['md5']}" for r in mine)
    print(line)
sys.exit(0 if ok else 1)
PY

#!/usr/bin/env bash
# The changelog row pair of issue 27 ("Done when" 1 and 4): the same stream
# with event times over 1 day and over 30 days, each billed by `gatebill run`
# (transactions on, the default) on tansu; what the changelog costs per event
# and what a restore from it costs.
#
#   scripts/changelog-rows.sh [BIN]      # BIN: default the release build in
#                                        # $CARGO_TARGET_DIR (built if absent)
#   EVENTS=2000000 (default)             # events per stream
#   ACCOUNTS=2000 PARTITIONS=8 (defaults)
#   QUIET=6                              # s without a commit that ends a stream
#   KEEP=1                               # keep the work directory (logs)
#
# Sourced (bench.sh): defines `changelog_rows BIN EVENTS PARTITIONS WORK`,
# which sets CHANGELOG_TABLE (markdown) and CHANGELOG_COMMAND; it needs tansu
# in GATEBILL_TANSU or on the PATH (scripts/setup.sh), curl, and leaves the
# ids of what it started in CL_PIDS while they run (kill them in a trap).
#
# Per stream, on a tansu of its own (memory storage, so the two changelogs
# are separate): `gen` writes EVENTS events over ACCOUNTS accounts (--skew 0,
# --duplicates 0, --malformed 0, --days 1 or 30) into an input topic of
# PARTITIONS partitions; the input topic is read back and counted (tansu's
# end offsets stop short of the log's end, so nothing here trusts them:
# `count-topic --until-idle` reads until nothing more comes). A `run` worker
# with a fresh state directory and a group of its own bills it; its /metrics
# is polled every 0.2 s until gatebill_events_consumed_total reaches the
# count read back and nothing was committed or produced for QUIET s; then
# SIGTERM. Its CPU is read from /proc/PID/stat (utime + stime, every thread):
#   CPU per event    from the last poll before the first event was consumed
#                    to the last poll at which a counter (events consumed,
#                    transactions committed, records produced) still moved:
#                    the stream's work, without the group join or idling
#   whole process    from the start to just before the SIGTERM (the stop's
#                    own work, after the SIGTERM, is in neither)
# The changelog topic is then read back (read_committed) and its records and
# key + value bytes counted. A second `run` worker with an empty state
# directory joins the same group and restores every partition; the rates sum
# its "partition restored from the changelog" log lines (records, bytes,
# account_months, seconds): records/s = records / seconds summed over the
# partitions, as scripts/bench.sh's restore line does.
#
# About 3.5 minutes at 2,000,000 events on 2 cores (each `run` waits about
# 23 s for tansu to assign it the partitions). Changelog records and bytes
# vary by a few % between runs (batches form as messages arrive); CPU per
# event by 10-15% on a machine shared with builds.

CL_PIDS=""

# cl_fail MESSAGE [LOG...]: says what failed, with the last lines of each LOG.
cl_fail() {
  local msg="$1"; shift
  echo "changelog-rows: $msg" >&2
  for log in "$@"; do
    [ -f "$log" ] && { echo "--- last lines of $log:" >&2; sed 's/\x1b\[[0-9;]*m//g' "$log" | tail -20 >&2; }
  done
  return 1
}

# cl_port: a free TCP port on 127.0.0.1.
cl_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 20000))
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }
  done
}

# cl_cpu PID: CPU seconds (user + system, every thread) of PID so far.
cl_cpu() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  # Fields after the parenthesised command name: state is the 1st, utime the 12th, stime the 13th.
  awk -v hz="$CL_HZ" '{ printf "%.2f", ($12 + $13) / hz }' <<<"${stat##*) }"
}

# cl_counters PORT: "consumed committed produced aborted" from the worker's
# /metrics (0 0 0 0 while it does not answer).
cl_counters() {
  curl -s --max-time 2 "http://127.0.0.1:$1/metrics" 2>/dev/null | awk '
    $1 == "gatebill_events_consumed_total" { c = $2 }
    $1 == "gatebill_transactions_total{outcome=\"committed\"}" { t = $2 }
    $1 == "gatebill_transactions_total{outcome=\"aborted\"}" { a = $2 }
    $1 ~ /^gatebill_records_produced_total\{/ { p += $2 }
    END { printf "%d %d %d %d\n", c, t, p, a }'
}

# cl_count BIN CONFIG TOPIC: "MESSAGES BYTES" read back from TOPIC, to the
# end of what the broker delivers.
cl_count() {
  local out
  out="$("$1" count-topic --config "$2" --topic "$3" --until-idle 3 2>/dev/null)" || return 1
  sed -nE 's/^counted ([0-9]+) of [0-9]+ messages \(([0-9]+) bytes.*/\1 \2/p' <<<"$out"
}

# cl_worker BIN CONFIG DIR N: starts `run` worker N (state directory
# DIR/stateN, output DIR/runN.out and .log) in the stream's group with its
# metrics on a free port; sets pid and mport, and CL_PIDS to the stream's
# tansu (tansu_pid, the caller's) and this worker.
cl_worker() {
  mport="$(cl_port)"
  "$1" run --config "$2" --state-dir "$3/state$4" --group-id changelog-rows --metrics-address "127.0.0.1:$mport" \
    >"$3/run$4.out" 2>"$3/run$4.log" &
  pid=$!
  CL_PIDS="$tansu_pid $pid"
}

# cl_stream BIN EVENTS PARTITIONS DAYS DIR: one stream, start to restore;
# appends its row to CL_ROWS and its figures to CL_FIGURES.
cl_stream() {
  local bin="$1" events="$2" partitions="$3" days="$4" dir="$5"
  local tansu port mport cfg pid started
  started=$SECONDS
  mkdir -p "$dir"
  tansu="${GATEBILL_TANSU:-$(command -v tansu || true)}"
  [ -x "$tansu" ] || cl_fail "no tansu (GATEBILL_TANSU or the PATH; scripts/setup.sh installs it)" || return 1
  port="$(cl_port)"
  "$tansu" broker --storage-engine memory://tansu/ --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" >"$dir/tansu.log" 2>&1 &
  local tansu_pid=$!
  CL_PIDS="$tansu_pid"
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  cfg="$dir/gatebill.toml"
  printf '[kafka]\nbrokers = "127.0.0.1:%s"\npartitions = %s\n' "$port" "$partitions" >"$cfg"

  echo "  $days day(s): generating $events events over $ACCOUNTS accounts into tansu ($partitions partitions) ..." >&2
  "$bin" gen --config "$cfg" --events "$events" --accounts "$ACCOUNTS" --skew 0 --days "$days" --duplicates 0 --malformed 0 \
    >"$dir/gen.out" 2>"$dir/gen.log" || cl_fail "gen failed" "$dir/gen.log" || return 1
  local wrote input input_bytes
  wrote="$(grep -oE '^wrote [0-9]+' "$dir/gen.out" | grep -oE '[0-9]+')"
  read -r input input_bytes < <(cl_count "$bin" "$cfg" gateway-events) || cl_fail "counting the input topic failed" || return 1
  [ "$input" = "$wrote" ] || echo "  note: gen wrote $wrote messages, $input read back from the input topic" >&2

  echo "  $days day(s): billing $input events with \`gatebill run\` ..." >&2
  cl_worker "$bin" "$cfg" "$dir" 1
  local consumed=0 committed=0 produced=0 aborted=0 cpu cpu0 cpu1 sig last_sig="" last_change=$SECONDS
  local deadline=$((SECONDS + ${RUN_TIMEOUT:-$((600 + events / 5000))}))
  cpu0="$(cl_cpu "$pid")"; cpu1="$cpu0"
  while :; do
    kill -0 "$pid" 2>/dev/null || cl_fail "the worker exited before billing every event" "$dir/run1.log" || return 1
    [ "$SECONDS" -lt "$deadline" ] || cl_fail "the worker consumed $consumed of $input events in time" "$dir/run1.log" || return 1
    cpu="$(cl_cpu "$pid")" || cl_fail "the worker exited before billing every event" "$dir/run1.log" || return 1
    read -r consumed committed produced aborted < <(cl_counters "$mport")
    sig="$consumed $committed $produced"
    if [ "$consumed" = 0 ]; then
      cpu0="$cpu"
    elif [ "$sig" != "$last_sig" ]; then
      cpu1="$cpu"; last_change=$SECONDS
    elif [ "$consumed" -ge "$input" ] && [ $((SECONDS - last_change)) -ge "${QUIET:-6}" ]; then
      break
    fi
    last_sig="$sig"
    sleep 0.2
  done
  local cpu_total
  cpu_total="$(cl_cpu "$pid")" || cl_fail "the worker exited before its SIGTERM" "$dir/run1.log" || return 1
  [ "$aborted" = 0 ] || echo "  note: the worker aborted $aborted transactions; tansu does not list aborted transactions, so their records count as read" >&2
  kill -TERM "$pid"
  local rc=0
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || echo "  note: the first worker exited with status $rc (see $dir/run1.log)" >&2

  local records bytes
  read -r records bytes < <(cl_count "$bin" "$cfg" gatebill-changelog) || cl_fail "counting the changelog failed" || return 1

  echo "  $days day(s): restoring $records changelog records into an empty state directory ..." >&2
  cl_worker "$bin" "$cfg" "$dir" 2
  deadline=$((SECONDS + ${RESTORE_TIMEOUT:-900}))
  until [ "$(sed 's/\x1b\[[0-9;]*m//g' "$dir/run2.log" | grep -c 'partition restored from the changelog')" -ge "$partitions" ]; do
    kill -0 "$pid" 2>/dev/null || cl_fail "the restoring worker exited" "$dir/run2.log" || return 1
    [ "$SECONDS" -lt "$deadline" ] || cl_fail "the restoring worker did not restore $partitions partitions in time" "$dir/run2.log" || return 1
    sleep 0.2
  done
  kill -TERM "$pid"
  rc=0
  wait "$pid" || rc=$?
  [ "$rc" = 0 ] || echo "  note: the restoring worker exited with status $rc (see $dir/run2.log)" >&2
  kill "$tansu_pid" 2>/dev/null || true
  wait "$tansu_pid" 2>/dev/null || true
  CL_PIDS=""

  local restore
  restore="$(sed 's/\x1b\[[0-9;]*m//g' "$dir/run2.log" | awk '/partition restored from the changelog/ {
      for (i = 1; i <= NF; i++) { split($i, kv, "="); if (kv[1] == "account_months") m += kv[2]; if (kv[1] == "seconds") s += kv[2]; if (kv[1] == "records") r += kv[2]; if (kv[1] == "bytes") b += kv[2] }
      n++ }
    END { printf "%d %d %d %d %.3f\n", n, r, b, m, s }')"
  local n_restored r_records r_bytes r_months r_secs
  read -r n_restored r_records r_bytes r_months r_secs <<<"$restore"
  local label="$days days"
  [ "$days" = 1 ] && label="1 day"
  CL_ROWS+=("$(awk -v l="$label" -v n="$consumed" -v r="$records" -v b="$bytes" -v c0="$cpu0" -v c1="$cpu1" -v ct="$cpu_total" \
    -v rr="$r_records" -v rm="$r_months" -v rs="$r_secs" '
    function rate(x) { return rs > 0 ? sprintf("%.0f", x / rs) : "-" }
    BEGIN { printf "| %s | %d | %d | %.1f MB | %.1f | %.2f s | %.2f s | %s | %s |", l, n, r, b / 1e6, b / n, (c1 - c0) / (n / 1e6), ct / (n / 1e6), rate(rr), rate(rm) }')")
  CL_FIGURES+=("$(awk -v n="$consumed" -v b="$bytes" -v c0="$cpu0" -v c1="$cpu1" 'BEGIN { printf "%.6f %.6f", b / n, (c1 - c0) / n * 1e6 }')")
  CL_NOTES+=("$label: input topic $input messages, $input_bytes bytes of keys and values read back (gen wrote $wrote); worker: $consumed consumed, $committed transactions committed, $aborted aborted, CPU $cpu0 s before the first event, $cpu1 s at the last commit, $cpu_total s before the SIGTERM; restore: $n_restored partitions, $r_records records, $r_bytes bytes, $r_months account-months in $r_secs s; $((SECONDS - started)) s for the stream.")
  echo "${CL_ROWS[-1]}" >&2
}

# changelog_rows BIN EVENTS PARTITIONS WORK: both streams; sets
# CHANGELOG_TABLE and CHANGELOG_COMMAND.
changelog_rows() {
  local bin="$1" events="$2" partitions="$3" work="$4"
  ACCOUNTS="${ACCOUNTS:-2000}"
  CL_HZ="$(getconf CLK_TCK)"
  CL_ROWS=() CL_FIGURES=() CL_NOTES=()
  "$bin" count-topic --help | grep -q -- --until-idle ||
    cl_fail "$bin count-topic has no --until-idle (needed to read tansu's logs to their ends)" || return 1
  cl_stream "$bin" "$events" "$partitions" 1 "$work/1d" || return 1
  cl_stream "$bin" "$events" "$partitions" 30 "$work/30d" || return 1
  local ratios
  ratios="$(awk -v a="${CL_FIGURES[0]}" -v b="${CL_FIGURES[1]}" 'BEGIN { split(a, x, " "); split(b, y, " ");
    printf "30 days / 1 day: changelog bytes per event %.2fx, worker CPU per event %.2fx (issue 27 asks at most 40 bytes per event over 30 days, and at most 1.25x for each).", y[1] / x[1], y[2] / x[2] }')"
  CHANGELOG_COMMAND="EVENTS=$events ACCOUNTS=$ACCOUNTS PARTITIONS=$partitions QUIET=${QUIET:-6} scripts/changelog-rows.sh $bin"
  CHANGELOG_TABLE="$(
    echo "| events spread over | events read | changelog records | changelog bytes | bytes per event | worker CPU per million events | whole process CPU per million events | restore records/s | restore account-months/s |"
    echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    printf '%s\n' "${CL_ROWS[@]}"
    echo
    echo "$ratios"
    echo
    printf '%s\n\n' "${CL_NOTES[@]}"
    echo "Command: \`$CHANGELOG_COMMAND\`"
  )"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  cd "$(dirname "$0")/.."
  # shellcheck source=scripts/setup.sh
  . scripts/setup.sh
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
  BIN="${1:-$CARGO_TARGET_DIR/release/gatebill}"
  if [ -z "${1:-}" ] && [ ! -x "$BIN" ]; then
    cargo build --locked --release --bin gatebill
  fi
  [ -x "$BIN" ] || { echo "no gatebill binary at $BIN" >&2; exit 1; }
  WORK="$(mktemp -d)"
  trap 'kill $CL_PIDS 2>/dev/null || true; if [ "${KEEP:-0}" = 1 ]; then echo "work directory kept: $WORK" >&2; else rm -rf "$WORK"; fi' EXIT
  started=$SECONDS
  changelog_rows "$BIN" "${EVENTS:-2000000}" "${PARTITIONS:-8}" "$WORK"
  echo
  echo "Changelog rows, $(date -u +%Y-%m-%d), $(nproc) cores, $(uname -sr); gatebill at $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' (src modified)'), binary $BIN built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M UTC'); tansu $("${GATEBILL_TANSU:-tansu}" --version 2>/dev/null | awk '{ print $2 }'); $((SECONDS - started)) s in all"
  echo
  echo "$CHANGELOG_TABLE"
fi

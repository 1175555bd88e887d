#!/usr/bin/env bash
# The README's `gatebill explain` example: four events of the seed account
# around the end of its free tier (2020-11-10 23:59:59, Asia/Shanghai) and a
# bytes pack, replayed from files into a fresh state directory, then
# explained. Prints what the README shows.
#
#   scripts/explain-example.sh          # keeps nothing (a temporary directory)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/gatebill-target}"
cargo build --quiet --locked
BIN="$CARGO_TARGET_DIR/debug/gatebill"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
event() { # id region time frontend_error response_bytes
  printf '{"request_id":"%s","account_id":"A","region":"%s","time":"%s","client_network":"public","frontend_error":%s,"request_bytes":100,"response_bytes":%s,"backend":{"type":"mock"}}\n' "$@"
}
{
  event r1 ap-guangzhou 2020-11-10T23:59:59.900+08:00 false 700000000
  event r2 ap-guangzhou 2020-11-11T00:00:00.000+08:00 false 900000000
  event r3 ap-beijing 2020-11-11T00:20:00+08:00 true 0
  event r4 ap-guangzhou 2020-11-20T10:00:00+08:00 false 1500000000
} >events.ndjson
echo '{"account_id": "A", "activated_at": "2019-11-10T17:13:14+08:00", "resource_packs": [{"id": "pk-1", "item": "public_out_bytes", "quantity": 1000000000, "valid_from": "2020-11-01T00:00:00+08:00", "valid_until": "2020-12-01T00:00:00+08:00"}]}' >accounts.ndjson
RUST_LOG=warn "$BIN" replay --input-file events.ndjson --accounts-file accounts.ndjson --output-file bills.ndjson --state-dir state >/dev/null
echo '$ gatebill explain A 2020-11 --state-dir state'
"$BIN" explain A 2020-11 --state-dir state

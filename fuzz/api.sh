#!/usr/bin/env bash
# Fuzzes the coordinator's HTTP API from its own OpenAPI document with
# schemathesis (PyPI): a real coordinator on 127.0.0.1, every operation with
# generated and mutated requests, checked for no 5xx, answers that match the
# document, bad input refused and the token required where it is declared;
# and the coordinator still up at the end.
#
# Every check but one: `positive_data_acceptance` expects every request the
# document allows to be accepted, but the document cannot say every rule the
# coordinator checks (printable addresses, distinct origins, label keys,
# integer sizes written as 168.0), so such requests get a clear 400/422 by
# design.
#
# Usage: fuzz/api.sh [SECONDS]   (default 120)
# Needs schemathesis (`pip install schemathesis`, or SCHEMATHESIS=/path/to/it).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-120}
st=${SCHEMATHESIS:-schemathesis}
cargo build -q -p virtman
dir=$(mktemp -d)
token=api-fuzz-token-0123456789abcdef
echo "$token" >"$dir/token"
target/debug/virtman coordinator --listen 127.0.0.1:0 --data-dir "$dir/state" \
    --token-file "$dir/token" >"$dir/out" 2>"$dir/log" &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
url=
for _ in $(seq 100); do
    url=$(sed -n 's/^listening on //p' "$dir/out")
    [ -n "$url" ] && break
    sleep 0.1
done
[ -n "$url" ] || { echo "the coordinator did not start:"; cat "$dir/log"; exit 1; }
"$st" run "$url/v1/openapi.json" \
    --checks all \
    --exclude-checks positive_data_acceptance \
    --header "Authorization: Bearer $token" \
    --max-time "$secs" \
    --workers 2 \
    --suppress-health-check all
# The coordinator must have survived it.
kill -0 "$pid"
echo "the coordinator is still up"

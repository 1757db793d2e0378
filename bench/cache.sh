#!/usr/bin/env bash
# Cache group benchmark (not a test): warm reads through a cached volume's
# export and a snapshot's export against the raw file served by qemu-nbd,
# with fio (4 KiB random reads at queue depth 16, 1 MiB sequential reads),
# one run each, side by side; and the cold fill rate from a local file
# upstream at several chunk sizes.
#
# Usage: bench/cache.sh [IMAGE_MIB] [RUNTIME_S]      (defaults: 1024, 10)
# Needs: fio with the nbd engine, qemu-nbd. Builds a release example.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${1:-1024}
RUNTIME=${2:-10}
WORK=$(mktemp -d /tmp/virtman-cache-bench.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

cargo build --release -q -p virtman-cache --example cache_bench
BIN=target/release/examples/cache_bench

echo "# image: $SIZE_MIB MiB of random bytes"
head -c $((SIZE_MIB << 20)) /dev/urandom > "$WORK/img.raw"

echo "# cold fill from a local file upstream (page-cached source), by chunk size"
for cs in 65536 262144 1048576; do
    "$BIN" "$WORK/img.raw" "$WORK/g$cs" "$cs"
    rm -rf "$WORK/g$cs"
done

CHUNK=${CHUNK:-262144}
VPORT=10941
QPORT=10942
mkfifo "$WORK/stdin"
"$BIN" "$WORK/img.raw" "$WORK/g" "$CHUNK" "$VPORT" < "$WORK/stdin" > "$WORK/serve.log" &
PIDS+=($!)
exec 9> "$WORK/stdin"   # closing fd 9 stops the server
qemu-nbd -r -f raw -x raw -b 127.0.0.1 -p "$QPORT" -t -e 64 "$WORK/img.raw" &
PIDS+=($!)
for _ in $(seq 600); do
    grep -q serving "$WORK/serve.log" 2>/dev/null && break
    sleep 0.1
done
cat "$WORK/serve.log"

run_fio() { # uri rw bs depth -> "iops MB/s"
    fio --name=b --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
        --size=$((SIZE_MIB << 20)) --runtime="$RUNTIME" --time_based --output-format=json \
        2>/dev/null | python3 -c '
import json,sys
t=sys.stdin.read()
r=json.loads(t[t.index("{"):])["jobs"][0]["read"]
print("%.0f %.1f" % (r["iops"], r["bw_bytes"]/1e6))'
}

echo
printf "%-28s %-10s %12s %10s %8s\n" test target IOPS MB/s ratio
for spec in "randread 4k 16" "read 1m 4"; do
    set -- $spec
    base=$(run_fio "nbd://127.0.0.1:$QPORT/raw" "$1" "$2" "$3")
    for t in raw vol snap; do
        case $t in
            raw) r=$base ;;
            vol) r=$(run_fio "nbd://127.0.0.1:$VPORT/vol" "$1" "$2" "$3") ;;
            snap) r=$(run_fio "nbd://127.0.0.1:$VPORT/snap" "$1" "$2" "$3") ;;
        esac
        ratio=$(python3 -c "print('%.2f' % (float('$r'.split()[1]) / float('$base'.split()[1])))")
        printf "%-28s %-10s %12s %10s %8s\n" "$1 bs=$2 qd=$3" "$t" ${r% *} ${r#* } "$ratio"
    done
done
exec 9>&-

echo
echo "# cold fill through the NBD export: nbdcopy of a cold volume (chunk $CHUNK) to null:"
mkfifo "$WORK/stdin2"
"$BIN" "$WORK/img.raw" "$WORK/gc" "$CHUNK" $((VPORT + 10)) cold < "$WORK/stdin2" > "$WORK/cold.log" &
PIDS+=($!)
exec 8> "$WORK/stdin2"
for _ in $(seq 600); do
    grep -q serving "$WORK/cold.log" 2>/dev/null && break
    sleep 0.1
done
t0=$(date +%s.%N)
nbdcopy "nbd://127.0.0.1:$((VPORT + 10))/vol" null:
t1=$(date +%s.%N)
python3 -c "print('cold fill via nbdcopy: %.0f MB/s' % ($SIZE_MIB * 1048576 / 1e6 / ($t1 - $t0)))"
exec 8>&-

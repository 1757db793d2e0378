#!/usr/bin/env bash
# Export throughput: virtman serve vs qemu-nbd (-e 64) vs nbdkit (file plugin),
# serving the same warm file, measured with fio's nbd engine in one run.
#
#   bench/nbd-export.sh [--tls] [SIZE_MIB] [SECONDS] [REPEATS]
#
# Prints one table: IOPS (4 KiB random reads at depth 1 and 16) and MiB/s
# (1 MiB sequential reads at depth 4) per server, and virtman's ratio to the
# best of the two peers. With --tls every server requires TLS (certificates
# from `virtman pki`; fio reads nbds:// URIs), and a fourth column is virtman
# without TLS, so the table also shows what TLS costs. Client certificates are
# not asked for: fio's libnbd refuses a certificate directory in a URI. The servers take turns per row and the best of
# REPEATS runs counts, so a noisy neighbour hurts all alike. Servers bind
# 127.0.0.1 only and are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
tls=0
if [ "${1:-}" = --tls ]; then tls=1; shift; fi
size_mib=${1:-1024}
secs=${2:-10}
repeats=${3:-3}

for t in fio qemu-nbd nbdkit python3; do
  command -v "$t" >/dev/null || { echo "missing $t: apt-get install fio qemu-utils nbdkit" >&2; exit 1; }
done
cargo build --release -q -p virtman
bin=target/release/virtman

work=$(mktemp -d /tmp/virtman-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

img=$work/disk.raw
head -c $((size_mib * 1024 * 1024)) /dev/urandom > "$img"
cat "$img" > /dev/null   # warm the page cache

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; exit 1; }

virtman_tls=() qemu_tls=() nbdkit_tls=() scheme=nbd
if [ "$tls" = 1 ]; then
  $bin pki init "$work/ca" >/dev/null
  $bin pki issue "$work/ca" --name server --ip 127.0.0.1 --out "$work/server" >/dev/null
  virtman_tls=(--tls "$work/server")
  qemu_tls=(--object "tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=$work/server" --tls-creds tls0)
  nbdkit_tls=(--tls=require "--tls-certificates=$work/server")
  scheme=nbds
fi
p_virtman=$(free_port)
VIRTMAN_LOG=warn $bin serve "$img" --read-only --name disk --listen 127.0.0.1:$p_virtman "${virtman_tls[@]}" & pids+=($!)
p_qemu=$(free_port)
qemu-nbd -r -t -e 64 -f raw -x disk -b 127.0.0.1 -p "$p_qemu" "${qemu_tls[@]}" "$img" & pids+=($!)
p_nbdkit=$(free_port)
nbdkit -f -r -e disk -i 127.0.0.1 -p "$p_nbdkit" "${nbdkit_tls[@]}" file "file=$img" & pids+=($!)
wait_port "$p_virtman"; wait_port "$p_qemu"; wait_port "$p_nbdkit"
servers=(virtman qemu nbdkit)
if [ "$tls" = 1 ]; then
  p_plain=$(free_port)
  VIRTMAN_LOG=warn $bin serve "$img" --read-only --name disk --listen 127.0.0.1:$p_plain & pids+=($!)
  wait_port "$p_plain"
  servers+=(plain)
fi

# run_fio SERVER RW BS DEPTH -> prints "iops bw_mib"
run_fio() {
  local port_var=p_$1 uri
  uri="$scheme://127.0.0.1:${!port_var}/disk"
  [ "$1" = plain ] && uri="nbd://127.0.0.1:${!port_var}/disk"
  # Re-warm before every run: this VM reclaims idle page cache proactively
  # (DAMON), which otherwise turns "warm" runs into partly cold ones.
  cat "$img" > /dev/null
  fio --name=bench --ioengine=nbd --uri="$uri" --rw="$2" --bs="$3" \
      --iodepth="$4" --size="${size_mib}M" --time_based --runtime="$secs" --ramp_time=1 \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); r=json.loads(t[t.index("{"):])["jobs"][0]["read"]; print(r["iops"], r["bw"]/1024)'
}

rows=("randread 4k 1 iops" "randread 4k 16 iops" "read 1m 4 mib")
if [ "$tls" = 1 ]; then
  printf '%-26s %12s %12s %12s %8s %14s %10s\n' "workload (TLS)" "virtman" "qemu-nbd" "nbdkit" "ratio" "virtman plain" "TLS cost"
else
  printf '%-26s %12s %12s %12s %8s\n' "workload" "virtman" "qemu-nbd" "nbdkit" "ratio"
fi
for row in "${rows[@]}"; do
  set -- $row
  rw=$1 bs=$2 depth=$3 unit=$4
  declare -A best=([virtman]=0 [qemu]=0 [nbdkit]=0 [plain]=0)
  for _ in $(seq "$repeats"); do
    for srv in "${servers[@]}"; do
      read -r iops mib < <(run_fio "$srv" "$rw" "$bs" "$depth")
      v=$([ "$unit" = iops ] && echo "$iops" || echo "$mib")
      best[$srv]=$(python3 -c "print(max(float('${best[$srv]}'), float('$v')))")
    done
  done
  ratio=$(python3 -c "print(f'{${best[virtman]} / max(${best[qemu]}, ${best[nbdkit]}):.2f}x')")
  label="$rw $bs qd$depth ($unit)"
  if [ "$tls" = 1 ]; then
    cost=$(python3 -c "print(f'{${best[virtman]} / ${best[plain]}:.2f}x')")
    printf '%-26s %12.0f %12.0f %12.0f %8s %14.0f %10s\n' "$label" "${best[virtman]}" "${best[qemu]}" "${best[nbdkit]}" "$ratio" "${best[plain]}" "$cost"
  else
    printf '%-26s %12.0f %12.0f %12.0f %8s\n' "$label" "${best[virtman]}" "${best[qemu]}" "${best[nbdkit]}" "$ratio"
  fi
done

#!/usr/bin/env bash
# Hierarchical attaching benchmarks (not tests), each side by side in one run:
#
# 1. Relay chain: the leaf of a chain of 1 and of 4 hosts reads a working set
#    cold (crates/agent/examples/chain_bench.rs: real cached volumes and NBD
#    over loopback, one process, so the hosts share this machine's cores).
# 2. Real boot through the tree: the test guest (crates/testkit) boots from a
#    VM snapshot on a host two levels below the origin, cold (nothing cached
#    anywhere) and warm (a second VM on the same host), against the same guest
#    booting from the raw disk served by `qemu-nbd -e 64`.
#
#   bench/tree.sh [WORKING_SET_MIB] [BOOTS]      (defaults 256, 3)
#
# Everything binds 127.0.0.1 or sockets in a temporary directory and is stopped
# on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
mib=${1:-256}
boots=${2:-3}

cargo build --release -q -p virtman
cargo build --release -q -p virtman-agent --example chain_bench
echo "== relay chain"
target/release/examples/chain_bench "$mib" 1 4

assets=target/guest-assets
mkdir -p "$assets"
if ! cmp -s crates/testkit/guest/build.sh "$assets/build.sh.stamp" || [ ! -f "$assets/disk.raw" ]; then
  flock "$assets/.lock" bash crates/testkit/guest/build.sh "$assets" >&2
fi
v=target/release/virtman
work=$(mktemp -d /tmp/virtman-tree.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

wait_line() { for _ in $(seq 300); do grep -q "listening on" "$1" 2>/dev/null && return 0; sleep 0.05; done; cat "$1"; exit 1; }
echo "bench-token-0123456789abcdef" > "$work/token"
$v image import "$assets/disk.raw" --name guest --store "$work/origin/images" >/dev/null
$v coordinator --listen 127.0.0.1:0 --data-dir "$work/coord" --token-file "$work/token" --fanout 2 >"$work/coord.out" 2>&1 & pids+=($!)
wait_line "$work/coord.out"
url=$(sed -n 's/^listening on //p' "$work/coord.out" | head -1)
agent() {
  $v agent --coordinator "$url" --token-file "$work/token" --data-dir "$work/$1" \
    --listen 127.0.0.1:0 --name "$1" --cache-size 1G >"$work/$1.out" 2>&1 & pids+=($!)
  wait_line "$work/$1.out"
}
agent origin; agent a1; agent a2; agent a3
$v vm create v1 --image guest --data-dir "$work/a1" >/dev/null
$v vm create v2 --image guest --data-dir "$work/a2" >/dev/null
cp "$assets/disk.raw" "$work/raw.raw"
qemu-nbd -e 64 -t -f raw -x disk --socket "$work/qemu-nbd.sock" "$work/raw.raw" 2>/dev/null & pids+=($!)
for _ in $(seq 100); do [ -S "$work/qemu-nbd.sock" ] && break; sleep 0.05; done

# boot URI -> prints milliseconds to VIRTMAN-DONE
boot() {
  local start end="" line
  start=$(date +%s%N)
  while IFS= read -r line; do
    case $line in *VIRTMAN-DONE*) end=$(date +%s%N) ;; esac
  done < <(timeout 60 qemu-system-x86_64 -machine accel=tcg -m 256 -nodefaults -no-user-config \
    -display none -serial stdio -no-reboot -kernel "$assets/vmlinuz" -initrd "$assets/initrd.cpio" \
    -append "console=ttyS0 panic=-1 quiet" -drive "file=$1,format=raw,if=virtio,cache=none" </dev/null 2>&1)
  [ -n "$end" ] || { echo "boot from $1 failed" >&2; exit 1; }
  echo $(((end - start) / 1000000))
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "== real boot (ms to VIRTMAN-DONE, median of $boots)"
cold=() warm=() peer=()
for i in $(seq "$boots"); do
  # A fresh host at depth 2 each round: nothing of the image cached on it.
  host=c$i; agent "$host"
  uri=$($v vm create "cold$i" --image guest --data-dir "$work/$host")
  cold+=("$(boot "$uri")")
  uri=$($v vm create "warm$i" --image guest --data-dir "$work/$host")
  warm+=("$(boot "$uri")")
  peer+=("$(boot "nbd+unix:///disk?socket=$work/qemu-nbd.sock")")
done
c=$(printf '%s\n' "${cold[@]}" | median); w=$(printf '%s\n' "${warm[@]}" | median); p=$(printf '%s\n' "${peer[@]}" | median)
printf '%-34s %8s %8s\n' source ms "vs qemu-nbd"
printf '%-34s %8d %8.2fx\n' "virtman, cold, depth >= 2" "$c" "$(echo "$c / $p" | bc -l)"
printf '%-34s %8d %8.2fx\n' "virtman, warm (second VM)" "$w" "$(echo "$w / $p" | bc -l)"
printf '%-34s %8d %8.2fx\n' "qemu-nbd -e 64, raw file" "$p" 1
$v tree guest --coordinator "$url" | head -20

#!/usr/bin/env bash
# What each NBD server holds after a long mixed load: virtman serve vs
# qemu-nbd (-e 64) vs nbdkit (file plugin) on the same file, each given the
# same fio load (16 jobs at depth 8: random reads and writes of 4 KiB to
# 32 MiB, a third of them writes, for SECONDS), then left idle 5 s. Prints
# the most threads seen during the load and the RSS before, during and after.
#
#   bench/nbd-resources.sh [SIZE_MIB] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
size_mib=${1:-1024}
secs=${2:-20}
cargo build --release -q -p virtman
bin=target/release/virtman
work=$(mktemp -d /tmp/virtman-res.XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
img=$work/disk.raw
head -c $((size_mib * 1024 * 1024)) /dev/urandom > "$img"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; exit 1; }
field() { awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"; }

printf '%-9s %10s %14s %14s %13s\n' server "max thr" "RSS idle MiB" "RSS load MiB" "RSS after MiB"
for srv in virtman qemu-nbd nbdkit; do
  port=$(free_port)
  case $srv in
    virtman) VIRTMAN_LOG=warn $bin serve "$img" --name disk --listen 127.0.0.1:$port & pid=$! ;;
    qemu-nbd) qemu-nbd -t -e 64 -f raw -x disk -b 127.0.0.1 -p "$port" "$img" & pid=$! ;;
    nbdkit) nbdkit -f -e disk -i 127.0.0.1 -p "$port" file "file=$img" & pid=$! ;;
  esac
  wait_port "$port"; sleep 1
  idle=$(field $pid VmRSS)
  fio --name=mixed --ioengine=nbd --uri="nbd://127.0.0.1:$port/disk" --rw=randrw --rwmixread=67 \
      --bsrange=4k-32m --numjobs=16 --iodepth=8 --size="${size_mib}M" --time_based \
      --runtime="$secs" --group_reporting >/dev/null 2>&1 &
  fio_pid=$!
  most=0 load=0
  while kill -0 $fio_pid 2>/dev/null; do
    t=$(field $pid Threads); r=$(field $pid VmRSS)
    [ "${t:-0}" -gt "$most" ] && most=$t
    [ "${r:-0}" -gt "$load" ] && load=$r
    sleep 0.2
  done
  wait $fio_pid || true
  sleep 5
  after=$(field $pid VmRSS)
  printf '%-9s %10s %14.1f %14.1f %13.1f\n' "$srv" "$most" "$(echo "$idle/1024" | bc -l)" "$(echo "$load/1024" | bc -l)" "$(echo "$after/1024" | bc -l)"
  kill $pid; wait $pid 2>/dev/null || true; pid=
done

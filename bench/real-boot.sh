#!/usr/bin/env bash
# Real boot (not a test): the test guest of crates/testkit (Debian cloud kernel,
# busybox initramfs, 16 MiB ext4 disk) booting under qemu (TCG) from
#   virtman   `virtman serve` (release build) over a unix socket,
#   qemu-nbd  `qemu-nbd -e 64` serving a copy of the same disk over a unix socket,
#   raw       the local raw file (-drive file=disk.raw),
# N times each, interleaved (one warm-up round first, not counted). Prints the
# median time from starting qemu to the guest's VIRTMAN-MARKER and VIRTMAN-DONE
# lines per source, and the ratios of the medians.
#
#   bench/real-boot.sh [N]        (default 5)
#   VIRTMAN_BIN=path/to/virtman bench/real-boot.sh [N]   (skip the release build)
#
# Needs qemu-system-x86, qemu-utils, and what crates/testkit/guest/build.sh
# needs (busybox-static, cpio, e2fsprogs, apt for the kernel .deb). Reuses the
# assets the tests built in target/guest-assets when they are current.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-5}
assets=target/guest-assets
work=$(mktemp -d /tmp/virtman-real-boot.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# VIRTMAN_BIN: a virtman binary to use instead of building target/release/virtman.
virtman=${VIRTMAN_BIN:-}
if [ -z "$virtman" ]; then
  cargo build --release -q -p virtman
  virtman=target/release/virtman
fi
mkdir -p "$assets"
if ! cmp -s crates/testkit/guest/build.sh "$assets/build.sh.stamp" ||
   [ ! -f "$assets/vmlinuz" ] || [ ! -f "$assets/initrd.cpio" ] || [ ! -f "$assets/disk.raw" ]; then
  # The same lock file the tests take (flock), so a test run does not race us.
  flock "$assets/.lock" bash crates/testkit/guest/build.sh "$assets" >&2
fi

for s in virtman qemu-nbd raw; do cp "$assets/disk.raw" "$work/$s.raw"; done
"$virtman" serve "$work/virtman.raw" --name disk --socket "$work/virtman.sock" \
  2>"$work/virtman.log" &
pids+=($!)
qemu-nbd -e 64 -t -f raw -x disk --socket "$work/qemu-nbd.sock" "$work/qemu-nbd.raw" \
  2>"$work/qemu-nbd.log" &
pids+=($!)
for s in virtman qemu-nbd; do
  for _ in $(seq 200); do [ -S "$work/$s.sock" ] && break; sleep 0.05; done
  [ -S "$work/$s.sock" ] || { echo "$s did not start:"; cat "$work/$s.log"; exit 1; }
done

drive() {
  case $1 in
    raw) echo "file=$work/raw.raw,format=raw,if=virtio,cache=writeback" ;;
    *) echo "file=nbd+unix:///disk?socket=$work/$1.sock,format=raw,if=virtio,cache=none" ;;
  esac
}

# boot SOURCE ID: prints "MARKER_MS DONE_MS".
boot() {
  local start line m="" d="" log="$work/console-$2.log"
  start=$(date +%s%N)
  while IFS= read -r line; do
    line=${line%$'\r'}
    printf '%s\n' "$line" >>"$log"
    case $line in
      *VIRTMAN-MARKER:*) [ -n "$m" ] || m=$((($(date +%s%N) - start) / 1000000)) ;;
      *VIRTMAN-DONE*) d=$((($(date +%s%N) - start) / 1000000)) ;;
    esac
  done < <(timeout 60 qemu-system-x86_64 -machine accel=tcg -m 256 -nodefaults \
    -no-user-config -display none -serial stdio -no-reboot \
    -kernel "$assets/vmlinuz" -initrd "$assets/initrd.cpio" \
    -append "console=ttyS0 panic=-1 quiet virtman.id=$2" -drive "$(drive "$1")" \
    </dev/null 2>&1)
  if [ -z "$m" ] || [ -z "$d" ]; then
    echo "boot $2 from $1 failed; console:" >&2
    cat "$log" >&2
    exit 1
  fi
  echo "$m $d"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

sources=(virtman qemu-nbd raw)
for s in "${sources[@]}"; do boot "$s" "warmup-$s" >/dev/null; done
for i in $(seq "$n"); do
  for s in "${sources[@]}"; do
    read -r m d < <(boot "$s" "$s-$i")
    echo "$m" >>"$work/$s.marker"
    echo "$d" >>"$work/$s.done"
    echo "round $i  $s: marker ${m} ms, done ${d} ms" >&2
  done
done

# Every boot's write landed in its own source's file.
for s in "${sources[@]}"; do
  got=$(/usr/sbin/debugfs -R "cat /boots.txt" "$work/$s.raw" 2>/dev/null | grep -c "^boot $s-" || true)
  [ "$got" -eq "$n" ] || { echo "$s: expected $n boot lines in boots.txt, found $got" >&2; exit 1; }
done

echo
echo "real boot: test guest under qemu TCG, $n boots per source, interleaved (medians)"
printf '%-10s %12s %12s\n' source marker_ms done_ms
for s in "${sources[@]}"; do
  printf '%-10s %12s %12s\n' "$s" "$(median <"$work/$s.marker")" "$(median <"$work/$s.done")"
done
v=$(median <"$work/virtman.done"); q=$(median <"$work/qemu-nbd.done"); r=$(median <"$work/raw.done")
echo
awk -v v="$v" -v q="$q" -v r="$r" 'BEGIN {
  printf "virtman / raw      = %.3f\n", v / r
  printf "qemu-nbd / raw     = %.3f\n", q / r
  printf "virtman / qemu-nbd = %.3f\n", v / q
}'

#!/usr/bin/env bash
# The time from `dpkg -i` to a host that serves its first VM (a measurement,
# not a test).
#
#   bench/install-to-first-vm.sh DEB [IMAGE_MIB]     (as root; default 1024)
#
# Before the clock: a coordinator and an origin holding a random image of
# IMAGE_MIB run on 127.0.0.1 from the package's binary unpacked elsewhere
# (they stand for the cluster's other machines). Then, timed from the start
# of `dpkg -i DEB`:
#   installed     dpkg -i done
#   agent ready   the agent, started as virtman-agent.service starts it
#                 (data dir /var/lib/virtman/agent; flags given here, as no
#                 systemd may run), has its exports and control socket up
#   vm created    `virtman vm create vm1 --image img` printed the VM's URI
#   first read    qemu-io read the image's first MiB through that URI: the
#                 host serves its first VM (the chunks came from the origin)
# Refuses to run over an installed virtman package or an existing
# /var/lib/virtman; purges the package, removes /var/lib/virtman and stops
# every process on exit.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 DEB [IMAGE_MIB]" >&2; exit 2; }
deb=$(realpath "$1")
mib=${2:-1024}
[ "$(id -u)" -eq 0 ] || { echo "$0: run as root (it installs $deb)" >&2; exit 1; }
command -v qemu-io >/dev/null || { echo "$0: qemu-io is missing (apt-get install qemu-utils)" >&2; exit 1; }
if dpkg-query -W -f='${Status}' virtman 2>/dev/null | grep -q installed; then
  echo "$0: a virtman package is installed; dpkg -P virtman first" >&2; exit 1
fi
[ ! -e /var/lib/virtman ] || { echo "$0: /var/lib/virtman exists; move it away first" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  dpkg -P virtman >/dev/null 2>&1 || true
  rm -rf /var/lib/virtman "$work"
}
trap cleanup EXIT

# Starts `BIN ARGS...` in the background, its stdout in $work/NAME.out, and
# waits for its `listening on` line; sets $addr to the address. (Not called
# in $(...): a subshell's `pids` would not reach `cleanup`.)
start() { # start NAME BIN ARGS...
  local name=$1; shift
  "$@" >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 600); do
    if grep -q '^listening on ' "$work/$name.out"; then
      addr=$(sed -n 's/^listening on \(http:\/\/\)\{0,1\}//p' "$work/$name.out" | head -1)
      return
    fi
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}

# The rest of the cluster, from the package's own binary.
dpkg-deb -x "$deb" "$work/pkg"
other="$work/pkg/usr/bin/virtman"
start coordinator "$other" coordinator --listen 127.0.0.1:0 --data-dir "$work/coord"
coord=$addr
head -c "$((mib * 1024 * 1024))" /dev/urandom >"$work/img.raw"
"$other" image import "$work/img.raw" --name img --store "$work/origin/images" >/dev/null 2>&1
start origin "$other" agent --data-dir "$work/origin" --listen 127.0.0.1:0 --name origin \
  --coordinator "http://$coord" --token-file "$work/coord/token"

now() { date +%s.%N; }
t0=$(now)
dpkg -i "$deb" >/dev/null
t_installed=$(now)
start host /usr/bin/virtman agent --data-dir /var/lib/virtman/agent --listen 127.0.0.1:0 \
  --name host1 --coordinator "http://$coord" --token-file "$work/coord/token" --cache-size 4G
t_agent=$(now)
uri=$(/usr/bin/virtman vm create vm1 --image img --data-dir /var/lib/virtman/agent | tail -1)
t_vm=$(now)
qemu-io -r -f raw -c 'read 0 1M' "$uri" >/dev/null
t_read=$(now)

since() { awk -v a="$t0" -v b="$1" 'BEGIN { printf "%6.2f s", b - a }'; }
echo "dpkg -i to a host serving its first VM ($(basename "$deb"), ${mib} MiB image):"
echo "  installed    $(since "$t_installed")"
echo "  agent ready  $(since "$t_agent")"
echo "  vm created   $(since "$t_vm")   $uri"
echo "  first read   $(since "$t_read")"

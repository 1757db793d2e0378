#!/usr/bin/env bash
# What an upload cap costs a storm: 16 hosts x 64 VMs in network namespaces
# at 1 Gbit/s, virtman mode, the shipped Debian trace (its own timing, and
# back to back), with every agent's upload capped to half its link
# (`--upload-rate 500M`) against uncapped, alternating, twice each.
#
# Usage: bench/caps.sh [OUT_DIR]   (root; builds the release binary first)
# Prints one line per run: the storm's time to the last boot and the p90.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/virtman-caps-bench}
mkdir -p "$out"
cargo build --release -q -p virtman
bin=$out/virtman
cp target/release/virtman "$bin"

run() {
    local name=$1
    shift
    flock /tmp/virtman-bench.lock "$bin" storm --netns --hosts 16 --vms 64 --mode virtman \
        --out "$out/$name" "$@" >"$out/$name.log" 2>&1 || {
        echo "$name: FAILED (see $out/$name.log)"
        return 0
    }
    awk -v n="$name" '/^virtman /{print n": all "$6" s, p90 "$5" s"}' "$out/$name.log"
}

for round in 1 2; do
    for timing in think b2b; do
        extra=()
        [ "$timing" = b2b ] && extra=(--back-to-back)
        run "uncapped-$timing-$round" "${extra[@]}"
        run "capped-$timing-$round" "${extra[@]}" --agent-arg=--upload-rate=500M
    done
done

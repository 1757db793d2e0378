#!/usr/bin/env bash
# Issue 6's storm benchmark: `virtman storm --mode all` with 8 and 16 hosts,
# 4 VMs per host, in network namespaces at 1 Gbit/s, with the shipped Debian
# boot trace replayed twice: with its own timing and back to back. Plus the
# base of the timing ratio: one VM alone reading straight from the origin over
# the same shaped link, and the virtman runs again without prefetch.
#
# Clusters run TLS between hosts (the default); the "-notls" runs leave it out.
#
# Usage: bench/storm.sh [OUT_DIR] [tls]   (root; builds the release binary first)
#   tls: only what TLS costs: 16 hosts x 64 VMs back to back in virtman mode,
#        with and without TLS, alternating, three times each.
# Every run takes /tmp/virtman-bench.lock so that no two benchmarks overlap.
# Prints one line per run; each run's report.json, boots.csv and chart.svg
# stay in OUT_DIR/NAME/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/virtman-storm-bench}
mkdir -p "$out"
cargo build --release -q -p virtman
bin=$out/virtman
cp target/release/virtman "$bin"

run() {
    local name=$1
    shift
    flock /tmp/virtman-bench.lock "$bin" storm --netns --out "$out/$name" "$@" >"$out/$name.log" 2>&1 || {
        echo "$name: FAILED (see $out/$name.log)"
        return 0
    }
    python3 - "$out/$name/report.json" "$name" <<'EOF'
import json, statistics, sys
for m in json.load(open(sys.argv[1])):
    boots = sorted(v["boot_secs"] for v in m["vm_results"])
    print(f'{sys.argv[2]:<10} {m["mode"]:<10} all {m["all_booted_secs"]:6.2f} s  '
          f'p50 {statistics.median(boots):6.2f} s  origin {m["origin_bytes"] / 2**20:7.1f} MiB '
          f'({m["origin_bytes"] / m["working_set"]:.2f}x WS)')
EOF
}

if [ "${2:-}" = tls ]; then
    for i in 1 2 3; do
        run "b16-tls-$i" --hosts 16 --vms 64 --mode virtman --back-to-back
        run "b16-notls-$i" --hosts 16 --vms 64 --mode virtman --back-to-back --no-tls
    done
    exit 0
fi

run single --hosts 1 --vms 1 --mode direct
for h in 8 16; do
    v=$((4 * h))
    run "t$h" --hosts "$h" --vms "$v" --mode all
    run "b$h" --hosts "$h" --vms "$v" --mode all --back-to-back
    run "b$h-notls" --hosts "$h" --vms "$v" --mode virtman --back-to-back --no-tls
    run "t$h-nopf" --hosts "$h" --vms "$v" --mode virtman --no-prefetch
    run "b$h-nopf" --hosts "$h" --vms "$v" --mode virtman --no-prefetch --back-to-back
done

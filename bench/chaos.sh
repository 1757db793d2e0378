#!/usr/bin/env bash
# Issue 14's chaos benchmark: the 16 x 64 namespace storm (the shipped Debian
# boot trace, back to back, virtman mode, 1 Gbit links, TLS) calm, then with
# `--chaos kill:25%@1s,stop:2@1.5s+3s`, with hedged fetches and without
# (`--agent-arg=--no-hedge`). Prints, per run, the time until every VM booted
# (or failed with its host), whether the promise held, and the longest and
# p99 read of VMs on hosts never hit.
#
# Usage: bench/chaos.sh [OUT_DIR] [SEED]   (root; builds the release binary first)
# Every run takes /tmp/virtman-bench.lock so that no two benchmarks overlap.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/virtman-chaos-bench}
seed=${2:-1}
mkdir -p "$out"
cargo build --release -q -p virtman
bin=$out/virtman
cp target/release/virtman "$bin"
chaos="kill:25%@1s,stop:2@1.5s+3s"

run() {
    local name=$1
    shift
    flock /tmp/virtman-bench.lock "$bin" storm --netns --hosts 16 --vms 64 --mode virtman \
        --back-to-back --seed "$seed" --out "$out/$name" "$@" >"$out/$name.log" 2>&1 || true
    python3 - "$out/$name/report.json" "$name" <<'PY'
import json, sys
try:
    m = json.load(open(sys.argv[1]))[0]
except Exception as e:
    print(f"{sys.argv[2]:<16} FAILED ({e})")
    sys.exit(0)
c = m.get("chaos")
longest = max((v.get("longest_read_ms") or 0) for v in m["vm_results"])
line = f'{sys.argv[2]:<16} all {m["all_booted_secs"]:6.2f} s'
if c:
    line += (f'  promise {"held" if c["held"] else "BROKEN"}  wrong {c["wrong_bytes"]}'
             f'  lost {c["lost_with_host"]}  failed-live {c["failed_on_live_hosts"]}'
             f'  reads on hosts never hit: longest {c["longest_read_ms"]:.0f} ms'
             f'  p99 {c["p99_read_ms"]:.0f} ms')
else:
    line += f'  longest read {longest:.0f} ms'
print(line)
PY
}

run calm
run chaos --chaos "$chaos"
run chaos-nohedge --chaos "$chaos" --agent-arg=--no-hedge
run calm-nohedge --agent-arg=--no-hedge

#!/bin/bash
# Issue 7's calibration: measured local storms against `virtman sim`'s
# predictions with the same parameters (crates/sim/SCALE.md, "Calibration
# against measured storms"). Needs root (network namespaces) and qemu-nbd.
#
#   crates/sim/calibrate.sh [OUT_DIR [RUNS]]      (defaults: /tmp/virtman-cal, 1)
#
# Builds the release binary, then for each storm (8 x 32 and 16 x 64 VMs, the
# shipped Debian trace with its timing and back to back, the synthetic trace)
# runs `virtman storm --netns --mode all` RUNS times, each under the shared
# benchmark lock, and prints one Markdown row per storm: the predicted time
# until all booted vs each measured run, with the errors. The simulator's
# parameters are the storm's settings and the measurements of
# examples/cpu_costs.rs: 2 shared cores, 0.65 ms per hop (the agents' 0.2 ms
# link delay is a tokio sleep, measured at 1.3 ms), 1.1 ms more per think time
# (the replayer's sleeps), the tc tbf bucket of 256 KiB, and the replayers'
# start spread (1.2 ms for 32, 4.4 ms for 64). With NO_STORMS=1 it runs no
# storm and compares with the results already in OUT_DIR (NAME-RUN/report.json).
# Both sides run without boot-profile prefetch (the calibration in SCALE.md
# ran before the storm had one); PREFETCH=1 runs both with it (the storm's
# and the simulator's default in virtman mode).
set -euo pipefail
out=${1:-/tmp/virtman-cal}
runs=${2:-1}
cd "$(dirname "$0")/../.."
cargo build --release -p virtman >&2
bin=$out/virtman
mkdir -p "$out"
cp target/release/virtman "$bin"
lock=/tmp/virtman-bench.lock
sim_params="--fanout 2 --parents 2 --link-rate 1G --mode all --json --shared-cores 2
  --hop-latency 0.65ms --think-overhead 1.1ms --link-burst 256K"
pf=--no-prefetch
[ "${PREFETCH:-}" = 1 ] && pf=
sim_params="$sim_params $pf"
synthetic="--image-size 256M --working-set 32M --read-size 64K --think 2s --seed 1"

storm() { # name hosts vms storm-flags...
    local name=$1 h=$2 v=$3
    shift 3
    [ "${NO_STORMS:-}" = 1 ] && return
    for r in $(seq 1 "$runs"); do
        echo "storm $name run $r (load $(cut -d' ' -f1 /proc/loadavg))" >&2
        # shellcheck disable=SC2086
        flock "$lock" "$bin" storm --netns --mode all $pf --hosts "$h" --vms "$v" \
            --out "$out/$name-$r" "$@" >"$out/$name-$r.log" 2>&1
    done
}

row() { # name hosts vms sim-flags...
    local name=$1 h=$2 v=$3
    shift 3
    local spread=1.2ms
    [ "$v" -gt 32 ] && spread=4.4ms
    # shellcheck disable=SC2086
    "$bin" sim --hosts "$h" --vms "$v" $sim_params --start-spread $spread "$@" >"$out/$name.sim.json"
    python3 - "$out" "$name" "$runs" <<'PY'
import json, sys
out, name, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
pred = {r["mode"]: r for r in json.load(open(f"{out}/{name}.sim.json"))}
meas = [{r["mode"]: r for r in json.load(open(f"{out}/{name}-{i}/report.json"))} for i in range(1, runs + 1)]
cells = []
for m in ["virtman", "cache-only", "direct"]:
    p = pred[m]["all_booted_s"]
    qs = [r[m]["all_booted_secs"] for r in meas]
    mean = sum(qs) / len(qs)
    same = all(pred[m]["origin_bytes"] == r[m]["origin_bytes"] for r in meas)
    errs = "/".join(f"{(p - q) / q * 100:+.1f}" for q in qs)
    cells.append(f"{p:.2f} vs {' / '.join(f'{q:.2f}' for q in qs)} s ({errs} %; "
                 f"{(p - mean) / mean * 100:+.1f} % of the mean)"
                 + ("" if same else " [origin bytes differ]"))
print(f"| {name} | " + " | ".join(cells) + " |")
PY
}

trace=traces/debian12-boot.trace
storm debian-8 8 32
storm debian-8-b2b 8 32 --back-to-back
storm debian-16 16 64
storm debian-16-b2b 16 64 --back-to-back
storm synthetic-8 8 32 --synthetic --working-set 32M --think-ms 2000
storm synthetic-16 16 64 --synthetic --working-set 32M --think-ms 2000

echo "| storm | virtman | cache-only | direct |"
echo "| --- | --- | --- | --- |"
row debian-8 8 32 --trace $trace
row debian-8-b2b 8 32 --trace $trace --back-to-back
row debian-16 16 64 --trace $trace
row debian-16-b2b 16 64 --trace $trace --back-to-back
# shellcheck disable=SC2086
row synthetic-8 8 32 $synthetic
# shellcheck disable=SC2086
row synthetic-16 16 64 $synthetic

#!/usr/bin/env bash
# Leader failover of the replicated coordinator: a local cluster with three
# coordinators on a three-member etcd (`virtman cluster up --coordinators 3`,
# no hosts), then ten times: SIGKILL whichever coordinator leads and time
# until a join is answered through the two others (which redirect to the new
# leader), then start the killed one again. Prints each time and the median.
# Then a storm with and without the leader killed in its middle, side by side.
#
# Usage: bench/failover.sh [OUT_DIR]   (needs etcd-server and jq; builds the
# release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/virtman-failover-bench}
rm -rf "$out"
mkdir -p "$out"
cargo build --release -q -p virtman
bin=$out/virtman
cp target/release/virtman "$bin"
head -c 8M /dev/urandom >"$out/img.raw"
dir=$out/cluster
"$bin" cluster up --hosts 0 --coordinators 3 --no-tls --image "$out/img.raw" --dir "$dir" >"$out/up.log"
restarted=()
cleanup() {
    for p in "${restarted[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    "$bin" cluster down --dir "$dir" >/dev/null 2>&1 || true
}
trap cleanup EXIT
urls=$(jq -r .coordinator "$dir/cluster.json")
token=$(cat "$dir/token")
times=()
for i in $(seq 1 10); do
    status=$("$bin" coordinator status --json --coordinator "$urls" 2>/dev/null || true)
    leader=$(jq -r '.[] | select(. != null and .role == "leader") | .name' <<<"$status")
    leader_url=$(jq -r '.[] | select(. != null and .role == "leader") | .url' <<<"$status")
    pid=$(pgrep -f -- "--name $leader( |$)" | head -1)
    others=$(tr , '\n' <<<"$urls" | grep -v "^$leader_url\$")
    t0=$(date +%s.%N)
    kill -9 "$pid"
    while :; do
        ok=
        for u in $others; do
            code=$(curl -s -o /dev/null -w '%{http_code}' -m 1 -L --location-trusted \
                -H "Authorization: Bearer $token" -H 'content-type: application/json' \
                -d "{\"node\":\"f$i\",\"addr\":\"127.0.0.1:1\",\"labels\":{}}" \
                "$u/v1/sessions/img/join" || true)
            if [ "$code" = 200 ]; then ok=1; break; fi
        done
        [ -n "$ok" ] && break
        sleep 0.02
    done
    t1=$(date +%s.%N)
    took=$(echo "$t1 - $t0" | bc)
    times+=("$took")
    echo "failover $i: $leader killed, a join answered after ${took} s"
    # Start the killed coordinator again, as it was started.
    cmd=$(jq -r --arg n "$leader" '.members[] | select(.name == $n) | .addr as $a
        | .command | map(if test(":0$") then $a else . end) | @sh' "$dir/cluster.json")
    eval "setsid $cmd" >>"$out/$leader.restarted.log" 2>&1 &
    restarted+=($!)
    disown
    sleep 3
done
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "median of %d: %.2f s (min %.2f, max %.2f)\n", NR, (a[int((NR+1)/2)]+a[int(NR/2)+1])/2, a[1], a[NR]}'
"$bin" cluster down --dir "$dir" >/dev/null
for p in "${restarted[@]}"; do kill -9 "$p" 2>/dev/null || true; done
restarted=()

# The same storm with and without the leader killed 1 s in.
for run in calm kill calm2 kill2; do
    chaos=()
    case $run in kill*) chaos=(--chaos leader:kill@1s) ;; esac
    "$bin" storm --hosts 6 --vms 24 --mode virtman --coordinators 3 --back-to-back \
        --out "$out/storm-$run" "${chaos[@]}" >"$out/storm-$run.log" 2>&1 || true
    awk -v n="$run" '/^virtman /{print "storm "n": all "$6" s, p90 "$5" s"}' "$out/storm-$run.log"
    grep -h "control:" "$out/storm-$run.log" || true
done

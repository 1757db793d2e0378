#!/usr/bin/env bash
# Runs one fuzz target with libFuzzer on the stable toolchain (cargo-fuzz with
# RUSTC_BOOTSTRAP=1 for its nightly flags) for SECONDS, keeping its corpus in
# fuzz/corpus/TARGET (seeded from fuzz/regressions/TARGET) and any crash in
# fuzz/artifacts/TARGET. Prints libFuzzer's last status line: the executions
# done. A crash found: copy it into fuzz/regressions/TARGET/, fix, and the
# workspace's tests keep it fixed.
#
# Usage: fuzz/run.sh TARGET SECONDS [JOBS]
#   TARGET: handshake request reply checked trace connection
# Needs: cargo install cargo-fuzz; g++ (libFuzzer is built from source).
set -euo pipefail
cd "$(dirname "$0")"
target=${1:?usage: fuzz/run.sh TARGET SECONDS [JOBS]}
secs=${2:?usage: fuzz/run.sh TARGET SECONDS [JOBS]}
jobs=${3:-1}
mkdir -p "corpus/$target" "artifacts/$target"
cp -n regressions/"$target"/* "corpus/$target/" 2>/dev/null || true
RUSTC_BOOTSTRAP=1 cargo fuzz run --features libfuzzer "$target" "corpus/$target" -- \
    -max_total_time="$secs" -artifact_prefix="artifacts/$target/" -jobs="$jobs" \
    -workers="$jobs" -print_final_stats=1 2>&1 | tee "artifacts/$target.log" | grep -E "^#[0-9]+|DONE|ERROR|panicked|stat::number_of_executed_units" | tail -3

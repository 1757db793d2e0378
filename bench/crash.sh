#!/usr/bin/env bash
# Issue 14's whole-agent crash consistency run at full size: the agent of a
# TLS cluster is SIGKILLed at 100 random moments while its VM writes and
# flushes, and started again each time; after each restart every flushed
# write must be there and every byte never written the image's (the test
# `an_agent_killed_at_random_moments_keeps_every_flushed_write`, which CI
# runs with 5 kills).
#
# Usage: bench/crash.sh [KILLS]   (default 100)
set -euo pipefail
cd "$(dirname "$0")/.."
VIRTMAN_CRASH_KILLS=${1:-100} cargo nextest run -p virtman --test cluster \
    an_agent_killed_at_random_moments_keeps_every_flushed_write --no-capture

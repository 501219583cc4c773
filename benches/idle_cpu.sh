#!/usr/bin/env bash
# Idle CPU of a running daemon: starts target/release/pyipcd on a config,
# waits for it to settle, then reads utime+stime from /proc over a window.
# Usage: benches/idle_cpu.sh [config] [seconds]
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-config/pyipcd.toml}
window=${2:-20}
cargo build --release --quiet
env -i target/release/pyipcd run -c "$config" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks); sleep "$window"; t1=$(ticks)
awk -v d=$((t1 - t0)) -v hz="$hz" -v w="$window" -v c="$config" \
  'BEGIN { printf "%s: %.3f%% of one core over %ss (%d ticks)\n", c, 100 * d / hz / w, w, d }'

#!/usr/bin/env bash
# Runs every bench behind docs/PERFORMANCE.md's "one table" (issue 13), for
# R rounds, keeping each bench's raw output, so that a row's figure can be
# given as a median of rounds with each round's figures beside it. Every
# comparison inside one bench invocation is "in the same run": pyipcd beside
# uvloop, the plain pool, and (with OLD) another build of pyipcd.
#
# Usage: benches/one_table.sh OUT_DIR [ROUNDS] [OLD_BINARY]
#   OUT_DIR     where the raw outputs go (round-N-<bench>.txt)
#   ROUNDS      default 3
#   OLD_BINARY  a pyipcd release binary of another build, compared on the
#               idle-host TCP rows (`tcp_echo --against`); optional
# Needs: `python3 -m pip install uvloop` (the uvloop rows), a file-descriptor
# limit of at least 10,100 (the 10,000-connection row), nothing else running.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: benches/one_table.sh OUT_DIR [ROUNDS] [OLD_BINARY]}
rounds=${2:-3}
old=${3:-}
mkdir -p "$out"
cargo build --release --quiet
cargo bench --no-run --quiet 2>/dev/null
against=()
if [[ -n "$old" ]]; then against=(--against "$old"); fi

bench() { # bench NAME FILE ARGS...: one bench's output into FILE
    local name=$1 file=$2
    shift 2
    echo "== $(date -u +%H:%M:%S) $file" >&2
    cargo bench --quiet --bench "$name" -- "$@" >"$file" 2>&1
}

for r in $(seq 1 "$rounds"); do
    p="$out/round-$r"
    # Idle host, every server and row (C=1000 runs 10 s per server).
    bench tcp_echo "$p-tcp-idle.txt" --no-unix --seconds 2 \
        --only pyipcd,uvloop,Rust "${against[@]}" --metrics
    # Busy host: two CPU-bound processes; the servers take turns second by
    # second, each slice on fresh processes. One slice swings from 10k to
    # 70k msg/s with where the scheduler puts the threads, so C=1 takes 60
    # slices (~6 min) and C=64 30, for a bootstrap interval that can
    # separate a 10% lead from luck.
    bench tcp_echo "$p-tcp-busy-c1.txt" --no-unix --seconds 60 --interleave 60 --busy 2 \
        --row "C=1 " --only pyipcd,uvloop --restart
    bench tcp_echo "$p-tcp-busy-c64.txt" --no-unix --seconds 30 --interleave 30 --busy 2 \
        --row "C=64 ping-pong" --only pyipcd,uvloop --restart
    # The GIL hand-off: 2x oversubscribed, free cores (lone caller), busy host.
    bench gil_pool "$p-gil-oversubscribed.txt" --seconds 1 --workers 2 --io-threads 2 --only-pool
    bench gil_pool "$p-gil-idle.txt" --seconds 1 --workers 1 --io-threads 1 --only-pool
    bench gil_pool "$p-gil-busy.txt" --seconds 1 --workers 1 --io-threads 1 --only-pool --busy 2
    # Ten thousand connections.
    bench connections "$p-connections.txt" --conns 10000
done
benches/idle_cpu.sh config/pyipcd.toml 30 >"$out/idle-cpu.txt" 2>&1
echo "done: $out" >&2

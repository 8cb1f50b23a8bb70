#!/usr/bin/env bash
# Where the CPU goes while mlsched drains a backlog: a system-wide `perf` profile of
# every process on the machine (nats-server, Postgres and its backends, the predictor,
# the executors) while JOBS noop jobs go through a private stack (`mlsched dev`),
# reported as the share of samples per program, then the hottest symbols of each.
#
#   scripts/profile.sh [JOBS]      default 100000; PROFILE_SECONDS (default 10)
#
# Needs `perf` (apt-get install linux-perf) and root or kernel.perf_event_paranoid <= 0.
set -euo pipefail
cd "$(dirname "$0")/.."
jobs="${1:-100000}"
seconds="${PROFILE_SECONDS:-10}"
command -v perf >/dev/null || { echo "perf not found: apt-get install linux-perf" >&2; exit 1; }
eval "$(scripts/setup.sh)"
export MLSCHED_NATS_SERVER="${MLSCHED_NATS_SERVER:-$SYSTEM_NATS}"
cargo build --release --locked --workspace >&2
bin="${CARGO_TARGET_DIR:-target}/release"
out="$(mktemp -d)"
chmod 755 "$out" # Postgres runs as its own user when we are root

"$bin/mlsched" dev --jobs 0 --keep-running --data-dir "$out/stack" >"$out/dev.log" 2>&1 &
dev=$!
trap 'kill -INT $dev 2>/dev/null; wait $dev 2>/dev/null || true' EXIT
for _ in $(seq 600); do
    grep -q "The stack is running" "$out/dev.log" && break
    kill -0 $dev 2>/dev/null || { cat "$out/dev.log" >&2; exit 1; }
    sleep 0.1
done
nats_url="$(grep -o 'nats://[0-9.:]*' "$out/dev.log" | head -1)"

NATS_URL="$nats_url" "$bin/mlsched" submit --kind noop --count "$jobs" >/dev/null &
submit=$!
perf record -a -g -F 499 -o "$out/perf.data" -- sleep "$seconds" 2>/dev/null
wait $submit

echo "CPU samples per program over ${seconds}s while $jobs noop jobs were submitted and run (2 cores = 100%):"
perf script -i "$out/perf.data" -F pid 2>/dev/null | sort | uniq -c | while read -r n pid; do
    if [ "$pid" = 0 ]; then name=idle; else name="$(cat "/proc/$pid/comm" 2>/dev/null || echo "exited(submit)")"; fi
    echo "$name $n"
done | awk '{s[$1] += $2; t += $2} END {for (k in s) printf "  %-18s %5.1f%%\n", k, 100 * s[k] / t}' | sort -k2 -rn

report() {
    echo
    echo "hottest symbols of $1 (self time, share of all samples):"
    shift
    perf report -i "$out/perf.data" --no-children --sort dso,sym --stdio "$@" 2>/dev/null |
        grep -E '^ +[0-9.]+%' | head -8 || true
}
report postgres --comm postgres
report nats-server --comm nats-server
report mlsched-executor --pid "$(pgrep -d, -f 'mlsched-executor$')"
report mlsched-predictor --pid "$(pgrep -d, -f 'mlsched-predictor$')"

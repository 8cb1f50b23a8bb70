#!/usr/bin/env bash
# The demo: builds the release binaries and runs `mlsched dev`, which starts a private
# nats-server and Postgres, the predictor and two executors, submits a demo workload
# and prints a summary. Extra arguments go to `mlsched dev` (try --keep-running).
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
export MLSCHED_NATS_SERVER="${MLSCHED_NATS_SERVER:-$SYSTEM_NATS}"
cargo build --release --locked -p mlsched -p mlsched-executor -p mlsched-predictor
exec "${CARGO_TARGET_DIR:-target}/release/mlsched" dev "$@"

#!/usr/bin/env bash
# Acceptance run with an outside producer (Python nats-py) against the built binaries:
# thousands of envelopes with duplicates and malformed bodies, an executor killed with
# SIGKILL mid-run, then every record and dead letter checked. See scripts/acceptance.py.
# Usage: scripts/acceptance.sh [BIN_DIR]   (default: builds and uses target/release)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/setup.sh)"
export MLSCHED_NATS_SERVER="${MLSCHED_NATS_SERVER:-$SYSTEM_NATS}"
TOOLS="${MLSCHED_TOOLS:-$HOME/.cache/mlsched/tools}"
py="$TOOLS/python"
if [ ! -d "$py/nats" ]; then
    python3 -m pip install -q --disable-pip-version-check --target "$py" "nats-py==2.*" ||
        python3 -m pip install -q --disable-pip-version-check --break-system-packages --target "$py" "nats-py==2.*"
fi
bin_dir="${1:-}"
if [ -z "$bin_dir" ]; then
    cargo build --release --locked -p mlsched -p mlsched-executor -p mlsched-predictor
    bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
PYTHONPATH="$py" exec python3 scripts/acceptance.py "$bin_dir" "${@:2}"

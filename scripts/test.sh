#!/usr/bin/env bash
# The test command: formatting, lints, unit tests, the integration tests against real
# processes (once with the distribution's nats-server, once with a current release),
# the acceptance run with an outside Python producer against the built binaries, and
# the offline validation of the Kubernetes deployment (chart, keda/, infra/k8s/, image).
# Sets up what is missing first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/setup.sh)"
system_nats="$SYSTEM_NATS"
current_nats="$CURRENT_NATS"
deploy_python="$DEPLOY_PYTHON"
export MLSCHED_NATS_SERVER="$system_nats"

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "alert rules, Prometheus and Alertmanager configs, Grafana dashboards (promtool, amtool)"
promtool check rules infra/prometheus/alerts/slo-alerts.yml
promtool test rules infra/prometheus/tests/slo-alerts.test.yml
checked="$(mktemp -d)"
promtool check config "$(scripts/check-observability.py "$checked")"
promtool check config infra/prometheus/prometheus-local.yml
promtool check rules "$checked/dashboard-rules.yml"
amtool check-config infra/alertmanager/alertmanager.yml

step "unit and integration tests with $("$system_nats" --version)"
MLSCHED_NATS_SERVER="$system_nats" cargo test --workspace --locked

step "integration tests with $("$current_nats" --version)"
MLSCHED_NATS_SERVER="$current_nats" cargo test --locked -p integration-tests --test it

step "acceptance: a Python producer, duplicates, malformed bodies, kill -9 of an executor"
cargo build --locked -p mlsched -p mlsched-executor -p mlsched-predictor
scripts/acceptance.sh "${CARGO_TARGET_DIR:-target}/debug" --jobs 3000

step "deployment: the Helm chart for dev/staging/prod, keda/, infra/k8s/, the Dockerfile (offline)"
"$deploy_python" scripts/check-deploy.py "${CARGO_TARGET_DIR:-target}/debug/mlsched"

step "mlsched bench --quick: every benchmark scenario runs end to end (no speed thresholds)"
"${CARGO_TARGET_DIR:-target}/debug/mlsched" bench --quick --json "$checked/bench.json" --chart "$checked/bench.svg"

step "all tests passed"

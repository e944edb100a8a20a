#!/usr/bin/env bash
# Runs the Helm chart tests (charts/tests/test_*.py: sni-proxy, node-local-dns, konnectivity,
# log-shipper) in their own venv.
#
#   charts/tests/run.sh [PYTEST ARGS...]
#
# CHART_VENV  venv to create or reuse (default: <repo>/.venv-charts)
# PYTHON      interpreter that creates the venv (default: python3)
# SNI_PROXY_BIN  sni-proxy binary for the --check tests (default: <repo>/target/debug/sni-proxy);
#             missing binary: the tests fail, unless neither SNI_PROXY_BIN nor CI is set (skip).
# NODE_LOCAL_DNS_BIN  node-local-dns binary for the -check tests (default:
#             <target>/debug/node-local-dns when it exists); unset: those tests are skipped.
# LOG_SHIPPER_BIN  log-shipper binary for the --check tests (default: <target>/debug/log-shipper
#             when it exists); unset: those tests are skipped.
#
# Needs only PyPI: helm-python-sdk ships Helm's Go SDK as a prebuilt shared library inside its
# wheel, and kubernetes-validate ships the Kubernetes schemas.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${CHART_VENV:-$repo/.venv-charts}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi

# Reinstall only when requirements.txt changed since the last successful install.
stamp="$venv/.chart-tests-requirements.sha256"
want="$(sha256sum "$here/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    # --only-binary: the helm-python-sdk sdist would need Go to build; never fall back to it.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --only-binary=helm-python-sdk -r "$here/requirements.txt"
    echo "$want" > "$stamp"
fi

cd "$repo"
if [ -z "${NODE_LOCAL_DNS_BIN:-}" ]; then
    nld_default="${CARGO_TARGET_DIR:-$repo/target}/debug/node-local-dns"
    if [ -x "$nld_default" ]; then
        export NODE_LOCAL_DNS_BIN="$nld_default"
    fi
fi
if [ -z "${LOG_SHIPPER_BIN:-}" ]; then
    shipper_default="${CARGO_TARGET_DIR:-$repo/target}/debug/log-shipper"
    if [ -x "$shipper_default" ]; then
        export LOG_SHIPPER_BIN="$shipper_default"
    fi
fi
export PYTHONDONTWRITEBYTECODE=1
exec "$venv/bin/python" -m pytest "$here" -rs -p no:cacheprovider "$@"

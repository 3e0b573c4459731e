#!/usr/bin/env bash
# The Helm chart's offline test: lint (Helm v4 SDK), render four value sets, validate every
# manifest strictly against the Kubernetes 1.25.0 and 1.37.0 schemas, and check what the
# manifests say (tests/helm/test_chart.py). No cluster, no helm binary, no network once the
# venv is cached.
#
#   bash .ci/helm-check.sh
#
# The venv lives outside the clone, in "${HELM_VENV:-$HOME/.cache/tokend/venv-helm}", and is
# reused between runs; the two pinned packages are installed only when missing. Runs as root
# with no stdin in CI: installs read </dev/null.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

VENV="${HELM_VENV:-$HOME/.cache/tokend/venv-helm}"
PINS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0)
START=$SECONDS

die() {
  echo "helm-check: $*" >&2
  exit 1
}

# tomllib (the test parses the rendered tokend.toml) needs Python 3.11.
python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
  || die "python3 >= 3.11 is needed (found $(python3 --version 2>&1))"

if [[ ! -x "$VENV/bin/python" ]]; then
  mkdir -p "$(dirname "$VENV")"
  if ! python3 -m venv "$VENV"; then
    echo "helm-check: python3 -m venv failed; installing python3-venv"
    rm -rf "$VENV"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null
    apt-get install -y -qq python3-venv </dev/null >/dev/null
    python3 -m venv "$VENV"
  fi
fi

pins_installed() {
  "$VENV/bin/python" - "${PINS[@]}" <<'PY' 2>/dev/null
import importlib.metadata as metadata
import sys

for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if metadata.version(name) != version:
        sys.exit(1)
PY
}

if ! pins_installed; then
  echo "helm-check: installing ${PINS[*]} into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PINS[@]}" </dev/null
  pins_installed || die "${PINS[*]} are not importable from $VENV after pip install"
fi
echo "helm-check: venv ready in $((SECONDS - START)) s ($("$VENV/bin/python" --version))"

# The test's last line is its summary: "helm-chart: N passed, N failed".
"$VENV/bin/python" tests/helm/test_chart.py </dev/null

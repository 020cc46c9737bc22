#!/usr/bin/env bash
# Runs the test suite against other torch / torchvision / timm versions than the pinned ones (e.g. a GPU server's),
# in a throw-away venv; every other package comes from requirements.lock.
# Usage: tools/test_other_versions.sh TORCH TORCHVISION TIMM [PYTEST_ARGS...]   (default PYTEST_ARGS: Testing)
#   e.g. tools/test_other_versions.sh 2.11.0 0.26.0 1.0.29 -x Testing/core
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH="$1"; TORCHVISION="$2"; TIMM="$3"; shift 3
VENV="${VENV:-/tmp/meddinov3-torch$TORCH-timm$TIMM}"
PIP="$VENV/bin/pip install --disable-pip-version-check -q"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
$PIP "torch==$TORCH" "torchvision==$TORCHVISION" "timm==$TIMM"
# the rest of the lock, without the packages replaced above (and their CUDA libraries)
grep -v -i -E '^(torch|torchvision|timm|nvidia|cuda|triton)[=-]|^#|^-e' requirements.lock > "$VENV/lock-rest.txt"
$PIP --no-deps -r "$VENV/lock-rest.txt"
"$VENV/bin/python" -c 'import torch, timm; print("torch", torch.__version__, "timm", timm.__version__)'
# the project from this checkout (not installed, so the venv never writes into the work tree)
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "${@:-Testing}"

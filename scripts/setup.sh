#!/usr/bin/env bash
# Set up seg-accel in ./.venv: torch first, then the package (and its test extra with --test).
#
# The venv sees the system's site-packages, so a torch that is already installed
# (a CUDA build on a GPU machine, a container's torch) is kept as it is. Only when
# no torch is importable is one installed: $SEG_ACCEL_TORCH, default torch==2.13.0
# (on the project's CPU machines a local CPU wheel; on PyPI the default build).
#
#   bash scripts/setup.sh          # train/evaluate
#   bash scripts/setup.sh --test   # + pytest
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
case "${1:-}" in
  "") ;;
  --test) extra="[test]" ;;
  *) echo "usage: bash scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

PY=.venv/bin/python
if [ ! -x "$PY" ]; then
  python3 -m venv --system-site-packages .venv
fi

if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  echo "setup: installing ${SEG_ACCEL_TORCH:-torch==2.13.0}"
  "$PY" -m pip install -q "${SEG_ACCEL_TORCH:-torch==2.13.0}"
fi
"$PY" -m pip install -q -e ".${extra}"
echo "setup: done ($("$PY" -c 'import torch, accelerate, transformers; print("torch", torch.__version__, "| accelerate", accelerate.__version__, "| transformers", transformers.__version__)'))"

#!/usr/bin/env bash
# Set up seg-accel in ./.venv: torch first, then the package (and its test extra with --test).
#
# The venv sees the system's site-packages, so a torch that is already installed
# (a CUDA build on a GPU machine, a container's torch) is kept as it is; when it has
# no torchvision (smp and timm need one), the torchvision built for that torch is
# added. Only when no torch is importable is a pair installed: $SEG_ACCEL_TORCH,
# default "torch==2.14.1 torchvision==0.29.1" (on the project's machines both lie on
# local disk; on PyPI they are the default builds).
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

TORCH_PAIR="${SEG_ACCEL_TORCH:-torch==2.14.1 torchvision==0.29.1}"
if "$PY" -c "import torch" 2>/dev/null; then
  have=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')
  echo "setup: keeping the installed torch $have"
  if ! "$PY" -c "import torchvision" 2>/dev/null; then
    echo "setup: installing the torchvision built for torch $have"
    # pinning torch to the installed release makes pip pick the matching torchvision
    # (or fail here, rather than replace the user's torch)
    "$PY" -m pip install -q torchvision "torch==$have" || {
      echo "setup: no torchvision matches torch $have; set SEG_ACCEL_TORCH to a matching pair in a new venv" >&2
      exit 1
    }
  fi
else
  echo "setup: installing $TORCH_PAIR"
  # shellcheck disable=SC2086  # the pair is two requirements
  "$PY" -m pip install -q $TORCH_PAIR
fi
"$PY" -m pip install -q -e ".${extra}"
echo "setup: done ($("$PY" -c 'import torch, accelerate, transformers; print("torch", torch.__version__, "| torchvision", __import__("torchvision").__version__, "| smp", __import__("segmentation_models_pytorch").__version__, "| accelerate", accelerate.__version__, "| transformers", transformers.__version__)'))"

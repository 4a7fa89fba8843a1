#!/usr/bin/env bash
# Set up mimkd in ./.venv (idempotent). Usage: bash scripts/setup.sh [--dev]
#   - installs Debian's Fashion-MNIST package when the dataset is missing (needs root or sudo);
#   - installs torch==2.13.0 BEFORE the project: an unpinned torch would pull GBs of CUDA packages;
#   - installs the project (editable) and, with --dev, the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0
[ "${1:-}" = "--dev" ] && DEV=1
PY=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
TCMALLOC=$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 2>/dev/null | head -1)

# Fashion-MNIST (the demo's data) and tcmalloc (see src/mimkd/allocator.py: 1.4x faster MIMKD steps on CPU)
if [ ! -f "$FMNIST" ] || [ -z "$TCMALLOC" ]; then
  echo "[setup] installing Debian packages dataset-fashion-mnist libtcmalloc-minimal4"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist libtcmalloc-minimal4 >/dev/null
  else
    echo "[setup] WARNING: not root and no sudo: run 'apt-get install -y dataset-fashion-mnist libtcmalloc-minimal4' as root" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0"
  "$VPY" -m pip install -q torch==2.13.0
fi
STAMP=.venv/.mimkd-installed$([ $DEV -eq 1 ] && echo -dev)
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "[setup] installing mimkd and its dependencies"
  if [ $DEV -eq 1 ]; then "$VPY" -m pip install -q -e ".[dev]"; else "$VPY" -m pip install -q -e .; fi
  touch "$STAMP"
fi
echo "[setup] ready: $("$VPY" -c 'import torch, mimkd; print("mimkd", mimkd.__version__, "torch", torch.__version__)')"

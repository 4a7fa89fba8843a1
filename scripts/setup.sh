#!/usr/bin/env bash
# Set up mimkd in ./.venv (idempotent). Usage: bash scripts/setup.sh [--dev]
#   - installs Debian's Fashion-MNIST package when the dataset is missing (needs root or sudo);
#   - installs torch==2.13.0 BEFORE the project: an unpinned torch would pull GBs of CUDA packages;
#   - installs the project (editable) and, with --dev, the test tools.
# Environment: PYTHON (the interpreter for the venv, default python3), MIMKD_SETUP_APT=0 (never call apt-get).
# tests/test_setup_script.py runs this script, both ways, in a temporary copy of the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 2; }

DEV=0
case "${1:-}" in
  "") ;;
  --dev) DEV=1 ;;
  -h | --help) sed -n '2,7p' "$0"; exit 0 ;;
  *) die "unknown argument '$1' (usage: bash scripts/setup.sh [--dev])" ;;
esac
PY=${PYTHON:-python3}
FMNIST=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

# tcmalloc (see src/mimkd/allocator.py: 1.4x faster MIMKD steps on CPU); an absent library is not an error
find_tcmalloc() {
  local f
  for f in /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4; do
    if [ -e "$f" ]; then echo "$f"; return 0; fi
  done
  return 0
}

# Fashion-MNIST (the demo's data) and tcmalloc, from Debian's packages
if [ ! -f "$FMNIST" ] || [ -z "$(find_tcmalloc)" ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi
  if [ "${MIMKD_SETUP_APT:-1}" = "0" ]; then
    say "MIMKD_SETUP_APT=0: not installing dataset-fashion-mnist libtcmalloc-minimal4"
  elif [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; then
    say "installing Debian packages dataset-fashion-mnist libtcmalloc-minimal4"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist libtcmalloc-minimal4 >/dev/null
  else
    echo "[setup] WARNING: not root and no sudo: run 'apt-get install -y dataset-fashion-mnist" \
      "libtcmalloc-minimal4' as root" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $PY"
  "$PY" -m venv .venv || die "'$PY -m venv .venv' failed: install the venv module (Debian: apt-get install python3-venv) or set PYTHON"
fi
VPY=.venv/bin/python
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! "$VPY" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null; then
  say "installing torch==2.13.0"
  "$VPY" -m pip install -q torch==2.13.0
fi

# One stamp per flavour: a --dev install also satisfies the plain one, not the other way round.
STAMP=.venv/.mimkd-installed
EXTRAS=""
if [ "$DEV" -eq 1 ]; then
  STAMP=.venv/.mimkd-installed-dev
  EXTRAS="[dev]"
fi
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ] || ! "$VPY" -c "import mimkd" 2>/dev/null; then
  say "installing mimkd$EXTRAS and its dependencies"
  "$VPY" -m pip install -q -e ".$EXTRAS"
  touch "$STAMP"
  if [ "$DEV" -eq 1 ]; then touch .venv/.mimkd-installed; fi
fi
say "ready: $("$VPY" -c 'import torch, mimkd; print("mimkd", mimkd.__version__, "torch", torch.__version__)')"

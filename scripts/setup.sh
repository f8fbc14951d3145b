#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs what Spiderscope needs.
# torch goes in first and alone: on a machine without an NVIDIA GPU the CPU build of
# torch 2.13.0 is installed; where a CUDA build of 2.13.0 is already present it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
stamp=.venv/.spiderscope-installed
if [ -f "$stamp" ] && [ "$stamp" -nt requirements.txt ]; then
  exit 0
fi
have_torch=$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
case "$have_torch" in
  2.13.0*) echo "setup: keeping torch $have_torch" ;;
  *)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "setup: NVIDIA GPU found, installing torch 2.13.0 (CUDA build)"
    else
      echo "setup: no NVIDIA GPU, installing torch 2.13.0 (CPU build)"
    fi
    $PY -m pip install --quiet torch==2.13.0
    ;;
esac
$PY -m pip install --quiet -r requirements.txt
touch "$stamp"

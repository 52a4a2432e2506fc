#!/usr/bin/env bash
# The main job: `fpdm demo` (FPDM vs DiT on the embedded dataset, sampled under budgets, with a report), installing
# what it needs first (idempotent; only the package registry is contacted, and only the first time).
# Usage: bash scripts/demo.sh [--quick] [--out DIR] [--minutes M] [--device cpu|cuda] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pinned on purpose: on a machine without torch, 2.13.0 resolves to the local CPU wheel, whereas an unpinned
  # torch (also pulled in by our own dependency list) would download several GB of CUDA packages.
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" -c "import fixedpoint, fixedpoint_diffusion, einops, diffusers, numpy, matplotlib, tqdm, PIL" 2>/dev/null; then
  "$PY" -m pip install --quiet -e .
fi
exec "$PY" -m fixedpoint_diffusion demo "$@"

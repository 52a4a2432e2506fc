#!/usr/bin/env bash
# Run the test suite, installing what it needs first (idempotent; only the package registry is contacted).
# Usage: bash scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  # Pinned on purpose: on a machine without torch, 2.13.0 resolves to the local CPU wheel, whereas an unpinned
  # torch (also pulled in by our own dependency list) would download several GB of CUDA packages.
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
if ! "$PY" -c "import fixedpoint, fixedpoint_diffusion, einops, diffusers, numpy, matplotlib, tqdm, PIL, torchdeq, pytest, hypothesis, mkdocs, mkdocstrings_handlers.python" 2>/dev/null; then
  "$PY" -m pip install --quiet -e ".[test]"
fi
exec "$PY" -m pytest "$@"

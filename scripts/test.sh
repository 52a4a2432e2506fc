#!/usr/bin/env bash
# Run the test suite, installing what it needs first (idempotent; only the package registry is contacted).
# Usage: bash scripts/test.sh [pytest arguments...]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_once "fixedpoint, fixedpoint_diffusion, einops, diffusers, numpy, matplotlib, tqdm, PIL, torchdeq, pytest, hypothesis, mkdocs, mkdocstrings_handlers.python" ".[test]"
exec "$PY" -m pytest "$@"

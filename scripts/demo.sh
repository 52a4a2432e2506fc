#!/usr/bin/env bash
# The main job: `fpdm demo` (FPDM vs DiT on the embedded dataset, sampled under budgets, with a report), installing
# what it needs first (idempotent; only the package registry is contacted, and only the first time).
# Usage: bash scripts/demo.sh [--quick] [--out DIR] [--minutes M] [--samples N] [--device cpu|cuda] [--seed N]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/_install.sh
install_once "fixedpoint, fixedpoint_diffusion, einops, diffusers, numpy, matplotlib, tqdm, PIL" "."
exec "$PY" -m fixedpoint_diffusion demo "$@"

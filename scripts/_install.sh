# Sourced by demo.sh and test.sh: install what a command needs, the first time only (idempotent; only the package
# registry is contacted).   install_once "<python modules to import>" "<pip target>"
PY=${PYTHON:-python3}

install_once() {
  if ! "$PY" -c "import torch" 2>/dev/null; then
    # Pinned on purpose: on a machine without torch, 2.13.0 resolves to the local CPU wheel, whereas an unpinned
    # torch (also pulled in by our own dependency list) would download several GB of CUDA packages.
    "$PY" -m pip install --quiet "torch==2.13.0"
  fi
  if ! "$PY" -c "import $1" 2>/dev/null; then
    "$PY" -m pip install --quiet -e "$2"
  fi
}

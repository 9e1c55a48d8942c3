#!/usr/bin/env bash
# Creates .venv with sdtl_jax and its pinned dependencies. Safe to re-run.
#   bash scripts/setup.sh            core + test tools
#   SDTL_EXTRAS=generate bash scripts/setup.sh   also diffusers/transformers for generation
#   SDTL_TORCH=0 bash scripts/setup.sh   skip torch (training needs none; TPU workers)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Quiet, but for the machine's pip.conf warnings about absent local indexes; errors still fail.
pip() { .venv/bin/python -m pip -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }
pip install --upgrade pip
# The CPU build of torch first: an unpinned torch, pulled in by any later package, would be a
# multi-GB CUDA build.
if [ "${SDTL_TORCH:-1}" = 1 ]; then
  pip install torch==2.13.0
fi
pip install -r requirements-lock.txt
pip install --no-deps -e .
if [ -n "${SDTL_EXTRAS:-}" ]; then
  pip install -e ".[${SDTL_EXTRAS}]"
fi
.venv/bin/python -c "import sdtl_jax, jax, flax, grain, orbax.checkpoint; print('sdtl_jax', sdtl_jax.__version__, 'jax', jax.__version__)"

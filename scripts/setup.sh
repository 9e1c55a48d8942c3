#!/usr/bin/env bash
# Creates .venv with sdtl_jax and its pinned dependencies. Safe to re-run.
#   bash scripts/setup.sh            core + generation (diffusers) + test tools
#   SDTL_EXTRAS=tpu bash scripts/setup.sh   also an extra of setup.py
#   SDTL_TORCH=0 bash scripts/setup.sh   skip the CPU build of torch (TPU workers; GPU hosts,
#                                        which install a CUDA build of torch first)
#
# Packages go in with uv (pinned below): pip took ~10 minutes of a 20-minute CI budget here,
# uv about one.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH=2.13.0
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# Quiet, but for the machine's pip.conf warnings about absent local indexes; errors still fail.
pip() { .venv/bin/python -m pip -q "$@" 2> >(grep -v '^WARNING: Location' >&2); }
uv() { .venv/bin/python -m uv pip "$@" --python .venv/bin/python -q; }
.venv/bin/python -m uv --version >/dev/null 2>&1 || pip install uv==0.13.9
# The CPU build of torch first: an unpinned torch, pulled in by any later package, would be a
# multi-GB CUDA build. Where the machine keeps that wheel on disk (PIP_FIND_LINKS), uv installs
# the file; elsewhere pip finds it (uv would not look at pip's local indexes).
if [ "${SDTL_TORCH:-1}" = 1 ]; then
  wheel=$(ls "${PIP_FIND_LINKS:-/nonexistent}"/torch-${TORCH}+cpu-*.whl 2>/dev/null | head -1 || true)
  if [ -n "$wheel" ]; then uv install --no-deps "$wheel"; else pip install "torch==$TORCH"; fi
fi
# The lock is complete (a freeze), so nothing is resolved: exactly these versions, and no torch
# pulled in behind SDTL_TORCH=0 by the packages that want one (accelerate, diffusers).
uv install --no-deps -r requirements-lock.txt
uv install --no-deps -e .
if [ -n "${SDTL_EXTRAS:-}" ]; then
  uv install -e ".[${SDTL_EXTRAS}]"
fi
.venv/bin/python -c "import sdtl_jax, jax, flax, grain, orbax.checkpoint; print('sdtl_jax', sdtl_jax.__version__, 'jax', jax.__version__)"

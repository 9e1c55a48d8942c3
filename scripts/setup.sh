#!/usr/bin/env bash
# Creates .venv with sdtl_jax and its pinned dependencies (requirements-lock.txt). Safe to re-run.
#
#   bash scripts/setup.sh                                   laptop / CPU host (torch's CPU build)
#   SDTL_TORCH=cuda bash scripts/setup.sh                   GPU host (CUDA torch + jax[cuda13])
#   SDTL_TORCH=none SDTL_EXTRAS=tpu bash scripts/setup.sh   Cloud TPU VM (jax[tpu], no torch)
#
# Environment:
#   PYTHON        interpreter for a new .venv, >= 3.11 (default: the first of python3,
#                 python3.13, python3.12, python3.11 on PATH that is >= 3.11, else one from uv)
#   SDTL_TORCH    cpu (default): torch's CPU build | cuda: a CUDA build | none: no torch
#   SDTL_CUDA     with SDTL_TORCH=cuda: 13 (default; cu130, NVIDIA driver >= 580) | 12 (cu128)
#   SDTL_EXTRAS   comma list of setup.py extras: generate, test, reference, tfds, gcs, tensorboard,
#                 tpu, gpu
#   SDTL_APT      1: may apt-get install python3.X-venv (with sudo unless root); default 0
#   SDTL_DRY_RUN  1: decide everything, print each command that would change the machine, run none
#   PIP_FIND_LINKS  directories: a torch (or torchvision) +cpu wheel there is used, not downloaded
#
# Packages go in with uv (pinned below): pip took ~10 minutes of a 20-minute CI budget here,
# uv about one. The script runs under macOS's bash 3.2 too: no empty arrays under set -u.
set -euo pipefail
cd "$(dirname "$0")/.."

FLOOR_MAJOR=3 FLOOR_MINOR=11    # the lock's jax, numpy, scipy, flax, orbax, grain require it
FLOOR=$FLOOR_MAJOR.$FLOOR_MINOR
PYTHON_FROM_UV=3.11             # uv installs it when nothing here meets FLOOR: the lock's Python
UV_PIN=0.13.9
UV_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/sdtl_jax/uv   # a uv this script fetched lives here
TORCH=2.13.0
TORCHVISION=$(sed -n "s/.*'torchvision==\([0-9.]*\)'.*/\1/p" setup.py)
JAX=$(sed -n 's/^jax==//p' requirements-lock.txt)
PYTORCH_INDEX=https://download.pytorch.org/whl
DRY=${SDTL_DRY_RUN:-0}

note() { echo "scripts/setup.sh: $*" >&2; }
die() { note "$@"; exit 1; }

# A command as a shell reads it back: words quoted only where they need it.
show() {
  local w line=""
  for w in "$@"; do
    [[ $w =~ ^[A-Za-z0-9_./:=+@,%-]+$ ]] || w="'${w//\'/\'\\\'\'}'"
    line="$line${line:+ }$w"
  done
  echo "$line"
}
# Every command that changes the machine goes through run, so SDTL_DRY_RUN=1 prints them all.
run() { if [ "$DRY" = 1 ]; then show "$@"; else "$@"; fi; }
# The same, its output kept in a log: a failed download then costs one line, not a traceback.
run_logged() {
  local log=$1; shift
  if [ "$DRY" = 1 ]; then show "$@"; return; fi
  mkdir -p "$(dirname "$log")"
  "$@" >"$log" 2>&1
}

# --- Python -------------------------------------------------------------------------------------

# "3.11.7" from the interpreter itself, or nothing: a name says little (pyenv has shims for
# versions it does not have, python3 may be anything).
py_version() {
  "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null \
    | grep -E '^[0-9]+\.[0-9]+\.[0-9]+$' || true
}
major_minor() { local rest=${1#*.}; echo "${1%%.*}.${rest%%.*}"; }
meets_floor() {
  local major=${1%%.*} rest=${1#*.}; local minor=${rest%%.*}
  [ "$major" -gt "$FLOOR_MAJOR" ] \
    || { [ "$major" = "$FLOOR_MAJOR" ] && [ "$minor" -ge "$FLOOR_MINOR" ]; }
}
# Debian and Ubuntu ship venv's ensurepip in a separate package (python3.X-venv).
can_venv() { "$1" -c 'import venv, ensurepip' >/dev/null 2>&1; }

PY="" PY_VERSION="" FOUND="" OLD_PYS=""
# Sets PY to $PYTHON or the first python3[.X] on PATH that meets FLOOR; FOUND lists the others.
pick_python() {
  local name path v
  if [ -n "${PYTHON:-}" ]; then
    path=$(command -v "$PYTHON") || die "PYTHON=$PYTHON was not found."
    v=$(py_version "$path")
    { [ -n "$v" ] && meets_floor "$v"; } \
      || die "PYTHON=$PYTHON is ${v:-not a working Python}; sdtl_jax needs Python >= $FLOOR."
    PY=$path PY_VERSION=$v
    return
  fi
  for name in python3 python3.13 python3.12 python3.11; do
    path=$(command -v "$name") || continue
    v=$(py_version "$path")
    [ -n "$v" ] || continue
    if meets_floor "$v"; then PY=$path PY_VERSION=$v; return; fi
    FOUND="$FOUND${FOUND:+, }$name is $v ($path)"
    OLD_PYS="$OLD_PYS $path"
  done
}

die_no_python() {  # $1: why uv did not help
  die "sdtl_jax needs Python >= $FLOOR; ${FOUND:-no python3 was found}" \
    "and ${1:-no newer python3.X or uv was found}." \
    "Install Python $FLOOR+ (Ubuntu: sudo apt-get install python$FLOOR python$FLOOR-venv)" \
    "or uv (https://docs.astral.sh/uv/), then re-run."
}

# --- uv outside the venv: makes venvs without python3-venv, and installs Pythons -----------------

UV=""
find_uv() {
  if UV=$(command -v uv) && "$UV" --version >/dev/null 2>&1; then return; fi
  UV=$UV_DIR/bin/uv
  [ -x "$UV" ] || fetch_uv
}
# Any python3 with pip can fetch uv (one binary in a wheel); else uv's own installer, via curl.
UV_WHY=""
fetch_uv() {
  local py log=$UV_DIR.log tried=""
  for py in $PY $OLD_PYS; do
    "$py" -m pip --version >/dev/null 2>&1 || continue
    tried=1
    run_logged "$log" "$py" -m pip install -q --upgrade --target "$UV_DIR" "uv==$UV_PIN" \
      && fetched_uv && return
  done
  if command -v curl >/dev/null 2>&1; then
    tried=1
    run_logged "$log" sh -c "curl -LsSf https://astral.sh/uv/$UV_PIN/install.sh \
| env UV_INSTALL_DIR='$UV_DIR/bin' UV_NO_MODIFY_PATH=1 sh" && fetched_uv && return
  fi
  [ -z "$tried" ] || UV_WHY="no newer python3.X was found, and fetching uv failed (see $log)"
  return 1
}
fetched_uv() { [ "$DRY" = 1 ] || [ -x "$UV" ]; }

apt_install() {
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  run $sudo apt-get update -q
  run $sudo apt-get install -y -q "$@"
}

# --- the venv -----------------------------------------------------------------------------------

VENV_VERSION="" VENV_BY=""
make_venv() {
  if [ -x .venv/bin/python ]; then
    VENV_VERSION=$(py_version .venv/bin/python)
    { [ -n "$VENV_VERSION" ] && meets_floor "$VENV_VERSION"; } \
      || die ".venv has Python ${VENV_VERSION:-that does not run}; sdtl_jax needs >= $FLOOR:" \
        "rm -rf .venv and re-run."
    return
  fi
  pick_python
  if [ -n "$PY" ]; then venv_from "$PY"; VENV_VERSION=$PY_VERSION; return; fi
  find_uv || die_no_python "$UV_WHY"
  run_logged "$UV_DIR.log" "$UV" python install "$PYTHON_FROM_UV" \
    || die_no_python "uv python install $PYTHON_FROM_UV failed (see $UV_DIR.log)"
  run "$UV" venv -q --python "$PYTHON_FROM_UV" .venv
  VENV_VERSION=$PYTHON_FROM_UV VENV_BY=uv
}
venv_from() {
  local py=$1 x
  x=$(major_minor "$PY_VERSION")
  if can_venv "$py"; then
    run "$py" -m venv .venv && { VENV_BY=python; return; }
    rm -rf .venv    # half made, without pip: start afresh below
  fi
  if [ "${SDTL_APT:-0}" = 1 ]; then
    apt_install "python$x-venv"
    run "$py" -m venv .venv
    VENV_BY=python
  elif find_uv; then
    run "$UV" venv -q --python "$py" .venv
    VENV_BY=uv
  else
    die "$py (Python $PY_VERSION) cannot make a venv (no ensurepip) and no uv was found:" \
      "sudo apt-get install python$x-venv (or re-run with SDTL_APT=1), or install uv" \
      "(https://docs.astral.sh/uv/), then re-run."
  fi
}

# uv inside the venv: every install below, and re-runs, need nothing from outside it.
venv_uv() {
  if .venv/bin/python -m uv --version >/dev/null 2>&1; then return; fi
  local has_pip=$VENV_BY    # python: made by venv, which installs pip; uv: made by uv, no pip
  [ -n "$has_pip" ] || { .venv/bin/python -m pip --version >/dev/null 2>&1 && has_pip=python; }
  if [ "$has_pip" = python ]; then
    # Quiet, but for the machine's pip.conf warnings about absent local indexes.
    run .venv/bin/python -m pip install -q "uv==$UV_PIN" 2> >(grep -v '^WARNING: Location' >&2)
  else
    [ -n "$UV" ] || find_uv \
      || die ".venv has neither pip nor uv, and no uv was found: rm -rf .venv and re-run."
    run "$UV" pip install -q --python .venv/bin/python "uv==$UV_PIN"
  fi
}
uv_install() { run .venv/bin/python -m uv pip install --python .venv/bin/python -q "$@"; }

# --- torch --------------------------------------------------------------------------------------

# A +cpu wheel for the venv's Python and this machine in $PIP_FIND_LINKS. Only there: pip's own
# config (pip.conf) may name other places, but it differs between machines and nobody chose it
# for this.
local_wheel() {  # name version
  local dir f mm tag
  mm=$(major_minor "$VENV_VERSION")
  tag=cp${mm/./}
  for dir in ${PIP_FIND_LINKS:-}; do
    dir=${dir#file://}
    for f in "$dir/$1-$2+cpu-$tag-"*"$(uname -m).whl"; do
      [ -f "$f" ] && { echo "$f"; return; }
    done
  done
}
# The CPU build: any unpinned torch, from PyPI, is a multi-GB CUDA build. Its dependencies are in
# the lock. torchvision (the reference extra) comes the same way: PyPI's is a CUDA build whose
# operators do not load beside CPU torch.
install_cpu() {  # name version
  local wheel
  wheel=$(local_wheel "$1" "$2")
  if [ -n "$wheel" ]; then
    uv_install --no-deps "$wheel"
  else
    uv_install --no-deps --index-url "$PYTORCH_INDEX/cpu" "$1==$2"
  fi
}
# One resolution for torch and jax's CUDA plugin, so both get the same nvidia-* libraries; the
# lock as constraints keeps everything else at its versions. PyTorch's index for torch (the +cuXYZ
# pin only exists there), best match across it and PyPI for the rest.
install_cuda() {
  local tv=""
  [ "$REFERENCE" = 0 ] || tv="torchvision==$TORCHVISION+$CU"
  uv_install -c requirements-lock.txt --extra-index-url "$PYTORCH_INDEX/$CU" \
    --index-strategy unsafe-best-match "torch==$TORCH+$CU" ${tv:+"$tv"} "jax[cuda$CUDA]==$JAX"
}
driver_check() {
  local driver
  command -v nvidia-smi >/dev/null 2>&1 || { note "no nvidia-smi: NVIDIA driver not checked."; return; }
  driver=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
  if [ "$CUDA" = 13 ] && [[ ${driver%%.*} =~ ^[0-9]+$ ]] && [ "${driver%%.*}" -lt 580 ]; then
    note "WARNING: NVIDIA driver $driver; CUDA 13 wheels need >= 580 (SDTL_CUDA=12 for older drivers)."
  fi
}
gpu_check() {
  SDTL_CUDA=$CUDA .venv/bin/python - <<'EOF'
import os
import jax
import torch
t, j = torch.cuda.is_available(), jax.default_backend() == 'gpu'
print(f'torch {torch.__version__}: cuda available {t}, {torch.cuda.device_count()} GPU(s)')
print(f'jax {jax.__version__}: devices {jax.devices()}')
blind = [name for name, sees in (('torch', t), ('jax', j)) if not sees]
if blind:
    need = '>= 580' if os.environ['SDTL_CUDA'] == '13' else '>= 570'
    print(f'scripts/setup.sh: WARNING: {" and ".join(blind)} see no GPU (is there one? '
          f'nvidia-smi shows the driver; CUDA {os.environ["SDTL_CUDA"]} wheels need {need}).')
EOF
}

# --- options ------------------------------------------------------------------------------------

case ${SDTL_TORCH:=cpu} in
  cpu | cuda | none) ;;
  0) die "SDTL_TORCH=0 is now SDTL_TORCH=none (no torch); the values are cpu (default), cuda, none." ;;
  1) die "SDTL_TORCH=1 is now SDTL_TORCH=cpu; the values are cpu (default), cuda, none." ;;
  *) die "SDTL_TORCH=$SDTL_TORCH: the values are cpu (default), cuda, none." ;;
esac
case ${SDTL_CUDA:=13} in
  13) CU=cu130 ;;
  12) CU=cu128 ;;
  *) die "SDTL_CUDA=$SDTL_CUDA: the values are 13 (default; cu130) and 12 (cu128)." ;;
esac
CUDA=$SDTL_CUDA
[ -n "$JAX" ] || die "requirements-lock.txt has no jax==<version> line."
[ -n "$TORCHVISION" ] || die "setup.py has no 'torchvision==<version>' requirement."

# Extras go through setup.py, constrained by the lock; tpu and gpu also pin jax[tpu] or
# jax[cudaN] to the lock's jax (setup.py has lower bounds only; its gpu extra is CUDA 13's).
DOT="" JAX_REQ="" REFERENCE=0 EXTRAS=${SDTL_EXTRAS:-}
for e in ${EXTRAS//,/ }; do
  case $e in
    tpu | gpu)
      [ -z "$JAX_REQ" ] || die "SDTL_EXTRAS: tpu or gpu, not both."
      if [ "$e" = tpu ]; then JAX_REQ="jax[tpu]==$JAX" DOT="$DOT${DOT:+,}tpu"
      else JAX_REQ="jax[cuda$CUDA]==$JAX"; fi ;;
    reference) REFERENCE=1 DOT="$DOT${DOT:+,}$e" ;;
    generate | test | tfds | gcs | tensorboard) DOT="$DOT${DOT:+,}$e" ;;
    *) die "SDTL_EXTRAS: no extra '$e' (setup.py has generate, test, reference, tfds, gcs, tensorboard, tpu, gpu)." ;;
  esac
done
# Both want torch: with SDTL_TORCH=none uv would fetch PyPI's (CUDA) build, unless .venv has one.
if [ "$SDTL_TORCH" = none ]; then
  for e in generate reference; do
    [[ ,$DOT, == *,$e,* ]] || continue
    mods=torch
    [ "$e" = generate ] || mods="torch, torchvision"
    { [ -x .venv/bin/python ] && .venv/bin/python -c "import $mods" >/dev/null 2>&1; } \
      || die "SDTL_EXTRAS=$e needs $mods: use SDTL_TORCH=cpu or cuda, or install yours into .venv first."
  done
fi

# --- install ------------------------------------------------------------------------------------

make_venv
venv_uv
case $SDTL_TORCH in
  cpu) install_cpu torch "$TORCH" ;;
  cuda) driver_check; install_cuda ;;
  none) note "SDTL_TORCH=none: no torch." ;;
esac
# The lock is complete (a freeze), so nothing is resolved: exactly these versions, and no torch
# pulled in behind SDTL_TORCH=none by the packages that want one (accelerate, diffusers).
uv_install --no-deps -r requirements-lock.txt
uv_install --no-deps -e .
[ "$REFERENCE" = 0 ] || [ "$SDTL_TORCH" != cpu ] || install_cpu torchvision "$TORCHVISION"
if [ -n "$DOT$JAX_REQ" ]; then
  extras=(-c requirements-lock.txt)
  [ -z "$DOT" ] || extras+=(-e ".[$DOT]")
  [ -z "$JAX_REQ" ] || extras+=("$JAX_REQ")
  uv_install "${extras[@]}"
fi
[ "$DRY" != 1 ] || exit 0
.venv/bin/python -c "import sdtl_jax, jax, flax, grain, orbax.checkpoint; print('sdtl_jax', sdtl_jax.__version__, 'jax', jax.__version__)"
[ "$SDTL_TORCH" != cuda ] || gpu_check

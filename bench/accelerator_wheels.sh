#!/usr/bin/env bash
# Downloads into .whl/ the wheels that the lent GPU machine lacks for `python3 -m
# bench.accelerator_check` (bench/README.md, "The accelerator check"): Python 3.12, x86-64,
# at the versions of requirements-lock.txt.
#
#   bash bench/accelerator_wheels.sh      # from anywhere; writes <repo>/.whl/ (git-ignored)
#
# That machine has no network. Its image holds jax, flax, optax, orbax-checkpoint, torch,
# torchvision, timm, transformers, huggingface-hub, accelerate, safetensors, scikit-learn,
# matplotlib, opencv, pillow, pytest(-xdist), absl-py, etils, cloudpickle, protobuf, psutil,
# PyYAML. Missing, and so carried:
#   grain, array-record   the data pipeline (array-record: grain's and our record format)
#   portpicker            grain's worker processes (mp_prefetch) import it
#   ml-collections        the configs
#   tensorboardX          the training metrics
#   diffusers             the generator
# Their other requirements are there (Requires-Dist in each wheel's METADATA): absl-py,
# etils[epath,epy], cloudpickle, numpy, protobuf, packaging, PyYAML, psutil, filelock,
# huggingface-hub, regex, requests, safetensors, Pillow; diffusers' importlib_metadata is
# imported only on Python < 3.8.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
names=(grain array_record portpicker ml_collections tensorboardX diffusers)

pins=()
for name in "${names[@]}"; do
  pin="$(grep -i "^${name}==" "$root/requirements-lock.txt" || true)"
  if [[ -z "$pin" ]]; then
    echo "error: $name is not pinned in requirements-lock.txt" >&2
    exit 1
  fi
  pins+=("$pin")
done

rm -rf "$root/.whl"   # one version of each: pip refuses an install with two
mkdir -p "$root/.whl"
# 'any' too: the pure-Python wheels (ml-collections, tensorboardX, portpicker, diffusers).
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform any -d "$root/.whl" "${pins[@]}"

ls -1 "$root/.whl"
echo "total: $(du -sh "$root/.whl" | cut -f1) in $(ls "$root/.whl" | wc -l) wheels (the working" \
  "tree that travels must stay under 64 MiB)"

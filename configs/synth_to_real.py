r"""SDTL: pre-train on synthetic images, freeze the first N layers, train the rest on real ones.

The paper's ImageNet-100 / ResNet-50 experiment (Table 2): evaluated on real validation images.

  python -m sdtl_jax.main --config=configs/synth_to_real.py:num_frozen=16 --workdir=runs/s2r_16

Demo on the embedded digits:

  python -m sdtl_jax.main --config=configs/synth_to_real.py:demo --workdir=runs/demo_s2r

Variants: `model=tinyvit_5m,data=pets` (Table 4), `smoke` (3 steps per stage, for tests).
"""
from sdtl_jax import config_lib


def get_config(arg=None):
    return config_lib.transfer(arg, source='synth', target='real')

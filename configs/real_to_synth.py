r"""RDTL: pre-train on real images, freeze the first N layers, train the rest on synthetic ones.

The paper's ImageNet-100 / ResNet-50 experiment (Table 3): evaluated on real validation images.

  python -m sdtl_jax.main --config=configs/real_to_synth.py:num_frozen=16 --workdir=runs/r2s_16

Demo on the embedded digits (a few minutes on a 2-core CPU):

  python -m sdtl_jax.main --config=configs/real_to_synth.py:demo --workdir=runs/demo

Variants: `model=tinyvit_5m,data=pets` (Table 5), `smoke` (3 steps per stage, for tests).
The source stage trains into `<workdir>/source` unless `--config.transfer.init_from=DIR` names
a finished run. Expected on ImageNet-100 with N=16 (paper, Table 3): see
`sdtl_jax/reference/paper_tables.json`.
"""
from sdtl_jax import config_lib


def get_config(arg=None):
    return config_lib.transfer(arg, source='real', target='synth')

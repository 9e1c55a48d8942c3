r"""Baselines: train on one domain only (R or S), no transfer, evaluate on real images.

  python -m sdtl_jax.main --config=configs/baseline.py:domain=real --workdir=runs/real_only
  python -m sdtl_jax.main --config=configs/baseline.py:domain=synth --workdir=runs/synth_only

Variants: `demo`, `smoke`, `model=tinyvit_5m,data=pets`.
"""
from sdtl_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, data='imagenet100', model='', domain='real', demo=False,
                               smoke=False)
    if arg.domain not in ('real', 'synth'):
        raise config_lib.ConfigArgumentError(
            f'Config argument domain={arg.domain!r}; allowed: real, synth')
    c = config_lib.base(data=arg.data, model=arg.model or None, demo=arg.demo, smoke=arg.smoke)
    c.data.train = c.data[arg.domain]
    return c

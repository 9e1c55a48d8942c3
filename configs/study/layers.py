r"""The layer study (Tables 2-5, Figure 2): baselines S and R, then SDTL and RDTL for each N.

  python -m sdtl_jax.main --config=configs/study/layers.py --workdir=runs/layers
  python -m sdtl_jax.main --config=configs/study/layers.py:data=pets --workdir=runs/layers_pets
  python -m sdtl_jax.main --config=configs/study/layers.py:demo --workdir=runs/layers_demo

`data=imagenet100` (default) pairs with ResNet-50 and `data=pets` with TinyViT-5M, as in the
paper; `demo` runs on the embedded digits (8 values of N, about 20 minutes on 2 CPU cores);
`smoke` is for tests. `--config.study.num_frozen='(4, 16)'` picks other N, and
`--config.study.only=S,SDTL_N16` runs some runs only (the sweep launcher does this).
"""
from sdtl_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, data='imagenet100', model='', demo=False, smoke=False)
    c = config_lib.base(data=arg.data, model=arg.model or None, demo=arg.demo, smoke=arg.smoke)
    config_lib.add_study(c, 'layers', dataset='digits' if arg.demo or arg.smoke else arg.data)
    c.study.directions = tuple(config_lib.DIRECTIONS)
    c.study.num_frozen = tuple(range(1, 18))       # Tables 2-5: L. 0-1 .. L. 0-17
    if arg.demo:
        # Denser where the paper's curves bend: the last layers.
        c.study.num_frozen = (1, 4, 8, 12, 14, 15, 16, 17)
    if arg.smoke:
        c.study.num_frozen = (16,)
    return c

r"""The augmentation study (Table 1): R only and S only with each of the six pipelines.

  python -m sdtl_jax.main --config=configs/study/augmentations.py --workdir=runs/augmentations
  python -m sdtl_jax.main --config=configs/study/augmentations.py:demo --workdir=runs/aug_demo

PixMix mixes with pictures from `--config.aug.pixmix_dir` (default: generated fractals).
"""
from sdtl_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, data='imagenet100', model='', demo=False, smoke=False)
    c = config_lib.base(data=arg.data, model=arg.model or None, demo=arg.demo, smoke=arg.smoke)
    dataset = 'digits' if arg.demo or arg.smoke else arg.data
    config_lib.add_study(c, 'augmentations', dataset=dataset)
    c.study.domains = ('real', 'synth')
    c.study.pipelines = config_lib.AUGMENTATIONS
    if arg.smoke:
        c.study.domains, c.study.pipelines = ('real',), ('none', 'multicrop')
    return c

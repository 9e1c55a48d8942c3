r"""Train-step time of ResNet-50 with the first N layers frozen against full training (issue 2).

The frozen prefix must cost no backward pass (docs/paper.md §7): on a 2-core CPU, N = 16
should take at most 0.4x the time of N = 0 (bench/RESULTS.md has the measured figures).

  python -m bench.freeze_speed                                   # N = 0 and 16
  python -m bench.freeze_speed --num_frozen=0,8,16,17 --append

A preset of `bench/train_step_speed.py`, whose flags all apply: ResNet-50 at full width, batch
8, one 224 px global crop and no local crops, without the light ops, ours only. Prints each
N's time per step and its ratio to N = 0; `--append` adds them to bench/RESULTS.md.
"""

from absl import app, flags

from bench import train_step_speed
from sdtl_jax import cli

PRESET = dict(models=['resnet50'], num_frozen=['0', '16'], batch=8, global_size=224,
              num_local=0, light_ops=False, torch=False)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    train_step_speed.define_flags(flag_values, **PRESET)
    flags.adopt_module_key_flags(train_step_speed, flag_values=flag_values)


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    train_step_speed.main(argv, flag_values, name='freeze_speed')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)

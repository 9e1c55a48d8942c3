"""Prints a model's 18 layers and their parameter counts, from shapes only (no real init).

  python -m sdtl_jax.models --model=resnet50 --num_classes=100     # total params: 23712832
  python -m sdtl_jax.models --model=tinyvit_5m --num_classes=37    # total params: 5083604
"""

from __future__ import annotations

import functools
import math

import jax
from absl import app, flags

from sdtl_jax import cli, models


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_enum('model', None, sorted(models.MODELS), 'The model.', required=True,
                      flag_values=flag_values)
    flags.DEFINE_integer('num_classes', 1000, 'Classes of its head.', lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer('image_size', 224, 'Input size in pixels.', lower_bound=1,
                         flag_values=flag_values)


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def main(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    model = models.build({'name': flag_values.model}, num_classes=flag_values.num_classes)
    shapes = jax.eval_shape(functools.partial(models.init, model, 0, flag_values.image_size))
    params = shapes['params']
    print(f'{"layer":>5}  {"name":<18} {"params":>10}')
    for i, name in enumerate(model.layer_names()):
        print(f'{i:>5}  {name:<18} {count(params.get(name, {})):>10,}')
    print(f'total params: {count(params)}')


if __name__ == '__main__':
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)

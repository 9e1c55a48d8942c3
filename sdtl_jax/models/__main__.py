"""Prints a model's 18 layers and their parameter counts, from shapes only (no real init).

  python -m sdtl_jax.models resnet50 --num_classes=100     # total params: 23712832
  python -m sdtl_jax.models tinyvit_5m --num_classes=37    # total params: 5083604
"""

from __future__ import annotations

import argparse
import functools
import math

import jax

from sdtl_jax import models


def count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='python -m sdtl_jax.models', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('name', choices=sorted(models.MODELS))
    parser.add_argument('--num_classes', type=int, default=1000)
    parser.add_argument('--image_size', type=int, default=224)
    args = parser.parse_args(argv)

    model = models.build({'name': args.name}, num_classes=args.num_classes)
    shapes = jax.eval_shape(functools.partial(models.init, model, 0, args.image_size))
    params = shapes['params']
    print(f'{"layer":>5}  {"name":<18} {"params":>10}')
    for i, name in enumerate(model.layer_names()):
        print(f'{i:>5}  {name:<18} {count(params.get(name, {})):>10,}')
    print(f'total params: {count(params)}')


if __name__ == '__main__':
    main()

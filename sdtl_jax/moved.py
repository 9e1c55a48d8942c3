"""Commands whose module moved when the code that builds datasets went to `sdtl_jax.datasets`:
the old `python -m` path runs the new module and says where it went. Kept until the next release.
"""

import runpy
import sys

MOVED = {
    'sdtl_jax.data.demo': 'sdtl_jax.datasets.digits',
    'sdtl_jax.data.import_imagenet100': 'sdtl_jax.datasets.imagenet100',
    'sdtl_jax.data.import_pets': 'sdtl_jax.datasets.pets',
    'sdtl_jax.data.import_tfds': 'sdtl_jax.datasets.tfds',
    'sdtl_jax.data.write_arrayrecord': 'sdtl_jax.datasets.image_folder',
    'sdtl_jax.generate': 'sdtl_jax.datasets.generate',
    'sdtl_jax.generate.tiny': 'sdtl_jax.datasets.generate.tiny',
    'sdtl_jax.generate.random_sd': 'sdtl_jax.datasets.generate.random_sd',
}


def forward(old: str) -> None:
    """Runs `MOVED[old]` as `python -m` would, with the same arguments, after a note on stderr
    (not stdout, which a script may parse)."""
    new = MOVED[old]
    print(f'note: python -m {old} is now python -m {new}; the old name goes in the next '
          'release.', file=sys.stderr, flush=True)
    runpy.run_module(new, run_name='__main__', alter_sys=True)

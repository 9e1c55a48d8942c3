"""sdtl_jax: synthetic-to-real transfer learning for vision, in JAX/Flax.

Implements Hennicke et al., "Investigating the Role of Fine-Tuning in Addressing the Gap
Between Synthetic and Real Data in Generative Foundation Models" (NeurIPS 2024 workshop).
"""

__version__ = '0.1.0'
# Where the repository lives: the notebooks' first cell clones it in Colab, and the README's
# "Open in Colab" links and CITATION.cff point there (tests check each copy against this line).
REPOSITORY_URL = 'https://github.com/sdtl-jax/sdtl_jax'


def use_compilation_cache() -> None:
    """Keeps compiled programs in ~/.cache/sdtl_jax/jax_cache across runs (a study compiles
    the same init and evaluation for each run, a resumed run its whole step), unless the user
    chose a folder with JAX_COMPILATION_CACHE_DIR. For the command-line entry points."""
    import os

    import jax
    if not os.environ.get('JAX_COMPILATION_CACHE_DIR'):
        jax.config.update('jax_compilation_cache_dir', os.path.join(
            os.path.expanduser('~'), '.cache', 'sdtl_jax', 'jax_cache'))

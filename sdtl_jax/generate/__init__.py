"""Moved to `sdtl_jax.datasets.generate`; the modules here only forward the old `python -m`
paths until the next release (`sdtl_jax/moved.py`)."""

"""What a run reads: the record format, dataset folders and the registry, the reader, training
subsets and the grain pipelines (with `augment/`). Building datasets is `sdtl_jax.datasets`.
"""

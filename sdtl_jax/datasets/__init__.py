"""What builds datasets: the importers of the real data, the Stable Diffusion generator, the
digits demo, and the shard writer they share. A training run reads datasets through
`sdtl_jax.data` and never imports this package, but to build the demo data on first use.
"""

"""`python -m sdtl_jax` is `python -m sdtl_jax.main`."""
from absl import app

from sdtl_jax import main

app.run(main.main, flags_parser=main.parse_flags)

"""`python -m sdtl_jax` lists the commands, one line each (`sdtl_jax.cli.COMMANDS`)."""
import sys

from sdtl_jax import cli

sys.exit(cli.main(sys.argv))

"""Runs before any test imports jax: 8 simulated CPU devices, absl flags marked parsed."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Must be set before jax initialises its backends (TRAPS.md): the sharding tests need 8 devices.
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

from absl import flags  # noqa: E402

# grain and Orbax read absl flags; outside absl.app.run they raise UnparsedFlagAccessError.
flags.FLAGS.mark_as_parsed()

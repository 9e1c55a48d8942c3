"""Runs before any test imports jax: 8 simulated CPU devices, absl flags marked parsed."""
import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Must be set before jax initialises its backends (TRAPS.md): the sharding tests need 8 devices.
os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'

from absl import flags  # noqa: E402

# grain and Orbax read absl flags; outside absl.app.run they raise UnparsedFlagAccessError.
flags.FLAGS.mark_as_parsed()

import tempfile  # noqa: E402

import jax  # noqa: E402

# Many tests compile the same small models; a persistent cache shared by the session (and by the
# subprocesses the resume test starts) compiles each distinct step once.
_CACHE = os.environ.setdefault('SDTL_TEST_JAX_CACHE', tempfile.mkdtemp(prefix='sdtl_jax_cache_'))
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)

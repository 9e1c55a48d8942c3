"""Data parallelism in the jit-with-shardings style: a ('data',) mesh over every device.

Params and optimizer state are replicated; batches are split on their first axis. Each
process feeds its host-local slice and `to_global` stitches the slices into global arrays.
Under jit with a sharded batch, BatchNorm statistics are already global (no axis_name needed).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_mesh(devices=None) -> Mesh:
    # Not jax.make_mesh: it now defaults to Explicit axis types (JAX 0.7+); classic data
    # parallelism wants the Auto default of a plain Mesh.
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), ('data',))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P('data'))


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, Any]:
    """Host-local batch (first axis = this process's share) -> arrays over the whole mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}

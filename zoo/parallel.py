"""Data parallelism over every device JAX sees, with ``jax.sharding`` (and ``jax.distributed``).

Parameters and optimiser state are replicated; batches are split along the sample axis
over a one-axis ``Mesh`` named ``'data'``. XLA inserts the gradient all-reduce, so the
training step is the same code on 1 CPU, N CPUs (``XLA_FLAGS=--xla_force_host_platform_device_count=N``),
one GPU or a multi-host GPU cluster (``initialize_distributed()`` first, every process
running the same program; each process builds the same global batch from its own copy
of the data and contributes the rows its devices hold).
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize_distributed() -> None:
    """Start JAX's distributed runtime when launched as one process of several.

    Uses ``jax.distributed.initialize()``, which reads the cluster from the environment
    (SLURM, Open MPI, TPU, or ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``).
    A no-op for a single process.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("SLURM_NTASKS", "1") != "1":
        jax.distributed.initialize()


@functools.lru_cache(maxsize=4)
def data_mesh(n_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    if n_devices is not None:
        if n_devices > len(devices):
            raise ValueError(f"asked for {n_devices} devices, JAX sees {len(devices)}")
        devices = devices[:n_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    """Place every array leaf of ``tree`` on all devices of ``mesh``."""
    sharding = NamedSharding(mesh, PartitionSpec())
    return jax.tree.map(lambda a: jax.device_put(a, sharding) if isinstance(a, (jax.Array, np.ndarray)) else a, tree)


def shard_batch(tree, mesh: Mesh, axis: int = 0):
    """A global batch (host NumPy arrays, identical on every process) split over ``mesh`` along ``axis``."""
    n = mesh.devices.size

    def put(a):
        a = np.asarray(a)
        if a.shape[axis] % n:
            raise ValueError(f"batch axis of size {a.shape[axis]} does not split over {n} devices; choose a batch size divisible by {n}")
        spec = [None] * a.ndim
        spec[axis] = DATA_AXIS
        sharding = NamedSharding(mesh, PartitionSpec(*spec))
        return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

    return jax.tree.map(put, tree)

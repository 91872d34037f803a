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


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join a multi-process run (one process per host or per GPU); True if one was joined.

    Call it first, before any JAX computation, in every process of the run. With arguments
    they name the cluster (``"10.0.0.1:1234"``, the process count, this process's rank);
    without, ``jax.distributed.initialize()`` reads it from the environment (SLURM, Open
    MPI, or ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``), and a
    single process does nothing. CPU processes exchange gradients through gloo.
    """
    env = os.environ
    if coordinator_address is None and env.get("JAX_COORDINATOR_ADDRESS"):
        coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
        num_processes = int(env["JAX_NUM_PROCESSES"]) if "JAX_NUM_PROCESSES" in env else None
        process_id = int(env["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in env else None
    if coordinator_address is None and env.get("SLURM_NTASKS", "1") == "1":
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes; GPUs use NCCL
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


def usable_cpu_cores() -> int:
    """The CPU cores this process may run on: its affinity mask (``taskset``, a batch
    scheduler's core binding), which is also how many threads XLA's CPU client starts."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return os.cpu_count() or 1


def is_main_process() -> bool:
    """Whether this process writes the run's files (logs, checkpoints, metrics): process 0."""
    return jax.process_index() == 0


@functools.lru_cache(maxsize=4)
def data_mesh(n_devices: int | None = None) -> Mesh:
    devices = jax.devices()
    if n_devices is not None:
        if n_devices > len(devices):
            raise ValueError(f"asked for {n_devices} devices, JAX sees {len(devices)}")
        devices = devices[:n_devices]
    return Mesh(np.array(devices), (DATA_AXIS,))


def replicate(tree, mesh: Mesh):
    """Place every array leaf of ``tree`` on all devices of ``mesh`` (those of other processes too)."""
    sharding = NamedSharding(mesh, PartitionSpec())

    def put(a):
        if not isinstance(a, (jax.Array, np.ndarray)):
            return a
        if isinstance(a, jax.Array) and (a.sharding == sharding or jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)):
            return a if a.sharding == sharding else jax.device_put(a, sharding)
        host = np.asarray(to_host(a))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def to_host(tree):
    """Every array leaf as NumPy; a replicated array spanning several processes is read from this one's copy."""

    def get(a):
        if not isinstance(a, jax.Array):
            return a
        if a.is_fully_addressable:
            return np.asarray(a) if not jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key) else a
        if not a.sharding.is_fully_replicated:
            raise ValueError(f"an array sharded over several processes ({a.sharding}) has no single host copy")
        return np.asarray(a.addressable_data(0))

    return jax.tree.map(get, tree)


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

"""Batches split into equal chunks: chunk sizes that fit a CPU core's cache, and maps over chunks.

The one place for how zoo cuts a batch into pieces; fields say which chunk size suits their
working set (``train_chunk_size``, ``solve_chunk_size``, ``sampling_chunk_size``), losses and
flows run their work chunk by chunk with :func:`map_chunks`.
"""

from __future__ import annotations

import jax

from zoo._types import Array


def largest_divisor_at_most(n: int, cap: int) -> int:
    """The largest divisor of ``n`` not above ``cap`` (at least 1): a chunk size that splits a batch
    of n evenly, so a last, smaller batch still runs with a field's preferred chunking."""
    if n < 1:
        raise ValueError(f"a batch needs at least one sample, got {n}")
    return max(c for c in range(1, min(max(cap, 1), n) + 1) if n % c == 0)


def cache_sized_chunk(batch_size: int, cap: int) -> int:
    """A chunk size for work sized to a CPU core's cache: ``largest_divisor_at_most(batch_size, cap)``
    on the CPU backend, the whole batch elsewhere. Cache residency is a CPU concern; a GPU is
    fastest on the widest batch, and sequential chunks would leave it mostly idle."""
    return largest_divisor_at_most(batch_size, cap if jax.default_backend() == "cpu" else batch_size)


def to_chunks(a: Array, chunk_size: int) -> Array:
    """(b, ...) → (b // chunk_size, chunk_size, ...), chunk k holding samples k, k + b/chunk_size, ….

    Strided, not contiguous: a batch sharded over devices along its sample axis stays sharded
    inside every chunk (each device holds its share of each chunk), so a scan over the chunks
    runs data-parallel. With contiguous chunks each chunk lives on one device, and XLA gathers
    the whole batch onto every device and repeats the work there (seen in the compiled HLO).
    """
    b = a.shape[0]
    return a.reshape(chunk_size, b // chunk_size, *a.shape[1:]).swapaxes(0, 1)


def from_chunks(a: Array) -> Array:
    """The inverse of :func:`to_chunks`: (n_chunks, chunk_size, ...) → (b, ...) in the original order."""
    return a.swapaxes(0, 1).reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def map_chunks(fn, chunk_size: int, *arrays):
    """``fn(*arrays)`` for a batched ``fn``, evaluated ``chunk_size`` samples (a divisor of the batch)
    at a time, one chunk after another (``lax.map`` over :func:`to_chunks`); the outputs (any
    pytree of arrays with the batch axis first) come back in batch order. ``None`` among
    ``arrays`` is passed to ``fn`` as ``None``."""
    if chunk_size == arrays[0].shape[0]:
        return fn(*arrays)
    present = [i for i, a in enumerate(arrays) if a is not None]

    def one(chunk):
        args = [None] * len(arrays)
        for i, a in zip(present, chunk):
            args[i] = a
        return fn(*args)

    out = jax.lax.map(one, tuple(to_chunks(arrays[i], chunk_size) for i in present))
    return jax.tree.map(from_chunks, out)

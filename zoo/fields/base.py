"""The interface every vector field implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import Array, Time, Vector


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


class AbstractVectorField(eqx.Module):
    """A time-dependent vector field v_θ(t, x) on flat vectors of length ``dim``.

    ``__call__`` takes ONE sample; batch with ``jax.vmap``.
    """

    #: Whether v(t, −x) = −v(t, x) exactly (an E(n)-equivariant field, reflections included):
    #: with a symmetric base the flow's density is then the same for x and its mirror image.
    reflection_equivariant: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Length of the flat state vector."""

    #: Whether :meth:`batched` is a fused batch form, faster than ``vmap`` of ``__call__`` (the
    #: EGNN's). The path-gradient estimator then integrates a whole chunk as one state through it.
    fused_batched: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, t: Time, x: Vector) -> Vector:
        """The velocity at time t and position x (shape (dim,))."""

    def batched(self, t: Array, x: Array) -> Array:
        """v for a batch, t (b,) and x (b, dim) → (b, dim): the same function as ``vmap(self)``.

        This default is that ``vmap``; a field with a fused batch form overrides it (and sets
        :attr:`fused_batched`). Losses call it in reverse mode only.
        """
        return jax.vmap(self)(jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1]), x)

    def train_chunk_size(self, batch_size: int) -> int:
        """Samples per chunk of a flow-matching step (the losses round it down to a divisor of
        ``batch_size``). The default is the whole batch; a field whose working set outgrows a
        core's cache prefers smaller chunks."""
        return batch_size

    def solve_chunk_size(self, batch_size: int) -> int:
        """Samples per chunk of the path-gradient solves (rounded down to a divisor of
        ``batch_size``). The default is the whole batch."""
        return batch_size

"""The interface every vector field implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import Array, Time, Vector


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

    def sampling_chunk_size(self, batch_size: int, tangents: int) -> int:
        """Samples per chunk of the batched solves that sample and evaluate log densities (a divisor
        of ``batch_size``), each sample carrying ``tangents`` forward-mode tangents besides its
        value (the exact trace's basis, Hutchinson's probes; 0 without a divergence). The
        default is the whole batch."""
        return batch_size

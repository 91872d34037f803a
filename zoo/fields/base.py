"""The interface every vector field implements."""

from __future__ import annotations

import abc

import equinox as eqx

from zoo._types import Time, Vector


class AbstractVectorField(eqx.Module):
    """A time-dependent vector field v_θ(t, x) on flat vectors of length ``dim``.

    ``__call__`` takes ONE sample; batch with ``jax.vmap``.
    """

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Length of the flat state vector."""

    @abc.abstractmethod
    def __call__(self, t: Time, x: Vector) -> Vector:
        """The velocity at time t and position x (shape (dim,))."""

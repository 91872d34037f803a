"""The interface every vector field implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx

from zoo._types import Time, Vector


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

    @abc.abstractmethod
    def __call__(self, t: Time, x: Vector) -> Vector:
        """The velocity at time t and position x (shape (dim,))."""

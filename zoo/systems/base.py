"""The interface every target system implements."""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import Array, PRNGKeyArray, Scalar, Vector
from zoo.flows.base import AbstractBase, StandardNormal


class AbstractTarget(eqx.Module):
    r"""A Boltzmann target μ(x) ∝ exp(−u(x)) with the reduced energy u in units of k_B T.

    ``energy`` takes ONE configuration, either flat (dim,) or in ``event_shape``; batch with
    ``jax.vmap``. ``force`` is $-∇u$ in k_B T per length unit, derived by autodiff.
    """

    @property
    @abc.abstractmethod
    def event_shape(self) -> tuple[int, ...]:
        """Natural shape of one configuration, e.g. (2,) or (n_particles, spatial_dim)."""

    @property
    def dim(self) -> int:
        return math.prod(self.event_shape)

    @property
    def log_z(self) -> float | None:
        """log ∫exp(−u) when known exactly (then the exact KL can be reported), else None."""
        return None

    @abc.abstractmethod
    def energy(self, x: Array) -> Scalar:
        """Reduced energy u(x) of one configuration."""

    def flat(self, x: Array) -> Vector:
        """One configuration as a flat vector, with its shape checked."""
        x = jnp.asarray(x)
        if x.shape not in ((self.dim,), self.event_shape):
            raise ValueError(
                f"{type(self).__name__} takes one configuration of shape ({self.dim},) or {self.event_shape}, got {x.shape}"
            )
        return x.reshape(self.dim)

    def force(self, x: Array) -> Array:
        """−∇u(x), same shape as x."""
        x = jnp.asarray(x)
        return -jax.grad(self.energy)(x)

    def log_prob(self, x: Array) -> Scalar:
        """Normalised log density −u(x) − log Z (only when log Z is known)."""
        if self.log_z is None:
            raise NotImplementedError(f"{type(self).__name__} has no known normalising constant")
        return -self.energy(x) - self.log_z

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        """Exact samples, shape (n, dim), where the target has an exact sampler."""
        raise NotImplementedError(f"{type(self).__name__} has no exact sampler; use its data set")

    @property
    def has_exact_sampler(self) -> bool:
        return type(self).sample is not AbstractTarget.sample

    def fold(self, flow, x, log_q) -> tuple:
        """Map a flow's samples onto the part of space the target describes.

        ``x`` (n, dim) and ``log_q`` (n,) are model samples or target samples (NumPy);
        returns them with ``log_q`` the log density of the folded flow. The identity here;
        see the alanine dipeptide targets, whose data hold one mirror image of the molecule.
        """
        return x, log_q

    def topology(self):
        """The mdtraj Topology of a molecular target (atom names, residues, bonds), else None."""
        return None

    def default_base(self) -> AbstractBase:
        """The base density a flow for this target starts from."""
        return StandardNormal(self.dim)

    def field_kwargs(self) -> dict:
        """Shape facts a vector-field constructor may take (dim, n_particles, ...)."""
        return {"dim": self.dim}

"""Base distributions q_0 of the continuous normalizing flows."""

from __future__ import annotations

import abc
import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo._types import Array, PRNGKeyArray, Scalar, Vector


class AbstractBase(eqx.Module):
    """A base density q_0 on vectors of length ``dim``: sampler, log density and score."""

    #: Whether q_0(−z) = q_0(z) (centred Gaussians): see ``AbstractVectorField.reflection_equivariant``.
    reflection_symmetric: ClassVar[bool] = False

    @property
    @abc.abstractmethod
    def dim(self) -> int:
        """Length of one flat sample."""

    @abc.abstractmethod
    def log_prob(self, z: Vector) -> Scalar:
        """log q_0(z) for one sample."""

    @abc.abstractmethod
    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        """n samples, shape (n, dim)."""

    def score(self, z: Vector) -> Vector:
        """∇_z log q_0(z); analytic in subclasses where cheap."""
        return jax.grad(self.log_prob)(z)

    def project(self, x: Array) -> Array:
        """Map a vector (or a batch) onto the support of q_0 (identity for a full-space base)."""
        return x

    def support_basis(self) -> np.ndarray:
        """Directions spanning the support of q_0, as the rows of a (k, dim) NumPy array with
        ``basis.T @ basis`` equal to the matrix of :meth:`project` (so that the sum over rows
        of ``rowᵀ J row`` is tr(P J P)). By default the projected unit vectors (the identity for
        a full-space base); a base on a subspace overrides it with an orthonormal basis of
        k < dim rows, since the exact divergence takes one Jacobian-vector product per row."""
        return np.asarray(self.project(np.eye(self.dim)))


class StandardNormal(AbstractBase):
    r"""Isotropic standard normal on R^dim: $\log q_0(z) = -\|z\|^2/2 - (d/2)\log 2\pi$."""

    reflection_symmetric: ClassVar[bool] = True

    n_dim: int = eqx.field(static=True)

    @property
    def dim(self) -> int:
        return self.n_dim

    def log_prob(self, z: Vector) -> Scalar:
        return -0.5 * jnp.sum(z**2) - 0.5 * self.n_dim * math.log(2 * math.pi)

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        return jax.random.normal(key, (n, self.n_dim))

    def score(self, z: Vector) -> Vector:
        return -z


class MeanFreeNormal(AbstractBase):
    r"""Isotropic normal N(0, s²) on the centre-of-mass-free subspace of N particles in d dimensions.

    Samples have zero mean over particles. The log density is a density on the
    (N-1)·d dimensional subspace itself (its own Lebesgue measure, with an orthonormal
    basis), so it includes the normalising constant:

    $$\log q_0(z) = -\frac{\|z\|^2}{2s^2} - \tfrac{(N-1)d}{2}\log(2\pi s^2) \qquad (\bar z = 0).$$

    ``scale`` s (default 1) matches the base to the data's length unit, e.g. about 0.1 nm
    for a small molecule in nanometres. bgflow's ``MeanFreeNormalDistribution`` (s = 1)
    drops the constant (its ``_log_Z`` term is commented out), so its NLLs are ours minus
    ``(N-1)d/2 · log 2π`` (= 33.08 for LJ13, 97.68 for LJ55, 5.51 for DW4).
    """

    reflection_symmetric: ClassVar[bool] = True

    n_particles: int = eqx.field(static=True)
    spatial_dim: int = eqx.field(static=True)
    scale: float = eqx.field(static=True, default=1.0)

    def __check_init__(self):
        if self.n_particles < 2 or self.spatial_dim < 1 or not self.scale > 0:
            raise ValueError(f"MeanFreeNormal needs n_particles >= 2, spatial_dim >= 1, scale > 0; got {self.n_particles}, {self.spatial_dim}, {self.scale}")

    @property
    def dim(self) -> int:
        return self.n_particles * self.spatial_dim

    @property
    def subspace_dim(self) -> int:
        return (self.n_particles - 1) * self.spatial_dim

    def project(self, x: Array) -> Array:
        shape = x.shape
        parts = x.reshape(*shape[:-1], self.n_particles, self.spatial_dim)
        parts = parts - parts.mean(axis=-2, keepdims=True)
        return parts.reshape(shape)

    def support_basis(self) -> np.ndarray:
        r"""The Helmert basis of the mean-free particle vectors, one row per spatial axis:
        row $(k, a)$ puts $1/\sqrt{k(k+1)}$ on axis a of particles $1..k$ and
        $-k/\sqrt{k(k+1)}$ on particle $k+1$, for $k = 1 .. N-1$."""
        n = self.n_particles
        helmert = np.zeros((n - 1, n))
        for k in range(1, n):
            helmert[k - 1, :k] = 1.0
            helmert[k - 1, k] = -k
            helmert[k - 1] /= math.sqrt(k * (k + 1))
        return np.kron(helmert, np.eye(self.spatial_dim))

    def log_prob(self, z: Vector) -> Scalar:
        z = self.project(z)
        return -0.5 * jnp.sum(z**2) / self.scale**2 - 0.5 * self.subspace_dim * math.log(2 * math.pi * self.scale**2)

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        return self.scale * self.project(jax.random.normal(key, (n, self.dim)))

    def score(self, z: Vector) -> Vector:
        return -self.project(z) / self.scale**2

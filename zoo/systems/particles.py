r"""Many-particle targets: Lennard-Jones clusters (LJ13, LJ55) and the double well (DW4).

Energies are reduced (k_B T = 1) and act on one configuration of N particles in d
dimensions, flat (N·d,) or shaped (N, d). Forces come from ``jax.grad``. Flows for these
systems live on the centre-of-mass-free subspace (``MeanFreeNormal`` base).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

from zoo._types import Array, Scalar
from zoo.flows.base import AbstractBase, MeanFreeNormal
from zoo.systems.base import AbstractTarget

PAIR_CONVENTIONS = ("ordered", "halved")


def pair_distances(x: Array) -> Array:
    """Distances r_ij for i < j of one configuration (N, d), shape (N(N−1)/2,)."""
    n = x.shape[0]
    i, j = jnp.triu_indices(n, k=1)
    diff = x[i] - x[j]
    # The epsilon keeps the gradient finite for coinciding particles (energy is huge there anyway).
    return jnp.sqrt(jnp.sum(diff**2, axis=-1) + 1e-12)


class AbstractParticleSystem(AbstractTarget):
    """N identical particles in d dimensions, translation invariant."""

    n_particles: eqx.AbstractVar[int]
    spatial_dim: eqx.AbstractVar[int]

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (self.n_particles, self.spatial_dim)

    def particles(self, x: Array) -> Array:
        return self.flat(x).reshape(self.n_particles, self.spatial_dim)

    def default_base(self) -> AbstractBase:
        return MeanFreeNormal(self.n_particles, self.spatial_dim)

    def field_kwargs(self) -> dict:
        return {"dim": self.dim, "n_particles": self.n_particles, "spatial_dim": self.spatial_dim}


class LennardJones(AbstractParticleSystem):
    r"""Lennard-Jones cluster with a harmonic tether to the centre of mass.

    $$u(x) = c \sum_{i<j} ε\left[(r_m/r_{ij})^{12} - 2(r_m/r_{ij})^{6}\right]
             + \tfrac{k}{2} \sum_i \|x_i - \bar x\|^2$$

    with c = 2 for ``pair_convention='ordered'`` (the sum over ordered pairs i ≠ j, the
    convention of the published LJ13/LJ55 data sets of Klein et al. 2023, checked by the
    virial identity ⟨x·∇u⟩ = (N−1)d) and c = 1 for ``'halved'`` (bgflow's
    ``LennardJonesPotential``, which divides its pair sum by two). Pair minimum −c·ε at r_m.
    """

    n_particles: int = eqx.field(static=True, default=13)
    spatial_dim: int = eqx.field(static=True, default=3)
    epsilon: float = eqx.field(static=True, default=1.0)
    r_m: float = eqx.field(static=True, default=1.0)
    oscillator_scale: float = eqx.field(static=True, default=1.0)
    pair_convention: str = eqx.field(static=True, default="ordered")

    def __check_init__(self):
        if self.pair_convention not in PAIR_CONVENTIONS:
            raise ValueError(f"unknown pair_convention {self.pair_convention!r}; expected one of {PAIR_CONVENTIONS}")
        if self.n_particles < 2 or self.spatial_dim < 1:
            raise ValueError(f"need at least 2 particles in >= 1 dimension, got {self.n_particles}, {self.spatial_dim}")

    def pair_energy(self, r: Array) -> Array:
        """ε[(r_m/r)^12 − 2(r_m/r)^6] for unordered pairs (minimum −ε at r = r_m)."""
        s6 = (self.r_m / r) ** 6
        return self.epsilon * (s6**2 - 2.0 * s6)

    def energy(self, x: Array) -> Scalar:
        p = self.particles(x)
        c = 2.0 if self.pair_convention == "ordered" else 1.0
        pair = c * jnp.sum(self.pair_energy(pair_distances(p)))
        centred = p - p.mean(axis=0)
        return pair + 0.5 * self.oscillator_scale * jnp.sum(centred**2)


class DoubleWell(AbstractParticleSystem):
    r"""Multi-particle double well (DW4 by default: 4 particles in 2-D).

    $$u(x) = \sum_{i<j} a(d_{ij} - d_0)^4 + b(d_{ij} - d_0)^2 + c, \quad a=0.9,\ b=-4,\ c=0,\ d_0=4.$$
    """

    n_particles: int = eqx.field(static=True, default=4)
    spatial_dim: int = eqx.field(static=True, default=2)
    a: float = eqx.field(static=True, default=0.9)
    b: float = eqx.field(static=True, default=-4.0)
    c: float = eqx.field(static=True, default=0.0)
    d0: float = eqx.field(static=True, default=4.0)

    def energy(self, x: Array) -> Scalar:
        d = pair_distances(self.particles(x)) - self.d0
        return jnp.sum(self.a * d**4 + self.b * d**2 + self.c)

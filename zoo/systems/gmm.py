"""The 2-D Gaussian mixture of the path-gradient paper's toy experiment."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo._types import Array, PRNGKeyArray, Scalar
from zoo.systems.base import AbstractTarget


class GaussianMixture2D(AbstractTarget):
    r"""Four equally weighted isotropic Gaussians at $(\pm s, \pm s)$ with width σ.

    $$p(x) = \tfrac14 \sum_{k=1}^4 \mathcal N(x; m_k, σ^2 I), \qquad u(x) = -\log p(x),$$

    so the energy is the normalised negative log density (log Z = 0) and the exact
    KL(p‖q) is available. Defaults s = 1.5, σ = 0.5: neighbouring modes are 6σ apart
    (well separated, the density between them is below 2·10⁻⁴ of the peak), and the
    mixture sits comfortably inside the standard normal base.
    """

    separation: float = eqx.field(static=True, default=1.5)
    sigma: float = eqx.field(static=True, default=0.5)

    def __check_init__(self):
        if not (self.sigma > 0 and self.separation > 0):
            raise ValueError(f"GaussianMixture2D needs positive separation and sigma, got {self.separation}, {self.sigma}")

    @property
    def event_shape(self) -> tuple[int, ...]:
        return (2,)

    @property
    def log_z(self) -> float:
        return 0.0

    @property
    def means(self) -> Array:
        s = self.separation
        return jnp.array([[s, s], [-s, s], [-s, -s], [s, -s]])

    def energy(self, x: Array) -> Scalar:
        x = self.flat(x)
        sq = jnp.sum((x - self.means) ** 2, axis=-1) / self.sigma**2
        log_components = -0.5 * sq - math.log(2 * math.pi * self.sigma**2)
        return -(jax.scipy.special.logsumexp(log_components) - math.log(4))

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        k_mode, k_noise = jax.random.split(key)
        modes = jax.random.randint(k_mode, (n,), 0, 4)
        return self.means[modes] + self.sigma * jax.random.normal(k_noise, (n, 2))

    def density_grid(self, lim: float = 3.5, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Target density on a square grid, for plots."""
        g = np.linspace(-lim, lim, n)
        xx, yy = np.meshgrid(g, g)
        pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], -1), jnp.float32)
        dens = np.exp(-np.asarray(jax.vmap(self.energy)(pts))).reshape(n, n)
        return xx, yy, dens

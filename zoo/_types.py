"""Shape aliases shared across the package.

Flows work on flat configurations: one sample is a vector of ``dim`` numbers. Particle
systems store ``n_particles * spatial_dim`` coordinates in particle-major order
(x_0, y_0, z_0, x_1, ...), so ``x.reshape(n_particles, spatial_dim)`` recovers the particles.
"""

from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

Vector = Float[Array, " dim"]
Batch = Float[Array, "batch dim"]
Time = Float[Array, ""] | float

__all__ = ["Array", "Float", "Int", "PRNGKeyArray", "Scalar", "Vector", "Batch", "Time"]

"""Lennard-Jones and double-well particle systems: symmetries, forces, analytic minima, shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import random_orthogonal

from zoo.systems import DoubleWell, LennardJones
from zoo.systems.particles import pair_distances

SYSTEMS = {
    "lj13": lambda: LennardJones(),
    "lj5_2d_halved": lambda: LennardJones(n_particles=5, spatial_dim=2, pair_convention="halved"),
    "dw4": lambda: DoubleWell(),
    "dw5_3d": lambda: DoubleWell(n_particles=5, spatial_dim=3),
}


def _configuration(system, rng):
    """A spread-out configuration (no near-overlaps, so energies are moderate)."""
    n, d = system.n_particles, system.spatial_dim
    scale = 1.1 if isinstance(system, LennardJones) else 4.0
    x = rng.normal(size=(n, d)) * scale * n ** (1 / d) / 2
    return x


@pytest.fixture(autouse=True)
def _x64(x64):
    yield


@pytest.mark.parametrize("name", sorted(SYSTEMS))
@pytest.mark.parametrize("reflect", [False, True])
def test_energy_invariant_and_forces_equivariant(name, reflect):
    system = SYSTEMS[name]()
    rng = np.random.default_rng(0)
    n, d = system.n_particles, system.spatial_dim
    x = _configuration(system, rng)
    q = random_orthogonal(rng, d, reflect)
    shift = rng.normal(size=d) * 3.0
    perm = rng.permutation(n)
    y = (x @ q.T + shift)[perm]

    e_x, e_y = system.energy(jnp.asarray(x)), system.energy(jnp.asarray(y))
    np.testing.assert_allclose(e_y, e_x, rtol=1e-10, atol=1e-10)
    f_x = np.asarray(system.force(jnp.asarray(x)))
    f_y = np.asarray(system.force(jnp.asarray(y)))
    np.testing.assert_allclose(f_y, (f_x @ q.T)[perm], rtol=1e-9, atol=1e-9)
    # Translation invariance ⇒ the forces sum to zero.
    np.testing.assert_allclose(f_x.sum(axis=0), 0.0, atol=1e-9 * max(1.0, np.abs(f_x).max()))
    # Flat and shaped inputs agree.
    np.testing.assert_allclose(system.energy(jnp.asarray(x.reshape(-1))), e_x, rtol=1e-14)


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_force_is_minus_gradient_by_finite_differences(name):
    system = SYSTEMS[name]()
    x = _configuration(system, np.random.default_rng(1)).reshape(-1)
    force = np.asarray(system.force(jnp.asarray(x)))
    jitted = jax.jit(system.energy)
    energy = lambda y: float(jitted(jnp.asarray(y)))  # noqa: E731
    h = 1e-6
    fd = np.array([-(energy(x + h * e) - energy(x - h * e)) / (2 * h) for e in np.eye(x.size)])
    np.testing.assert_allclose(force, fd, rtol=1e-6, atol=1e-6 * max(1.0, np.abs(fd).max()))


@pytest.mark.parametrize("convention,depth", [("ordered", 2.0), ("halved", 1.0)])
@pytest.mark.parametrize("d", [1, 3])
def test_lennard_jones_pair_minimum(convention, depth, d):
    """Two particles: pair energy minimal at r_m with value −2ε (ordered) or −ε (halved)."""
    eps, r_m = 1.7, 1.3
    without = LennardJones(n_particles=2, spatial_dim=d, epsilon=eps, r_m=r_m, oscillator_scale=0.0, pair_convention=convention)
    with_osc = LennardJones(n_particles=2, spatial_dim=d, epsilon=eps, r_m=r_m, pair_convention=convention)

    def pair(r):
        return jnp.zeros((2, d)).at[1, 0].set(r)

    radii = np.linspace(0.8 * r_m, 1.6 * r_m, 8001)
    energies = np.asarray(jax.vmap(lambda r: without.energy(pair(r)))(jnp.asarray(radii)))
    assert abs(radii[np.argmin(energies)] - r_m) < 1e-3 * r_m
    np.testing.assert_allclose(without.energy(pair(r_m)), -depth * eps, rtol=1e-10)
    np.testing.assert_allclose(jax.grad(lambda r: without.energy(pair(r)))(r_m), 0.0, atol=1e-10)
    # The tether adds ½ Σ_i ‖x_i − x̄‖² = r²/4 for two particles.
    np.testing.assert_allclose(with_osc.energy(pair(r_m)), -depth * eps + r_m**2 / 4, rtol=1e-10)


def test_lennard_jones_matches_an_explicit_pair_loop():
    system = LennardJones(n_particles=6, spatial_dim=3)
    x = _configuration(system, np.random.default_rng(2))
    expected = 0.0
    for i in range(6):
        for j in range(6):
            if i != j:  # ordered pairs: the published convention
                r = np.linalg.norm(x[i] - x[j])
                expected += r**-12 - 2 * r**-6
    expected += 0.5 * np.sum((x - x.mean(0)) ** 2)
    np.testing.assert_allclose(system.energy(jnp.asarray(x)), expected, rtol=1e-10)


def test_double_well_pair_energy_and_minima():
    """u = a(r − d0)⁴ + b(r − d0)² + c per pair; minima at r = d0 ± √(−b/2a)."""
    system = DoubleWell(n_particles=2, spatial_dim=2)
    a, b, c, d0 = system.a, system.b, system.c, system.d0
    for r in (1.0, 3.2, 4.0, 5.5):
        x = jnp.array([[0.0, 0.0], [r * 0.6, r * 0.8]])
        np.testing.assert_allclose(system.energy(x), a * (r - d0) ** 4 + b * (r - d0) ** 2 + c, rtol=1e-10, atol=1e-10)
    radii = np.linspace(1.0, 7.0, 60001)
    energies = np.asarray(jax.vmap(lambda r: system.energy(jnp.array([[0.0, 0.0], [r, 0.0]])))(jnp.asarray(radii)))
    offset = np.sqrt(-b / (2 * a))
    local = energies[1:-1] < np.minimum(energies[:-2], energies[2:])
    np.testing.assert_allclose(np.sort(radii[1:-1][local]), [d0 - offset, d0 + offset], atol=2e-4)


def test_pair_distances():
    x = np.random.default_rng(3).normal(size=(5, 3))
    expected = [np.linalg.norm(x[i] - x[j]) for i in range(5) for j in range(i + 1, 5)]
    np.testing.assert_allclose(pair_distances(jnp.asarray(x)), expected, rtol=1e-10)


@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_wrong_shapes_raise(name):
    system = SYSTEMS[name]()
    n, d = system.n_particles, system.spatial_dim
    for shape in [(n * d + 1,), (n + 1, d), (d, n), (2, n * d), (1, n, d)]:
        with pytest.raises(ValueError, match="configuration of shape"):
            system.energy(jnp.zeros(shape))


def test_bad_parameters_raise():
    with pytest.raises(ValueError, match="pair_convention"):
        LennardJones(pair_convention="double")
    with pytest.raises(ValueError, match="at least 2 particles"):
        LennardJones(n_particles=1)

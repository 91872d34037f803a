"""Base densities: normalisation on the mean-free subspace, χ² norms and moments, scores, scaled bases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats

from zoo.flows import MeanFreeNormal, StandardNormal


@pytest.mark.parametrize("scale", [1.0, 0.3])
def test_mean_free_density_integrates_to_one_on_the_subspace(scale):
    # N = 2 particles in d = 1: the subspace is spanned by (1, −1)/√2; integrate along it.
    base = MeanFreeNormal(2, 1, scale=scale)
    direction = np.array([1.0, -1.0]) / math.sqrt(2)
    total, _ = scipy.integrate.quad(lambda u: math.exp(base.log_prob(jnp.asarray(u * direction, jnp.float32))), -12 * scale, 12 * scale)
    assert total == pytest.approx(1.0, abs=1e-5)
    u = 0.37
    assert float(base.log_prob(jnp.asarray(u * direction))) == pytest.approx(scipy.stats.norm(0, scale).logpdf(u), abs=1e-5)


@pytest.mark.parametrize("scale", [1.0, 0.2])
def test_mean_free_samples_have_chi_square_norms(key, scale):
    # ‖z‖²/s² ~ χ² with (N−1)d degrees of freedom.
    base = MeanFreeNormal(5, 3, scale=scale)
    z = base.sample(key, 20000)
    np.testing.assert_allclose(np.asarray(z).reshape(-1, 5, 3).mean(axis=1), 0, atol=1e-5)
    k = 12
    sq = np.asarray(jnp.sum(z**2, -1)) / scale**2
    assert sq.mean() == pytest.approx(k, rel=0.02)
    assert sq.var() == pytest.approx(2 * k, rel=0.06)


def test_scores_match_autodiff(key):
    for base in (StandardNormal(3), MeanFreeNormal(4, 2, scale=0.5)):
        z = base.sample(key, 1)[0]
        np.testing.assert_allclose(base.score(z), base.project(jax.grad(base.log_prob)(z)), rtol=1e-5, atol=1e-5)


def test_bad_base_settings():
    with pytest.raises(ValueError):
        MeanFreeNormal(1, 3)
    with pytest.raises(ValueError):
        MeanFreeNormal(3, 3, scale=0.0)


def test_mean_free_normal_chi_square_moments(key):
    """‖z‖² ~ χ² with (N−1)d degrees of freedom: mean k, variance 2k."""
    base = MeanFreeNormal(13, 3)
    z = base.sample(key, 200_000)
    np.testing.assert_allclose(np.asarray(z.reshape(-1, 13, 3).mean(1)), 0.0, atol=1e-5)
    sq = np.asarray(jnp.sum(z.astype(jnp.float32) ** 2, axis=1), np.float64)
    k = base.subspace_dim
    assert k == 36
    # 5 standard errors: Var ‖z‖² = 2k, and the sample variance has variance (8k² + 48k)/n.
    assert abs(sq.mean() - k) < 5 * math.sqrt(2 * k / sq.size)
    assert abs(sq.var() - 2 * k) < 5 * math.sqrt((48 * k + 8 * k * k) / sq.size)
    # log density: −‖z‖²/2 − k/2 log 2π on mean-free z.
    np.testing.assert_allclose(
        np.asarray(jax.vmap(base.log_prob)(z[:10])),
        -0.5 * sq[:10] - 0.5 * k * math.log(2 * math.pi),
        rtol=1e-5,
    )


@pytest.mark.parametrize("n,d", [(2, 1), (2, 2), (3, 1)])
def test_mean_free_normal_integrates_to_one_on_the_subspace(n, d):
    """∫ q_0 over an orthonormal basis of the centre-of-mass-free subspace is 1 (scipy quadrature)."""
    base = MeanFreeNormal(n, d)
    # Orthonormal basis of {x : Σ_i x_i = 0} ⊗ R^d.
    centred = np.eye(n) - 1.0 / n
    u, s, _ = np.linalg.svd(centred)
    basis_particles = u[:, s > 0.5]  # (n, n−1)
    basis = np.kron(basis_particles, np.eye(d))  # (n·d, (n−1)·d)
    k = basis.shape[1]
    assert k == base.subspace_dim
    log_prob = jax.jit(base.log_prob)

    def density(*coords):
        return math.exp(float(log_prob(jnp.asarray(basis @ np.asarray(coords), jnp.float32))))

    lim = 9.0
    if k == 1:
        total, _ = scipy.integrate.quad(density, -lim, lim)
    else:
        total, _ = scipy.integrate.dblquad(lambda b, a: density(a, b), -lim, lim, -lim, lim, epsabs=1e-7)
    np.testing.assert_allclose(total, 1.0, rtol=1e-4)


@pytest.mark.parametrize("n, d", [(2, 1), (4, 2), (13, 3)])
def test_support_basis_is_orthonormal_and_spans_the_projection(n, d):
    base = MeanFreeNormal(n, d)
    basis = base.support_basis()
    assert basis.shape == ((n - 1) * d, n * d)
    np.testing.assert_allclose(basis @ basis.T, np.eye((n - 1) * d), atol=1e-12)
    np.testing.assert_allclose(basis.T @ basis, np.asarray(base.project(np.eye(n * d))), atol=1e-12)
    np.testing.assert_array_equal(StandardNormal(5).support_basis(), np.eye(5))

    class FirstAxisOnly(StandardNormal):  # a base on a subspace that declares only its projection
        def project(self, x):
            return x * jnp.asarray([1.0, 0.0, 0.0])

    rows = FirstAxisOnly(3).support_basis()
    np.testing.assert_allclose(rows.T @ rows, np.diag([1.0, 0.0, 0.0]))


def test_exact_divergence_on_the_support_basis_equals_the_projected_jacobian_trace(key, x64):
    """tr(U J Uᵀ) over the (N-1)·d basis rows against tr(P J P) of the full autodiff Jacobian."""
    from zoo.flows.divergence import ExactTrace

    base = MeanFreeNormal(5, 3)
    w = jax.random.normal(key, (15, 15), jnp.float64)

    def v(y):
        return jnp.tanh(w @ y) + 0.1 * y**2

    x = base.project(jax.random.normal(jax.random.PRNGKey(1), (15,), jnp.float64))
    p = np.asarray(base.project(np.eye(15)))
    expected = np.trace(p @ np.asarray(jax.jacobian(v)(x)) @ p)
    for chunk in (None, 4):
        velocity, div = ExactTrace(chunk=chunk).velocity_and_divergence(v, x, None, base)
        np.testing.assert_allclose(velocity, v(x))
        np.testing.assert_allclose(div, expected, rtol=1e-12)

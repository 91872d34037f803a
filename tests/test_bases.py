"""Base densities: normalisation on the mean-free subspace, scores, scaled bases."""

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

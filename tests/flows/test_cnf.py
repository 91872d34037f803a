"""The CNF against analytic push-forwards, its own inverse, and Hutchinson in expectation; and
with an EGNN field on the mean-free base: a log density invariant under rotations, reflections,
permutations and translations, vmapped solves equal to per-sample ones, and the exact divergence
equal to the projected Jacobian trace."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats
from testing_utils import random_orthogonal, roughen

from zoo.fields import AbstractVectorField, EGNNField, MLPField
from zoo.flows import CNF, MeanFreeNormal, StandardNormal, log_prob_chunked, sample_and_log_prob_chunked


class LinearField(AbstractVectorField):
    """v(t, x) = A x: the flow map is expm(A), so q_θ = N(0, M Mᵀ) with M = expm(A)."""

    matrix: jax.Array

    @property
    def dim(self):
        return self.matrix.shape[0]

    def __call__(self, t, x):
        return self.matrix @ x


def _linear_flow(dim, **kwargs):
    a = 0.4 * np.random.default_rng(0).normal(size=(dim, dim))
    return CNF(LinearField(jnp.asarray(a)), StandardNormal(dim), **kwargs), a


def _analytic_log_prob(a, x):
    m = scipy.linalg.expm(a)
    return scipy.stats.multivariate_normal(mean=np.zeros(len(a)), cov=m @ m.T).logpdf(np.asarray(x))


@pytest.mark.parametrize("solver,kwargs", [("rk4", {"n_steps": 40}), ("dopri5", {"rtol": 1e-9, "atol": 1e-9})])
def test_log_prob_matches_analytic_gaussian(x64, key, solver, kwargs):
    flow, a = _linear_flow(3, solver=solver, **kwargs)
    x = jax.random.normal(key, (16, 3)) * 1.5
    np.testing.assert_allclose(flow.log_prob(x), _analytic_log_prob(a, x), rtol=0, atol=1e-7)


def test_samples_follow_analytic_push_forward(x64, key):
    flow, a = _linear_flow(3, n_steps=40)
    x, log_q = flow.sample_and_log_prob(key, 64)
    np.testing.assert_allclose(log_q, _analytic_log_prob(a, x), atol=1e-7)
    z = jax.random.normal(jax.random.split(key)[0], (64, 3))  # same base draw as sample_and_log_prob
    np.testing.assert_allclose(x, np.asarray(z) @ scipy.linalg.expm(a).T, atol=1e-7)


def test_hutchinson_matches_exact_in_expectation(x64, key):
    for noise in ("rademacher", "gaussian"):
        flow, a = _linear_flow(4, n_steps=20, divergence="hutchinson", noise=noise)
        x = jnp.ones((1, 4)) * 0.3
        keys = jax.random.split(key, 4000)
        estimates = np.asarray(jax.vmap(lambda k: flow.log_prob(x, key=k)[0])(keys))  # noqa: B023  (used within the iteration)
        exact = _analytic_log_prob(a, x)
        se = estimates.std() / np.sqrt(len(estimates))
        assert estimates.std() > 1e-3, "the estimator should be noisy for a non-diagonal Jacobian"
        assert abs(estimates.mean() - exact) < 4 * se, (noise, estimates.mean(), exact, se)


def test_hutchinson_requires_key():
    flow, _ = _linear_flow(2, divergence="hutchinson")
    with pytest.raises(ValueError, match="PRNG key"):
        flow.log_prob(jnp.zeros((3, 2)))


def test_round_trip_sample_then_log_prob(x64, key):
    field = MLPField(2, key=key)
    for solver, kwargs in [("rk4", {"n_steps": 200}), ("dopri5", {"rtol": 1e-10, "atol": 1e-10})]:
        flow = CNF(field, StandardNormal(2), solver=solver, **kwargs)
        x, log_q = flow.sample_and_log_prob(jax.random.PRNGKey(3), 32)
        np.testing.assert_allclose(flow.log_prob(x), log_q, atol=1e-6)
        z = jax.vmap(flow.inverse)(x)
        np.testing.assert_allclose(jax.vmap(flow.forward)(z), x, atol=1e-6)


def test_log_prob_matches_jax_jacobian_trace(x64, key):
    """The linearize-based exact trace equals an explicit jacobian trace."""
    field = MLPField(3, key=key)
    flow = CNF(field, StandardNormal(3))
    x = jax.random.normal(key, (3,))
    _, div = flow.velocity_and_divergence(0.3, x, None)
    np.testing.assert_allclose(div, jnp.trace(jax.jacobian(lambda y: field(0.3, y))(x)), rtol=1e-10)


@pytest.mark.parametrize("trace_chunk", [None, 1, 2, 3, 7, 50])
def test_chunked_exact_trace_matches_jacobian_trace(x64, key, trace_chunk):
    """Basis JVPs in chunks (7 = 3 + 3 + 1 for chunks of 3) sum to the full jacobian trace."""
    field = MLPField(7, key=key)
    flow = CNF(field, StandardNormal(7), trace_chunk=trace_chunk)
    x = jax.random.normal(key, (7,))
    v, div = flow.velocity_and_divergence(0.3, x, None)
    np.testing.assert_allclose(div, jnp.trace(jax.jacobian(lambda y: field(0.3, y))(x)), rtol=1e-10)
    np.testing.assert_allclose(v, field(0.3, x), rtol=1e-12)


def test_trace_chunk_must_be_positive(key):
    with pytest.raises(ValueError, match="trace chunk"):
        CNF(MLPField(2, key=key), StandardNormal(2), trace_chunk=0)


def test_chunked_matches_unchunked(key):
    flow = CNF(MLPField(2, key=key), StandardNormal(2), n_steps=8)
    out = sample_and_log_prob_chunked(flow, key, 50, chunk_size=16)
    assert out["x"].shape == (50, 2) and out["log_q"].shape == (50,)
    dens = log_prob_chunked(flow, out["x"], chunk_size=16)
    np.testing.assert_allclose(dens["log_q"], out["log_q"], atol=2e-3)
    np.testing.assert_allclose(dens["log_q"], np.asarray(flow.log_prob(jnp.asarray(out["x"]))), atol=1e-5)


def test_path_length_of_linear_field(x64):
    # v = A x with A = c·I: x(t) = e^{ct} z, ∫‖v‖dt = ‖z‖(e^c − 1).
    c = 0.7
    flow = CNF(LinearField(c * jnp.eye(2)), StandardNormal(2), n_steps=50)
    z = jnp.array([0.3, -1.2])
    sol = flow.integrate(z, 0.0, 1.0)
    np.testing.assert_allclose(sol.path_length, np.linalg.norm(z) * (np.exp(c) - 1), rtol=1e-8)
    back = flow.integrate(sol.x, 1.0, 0.0)
    np.testing.assert_allclose(back.path_length, sol.path_length, rtol=1e-8)


@pytest.mark.parametrize("bad", [jnp.zeros((4, 3)), jnp.zeros((4,)), jnp.zeros((2, 4, 2))])
def test_wrong_shapes_raise(key, bad):
    flow = CNF(MLPField(2, key=key), StandardNormal(2))
    with pytest.raises(ValueError, match="shape"):
        flow.log_prob(bad)


def test_bad_settings_raise(key):
    field = MLPField(2, key=key)
    with pytest.raises(ValueError, match="solver"):
        CNF(field, StandardNormal(2), solver="rk5")
    with pytest.raises(ValueError, match="divergence"):
        CNF(field, StandardNormal(2), divergence="approx")
    with pytest.raises(ValueError, match="dim"):
        CNF(field, StandardNormal(3))


# ---------------------------------------------------------------------------- EGNN field on the mean-free base


@pytest.mark.parametrize("n,d", [(4, 2), (5, 3)])
def test_cnf_log_density_is_invariant(n, d, key):
    field = roughen(EGNNField(n, d, hidden=32, n_layers=2, key=key), jax.random.PRNGKey(5), scale=0.1)
    flow = CNF(field, MeanFreeNormal(n, d), n_steps=4, divergence="exact")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d))
    x -= x.mean(0)
    variants = [x]
    for reflect in (False, True):
        variants.append(x @ random_orthogonal(rng, d, reflect).T)
    variants.append(x[rng.permutation(n)])
    variants.append(x + rng.normal(size=d))  # translation: density on the mean-free subspace
    batch = jnp.asarray(np.stack([v.reshape(-1) for v in variants]), jnp.float32)
    log_q = np.asarray(eqx.filter_jit(lambda f, x: f.log_prob(x))(flow, batch))
    assert np.all(np.isfinite(log_q))
    np.testing.assert_allclose(log_q, log_q[0], atol=2e-4)
    # The flow is not the identity: the density differs from the base's.
    assert abs(log_q[0] - float(flow.base.log_prob(batch[0]))) > 1e-3


@pytest.mark.parametrize(
    "n,d,kwargs",
    [(5, 3, {}), (4, 2, {}), (6, 3, {"attention": True, "tanh": True, "n_layers": 3}), (5, 3, {"atom_types": (0, 1, 1, 2, 0)})],
)
def test_vmapped_solves_equal_per_sample_solves(n, d, kwargs, key):
    """Exact log densities of a batch equal those of its samples solved one at a time.

    A guard against compiler miscompilation as well as our own batching: one way of
    feeding the first layer's r² to its forward-mode rule made XLA's CPU while-loop
    invariant code motion give wrong divergences for some batch entries of a vmapped
    fixed-step solve (off by 0.003-0.5 nats here), while every single-sample solve, every
    unrolled loop and the vmapped divergence at one t were right.
    """
    kwargs = dict(kwargs)
    atom_types = kwargs.pop("atom_types", None)
    n_layers = kwargs.pop("n_layers", 2)
    if atom_types is not None:
        kwargs.update(atom_types=atom_types, n_atom_types=max(atom_types) + 1)
    field = EGNNField(n, d, hidden=32, n_layers=n_layers, key=key, **kwargs)
    field = roughen(field, jax.random.PRNGKey(5), scale=0.1)
    flow = CNF(field, MeanFreeNormal(n, d), n_steps=4, divergence="exact")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(6, n * d)), jnp.float32)

    def euler_divergence(f, y):  # a plain lax loop, as well as the diffrax solve below
        def step(i, state):
            y, total = state
            v, div = f.velocity_and_divergence(i * 0.25, y, None)
            return y + 0.25 * v, total + div

        return jax.lax.fori_loop(0, 4, step, (y, jnp.zeros((), y.dtype)))[1]

    one_log_q = eqx.filter_jit(lambda f, y: f.log_prob(y[None])[0])
    one_euler = eqx.filter_jit(euler_divergence)
    batched_log_q = np.asarray(eqx.filter_jit(lambda f, y: f.log_prob(y))(flow, x))
    batched_euler = np.asarray(eqx.filter_jit(jax.vmap(euler_divergence, in_axes=(None, 0)))(flow, x))
    np.testing.assert_allclose(batched_log_q, [one_log_q(flow, y) for y in x], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(batched_euler, [one_euler(flow, y) for y in x], rtol=1e-5, atol=1e-4)


def test_cnf_divergence_matches_the_projected_jacobian_trace(key):
    """Exact divergence = trace of P J P (P the mean-free projector), computed here by jacfwd."""
    n, d = 4, 3
    field = roughen(EGNNField(n, d, hidden=16, n_layers=2, key=key), jax.random.PRNGKey(6))
    flow = CNF(field, MeanFreeNormal(n, d))
    x = jax.random.normal(jax.random.PRNGKey(7), (n * d,))
    _, div = eqx.filter_jit(lambda f, y: f.velocity_and_divergence(0.4, y, None))(flow, x)
    proj = np.kron(np.eye(n) - 1.0 / n, np.eye(d))
    jac = np.asarray(eqx.filter_jit(lambda f, y: jax.jacfwd(lambda z: f(0.4, z))(y))(field, x))
    np.testing.assert_allclose(div, np.trace(proj @ jac @ proj), rtol=1e-4, atol=1e-5)


def _projected_trace(field, n, d, t, x):
    proj = np.kron(np.eye(n) - 1.0 / n, np.eye(d))
    return np.trace(proj @ np.asarray(jax.jacfwd(lambda z: field(t, z))(x)) @ proj)


def test_orthogonal_probes_spanning_the_support_give_the_exact_trace(x64, key):
    """(N−1)·d orthogonal probes are a rotated basis of the mean-free support: the estimate is tr(P J P) for every draw."""
    n, d = 4, 3
    field = roughen(EGNNField(n, d, hidden=16, n_layers=2, key=key), jax.random.PRNGKey(6))
    flow = CNF(field, MeanFreeNormal(n, d), divergence="hutchinson-9-orthogonal")
    x = jax.random.normal(jax.random.PRNGKey(7), (n * d,))
    eps = flow.hutchinson_noise(jax.random.PRNGKey(8), 3, jnp.float64)
    assert eps.shape == (3, 9, n * d)
    np.testing.assert_allclose(np.einsum("nkm,nlm->nkl", eps, eps), np.broadcast_to(9 * np.eye(9), (3, 9, 9)), atol=1e-10)
    np.testing.assert_allclose(flow.base.project(eps), eps, atol=1e-12)
    exact = _projected_trace(field, n, d, 0.4, x)
    for e in eps:
        np.testing.assert_allclose(flow.velocity_and_divergence(0.4, x, e)[1], exact, rtol=1e-9)


@pytest.mark.parametrize(
    "name,one_probe", [("hutchinson-3", "hutchinson"), ("hutchinson-3-orthogonal", "hutchinson-orthogonal"), ("hutchinson-2-gaussian", "hutchinson-gaussian")]
)
def test_multi_probe_hutchinson_is_unbiased_and_spreads_less(x64, key, name, one_probe):
    """Both estimators' means over many draws are the projected Jacobian trace (within 4 standard
    errors), and several probes spread less than one of the same noise (1/√k for independent ones)."""
    n, d = 4, 3
    field = roughen(EGNNField(n, d, hidden=16, n_layers=2, key=key), jax.random.PRNGKey(6))
    x = jax.random.normal(jax.random.PRNGKey(7), (n * d,))
    exact = _projected_trace(field, n, d, 0.4, x)

    def estimates(divergence):
        flow = CNF(field, MeanFreeNormal(n, d), divergence=divergence)
        eps = flow.hutchinson_noise(jax.random.PRNGKey(9), 4000, jnp.float64)
        return np.asarray(eqx.filter_jit(jax.vmap(lambda e: flow.velocity_and_divergence(0.4, x, e)[1]))(eps))

    several, one = estimates(name), estimates(one_probe)
    for values in (several, one):
        assert abs(values.mean() - exact) < 4 * values.std() / np.sqrt(len(values)), (values.mean(), exact)
    assert several.std() < 0.8 * one.std(), (several.std(), one.std())


def test_hutchinson_names_round_trip_and_bad_ones_are_refused():
    flow = CNF(MLPField(4, key=jax.random.PRNGKey(0)), MeanFreeNormal(2, 2))
    for name in ["hutchinson", "hutchinson-8", "hutchinson-3-orthogonal", "hutchinson-gaussian", "exact"]:
        assert flow.with_settings(divergence=name).divergence.name == name
        assert flow.with_settings(divergence=name).describe()["divergence"] == name
    assert flow.with_settings(divergence="hutchinson-4").as_described({"divergence": "hutchinson"}).divergence.probes == 1
    for bad in ["hutchinson-0", "hutchinson-x", "hutchinson-2-2", "hutchinson-1-3", "hutchinsons", "trace", "exact-4"]:
        with pytest.raises(ValueError, match="unknown divergence"):
            flow.with_settings(divergence=bad)
    with pytest.raises(ValueError, match="exceed the 2 dimensions"):
        flow.with_settings(divergence="hutchinson-3-orthogonal").hutchinson_noise(jax.random.PRNGKey(0), 1)
    with pytest.raises(ValueError, match="probes must be a positive"):
        from zoo.flows.divergence import Hutchinson

        Hutchinson(probes=0)

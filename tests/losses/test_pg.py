"""Path-gradient estimator: augmented adjoint vs autodiff and finite differences, backsolve vs
direct differentiation, sticking the landing, unbiasedness against maximum likelihood, the
mean-free base, and the loss wrappers."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from zoo.data import Batch
from zoo.fields import AbstractVectorField, MLPField
from zoo.flows import CNF, MeanFreeNormal, StandardNormal
from zoo.losses import MaximumLikelihood, PathGradientForwardKL, grad_log_prob, path_gradient
from zoo.systems import GaussianMixture2D


def _flow(seed=3, *, width=16, depth=2, **kwargs):
    field = MLPField(2, width=width, depth=depth, key=jax.random.PRNGKey(seed))
    return CNF(field, StandardNormal(2), **kwargs)


class ProjectedMLP(AbstractVectorField):
    """An MLP field whose output is projected onto the mean-free subspace (not equivariant)."""

    mlp: MLPField
    base: MeanFreeNormal

    @property
    def dim(self):
        return self.mlp.dim

    def __call__(self, t, x):
        return self.base.project(self.mlp(t, x))


def _mean_free_flow(seed=4, **kwargs):
    base = MeanFreeNormal(n_particles=3, spatial_dim=2)
    return CNF(ProjectedMLP(MLPField(6, width=16, depth=2, key=jax.random.PRNGKey(seed)), base), base, **kwargs)


class AffineField(AbstractVectorField):
    """v(t, x) = a ⊙ x + b: a divergence Σa that does not depend on the state.

    The flow map is x(1) = e^a z + b (e^a − 1)/a per coordinate, so from a standard normal
    base q_θ = N(b (e^a − 1)/a, e^{2a}) in closed form.
    """

    a: jax.Array
    b: jax.Array

    @property
    def dim(self):
        return self.a.shape[0]

    def __call__(self, t, x):
        return self.a * x + self.b


def _affine_flow(dim=3, **kwargs):
    a = jnp.linspace(-0.3, 0.4, dim)
    return CNF(AffineField(a, jnp.linspace(0.5, -0.4, dim)), StandardNormal(dim), **kwargs)


def _closed_form_log_q(field, x):
    mean = field.b * jnp.expm1(field.a) / field.a
    return jnp.sum(jax.scipy.stats.norm.logpdf(x, mean, jnp.exp(field.a)), axis=-1)


def _flat(grads):
    return ravel_pytree(eqx.filter(grads, eqx.is_inexact_array))[0]


@eqx.filter_jit
def _per_sample_pg(model, x, forces, eps=None, adjoint="backsolve"):
    """(n, n_params) path gradients, one sample at a time."""

    def one(xi, fi, ei):
        def surrogate(m):
            e = None if ei is None else ei[None]
            return path_gradient(m, xi[None], fi[None], eps=e, adjoint=adjoint).surrogate[0]

        return _flat(eqx.filter_grad(surrogate)(model))

    return jax.vmap(one)(x, forces, eps)


@eqx.filter_jit
def _per_sample_ml(model, x):
    """(n, n_params) gradients of −log q_θ(x_i) through the solver."""
    return jax.vmap(lambda xi: _flat(eqx.filter_grad(lambda m: -m.log_prob_single(xi))(model)))(x)


@eqx.filter_jit
def _batch_pg(model, x, forces, *, adjoint, eps=None):
    return _flat(eqx.filter_grad(lambda m: jnp.mean(path_gradient(m, x, forces, eps=eps, adjoint=adjoint).surrogate))(model))


# ----------------------------------------------------------------------------- ∇_x log q_θ
def test_grad_log_q_matches_autodiff_and_finite_differences(x64, key):
    model = _flow(n_steps=30)
    x = 1.5 * jax.random.normal(key, (6, 2))
    adjoint, z, log_q = eqx.filter_jit(eqx.filter_vmap(grad_log_prob, in_axes=(None, 0)))(model, x)
    autodiff = jax.jit(jax.vmap(jax.grad(model.log_prob_single)))(x)
    log_prob = jax.jit(jax.vmap(model.log_prob_single))
    h = 1e-5
    fd = np.stack([(log_prob(x + h * e) - log_prob(x - h * e)) / (2 * h) for e in jnp.eye(2)], axis=-1)
    assert np.abs(autodiff).min() > 1e-2  # a nontrivial gradient
    np.testing.assert_allclose(fd, autodiff, atol=1e-8)
    # Continuous adjoint vs the discrete gradient: agree to RK4 tolerance.
    np.testing.assert_allclose(adjoint, autodiff, atol=1e-8)
    np.testing.assert_allclose(log_q, model.log_prob(x), atol=1e-8)
    np.testing.assert_allclose(z, jax.vmap(model.inverse)(x), atol=1e-12)


@pytest.mark.parametrize("divergence", ["hutchinson", "hutchinson-3"])
def test_grad_log_q_hutchinson_matches_autodiff_with_the_same_noise(x64, key, divergence):
    model = _flow(n_steps=30, divergence=divergence)
    x = 1.5 * jax.random.normal(key, (6, 2))
    eps = model.hutchinson_noise(jax.random.PRNGKey(11), 6, x.dtype)
    terms = eqx.filter_jit(path_gradient)(model, x, jnp.zeros_like(x), eps=eps)
    autodiff = jax.jit(jax.vmap(jax.grad(model.log_prob_single)))(x, eps)
    np.testing.assert_allclose(terms.grad_log_q, autodiff, atol=1e-8)
    np.testing.assert_allclose(terms.log_q, jax.jit(jax.vmap(model.log_prob_single))(x, eps), atol=1e-8)
    # The noise matters: the exact-divergence gradient differs (so the check above can fail).
    exact_model = CNF(model.field, model.base, n_steps=30, divergence="exact")
    exact = jax.jit(jax.vmap(jax.grad(exact_model.log_prob_single)))(x)
    assert np.abs(terms.grad_log_q - exact).max() > 1e-3


# ----------------------------------------------------------------------------- θ-adjoint
# The per-sample and batch tests below share one model and one sample count, so the
# compiled estimators are reused across tests (compilation dominates their run time).
N = 400


def _gmm_batch(seed=5, n=N):
    target = GaussianMixture2D()
    x = target.sample(jax.random.PRNGKey(seed), n)
    return x, jax.vmap(target.force)(x)


def test_backsolve_matches_direct_differentiation(x64):
    model = _flow(n_steps=15)
    x, forces = _gmm_batch()
    backsolve = _batch_pg(model, x, forces, adjoint="backsolve")
    direct = _batch_pg(model, x, forces, adjoint="direct")
    assert np.linalg.norm(direct) > 1e-2
    np.testing.assert_allclose(backsolve, direct, atol=1e-7 * np.abs(direct).max())


@pytest.mark.slow
@pytest.mark.parametrize(
    "kwargs,rtol",
    [({"n_steps": 20, "divergence": "hutchinson"}, 1e-7), ({"solver": "dopri5", "rtol": 1e-11, "atol": 1e-11}, 1e-5)],
)
def test_backsolve_matches_direct_per_sample(x64, key, kwargs, rtol):
    # dopri5: differentiating through the adaptive solver is the less accurate of the two
    # (at rtol = atol = 1e-9 it is 1.5e-5 from a 200-step RK4 reference, backsolve 2e-6).
    model = _flow(**kwargs)
    x, forces = _gmm_batch(n=8)
    eps = model.hutchinson_noise(jax.random.PRNGKey(1), 8, x.dtype) if model.needs_key else None
    backsolve = _per_sample_pg(model, x, forces, eps)
    direct = _per_sample_pg(model, x, forces, eps, adjoint="direct")
    assert np.linalg.norm(direct, axis=1).min() > 1e-2
    np.testing.assert_allclose(backsolve, direct, atol=rtol * np.abs(direct).max())


# ----------------------------------------------------------------------------- properties
def test_sticks_the_landing(x64, key):
    """u = −log q_θ: every per-sample path gradient vanishes; maximum-likelihood gradients do not."""
    model = _flow(n_steps=15)
    x = 1.5 * jax.random.normal(key, (N, 2))
    forces = jax.jit(jax.vmap(jax.grad(model.log_prob_single)))(x)  # F = −∇u = ∇ log q_θ
    pg = np.linalg.norm(_per_sample_pg(model, x, forces), axis=1)
    ml = np.linalg.norm(_per_sample_ml(model, x), axis=1)
    assert ml.min() > 1e-2
    assert pg.max() < 1e-7 * np.median(ml), (pg.max(), np.median(ml))
    assert (pg < 1e-6 * ml).all()


@pytest.mark.parametrize("field", ["mlp", "affine"])
def test_mean_path_gradient_equals_maximum_likelihood_gradient(x64, field):
    """E_μ[g_PG] = −E_μ[∇_θ log q_θ] on a mixture the model does not fit, by z-scores of the
    per-sample differences in the mean-gradient direction and in random directions.

    The affine field's divergence does not depend on the state, the case in which batched
    log-density gradients once counted the divergence once per batch entry."""
    model = _flow(n_steps=15) if field == "mlp" else _affine_flow(2, n_steps=15)
    x, forces = _gmm_batch()
    pg = np.asarray(_per_sample_pg(model, x, forces))
    ml = np.asarray(_per_sample_ml(model, x))
    mean_ml = ml.mean(0)
    rng = np.random.default_rng(0)
    directions = [mean_ml / np.linalg.norm(mean_ml)] + [u / np.linalg.norm(u) for u in rng.normal(size=(5, ml.shape[1]))]
    for u in directions:
        d = (pg - ml) @ u
        se = d.std(ddof=1) / np.sqrt(N)
        assert abs(d.mean()) < 4.0 * se, (d.mean(), se)
    # The signal is there: the mean gradient is many standard errors from zero ...
    u = directions[0]
    assert (ml @ u).mean() > 8 * (ml @ u).std(ddof=1) / np.sqrt(N)
    # ... and the test has power: dropping the force term (a plausible bug) is detected.
    se = ((pg - ml) @ u).std(ddof=1) / np.sqrt(N)
    biased = np.asarray(_batch_pg(model, x, jnp.zeros_like(forces), adjoint="backsolve")) @ u
    assert abs(biased - (ml @ u).mean()) > 5 * se
    # The batched estimator is the mean of the per-sample ones.
    np.testing.assert_allclose(_batch_pg(model, x, forces, adjoint="backsolve"), pg.mean(0), atol=1e-10)


@pytest.mark.parametrize("divergence", ["exact", "hutchinson"])
def test_maximum_likelihood_gradient_with_a_state_independent_divergence(x64, divergence, key):
    """The batched maximum-likelihood gradient equals the closed form's gradient on the same
    samples and the mean of per-sample gradients, for a field whose divergence is Σa.

    With the divergence channel of the batched solve unbatched, ∂/∂a came out too large by
    batch − 1 (exact divergence; Rademacher noise made the Hutchinson channel batched)."""
    model = _affine_flow(3, n_steps=30, divergence=divergence)
    x = 0.8 + 1.3 * jax.random.normal(jax.random.PRNGKey(11), (64, 3))
    batched = eqx.filter_jit(eqx.filter_grad(lambda m: MaximumLikelihood()(m, Batch(x=x), key)[0]))(model)
    closed_form = eqx.filter_grad(lambda m: -jnp.mean(_closed_form_log_q(m.field, x)))(model)
    eps = model.hutchinson_noise(key, 64, x.dtype) if model.needs_key else None
    per_sample = eqx.filter_jit(
        lambda m: jax.lax.map(lambda a: _flat(eqx.filter_grad(lambda m_: -m_.log_prob_single(*a))(m)), (x, eps))
    )(model)
    assert np.abs(_flat(closed_form)).min() > 1e-2
    np.testing.assert_allclose(_flat(batched), _flat(closed_form), atol=1e-7)
    np.testing.assert_allclose(_flat(batched), np.mean(per_sample, axis=0), atol=1e-10)


# ----------------------------------------------------------------------------- mean-free base
def test_mean_free_base_stays_on_the_subspace(x64, key):
    model = _mean_free_flow(n_steps=20)
    base = model.base
    x = 1.3 * base.sample(key, 6)
    # Forces with a centre-of-mass component: c must still be mean-free.
    forces = -x + 0.7
    terms = eqx.filter_jit(path_gradient)(model, x, forces)

    def particle_mean(v):
        return np.abs(np.asarray(v).reshape(-1, 3, 2).mean(axis=1)).max()

    assert particle_mean(terms.grad_log_q) < 1e-12
    assert particle_mean(terms.c) < 1e-12
    assert particle_mean(terms.z) < 1e-12
    autodiff = base.project(jax.jit(jax.vmap(jax.grad(model.log_prob_single)))(x))
    assert np.abs(autodiff).max() > 1e-2
    np.testing.assert_allclose(terms.grad_log_q, autodiff, atol=1e-8)
    # The projected force gives the same path gradient (the COM part is invisible to the flow).
    backsolve = _batch_pg(model, x, forces, adjoint="backsolve")
    assert np.linalg.norm(backsolve) > 1e-2
    np.testing.assert_allclose(_batch_pg(model, x, base.project(forces), adjoint="backsolve"), backsolve, atol=1e-12)


@pytest.mark.slow
def test_mean_free_backsolve_matches_direct(x64, key):
    model = _mean_free_flow(n_steps=20)
    x = 1.3 * model.base.sample(key, 6)
    forces = -x + 0.7
    backsolve = _batch_pg(model, x, forces, adjoint="backsolve")
    direct = _batch_pg(model, x, forces, adjoint="direct")
    np.testing.assert_allclose(backsolve, direct, atol=1e-7 * np.abs(direct).max())


# ----------------------------------------------------------------------------- loss wrappers
def test_missing_forces_raise_a_clear_error(key):
    model = _flow()
    x = jax.random.normal(key, (4, 2))
    with pytest.raises(ValueError, match="batch.forces is None"):
        PathGradientForwardKL()(model, Batch(x), key)
    with pytest.raises(ValueError, match="forces"):
        path_gradient(model, x, None)
    with pytest.raises(ValueError, match="shape"):
        path_gradient(model, x, jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="energy"):
        PathGradientForwardKL(force_source="energy")
    with pytest.raises(ValueError, match="PRNG key"):
        path_gradient(_flow(divergence="hutchinson"), x, jnp.zeros_like(x))
    assert PathGradientForwardKL().needs_forces and not MaximumLikelihood().needs_forces
    # With forces from the energy, training data without forces are accepted.
    assert not PathGradientForwardKL(force_source="energy", energy=GaussianMixture2D().energy).needs_forces


def test_force_sources_agree(key):
    target = GaussianMixture2D()
    model = _flow()
    x = target.sample(key, 32)
    batch = Batch(x, jax.vmap(target.force)(x))
    data_loss = PathGradientForwardKL()
    energy_loss = PathGradientForwardKL(force_source="energy", energy=target.energy)
    np.testing.assert_allclose(energy_loss.forces(Batch(x)), data_loss.forces(batch), rtol=1e-5, atol=1e-6)
    # The surrogate's value ⟨c, T_θ(z)⟩ sees the forces; its gradient path is shared.
    v_data, aux_data = eqx.filter_jit(data_loss)(model, batch, key)
    v_energy, aux_energy = eqx.filter_jit(energy_loss)(model, Batch(x), key)
    np.testing.assert_allclose(v_energy, v_data, rtol=1e-5)
    np.testing.assert_allclose(aux_energy["c_norm"], aux_data["c_norm"], rtol=1e-5)
    # GaussianMixture2D has log Z = 0, so kl_plus_log_z is the forward KL: mean(log p − log q).
    kl = jnp.mean(-jax.vmap(target.energy)(x)) + aux_data["nll"]
    np.testing.assert_allclose(aux_energy["kl_plus_log_z"], kl, rtol=1e-5)
    assert "kl_plus_log_z" not in aux_data
    assert abs(float(aux_data["c_norm"]) - float(aux_data["grad_log_q_norm"])) > 1e-2


def test_loss_aux_and_maximum_likelihood(key):
    target = GaussianMixture2D()
    model = _flow(divergence="hutchinson")
    x = target.sample(key, 32)
    batch = Batch(x, jax.vmap(target.force)(x))
    loss, aux = eqx.filter_jit(PathGradientForwardKL())(model, batch, key)
    nll = -model.log_prob(x, key=key).mean()  # same key → same Hutchinson noise
    np.testing.assert_allclose(aux["nll"], nll, rtol=1e-4)
    assert aux["reconstruction_error"] < 1e-3
    ml, ml_aux = eqx.filter_jit(MaximumLikelihood())(model, batch, key)
    np.testing.assert_allclose(ml, nll, rtol=1e-6)
    np.testing.assert_allclose(ml_aux["nll"], nll, rtol=1e-6)


def _perturbed_egnn(**kwargs):
    """An EGNN with every weight perturbed, so that the (near-identity at initialisation) flow moves samples."""
    from zoo.fields import EGNNField

    field = EGNNField(5, 3, hidden=16, n_layers=2, key=jax.random.PRNGKey(0), **kwargs)
    leaves, treedef = jax.tree.flatten(eqx.filter(field, eqx.is_inexact_array))
    keys = jax.random.split(jax.random.PRNGKey(4), len(leaves))
    noisy = [leaf + 0.1 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return eqx.combine(jax.tree.unflatten(treedef, noisy), eqx.filter(field, eqx.is_inexact_array, inverse=True))


@pytest.mark.parametrize("options", [{}, {"attention": True, "tanh": True}])
def test_egnn_batched_augmented_solve_matches_per_sample_autodiff(x64, options):
    """The augmented solve on the EGNN fast path (reverse over reverse) gives the per-sample
    forward-mode solve's x(1), ∇ log q and log q, and ∇ log q equals autodiff of log q."""
    from zoo.losses.pg import augmented_forward, augmented_forward_batched

    model = CNF(_perturbed_egnn(**options), MeanFreeNormal(5, 3), n_steps=6, divergence="hutchinson")
    z = model.base.sample(jax.random.PRNGKey(1), 4)
    eps = model.hutchinson_noise(jax.random.PRNGKey(2), 4, z.dtype)
    batched = eqx.filter_jit(augmented_forward_batched)(model, z, eps)
    per_sample = eqx.filter_jit(jax.vmap(augmented_forward, in_axes=(None, 0, 0)))(model, z, eps)
    for a, b in zip(batched, per_sample):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
    x1, grad, log_q = batched
    autodiff = jax.vmap(jax.grad(model.log_prob_single))(x1, eps)
    # The continuous adjoint matches the discrete gradient up to the RK4-6 error only.
    np.testing.assert_allclose(grad, model.base.project(autodiff), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(log_q, jax.vmap(model.log_prob_single)(x1, eps), rtol=1e-6)


def test_multi_probe_noise_leaves_the_egnn_fast_path_for_the_per_sample_solve(x64):
    """Several probes per sample take the per-sample augmented solve (the fast path takes one
    probe each): its ∇ log q and log q are autodiff of the same multi-probe log q."""
    model = CNF(_perturbed_egnn(), MeanFreeNormal(5, 3), n_steps=6, divergence="hutchinson-4-orthogonal")
    x = model.base.sample(jax.random.PRNGKey(1), 4)
    eps = model.hutchinson_noise(jax.random.PRNGKey(2), 4, x.dtype)
    terms = eqx.filter_jit(path_gradient)(model, x, jnp.zeros_like(x), eps=eps)
    autodiff = jax.vmap(jax.grad(model.log_prob_single))(x, eps)
    np.testing.assert_allclose(terms.grad_log_q, model.base.project(autodiff), rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(terms.log_q, jax.vmap(model.log_prob_single)(x, eps), rtol=1e-5, atol=1e-5)


def test_egnn_backsolve_matches_direct():
    """The θ-adjoint runs the EGNN through its batched fast path (hand-written pair-message
    VJP); its path gradient must equal differentiation through the solver (vmap + autodiff)."""
    model = CNF(_perturbed_egnn(), MeanFreeNormal(5, 3), n_steps=8, divergence="hutchinson")
    x = model.base.sample(jax.random.PRNGKey(1), 8)
    forces = model.base.project(jax.random.normal(jax.random.PRNGKey(2), x.shape))
    moved = jnp.linalg.norm(jax.vmap(model.inverse)(x) - x) / jnp.linalg.norm(x)
    assert moved > 0.05, "the perturbed flow must transport samples for the check to mean anything"

    def grads(adjoint):
        loss = lambda m: jnp.mean(path_gradient(m, x, forces, jax.random.PRNGKey(3), adjoint=adjoint).surrogate)  # noqa: E731
        return ravel_pytree(eqx.filter(eqx.filter_grad(loss)(model), eqx.is_inexact_array))[0]

    backsolve, direct = grads("backsolve"), grads("direct")
    assert float(jnp.linalg.norm(direct)) > 0
    np.testing.assert_allclose(backsolve, direct, rtol=0, atol=2e-3 * float(jnp.max(jnp.abs(direct))))


@pytest.mark.parametrize("fast_path", [True, False])
def test_chunked_solves_give_the_unchunked_path_gradient(x64, fast_path):
    """Solving the batch in chunks (lax.map for the augmented solve, a scan summing a_θ for the
    adjoint) changes no number: terms and θ-gradient equal the one-chunk estimator. Covers the
    EGNN fast path (Hutchinson) and the per-sample path (exact divergence)."""
    divergence = "hutchinson" if fast_path else "exact"
    model = CNF(_perturbed_egnn(), MeanFreeNormal(5, 3), n_steps=5, divergence=divergence)
    x = model.base.sample(jax.random.PRNGKey(1), 6)
    forces = model.base.project(jax.random.normal(jax.random.PRNGKey(2), x.shape))

    @eqx.filter_jit
    def estimate(m, chunk_size):
        def loss(mm):
            terms = path_gradient(mm, x, forces, jax.random.PRNGKey(3), chunk_size=chunk_size)
            return jnp.mean(terms.surrogate), terms

        return eqx.filter_grad(loss, has_aux=True)(m)

    grads_whole, terms_whole = estimate(model, 6)
    assert float(jnp.linalg.norm(_flat(grads_whole))) > 0
    for chunk_size in (2, 4):  # three chunks of 2; 4 is not a divisor of 6: two chunks of 3
        grads, terms = estimate(model, chunk_size)
        np.testing.assert_allclose(_flat(grads), _flat(grads_whole), rtol=1e-10, atol=1e-12)
        for a, b in zip(terms, terms_whole):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_egnn_solve_chunk_sizes_and_bad_chunk_size():
    """The field's rule (≤ 20000 layer·pair rows, a divisor of the batch) at the benchmark sizes,
    and a non-positive chunk size is refused by the loss."""
    from zoo.fields import EGNNField

    key = jax.random.PRNGKey(0)
    assert EGNNField(22, 3, n_layers=5, key=key).solve_chunk_size(50) == 5
    assert EGNNField(55, 3, n_layers=3, key=key).solve_chunk_size(8) == 2
    assert EGNNField(13, 3, n_layers=3, key=key).solve_chunk_size(64) == 32
    assert EGNNField(4, 2, n_layers=3, hidden=32, key=key).solve_chunk_size(256) == 256
    assert EGNNField(55, 3, n_layers=3, key=key).solve_chunk_size(7) == 1
    with pytest.raises(ValueError, match="chunk_size must be a positive"):
        PathGradientForwardKL(chunk_size=0)


def test_cache_sized_chunks_are_a_cpu_rule(monkeypatch):
    """Chunking for cache residency applies on the CPU backend only; on a GPU backend the EGNN
    asks for the whole batch in training and in the path-gradient solves."""
    from zoo.fields import EGNNField

    field = EGNNField(55, 3, n_layers=3, key=jax.random.PRNGKey(0))
    assert (field.train_chunk_size(64), field.solve_chunk_size(8)) == (1, 2)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert (field.train_chunk_size(64), field.solve_chunk_size(8)) == (64, 8)

"""Equivariant OT pairing (zoo.losses.equivariant and its host search, zoo.losses._host_alignment):
Kabsch rotations, linear assignment, particle permutations and the aligned cost matrix against
scipy, the host search against the vectorised one, and the equivariant OT loss on an EGNN flow."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from scipy.spatial.transform import Rotation
from scipy.stats import special_ortho_group
from testing_utils import random_orthogonal

from zoo.data import Batch
from zoo.fields import EGNNField, MLPField
from zoo.flows import CNF, MeanFreeNormal, StandardNormal
from zoo.losses import EquivariantOTFlowMatching, FlowMatching, OTFlowMatching, exact_assignment, linear_assignment
from zoo.losses.equivariant import (
    align_noise,
    aligned_cost,
    aligned_cost_matrix,
    kabsch_cost,
    kabsch_rotation,
    particle_cost,
    particle_permutation,
)


def test_kabsch_recovers_a_known_rotation():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(7, 3))
    x -= x.mean(0)
    r = special_ortho_group.rvs(3, random_state=rng)
    y = x @ r.T
    got = np.asarray(kabsch_rotation(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(got, r, atol=1e-5)
    np.testing.assert_allclose(kabsch_cost(jnp.asarray(x), jnp.asarray(y)), 0.0, atol=1e-4)
    # With noise: the same optimum as scipy's align_vectors (proper rotation, least squares).
    y_noisy = y + 0.3 * rng.normal(size=y.shape)
    ref, _ = Rotation.align_vectors(y_noisy, x)
    got = np.asarray(kabsch_rotation(jnp.asarray(x), jnp.asarray(y_noisy)))
    np.testing.assert_allclose(got, ref.as_matrix(), atol=1e-5)


@pytest.mark.parametrize("d", [2, 3])
def test_kabsch_is_proper_for_mirror_images(d):
    """For a reflected copy the best *proper* rotation is returned (det = +1), and its cost is exact."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, d))
    y = x @ random_orthogonal(rng, d, reflect=True).T
    rot = np.asarray(kabsch_rotation(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
    np.testing.assert_allclose(rot @ rot.T, np.eye(d), atol=1e-5)
    cost = float(kabsch_cost(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_allclose(cost, np.sum((x @ rot.T - y) ** 2), rtol=1e-4)
    # Brute force over rotations (d = 2: angles; d = 3: scipy's proper-rotation optimum).
    if d == 2:
        ang = np.linspace(0, 2 * np.pi, 200001)
        c, s = np.cos(ang), np.sin(ang)
        xr = np.stack([c[:, None] * x[:, 0] - s[:, None] * x[:, 1], s[:, None] * x[:, 0] + c[:, None] * x[:, 1]], -1)
        best = np.min(np.sum((xr - y) ** 2, axis=(1, 2)))
    else:
        ref, _ = Rotation.align_vectors(y, x)
        best = np.sum((x @ ref.as_matrix().T - y) ** 2)
    np.testing.assert_allclose(cost, best, rtol=1e-4)
    assert cost > 1e-3  # a mirror image is not reachable by a proper rotation


@pytest.mark.parametrize("n", [2, 5, 13, 30])
def test_linear_assignment_equals_scipy(n):
    rng = np.random.default_rng(n)
    costs = rng.normal(size=(40, n, n)) ** 2
    perms = np.asarray(jax.jit(jax.vmap(linear_assignment))(jnp.asarray(costs, jnp.float32)))
    for cost, perm in zip(costs, perms):
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        expected = np.empty(n, int)
        expected[cols] = rows
        np.testing.assert_array_equal(perm, expected)  # continuous random costs: unique optimum


def test_linear_assignment_with_ties_is_optimal():
    rng = np.random.default_rng(6)
    costs = rng.integers(0, 4, size=(50, 9, 9)).astype(np.float32)
    perms = np.asarray(jax.jit(jax.vmap(linear_assignment))(jnp.asarray(costs)))
    for cost, perm in zip(costs, perms):
        assert sorted(perm) == list(range(9))
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        assert cost[perm, np.arange(9)].sum() == cost[rows, cols].sum()
    with pytest.raises(ValueError, match="square"):
        linear_assignment(jnp.zeros((3, 4)))


def test_particle_permutation_matches_scipy():
    rng = np.random.default_rng(7)
    permutation = jax.jit(particle_permutation)
    vectorised = jax.jit(lambda a, b: linear_assignment(particle_cost(a, b)))
    for _ in range(10):
        x, y = rng.normal(size=(13, 3)), rng.normal(size=(13, 3))
        perm = np.asarray(permutation(jnp.asarray(x), jnp.asarray(y)))
        cost = ((x[:, None] - y[None]) ** 2).sum(-1)
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        expected = np.empty(13, int)
        expected[cols] = rows
        np.testing.assert_array_equal(perm, expected)
        np.testing.assert_array_equal(np.asarray(vectorised(jnp.asarray(x), jnp.asarray(y))), expected)


def test_particle_permutation_respects_atom_types():
    rng = np.random.default_rng(8)
    types = np.array([0, 0, 1, 1, 1, 2])
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    perm = np.asarray(jax.jit(lambda a, b: particle_permutation(a, b, types))(jnp.asarray(x), jnp.asarray(y)))
    np.testing.assert_array_equal(types[perm], types)
    # Within each type the assignment is scipy's on that block.
    for a in np.unique(types):
        idx = np.flatnonzero(types == a)
        cost = ((x[idx][:, None] - y[idx][None]) ** 2).sum(-1)
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        np.testing.assert_array_equal(perm[idx[cols]], idx[rows])


def _reference_align(x0, x1):
    """Independent alignment with scipy: Hungarian, then scipy's optimal proper rotation."""
    cost = ((x0[:, None] - x1[None]) ** 2).sum(-1)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    perm = np.empty(len(x0), int)
    perm[cols] = rows
    p0 = x0[perm]
    if x0.shape[1] == 3:
        rot = Rotation.align_vectors(x1, p0)[0].as_matrix()
    else:  # 2-D: the optimal angle is atan2(Σ p × x1, Σ p · x1)
        ang = np.arctan2(np.sum(p0[:, 0] * x1[:, 1] - p0[:, 1] * x1[:, 0]), np.sum(p0 * x1))
        rot = np.array([[np.cos(ang), -np.sin(ang)], [np.sin(ang), np.cos(ang)]])
    aligned = p0 @ rot.T
    return aligned, np.sum((aligned - x1) ** 2)


def test_aligned_cost_is_below_the_unaligned_and_matches_scipy():
    base = MeanFreeNormal(13, 3)
    x0 = np.asarray(base.sample(jax.random.PRNGKey(0), 20), np.float64)
    x1 = np.asarray(base.sample(jax.random.PRNGKey(1), 20), np.float64)
    align = jax.jit(lambda a, b: align_noise(a, b, 13, 3))
    cost_only = jax.jit(lambda a, b: aligned_cost(a, b, 13, 3))
    for a, b in zip(x0, x1):
        aligned, cost = align(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
        ref_aligned, ref_cost = _reference_align(a.reshape(13, 3), b.reshape(13, 3))
        assert float(cost) <= np.sum((a - b) ** 2) + 1e-4
        np.testing.assert_allclose(float(cost), ref_cost, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(aligned).reshape(13, 3), ref_aligned, atol=1e-4)
        np.testing.assert_allclose(cost_only(jnp.asarray(a), jnp.asarray(b)), ref_cost, rtol=1e-4)
        # The aligned noise stays mean-free and keeps its norm (a permutation and a rotation).
        np.testing.assert_allclose(np.asarray(aligned).reshape(13, 3).mean(0), 0.0, atol=1e-5)
        np.testing.assert_allclose(np.sum(np.asarray(aligned) ** 2), np.sum(a**2), rtol=1e-5)


@pytest.mark.parametrize("method", ["host", "vectorised"])
@pytest.mark.parametrize("n,d", [(4, 2), (5, 3)])
def test_batch_pairing_equals_scipy_on_the_aligned_cost_matrix(n, d, method):
    b = 7
    base = MeanFreeNormal(n, d)
    x0 = base.sample(jax.random.PRNGKey(2), b)
    x1 = 2.0 * base.sample(jax.random.PRNGKey(3), b)
    p0, p1 = np.asarray(x0, np.float64).reshape(b, n, d), np.asarray(x1, np.float64).reshape(b, n, d)
    ref = np.array([[_reference_align(p0[i], p1[j])[1] for j in range(b)] for i in range(b)])
    cost, perms = jax.jit(lambda a, c: aligned_cost_matrix(a, c, n, d, method=method, rows_per_chunk=3))(x0, x1)
    np.testing.assert_allclose(np.asarray(cost), ref, rtol=1e-4, atol=1e-4)
    rows, cols = scipy.optimize.linear_sum_assignment(ref)
    expected = np.empty(b, int)
    expected[cols] = rows
    np.testing.assert_array_equal(np.asarray(exact_assignment(cost)), expected)

    loss = EquivariantOTFlowMatching(alignment=method)
    aligned, same = jax.jit(lambda a, c: loss.pair(a, c, None, base=base))(x0, x1)
    np.testing.assert_array_equal(same, x1)  # the data are not moved
    for j in range(b):
        ref_aligned, ref_cost = _reference_align(p0[expected[j]], p1[j])
        np.testing.assert_allclose(np.asarray(aligned[j]).reshape(n, d), ref_aligned, atol=1e-4)
    # Aligned pairing transports less than OT pairing, which transports less than none.
    total = lambda a: float(jnp.sum((a - x1) ** 2))  # noqa: E731
    ot, _ = OTFlowMatching().pair(x0, x1, None)
    assert total(aligned) <= total(ot) + 1e-4 <= total(x0) + 2e-4


@pytest.mark.parametrize("n,d,types", [(4, 2, None), (5, 3, None), (6, 3, (0, 0, 1, 1, 1, 2))])
def test_enumerated_permutations_equal_the_hungarian_search(n, d, types):
    """Few admissible permutations are enumerated; the result is the Hungarian search's (costs and perms)."""
    from zoo.losses import equivariant

    perms = equivariant.admissible_permutations(n, types)
    assert perms is not None and len(perms) == (len(set(map(tuple, perms))))
    rng = np.random.default_rng(n)
    x0 = jnp.asarray(rng.normal(size=(32, n * d)), jnp.float32)
    x1 = jnp.asarray(2.0 * rng.normal(size=(32, n * d)), jnp.float32)
    fast = jax.jit(lambda a, c: aligned_cost_matrix(a, c, n, d, types, method="vectorised"))(x0, x1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(equivariant, "MAX_ENUMERATED_PERMUTATIONS", 0)
        equivariant.admissible_permutations.cache_clear()
        assert equivariant.admissible_permutations(n, types) is None
        slow = jax.jit(lambda a, c: aligned_cost_matrix(a, c, n, d, types, method="vectorised"))(x0, x1)
    equivariant.admissible_permutations.cache_clear()
    np.testing.assert_array_equal(np.asarray(fast[1]), np.asarray(slow[1]))
    np.testing.assert_allclose(np.asarray(fast[0]), np.asarray(slow[0]), rtol=1e-5, atol=1e-4)
    assert equivariant.admissible_permutations(13) is None  # LJ13 keeps the Hungarian search
    assert equivariant.admissible_permutations(22) is None  # 22! overflows int64: still counted right
    assert equivariant.admissible_permutations(55, (0,) * 54 + (1,)) is None


@pytest.mark.parametrize(
    "n,d,b,types,seed",
    [(13, 3, 48, None, 0), (13, 3, 48, None, 1), (4, 2, 64, None, 2), (6, 3, 32, (0, 0, 1, 1, 1, 2), 3), (22, 3, 8, None, 4)],
)
def test_host_alignment_equals_the_vectorised_search(n, d, b, types, seed):
    """The compiled host searches give the vectorised implementation's permutations, costs and pairing."""
    rng = np.random.default_rng(seed)
    base = MeanFreeNormal(n, d)
    x0 = base.sample(jax.random.PRNGKey(seed), b)
    # Data unlike the noise: a scaled, shifted-shell cloud (mean-free), as LJ clusters are.
    shell = rng.normal(size=(b, n, d))
    shell *= (1.0 + 0.3 * rng.random((b, n, 1))) / np.linalg.norm(shell, axis=-1, keepdims=True)
    x1 = jnp.asarray((1.5 * (shell - shell.mean(1, keepdims=True))).reshape(b, n * d), jnp.float32)
    run = lambda m: jax.jit(lambda a, c: aligned_cost_matrix(a, c, n, d, types, method=m))(x0, x1)  # noqa: E731
    (c_host, p_host), (c_vec, p_vec) = run("host"), run("vectorised")
    np.testing.assert_array_equal(np.asarray(p_host), np.asarray(p_vec))
    np.testing.assert_allclose(np.asarray(c_host), np.asarray(c_vec), rtol=1e-5, atol=2e-5)
    pair = lambda m: jax.jit(lambda a, c: EquivariantOTFlowMatching(alignment=m, atom_types=types).pair(a, c, None, base=base))  # noqa: E731
    np.testing.assert_allclose(np.asarray(pair("host")(x0, x1)[0]), np.asarray(pair("vectorised")(x0, x1)[0]), atol=1e-5)


@pytest.mark.parametrize("n", [1, 2, 5, 13, 30])
def test_host_assignment_is_scipys_optimum_also_with_ties(n):
    """The compiled search alone, on random costs (the optimum unique: scipy's permutation) and on
    small integers (many ties: an optimal permutation, by scipy's total)."""
    from zoo.losses._host_alignment import _assign, _column_minima

    rng = np.random.default_rng(n)
    floats, ints = np.empty((4, n)), np.empty((5, n), np.int64)
    in_tree, perm = np.empty(n, np.bool_), np.empty(n, np.int64)
    for trial in range(40):
        cost = rng.normal(size=(n, n)) if trial % 2 else rng.integers(0, 4, size=(n, n)).astype(float)
        _column_minima(cost, ints[4])
        _assign(cost, ints[4], floats[0], floats[1], floats[2], ints[0], ints[1], ints[2], ints[3], in_tree, perm)
        rows, cols = scipy.optimize.linear_sum_assignment(cost)
        assert sorted(perm) == list(range(n))
        np.testing.assert_allclose(cost[perm, np.arange(n)].sum(), cost[rows, cols].sum(), rtol=1e-12, atol=1e-12)
        if trial % 2:
            np.testing.assert_array_equal(perm[cols], rows)


def test_host_rotation_trace_equals_the_singular_value_form():
    r"""Horn's largest eigenvalue by Newton equals σ₁ + σ₂ + sign(det H) σ₃, also for mirror and flat point sets."""
    from zoo.losses._host_alignment import _max_rotation_trace_3d

    rng = np.random.default_rng(0)
    cases = [rng.normal(size=(3, 3)) for _ in range(200)]
    cases += [np.diag([2.0, 1.0, -0.5]), np.diag([1.0, 1.0, 0.0]), np.eye(3), np.zeros((3, 3))]
    flat = rng.normal(size=(7, 3)) * [1.0, 1.0, 0.0]
    cases.append(flat.T @ rng.normal(size=(7, 3)))
    for h in cases:
        sigma = np.linalg.svd(h, compute_uv=False)
        expected = sigma[0] + sigma[1] + np.sign(np.linalg.det(h) or 1.0) * sigma[2]
        bound = 2.0 * np.sum(np.abs(h)) + 1.0
        np.testing.assert_allclose(_max_rotation_trace_3d(h, bound, np.empty((2, 4, 4))), expected, rtol=1e-9, atol=1e-7)


def test_auto_alignment_searches_on_the_host_unless_permutations_are_few(monkeypatch):
    from zoo.losses import equivariant

    calls = []
    real = equivariant._aligned_cost_matrix_on_host
    monkeypatch.setattr(equivariant, "_aligned_cost_matrix_on_host", lambda *a: calls.append(a[0].shape) or real(*a))
    for n, d in [(13, 3), (4, 2)]:  # LJ13: host search; DW4: 24 permutations, enumerated
        x = MeanFreeNormal(n, d).sample(jax.random.PRNGKey(0), 3)
        aligned_cost_matrix(x, x, n, d)
    assert calls == [(3, 13, 3)]


def test_unknown_alignment_method_is_refused():
    with pytest.raises(ValueError, match="unknown alignment"):
        EquivariantOTFlowMatching(alignment="fast")
    with pytest.raises(ValueError, match="unknown alignment method"):
        aligned_cost_matrix(jnp.zeros((2, 6)), jnp.zeros((2, 6)), 2, 3, method="gpu")


def test_equivariant_ot_loss_trains_an_egnn_flow(key):
    n, d, b = 4, 2, 16
    flow = CNF(EGNNField(n, d, hidden=16, n_layers=2, key=key), MeanFreeNormal(n, d))
    x1 = 3.0 * flow.base.sample(jax.random.PRNGKey(1), b)
    for loss in (FlowMatching(), OTFlowMatching(), EquivariantOTFlowMatching(sigma=0.01)):
        step = eqx.filter_jit(eqx.filter_value_and_grad(lambda m, x, lss: lss(m, Batch(x), key)[0]))
        value, grads = step(flow, x1, loss)
        assert np.isfinite(float(value)) and float(value) > 0
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_equivariant_ot_needs_a_particle_base(key):
    flow = CNF(MLPField(4, key=key), StandardNormal(4))
    with pytest.raises(ValueError, match="needs a particle base"):
        EquivariantOTFlowMatching()(flow, Batch(jnp.zeros((3, 4))), key)

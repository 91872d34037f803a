"""EGNN equivariance, invariance of CNF densities, the mean-free base, and equivariant OT pairing."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.optimize
from scipy.spatial.transform import Rotation
from scipy.stats import special_ortho_group

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


def _roughen(field: EGNNField, key, scale=0.3) -> EGNNField:
    """Replace the near-zero coordinate heads by O(1) weights, so that outputs are not ~0."""
    keys = jax.random.split(key, len(field.layers))
    layers = tuple(
        eqx.tree_at(lambda lyr: lyr.coord_out, lyr, scale * jax.random.normal(k, lyr.coord_out.shape))
        for lyr, k in zip(field.layers, keys)
    )
    return eqx.tree_at(lambda f: f.layers, field, layers)


def _orthogonal(rng, d, reflect):
    q = special_ortho_group.rvs(d, random_state=rng)
    return q @ np.diag([-1.0] + [1.0] * (d - 1)) if reflect else q


# ---------------------------------------------------------------------------- EGNN
def _naive_egnn(field: EGNNField, t: float, x: np.ndarray) -> np.ndarray:
    """Independent float64 EGNN with explicit loops over ordered pairs (the unfused first layer)."""
    silu = lambda z: z / (1.0 + np.exp(-z))  # noqa: E731
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))  # noqa: E731
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    n = field.n_particles
    x0 = x.reshape(n, field.spatial_dim).astype(np.float64)
    onehot = np.zeros((n, field.n_atom_types or 0))
    if field.atom_types is not None:
        onehot[np.arange(n), field.atom_types] = 1.0
    feats = np.concatenate([onehot, np.full((n, 1), t)], axis=1)
    h = feats @ f64(field.embedding.weight) + f64(field.embedding.bias)
    a = np.array([[np.sum((x0[i] - x0[j]) ** 2) for j in range(n)] for i in range(n)])
    xs = x0.copy()
    for layer in field.layers:
        new_x = xs.copy()
        agg = np.zeros_like(h)
        for i in range(n):
            for j in range(n):
                if i == j:
                    continue
                diff = xs[i] - xs[j]
                r2 = diff @ diff
                inp = np.concatenate([h[i], h[j], [r2, a[i, j]]])
                m = silu(silu(inp @ f64(layer.edge_in.weight) + f64(layer.edge_in.bias)) @ f64(layer.edge_out.weight) + f64(layer.edge_out.bias))
                if layer.att is not None:
                    m = m * sig(m @ f64(layer.att.weight) + f64(layer.att.bias))
                phi = silu(m @ f64(layer.coord_in.weight) + f64(layer.coord_in.bias)) @ f64(layer.coord_out)
                if layer.tanh:
                    phi = np.tanh(phi) * layer.coords_range
                new_x[i] += diff / (np.sqrt(r2) + 1.0) * phi
                agg[i] += m
        if layer.node_in is not None:
            z = silu(np.concatenate([h, agg], axis=1) @ f64(layer.node_in.weight) + f64(layer.node_in.bias))
            h = h + z @ f64(layer.node_out.weight) + f64(layer.node_out.bias)
        xs = new_x
    v = xs - x0
    return (v - v.mean(0)).reshape(-1)


EGNN_CASES = {
    "plain": dict(n=5, d=3, kw={}),
    "attention_tanh": dict(n=4, d=2, kw=dict(attention=True, tanh=True, coords_range=3.0)),
    "atom_types": dict(n=6, d=3, kw=dict(atom_types=[0, 1, 0, 2, 1, 0], attention=True)),
}


@pytest.mark.parametrize("case", sorted(EGNN_CASES))
def test_egnn_matches_a_naive_pair_loop(case, key):
    c = EGNN_CASES[case]
    field = _roughen(EGNNField(c["n"], c["d"], hidden=16, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(1))
    x = np.random.default_rng(0).normal(size=c["n"] * c["d"])
    got = np.asarray(eqx.filter_jit(lambda f, z: f(0.37, z))(field, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, _naive_egnn(field, 0.37, x), rtol=2e-4, atol=2e-5)
    assert np.abs(got).max() > 1e-2  # the test is not trivially satisfied by a zero field


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("case", sorted(EGNN_CASES))
def test_egnn_is_equivariant(case, reflect, key):
    c = EGNN_CASES[case]
    n, d = c["n"], c["d"]
    field = _roughen(EGNNField(n, d, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(2))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d))
    q = _orthogonal(rng, d, reflect)
    shift = rng.normal(size=d) * 2.0
    types = c["kw"].get("atom_types")
    if types is None:
        perm = rng.permutation(n)
    else:  # only same-type atoms may be exchanged
        types = np.asarray(types)
        perm = np.arange(n)
        for a in np.unique(types):
            idx = np.flatnonzero(types == a)
            perm[idx] = rng.permutation(idx)
        assert not np.array_equal(perm, np.arange(n))
    y = (x @ q.T + shift)[perm]
    call = eqx.filter_jit(lambda f, z: f(0.6, z))
    v_x = np.asarray(call(field, jnp.asarray(x.reshape(-1), jnp.float32))).reshape(n, d)
    v_y = np.asarray(call(field, jnp.asarray(y.reshape(-1), jnp.float32))).reshape(n, d)
    assert np.abs(v_x).max() > 1e-2
    np.testing.assert_allclose(v_y, (v_x @ q.T)[perm], atol=2e-5 * max(1.0, np.abs(v_x).max()))
    np.testing.assert_allclose(v_x.mean(axis=0), 0.0, atol=1e-6)


def test_egnn_distinguishes_atom_types(key):
    """Exchanging two atoms of different types is not a symmetry: the output changes."""
    types = [0, 1, 0, 1]
    field = _roughen(EGNNField(4, 3, atom_types=types, key=key), jax.random.PRNGKey(3))
    x = np.random.default_rng(2).normal(size=(4, 3))
    perm = np.array([1, 0, 2, 3])  # swaps a type-0 and a type-1 atom
    call = eqx.filter_jit(lambda f, z: f(0.5, z))
    v_x = np.asarray(call(field, jnp.asarray(x.reshape(-1), jnp.float32))).reshape(4, 3)
    v_y = np.asarray(call(field, jnp.asarray(x[perm].reshape(-1), jnp.float32))).reshape(4, 3)
    assert np.abs(v_y - v_x[perm]).max() > 1e-3


def test_egnn_initial_field_is_small_and_mean_free(key):
    field = EGNNField(13, 3, dim=39, key=key)
    x = jax.random.normal(key, (39,))
    v = eqx.filter_jit(lambda f, y: f(0.1, y))(field, x).reshape(13, 3)
    assert float(jnp.abs(v).max()) < 0.1  # gain-0.001 coordinate heads
    np.testing.assert_allclose(v.mean(axis=0), 0.0, atol=1e-7)


def test_egnn_bad_input_raises(key):
    with pytest.raises(ValueError, match="dim=10 does not equal"):
        EGNNField(4, 3, dim=10, key=key)
    with pytest.raises(ValueError, match="atom_types must be 4 integers"):
        EGNNField(4, 3, atom_types=[0, 1, 0], key=key)
    with pytest.raises(ValueError, match="atom_types must lie in"):
        EGNNField(4, 3, atom_types=[0, 1, 0, 3], n_atom_types=2, key=key)
    field = EGNNField(4, 3, key=key)
    with pytest.raises(ValueError, match="one flat sample of shape"):
        field(0.0, jnp.zeros((4, 3)))


def test_egnn_gradients_are_finite_with_coinciding_particles(key):
    """The diagonal (i = j) and coinciding particles must not produce NaN derivatives."""
    field = _roughen(EGNNField(4, 3, key=key), jax.random.PRNGKey(4))
    x = jnp.zeros(12).at[:3].set(1.0)  # particles 1..3 coincide
    jac = eqx.filter_jit(lambda f, y: jax.jacfwd(lambda z: f(0.3, z))(y))(field, x)
    grads = eqx.filter_jit(eqx.filter_grad(lambda f: jnp.sum(f(0.3, x) ** 2)))(field)
    assert bool(jnp.all(jnp.isfinite(jac)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array)))


# ---------------------------------------------------------------------------- forward mode
def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


@pytest.mark.parametrize("case", sorted(EGNN_CASES))
def test_egnn_forward_mode_matches_the_reverse_mode_jacobian(case, key, x64):
    """Forward mode through ``__call__`` (the exact divergence's path) = the Jacobian of ``batched``
    by reverse mode through its hand-written backward pass, an independent derivative."""
    c = EGNN_CASES[case]
    n, d = c["n"], c["d"]
    field = _cast(_roughen(EGNNField(n, d, hidden=16, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(3)), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(4), (n * d,), jnp.float64)
    forward = jax.jit(jax.jacfwd(lambda y: field(0.6, y)))(x)
    reverse = jax.jit(jax.jacrev(lambda y: field.batched(jnp.array([0.6]), y[None])[0]))(x)
    assert float(jnp.abs(reverse).max()) > 1e-2
    np.testing.assert_allclose(forward, reverse, rtol=1e-9, atol=1e-12)
    # Exact divergence by linearize + vmap over the basis (the CNF's path) = trace of that Jacobian.
    flow = CNF(field, StandardNormal(n * d))
    _, div = jax.jit(lambda y: flow.velocity_and_divergence(0.6, y, None))(x)
    np.testing.assert_allclose(div, np.trace(reverse), rtol=1e-9)


def test_egnn_forward_mode_in_weights_and_inputs_matches_finite_differences(key, x64):
    """Forward mode with a tangent in the weights and x together against central differences."""
    n, d = 5, 3
    field = _cast(_roughen(EGNNField(n, d, hidden=8, n_layers=2, attention=True, key=key), jax.random.PRNGKey(5)), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(6), (n * d,), jnp.float64)
    params, static = eqx.partition(field, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(7), len(leaves) + 1)
    d_params = jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys[1:], leaves)])
    d_x = jax.random.normal(keys[0], x.shape, x.dtype)

    def v(p, y):
        return eqx.combine(p, static)(0.2, y)

    _, tangent = jax.jvp(v, (params, x), (d_params, d_x))
    h = 1e-5
    shifted = lambda s: v(jax.tree.map(lambda a, da: a + s * da, params, d_params), x + s * d_x)  # noqa: E731
    np.testing.assert_allclose(tangent, (shifted(h) - shifted(-h)) / (2 * h), rtol=1e-6, atol=1e-9)


def test_exact_divergence_gradient_in_the_weights_matches_a_reverse_mode_trace(key, x64):
    """∇_θ of the exact divergence by reverse over forward (as maximum-likelihood training with the
    exact trace takes it) = ∇_θ of trace(jacrev(batched))."""
    n, d = 4, 3
    field = _cast(_roughen(EGNNField(n, d, hidden=8, n_layers=3, tanh=True, coords_range=2.0, key=key), jax.random.PRNGKey(8)), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(9), (n * d,), jnp.float64)
    base = StandardNormal(n * d)

    def via_forward(f):
        return CNF(f, base).velocity_and_divergence(0.3, x, None)[1]

    def via_reverse(f):
        return jnp.trace(jax.jacrev(lambda y: f.batched(jnp.array([0.3]), y[None])[0])(x))

    g_forward = eqx.filter_jit(eqx.filter_grad(via_forward))(field)
    g_reverse = eqx.filter_jit(eqx.filter_grad(via_reverse))(field)
    leaves_f, leaves_r = jax.tree.leaves(g_forward), jax.tree.leaves(g_reverse)
    assert len(leaves_f) == len(leaves_r) > 0
    assert max(float(jnp.abs(a).max()) for a in leaves_r) > 1e-3
    for a, b in zip(leaves_f, leaves_r):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-11)


# ---------------------------------------------------------------------------- training path
@pytest.mark.parametrize("case", sorted(EGNN_CASES))
def test_egnn_batched_path_matches_vmap_in_value_and_gradient(case, key):
    """``batched`` (hand-written reverse pass) = ``vmap(__call__)`` (autodiff): values and all gradients."""
    c = EGNN_CASES[case]
    n, d = c["n"], c["d"]
    field = _roughen(EGNNField(n, d, hidden=16, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(8))
    x = jax.random.normal(jax.random.PRNGKey(9), (6, n * d))
    t = jax.random.uniform(jax.random.PRNGKey(10), (6,))
    u = jax.random.normal(jax.random.PRNGKey(11), (6, n * d))

    weights = jnp.arange(1, n * d + 1, dtype=jnp.float32)

    def loss(f, t, x, via_batched):
        v = f.batched(t, x) if via_batched else jax.vmap(f)(t, x)
        return jnp.sum((v - u) ** 2 * weights)

    results = {}
    for via in (False, True):
        value_and_grad = eqx.filter_value_and_grad(lambda f, tt, xx, via=via: loss(f, tt, xx, via))
        inputs_grad = jax.grad(lambda tt, xx, via=via: loss(field, tt, xx, via), argnums=(0, 1))
        results[via] = (eqx.filter_jit(value_and_grad)(field, t, x), jax.jit(inputs_grad)(t, x))
    ((v0, g0), (gt0, gx0)), ((v1, g1), (gt1, gx1)) = results[False], results[True]
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    leaves0, leaves1 = jax.tree.leaves(g0), jax.tree.leaves(g1)
    assert len(leaves0) == len(leaves1) > 0
    for a, b in zip(leaves1, leaves0):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))
    np.testing.assert_allclose(gt1, gt0, rtol=1e-4, atol=1e-5 * float(jnp.abs(gt0).max()))
    np.testing.assert_allclose(gx1, gx0, rtol=1e-4, atol=1e-5 * float(jnp.abs(gx0).max()))


@pytest.mark.parametrize("chunk", [1, 3, 4, 12])
def test_chunked_squared_error_matches_the_plain_mean(chunk, key):
    """Chunked evaluation with in-pass gradient accumulation = mean over the batch, for all inputs."""
    from zoo.losses.chunked import chunked_squared_error

    n, d, b = 4, 3, 12
    field = _roughen(EGNNField(n, d, hidden=16, n_layers=2, attention=True, key=key), jax.random.PRNGKey(12))
    x = jax.random.normal(jax.random.PRNGKey(13), (b, n * d))
    t = jax.random.uniform(jax.random.PRNGKey(14), (b,))
    u = jax.random.normal(jax.random.PRNGKey(15), (b, n * d))
    plain = lambda f, t, x, u: jnp.mean((jax.vmap(f)(t, x) - u) ** 2)  # noqa: E731
    chunked = lambda f, t, x, u: chunked_squared_error(f, t, x, u, chunk)  # noqa: E731
    ref = eqx.filter_jit(eqx.filter_value_and_grad(plain))(field, t, x, u)
    got = eqx.filter_jit(eqx.filter_value_and_grad(chunked))(field, t, x, u)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    for a, b_ in zip(jax.tree.leaves(got[1]), jax.tree.leaves(ref[1])):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * float(jnp.abs(b_).max()))
    # Cotangents for the inputs too (the loss is correct under differentiation in any argument).
    ref_in = jax.jit(jax.grad(lambda t, x, u: plain(field, t, x, u), argnums=(0, 1, 2)))(t, x, u)
    got_in = jax.jit(jax.grad(lambda t, x, u: chunked(field, t, x, u), argnums=(0, 1, 2)))(t, x, u)
    for a, b_ in zip(got_in, ref_in):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * float(jnp.abs(b_).max()))
    with pytest.raises(ValueError, match="positive divisor"):
        chunked_squared_error(field, t, x, u, 5)


def test_flow_matching_loss_is_independent_of_the_chunking(key):
    n, d, b = 5, 3, 16
    field = _roughen(EGNNField(n, d, hidden=16, n_layers=2, key=key), jax.random.PRNGKey(16))
    flow = CNF(field, MeanFreeNormal(n, d))
    batch = Batch(2.0 * flow.base.sample(jax.random.PRNGKey(17), b))
    out = {}
    for chunk in (None, 1, 4, 6, 16):  # 6 → the largest divisor of 16 not above it, 4
        loss = FlowMatching(sigma=0.01, chunk_size=chunk)
        out[chunk] = eqx.filter_jit(eqx.filter_value_and_grad(lambda m: loss(m, batch, key)[0]))(flow)  # noqa: B023  (used within the iteration)
    for value, grads in out.values():
        np.testing.assert_allclose(value, out[16][0], rtol=1e-5)
        for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(out[16][1])):
            np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-5 * float(jnp.abs(b_).max()))
    assert field.train_chunk_size(256) == 64 and EGNNField(13, 3, key=key).train_chunk_size(256) == 8
    assert EGNNField(55, 3, key=key).train_chunk_size(64) == 1


# ---------------------------------------------------------------------------- CNF + base
@pytest.mark.parametrize("n,d", [(4, 2), (5, 3)])
def test_cnf_log_density_is_invariant(n, d, key):
    field = _roughen(EGNNField(n, d, hidden=32, n_layers=2, key=key), jax.random.PRNGKey(5), scale=0.1)
    flow = CNF(field, MeanFreeNormal(n, d), n_steps=4, divergence="exact")
    rng = np.random.default_rng(3)
    x = rng.normal(size=(n, d))
    x -= x.mean(0)
    variants = [x]
    for reflect in (False, True):
        variants.append(x @ _orthogonal(rng, d, reflect).T)
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
    field = _roughen(field, jax.random.PRNGKey(5), scale=0.1)
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
    field = _roughen(EGNNField(n, d, hidden=16, n_layers=2, key=key), jax.random.PRNGKey(6))
    flow = CNF(field, MeanFreeNormal(n, d))
    x = jax.random.normal(jax.random.PRNGKey(7), (n * d,))
    _, div = eqx.filter_jit(lambda f, y: f.velocity_and_divergence(0.4, y, None))(flow, x)
    proj = np.kron(np.eye(n) - 1.0 / n, np.eye(d))
    jac = np.asarray(eqx.filter_jit(lambda f, y: jax.jacfwd(lambda z: f(0.4, z))(y))(field, x))
    np.testing.assert_allclose(div, np.trace(proj @ jac @ proj), rtol=1e-4, atol=1e-5)


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


# ---------------------------------------------------------------------------- alignment
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
    y = x @ _orthogonal(rng, d, reflect=True).T
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

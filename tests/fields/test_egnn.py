"""The EGNN vector field: against a naive float64 pair loop, E(n)- and permutation-equivariance,
atom types, forward-mode derivatives against reverse mode and finite differences, and the
training path (``batched`` against ``vmap``, the chunked squared error, flow matching
independent of the chunking)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from testing_utils import random_orthogonal, roughen

from zoo.data import Batch
from zoo.fields import EGNNField
from zoo.flows import CNF, MeanFreeNormal, StandardNormal
from zoo.losses import FlowMatching


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
    field = roughen(EGNNField(c["n"], c["d"], hidden=16, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(1))
    x = np.random.default_rng(0).normal(size=c["n"] * c["d"])
    got = np.asarray(eqx.filter_jit(lambda f, z: f(0.37, z))(field, jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, _naive_egnn(field, 0.37, x), rtol=2e-4, atol=2e-5)
    assert np.abs(got).max() > 1e-2  # the test is not trivially satisfied by a zero field


@pytest.mark.parametrize("reflect", [False, True])
@pytest.mark.parametrize("case", sorted(EGNN_CASES))
def test_egnn_is_equivariant(case, reflect, key):
    c = EGNN_CASES[case]
    n, d = c["n"], c["d"]
    field = roughen(EGNNField(n, d, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(2))
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, d))
    q = random_orthogonal(rng, d, reflect)
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
    field = roughen(EGNNField(4, 3, atom_types=types, key=key), jax.random.PRNGKey(3))
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
    field = roughen(EGNNField(4, 3, key=key), jax.random.PRNGKey(4))
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
    field = _cast(roughen(EGNNField(n, d, hidden=16, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(3)), jnp.float64)
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
    field = _cast(roughen(EGNNField(n, d, hidden=8, n_layers=2, attention=True, key=key), jax.random.PRNGKey(5)), jnp.float64)
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
    field = _cast(roughen(EGNNField(n, d, hidden=8, n_layers=3, tanh=True, coords_range=2.0, key=key), jax.random.PRNGKey(8)), jnp.float64)
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
    field = roughen(EGNNField(n, d, hidden=16, n_layers=3, key=key, **c["kw"]), jax.random.PRNGKey(8))
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
    field = roughen(EGNNField(n, d, hidden=16, n_layers=2, attention=True, key=key), jax.random.PRNGKey(12))
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
    field = roughen(EGNNField(n, d, hidden=16, n_layers=2, key=key), jax.random.PRNGKey(16))
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

"""Flow-matching losses and the OT pairing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from zoo.data import Batch
from zoo.fields import MLPField
from zoo.flows import CNF, StandardNormal
from zoo.losses import FlowMatching, OTFlowMatching, exact_assignment, squared_distances


@pytest.mark.parametrize("b", [5, 32, 64])
def test_exact_assignment_equals_scipy(b):
    rng = np.random.default_rng(b)
    x0, x1 = rng.normal(size=(b, 3)), rng.normal(size=(b, 3))
    cost = np.asarray(squared_distances(jnp.asarray(x0), jnp.asarray(x1)))
    np.testing.assert_allclose(cost, ((x0[:, None] - x1[None]) ** 2).sum(-1), atol=1e-4)
    perm = np.asarray(exact_assignment(jnp.asarray(cost)))
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    expected = np.empty(b, int)
    expected[cols] = rows
    assert sorted(perm) == list(range(b))
    np.testing.assert_array_equal(perm, expected)  # continuous random costs: the optimum is unique


def test_exact_assignment_is_optimal_by_enumeration_under_jit_and_vmap():
    """Independent of scipy: every permutation of 6 tried; compiled, batched and NaN-guarded."""
    import itertools

    rng = np.random.default_rng(11)
    costs = rng.random((4, 6, 6)).astype(np.float32)
    perms = np.asarray(jax.jit(jax.vmap(exact_assignment))(jnp.asarray(costs)))
    for cost, perm in zip(costs, perms):
        best = min(itertools.permutations(range(6)), key=lambda p: cost[list(p), np.arange(6)].sum())
        np.testing.assert_array_equal(perm, best)
    # A non-finite cost (a diverged batch) pairs in order rather than raising inside the compiled step.
    nan_cost = jnp.asarray(costs[0]).at[1, 2].set(jnp.nan)
    np.testing.assert_array_equal(np.asarray(jax.jit(exact_assignment)(nan_cost)), np.arange(6))
    with pytest.raises(ValueError, match="square"):
        exact_assignment(jnp.zeros((3, 4)))


def test_ot_pairing_lowers_transport_cost(key):
    flow = CNF(MLPField(2, key=key), StandardNormal(2))
    x1 = jax.random.normal(key, (128, 2)) + 3.0
    x0 = flow.base.sample(jax.random.PRNGKey(1), 128)
    paired, _ = OTFlowMatching().pair(x0, x1, key)
    assert jnp.sum((paired - x1) ** 2) < jnp.sum((x0 - x1) ** 2)


def test_fm_loss_is_zero_for_the_exact_conditional_field(key):
    """A field that returns u_t for a single data point makes the loss vanish (σ = 0)."""
    x1 = jnp.array([[1.0, -2.0]])

    class Exact(MLPField):
        def __call__(self, t, x):
            # For a single data point x1 the conditional and marginal fields coincide:
            # v(t, x) = (x1 − x) / (1 − t).
            return (x1[0] - x) / (1 - t)

    flow = CNF(Exact(2, key=key), StandardNormal(2))
    loss, aux = FlowMatching()(flow, Batch(x=jnp.repeat(x1, 64, axis=0)), key)
    assert float(loss) < 1e-8
    assert "fm_loss" in aux


def test_lipman_sigma_min_and_validation(key):
    with pytest.raises(ValueError):
        FlowMatching(sigma_min=1.0)
    flow = CNF(MLPField(2, key=key), StandardNormal(2))
    batch = Batch(x=jax.random.normal(key, (16, 2)))
    a, _ = FlowMatching(sigma_min=0.0)(flow, batch, key)
    b, _ = FlowMatching(sigma_min=0.1)(flow, batch, key)
    assert np.isfinite(a) and np.isfinite(b) and a != b


def test_the_named_variants_are_flow_matching_with_their_coupling(key):
    """OTFlowMatching and EquivariantOTFlowMatching are FlowMatching with a coupling component:
    same pairs and the same loss for the same key; a gin config can pick the coupling."""
    import gin
    from zoo.experiments import config
    from zoo.fields import EGNNField
    from zoo.flows import MeanFreeNormal
    from zoo.losses import EquivariantOTCoupling, EquivariantOTFlowMatching, IndependentCoupling, OTCoupling

    n, d, b = 4, 2, 16
    flow = CNF(EGNNField(n, d, hidden=8, n_layers=1, key=key), MeanFreeNormal(n, d))
    x1 = flow.base.sample(jax.random.PRNGKey(3), b) * 1.5
    pairs = [
        (FlowMatching(sigma=0.01), FlowMatching(sigma=0.01, coupling=IndependentCoupling())),
        (OTFlowMatching(sigma=0.01), FlowMatching(sigma=0.01, coupling=OTCoupling())),
        (EquivariantOTFlowMatching(sigma=0.01, alignment="vectorised"), FlowMatching(sigma=0.01, coupling=EquivariantOTCoupling(alignment="vectorised"))),
    ]
    x0 = flow.base.sample(jax.random.PRNGKey(4), b)
    for named, composed in pairs:
        np.testing.assert_array_equal(named.pair(x0, x1, key, base=flow.base)[0], composed.pair(x0, x1, key, base=flow.base)[0])
        assert named(flow, Batch(x1), key)[0] == composed(flow, Batch(x1), key)[0]
    # The couplings differ: OT moves noise rows, equivariant OT also rotates and permutes particles.
    ot, eq = pairs[1][0].pair(x0, x1, key)[0], pairs[2][0].pair(x0, x1, key, base=flow.base)[0]
    assert not jnp.array_equal(ot, x0) and not jnp.allclose(eq, ot)
    assert jnp.sum((eq - x1) ** 2) <= jnp.sum((ot - x1) ** 2) + 1e-4
    config.parse([], ["FlowMatching.coupling = @OTCoupling()", "FlowMatching.sigma = 0.01"])
    assert gin.get_configurable("FlowMatching")() == pairs[1][1]
    with pytest.raises(TypeError, match="AbstractCoupling"):
        FlowMatching(coupling="ot")

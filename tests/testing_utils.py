"""Helpers shared by test files of several folders (importable because pytest puts ``tests/`` on
the path when it loads ``tests/conftest.py``)."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np
from scipy.stats import special_ortho_group

from zoo.fields import EGNNField


def random_orthogonal(rng, d: int, reflect: bool) -> np.ndarray:
    """A random rotation of R^d (a uniform one from SO(d)), composed with a reflection if ``reflect``."""
    q = special_ortho_group.rvs(d, random_state=rng) if d > 1 else np.ones((1, 1))
    return q @ np.diag([-1.0] + [1.0] * (d - 1)) if reflect else q


def roughen(field: EGNNField, key, scale: float = 0.3) -> EGNNField:
    """Replace the near-zero coordinate heads of a fresh EGNN by O(1) weights, so that its outputs
    are not ~0 (an untouched initial field would pass equivariance checks trivially)."""
    keys = jax.random.split(key, len(field.layers))
    layers = tuple(
        eqx.tree_at(lambda lyr: lyr.coord_out, lyr, scale * jax.random.normal(k, lyr.coord_out.shape))
        for lyr, k in zip(field.layers, keys)
    )
    return eqx.tree_at(lambda f: f.layers, field, layers)


def gmm_setup(seed: int = 0):
    """A 2-D mixture, exact samples of it and a small MLP flow: the smallest complete training problem."""
    from zoo.data import exact_samples
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.systems import GaussianMixture2D

    system = GaussianMixture2D()
    data = exact_samples(system, n_train=256, n_val=64, n_test=64, seed=seed)
    flow = CNF(MLPField(2, width=16, depth=2, key=jax.random.PRNGKey(seed)), StandardNormal(2), n_steps=4)
    return system, data, flow


#: Bindings that shrink an EGNN experiment to seconds: tiny field, 2 solver steps, 16 samples.
TINY_EGNN_RUN = [
    "--gin_param=EGNNField.hidden = 8",
    "--gin_param=EGNNField.n_layers = 1",
    "--gin_param=CNF.n_steps = 2",
    "--gin_param=evaluation.n_samples = 16",
    "--gin_param=evaluation.n_target = 16",
    "--gin_param=evaluation.progress = False",
]

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

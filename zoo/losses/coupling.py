"""Pairings of noise and data samples within a batch (the couplings of OT flow matching)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from zoo._types import Array


def squared_distances(x0: Array, x1: Array) -> Array:
    """Cost matrix C[i, j] = ‖x0_i − x1_j‖² for flat batches (b, dim)."""
    return jnp.sum(x0**2, -1)[:, None] + jnp.sum(x1**2, -1)[None, :] - 2.0 * x0 @ x1.T


def exact_assignment(cost: Array) -> Array:
    """The permutation minimising Σ_j cost[perm[j], j], i.e. row perm[j] is paired with column j.

    Exact linear assignment (Hungarian algorithm, optax's jit-compatible implementation);
    with equal uniform batches this is the exact optimal transport plan.
    """
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"exact assignment needs a square cost matrix, got shape {cost.shape}")
    rows, cols = optax.assignment.hungarian_algorithm(cost)
    # rows[k] is paired with cols[k]; invert to index rows by column.
    return jnp.zeros_like(rows).at[cols].set(rows)

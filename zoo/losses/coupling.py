"""Pairings of noise and data samples within a batch: the couplings of flow matching.

A coupling takes a batch of noise x0 and a batch of data x1 and returns them paired row by
row; :class:`~zoo.losses.fm.FlowMatching` regresses on the pairs it gets. Independent
(standard FM), exact OT (Tong et al. 2023) and equivariant OT
(:class:`~zoo.losses.equivariant.EquivariantOTCoupling`, Klein et al. 2023) are the three
the references use.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from zoo._types import Array, PRNGKeyArray


def squared_distances(x0: Array, x1: Array) -> Array:
    """Cost matrix C[i, j] = ‖x0_i − x1_j‖² for flat batches (b, dim)."""
    return jnp.sum(x0**2, -1)[:, None] + jnp.sum(x1**2, -1)[None, :] - 2.0 * x0 @ x1.T


def _assignment_on_host(cost: np.ndarray) -> np.ndarray:
    cost = np.asarray(cost)
    if not np.all(np.isfinite(cost)):
        # scipy refuses non-finite costs; a NaN batch must reach the training loop's non-finite check instead.
        return np.arange(cost.shape[0], dtype=np.int32)
    rows, cols = scipy.optimize.linear_sum_assignment(cost)
    perm = np.empty(cost.shape[0], np.int32)
    perm[cols] = rows
    return perm


def exact_assignment(cost: Array) -> Array:
    """The permutation minimising Σ_j cost[perm[j], j], i.e. row perm[j] is paired with column j.

    Exact linear assignment by scipy's ``linear_sum_assignment`` (shortest augmenting paths),
    called from compiled code on the host: on one B×B matrix it is several times faster than
    optax's jit-compiled Hungarian algorithm, whose steps are sequential array operations.
    With equal uniform batches this is the exact optimal transport plan.
    """
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"exact assignment needs a square cost matrix, got shape {cost.shape}")
    out = jax.ShapeDtypeStruct((cost.shape[0],), jnp.int32)
    return jax.pure_callback(_assignment_on_host, out, jax.lax.stop_gradient(cost), vmap_method="sequential")


class AbstractCoupling(eqx.Module):
    """How flow matching pairs a batch of noise with a batch of data."""

    @abc.abstractmethod
    def __call__(self, x0: Array, x1: Array, key: PRNGKeyArray | None, *, base=None) -> tuple[Array, Array]:
        """The batches (b, dim) paired row by row: x0 reordered (or moved) onto x1.

        ``base`` is the flow's base distribution, for couplings that need the particle shape.
        """


class IndependentCoupling(AbstractCoupling):
    """Noise and data as drawn (standard flow matching, Lipman et al. 2023)."""

    def __call__(self, x0: Array, x1: Array, key: PRNGKeyArray | None, *, base=None) -> tuple[Array, Array]:
        del key, base
        return x0, x1


class OTCoupling(AbstractCoupling):
    """The exact OT plan between the two equal uniform batches for the squared Euclidean cost
    (OT flow matching, Tong et al. 2023)."""

    def __call__(self, x0: Array, x1: Array, key: PRNGKeyArray | None, *, base=None) -> tuple[Array, Array]:
        del key, base
        perm = exact_assignment(jax.lax.stop_gradient(squared_distances(x0, x1)))
        return x0[perm], x1

r"""Equivariant OT flow matching (Klein et al. 2023): couplings aligned over the symmetry group.

The cost between a noise sample $x_0$ and a data sample $x_1$ (N particles in d dimensions)
is the squared distance after aligning $x_0$ to $x_1$ over permutations of identical
particles and proper rotations, approximated as in the reference in two steps:

1. the permutation π minimising $\sum_a \|x_{0,π(a)} - x_{1,a}\|^2$ (exact linear
   assignment on the inter-particle squared distances),
2. the proper rotation R (det R = +1, Kabsch) minimising $\|R\,π x_0 - x_1\|^2$,

$$c(x_0, x_1) = \|R\,π x_0 - x_1\|^2 = \|x_0\|^2 + \|x_1\|^2 - 2\,(σ_1 + \dots + σ_{d-1} + s\,σ_d),$$

with σ the singular values of $H = (π x_0)^\top x_1$ and $s = \mathrm{sign}\det H$. Rotations act
about the origin: the noise is mean-free, so this is the alignment on the centre-of-mass-free
subspace (for mean-free $x_0$, centring $x_1$ changes every cost of a column by the same constant
and so does not change the assignment). The B×B matrix of aligned costs goes into the batch
assignment, and the noise sample is aligned to the data sample it is paired with.

The B² per-pair particle assignments dominate the cost. On a CPU they run as compiled scalar
searches on the host (:mod:`zoo.losses._host_alignment`); on accelerators as
:func:`linear_assignment`, a shortest-augmenting-path Hungarian algorithm whose inner loop runs
over all columns at once, so that ``vmap`` over many small problems becomes array work. Both
give the same permutations and costs (to float32 rounding).
"""

from __future__ import annotations

import functools
import itertools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo._types import Array, Float, Int, PRNGKeyArray
from zoo.losses.coupling import AbstractCoupling, exact_assignment
from zoo.losses.fm import FlowMatching


# ---------------------------------------------------------------------------- assignment
def linear_assignment(cost: Float[Array, "n n"]) -> Int[Array, " n"]:
    r"""Exact linear assignment of one square cost matrix; ``perm[j]`` is the row paired with column j.

    Minimises $\sum_j C_{\mathrm{perm}[j], j}$ (the convention of
    :func:`zoo.losses.coupling.exact_assignment`). Shortest augmenting paths with dual
    potentials u, v (Jonker–Volgenant / Kuhn–Munkres, O(n³)): row i enters, a Dijkstra search
    over reduced costs $C_{rj} - u_r - v_j$ finds the cheapest path to a free column, the
    potentials are updated and the path is flipped. Each Dijkstra step treats all columns as
    one vector operation and every loop has a trip count that does not depend on the data,
    so ``jax.vmap`` over many problems runs them in lock step as array operations.
    """
    cost = jnp.asarray(cost)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"linear_assignment needs a square cost matrix, got shape {cost.shape}")
    n = cost.shape[0]
    dtype = cost.dtype if jnp.issubdtype(cost.dtype, jnp.floating) else jnp.float32
    inf = jnp.asarray(jnp.inf, dtype)
    # Index 0 is a dummy row/column: p[0] holds the entering row, column 0 is the search root.
    padded = jnp.full((n + 1, n + 1), inf, dtype).at[1:, 1:].set(cost.astype(dtype))
    cols = jnp.arange(n + 1, dtype=jnp.int32)

    def add_row(i, carry):
        u, v, p = carry
        p = p.at[0].set(i)

        def search(_, s):
            u, v, minv, way, used, rows, j0, done = s
            i0 = p[j0]
            used = used | (cols == j0)
            rows = rows | (cols == i0)  # rows in the tree: the rows of the used columns
            reduced = padded[i0] - u[i0] - v
            better = ~used & (reduced < minv)
            minv = jnp.where(better, reduced, minv)
            way = jnp.where(better, j0, way)
            masked = jnp.where(used, inf, minv)
            j1 = jnp.argmin(masked).astype(jnp.int32)
            # A finished search idles (the loop has a fixed length): with delta = 0 and j0 kept,
            # every update below is a no-op (its i0 is the dummy row, whose costs are inf).
            delta = jnp.where(done, jnp.zeros((), dtype), masked[j1])
            j1 = jnp.where(done, j0, j1)
            u = jnp.where(rows, u + delta, u)
            v = jnp.where(used, v - delta, v)
            minv = jnp.where(used, minv, minv - delta)
            return u, v, minv, way, used, rows, j1, done | (p[j1] == 0)

        start = (
            u,
            v,
            jnp.full(n + 1, inf, dtype),
            jnp.zeros(n + 1, jnp.int32),
            jnp.zeros(n + 1, bool),
            jnp.zeros(n + 1, bool),
            jnp.int32(0),
            jnp.bool_(False),
        )
        # With i − 1 columns matched, a free column is reached within i steps.
        u, v, _, way, _, _, j0, _ = jax.lax.fori_loop(0, i, search, start)

        def augment(_, s):
            p, j0 = s
            j1 = way[j0]
            active = j0 != 0
            p = jnp.where(active & (cols == j0), p[j1], p)
            return p, jnp.where(active, j1, j0)

        p, _ = jax.lax.fori_loop(0, i, augment, (p, j0))
        return u, v, p

    init = (jnp.zeros(n + 1, dtype), jnp.zeros(n + 1, dtype), jnp.zeros(n + 1, jnp.int32))
    _, _, p = jax.lax.fori_loop(1, n + 1, add_row, init)
    return p[1:] - 1


def particle_cost(x: Float[Array, "n d"], y: Float[Array, "n d"], atom_types=None) -> Float[Array, "n n"]:
    """C[a, b] = ‖x_a − y_b‖², with a penalty forbidding the pairing of different atom types."""
    cost = jnp.sum((x[:, None, :] - y[None, :, :]) ** 2, axis=-1)
    if atom_types is not None:
        types = np.asarray(atom_types)
        different = jnp.asarray(types[:, None] != types[None, :])
        # Larger than any total cost of a type-respecting assignment: never chosen.
        penalty = x.shape[0] * jnp.max(cost) + 1.0
        cost = jnp.where(different, cost + penalty, cost)
    return cost


def particle_permutation(x: Float[Array, "n d"], y: Float[Array, "n d"], atom_types=None) -> Int[Array, " n"]:
    r"""The permutation π of x's particles minimising $\sum_a \|x_{π(a)} - y_a\|^2$ (``x[perm]`` is aligned).

    Exact assignment (optax's Hungarian algorithm through
    :func:`zoo.losses.coupling.exact_assignment`); with ``atom_types`` only particles of the
    same type are exchanged.
    """
    return exact_assignment(particle_cost(x, y, atom_types))


#: Up to this many admissible particle permutations, the per-pair assignment enumerates them
#: all (one gather and an argmax) instead of running the Hungarian search; same optimum.
MAX_ENUMERATED_PERMUTATIONS = 120


@functools.cache
def admissible_permutations(n: int, atom_types: tuple[int, ...] | None = None) -> np.ndarray | None:
    """Every permutation of n particles that exchanges only particles of one type, as rows of
    an (m, n) array, or ``None`` when there are more than :data:`MAX_ENUMERATED_PERMUTATIONS`."""
    types = (0,) * n if atom_types is None else tuple(atom_types)
    sizes = [types.count(t) for t in set(types)]
    # Python integers: a float or int64 product of factorials overflows from 21 particles on.
    if math.prod(math.factorial(k) for k in sizes) > MAX_ENUMERATED_PERMUTATIONS:
        return None
    perms = [p for p in itertools.permutations(range(n)) if all(types[a] == types[b] for a, b in enumerate(p))]
    return np.asarray(perms, dtype=np.int32)


def enumerated_permutation(x: Float[Array, "n d"], y: Float[Array, "n d"], perms: np.ndarray) -> Int[Array, " n"]:
    r"""The row of ``perms`` minimising $\sum_a \|x_{π(a)} - y_a\|^2$, i.e. maximising $\sum_a x_{π(a)} \cdot y_a$."""
    n = x.shape[0]
    # score[k] = Σ_a inner[perms[k, a], a] as one product with a 0/1 matrix (a matmul under vmap, not a gather).
    pick = np.zeros((n * n, len(perms)), np.float32)
    pick[perms * n + np.arange(n), np.arange(len(perms))[:, None]] = 1.0
    inner = x @ y.T  # inner[b, a] = x_b · y_a
    score = inner.reshape(-1) @ jnp.asarray(pick, x.dtype)
    return jnp.asarray(perms)[jnp.argmax(score)]


# ---------------------------------------------------------------------------- rotation
def kabsch_rotation(x: Float[Array, "n d"], y: Float[Array, "n d"]) -> Float[Array, "d d"]:
    r"""The proper rotation R (det R = +1) minimising $\sum_a \|R x_a - y_a\|^2$ (about the origin).

    Kabsch: with $H = x^\top y = U S V^\top$, $R = V\,\mathrm{diag}(1, \dots, 1, s)\,U^\top$ and
    $s = \mathrm{sign}\det(V U^\top)$. Apply as ``x @ R.T``.
    """
    h = x.T @ y
    if x.shape[-1] == 2:
        # In 2-D, tr(R H) for the rotation by θ is cos θ (h₁₁ + h₂₂) + sin θ (h₁₂ − h₂₁): maximal at this angle, no SVD.
        c, s = h[0, 0] + h[1, 1], h[0, 1] - h[1, 0]
        r = jnp.sqrt(c**2 + s**2)
        safe = jnp.where(r > 0, r, 1.0)
        c, s = jnp.where(r > 0, c / safe, 1.0), jnp.where(r > 0, s / safe, 0.0)
        return jnp.stack([jnp.stack([c, -s]), jnp.stack([s, c])]).astype(x.dtype)
    u, _, vt = jnp.linalg.svd(h)
    s = jnp.sign(jnp.linalg.det(vt.T @ u.T))
    s = jnp.where(s == 0, 1.0, s)
    d = jnp.ones(x.shape[-1], x.dtype).at[-1].set(s)
    return (vt.T * d) @ u.T


def kabsch_cost(x: Float[Array, "n d"], y: Float[Array, "n d"]) -> Float[Array, ""]:
    r"""$\min_{R \in SO(d)} \|R x - y\|^2 = \|x\|^2 + \|y\|^2 - 2(σ_1 + \dots + σ_{d-1} + s σ_d)$ from singular values only."""
    h = x.T @ y
    if x.shape[-1] == 2:
        # In 2-D, σ₁ + sign(det H) σ₂ = sqrt(‖H‖²_F + 2 det H) = sqrt((h₁₁ + h₂₂)² + (h₂₁ − h₁₂)²): no SVD.
        trace = jnp.sqrt((h[0, 0] + h[1, 1]) ** 2 + (h[1, 0] - h[0, 1]) ** 2)
    else:
        sigma = jnp.linalg.svd(h, compute_uv=False)  # descending
        s = jnp.sign(jnp.linalg.det(h))
        trace = jnp.sum(sigma[:-1]) + jnp.where(s < 0, -1.0, 1.0) * sigma[-1]
    return jnp.maximum(jnp.sum(x**2) + jnp.sum(y**2) - 2.0 * trace, 0.0)


# ---------------------------------------------------------------------------- one pair
def align_noise(
    x0: Float[Array, " dim"], x1: Float[Array, " dim"], n_particles: int, spatial_dim: int, atom_types=None
) -> tuple[Float[Array, " dim"], Float[Array, ""]]:
    """Align one noise sample to one data sample (permute, then rotate the noise); flat in, flat out.

    Returns the aligned noise R π x0 (flat) and its cost ‖R π x0 − x1‖².
    """
    p0 = x0.reshape(n_particles, spatial_dim)
    p1 = x1.reshape(n_particles, spatial_dim)
    p0 = p0[particle_permutation(p0, p1, atom_types)]
    aligned = p0 @ kabsch_rotation(p0, p1).T
    return aligned.reshape(-1), jnp.sum((aligned - p1) ** 2)


def aligned_cost(x0: Float[Array, " dim"], x1: Float[Array, " dim"], n_particles: int, spatial_dim: int, atom_types=None):
    """The aligned cost c(x0, x1) of one noise/data pair (permutation, then proper rotation)."""
    return align_noise(x0, x1, n_particles, spatial_dim, atom_types)[1]


# ---------------------------------------------------------------------------- batches
def aligned_cost_matrix(
    x0: Float[Array, "b dim"],
    x1: Float[Array, "b dim"],
    n_particles: int,
    spatial_dim: int,
    atom_types=None,
    *,
    method: str = "auto",
    rows_per_chunk: int | None = None,
) -> tuple[Float[Array, "b b"], Int[Array, "b b n"]]:
    """C[i, j] = c(x0_i, x1_j) for all pairs, and the particle permutations that achieve it.

    ``perms[i, j]`` permutes the particles of x0_i onto x1_j. Two implementations of the same
    quantity (``method``):

    - ``"host"``: compiled scalar searches on the host's cores
      (:mod:`zoo.losses._host_alignment`, float64), each stopping as soon as its search ends;
    - ``"vectorised"``: the B² small assignments in lock step as array operations
      (:func:`linear_assignment` under ``vmap``, or :func:`enumerated_permutation` when there
      are few admissible permutations), ``rows_per_chunk`` rows of x0 at a time (default: as
      many as keep the pair cost tensors near 64 MB); the choice for accelerators;
    - ``"auto"``: host on a CPU backend in 2-D and 3-D unless the admissible permutations are
      few enough to enumerate (one matrix product per pair beats any search: DW4), vectorised
      otherwise.
    """
    if method not in ALIGNMENT_METHODS:
        raise ValueError(f"unknown alignment method {method!r}; choose one of {ALIGNMENT_METHODS}")
    b0, b1 = x0.shape[0], x1.shape[0]
    p0 = x0.reshape(b0, n_particles, spatial_dim)
    p1 = x1.reshape(b1, n_particles, spatial_dim)
    enumerated = admissible_permutations(n_particles, None if atom_types is None else tuple(atom_types))
    if method == "auto":
        on_host = jax.default_backend() == "cpu" and spatial_dim in (2, 3) and enumerated is None
        method = "host" if on_host else "vectorised"
    if method == "host":
        return _aligned_cost_matrix_on_host(p0, p1, atom_types)

    def one(a, b):
        if enumerated is not None:
            perm = enumerated_permutation(a, b, enumerated)
        else:
            perm = linear_assignment(particle_cost(a, b, atom_types))
        return kabsch_cost(a[perm], b), perm

    def row(a):
        return jax.vmap(one, in_axes=(None, 0))(a, p1)

    if rows_per_chunk is None:
        rows_per_chunk = max(1, min(b0, (1 << 24) // max(1, b1 * n_particles * n_particles)))
    cost, perms = jax.lax.map(row, p0, batch_size=rows_per_chunk)
    return cost, perms


#: The implementations of :func:`aligned_cost_matrix`.
ALIGNMENT_METHODS = ("auto", "host", "vectorised")


def _aligned_cost_matrix_on_host(p0: Array, p1: Array, atom_types) -> tuple[Array, Array]:
    b0, n, _ = p0.shape
    b1 = p1.shape[0]
    types = None if atom_types is None else tuple(atom_types)

    def on_host(a, b):
        from zoo.losses._host_alignment import aligned_cost_matrix_host  # numba compiles on first use

        cost, perms = aligned_cost_matrix_host(np.asarray(a), np.asarray(b), types)
        return cost.astype(p0.dtype), perms

    out = (jax.ShapeDtypeStruct((b0, b1), p0.dtype), jax.ShapeDtypeStruct((b0, b1, n), jnp.int32))
    return jax.pure_callback(on_host, out, jax.lax.stop_gradient(p0), jax.lax.stop_gradient(p1), vmap_method="sequential")


# ---------------------------------------------------------------------------- loss
class EquivariantOTCoupling(AbstractCoupling):
    r"""The equivariant OT coupling (Klein et al. 2023) for particle systems.

    The exact assignment on the B×B matrix of costs aligned over permutations of identical
    particles and proper rotations (see the module docstring); each noise sample is then
    permuted and rotated onto its data sample. N and d are read from the flow's base
    (``MeanFreeNormal``). ``atom_types`` (length N) restricts the permutations to particles
    of the same type.
    """

    atom_types: tuple[int, ...] | None = eqx.field(static=True, default=None)
    #: How the B×B aligned costs are computed (see :func:`aligned_cost_matrix`); same result.
    alignment: str = eqx.field(static=True, default="auto")

    def __check_init__(self):
        if self.alignment not in ALIGNMENT_METHODS:
            raise ValueError(f"unknown alignment {self.alignment!r}; choose one of {ALIGNMENT_METHODS}")

    def __call__(self, x0: Array, x1: Array, key: PRNGKeyArray | None, *, base=None) -> tuple[Array, Array]:
        del key
        n, d = _particle_shape(base, x0.shape[-1])
        x0s, x1s = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x1)
        cost, perms = aligned_cost_matrix(x0s, x1s, n, d, self.atom_types, method=self.alignment)
        rows = exact_assignment(cost)  # noise rows[j] goes with data j
        b = x1.shape[0]
        p0 = x0s.reshape(b, n, d)[rows]
        p0 = jnp.take_along_axis(p0, perms[rows, jnp.arange(b)][..., None], axis=1)
        p1 = x1s.reshape(b, n, d)
        rot = jax.vmap(kabsch_rotation)(p0, p1)
        aligned = jnp.einsum("bnd,bed->bne", p0, rot)
        return aligned.reshape(b, n * d).astype(x0.dtype), x1


class EquivariantOTFlowMatching(FlowMatching):
    """Equivariant OT flow matching (Klein et al. 2023):
    ``FlowMatching(coupling=EquivariantOTCoupling(atom_types, alignment))``."""

    def __init__(
        self,
        sigma_min: float = 0.0,
        sigma: float = 0.0,
        chunk_size: int | None = None,
        atom_types: tuple[int, ...] | None = None,
        alignment: str = "auto",
    ):
        self.sigma_min, self.sigma, self.chunk_size = sigma_min, sigma, chunk_size
        self.coupling = EquivariantOTCoupling(atom_types=atom_types, alignment=alignment)


def _particle_shape(base, dim: int) -> tuple[int, int]:
    n = getattr(base, "n_particles", None)
    d = getattr(base, "spatial_dim", None)
    if n is None or d is None:
        raise ValueError(
            "the equivariant OT coupling needs a particle base (MeanFreeNormal with n_particles and spatial_dim); "
            f"got {type(base).__name__}"
        )
    if n * d != dim:
        raise ValueError(f"base has {n} particles in {d} dimensions but samples have dim {dim}")
    return n, d

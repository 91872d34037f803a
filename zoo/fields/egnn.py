r"""E(n)-equivariant graph network vector field (Satorras et al. 2021) for particle systems.

The configuration of the equivariant-flow-matching papers: a fully connected graph over
N particles, node features $h_i$ from the time t (and the atom type when particles differ),
the squared input distance $d_{ij}^2$ as edge attribute, and L layers of

$$m_{ij} = φ_e(h_i, h_j, \|x_i - x_j\|^2, d_{ij}^2), \qquad
  x_i \leftarrow x_i + \sum_{j \ne i} \frac{x_i - x_j}{\|x_i - x_j\| + 1}\, φ_x(m_{ij}), \qquad
  h_i \leftarrow h_i + φ_h(h_i, \textstyle\sum_{j \ne i} m_{ij}),$$

with $v = x_L - x_0$ and the centre of mass removed.

Everything runs on dense pair tensors (N, N, H) with the diagonal masked out: no edge
lists, no gather/scatter. The first linear layer of φ_e acts on the concatenation
$[h_i, h_j, r^2, a]$; it is evaluated as $W_i h_i + W_j h_j + w_r r^2 + w_a a + b$, projecting
each node once and broadcast-adding over the pairs (the same function with half the
pair-level matrix work). Parameters and their initialisation follow the reference
(PyTorch ``Linear`` defaults; the last layer of φ_x bias-free, Xavier-uniform with gain 0.001).

One implementation with an explicit batch axis serves two entry points: ``__call__`` (one
sample, autodiff in either mode; the CNF's exact divergence takes forward mode, and the
first layer, whose pairs see x only through r²_ij, has a forward-mode rule that maps all D
basis tangents through one per-pair sensitivity instead of pushing each through φ_e) and
``batched`` (training: the pair messages get a hand-written reverse pass that reuses the
forward sigmoids). Flow-matching losses evaluate ``batched`` chunk by chunk with the
gradient accumulated in the same pass (:mod:`zoo.losses.chunked`), which keeps a chunk's
pair tensors in cache; ``benchmarks/egnn.py`` measures the effect.
"""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from zoo._types import Array, Float, PRNGKeyArray, Time, Vector
from zoo.chunking import cache_sized_chunk
from zoo.fields.base import AbstractVectorField

#: Added under the square root of ‖x_i − x_j‖²: keeps the derivative finite on the
#: diagonal (i = j, where x_i − x_j = 0 multiplies it away) and for coinciding particles.
_NORM_EPS = 1e-8
#: Cache budget of a sampling chunk (EGNNField.sampling_chunk_size): the numbers in one layer's
#: pair tensors with all their tangent copies, 8 MB of float32, about what a core's L2 and its
#: share of L3 keep close; larger chunks make the exact-trace solve memory-bound.
SAMPLING_CHUNK_FLOATS = 1 << 21


def _linear_weight(key: PRNGKeyArray, fan_in: int, fan_out: int) -> tuple[Array, Array]:
    """PyTorch ``nn.Linear`` default initialisation: U(±1/√fan_in) for weight and bias."""
    wkey, bkey = jax.random.split(key)
    bound = 1.0 / math.sqrt(fan_in)
    w = jax.random.uniform(wkey, (fan_in, fan_out), minval=-bound, maxval=bound)
    b = jax.random.uniform(bkey, (fan_out,), minval=-bound, maxval=bound)
    return w, b


class _Dense(eqx.Module):
    """y = x W + b with W stored (in, out), so batched inputs (..., in) need no transposes."""

    weight: Float[Array, "fan_in fan_out"]
    bias: Float[Array, " fan_out"] | None

    def __init__(self, fan_in: int, fan_out: int, *, use_bias: bool = True, key: PRNGKeyArray):
        w, b = _linear_weight(key, fan_in, fan_out)
        self.weight = w
        self.bias = b if use_bias else None

    def __call__(self, x: Array) -> Array:
        y = x @ self.weight
        return y if self.bias is None else y + self.bias


# ---------------------------------------------------------------------------- pair messages
def _pair_forward(pi, pj, r2, a, wr, wa, w2, b2, wq, bq, w3, b3, w4):
    r"""Messages and coordinate weights of one layer on dense pair tensors (any leading batch axes).

    Inputs: node projections ``pi`` $= W_i h_i + b$ and ``pj`` $= W_j h_j$ (b, N, H), squared
    distances ``r2`` and edge attributes ``a`` (b, N, N), and the weights of φ_e (``wr``, ``wa``:
    the r² and a rows of its first layer; ``w2``, ``b2``: its second layer), of the optional
    attention gate (``wq`` (H, 1), ``bq``; None without attention) and of φ_x (``w3``, ``b3``,
    ``w4``). Returns ``(phi, agg)``: φ_x(m_ij) before any tanh (b, N, N) and Σ_{j≠i} m_ij
    (b, N, H), plus the intermediates the hand-written backward pass reuses.
    """
    n = pi.shape[-2]
    pre = pi[..., :, None, :] + pj[..., None, :, :] + r2[..., None] * wr + a[..., None] * wa
    s1 = jax.nn.sigmoid(pre)
    a1 = pre * s1
    z2 = a1 @ w2 + b2
    s2 = jax.nn.sigmoid(z2)
    m_raw = z2 * s2
    if wq is not None:
        gate = jax.nn.sigmoid(m_raw @ wq + bq)  # (b, N, N, 1)
        m = m_raw * gate
    else:
        gate = None
        m = m_raw
    z3 = m @ w3 + b3
    s3 = jax.nn.sigmoid(z3)
    a3 = z3 * s3
    phi = a3 @ w4  # (..., N, N)
    offdiag = (1.0 - jnp.eye(n, dtype=m.dtype))[:, :, None]
    # Σ_{j≠i} m_ij as a masked sum: one fused reduction, no gather or scatter.
    agg = jnp.sum(m * offdiag, axis=-2)
    saved = (r2, a, wr, wa, w2, wq, w3, w4, s1, a1, s2, m_raw, gate, m, s3, a3)
    return (phi, agg), saved


def _pair_messages(*args):
    """Plain-autodiff version (any transformation, forward mode included)."""
    return _pair_forward(*args)[0]


def _per_sample_weight_grad(x, g):
    """Σ over all pairs of x_p g_pᵀ for (b, N, N, H) arrays, as b small products then a sum.

    XLA's CPU backend evaluates one (H × b·N²)·(b·N² × H) product slowly (it transposes an
    operand and runs the long contraction on one thread); b batched products are faster.
    """
    b, h = x.shape[0], x.shape[-1]
    return jnp.einsum("bpi,bpk->bik", x.reshape(b, -1, h), g.reshape(b, -1, g.shape[-1])).sum(0)


def _pair_messages_backward(saved, cotangents):
    r"""Reverse pass of :func:`_pair_forward`, written out with silu'(z) = s + a(1 − s) from the saved s = σ(z), a = z s."""
    r2, a, wr, wa, w2, wq, w3, w4, s1, a1, s2, m_raw, gate, m, s3, a3 = saved
    g_phi, g_agg = cotangents
    n = r2.shape[-1]
    dw4 = _per_sample_weight_grad(a3, g_phi[..., None])[:, 0]
    dz3 = (g_phi[..., None] * w4) * (s3 + a3 * (1.0 - s3))
    dw3 = _per_sample_weight_grad(m, dz3)
    db3 = jnp.sum(dz3, axis=(0, 1, 2))
    offdiag = (1.0 - jnp.eye(n, dtype=m.dtype))[:, :, None]
    dm = dz3 @ w3.T + g_agg[:, :, None, :] * offdiag
    if wq is not None:
        dq = jnp.sum(dm * m_raw, axis=-1, keepdims=True) * gate * (1.0 - gate)  # (b, N, N, 1)
        dwq = _per_sample_weight_grad(m_raw, dq)
        dbq = jnp.sum(dq, axis=(0, 1, 2))
        dm = dm * gate + dq * wq[:, 0]
    else:
        dwq = dbq = None
    dz2 = dm * (s2 + m_raw * (1.0 - s2))
    dw2 = _per_sample_weight_grad(a1, dz2)
    db2 = jnp.sum(dz2, axis=(0, 1, 2))
    dpre = (dz2 @ w2.T) * (s1 + a1 * (1.0 - s1))
    dpi = jnp.sum(dpre, axis=2)
    dpj = jnp.sum(dpre, axis=1)
    dr2 = dpre @ wr
    da = dpre @ wa
    dwr = _per_sample_weight_grad(r2[..., None], dpre)[0]
    dwa = _per_sample_weight_grad(a[..., None], dpre)[0]
    return dpi, dpj, dr2, da, dwr, dwa, dw2, db2, dwq, dbq, dw3, db3, dw4


@jax.custom_vjp
def _pair_messages_fast(*args):
    """Same function as :func:`_pair_messages`, with a hand-written reverse pass (reverse mode only).

    The reverse pass reuses the forward sigmoids instead of recomputing them and keeps no
    other intermediates; in chunked training (:mod:`zoo.losses.chunked`) they stay in cache.
    """
    return _pair_forward(*args)[0]


_pair_messages_fast.defvjp(_pair_forward, _pair_messages_backward)


def _is_zero_tangent(t) -> bool:
    return t is None or isinstance(t, SymbolicZero)


@jax.custom_jvp
def _first_layer_messages(pi, pj, r2, *weights):
    r"""Pair messages of the first layer, whose edge attribute is its own r²: ``_pair_messages(pi, pj, r2, r2, ...)``.

    Its forward-mode rule is what makes the exact divergence cheap. In the first layer the
    node features do not depend on x, so a tangent in x reaches pair (i, j) only through
    the scalar r²_ij: the tangent of every pair tensor is dr²_ij times a per-pair
    sensitivity ∂(·)_ij/∂r²_ij. The rule computes the sensitivities once, with one JVP
    along r² = 1, and then maps each of the D basis tangents with an (N, N) × (N, N, H)
    contraction instead of pushing a (N, N, H) tangent through three H × H layers.
    Other tangents (in the node features or the weights: training) take plain autodiff.
    """
    return _pair_forward(pi, pj, r2, r2, *weights)[0]


def _first_layer_messages_jvp(primals, tangents):
    pi, pj, r2, *weights = primals
    d_r2 = tangents[2]
    if _is_zero_tangent(d_r2) or not all(_is_zero_tangent(t) for t in tangents[:2] + tangents[3:]):
        dense = tuple(jnp.zeros(p.shape, p.dtype) if isinstance(t, SymbolicZero) else t for p, t in zip(primals, tangents))
        return jax.jvp(lambda pi_, pj_, r2_, *w: _pair_forward(pi_, pj_, r2_, r2_, *w)[0], primals, dense)

    def per_pair(r):
        (phi, _), saved = _pair_forward(pi, pj, r, r, *weights)
        return phi, saved[13]  # φ_x(m_ij) and m_ij, before the sum over j

    (phi, m), (dphi_dr2, dm_dr2) = jax.jvp(per_pair, (r2,), (jnp.ones_like(r2),))
    offdiag = 1.0 - jnp.eye(r2.shape[-1], dtype=r2.dtype)
    agg = jnp.sum(m * offdiag[:, :, None], axis=-2)
    d_agg = jnp.einsum("...ij,...ijh->...ih", d_r2 * offdiag, dm_dr2)
    return (phi, agg), (dphi_dr2 * d_r2, d_agg)


_first_layer_messages.defjvp(_first_layer_messages_jvp, symbolic_zeros=True)


class _EGCL(eqx.Module):
    """One equivariant graph convolution layer (coordinates and, unless last, node features)."""

    edge_in: _Dense  # rows: [h_i (H), h_j (H), r² (1), d² (1)] → H
    edge_out: _Dense
    att: _Dense | None
    coord_in: _Dense
    coord_out: Float[Array, " hidden"]
    node_in: _Dense | None
    node_out: _Dense | None
    hidden: int = eqx.field(static=True)
    tanh: bool = eqx.field(static=True)
    coords_range: float = eqx.field(static=True)

    def __init__(self, hidden: int, *, attention: bool, tanh: bool, coords_range: float, update_nodes: bool, key):
        keys = jax.random.split(key, 7)
        self.hidden = hidden
        self.tanh = tanh
        self.coords_range = coords_range
        self.edge_in = _Dense(2 * hidden + 2, hidden, key=keys[0])
        self.edge_out = _Dense(hidden, hidden, key=keys[1])
        self.att = _Dense(hidden, 1, key=keys[2]) if attention else None
        self.coord_in = _Dense(hidden, hidden, key=keys[3])
        # Xavier-uniform with gain 0.001 (fan_in = hidden, fan_out = 1): the coordinate update
        # starts near zero, so the untrained network is close to the identity map.
        bound = 0.001 * math.sqrt(6.0 / (hidden + 1))
        self.coord_out = jax.random.uniform(keys[4], (hidden,), minval=-bound, maxval=bound)
        if update_nodes:
            self.node_in = _Dense(2 * hidden, hidden, key=keys[5])
            self.node_out = _Dense(hidden, hidden, key=keys[6])
        else:
            self.node_in = self.node_out = None

    def __call__(
        self,
        h: Float[Array, "*b n hidden"],
        x: Float[Array, "*b n d"],
        edge_attr: Float[Array, "*b n n"],
        *,
        fast: bool = False,
        first: bool = False,
    ) -> tuple[Float[Array, "*b n hidden"], Float[Array, "*b n d"]]:
        """One sample (no batch axis) or, with ``fast=True``, a batch with one leading axis.

        ``first=True`` marks the input layer, where x is the field's input and the edge
        attributes equal this layer's squared distances; the single-sample path then takes
        the first-layer kernel with its cheap forward-mode rule, fed with ``edge_attr`` for
        both. (Feeding it this layer's own r², the same numbers, made XLA's CPU
        while-loop-invariant code motion miscompile a vmapped fixed-step solve: wrong
        divergences for some batch entries. ``tests/flows/test_cnf.py`` checks vmapped
        against per-sample solves.)
        """
        hd = self.hidden
        w = self.edge_in.weight
        diff = x[..., :, None, :] - x[..., None, :, :]  # (*b, N, N, d): x_i − x_j
        r2 = jnp.sum(diff**2, axis=-1)  # (*b, N, N)
        # First linear of φ_e, fused: per-node projections broadcast over the pairs.
        pi = h @ w[:hd] + self.edge_in.bias
        pj = h @ w[hd : 2 * hd]
        att_w, att_b = (self.att.weight, self.att.bias) if self.att is not None else (None, None)
        weights = (
            w[2 * hd], w[2 * hd + 1], self.edge_out.weight, self.edge_out.bias, att_w, att_b,
            self.coord_in.weight, self.coord_in.bias, self.coord_out,
        )  # fmt: skip
        if fast:
            phi, agg = _pair_messages_fast(pi, pj, r2, edge_attr, *weights)
        elif first:
            phi, agg = _first_layer_messages(pi, pj, edge_attr, *weights)
        else:
            phi, agg = _pair_messages(pi, pj, r2, edge_attr, *weights)
        if self.tanh:
            phi = jnp.tanh(phi) * self.coords_range
        # The diagonal has x_i − x_j = 0, so it contributes nothing to the coordinate sum.
        scale = phi / (jnp.sqrt(r2 + _NORM_EPS) + 1.0)
        x = x + jnp.einsum("...ijd,...ij->...id", diff, scale)
        if self.node_in is None:
            return h, x
        h = h + self.node_out(jax.nn.silu(self.node_in(jnp.concatenate([h, agg], axis=-1))))
        return h, x


class EGNNField(AbstractVectorField):
    r"""E(n)-equivariant GNN vector field $v_θ(t, x)$ for N particles in d dimensions.

    Node input: t for identical particles; with ``atom_types`` (length N, values in
    ``[0, n_atom_types)``) the one-hot atom type concatenated with t, which the input
    layer turns into a learned per-type embedding. ``attention`` gates each message by
    $σ(w^\top m_{ij} + b)$; ``tanh`` bounds the coordinate weights to
    ``coords_range · tanh(φ_x(m_ij))``.

    ``__call__(t, x)`` takes one flat sample (N·d,) and returns the mean-free velocity (N·d,).
    """

    # Messages see only distances and coordinates enter as differences: O(d) equivariant.
    reflection_equivariant: ClassVar[bool] = True
    fused_batched: ClassVar[bool] = True

    embedding: _Dense
    layers: tuple[_EGCL, ...]
    n_particles: int = eqx.field(static=True)
    spatial_dim: int = eqx.field(static=True)
    hidden: int = eqx.field(static=True)
    atom_types: tuple[int, ...] | None = eqx.field(static=True)
    n_atom_types: int | None = eqx.field(static=True)

    def __init__(
        self,
        n_particles: int,
        spatial_dim: int,
        *,
        hidden: int = 64,
        n_layers: int = 3,
        attention: bool = False,
        tanh: bool = False,
        coords_range: float = 15.0,
        atom_types=None,
        n_atom_types: int | None = None,
        dim: int | None = None,
        key: PRNGKeyArray,
    ):
        if n_particles < 2 or spatial_dim < 1:
            raise ValueError(f"EGNNField needs at least 2 particles in >= 1 dimension, got {n_particles}, {spatial_dim}")
        if hidden < 1 or n_layers < 1:
            raise ValueError(f"EGNNField needs positive hidden and n_layers, got {hidden=}, {n_layers=}")
        if dim is not None and dim != n_particles * spatial_dim:
            raise ValueError(f"dim={dim} does not equal n_particles * spatial_dim = {n_particles * spatial_dim}")
        if atom_types is not None:
            types = np.asarray(atom_types)
            if types.shape != (n_particles,) or not np.issubdtype(types.dtype, np.integer):
                raise ValueError(f"atom_types must be {n_particles} integers, got shape {types.shape} {types.dtype}")
            n_types = int(types.max()) + 1 if n_atom_types is None else int(n_atom_types)
            if types.min() < 0 or types.max() >= n_types:
                raise ValueError(f"atom_types must lie in [0, {n_types}), got range [{types.min()}, {types.max()}]")
            self.atom_types = tuple(int(a) for a in types)
            self.n_atom_types = n_types
        else:
            if n_atom_types is not None:
                raise ValueError("n_atom_types given without atom_types")
            self.atom_types = None
            self.n_atom_types = None
        self.n_particles = n_particles
        self.spatial_dim = spatial_dim
        self.hidden = hidden
        ekey, *lkeys = jax.random.split(key, n_layers + 1)
        self.embedding = _Dense(self.node_feature_dim, hidden, key=ekey)
        self.layers = tuple(
            _EGCL(
                hidden,
                attention=attention,
                tanh=tanh,
                coords_range=coords_range,
                update_nodes=i < n_layers - 1,  # the last layer's node update would be unused
                key=k,
            )
            for i, k in enumerate(lkeys)
        )

    @property
    def dim(self) -> int:
        return self.n_particles * self.spatial_dim

    @property
    def node_feature_dim(self) -> int:
        """Width of the raw node features: one-hot atom type (if any) plus t."""
        return (self.n_atom_types or 0) + 1

    def _initial_nodes(self, t: Float[Array, " *b"]) -> Float[Array, "*b n hidden"]:
        # The input layer on [one-hot(type_i), t] is a learned per-type row plus t·w + b.
        h = t[..., None, None] * self.embedding.weight[-1] + self.embedding.bias  # (*b, 1, H)
        if self.atom_types is None:
            return jnp.broadcast_to(h, (*t.shape, self.n_particles, self.hidden))
        return h + self.embedding.weight[np.asarray(self.atom_types)]

    def _forward(self, t: Float[Array, " *b"], x: Float[Array, "*b dim"], *, fast: bool) -> Float[Array, "*b dim"]:
        """One sample (t scalar, x (dim,)) or a batch (t (b,), x (b, dim))."""
        x0 = x.reshape(*x.shape[:-1], self.n_particles, self.spatial_dim)
        edge_attr = jnp.sum((x0[..., :, None, :] - x0[..., None, :, :]) ** 2, axis=-1)
        h = self._initial_nodes(t.astype(x.dtype))
        xl = x0
        for i, layer in enumerate(self.layers):
            h, xl = layer(h, xl, edge_attr, fast=fast, first=i == 0)
        v = xl - x0
        v = v - jnp.mean(v, axis=-2, keepdims=True)
        return v.reshape(x.shape)

    def __call__(self, t: Time, x: Vector) -> Vector:
        if x.shape != (self.dim,):
            raise ValueError(f"EGNNField takes one flat sample of shape ({self.dim},), got {x.shape}")
        return self._forward(jnp.asarray(t, x.dtype), x, fast=False)

    def batched(self, t: Float[Array, " b"], x: Float[Array, "b dim"]) -> Float[Array, "b dim"]:
        """v for a batch, t (b,) and x (b, dim) → (b, dim): the same function as ``vmap(self)``.

        The pair messages use a hand-written reverse pass, so this path supports reverse-mode
        differentiation (training) but not forward mode; ``__call__`` supports both.
        """
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"EGNNField.batched takes a batch of shape (b, {self.dim}), got {x.shape}")
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        return self._forward(t, x, fast=True)

    def train_chunk_size(self, batch_size: int) -> int:
        """Samples per chunk in chunked training (a divisor of ``batch_size``): at most about 2048
        pair rows b·N², so that a chunk's (b, N, N, H) tensors stay in a core's L2 cache (8 for
        LJ13 at batch 256, 1 for LJ55; measured in ``benchmarks/egnn.py``). On a GPU the whole
        batch (:func:`~zoo.chunking.cache_sized_chunk`)."""
        return cache_sized_chunk(batch_size, 2048 // (self.n_particles * self.n_particles))

    def solve_chunk_size(self, batch_size: int) -> int:
        """Samples per chunk in the path-gradient solves (a divisor of ``batch_size``): at most
        about 20000 layer·pair rows n_layers·b·N². A solver stage keeps every layer's pair tensors
        for its reverse passes, so the working set grows with depth as well as with b·N²; chunks
        much smaller than the bound lose more to per-chunk overhead than they gain in cache
        (``path_gradient`` with and without chunks is the measurement). On a GPU the whole batch."""
        return cache_sized_chunk(batch_size, 20000 // (len(self.layers) * self.n_particles**2))

    def sampling_chunk_size(self, batch_size: int, tangents: int) -> int:
        """Samples per chunk in sampling and density solves (a divisor of ``batch_size``): at most
        about SAMPLING_CHUNK_FLOATS numbers in a layer's pair tensors, b·(1 + tangents)·N²·hidden.
        With the exact trace every sample carries (N−1)·d tangent copies of them, so for LJ13 a
        chunk is a few samples, where a whole batch of hundreds spills the cache and runs up to
        twice as slowly per sample. Never fewer than two where the batch allows: XLA compiles a
        one-sample batch into a program several times slower per sample (LJ55 and alanine
        dipeptide exceed the budget with one sample). On a GPU the whole batch."""
        per_sample = (1 + tangents) * self.n_particles**2 * self.hidden
        return cache_sized_chunk(batch_size, max(2, SAMPLING_CHUNK_FLOATS // per_sample))

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
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo._types import Array, Float, PRNGKeyArray, Time, Vector
from zoo.fields.base import AbstractVectorField
from zoo.registry import register

#: Added under the square root of ‖x_i − x_j‖²: keeps the derivative finite on the
#: diagonal (i = j, where x_i − x_j = 0 multiplies it away) and for coinciding particles.
_NORM_EPS = 1e-8


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
        h: Float[Array, "n hidden"],
        x: Float[Array, "n d"],
        edge_attr: Float[Array, "n n"],
    ) -> tuple[Float[Array, "n hidden"], Float[Array, "n d"]]:
        hd = self.hidden
        w = self.edge_in.weight
        diff = x[:, None, :] - x[None, :, :]  # (N, N, d): x_i − x_j
        r2 = jnp.sum(diff**2, axis=-1)  # (N, N)
        # First linear of φ_e, fused: per-node projections broadcast over the pairs.
        hi = h @ w[:hd] + self.edge_in.bias  # (N, H)
        hj = h @ w[hd : 2 * hd]  # (N, H)
        pre = hi[:, None, :] + hj[None, :, :] + r2[..., None] * w[2 * hd] + edge_attr[..., None] * w[2 * hd + 1]
        m = jax.nn.silu(self.edge_out(jax.nn.silu(pre)))  # (N, N, H)
        if self.att is not None:
            m = m * jax.nn.sigmoid(self.att(m))
        phi = jax.nn.silu(self.coord_in(m)) @ self.coord_out  # (N, N)
        if self.tanh:
            phi = jnp.tanh(phi) * self.coords_range
        # The diagonal has x_i − x_j = 0, so it contributes nothing to the coordinate sum.
        scale = phi / (jnp.sqrt(r2 + _NORM_EPS) + 1.0)
        x = x + jnp.einsum("ijd,ij->id", diff, scale)
        if self.node_in is None:
            return h, x
        # Σ_{j≠i} m_ij: the full row sum minus the diagonal term (cheaper than a mask product).
        agg = jnp.sum(m, axis=1) - jnp.diagonal(m, axis1=0, axis2=1).T
        h = h + self.node_out(jax.nn.silu(self.node_in(jnp.concatenate([h, agg], axis=-1))))
        return h, x


@register("field")
class EGNNField(AbstractVectorField):
    r"""E(n)-equivariant GNN vector field $v_θ(t, x)$ for N particles in d dimensions.

    Node input: t for identical particles; with ``atom_types`` (length N, values in
    ``[0, n_atom_types)``) the one-hot atom type concatenated with t, which the input
    layer turns into a learned per-type embedding. ``attention`` gates each message by
    $σ(w^\top m_{ij} + b)$; ``tanh`` bounds the coordinate weights to
    ``coords_range · tanh(φ_x(m_ij))``.

    ``__call__(t, x)`` takes one flat sample (N·d,) and returns the mean-free velocity (N·d,).
    """

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

    def _initial_nodes(self, t, dtype) -> Float[Array, "n hidden"]:
        t = jnp.asarray(t, dtype)
        # The input layer on [one-hot(type_i), t] is a learned per-type row plus t·w + b.
        h = t * self.embedding.weight[-1] + self.embedding.bias
        if self.atom_types is None:
            return jnp.broadcast_to(h, (self.n_particles, self.hidden))
        rows = self.embedding.weight[np.asarray(self.atom_types)]
        return rows + h

    def __call__(self, t: Time, x: Vector) -> Vector:
        if x.shape != (self.dim,):
            raise ValueError(f"EGNNField takes one flat sample of shape ({self.dim},), got {x.shape}")
        x0 = x.reshape(self.n_particles, self.spatial_dim)
        edge_attr = jnp.sum((x0[:, None, :] - x0[None, :, :]) ** 2, axis=-1)
        h = self._initial_nodes(t, x.dtype)
        xl = x0
        for layer in self.layers:
            h, xl = layer(h, xl, edge_attr)
        v = xl - x0
        v = v - jnp.mean(v, axis=0, keepdims=True)
        return v.reshape(self.dim)

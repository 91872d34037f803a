"""Fully connected vector field for low-dimensional targets (the 2-D experiments)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import PRNGKeyArray, Time, Vector
from zoo.fields.base import AbstractVectorField

ACTIVATIONS = {
    "elu": jax.nn.elu,
    "silu": jax.nn.silu,
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "gelu": jax.nn.gelu,
    "softplus": jax.nn.softplus,
}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class MLPField(AbstractVectorField):
    r"""MLP vector field $v_θ(t, x) = \mathrm{MLP}([x, t])$ (path-gradient paper: 4 × 64, ELU).

    ``depth`` counts the hidden layers; ``time_input=False`` gives an autonomous field.
    """

    mlp: eqx.nn.MLP
    n_dim: int = eqx.field(static=True)
    time_input: bool = eqx.field(static=True)

    def __init__(
        self,
        dim: int,
        *,
        width: int = 64,
        depth: int = 4,
        activation_name: str = "elu",
        time_input: bool = True,
        key: PRNGKeyArray,
    ):
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"MLPField needs positive dim, width and depth; got {dim=}, {width=}, {depth=}")
        self.n_dim = dim
        self.time_input = time_input
        self.mlp = eqx.nn.MLP(
            in_size=dim + int(time_input),
            out_size=dim,
            width_size=width,
            depth=depth,
            activation=activation(activation_name),
            key=key,
        )

    @property
    def dim(self) -> int:
        return self.n_dim

    def __call__(self, t: Time, x: Vector) -> Vector:
        if self.time_input:
            x = jnp.concatenate([x, jnp.reshape(jnp.asarray(t, x.dtype), (1,))])
        return self.mlp(x)

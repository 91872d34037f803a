"""Gradient clipping and a moving average of the parameters as optax transformations.

The optimisers and schedules themselves are optax's, named in configs by their optax names
(:mod:`zoo.experiments.configurables`)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax


def with_clipping(optimizer: optax.GradientTransformation, clip_norm: float | None) -> optax.GradientTransformation:
    """Clip the (accumulated) gradient to a global norm before the optimiser sees it."""
    if clip_norm is None:
        return optimizer
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)


class ParameterAverageState(NamedTuple):
    """The exponential moving average of the parameters and the number of updates it has seen."""

    count: jax.Array
    average: optax.Params


def parameter_average(decay: float, *, warmup: bool = True) -> optax.GradientTransformation:
    r"""Track an exponential moving average of the parameters *after* each update; updates pass unchanged.

    Chain it last (:func:`with_parameter_average`) so that it sees the final updates. The
    average starts at the initial parameters; after update t (t = 1, 2, …)

    $$\bar θ_t = β_t \bar θ_{t-1} + (1 - β_t)\, θ_t, \qquad β_t = \min\bigl(β, \tfrac{1 + t}{10 + t}\bigr)$$

    with ``warmup`` (β_t = β without), so that early averages forget the initial weights
    quickly instead of dragging them along for ~1/(1 − β) steps. Read it with
    :func:`parameter_average_of`.
    """
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"the parameter average's decay must be in [0, 1), got {decay}")

    def init(params):
        return ParameterAverageState(count=jnp.zeros((), jnp.int32), average=jax.tree.map(jnp.asarray, params))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError("parameter_average needs the parameters: call update(grads, state, params)")
        count = state.count + 1
        beta = jnp.asarray(decay, jnp.float32)
        if warmup:
            t = count.astype(jnp.float32)
            beta = jnp.minimum(beta, (1.0 + t) / (10.0 + t))
        new_params = optax.apply_updates(params, updates)
        average = jax.tree.map(lambda a, p: (beta * a + (1.0 - beta) * p).astype(a.dtype), state.average, new_params)
        return updates, ParameterAverageState(count=count, average=average)

    return optax.GradientTransformation(init, update)


def with_parameter_average(optimizer: optax.GradientTransformation, decay: float | None) -> optax.GradientTransformation:
    """``optimizer`` followed by :func:`parameter_average` (``decay=None``: the optimizer unchanged)."""
    if decay is None:
        return optimizer
    return optax.chain(optimizer, parameter_average(decay))


def parameter_average_of(opt_state) -> optax.Params | None:
    """The averaged parameters held in ``opt_state``, or ``None`` if it tracks no average."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, ParameterAverageState))
             if isinstance(s, ParameterAverageState)]  # fmt: skip
    if len(found) > 1:
        raise ValueError("the optimiser state holds more than one parameter average")
    return found[0].average if found else None

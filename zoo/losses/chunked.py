r"""Regression losses evaluated chunk by chunk, with the gradient accumulated in the same pass.

The flow-matching objective is a mean over samples,

$$L = \frac{1}{b\,D} \sum_{k} \sum_{i \in \text{chunk } k} \|v_θ(t_i, x_i) - u_i\|^2 ,$$

so its gradient is the sum of the chunks' gradients. :func:`chunked_squared_error` runs one
``lax.scan`` over chunks of the batch; each step evaluates the field on its chunk and
immediately differentiates it (``value_and_grad``), adding the parameter gradient to a
running sum. The value and the accumulated gradient are returned through a ``custom_vjp``,
so the loss composes with ``jax.grad``/``eqx.filter_value_and_grad`` like any other.

Why: for pair networks the activations of a whole batch are tens of MB per layer; a chunk's
fit in the core's cache, and nothing has to be stored between the forward and the backward
pass of different chunks (no residuals stacked by the scan, no recomputation). The cotangents
for t, x and the targets are computed as well, so the function is correct under reverse-mode
differentiation with respect to any of its inputs (forward mode is not supported).
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import Array, Scalar
from zoo.chunking import from_chunks, largest_divisor_at_most, to_chunks


def resolve_chunk_size(b: int, requested: int | None, preferred: int) -> int:
    """Samples per chunk for a batch of b: ``requested``, or when None the field's ``preferred``
    size (its ``train_chunk_size(b)`` or ``solve_chunk_size(b)``), rounded down to a divisor of b
    so that every chunk has the same size."""
    return largest_divisor_at_most(b, preferred if requested is None else requested)


def chunked_squared_error(field, t: Array, x: Array, target: Array, chunk_size: int) -> Scalar:
    r"""$\mathrm{mean}\,(v_θ(t, x) - u)^2$ over a batch, evaluated ``chunk_size`` samples at a time.

    ``t`` (b,), ``x`` and ``target`` (b, dim); ``chunk_size`` must divide b. The field is
    called through its ``batched(t, x)`` method.
    """
    b = x.shape[0]
    if chunk_size < 1 or b % chunk_size:
        raise ValueError(f"chunk_size must be a positive divisor of the batch size {b}, got {chunk_size}")
    if t.shape != (b,) or target.shape != x.shape:
        raise ValueError(f"expected t (b,), x and target (b, dim); got {t.shape}, {x.shape}, {target.shape}")
    if chunk_size == b:  # one chunk: plain autodiff, nothing to accumulate
        return jnp.mean((field.batched(t, x) - target) ** 2)

    params, static = eqx.partition(field, eqx.is_inexact_array)
    scale = 1.0 / target.size

    def chunk_loss(p, tc, xc, uc):
        return jnp.sum((eqx.combine(p, static).batched(tc, xc) - uc) ** 2) * scale

    value_and_grad = jax.value_and_grad(chunk_loss, argnums=(0, 1, 2, 3))

    def split(a):
        return to_chunks(a, chunk_size)

    def forward(p, t, x, target):
        def step(carry, chunk):
            total, grads = carry
            value, (gp, gt, gx, gu) = value_and_grad(p, *chunk)
            return (total + value, jax.tree.map(jnp.add, grads, gp)), (gt, gx, gu)

        init = (jnp.zeros((), x.dtype), jax.tree.map(jnp.zeros_like, p))
        (value, grads), (gt, gx, gu) = jax.lax.scan(step, init, (split(t), split(x), split(target)))
        return value, (grads, from_chunks(gt), from_chunks(gx), from_chunks(gu))

    @jax.custom_vjp
    def loss(p, t, x, target):  # the value alone (no gradients) when nothing differentiates it
        def step(total, chunk):
            return total + chunk_loss(p, *chunk), None

        return jax.lax.scan(step, jnp.zeros((), x.dtype), (split(t), split(x), split(target)))[0]

    def backward(saved, ct):
        return jax.tree.map(lambda g: ct * g, saved)

    loss.defvjp(forward, backward)
    return loss(params, t, x, target)

"""FLOPs of the benchmarked work, and the machine's own float32 rate on the shapes it is made of.

A time says little across machines (zoo's LJ13 FM step is ~2× faster on an Intel Xeon than on
an AMD EPYC of the same size); the fraction of the machine's attainable rate that a unit
reaches says how much is left to gain on any machine.

- **Counted FLOPs** are the work of the plain per-sample computation, counted by XLA's cost
  analysis on a loop-free program (XLA counts a loop body once, so loops are multiplied out
  here: RK4 stages and samples): one field evaluation; value and gradient of one sample's
  flow-matching error (times the batch) for the FM step; one RK4 stage's velocity and
  divergence (Hutchinson: one JVP; exact: one JVP per dimension of the base's support) times 4 × steps × samples
  for sampling; for the path-gradient step, one RK4 stage of each of its three solves (the inverse: a field
  evaluation; the augmented solve for ∇ₓ log q: the vector-Jacobian product of velocity and divergence; the
  parameter adjoint: the field's vector-Jacobian product in parameters and position) times 4 × steps × samples. Work zoo saves by its own formulation (shared pair terms, a hand-written
  reverse pass) is not counted as done, so the rate is a rate of useful work.
- **The attainable rate** is the best float32 rate of ``jnp.matmul`` measured in the same run
  on the matrix products the field is made of: for the EGNN the edge products
  (samples · n(n-1), hidden) × (hidden, hidden) at the chunk sizes zoo evaluates and the
  node products; for the MLP (batch, width) × (width, width).
"""

from __future__ import annotations

import math
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo.fields import EGNNField, MLPField
from zoo.flows import ExactTrace


def count_flops(fn, *args) -> float:
    """Floating-point operations of one call of ``jax.jit(fn)(*args)`` by XLA's cost analysis
    (``fn`` must be loop-free: XLA counts the body of a loop once)."""
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    flops = (analysis or {}).get("flops")
    return float(flops) if flops is not None and flops > 0 else math.nan


def unit_flops(flow, *, t: float = 0.5, pg_divergence: str = "hutchinson") -> dict[str, float]:
    """Per-sample FLOPs: ``field`` (one evaluation), ``fm`` (value and parameter gradient of
    one sample's squared error), ``stage_hutchinson`` and ``stage_exact`` (one RK4 stage's
    velocity and divergence), ``pg_augmented`` and ``pg_adjoint`` (one stage of the
    path-gradient step's augmented solve, with ``pg_divergence``, and of its parameter
    adjoint) and ``stage_pg`` (one stage of all three of its solves: inverse, augmented, adjoint)."""
    dim = flow.dim
    x = jnp.asarray(flow.base.sample(jax.random.PRNGKey(0), 1)[0], jnp.float32)
    u = jnp.ones(dim, jnp.float32)
    field = flow.field
    params, static = eqx.partition(field, eqx.is_inexact_array)

    def squared_error(p, y, target):
        return jnp.sum((eqx.combine(p, static)(t, y) - target) ** 2)

    hutchinson = flow.with_settings(divergence="hutchinson")
    exact = flow.with_settings(divergence=ExactTrace())
    pg = flow.with_settings(divergence=pg_divergence)
    eps = u if pg.needs_key else None

    def augmented_stage(y, a):
        # (v, ∇·v) and its x-gradient with cotangent (a, 1): da/dt = -(∂v/∂x)ᵀa - ∇ₓ(∇·v).
        (v, div), vjp = jax.vjp(lambda yy: pg.velocity_and_divergence(t, yy, eps), y)
        return v, div, vjp((a, jnp.ones_like(div)))

    def adjoint_stage(p, y, a):
        # v and (∂v/∂θ)ᵀa, (∂v/∂x)ᵀa: the continuous adjoint that carries c back to the parameters.
        v, vjp = jax.vjp(lambda pp, yy: eqx.combine(pp, static)(t, yy), p, y)
        return v, vjp(a)

    units = {
        "field": count_flops(lambda y: field(t, y), x),
        "fm": count_flops(jax.value_and_grad(squared_error), params, x, u),
        "stage_hutchinson": count_flops(lambda y, e: hutchinson.velocity_and_divergence(t, y, e), x, u),
        "stage_exact": count_flops(lambda y: exact.velocity_and_divergence(t, y, None), x),
        "pg_augmented": count_flops(augmented_stage, x, u),
        "pg_adjoint": count_flops(adjoint_stage, params, x, u),
    }
    units["stage_pg"] = units["field"] + units["pg_augmented"] + units["pg_adjoint"]
    return units


def work_flops(units: dict[str, float], work: str, batch: int, n_steps: int = 20) -> float:
    """FLOPs of one benchmarked call: ``fm``/``fm_at_pg_batch``/``eqot``/``eqot_ahead`` steps (the EQ-OT pairing
    is not floating-point work of the field and is not counted), ``sample_hutchinson``,
    ``sample_exact`` and ``pg`` (RK4 with ``n_steps``); NaN for work without a count."""
    if work in ("fm", "fm_at_pg_batch", "eqot", "eqot_ahead"):
        return units["fm"] * batch
    if work.startswith("sample_"):
        return units["stage_" + work.removeprefix("sample_")] * 4 * n_steps * batch
    if work == "pg":
        return units["stage_pg"] * 4 * n_steps * batch
    return math.nan


def product_shapes(field, batches) -> list[tuple[int, int, int]]:
    """(m, k, n) of the matrix products a field evaluation is made of, at the given batch sizes."""
    shapes = []
    for b in sorted(set(batches)):
        if isinstance(field, EGNNField):
            n, h = field.n_particles, field.hidden
            shapes += [(b * n * (n - 1), h, h), (b * n, 2 * h, h)]
        elif isinstance(field, MLPField):
            widths = [layer.weight.shape for layer in field.mlp.layers]
            shapes += [(b, w[1], w[0]) for w in widths]
        else:
            raise TypeError(f"no product shapes known for {type(field).__name__}")
    return shapes


def matmul_rate(shapes, *, repeats: int = 15, min_seconds: float = 0.02) -> dict:
    """The machine's float32 ``jnp.matmul`` rate (FLOP/s) per shape and the best of them."""
    rates = {}
    for m, k, n in shapes:
        a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
        b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
        f = jax.jit(jnp.matmul)
        f(a, b).block_until_ready()
        # Enough calls per timing that timer and dispatch overheads do not count.
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        calls = max(1, int(min_seconds / max(time.perf_counter() - t0, 1e-7)))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(calls):
                out = f(a, b)
            out.block_until_ready()
            times.append((time.perf_counter() - t0) / calls)
        rates[f"{m}x{k}x{n}"] = 2.0 * m * k * n / float(np.median(times))
    return {"by_shape": rates, "best": max(rates.values())}

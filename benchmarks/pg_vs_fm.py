"""Cost of a path-gradient training step against a flow-matching step (2-D MLP CNF, LJ13 EGNN CNF).

Run: ``python -m benchmarks.pg_vs_fm [--model mlp2d|lj13] [--batch N] [--repeats 30] [--out PATH]``.

One training step is value_and_grad of the loss plus an optax Adam update, compiled with
``eqx.filter_jit`` (lower + compile timed separately, then the compiled executable is
called). Timing rounds interleave FM and PG calls so that both see the same load on a
shared machine; the table gives the median wall time and process CPU time per step (CPU
time is the steadier measure of work when other processes compete for the cores). The
model is the path-gradient paper's 2-D setting: MLP 4 × 64 ELU with time input, RK4 with
15 steps, exact divergence. The paper measured PG ≈ 275 × FM; its function-evaluation
count predicts ≥ 150 ×.

Memory of one PG step at 15/30/60/120 RK4 steps is the compiled executable's temporary
buffer size (``memory_analysis().temp_size_in_bytes``) for the backsolve adjoint, for the
direct adjoint (diffrax's RecursiveCheckpointAdjoint keeps O(√n) checkpoints of the small
2-D state, so it is nearly flat too) and, for contrast, for reverse mode through an
unrolled RK4 scan that stores every stage (linear in n).

``--model lj13`` times the same step for LJ13 instead: EGNNField (13 particles in 3-D,
hidden 64, 3 layers) in a CNF on MeanFreeNormal(13, 3), RK4 with 15 steps, Hutchinson
divergence, batch 64 by default (the path-gradient paper's LJ13 batch), data (positions and
forces) from the stored ``assets/data/lj13`` set; memory is that of the PG step (backsolve
adjoint) at 15 and 30 RK4 steps. Its JSON goes to ``benchmarks/pg_vs_fm_lj13.json`` unless
``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from benchmarks._timing import run_interleaved, write_result
from zoo.data import Batch, stored_dataset
from zoo.fields import EGNNField, MLPField
from zoo.flows import CNF, MeanFreeNormal, StandardNormal
from zoo.losses import AbstractLoss, FlowMatching, PathGradientForwardKL, path_gradient
from zoo.systems import GaussianMixture2D, LennardJones


def _rk4_unrolled(field, x, n_steps: int):
    """T_θ(x) for a batch (b, dim) by RK4 in a plain scan: reverse mode stores every stage."""
    dt = 1.0 / n_steps
    velocity = jax.vmap(field, in_axes=(None, 0))

    def step(x, i):
        t = i * dt
        k1 = velocity(t, x)
        k2 = velocity(t + dt / 2, x + dt / 2 * k1)
        k3 = velocity(t + dt / 2, x + dt / 2 * k2)
        k4 = velocity(t + dt, x + dt * k3)
        return x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4), None

    x, _ = jax.lax.scan(step, x, jnp.arange(n_steps, dtype=x.dtype))
    return x


class UnrolledPathGradient(AbstractLoss):
    """The PG surrogate with T_θ(z) differentiated through an unrolled RK4 (memory contrast only)."""

    def __call__(self, model, batch, key):
        terms = path_gradient(model, batch.x, batch.forces, key)
        z = jax.lax.stop_gradient(terms.z)
        return jnp.mean(jnp.sum(terms.c * _rk4_unrolled(model.field, z, model.solver.n_steps), -1)), {}


def make_step(loss_fn, optimizer):
    @eqx.filter_jit
    def step(model, opt_state, batch, key):
        params = eqx.filter(model, eqx.is_inexact_array)
        (value, aux), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, batch, key)
        updates, opt_state = optimizer.update(eqx.filter(grads, eqx.is_inexact_array), opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, value

    return step


def compile_step(loss_fn, model, batch, key):
    """Lower and compile one training step; returns (compiled, opt_state, seconds, temp bytes)."""
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    step = make_step(loss_fn, optimizer)
    t0 = time.perf_counter()
    compiled = step.lower(model, opt_state, batch, key).compile()
    seconds = time.perf_counter() - t0
    stats = compiled.compiled.memory_analysis()
    temp = None if stats is None else int(stats.temp_size_in_bytes)
    return compiled, opt_state, seconds, temp


def time_calls(compiled, model, opt_state, batch, key, calls: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call, averaged over ``calls`` back-to-back calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(calls):
        jax.block_until_ready(compiled(model, opt_state, batch, jax.random.fold_in(key, i)))
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def make_model(n_steps: int = 15, seed: int = 0) -> CNF:
    field = MLPField(2, width=64, depth=4, activation_name="elu", key=jax.random.PRNGKey(seed))
    return CNF(field, StandardNormal(2), solver="rk4", n_steps=n_steps, divergence="exact")


def make_lj13_model(n_steps: int = 15, seed: int = 0) -> CNF:
    field = EGNNField(n_particles=13, spatial_dim=3, hidden=64, n_layers=3, key=jax.random.PRNGKey(seed))
    return CNF(field, MeanFreeNormal(13, 3), solver="rk4", n_steps=n_steps, divergence="hutchinson")


def lj13_batch(n: int) -> Batch:
    """The first n training samples of the stored LJ13 set: flat positions and forces (n, 39)."""
    data = stored_dataset(LennardJones(), path="assets/data/lj13", n_train=n, n_val=1, n_test=1)
    return Batch(x=jnp.asarray(data.train.positions), forces=jnp.asarray(data.train.forces))


MODELS = {
    # name: (default batch, default memory steps, default JSON path, description)
    "mlp2d": (256, [15, 30, 60, 120], "benchmarks/pg_vs_fm.json",
              "MLPField 4x64 ELU, RK4 15 steps, exact divergence, 2-D GaussianMixture2D"),
    "lj13": (64, [15, 30], "benchmarks/pg_vs_fm_lj13.json",
             "EGNNField 13x3 hidden 64 3 layers, MeanFreeNormal, RK4 15 steps, Hutchinson divergence, "
             "LennardJones (stored assets/data/lj13)"),
}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mlp2d")
    parser.add_argument("--batch", type=int, default=None, help="default 256 (mlp2d), 64 (lj13)")
    parser.add_argument("--repeats", type=int, default=30, help="interleaved timing rounds")
    parser.add_argument("--fm-calls", type=int, default=20, help="FM calls per round")
    parser.add_argument("--memory-steps", type=int, nargs="+", default=None,
                        help="default 15 30 60 120 (mlp2d), 15 30 (lj13)")
    parser.add_argument("--out", default=None, help="JSON path; '' writes none")
    args = parser.parse_args(argv)
    default_batch, default_memory_steps, default_out, description = MODELS[args.model]
    args.batch = default_batch if args.batch is None else args.batch
    args.memory_steps = default_memory_steps if args.memory_steps is None else args.memory_steps
    args.out = default_out if args.out is None else args.out

    key = jax.random.PRNGKey(0)
    if args.model == "mlp2d":
        system = GaussianMixture2D()
        x = system.sample(jax.random.PRNGKey(1), args.batch)
        batch = Batch(x=x, forces=jax.vmap(system.force)(x))
        model_fn = make_model
        # Rounds interleave the losses so that all of them see the same load on a shared
        # machine; each round times one PG call and a block of FM calls (FM is ~100x faster).
        losses = {
            "FM": (FlowMatching(), args.fm_calls),
            "PG (backsolve)": (PathGradientForwardKL(adjoint="backsolve"), 1),
            "PG (direct)": (PathGradientForwardKL(adjoint="direct"), 1),
        }
        memory_losses = (
            ("backsolve", PathGradientForwardKL(adjoint="backsolve")),
            ("direct (diffrax RecursiveCheckpointAdjoint)", PathGradientForwardKL(adjoint="direct")),
            ("unrolled RK4 scan (no checkpoints)", UnrolledPathGradient()),
        )
    else:
        batch = lj13_batch(args.batch)
        model_fn = make_lj13_model
        losses = {
            "FM": (FlowMatching(), args.fm_calls),
            "PG (backsolve)": (PathGradientForwardKL(adjoint="backsolve"), 1),
        }
        memory_losses = (("backsolve", PathGradientForwardKL(adjoint="backsolve")),)
    model = model_fn()

    timing, calls = {}, {}
    for name, (loss_fn, n_calls) in losses.items():
        step, opt_state, compile_s, temp = compile_step(loss_fn, model, batch, key)
        timing[name] = {"compile_s": compile_s, "temp_bytes": temp}
        calls[name] = lambda s=step, o=opt_state, c=n_calls: time_calls(s, model, o, batch, key, c)
    for name, summary in run_interleaved(calls, args.repeats).items():
        timing[name].update(
            step_ms=summary["wall_ms"],
            step_ms_iqr=summary["wall_ms_iqr"],
            cpu_ms=summary["cpu_ms"],
            rounds=args.repeats,
            calls_per_round=losses[name][1],
        )
    for entry in timing.values():
        entry["ratio_to_fm"] = entry["step_ms"] / timing["FM"]["step_ms"]
        entry["cpu_ratio_to_fm"] = entry["cpu_ms"] / timing["FM"]["cpu_ms"]

    memory = {}
    for name, loss_fn in memory_losses:
        memory[name] = {}
        for n_steps in args.memory_steps:
            _, _, _, temp = compile_step(loss_fn, model_fn(n_steps), batch, key)
            memory[name][n_steps] = temp

    result = {
        "batch": args.batch,
        "model": description,
        "model_name": args.model,
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "load_average_1min": os.getloadavg()[0],
        "timing": timing,
        "memory_temp_bytes": memory,
    }

    print(
        f"\n{args.model}: {description}\nTraining step (value_and_grad + Adam), batch {args.batch}, {result['device']} ({os.cpu_count()} cores), "
        f"median of {args.repeats} interleaved rounds; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| loss | wall (ms) | wall IQR (ms) | × FM (wall) | CPU (ms) | × FM (CPU) | compile (s) | temp memory (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, e in timing.items():
        mib = "n/a" if e["temp_bytes"] is None else f"{e['temp_bytes'] / 2**20:.2f}"
        lo, hi = e["step_ms_iqr"]
        print(
            f"| {name} | {e['step_ms']:.2f} | {lo:.2f}–{hi:.2f} | {e['ratio_to_fm']:.0f} | {e['cpu_ms']:.2f} | "
            f"{e['cpu_ratio_to_fm']:.0f} | {e['compile_s']:.1f} | {mib} |"
        )
    print(f"\nPeak temporary memory of one PG step (compiled memory analysis, MiB), batch {args.batch}\n")
    print("| RK4 steps | " + " | ".join(str(n) for n in args.memory_steps) + " | max/min |")
    print("|---|" + "---:|" * (len(args.memory_steps) + 1))
    for adjoint, row in memory.items():
        vals = [row[n] for n in args.memory_steps]
        cells = " | ".join("n/a" if v is None else f"{v / 2**20:.2f}" for v in vals)
        spread = "n/a" if None in vals else f"{max(vals) / min(vals):.2f}"
        print(f"| {adjoint} | {cells} | {spread} |")

    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()

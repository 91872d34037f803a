"""EGNN flow-matching training steps (LJ13, LJ55) and the equivariant-OT pairing, against the PyTorch reference.

Run: ``python -m benchmarks.egnn [--repeats 20] [--only lj13_3 lj13_5 lj55_3 eqot] [--out benchmarks/egnn.json]``.

One training step is value_and_grad of the flow-matching loss plus an optax Adam update,
compiled once with ``eqx.filter_jit`` (lower + compile timed separately), then called on a
fixed batch: median wall time (and process CPU time) of ``--repeats`` rounds after two
warm-up calls. Rounds interleave the variants so that all of them see the same load.

Variants of the same loss (equal values and gradients, tested in tests/fields/test_egnn.py):

- ``vmap``: ``jax.vmap`` of the single-sample EGNN over the whole batch, plain autodiff
  (what the field does without help; the first version of this module).
- ``zoo``: ``FlowMatching()`` as shipped: the batch in chunks of ``field.train_chunk_size``
  samples, each evaluated through ``EGNNField.batched`` (pair messages with a hand-written
  reverse pass) and differentiated in the same pass (``zoo.losses.chunked``).

The PyTorch reference (bgflow EGNN + torchdiffeq, hidden 64, 2 threads, quiet machine):
LJ13 3 layers 0.21 s (one thread with the other core busy: 0.38 s), 5 layers 0.40 s (0.55 s),
LJ55 3 layers batch 64 1.63 s (2.6 s). The data are random mean-free configurations:
the step's cost does not depend on their values. The machine is shared: the table records
the 1-minute load average; compare variants within one run.
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

from benchmarks._timing import compile_call, run_interleaved, timed, write_result
from zoo import resources
from zoo.data import Batch, load_dataset
from zoo.fields import EGNNField
from zoo.flows import CNF, MeanFreeNormal
from zoo.losses import AbstractLoss, EquivariantOTFlowMatching, FlowMatching
from zoo.losses.equivariant import aligned_cost_matrix

#: (name, particles, layers, batch, reference seconds: quiet 2 threads, 1 thread beside a busy core)
CASES = {
    "lj13_3": (13, 3, 256, 0.21, 0.38),
    "lj13_5": (13, 5, 256, 0.40, 0.55),
    "lj55_3": (55, 3, 64, 1.63, 2.6),
}


class VmapFlowMatching(AbstractLoss):
    """FM with ``vmap`` of the single-sample field over the whole batch (the baseline)."""

    def __call__(self, model, batch, key):
        x1 = batch.x
        noise_key, _, fm_key = jax.random.split(key, 3)
        x0 = model.base.sample(noise_key, x1.shape[0]).astype(x1.dtype)
        t = jax.random.uniform(jax.random.split(fm_key)[0], (x1.shape[0], 1), dtype=x1.dtype)
        xt = (1.0 - t) * x0 + t * x1
        loss = jnp.mean((jax.vmap(model.field)(t[:, 0], xt) - (x1 - x0)) ** 2)
        return loss, {}


def make_step(loss_fn, optimizer):
    def step(model, opt_state, batch, key):
        params = eqx.filter(model, eqx.is_inexact_array)
        (value, _), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model, batch, key)
        updates, opt_state = optimizer.update(eqx.filter(grads, eqx.is_inexact_array), opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, value

    return eqx.filter_jit(step)


def training_step_case(name: str, repeats: int, seed: int = 0) -> dict:
    n, layers, b, ref, ref_issue = CASES[name]
    key = jax.random.PRNGKey(seed)
    model = CNF(EGNNField(n, 3, hidden=64, n_layers=layers, key=key), MeanFreeNormal(n, 3))
    batch = Batch(x=model.base.sample(jax.random.PRNGKey(seed + 1), b))
    optimizer = optax.adam(1e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    variants = {"vmap": VmapFlowMatching(), "zoo": FlowMatching()}
    result, calls = {}, {}
    for vname, loss_fn in variants.items():
        step = make_step(loss_fn, optimizer)
        t0 = time.perf_counter()
        compiled = step.lower(model, opt_state, batch, key).compile()
        result[vname] = {"compile_s": time.perf_counter() - t0}
        calls[vname] = lambda c=compiled: timed(c, model, opt_state, batch, key)
    for vname, timing in run_interleaved(calls, repeats).items():
        result[vname].update(timing)
        result[vname]["speedup_vs_reference"] = 1e3 * ref / timing["wall_ms"]
        result[vname]["speedup_vs_issue_reference"] = 1e3 * ref_issue / timing["wall_ms"]
    return {
        "particles": n,
        "layers": layers,
        "batch": b,
        "chunk_size": model.field.train_chunk_size(b),
        "reference_s": ref,
        "issue_reference_s": ref_issue,
        "variants": result,
    }


def eqot_case(repeats: int, n: int = 13, b: int = 256, seed: int = 0) -> dict:
    """EQ-OT pairing of one LJ13 batch: the B×B aligned costs (B² assignments + Kabsch) by both
    implementations, the batch assignment and the alignment; and the whole EQ-OT FM training
    step beside the FM step it extends (same model and batch)."""
    base = MeanFreeNormal(n, 3)
    x0 = base.sample(jax.random.PRNGKey(seed), b)
    # The searches stop early, so their cost depends on the data: the shipped LJ13 training set.
    positions = load_dataset(resources.ASSETS / "data" / "lj13", "train")[0][:b]
    x1 = jnp.asarray((positions - positions.mean(1, keepdims=True)).reshape(b, n * 3), jnp.float32)
    loss = EquivariantOTFlowMatching()
    calls, compiles = {}, {}
    for method in ("host", "vectorised"):
        name = f"aligned cost matrix, {method} (B² assignments + rotations)"
        calls[name], compiles[name] = compile_call(lambda a, c, m=method: aligned_cost_matrix(a, c, n, 3, method=m)[0], x0, x1)
    name = "pair(): cost matrix + batch assignment + alignment"
    calls[name], compiles[name] = compile_call(lambda a, c: loss.pair(a, c, None, base=base)[0], x0, x1)

    key = jax.random.PRNGKey(seed)
    model = CNF(EGNNField(n, 3, n_layers=3, key=key), base)
    optimizer = optax.adam(1e-4)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    batch = Batch(x=x1)
    for name, step_loss in (("FM training step (zoo)", FlowMatching()), ("EQ-OT FM training step (pairing + FM step)", loss)):
        t0 = time.perf_counter()
        calls[name] = make_step(step_loss, optimizer).lower(model, opt_state, batch, key).compile()
        compiles[name] = time.perf_counter() - t0
    args = {name: (model, opt_state, batch, key) if "step" in name else (x0, x1) for name in calls}
    timing = run_interleaved(
        {name: (lambda c=call, a=args[name]: timed(c, *a)) for name, call in calls.items()},
        max(3, repeats // 4),
        warmup=1,
    )
    for name, entry in timing.items():
        entry["compile_s"] = compiles[name]
    ratio = timing["EQ-OT FM training step (pairing + FM step)"]["wall_ms"] / timing["FM training step (zoo)"]["wall_ms"]
    return {"particles": n, "batch": b, "problems": b * b, "timing": timing, "eqot_over_fm": ratio}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="interleaved timing rounds")
    parser.add_argument("--only", nargs="+", default=[*CASES, "eqot"], choices=[*CASES, "eqot"])
    parser.add_argument("--out", default="benchmarks/egnn.json")
    args = parser.parse_args(argv)

    load_start = os.getloadavg()[0]
    cases = {name: training_step_case(name, args.repeats) for name in CASES if name in args.only}
    eqot = eqot_case(args.repeats) if "eqot" in args.only else None
    result = {
        "device": str(jax.devices()[0]),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "load_average_1min": [load_start, os.getloadavg()[0]],
        "repeats": args.repeats,
        "training_steps": cases,
        "eqot": eqot,
    }

    print(
        f"\nEGNN FM training step (value_and_grad + Adam), hidden 64, {result['device']} ({os.cpu_count()} cores), "
        f"median of {args.repeats} interleaved rounds; 1-min load average {load_start:.1f} → {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| case | variant | wall (ms) | wall IQR (ms) | CPU (ms) | compile (s) | reference (s) | speed-up vs reference |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for case in cases.values():
        label = f"LJ{case['particles']} {case['layers']}L b{case['batch']}"
        for vname, e in case["variants"].items():
            lo, hi = e["wall_ms_iqr"]
            chunk = f" (chunks of {case['chunk_size']})" if vname == "zoo" else ""
            print(
                f"| {label} | {vname}{chunk} | {e['wall_ms']:.1f} | {lo:.1f}–{hi:.1f} | {e['cpu_ms']:.1f} | "
                f"{e['compile_s']:.1f} | {case['reference_s']:.2f} / {case['issue_reference_s']:.2f} | "
                f"{e['speedup_vs_reference']:.2f}× / {e['speedup_vs_issue_reference']:.2f}× |"
            )
    if eqot is not None:
        print(f"\nEquivariant OT pairing, LJ{eqot['particles']} batch {eqot['batch']} ({eqot['problems']} particle assignments)\n")
        print("| work | wall (ms) | CPU (ms) | compile (s) |")
        print("|---|---:|---:|---:|")
        for name, e in eqot["timing"].items():
            print(f"| {name} | {e['wall_ms']:.0f} | {e['cpu_ms']:.0f} | {e['compile_s']:.1f} |")
        print(f"\nEQ-OT FM step / FM step (wall): {eqot['eqot_over_fm']:.2f}×")

    if args.out:
        write_result(result, args.out)
    return result


if __name__ == "__main__":
    main()

"""The benchmark suite: training, path-gradient and sampling costs of every shipped model size.

Run: ``python -m benchmarks [--only mlp2d dw4 lj13_3 lj13_5 lj13_h32 lj55_3 ad2] [--repeats 5]
[--quick] [--out benchmarks/results_<device>.json]``.

Each case is built from its shipped gin config (so the numbers describe what the tools
run) and times, after warm-up, with compilation reported separately:

- **FM step**: one optimiser step of ``zoo.train``'s compiled update (flow-matching loss,
  forward + backward + Adam) at the case's training batch — the PyTorch reference's
  configuration where it has one.
- **PG step**: the same update with ``PathGradientForwardKL`` (backsolve adjoint) at RK4
  with 15 steps, the divergence the ``*_pg.gin`` configs fine-tune with (Hutchinson for the
  particle systems and molecules, exact for the 2-D MLP) and the case's path-gradient batch, beside an FM step at that same batch:
  their ratio is the cost of a path gradient at equal batch, printed beside the ratio of their
  counted FLOPs per sample (what the wall ratio would be if both ran at the same FLOP rate).
- **Sampling with log density**: ``sample_and_log_prob_chunked`` for one chunk at RK4 with
  20 steps, with the Hutchinson and the exact divergence; the per-sample time scaled to
  the reference's sample count (1000 LJ13 samples in batches of 100, 50 LJ55 samples).
- **PG memory**: the compiled PG step's temporary buffer size against the number of RK4
  steps (flat for the continuous adjoint).

The reference (bgflow EGNN + torchdiffeq, measured beside zoo on the same machine: quiet with 2
threads, and one thread with the other core busy) is printed beside each number it has.
The machine and its load average are recorded; compare ratios measured in one run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import math
import os
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import flops
from benchmarks._timing import machine, run_interleaved, timed, write_result
from zoo.data import Batch
from zoo.experiments import config
from zoo.flows import FixedStep
from zoo.flows.cnf import sample_and_log_prob_chunked
from zoo.losses import EquivariantOTFlowMatching, FlowMatching, PathGradientForwardKL
from zoo.train import RunSettings, make_prepare, make_step, runs_preparation_ahead


@dataclasses.dataclass(frozen=True)
class Case:
    """One model size: its gin config and batch sizes, and the reference seconds it has."""

    label: str
    gin: str
    bindings: tuple = ()
    fm_batch: int = 256
    pg_batch: int = 64
    pg_divergence: str = "hutchinson"  # as the *_pg.gin fine-tuning configs train
    sample_batch: int = 100  # samples per compiled sampling chunk
    exact_sample_batch: int | None = None  # a smaller chunk for the (costly) exact divergence
    reference_samples: int = 1000  # the sample count the sampling reference is quoted for
    exact_sampling: bool = True
    eqot: bool = False  # also time the equivariant-OT FM step (pairing included) at the FM batch
    memory_steps: tuple = ()
    reference: dict = dataclasses.field(default_factory=dict)  # work -> (quiet 2 threads, issue)


CASES = {
    "mlp2d": Case("2-D GMM, MLP 4×64", "gmm_fm.gin", fm_batch=256, pg_batch=256, pg_divergence="exact", sample_batch=1000, memory_steps=(15, 30, 60)),
    "dw4": Case("DW4, EGNN 3L h32", "dw4_fm.gin", fm_batch=256, pg_batch=256, sample_batch=1000, eqot=True),
    "lj13_3": Case(
        "LJ13, EGNN 3L h64",
        "lj13_fm.gin",
        eqot=True,
        memory_steps=(15, 30, 60),
        reference={"fm": (0.21, 0.38), "sample_hutchinson": (74.0, 100.0), "sample_exact": (1009.0, None)},
    ),
    "lj13_5": Case("LJ13, EGNN 5L h64", "lj13_fm.gin", ("EGNNField.n_layers = 5",), exact_sampling=False, reference={"fm": (0.40, 0.55)}),
    # The published LJ13 architecture (lj13_eqotfm_h32.gin), which the released LJ13 EQ-OT models use.
    "lj13_h32": Case(
        "LJ13, EGNN 3L h32 att+tanh (published)",
        "lj13_fm.gin",
        ("EGNNField.hidden = 32", "EGNNField.attention = True", "EGNNField.tanh = True"),
        eqot=True,
    ),
    "lj55_3": Case(
        "LJ55, EGNN 3L h64",
        "lj55_fm.gin",
        fm_batch=64,
        pg_batch=8,
        sample_batch=50,
        reference_samples=50,
        exact_sampling=False,
        reference={"fm": (1.63, 2.6), "sample_hutchinson": (126.0, None)},
    ),
    "ad2": Case(
        "AD2, TBG EGNN 5L h64 att+tanh",
        "ad2_classical_fm.gin",
        fm_batch=128,
        pg_batch=50,
        sample_batch=100,
        exact_sample_batch=10,
    ),
}

# RK4 steps of the timed PG step (the path-gradient paper's setting) and of sampling.
PG_STEPS, SAMPLE_STEPS = 15, 20

QUICK = {"fm_batch": 16, "pg_batch": 4, "sample_batch": 8, "exact_sample_batch": 4, "memory_steps": (15, 30)}


def build(case: Case):
    """(system, flow, data positions and forces) from the case's gin config."""
    config.parse([case.gin], case.bindings)
    system = config.make_system()
    flow = config.make_flow(system, key=jax.random.PRNGKey(0))
    n = max(case.fm_batch, case.pg_batch)
    try:
        data = config.make_dataset(system).train
        x, forces = np.asarray(data.positions[:n]), data.forces
        forces = None if forces is None else np.asarray(forces[:n])
    except (OSError, ValueError, FileNotFoundError):
        x, forces = None, None  # e.g. LJ55, whose data set lives in the cache, not in assets/
    if x is None or x.shape[0] < n:
        x = np.asarray(flow.base.sample(jax.random.PRNGKey(1), n))
        forces = None
    if forces is None:
        forces = np.asarray(jax.vmap(system.force)(jnp.asarray(x)))
    return system, flow, x.reshape(n, -1), forces.reshape(n, -1)


def _step_inputs(loss, flow, x, forces, batch: int):
    """The training step for ``loss`` (Adam, no accumulation), its optimiser state, one micro-batch and a key."""
    optimizer = optax.adam(1e-4)
    opt_state = optimizer.init(eqx.filter(flow, eqx.is_inexact_array))
    micro = Batch(x=jnp.asarray(x[None, :batch]), forces=jnp.asarray(forces[None, :batch]))
    return make_step(loss, optimizer, 1), opt_state, micro, jax.random.PRNGKey(2)


def _step_call(loss, flow, x, forces, batch: int):
    """A compiled training step on a fixed batch, and its compile seconds."""
    step, opt_state, micro, key = _step_inputs(loss, flow, x, forces, batch)
    t0 = time.perf_counter()
    compiled = step.lower(flow, opt_state, micro, key).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.compiled.memory_analysis() if hasattr(compiled, "compiled") else None
    temp = None if stats is None else int(stats.temp_size_in_bytes)
    return (lambda: timed(compiled, flow, opt_state, micro, key)), compile_s, temp


def _step_prepared_ahead_call(loss, flow, x, forces, batch: int, ahead: concurrent.futures.Executor):
    """The training loop's steady state with ``prepare_ahead``: a step on a batch paired ahead
    while ``ahead`` (one worker thread) pairs the next batch (zoo.train.fit); compile seconds
    of both, and of the first batch's pairing, as fit's first step logs them."""
    step, opt_state, micro, key = _step_inputs(loss, flow, x, forces, batch)
    prepare = make_prepare(loss, 1)
    t0 = time.perf_counter()
    prepare_compiled = prepare.lower(flow.base, micro, key).compile()
    prepared = prepare_compiled(flow.base, micro, key)
    step_compiled = step.lower(flow, opt_state, prepared, key).compile()
    compile_s = time.perf_counter() - t0

    def both():
        following = ahead.submit(lambda: jax.block_until_ready(prepare_compiled(flow.base, micro, key)))
        out = jax.block_until_ready(step_compiled(flow, opt_state, prepared, key))
        following.result()
        return out

    return (lambda: timed(both)), compile_s


def _sample_call(flow, batch: int):
    """One chunk of ``sample_and_log_prob_chunked``; compile seconds from the first call."""
    key = jax.random.PRNGKey(3)

    def call():
        return timed(lambda: sample_and_log_prob_chunked(flow, key, batch, chunk_size=batch)["log_q"])

    first, _ = call()
    return call, first


def run_case(name: str, case: Case, repeats: int) -> dict:
    system, flow, x, forces = build(case)
    pg_flow = flow.with_settings(solver=FixedStep("rk4", n_steps=PG_STEPS), divergence=case.pg_divergence)
    calls, compile_s, repeats_by = {}, {}, {}
    expensive = max(2, repeats // 2)
    # The prepared-ahead row's worker thread, shut down once the rows are timed.
    ahead = concurrent.futures.ThreadPoolExecutor(1)

    calls["fm"], compile_s["fm"], _ = _step_call(FlowMatching(), flow, x, forces, case.fm_batch)
    repeats_by["fm"] = repeats
    if case.pg_batch != case.fm_batch:
        calls["fm_at_pg_batch"], compile_s["fm_at_pg_batch"], _ = _step_call(FlowMatching(), flow, x, forces, case.pg_batch)
        repeats_by["fm_at_pg_batch"] = repeats
    if case.eqot:
        calls["eqot"], compile_s["eqot"], _ = _step_call(EquivariantOTFlowMatching(sigma=0.01), flow, x, forces, case.fm_batch)
        repeats_by["eqot"] = repeats
        eqot = EquivariantOTFlowMatching(sigma=0.01)
        if runs_preparation_ahead(eqot, flow, RunSettings()):  # where zoo.train.fit would (not on one core)
            calls["eqot_ahead"], compile_s["eqot_ahead"] = _step_prepared_ahead_call(eqot, flow, x, forces, case.fm_batch, ahead)
            repeats_by["eqot_ahead"] = repeats
    calls["pg"], compile_s["pg"], pg_temp = _step_call(PathGradientForwardKL(), pg_flow, x, forces, case.pg_batch)
    repeats_by["pg"] = expensive

    sampling = {"sample_hutchinson": ("hutchinson", case.sample_batch)}
    if case.exact_sampling:
        sampling["sample_exact"] = ("exact", case.exact_sample_batch or case.sample_batch)
    for work, (divergence, batch) in sampling.items():
        sampler = flow.with_settings(solver=FixedStep("rk4", n_steps=SAMPLE_STEPS), divergence=divergence)
        calls[work], compile_s[work] = _sample_call(sampler, batch)
        repeats_by[work] = expensive

    try:
        timing = run_interleaved(calls, repeats_by, warmup=1)
    finally:
        ahead.shutdown()
    for work, entry in timing.items():
        # Sampling: the first call compiled and ran once; the compile estimate subtracts a run.
        entry["compile_s"] = compile_s[work] - (entry["wall_ms"] / 1e3 if work.startswith("sample") else 0.0)

    # FLOP rates against the machine's own matmul rate on the field's products, measured now.
    units = flops.unit_flops(flow, pg_divergence=case.pg_divergence)
    batch_of = {"fm": case.fm_batch, "eqot": case.fm_batch, "eqot_ahead": case.fm_batch, "fm_at_pg_batch": case.pg_batch, "pg": case.pg_batch}
    batch_of.update({work: batch for work, (_, batch) in sampling.items()})
    chunk = flow.field.train_chunk_size(case.fm_batch) if hasattr(flow.field, "train_chunk_size") else case.fm_batch
    attainable = flops.matmul_rate(flops.product_shapes(flow.field, [chunk, case.fm_batch]), repeats=max(3, repeats))
    for work, entry in timing.items():
        count = flops.work_flops(units, work, batch_of[work], n_steps=PG_STEPS if work == "pg" else SAMPLE_STEPS)
        entry["gflop"] = count / 1e9
        entry["gflop_per_s"] = count / (entry["wall_ms"] / 1e3) / 1e9
        entry["of_attainable"] = entry["gflop_per_s"] * 1e9 / attainable["best"]
    fm_equal = timing.get("fm_at_pg_batch", timing["fm"])
    result = {
        "label": case.label,
        "gin": case.gin,
        "bindings": list(case.bindings),
        "dim": flow.dim,
        "batches": {"fm": case.fm_batch, "pg": case.pg_batch, "sample_hutchinson": case.sample_batch, "sample_exact": sampling.get("sample_exact", (None, None))[1]},
        "timing": timing,
        "pg_divergence": case.pg_divergence,
        "pg_over_fm": timing["pg"]["wall_ms"] / fm_equal["wall_ms"],
        "pg_over_fm_cpu": timing["pg"]["cpu_ms"] / fm_equal["cpu_ms"],
        # The same ratio in counted work per sample: what the wall ratio would be at equal FLOP rates.
        "pg_over_fm_flops": flops.work_flops(units, "pg", 1, n_steps=PG_STEPS) / flops.work_flops(units, "fm", 1),
        "pg_temp_bytes": pg_temp,
        "flops_per_sample": units,
        "matmul_gflop_per_s": {"best": attainable["best"] / 1e9, **{k: v / 1e9 for k, v in attainable["by_shape"].items()}},
        "reference_samples": case.reference_samples,
        "reference": case.reference,
    }
    for work, (_, batch) in sampling.items():
        result[f"{work}_s_per_reference"] = timing[work]["wall_ms"] / 1e3 / batch * case.reference_samples
    if case.memory_steps:
        result["pg_memory_by_steps"] = {
            str(n): _step_call(PathGradientForwardKL(), pg_flow.with_settings(n_steps=n), x, forces, case.pg_batch)[2]
            for n in case.memory_steps
        }
    return result


def _speedup(ours_s: float, reference) -> str:
    if not reference:
        return ""
    return " / ".join("–" if r is None else f"{r:g} s → {r / ours_s:.1f}×" for r in reference)


def table(results: dict, info: dict) -> str:
    lines = [
        f"Benchmarks on {info['device']} ({info['cpu_model']}, {info['cpu_count']} cores), JAX {info['jax']}; "
        f"1-min load average {info['load_average_1min']:.1f} at the start, {info.get('load_average_end', float('nan')):.1f} at the end. "
        "Medians over interleaved rounds; compilation excluded (own column). Reference: PyTorch bgflow/torchdiffeq "
        "(quiet 2 threads / the issue's 1 thread with the other core busy) → our speed-up.",
        "",
        "GFLOP/s: the work's counted FLOPs (benchmarks/flops.py: XLA's count of the per-sample computation, loops "
        "multiplied out; the EQ-OT pairing is not counted; a PG step counts each RK4 stage of its inverse, augmented "
        "and adjoint solves) over its wall time, and the share of the "
        "best float32 matmul rate measured in the same run on the field's own products (listed below the table).",
        "",
        "| case | work | batch | wall | CPU | GFLOP/s (share) | compile (s) | reference → speed-up |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    measured = [r for r in results.values() if "measured" in r]
    if len({r["measured"]["date"] for r in measured}) > 1:
        cpu = {id(r): r["measured"].get("cpu", info["cpu_model"]) for r in measured}
        mixed = len(set(cpu.values())) > 1
        lines.insert(
            1,
            "Merged table: "
            + "; ".join(
                f"{r['label']} measured {r['measured']['date']} (load {r['measured']['load_average_1min'][0]:.1f}"
                + (f", {cpu[id(r)]})" if mixed else ")")
                for r in measured
            )
            + "."
            + (" **The cases ran on different machines: compare numbers only within one machine.**" if mixed else ""),
        )
    for r in results.values():
        t, ref = r["timing"], r["reference"]
        rows = [("FM step", "fm", r["batches"]["fm"], _speedup(t["fm"]["wall_ms"] / 1e3, ref.get("fm")))]
        if "eqot" in t:
            rows.append((f"EQ-OT FM step, pairing included ({t['eqot']['wall_ms'] / t['fm']['wall_ms']:.2f}× FM wall)", "eqot", r["batches"]["fm"], ""))
        if "eqot_ahead" in t:
            ratio = t["eqot_ahead"]["wall_ms"] / t["fm"]["wall_ms"]
            rows.append((f"EQ-OT FM step, next pairing prepared ahead ({ratio:.2f}× FM wall)", "eqot_ahead", r["batches"]["fm"], ""))
        if "fm_at_pg_batch" in t:
            rows.append(("FM step", "fm_at_pg_batch", r["batches"]["pg"], ""))
        counted = f", {r['pg_over_fm_flops']:.0f}× FM FLOPs" if "pg_over_fm_flops" in r else ""
        rows.append((f"PG step, RK4-{PG_STEPS}, {r['pg_divergence']} ({r['pg_over_fm']:.0f}× FM wall, {r['pg_over_fm_cpu']:.0f}× CPU{counted})", "pg", r["batches"]["pg"], ""))
        for work, label in (("sample_hutchinson", "sample + log q, Hutchinson, RK4-20"), ("sample_exact", "sample + log q, exact, RK4-20")):
            if work in t:
                per_ref = r[f"{work}_s_per_reference"]
                extra = f"{per_ref:.1f} s per {r['reference_samples']}"
                speed = _speedup(per_ref, ref.get(work))
                rows.append((label, work, r["batches"][work], extra + (f"; {speed}" if speed else "")))
        for label, work, batch, note in rows:
            e = t[work]
            rate = e.get("gflop_per_s", math.nan)
            rate = "–" if not math.isfinite(rate) else f"{rate:.1f} ({100 * e['of_attainable']:.0f} %)"
            lines.append(
                f"| {r['label']} | {label} | {batch} | {_ms(e['wall_ms'])} | {_ms(e['cpu_ms'])} | {rate} | {e['compile_s']:.1f} | {note} |"
            )
    rates = {r["label"]: r["matmul_gflop_per_s"] for r in results.values() if r.get("matmul_gflop_per_s")}
    if rates:
        lines += ["", "The machine's float32 matmul rate on each field's products (m×k×n), GFLOP/s; the best is the share's base:", ""]
        for label, row in rates.items():
            cells = ", ".join(f"{shape} {v:.1f}" for shape, v in row.items() if shape != "best")
            lines.append(f"- {label}: best {row['best']:.1f} ({cells})")
    memory = {r["label"]: r["pg_memory_by_steps"] for r in results.values() if r.get("pg_memory_by_steps")}
    if memory:
        lines += ["", "Temporary memory of one compiled PG step (backsolve adjoint) against RK4 steps, MiB:", ""]
        for label, row in memory.items():
            cells = ", ".join(f"{n} steps {'n/a' if v is None else f'{v / 2**20:.1f}'}" for n, v in row.items())
            lines.append(f"- {label}: {cells}")
    return "\n".join(lines) + "\n"


def merged(results: dict, path) -> dict:
    """``results`` over the cases of the JSON at ``path`` that were not run now, in suite order."""
    with open(path) as f:
        saved = json.load(f)
    kept = {k: v for k, v in saved["results"].items() if k not in results}
    machine_then = saved.get("machine", {})
    for r in kept.values():  # cases from before date and machine were recorded per case ran on the file's
        r.setdefault("measured", {"date": "an earlier run", "load_average_1min": [machine_then.get("load_average_1min", float("nan"))] * 2})
        r["measured"].setdefault("cpu", machine_then.get("cpu_model", "unknown"))
    return {k: results.get(k) or kept[k] for k in CASES if k in results or k in kept}


def _ms(ms: float) -> str:
    return f"{ms / 1e3:.2f} s" if ms >= 1000 else f"{ms:.1f} ms"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds for the fast work (half for PG and sampling)")
    parser.add_argument("--quick", action="store_true", help="tiny batches, 1 round: checks that every case runs")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results_<platform>.json; '' for none)")
    parser.add_argument("--merge", action="store_true", help="keep the other cases of an existing JSON, replacing only those run now")
    args = parser.parse_args(argv)
    info = machine()
    results = {}
    for name in args.only:
        case = CASES[name]
        if args.quick:
            case = dataclasses.replace(case, **QUICK)
        print(f"[{name}] {case.label} ...", flush=True)
        load_before = os.getloadavg()[0]
        results[name] = run_case(name, case, 1 if args.quick else args.repeats)
        # Cases of a merged table were measured at different times: each carries its own.
        results[name]["measured"] = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_1min": [load_before, os.getloadavg()[0]], "cpu": info["cpu_model"]}
    info["load_average_end"] = os.getloadavg()[0]
    out = args.out if args.out is not None else ("" if args.quick else f"benchmarks/results_{jax.devices()[0].platform}.json")
    if args.merge and out and os.path.exists(out):
        results = merged(results, out)
    text = table(results, info)
    print("\n" + text)
    if out:
        write_result({"machine": info, "results": results, "table": text}, out, indent=1)
    return results


if __name__ == "__main__":
    main()

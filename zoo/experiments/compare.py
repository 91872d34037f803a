"""Comparing training recipes at one wall-clock budget over several seeds (``tools/compare``).

A recipe is a sequence of stages (loss, learning rate, share of the budget), e.g. the
path-gradient paper's three: FM only, PG only, and the hybrid FM → PG. Every recipe gets
the same training-time budget (compilation and periodic evaluation excluded) and the
same seeds; the output is one table (markdown + JSON, mean ± standard deviation over
seeds) and overlaid curves of the tracked metrics against training time.

Runs start from a fresh initialisation, or all from one pretrained model
(``compare.pretrained``): "flow matching continued for T against path gradients for T
from the same checkpoint", the comparison a user with a released model faces.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
import optax

import gin
from zoo._version import __version__
from zoo.experiments import config
from zoo.experiments.registry import register
from zoo.experiments.runs import configured_evaluation_flow, evaluation
from zoo.flows.cnf import fingerprint
from zoo.flows.divergence import divergence_from_settings
from zoo.losses.fm import FlowMatching
from zoo.metrics import fm_loss_on
from zoo.pretrained import resolve_checkpoint
from zoo.storage import exclusive, read_json, write_atomic, write_json
from zoo.train import RunExistsError, RunSettings, claim_run_dir, fit, read_log


@register("recipe")
@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of a recipe: ``loss`` at ``learning_rate`` (Adam) for ``fraction`` of the budget.

    The run settings in :data:`STAGE_SETTINGS` (None: the comparison's) replace the
    comparison's for this stage: a path-gradient step costs ~100 flow-matching steps, so
    one cadence in steps would track one stage hundreds of times as often as the other,
    and a weight average over the last ~1000 steps suits thousands of flow-matching steps
    but would hold a few hundred path-gradient steps near where they started
    (``ema_decay = 0``: no average).

    ``divergence`` (a name, e.g. ``'hutchinson-12-orthogonal'``; None: the flow's own) is the
    divergence estimator the stage trains with, e.g. to compare path gradients with one
    Hutchinson probe against several at equal compute; the tracked and final metrics keep
    ``evaluation.divergence``.
    """

    loss: object
    learning_rate: float
    fraction: float = 1.0
    batch_size: int | None = None
    accumulation: int | None = None
    clip_norm: float | None = None
    eval_every: int | None = None
    ema_decay: float | None = None
    divergence: str | None = None

    def __post_init__(self):
        # Checked as the run's settings will be, at once and under this stage's names.
        overrides = self.run_overrides()
        RunSettings.of("Stage", overrides)
        if overrides.get("eval_every") == 0:
            raise config.ConfigError("Stage.eval_every must be >= 1 or None (None: the comparison's), got 0")
        if self.divergence is not None:
            try:
                divergence_from_settings(self.divergence)
            except ValueError as err:
                raise config.ConfigError(f"Stage.divergence: {err}") from None

    def run_overrides(self) -> dict:
        """The run settings this stage replaces (those it sets)."""
        return {k: v for k in STAGE_SETTINGS if (v := getattr(self, k)) is not None}


#: The :class:`~zoo.train.RunSettings` a :class:`Stage` may set for itself.
STAGE_SETTINGS = ("batch_size", "accumulation", "clip_norm", "eval_every", "ema_decay")


@register("recipe")
@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named sequence of stages; the fractions must sum to 1."""

    name: str
    stages: tuple

    def __post_init__(self):
        total = sum(s.fraction for s in self.stages)
        if not self.stages or not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"recipe {self.name!r}: stage fractions must sum to 1, got {total}")


def _tracked(flow, system, dataset, n: int, key) -> dict:
    """Cheap metrics tracked during training: KL (or NLL), ESS-p on n target samples, and the FM loss.

    The FM loss here is plain flow matching (σ = 0, independent pairs) on the validation split
    for every recipe, whatever it trains with: one yardstick across recipes.
    """
    from zoo.flows.cnf import log_prob_chunked
    from zoo.metrics import energies_chunked, ess_p, kl_exact, nll

    x = dataset.val.positions[:n]
    log_q = log_prob_chunked(flow, x, key=key, chunk_size=n)["log_q"]
    u = energies_chunked(system, x, chunk_size=n)
    out = {"nll": nll(log_q), "ess_p": ess_p(-u - log_q)}
    if system.log_z is not None:
        out["kl"] = kl_exact(-u - system.log_z, log_q)
    out["fm_loss"] = fm_loss_on(flow, dataset.val.positions, FlowMatching(), jax.random.PRNGKey(0))
    return out


#: ``compare``'s own defaults for the run settings it is not given (:class:`~zoo.train.RunSettings`).
COMPARE_DEFAULTS = {"time_budget_s": 30.0, "eval_every": 25, "progress": False}
# ``progress`` is the training loops' bar only (the tracked metrics already report every run); the
# evaluations that start and end the runs always report progress (an exact or 1000-sample
# evaluation takes tens of minutes), unless the tool's --no_progress silences everything.


@gin.configurable
def compare(
    workdir: Path,
    *,
    recipes=gin.REQUIRED,
    seeds=(0, 1, 2),
    n_track: int = 512,
    pretrained=None,
    resume: bool = False,
    overwrite: bool = False,
    **settings,
) -> dict:
    """Train every recipe for every seed under the same budget; write table and curves.

    Every run starts from a fresh initialisation (seeded by the run's seed), or from
    ``pretrained`` (a checkpoint folder or a model-index name; ``tools/compare`` lays its
    stored config underneath the comparison's files, so the field is the checkpoint's own).
    A pretrained start is evaluated too, once per seed with that seed's evaluation seed,
    and heads the table as ``start: <pretrained>``: each run's change is paired with it.

    Every run ends with the :func:`zoo.experiments.runs.evaluation` that training runs end with,
    under the same bindings (``evaluation.n_samples``, ``evaluation.divergence``, ...; e.g.
    train an LJ13 flow configured with the exact trace and evaluate with Hutchinson to keep
    evaluation affordable on a CPU), seed 1234 + the run's seed; its metrics and the
    system's views are written with the prefix ``<recipe>_seed<seed>_``. The metrics tracked
    during training (``n_track`` validation samples) use the same divergence and solver. A
    ``workdir`` that holds an
    earlier comparison's runs is refused unless ``resume`` (every run continues from its
    last checkpoint with the training seconds it had, so each still gets the same budget)
    or ``overwrite`` (which deletes them).

    ``settings`` are every run's :class:`~zoo.train.RunSettings` (``compare.time_budget_s``,
    ``compare.batch_size``, ``compare.ema_decay``, …; unnamed ones take
    :data:`COMPARE_DEFAULTS`). Every run trains for the same seconds, so a step count is
    refused; the tracked metrics are logged and a checkpoint written every ``eval_every``
    steps (a killed comparison loses at most one interval per run), and a recipe stage's
    own settings (:data:`STAGE_SETTINGS`) replace the comparison's. A resumed comparison
    must start from what it started from (``start.json`` in ``workdir``). Several processes may
    run one comparison side by side, each with its own ``recipes`` or ``seeds`` and ``resume``
    into the same ``workdir`` (one core each): every finished row is kept in ``workdir/rows``
    and the table, ``results.json`` and the curves hold the rows of all of them.

    Returns each row's metrics per seed: ``start: <pretrained>`` first when there is one,
    then the recipes by name.
    """
    if "seed" in settings:
        raise config.ConfigError("compare runs every seed of compare.seeds: bind compare.seeds instead of compare.seed")
    if not seeds:
        raise config.ConfigError("compare.seeds is empty: give the seeds every recipe runs with, e.g. compare.seeds = (0, 1, 2)")
    run = RunSettings.of("compare", settings, COMPARE_DEFAULTS)
    if run.n_steps is not None or run.n_epochs is not None:
        raise config.ConfigError("compare trains every run for compare.time_budget_s seconds: unbind compare.n_steps and compare.n_epochs")
    if run.time_budget_s is None or run.eval_every < 1:
        raise config.ConfigError(f"compare needs a time budget and eval_every >= 1, got compare.time_budget_s = {run.time_budget_s!r}, compare.eval_every = {run.eval_every!r}")
    time_budget_s = run.time_budget_s
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    earlier = sorted(p.parent for p in (workdir / "runs").glob("*/checkpoint"))
    earlier_rows = sorted((workdir / ROWS).glob("*.json"))
    if (earlier or earlier_rows) and not (overwrite or resume):
        raise RunExistsError(
            f"{workdir} already holds a comparison ({len(earlier)} runs in {workdir / 'runs'}, {len(earlier_rows)} rows in {workdir / ROWS}): "
            "pass --resume to continue it or --overwrite to replace it"
        )
    for run in earlier if not resume else ():
        claim_run_dir(run / "checkpoint", resume=False, overwrite=True)
    for row in earlier_rows if not resume else ():
        row.unlink()
    system = config.make_system()
    dataset = config.make_dataset(system)
    start = None
    if pretrained is not None:
        path = resolve_checkpoint(pretrained)
        restored = config.restore_flow(path, system)
        start = restored.model
        print(f"every run starts from {path} (step {restored.step})")
    _claim_start(workdir, {"pretrained": None if start is None else str(pretrained), "flow": None if start is None else fingerprint(start)}, resume=resume)
    config.write_operative_config(workdir, everything=True)
    results: dict[str, list[dict]] = {}
    if start is not None:
        start_name = f"start: {pretrained}"
        results[start_name] = []
        for seed in seeds:
            metrics = evaluation(
                start, system, dataset, workdir, seed=1234 + seed, fm_loss=FlowMatching(), prefix=f"start_seed{seed}_", progress=True
            )
            results[start_name].append({**metrics, "seed": seed, "train_time_s": 0.0, "steps": 0})
            _save_row(workdir, start_name, results[start_name][-1], None, time_budget_s=time_budget_s)
    results.update({r.name: [] for r in recipes})
    about = dict(time_budget_s=time_budget_s, seeds=seeds, pretrained=pretrained)
    table = _write_summary(workdir, list(results), **about)
    # One optimiser object per stage, reused across seeds, so jit caches are reused too.
    optimizers = {(r.name, i): optax.adam(s.learning_rate) for r in recipes for i, s in enumerate(r.stages)}
    first_points: dict[int, dict] = {}  # the step-0 tracked metrics per seed (a pretrained start's serve every recipe)

    for recipe in recipes:
        for seed in seeds:
            flow = start if start is not None else config.make_flow(system, key=jax.random.fold_in(jax.random.PRNGKey(seed), 10**6))
            offset_s, offset_step, curve = 0.0, 0, []
            track_key = jax.random.PRNGKey(10_000 + seed)

            def evaluate(model, step):
                return _tracked(configured_evaluation_flow(model), system, dataset, n_track, track_key)  # noqa: B023  (fit calls it within this iteration)

            if start is None or seed not in first_points:
                first_points[seed] = {"time_s": 0.0, "step": 0, **evaluate(flow, 0)}
            curve.append(first_points[seed])
            for i, stage in enumerate(recipe.stages):
                run_dir = workdir / "runs" / f"{_slug(recipe.name)}_seed{seed}_stage{i}"
                stage_settings = run.replace(time_budget_s=stage.fraction * time_budget_s, seed=seed, **stage.run_overrides())
                every = stage_settings.eval_every
                stage_settings = stage_settings.replace(log_every=every, checkpoint_every=every)
                own_divergence = flow.divergence
                if stage.divergence is not None:
                    flow = flow.with_settings(divergence=stage.divergence)  # for this stage only: restored below
                flow, _ = fit(
                    flow,
                    dataset,
                    stage.loss,
                    optimizers[(recipe.name, i)],
                    stage_settings,
                    workdir=run_dir,
                    evaluate=evaluate,
                    resume=resume,
                    # The full config in every checkpoint: a run can be evaluated or released later.
                    config=gin.config_str(),
                    metadata={"system": type(system).__name__, "zoo_version": __version__, "recipe": recipe.name},
                )
                if stage.divergence is not None:
                    flow = flow.with_settings(divergence=own_divergence)
                records = read_log(run_dir)  # with the records of the processes this run resumes
                for r in records:
                    if "eval" in r:
                        curve.append({"time_s": offset_s + r["time_s"], "step": offset_step + r["step"], "stage": i, **r["eval"]})
                last = [r for r in records if "loss" in r][-1]
                offset_s += last["time_s"]
                offset_step += last["step"]
                curve.append({"time_s": offset_s, "step": offset_step, "stage": i, **evaluate(flow, offset_step)})
            # Plain flow matching as the FM yardstick, as in the tracked metrics.
            metrics = evaluation(
                flow, system, dataset, workdir, seed=1234 + seed, fm_loss=FlowMatching(), prefix=f"{_slug(recipe.name)}_seed{seed}_", progress=True
            )
            metrics.update({"seed": seed, "train_time_s": offset_s, "steps": offset_step})
            results[recipe.name].append(metrics)
            _save_row(workdir, recipe.name, metrics, curve, time_budget_s=time_budget_s)
            print(f"{recipe.name} seed {seed}: " + ", ".join(f"{k}={metrics[k]:.4g}" for k in ("kl", "nll", "ess_q", "ess_p") if k in metrics) + f" ({offset_step} steps)")
            # The table so far after every run: a comparison stopped hours in still shows what it measured.
            table = _write_summary(workdir, list(results), **about)
    # Under the lock: another process finishing now would draw the same PNG files (savefig is not atomic).
    with exclusive(workdir / SUMMARY_LOCK):
        summary = _summary(workdir, list(results), **about)
        _curve_plots(summary, workdir, system_name=type(system).__name__)
    print(table)
    return results


#: The folder of the workdir that keeps each finished row of the table (a run's, or the start's for
#: one seed) as ``<name>_seed<seed>.json``: the table is made from the files, not from what one
#: process ran, so processes running arms side by side end in one table.
ROWS = "rows"
SUMMARY_LOCK = ".summary.lock"


def _save_row(workdir: Path, name: str, metrics: dict, curve: list[dict] | None, *, time_budget_s: float) -> None:
    row = {"name": name, "seed": metrics["seed"], "budget_s": time_budget_s, "metrics": metrics, "curve": curve}
    (workdir / ROWS).mkdir(exist_ok=True)
    write_atomic(workdir / ROWS / f"{_slug(name)}_seed{metrics['seed']}.json", lambda f: f.write(json.dumps(row).encode()))


def _summary(workdir: Path, names: list[str], *, time_budget_s: float, seeds, pretrained) -> dict:
    """Every row in ``workdir`` with this budget, ``names`` first (in that order, empty while none of
    their runs has finished), then the rows other processes wrote; each row's runs by seed."""
    rows = [json.loads(f.read_text()) for f in sorted((workdir / ROWS).glob("*.json"))]
    other_budgets = sorted({r["budget_s"] for r in rows} - {time_budget_s})
    if other_budgets:
        print(f"note: {workdir / ROWS} holds rows of budgets {other_budgets} s; the table has only those of {time_budget_s:g} s")
    rows = sorted((r for r in rows if r["budget_s"] == time_budget_s), key=lambda r: r["seed"])
    order = [*names, *sorted({r["name"] for r in rows} - set(names))]
    results = {name: [r["metrics"] for r in rows if r["name"] == name] for name in order}
    # A start row has no curve; a recipe's curves are in the order of its runs in results.
    curves = {name: [r["curve"] for r in rows if r["name"] == name] for name in order}
    all_seeds = sorted({*seeds, *(r["seed"] for r in rows)})
    return {
        "budget_s": time_budget_s,
        "seeds": all_seeds,
        "pretrained": None if pretrained is None else str(pretrained),
        "complete": all(sorted(m["seed"] for m in ms) == all_seeds for ms in results.values()),
        "results": results,
        "curves": {name: runs for name, runs in curves.items() if None not in runs},
    }


def _write_summary(workdir: Path, names: list[str], **about) -> str:
    """``table.md`` and ``results.json`` of the rows done so far (``complete``: every row has every seed)."""
    with exclusive(workdir / SUMMARY_LOCK):  # another process's rows may land meanwhile: read and write as one
        summary = _summary(workdir, names, **about)
        table = summarise(summary["results"], time_budget_s=summary["budget_s"], seeds=summary["seeds"], pretrained=summary["pretrained"])
        write_atomic(workdir / "table.md", lambda f: f.write(table.encode()))
        write_atomic(workdir / "results.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
    return table


#: What a comparison's runs start from (``pretrained`` and the start's flow fingerprint, or
#: None for fresh initialisations), so that a resumed comparison cannot mix two starts.
START_FILE = "start.json"


def _claim_start(workdir: Path, start: dict, *, resume: bool) -> None:
    file = workdir / START_FILE
    if resume and file.is_file():
        earlier = read_json(file)
        if earlier != start:
            def said(s):
                return "a fresh initialisation" if s.get("pretrained") is None else f"{s['pretrained']} (flow {str(s.get('flow'))[:12]})"

            raise config.ConfigError(
                f"{workdir} holds a comparison whose runs start from {said(earlier)}, not from {said(start)}: "
                "resume it with the same start (compare.pretrained / --pretrained), or pass --overwrite"
            )
    write_json(file, start)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def summarise(results: dict[str, list[dict]], *, time_budget_s: float, seeds, pretrained=None) -> str:
    keys = [k for k in ("kl", "nll", "ess_q", "ess_p", "path_length", "fm_loss", "steps") if any(k in m for ms in results.values() for m in ms)]
    start = "from a fresh initialisation" if pretrained is None else f"from {pretrained} (row `start`: it, evaluated with each seed's evaluation seed)"
    lines = [
        f"Budget {time_budget_s:g} s of training per run (compilation and evaluation excluded), seeds {list(seeds)}; mean ± std over "
        "seeds (a recipe with one seed: its value ± the delta-method standard error over the samples, where there is one).",
        f"Every run starts {start}.",
        "",
        "| recipe | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, ms in results.items():
        if not ms:
            continue
        cells = []
        for k in keys:
            v = np.array([m[k] for m in ms], dtype=float)
            if len(v) > 1:
                cells.append(f"{v.mean():.4g} ± {v.std(ddof=1):.2g}")
            else:  # a spread over one seed would read as an exact figure
                se = ms[0].get(f"{k}_se")
                cells.append(f"{v[0]:.4g}" + (f" ± {se:.2g}" if se is not None else ""))
        done = "" if len(ms) == len(seeds) else f" ({len(ms)} of {len(seeds)} seeds so far)"
        lines.append(f"| {name}{done} | " + " | ".join(cells) + " |")
    first = next((ms[0] for ms in results.values() if ms), None)
    if first is not None:
        divergence = f" (log densities with the {first['divergence']} divergence)" if "divergence" in first else ""
        lines += ["", f"ESS-q from {first['n_samples_q']} model samples, ESS-p/NLL/KL from {first['n_samples_p']} test samples per run{divergence}."]
    return "\n".join(lines) + "\n"


def _curve_plots(summary: dict, workdir: Path, *, system_name: str) -> None:
    from zoo.plotting import plots

    curves = {name: {m["seed"]: run for m, run in zip(summary["results"][name], runs)} for name, runs in summary["curves"].items()}
    budget_s, seeds = summary["budget_s"], summary["seeds"]
    recipes = ", ".join(curves)
    for key, fname, ylabel, log in (
        ("kl", "kl_vs_time.png", "KL(p‖q) (nats)", True),
        ("nll", "nll_vs_time.png", "NLL of held-out samples (nats)", False),
        ("fm_loss", "fm_loss_vs_time.png", "FM loss (held out)", False),
        ("ess_p", "ess_p_vs_time.png", "ESS-p (fraction)", False),
    ):
        if not any(key in pt for runs in curves.values() for run in runs.values() for pt in run):
            continue
        seed_list = ("seeds " if len(seeds) > 1 else "seed ") + ", ".join(map(str, seeds))
        title = f"{system_name}: {recipes}\n{budget_s:g} s per run, {seed_list}"
        plots.metric_vs_time(curves, key, workdir / fname, ylabel=ylabel, title=title, log=log)
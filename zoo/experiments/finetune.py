"""Fine-tuning a pretrained flow (path gradients, or any registered loss) and probing its learning rate.

``finetune`` loads a checkpoint (a path, or a model name resolved by ``zoo.pretrained``),
evaluates it, trains it further for a budget in steps or wall-clock seconds,
evaluates again, and writes ``metrics_before.json``, ``metrics.json``, ``report.md``,
plots and the checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

import gin
from zoo.experiments import config
from zoo.experiments.runs import configured_evaluation_flow, evaluation, fit_tracking_fm
from zoo.flows.cnf import describe_in_words
from zoo.plotting import plots
from zoo.pretrained import evaluation_table, released_info, resolve_checkpoint
from zoo.storage import read_json
from zoo.train import NonFiniteStepError, RunSettings, claim_run_dir

REPORT_KEYS = ("kl", "nll", "ess_q", "ess_p", "path_length", "fm_loss")
HIGHER_IS_BETTER = {"ess_q", "ess_p"}


def run_finetuning(workdir, gin_files=(), bindings=(), **kwargs):
    """Fine-tune from Python as ``tools/finetune`` does, given the same gin files and bindings.

    The files and bindings name the pretrained model (``finetune.pretrained``: a checkpoint
    folder or a model-index name); its stored config is laid underneath them
    (:func:`~zoo.experiments.config.parse_over_pretrained`). Then :func:`finetune` runs
    with ``kwargs`` (``resume``, ``overwrite``, ``probe_lr``, …). Returns what
    :func:`finetune` returns.
    """
    if config.parse_over_pretrained(gin_files, bindings, selector="finetune.pretrained") is None:
        raise config.ConfigError("no pretrained model: bind finetune.pretrained (or pass --pretrained)")
    return finetune(workdir, **kwargs)


#: ``finetune``'s own defaults for the settings it is not given (:class:`~zoo.train.RunSettings`):
#: fine-tuning steps are few and slow, so every one is logged.
FINETUNE_DEFAULTS = {"log_every": 1, "checkpoint_every": 50}


@gin.configurable
def finetune(
    workdir: Path,
    *,
    pretrained=gin.REQUIRED,
    loss=gin.REQUIRED,
    optimizer=gin.REQUIRED,
    resume: bool = False,
    overwrite: bool = False,
    probe_lr=None,
    probe_samples: int = 100,
    **settings,
):
    """Fine-tune the flow of ``pretrained`` with ``loss``; evaluate before and after.

    With ``probe_lr`` (a list of learning rates) nothing is trained: the run's first step is
    probed at each of them (:func:`probe_learning_rates`, on ``probe_samples`` held-out
    samples) and ``lr_probe.json`` and ``lr_probe.png`` are written instead.

    The gin config in effect must be the checkpoint's stored one overlaid with the user's
    files and bindings (:func:`run_finetuning` parses it so), so e.g. ``CNF.divergence =
    'hutchinson'`` switches the divergence estimator for the fine-tuning run. ``settings`` are
    the run's :class:`~zoo.train.RunSettings` (``finetune.n_steps``, ``finetune.time_budget_s``,
    …; unnamed ones take :data:`FINETUNE_DEFAULTS`, then the class's).

    A model named from the model index is evaluated before and after with the solver and
    divergence its released metrics were computed with (its ``evaluation`` table, e.g.
    Dopri5 for DW4 where training used RK4), so the report's "before" column is the
    index's model and the two columns compare like with like; ``evaluation.divergence``,
    ``evaluation.solver`` and ``evaluation.n_solver_steps`` bindings still override them.
    """
    run = RunSettings.of("finetune", settings, FINETUNE_DEFAULTS)
    if run.n_steps is None and run.n_epochs is None and run.time_budget_s is None and not probe_lr:
        raise config.ConfigError("give finetune.n_steps, finetune.n_epochs or finetune.time_budget_s (--steps or --time_budget)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = resolve_checkpoint(pretrained)
    released = released_info(pretrained)
    as_released = {} if released is None else evaluation_table(released)

    def measured(model):
        return model.as_described(as_released)

    system = config.make_system()
    dataset = config.make_dataset(system)
    # Before the first evaluation's minutes, so that a conflicting budget fails at once.
    run.steps_for(len(dataset.train))
    restored = config.restore_flow(path, system)
    flow = restored.model
    print(f"loaded {path} (step {restored.step}) for {type(system).__name__}")
    if probe_lr:
        result = probe_learning_rates(
            flow, loss, optimizer, dataset, probe_lr,
            configured_learning_rate=_configured_learning_rate(), batch_size=run.batch_size,
            accumulation=run.accumulation, clip_norm=run.clip_norm, n_eval=probe_samples, seed=run.seed,
        )  # fmt: skip
        result["pretrained"] = str(path)
        (workdir / "lr_probe.json").write_text(json.dumps(result, indent=2))
        plots.learning_rate_probe(result, workdir / "lr_probe.png", title=f"first {type(loss).__name__} step from {pretrained}")
        return flow, result, None

    claim_run_dir(workdir / "checkpoint", resume=resume, overwrite=overwrite)  # before the first evaluation's minutes
    before = _reusable_before(workdir, path, configured_evaluation_flow(measured(flow))) if resume else None
    if before is None:
        before = evaluation(
            measured(flow), system, dataset, workdir, prefix="before_", metrics_file="metrics_before.json", provenance={"pretrained": str(path)}
        )
    else:
        print(f"resuming: the pretrained model's metrics are those of {workdir / 'metrics_before.json'}")

    flow, all_records = fit_tracking_fm(
        flow, system, dataset, loss, optimizer, run, workdir, metadata={"pretrained": str(path)}, resume=resume
    )
    after = evaluation(measured(flow), system, dataset, workdir, records=all_records)
    _fm_curve(all_records, workdir / "fm_loss_during_finetuning.png")
    config.write_operative_config(workdir)
    report = write_report(workdir, before, after, title=f"Fine-tuning {pretrained} with {type(loss).__name__}", records=all_records)
    print(report)
    return flow, before, after


def _configured_learning_rate() -> float:
    """The constant learning rate bound to the fine-tuning optimiser (e.g. ``adam.learning_rate``)."""
    reference = gin.query_parameter("finetune.optimizer")
    binding = f"{reference.scoped_selector}.learning_rate"
    try:
        value = gin.query_parameter(binding)
    except ValueError:
        value = None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise config.ConfigError(f"the learning-rate probe needs a constant learning rate bound as {binding}, got {value!r}")
    return float(value)


def _reusable_before(workdir: Path, pretrained: Path, evaluated_flow) -> dict | None:
    """The interrupted run's metrics of the same pretrained checkpoint, if it got that far
    with the solver and divergence ``evaluated_flow`` has (else None: evaluate again).

    The before-evaluation is the same computation every time (same checkpoint, seed and
    settings), and with the exact divergence it can take longer than the fine-tuning itself.
    """
    file = workdir / "metrics_before.json"
    if not file.is_file():
        return None
    before = read_json(file)
    same = before.get("pretrained") == str(pretrained) and all(before.get(k) == v for k, v in evaluated_flow.describe().items())
    return before if same else None


def _fm_curve(records, path):
    if records:
        plots.loss_curves(records, path, title="fine-tuning: training loss and held-out FM loss")


def write_report(workdir: Path, before: dict, after: dict, *, title: str, records=()) -> str:
    """A markdown table of metrics before and after, written to ``report.md``."""
    lines = [f"# {title}", "", "| metric | before | after | change |", "|---|---|---|---|"]
    for key in REPORT_KEYS:
        if key in before and key in after:
            b, a = before[key], after[key]
            better = (a > b) if key in HIGHER_IS_BETTER else (a < b)
            mark = "" if key in ("path_length", "fm_loss") or math.isclose(a, b) else (" (better)" if better else " (worse)")
            lines.append(f"| {key} | {b:.4g} | {a:.4g} | {a - b:+.3g}{mark} |")
    lines.append(f"| samples (q / p) | {before['n_samples_q']} / {before['n_samples_p']} | {after['n_samples_q']} / {after['n_samples_p']} | |")
    if "divergence" in after:
        # The ESS depends on how log q was computed (Hutchinson noise in log w lowers it).
        lines += ["", f"Log densities: {describe_in_words(after)}."]
    steps = [r for r in records if "loss" in r]
    if steps:
        lines += ["", f"{steps[-1]['step']} optimiser steps in {steps[-1]['time_s']:.1f} s of training."]
    lines += ["", "Plots: `before_*.png` (the pretrained model), `*.png` (after), `loss_curve.png`, `fm_loss_during_finetuning.png`."]
    text = "\n".join(lines) + "\n"
    (Path(workdir) / "report.md").write_text(text)
    return text


def probe_learning_rates(
    flow,
    loss,
    optimizer,
    dataset,
    learning_rates,
    *,
    configured_learning_rate: float,
    batch_size: int,
    accumulation: int = 1,
    clip_norm: float | None = None,
    n_eval: int = 100,
    seed: int = 0,
) -> dict:
    r"""Held-out NLL after the fine-tuning run's first optimiser step, for several learning rates.

    Takes the first step of :func:`zoo.train.fit` with these settings (same batches, keys,
    clipping and accumulation), whose update $u$ was made at ``configured_learning_rate``
    $η_0$, and evaluates $-\log q$ on the first ``n_eval`` test samples at $θ + (η/η_0)\,u$
    for every η. The update of a fresh optimiser is linear in its learning rate (Adam's
    first step is $-η\,g/(|g| + ε)$), so this is the first step at η. All evaluations share
    one PRNG key: with the Hutchinson divergence the paired differences are far less
    noisy than each NLL. A first step that raises the NLL means η is too large for this
    model; the fine-tuning paper's 1e-4 assumes a well-converged one.

    Returns ``{"learning_rates": [...], "d_nll_mean", "d_nll_sem", "d_nll_median": [...],
    "nll_before", "grad_norm", ...}``.
    """
    from zoo.flows.cnf import log_prob_chunked
    from zoo.optim import with_clipping
    from zoo.train import BatchSampler, make_step, step_key

    if not learning_rates or any(not (lr > 0 and math.isfinite(lr)) for lr in learning_rates):
        raise ValueError(f"learning rates to probe must be positive numbers, got {list(learning_rates)}")
    if not configured_learning_rate > 0:
        raise ValueError(f"the configured learning rate must be a positive number, got {configured_learning_rate!r}")
    test = dataset.test if len(dataset.test) else dataset.val
    n_eval = min(n_eval, len(test))
    if n_eval < 2:
        raise ValueError("the learning-rate probe needs at least 2 held-out samples")
    transform = with_clipping(optimizer, clip_norm)
    params = eqx.filter(flow, eqx.is_inexact_array)
    step_fn = make_step(loss, transform, accumulation)
    # The fine-tuning run's step 0: same sampler, same key (zoo.train.fit).
    batch = BatchSampler(len(dataset.train), batch_size * accumulation, seed).micro_batches(dataset.train, 0, accumulation)
    stepped, _, stats = step_fn(flow, transform.init(params), batch, step_key(jax.random.PRNGKey(seed), 0))
    if not bool(stats["finite"]):
        raise NonFiniteStepError("the first fine-tuning step has a non-finite loss or gradient; nothing to probe")
    update = jax.tree.map(lambda new, old: new - old, eqx.filter(stepped, eqx.is_inexact_array), params)
    x = test.positions[:n_eval]
    key = jax.random.PRNGKey(seed + 1) if flow.needs_key else None

    def nll(model):
        return -log_prob_chunked(model, x, key=key, chunk_size=min(n_eval, 50))["log_q"]

    before = nll(flow)
    result = {
        "learning_rates": [float(lr) for lr in learning_rates],
        "configured_learning_rate": float(configured_learning_rate),
        "nll_before": float(np.mean(before)),
        "grad_norm": float(stats["grad_norm"]),
        "n_eval": int(n_eval),
        "n_gradient_samples": int(batch_size * accumulation),
        "d_nll_mean": [],
        "d_nll_sem": [],
        "d_nll_median": [],
    }
    for lr in learning_rates:
        scale = lr / configured_learning_rate
        moved = eqx.apply_updates(flow, jax.tree.map(lambda u: scale * u, update))  # noqa: B023  (applied at once)
        diff = nll(moved) - before
        result["d_nll_mean"].append(float(np.mean(diff)))
        result["d_nll_sem"].append(float(np.std(diff, ddof=1) / math.sqrt(diff.size)))
        result["d_nll_median"].append(float(np.median(diff)))
        print(f"learning rate {lr:.3g}: held-out NLL change {result['d_nll_mean'][-1]:+.4g} ± {result['d_nll_sem'][-1]:.2g}")
    return result

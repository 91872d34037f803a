"""Fine-tuning a pretrained flow (path gradients, or any registered loss) and comparing recipes.

``finetune`` loads a checkpoint (a path, or a registry name resolved by ``zoo.pretrained``),
evaluates it, trains it further for a budget in steps or wall-clock seconds,
evaluates again, and writes ``metrics_before.json``, ``metrics.json``, ``report.md``,
plots and the checkpoint.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import gin
import jax

from zoo import checkpoint as ckpt
from zoo import config, plots
from zoo.experiment import evaluation, fit_tracking_fm
from zoo.pretrained import resolve_checkpoint

REPORT_KEYS = ("kl", "nll", "ess_q", "ess_p", "path_length", "fm_loss")
HIGHER_IS_BETTER = {"ess_q", "ess_p"}


def stored_config(pretrained) -> tuple[Path, str]:
    path = resolve_checkpoint(pretrained)
    return path, ckpt.read_checkpoint_info(path).config


@gin.configurable
def finetune(
    workdir: Path,
    *,
    pretrained=gin.REQUIRED,
    loss=gin.REQUIRED,
    optimizer=gin.REQUIRED,
    n_steps: int | None = None,
    time_budget_s: float | None = None,
    batch_size: int = 256,
    accumulation: int = 1,
    clip_norm: float | None = None,
    seed: int = 0,
    log_every: int = 1,
    eval_every: int = 0,
    checkpoint_every: int = 50,
    resume: bool = False,
    progress: bool = True,
    n_devices: int | None = None,
):
    """Fine-tune the flow of ``pretrained`` with ``loss``; evaluate before and after.

    The gin config in effect is the checkpoint's stored one overlaid with the user's files
    and bindings (see :func:`zoo.cli.finetune.main`), so e.g. ``CNF.divergence =
    'hutchinson'`` switches the divergence estimator for the fine-tuning run.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = resolve_checkpoint(pretrained)
    system = config.make_system()
    dataset = config.make_dataset(system)
    flow_like = config.make_flow(system, key=jax.random.PRNGKey(0))
    restored = ckpt.load_checkpoint(path, model_like=flow_like)
    flow = restored.model
    print(f"loaded {path} (step {restored.step}) for {type(system).__name__}")

    before = _reusable_before(workdir, path) if resume else None
    if before is None:
        before = evaluation(
            flow, system, dataset, workdir, prefix="before_", metrics_file="metrics_before.json", provenance={"pretrained": str(path)}
        )
    else:
        print(f"resuming: the pretrained model's metrics are those of {workdir / 'metrics_before.json'}")

    flow, all_records = fit_tracking_fm(
        flow,
        system,
        dataset,
        loss,
        optimizer,
        workdir,
        metadata={"pretrained": str(path)},
        n_steps=n_steps,
        time_budget_s=time_budget_s,
        batch_size=batch_size,
        accumulation=accumulation,
        clip_norm=clip_norm,
        seed=seed,
        log_every=log_every,
        eval_every=eval_every,
        checkpoint_every=checkpoint_every,
        resume=resume,
        progress=progress,
        n_devices=n_devices,
    )
    after = evaluation(flow, system, dataset, workdir, records=all_records)
    _fm_curve(all_records, workdir / "fm_loss_during_finetuning.png")
    (workdir / "operative_config.gin").write_text(gin.operative_config_str())
    report = write_report(workdir, before, after, title=f"Fine-tuning {pretrained} with {type(loss).__name__}", records=all_records)
    print(report)
    return flow, before, after


def _reusable_before(workdir: Path, pretrained: Path) -> dict | None:
    """The interrupted run's metrics of the same pretrained checkpoint, if it got that far.

    The before-evaluation is the same computation every time (same checkpoint, seed and
    settings), and with the exact divergence it can take longer than the fine-tuning itself.
    """
    file = workdir / "metrics_before.json"
    if not file.is_file():
        return None
    before = json.loads(file.read_text())
    return before if before.get("pretrained") == str(pretrained) else None


def _fm_curve(records, path):
    evals = [r for r in records if "eval" in r]
    if evals:
        plots.loss_curves([{"step": r["step"], "val_fm_loss": r["eval"]["val_fm_loss"]} for r in evals], path, keys=("val_fm_loss",), title="FM loss on held-out data")


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
        lines += ["", f"Log densities: {after['divergence']} divergence, {after['solver']} with {after['n_solver_steps']} steps."]
    steps = [r for r in records if "loss" in r]
    if steps:
        lines += ["", f"{steps[-1]['step']} optimiser steps in {steps[-1]['time_s']:.1f} s of training."]
    lines += ["", "Plots: `before_*.png` (the pretrained model), `*.png` (after), `loss_curve.png`, `fm_loss_during_finetuning.png`."]
    text = "\n".join(lines) + "\n"
    (Path(workdir) / "report.md").write_text(text)
    return text

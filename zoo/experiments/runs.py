"""Experiments as library functions: train, evaluate, sample. The tools are thin shells over these.

Each root is gin-configurable (``train.n_steps = 2000``); models, systems and data come
from :mod:`zoo.experiments.config` (``make_system``, ``make_dataset``, ``make_flow``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import gin
from zoo import checkpoint as ckpt
from zoo._version import __version__
from zoo.experiments import config
from zoo.flows.cnf import describe_in_words
from zoo.losses.fm import FlowMatching
from zoo.metrics import energies_chunked, ess_p, ess_p_se, ess_q, ess_q_se, evaluate_flow, fm_loss_on, format_metrics, nll, nll_se, observables
from zoo.plotting import plots
from zoo.plotting.views import write_views
from zoo.storage import write_json
from zoo.train import RunSettings, fit, read_log


@gin.configurable
def evaluation(
    flow,
    system,
    dataset,
    workdir: Path,
    *,
    seed: int = 1234,
    n_samples: int = 2048,
    n_target: int | None = 2048,
    split: str = "test",
    chunk_size: int = 1024,
    fm_loss=None,
    prefix: str = "",
    progress: bool = True,
    records: list[dict] | None = None,
    divergence: str | None = None,
    solver: str | None = None,
    n_solver_steps: int | None = None,
    solver_rtol: float | None = None,
    solver_atol: float | None = None,
    metrics_file: str | None = None,
    provenance: dict | None = None,
    check_top: int = 8,
) -> dict:
    """Compute the metrics of ``flow`` and write ``{prefix}metrics.json`` and the plots in ``workdir``.

    ``divergence``, ``solver``, ``n_solver_steps``, ``solver_rtol`` and ``solver_atol`` (the
    keys the metrics record them in, :meth:`~zoo.flows.CNF.describe`) override the flow's
    settings for the evaluation only (e.g. fine-tune with Hutchinson, evaluate with the
    exact divergence). ``check_top``: how many of the highest-weight model and target samples
    are solved again with a tight adaptive solver (exact divergence only; 0: none), see
    :func:`zoo.metrics.evaluate_flow`.
    ``provenance`` entries (e.g. the checkpoint evaluated) are stored with the metrics.

    The folder is checked for writing before any work; the metrics are printed and written
    before the plots, so that a failing plot loses no numbers.
    """
    flow = flow.as_described(
        dict(divergence=divergence, solver=solver, n_solver_steps=n_solver_steps, solver_rtol=solver_rtol, solver_atol=solver_atol)
    )
    workdir = Path(workdir)
    check_writable(workdir)
    metrics, arrays = evaluate_flow(
        flow,
        system,
        dataset,
        key=jax.random.PRNGKey(seed),
        n_samples=n_samples,
        n_target=n_target,
        split=split,
        chunk_size=chunk_size,
        fm_loss=fm_loss,
        progress=progress,
        label=_label(provenance, workdir),
        # Finished chunks survive an interruption; the same call again continues from them.
        resume_dir=workdir / "evaluation_chunks",
        check_top=check_top,
    )
    metrics.update(provenance or {})
    metrics_path = workdir / (metrics_file or f"{prefix}metrics.json")
    metrics.update(observables(system, arrays))
    print(f"{prefix or ''}metrics: {format_metrics(metrics)}")
    write_json(metrics_path, metrics)
    write_views(flow, system, arrays, workdir, prefix=prefix)
    if records:
        plots.loss_curves(records, workdir / f"{prefix}loss_curve.png", title=f"training run {Path(workdir).resolve().name}")
    return metrics


def configured_evaluation_flow(flow):
    """``flow`` as :func:`evaluation` will see it under the gin bindings in effect
    (``evaluation.divergence``, ``evaluation.solver``, ``evaluation.n_solver_steps``, …), for
    metrics tracked during training that should be computed the same way."""
    return flow.as_described(gin.get_bindings("evaluation"))


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and make sure a file can be written there, before any long computation."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise OSError(f"cannot write outputs to {folder}: {err.strerror or err}") from None


def _label(provenance: dict | None, workdir: Path) -> str:
    """How errors name the model evaluated: its checkpoint or model name, else the run folder."""
    for name in ("pretrained", "checkpoint"):
        if provenance and provenance.get(name):
            return f"model {provenance[name]}"
    return f"the model evaluated into {workdir}"


def held_out_fm_loss(loss) -> FlowMatching:
    """The flow-matching loss a run tracks on held-out data: its own if it trains by flow matching, else plain FM."""
    return loss if isinstance(loss, FlowMatching) else FlowMatching()


def fit_tracking_fm(flow, system, dataset, loss, optimizer, settings: RunSettings, workdir: Path, *, metadata: dict | None = None, resume: bool = False):
    """:func:`zoo.train.fit` with the held-out FM loss as its periodic evaluation (``val_fm_loss``).

    The held-out loss is the training loss itself when that is a flow-matching loss (same σ,
    same coupling, batches of the training size, so the two curves measure one quantity);
    for any other training loss (path gradients, maximum likelihood) it is plain flow
    matching, σ = 0 with independent pairs, which shows how far training moves the model
    from the flow-matching optimum. Checkpoints store every parsed gin binding (not only the
    operative ones so far), so that evaluating a checkpoint later uses the same evaluation
    settings as this run. Returns the model and every record of the run's log (across resumes).
    """
    held_out = held_out_fm_loss(loss)
    batch_size = settings.batch_size

    def periodic_eval(model, step):
        return {"val_fm_loss": fm_loss_on(model, dataset.val.positions, held_out, jax.random.PRNGKey(step), batch_size=batch_size)}

    flow, _ = fit(
        flow,
        dataset,
        loss,
        optimizer,
        settings,
        workdir=workdir,
        evaluate=periodic_eval,
        config=gin.config_str(),
        metadata={"system": type(system).__name__, "zoo_version": __version__, **(metadata or {})},
        resume=resume,
    )
    return flow, read_log(workdir)


#: ``train``'s own defaults for the settings it is not given (:class:`~zoo.train.RunSettings`).
TRAIN_DEFAULTS = {"log_every": 10, "checkpoint_every": 500}


@gin.configurable
def train(
    workdir: Path,
    *,
    loss=gin.REQUIRED,
    optimizer=gin.REQUIRED,
    resume: bool = False,
    overwrite: bool = False,
    **settings,
):
    """Build system, data and flow from gin, train with ``loss``, evaluate, write everything to ``workdir``.

    ``settings`` are the run's :class:`~zoo.train.RunSettings` (``train.n_steps``,
    ``train.batch_size``, ``train.ema_decay``, …; unnamed ones take :data:`TRAIN_DEFAULTS`,
    then the class's).
    """
    from zoo.train import claim_run_dir

    run = RunSettings.of("train", settings, TRAIN_DEFAULTS)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    claim_run_dir(workdir / "checkpoint", resume=resume, overwrite=overwrite)
    system = config.make_system()
    dataset = config.make_dataset(system)
    init_key = jax.random.fold_in(jax.random.PRNGKey(run.seed), 10**6)
    flow = config.make_flow(system, key=init_key)
    config.write_operative_config(workdir)
    flow, all_records = fit_tracking_fm(flow, system, dataset, loss, optimizer, run, workdir, resume=resume)
    metrics = evaluation(flow, system, dataset, workdir, records=all_records)
    # The operative config is complete only now (every configurable has been called).
    config.write_operative_config(workdir)
    return flow, metrics


def load_flow(path, *, extra_gin_files=(), extra_bindings=()):
    """Rebuild (system, flow, restored checkpoint) from a checkpoint folder and its stored gin config.

    ``path`` is a checkpoint folder or a pretrained model's model name (downloaded and
    verified by :func:`zoo.pretrained.resolve_checkpoint`). A released model gets the
    solver settings its released metrics were computed with
    (:func:`zoo.pretrained.evaluation_bindings`), so they are what it reproduces.
    ``extra_*`` are parsed after these and the stored config, so evaluation settings can
    be changed (e.g. ``evaluation.n_samples = 100000``); they must not change the
    model's structure.
    """
    from zoo.pretrained import evaluation_bindings, released_info, resolve_checkpoint

    released = released_info(path)
    path = resolve_checkpoint(path)
    info = ckpt.read_checkpoint_info(path)
    as_released = [] if released is None else evaluation_bindings(released)
    config.parse(extra_gin_files, [*as_released, *extra_bindings], config_str=info.config)
    system = config.make_system()
    restored = config.restore_flow(path, system)
    return system, restored.model, restored


@gin.configurable
def sample_to_file(flow, system, out: Path, *, n: int = 10000, seed: int = 0, chunk_size: int = 1024, format: str | None = None) -> list[Path]:
    """Draw samples with log densities and log weights and write them (:func:`zoo.boltzmann.save_samples`)."""
    from zoo.boltzmann import draw_samples, sample_format, save_samples

    format = sample_format(out, format)  # an unknown format fails before the sampling
    if format in ("pdb", "dcd", "h5") and system.topology() is None:
        raise config.ConfigError(f"{type(system).__name__} has no molecular topology, so no {format} trajectory: write npz or npy")
    return save_samples(draw_samples(flow, system, n, seed=seed, chunk_size=chunk_size, progress=True), system, out, format)


#: The ODE solvers :func:`solver_agreement` compares by default (:meth:`~zoo.flows.CNF.describe`
#: records; the flow's divergence is kept). The first is the reference.
SOLVER_SETTINGS = (
    {"solver": "dopri5", "solver_rtol": 1e-8, "solver_atol": 1e-8},
    {"solver": "rk4", "n_solver_steps": 20},
    {"solver": "rk4", "n_solver_steps": 40},
)
def divergence_settings(support_dim: int) -> tuple[dict, ...]:
    """The divergence estimators ``tools/check-solver --divergence`` compares by default (the
    flow's solver is kept): the exact trace, the reference, against Hutchinson's estimate with
    one Rademacher probe and with 4, d/4 and d/2 orthogonal probes on a support of dimension d
    (those below d; d would be the exact trace again)."""
    probes = sorted({k for k in (4, support_dim // 4, support_dim // 2) if 1 < k < support_dim})
    return ({"divergence": "exact"}, {"divergence": "hutchinson"}, *({"divergence": f"hutchinson-{k}-orthogonal"} for k in probes))


def solver_agreement(flow, system, dataset, *, n: int = 256, seed: int = 5, settings=SOLVER_SETTINGS, float64: bool = True) -> list[dict]:
    """How much the metrics depend on how log q is computed: every setting on the same samples against the first.

    ``settings`` are records in the keys of :meth:`~zoo.flows.CNF.describe` (what they leave
    out is the flow's own). For each setting: log q of the
    first ``n`` test samples, and model samples with their log weights drawn from the same
    base noise (same key, so the same samples whatever the divergence estimator). Reported
    per setting: the mean, spread (standard deviation) and largest difference of the data
    log q and of the model log w from the reference, and NLL, ESS-q, ESS-p with their standard errors, and seconds. In
    float64 (switched on for this call) the reference's own rounding stays far below the
    differences measured.
    """
    from zoo.flows.cnf import log_prob_chunked, sample_and_log_prob_chunked

    previous = jax.config.jax_enable_x64
    if float64:
        jax.config.update("jax_enable_x64", True)
        flow = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, flow)
    try:
        target = np.asarray(dataset.test.positions[:n], np.float64 if float64 else np.float32)
        u_target = energies_chunked(system, target)
        runs = []
        for setting in settings:
            solved = flow.as_described(setting)
            name = describe_in_words(solved.describe())
            start = time.perf_counter()
            log_q = log_prob_chunked(solved, target, key=jax.random.PRNGKey(seed), chunk_size=n)["log_q"]
            model = sample_and_log_prob_chunked(solved, jax.random.PRNGKey(seed), n, chunk_size=n)
            log_w = -energies_chunked(system, model["x"]) - model["log_q"]
            runs.append({"name": name, "log_q": log_q, "log_w": log_w, "seconds": time.perf_counter() - start})
    finally:
        jax.config.update("jax_enable_x64", previous)
    reference = runs[0]
    rows = []
    for run in runs:
        # Samples whose weight is unusable under either setting (failed energy) are left out of the differences.
        d_data, d_model = [
            (run[k] - reference[k])[np.isfinite(run[k]) & np.isfinite(reference[k])] for k in ("log_q", "log_w")
        ]
        log_w_p = -u_target - run["log_q"]
        rows.append(
            {
                "setting": run["name"],
                "n": n,
                "seconds": round(run["seconds"], 1),
                "data_log_q_minus_reference_mean": float(np.mean(d_data)),
                "data_log_q_minus_reference_max_abs": float(np.max(np.abs(d_data))),
                "data_log_q_minus_reference_sd": float(np.std(d_data)),
                "model_log_w_minus_reference_mean": float(np.mean(d_model)),
                "model_log_w_minus_reference_max_abs": float(np.max(np.abs(d_model))),
                "model_log_w_minus_reference_sd": float(np.std(d_model)),
                "n_compared_model": int(d_model.size),
                "nll": nll(run["log_q"]),
                "nll_se": nll_se(run["log_q"]),
                "ess_q": ess_q(run["log_w"]),
                "ess_q_se": ess_q_se(run["log_w"]),
                "ess_p": ess_p(log_w_p),
                "ess_p_se": ess_p_se(log_w_p),
            }
        )
    return rows

"""Plots people would rather look at than read: densities, samples, energies, curves.

Figures are built with matplotlib's object interface (:class:`matplotlib.figure.Figure`, no
pyplot): they render to files with Agg without selecting a global backend, keep no global
figure registry, and need no closing.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure


def subplots(nrows: int = 1, ncols: int = 1, *, figsize, **kwargs):
    """A figure and its axes, as ``pyplot.subplots`` would return them."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def save(fig: Figure, path: Path) -> Path:
    """Lay out and write a figure (PNG at 110 dpi), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _positive(values) -> bool:
    return len(values) > 0 and all(v > 0 for v in values)


def loss_curves(records: list[dict], path: Path, *, title: str = "training") -> Path:
    """The training loss against step, and the held-out FM loss of the periodic evaluations.

    ``records`` are a run's log lines (``log.jsonl``): step records carry ``loss`` (and
    ``fm_loss`` when the training loss is another one), evaluation records carry
    ``eval.val_fm_loss``. A logged FM loss identical to the training loss is drawn once.
    The held-out loss (markers at the evaluation steps) shares the axis when the training
    loss is the FM loss and gets its own right-hand axis otherwise.
    """
    steps = [r for r in records if isinstance(r.get("loss"), (int, float)) and np.isfinite(r["loss"])]
    evals = [r for r in records if isinstance(r.get("eval"), dict) and np.isfinite(r["eval"].get("val_fm_loss", np.nan))]
    fm_is_loss = bool(steps) and all(r.get("fm_loss") == r["loss"] for r in steps)
    fig, ax = subplots(figsize=(6.5, 4.2))
    lines = []
    if steps:
        loss = [r["loss"] for r in steps]
        label = "training loss (FM)" if fm_is_loss else "training loss"
        lines += ax.plot([r["step"] for r in steps], loss, color="C0", lw=1.2, label=label)
        fm = [(r["step"], r["fm_loss"]) for r in steps if "fm_loss" in r]
        if fm and not fm_is_loss:
            lines += ax.plot(*zip(*fm), color="C2", lw=1.2, label="training FM loss")
        if _positive(loss):
            ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("FM loss" if fm_is_loss or not steps else "training loss")
    if evals:
        held_ax = ax if fm_is_loss or not steps else ax.twinx()
        val = [r["eval"]["val_fm_loss"] for r in evals]
        lines += held_ax.plot([r["step"] for r in evals], val, "o-", color="C1", ms=4, label="held-out FM loss")
        if held_ax is not ax:
            held_ax.set_ylabel("held-out FM loss")
    if not lines:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(lines, [line.get_label() for line in lines], loc="best")
    ax.set_title(title)
    return save(fig, path)


def metric_vs_time(curves: dict[str, dict[int, list[dict]]], key: str, path: Path, *, ylabel: str, title: str, log: bool = False) -> Path:
    """One tracked metric against training time: every seed of every recipe, and each recipe's mean.

    ``curves[recipe][seed]`` is that run's list of evaluation points ``{"time_s", key, ...}``.
    Seeds are thin lines with markers at the evaluation points, one legend entry each; the
    mean over seeds (at each evaluation index, over the seeds that reached it; time and
    value averaged) is the thick line.
    """
    many = sum(len(r) for r in curves.values()) > 6
    # Many lines: the legend goes beside the axes, where it hides none of them.
    fig, ax = subplots(figsize=(11.0 if many else 7.5, 4.6))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = "os^Dv<>p"
    for color, (name, runs) in zip(colors * 4, curves.items()):
        tracks = []
        for j, (seed, run) in enumerate(runs.items()):
            pts = [(pt["time_s"], pt[key]) for pt in run if pt.get(key) is not None and np.isfinite(pt[key])]
            if not pts:
                continue
            tracks.append(pts)
            t, v = zip(*pts)
            ax.plot(t, v, marker=markers[j % len(markers)], ms=3.5, lw=0.8, alpha=0.55, color=color, label=f"{name}, seed {seed}")
        if len(tracks) > 1:
            depth = max(len(tr) for tr in tracks)
            mean = [np.mean([tr[k] for tr in tracks if k < len(tr)], axis=0) for k in range(depth)]
            ax.plot([m[0] for m in mean], [m[1] for m in mean], lw=2.4, color=color, label=f"{name}, mean of {len(tracks)} seeds")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.set_title(title)
    if many:
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    else:
        ax.legend(fontsize="small")
    return save(fig, path)


def density_2d(flow, system, path: Path, *, samples: np.ndarray | None = None, lim: float = 3.5, n: int = 120) -> Path:
    """Model density beside the target density, with model samples, for a 2-D system."""
    import jax
    import jax.numpy as jnp

    from zoo.flows.cnf import log_prob_chunked

    g = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(g, g)
    grid = np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32)
    log_q = log_prob_chunked(flow, grid, key=jax.random.PRNGKey(0), chunk_size=4096)["log_q"]
    target = np.exp(-np.asarray(jax.vmap(system.energy)(jnp.asarray(grid))) - (system.log_z or 0.0))
    panels = [("model density q_θ", np.exp(log_q).reshape(n, n)), ("target density p", target.reshape(n, n))]
    fig, axes = subplots(1, 3 if samples is not None else 2, figsize=(13 if samples is not None else 9, 4.2))
    vmax = max(p.max() for _, p in panels)
    for ax, (title, dens) in zip(axes, panels):
        image = ax.imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis", vmin=0, vmax=vmax)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="density")
        ax.set_title(title)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.set_aspect("equal")
    if samples is not None:
        ax = axes[2]
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.set_title(f"{len(samples)} model samples")
    return save(fig, path)


def density_hist(ax, values: np.ndarray, bins: np.ndarray, *, weights: np.ndarray | None = None, label: str, **style) -> None:
    """A normalised histogram, or only a legend entry when nothing falls inside ``bins``.

    A model far from the data (or one dominating weight outside the data's range) leaves
    the bins empty; matplotlib would then divide by zero and draw nothing unexplained.
    """
    values = np.asarray(values).ravel()
    mass = np.ones_like(values) if weights is None else np.asarray(weights).ravel()
    inside = (values >= bins[0]) & (values <= bins[-1])
    if not np.any(mass[inside] > 0):
        ax.plot([], [], label=f"{label} (none in range)", **{k: v for k, v in style.items() if k in ("lw", "color")})
        return
    ax.hist(values, bins=bins, weights=weights, density=True, label=label, **style)


def energy_histogram(u_target: np.ndarray, u_model: np.ndarray, log_w: np.ndarray, path: Path, *, title: str = "") -> Path:
    """Energy histograms of data, model samples, and model samples reweighted to the target."""
    fig, ax = subplots(figsize=(6, 4))
    finite = np.isfinite(u_model) & np.isfinite(log_w)
    lo, hi = np.percentile(u_target, [0.1, 99.9])
    span = hi - lo
    bins = np.linspace(lo - 0.3 * span, hi + 0.5 * span, 80)
    density_hist(ax, u_target, bins, alpha=0.5, label="data")
    density_hist(ax, u_model[finite], bins, histtype="step", lw=1.5, label="model")
    if finite.any():
        w = np.exp(log_w[finite] - log_w[finite].max())
        density_hist(ax, u_model[finite], bins, weights=w, histtype="step", lw=1.5, label="model, reweighted")
    ax.set_xlabel("energy u / k_BT")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend()
    return save(fig, path)


def learning_rate_probe(result: dict, path: Path, *, title: str = "") -> Path:
    """Held-out NLL change after one optimiser step against the learning rate (zoo.experiments.finetune.probe_learning_rates)."""
    lrs = np.asarray(result["learning_rates"])
    order = np.argsort(lrs)
    mean = np.asarray(result["d_nll_mean"])[order]
    sem = np.asarray(result["d_nll_sem"])[order]
    fig, ax = subplots(figsize=(6, 4))
    ax.errorbar(lrs[order], mean, yerr=sem, marker="o", capsize=3)
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.axvline(result["configured_learning_rate"], color="C3", ls="--", lw=0.8, label="configured")
    ax.set_xscale("log")
    # Changes span orders of magnitude of both signs; symlog keeps the small improvements visible.
    ax.set_yscale("symlog", linthresh=max(1e-3, float(np.min(np.abs(mean[mean != 0]), initial=1.0))))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("held-out NLL change after one step (nats)")
    ax.set_title(title or f"first step on {result['n_gradient_samples']} samples, NLL on {result['n_eval']}")
    ax.legend()
    return save(fig, path)

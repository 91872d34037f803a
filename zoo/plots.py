"""Plots people would rather look at than read: densities, samples, energies, curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(records: list[dict], path: Path, *, keys=("loss", "fm_loss"), title: str = "training") -> Path:
    """Loss (and other logged scalars) against step, log-scaled where positive."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(r["step"], r[key]) for r in records if key in r and np.isfinite(r[key])]
        if pts:
            steps, values = zip(*pts)
            ax.plot(steps, values, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if all(r.get(k, 1) > 0 for r in records for k in keys if k in r):
        ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    return _save(fig, path)


def density_2d(flow, system, path: Path, *, samples: np.ndarray | None = None, lim: float = 3.5, n: int = 120) -> Path:
    """Model density beside the target density, with model samples, for a 2-D system."""
    import jax.numpy as jnp

    from zoo.flows.cnf import log_prob_chunked

    import jax

    g = np.linspace(-lim, lim, n)
    xx, yy = np.meshgrid(g, g)
    grid = np.stack([xx.ravel(), yy.ravel()], -1).astype(np.float32)
    log_q = log_prob_chunked(flow, grid, key=jax.random.PRNGKey(0), chunk_size=4096)["log_q"]
    target = np.exp(-np.asarray(jax.vmap(system.energy)(jnp.asarray(grid))) - (system.log_z or 0.0))
    panels = [("model density q_θ", np.exp(log_q).reshape(n, n)), ("target density p", target.reshape(n, n))]
    fig, axes = plt.subplots(1, 3 if samples is not None else 2, figsize=(13 if samples is not None else 9, 4.2))
    vmax = max(p.max() for _, p in panels)
    for ax, (title, dens) in zip(axes, panels):
        ax.imshow(dens, origin="lower", extent=(-lim, lim, -lim, lim), cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(title)
        ax.set_aspect("equal")
    if samples is not None:
        ax = axes[2]
        ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(f"{len(samples)} model samples")
    return _save(fig, path)


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
    fig, ax = plt.subplots(figsize=(6, 4))
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
    return _save(fig, path)


def learning_rate_probe(result: dict, path: Path, *, title: str = "") -> Path:
    """Held-out NLL change after one optimiser step against the learning rate (zoo.finetune.probe_learning_rates)."""
    lrs = np.asarray(result["learning_rates"])
    order = np.argsort(lrs)
    mean = np.asarray(result["d_nll_mean"])[order]
    sem = np.asarray(result["d_nll_sem"])[order]
    fig, ax = plt.subplots(figsize=(6, 4))
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
    return _save(fig, path)

"""Views of samples: the figures an evaluation writes for each system, and those a generated
data set is described with.

Each evaluation view compares the data, the model's samples, and the model's samples
reweighted to the target with w ∝ exp(−u − log q) (self-normalised). The data-set views
compare the splits of a set and show its sampler's energy trace. The numbers these views
show (free-energy differences, pair distances, dihedrals) are computed in :mod:`zoo.metrics`
and the systems.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
from matplotlib.colors import LogNorm

from zoo.metrics import pair_distances, top_weight_share
from zoo.plotting import plots
from zoo.plotting.plots import density_hist, save, subplots
from zoo.systems import AbstractParticleSystem, AlanineDipeptideClassical, AlanineDipeptideXTB, alanine


def normalised_weights(log_w: np.ndarray) -> np.ndarray:
    """Self-normalised importance weights; non-finite log weights get weight zero."""
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    if not np.isfinite(log_w).any():
        return np.zeros_like(log_w)
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def bond_lengths(x: np.ndarray, pairs: np.ndarray, n_atoms: int) -> np.ndarray:
    """Lengths (n, n_pairs) of the given atom pairs for flat samples (n, n_atoms·3)."""
    p = x.reshape(x.shape[0], n_atoms, 3)
    return np.linalg.norm(p[:, pairs[:, 0]] - p[:, pairs[:, 1]], axis=-1)


def ramachandran_panel(ax, phi: np.ndarray, psi: np.ndarray, *, title: str, weights: np.ndarray | None = None) -> None:
    """A log-density (φ, ψ) histogram on [-π, π]² in one axes, with its colour bar."""
    bins = np.linspace(-np.pi, np.pi, 61)
    h, _, _ = np.histogram2d(phi, psi, bins=bins, weights=weights, density=True)
    image = ax.imshow(h.T, origin="lower", extent=(-np.pi, np.pi, -np.pi, np.pi), norm=LogNorm(vmin=1e-3, vmax=max(h.max(), 1e-2)), cmap="viridis")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.03, label="density (rad⁻²)")
    ax.set_title(title)
    ax.set_xlabel("φ (rad)")
    ax.set_ylabel("ψ (rad)")


def ramachandran(phi_psi: dict, path: Path, *, weights: np.ndarray | None = None) -> Path:
    """(φ, ψ) histograms side by side: data, model, model reweighted."""
    panels = [("data", phi_psi["data"], None), ("model", phi_psi["model"], None)]
    if weights is not None:
        panels.append(("model, reweighted", phi_psi["model"], weights))
    fig, axes = subplots(1, len(panels), figsize=(4.3 * len(panels), 4.0))
    for ax, (title, (phi, psi), w) in zip(axes, panels):
        ramachandran_panel(ax, phi, psi, title=f"{title} (n={len(phi)})", weights=w)
    return save(fig, path)


def bond_histograms(data: np.ndarray, model: np.ndarray, weights: np.ndarray, names: list[str], path: Path) -> Path:
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.axis("off")
            continue
        lo, hi = np.percentile(data[:, k], [0.5, 99.5])
        span = hi - lo
        bins = np.linspace(lo - 0.5 * span, hi + 0.5 * span, 60)
        density_hist(ax, data[:, k], bins, alpha=0.5, label="data")
        density_hist(ax, model[:, k], bins, histtype="step", lw=1.5, label="model")
        density_hist(ax, model[:, k], bins, weights=weights, histtype="step", lw=1.5, label="reweighted")
        ax.set_title(names[k])
        ax.set_xlabel("length (nm)")
    axes[0, 0].legend(fontsize=8)
    return save(fig, path)


def molecule_views(arrays: dict, workdir: Path, *, prefix: str = "") -> None:
    """Ramachandran maps and bond-length histograms of alanine dipeptide (data, model, reweighted)."""
    workdir = Path(workdir)
    batched = jax.jit(jax.vmap(alanine.dihedrals))
    x_data, x_model = arrays["x_target"], arrays["x_model"]
    finite = np.all(np.isfinite(x_model), axis=1)
    x_model = x_model[finite]
    weights = normalised_weights(arrays["log_w_model"][finite])
    phi_psi = {"data": tuple(np.asarray(a) for a in batched(x_data)), "model": tuple(np.asarray(a) for a in batched(x_model))}
    ramachandran(phi_psi, workdir / f"{prefix}ramachandran.png", weights=weights)

    elements = alanine.ELEMENTS
    bonds = alanine.bonds()
    cn = [(i, j) for i, j in bonds if {elements[i], elements[j]} == {"C", "N"}]
    others = [(i, j) for i, j in bonds if {elements[i], elements[j]} in ({"C", "O"}, {"C"})][:3]
    pairs = np.array(cn + others)
    names = [f"{elements[i]}{i}–{elements[j]}{j}" for i, j in pairs]
    lengths = (bond_lengths(x, pairs, alanine.N_ATOMS) for x in (x_data, x_model))
    bond_histograms(*lengths, weights, names, workdir / f"{prefix}bond_lengths.png")


def pair_distance_histogram(arrays: dict, workdir: Path, *, prefix: str = "", n_particles: int, spatial_dim: int) -> Path:
    """Histogram of all inter-particle distances: data, model, model reweighted."""
    x_model = arrays["x_model"]
    finite = np.all(np.isfinite(x_model), axis=1)
    d_data = pair_distances(arrays["x_target"], n_particles, spatial_dim)
    d_model = pair_distances(x_model[finite], n_particles, spatial_dim)
    w = normalised_weights(arrays["log_w_model"][finite])
    w_pairs = np.repeat(w, d_model.shape[1])
    fig, ax = subplots(figsize=(6, 4))
    bins = np.linspace(0, np.percentile(d_data, 99.9) * 1.1, 100)
    density_hist(ax, d_data, bins, alpha=0.5, label="data")
    density_hist(ax, d_model, bins, histtype="step", lw=1.5, label="model")
    if w.sum() > 0:
        density_hist(ax, d_model, bins, weights=w_pairs, histtype="step", lw=1.5, label="model, reweighted")
    ax.set_xlabel("inter-particle distance")
    ax.set_ylabel("density")
    ax.legend()
    return save(fig, Path(workdir) / f"{prefix}pair_distances.png")


def log_weights(arrays: dict, path: Path, *, n_marked: int = 10) -> Path:
    """Where the weights sit: log(n·w/Σw) against the energy, of target and of model samples.

    On target samples (w = p/q) the points far above 0 are states the model gives too
    little density, and they decide ESS-p; on model samples those far above 0 decide ESS-q.
    The ``n_marked`` largest weights of each side are marked with their share of all weight.
    """
    # Own y ranges: one model sample far out in energy would otherwise flatten the target side.
    fig, axes = subplots(1, 2, figsize=(11, 4))
    sides = (("target samples (w = p/q)", arrays["u_target"], arrays["log_w_target"]),
             ("model samples", arrays["u_model"], arrays["log_w_model"]))  # fmt: skip
    for ax, (title, u, log_w) in zip(axes, sides):
        u, log_w = np.asarray(u, np.float64), np.asarray(log_w, np.float64)
        finite = np.isfinite(u) & np.isfinite(log_w)
        ax.set_xlabel("energy u / k_BT")
        ax.set_ylabel("log(n·w / Σw)   (0: an average weight)")
        if finite.sum() == 0:
            ax.set_title(f"{title}: no finite weight")
            continue
        u, log_w = u[finite], log_w[finite]
        relative = log_w - (np.logaddexp.reduce(log_w) - math.log(log_w.size))
        top = np.argsort(relative)[-min(n_marked, relative.size) :]
        share = top_weight_share(log_w, top.size)
        ax.scatter(u, relative, s=4, alpha=0.4, lw=0, label=f"{relative.size} samples")
        ax.scatter(u[top], relative[top], s=14, color="tab:red", label=f"the {top.size} largest: {share:.0%} of all weight")
        ax.axhline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(title)
        ax.legend(loc="lower left", fontsize=8)
    return save(fig, Path(path))


def write_views(flow, system, arrays: dict, workdir: Path, *, prefix: str = "") -> None:
    """Every figure of an evaluation: the 2-D density, the energy histograms, where the weights
    sit, and the system's own views.

    Alanine dipeptide gets Ramachandran maps and bond lengths, other particle systems the
    pair-distance histogram.
    """
    workdir = Path(workdir)
    if system.dim == 2:
        plots.density_2d(flow, system, workdir / f"{prefix}density.png", samples=arrays["x_model"][:2000])
    plots.energy_histogram(
        arrays["u_target"], arrays["u_model"], arrays["log_w_model"], workdir / f"{prefix}energy_histogram.png", title=type(system).__name__
    )
    log_weights(arrays, workdir / f"{prefix}log_weights.png")
    if isinstance(system, (AlanineDipeptideClassical, AlanineDipeptideXTB)):
        molecule_views(arrays, workdir, prefix=prefix)
    elif isinstance(system, AbstractParticleSystem):
        pair_distance_histogram(arrays, workdir, prefix=prefix, n_particles=system.n_particles, spatial_dim=system.spatial_dim)


# ---------------------------------------------------------------------------- data sets
def split_energies(energies: dict, path: Path, *, title: str) -> Path:
    """One step histogram of the reduced energy per split, on shared bins."""
    fig, ax = subplots(figsize=(5, 3.5))
    lo = min(np.percentile(e, 0.1) for e in energies.values())
    hi = max(np.percentile(e, 99.9) for e in energies.values())
    for name, e in energies.items():
        density_hist(ax, e, np.linspace(lo, hi, 80), histtype="step", label=f"{name} (n={len(e)})")
    ax.set(xlabel="reduced energy u [k_BT]", ylabel="density", title=title)
    ax.legend()
    return save(fig, path)


def split_pair_distances(distances: dict, path: Path, *, name: str) -> Path:
    """Per split: the smallest pair distance of each sample, and all pair distances."""
    fig, (smallest, every) = subplots(1, 2, figsize=(9, 3.5))
    for split, r in distances.items():
        smallest.hist(r.min(axis=1), bins=80, density=True, histtype="step", label=split)
        every.hist(r.ravel(), bins=120, density=True, histtype="step", label=split)
    smallest.set(xlabel="smallest pair distance", ylabel="density", title=f"{name}: smallest pair distance")
    every.set(xlabel="pair distance", ylabel="density", title=f"{name}: all pair distances")
    smallest.legend()
    return save(fig, path)


def chain_energy_trace(trace: np.ndarray, burn_in: int, path: Path, *, name: str, n_chains: int = 4) -> Path:
    """The per-step energies (steps, chains) of the first Markov chains, burn-in marked; the
    limits are set by the sampling phase (a lattice start is far off)."""
    fig, ax = subplots(figsize=(9, 3.5))
    steps = np.arange(1, len(trace) + 1)
    shown = min(n_chains, trace.shape[1])
    for j in range(shown):
        ax.plot(steps, trace[:, j], lw=0.4, alpha=0.8)
    ax.axvline(burn_in, color="k", ls="--", lw=1, label="end of burn-in")
    sampling = trace[burn_in:]
    finite = sampling[np.isfinite(sampling)]
    if finite.size:
        lo, hi = np.percentile(finite, [0.1, 99.9])
        ax.set_ylim(lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
    ax.set(xlabel="MCMC step", ylabel="u [k_BT]", title=f"{name}: energy trace of {shown} chains")
    ax.legend(loc="upper right")
    return save(fig, path)


def split_ramachandran(phi_psi: dict, path: Path) -> Path:
    """(φ, ψ) histograms of the splits of an alanine dipeptide set side by side, with each
    split's φ > 0 fraction."""
    fig, axes = subplots(1, len(phi_psi), figsize=(4.3 * len(phi_psi), 4.0), squeeze=False)
    for ax, (name, (phi, psi)) in zip(axes[0], phi_psi.items()):
        ramachandran_panel(ax, phi, psi, title=f"{name} (n={len(phi)}, φ > 0: {np.mean(phi > 0):.3f})")
    return save(fig, path)

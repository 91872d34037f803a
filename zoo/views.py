"""Views of molecular samples: Ramachandran maps, bond lengths, the φ free-energy difference.

Each view compares the data, the model's samples, and the model's samples reweighted to
the target with w ∝ exp(−u − log q) (self-normalised).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402

from zoo.metrics import free_energy_difference  # noqa: E402
from zoo.plots import density_hist  # noqa: E402


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
    """A log-density (φ, ψ) histogram on [-π, π]² in one axes."""
    bins = np.linspace(-np.pi, np.pi, 61)
    h, _, _ = np.histogram2d(phi, psi, bins=bins, weights=weights, density=True)
    ax.imshow(h.T, origin="lower", extent=(-np.pi, np.pi, -np.pi, np.pi), norm=LogNorm(vmin=1e-3, vmax=max(h.max(), 1e-2)), cmap="viridis")
    ax.set_title(title)
    ax.set_xlabel("φ")
    ax.set_ylabel("ψ")


def ramachandran(phi_psi: dict, path: Path, *, weights: np.ndarray | None = None) -> Path:
    """(φ, ψ) histograms side by side: data, model, model reweighted."""
    panels = [("data", phi_psi["data"], None), ("model", phi_psi["model"], None)]
    if weights is not None:
        panels.append(("model, reweighted", phi_psi["model"], weights))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.0))
    for ax, (title, (phi, psi), w) in zip(axes, panels):
        ramachandran_panel(ax, phi, psi, title=f"{title} (n={len(phi)})", weights=w)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bond_histograms(data: np.ndarray, model: np.ndarray, weights: np.ndarray, names: list[str], path: Path) -> Path:
    n = len(names)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
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
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def molecule_views(arrays: dict, workdir: Path, *, prefix: str, dihedrals, bonds: np.ndarray, elements, n_atoms: int) -> dict:
    """Write the Ramachandran and bond-length views; return the φ free-energy differences.

    ``dihedrals`` maps one flat configuration to (φ, ψ); ``bonds`` is an (n_bonds, 2) array.
    """
    workdir = Path(workdir)
    batched = jax.jit(jax.vmap(dihedrals))
    x_data, x_model = arrays["x_target"], arrays["x_model"]
    finite = np.all(np.isfinite(x_model), axis=1)
    x_model = x_model[finite]
    weights = normalised_weights(arrays["log_w_model"][finite])
    phi_psi = {"data": tuple(np.asarray(a) for a in batched(x_data)), "model": tuple(np.asarray(a) for a in batched(x_model))}
    ramachandran(phi_psi, workdir / f"{prefix}ramachandran.png", weights=weights)

    cn = [(i, j) for i, j in bonds if {elements[i], elements[j]} == {"C", "N"}]
    others = [(i, j) for i, j in bonds if {elements[i], elements[j]} in ({"C", "O"}, {"C"})][:3]
    pairs = np.array(cn + others)
    names = [f"{elements[i]}{i}–{elements[j]}{j}" for i, j in pairs]
    bond_histograms(bond_lengths(x_data, pairs, n_atoms), bond_lengths(x_model, pairs, n_atoms), weights, names, workdir / f"{prefix}bond_lengths.png")

    numbers = {"phi_positive_fraction_data": float(np.mean(phi_psi["data"][0] > 0))}
    for name, phi, log_w in (("data", phi_psi["data"][0], None), ("model", phi_psi["model"][0], None),
                             ("reweighted", phi_psi["model"][0], arrays["log_w_model"][finite])):  # fmt: skip
        numbers[f"delta_f_phi_{name}"], numbers[f"delta_f_phi_{name}_se"] = free_energy_difference(phi > 0, log_w)
    return numbers


def pair_distance_histogram(arrays: dict, workdir: Path, *, prefix: str, n_particles: int, spatial_dim: int) -> dict:
    """Histogram of all inter-particle distances: data, model, model reweighted."""
    def distances(x):
        p = x.reshape(x.shape[0], n_particles, spatial_dim)
        i, j = np.triu_indices(n_particles, k=1)
        return np.linalg.norm(p[:, i] - p[:, j], axis=-1)

    x_model = arrays["x_model"]
    finite = np.all(np.isfinite(x_model), axis=1)
    d_data, d_model = distances(arrays["x_target"]), distances(x_model[finite])
    w = normalised_weights(arrays["log_w_model"][finite])
    w_pairs = np.repeat(w, d_model.shape[1])
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, np.percentile(d_data, 99.9) * 1.1, 100)
    density_hist(ax, d_data, bins, alpha=0.5, label="data")
    density_hist(ax, d_model, bins, histtype="step", lw=1.5, label="model")
    if w.sum() > 0:
        density_hist(ax, d_model, bins, weights=w_pairs, histtype="step", lw=1.5, label="model, reweighted")
    ax.set_xlabel("inter-particle distance")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(Path(workdir) / f"{prefix}pair_distances.png", dpi=110)
    plt.close(fig)
    return {"min_pair_distance_data": float(d_data.min(axis=1).mean()), "min_pair_distance_model": float(d_model.min(axis=1).mean()) if len(d_model) else math.nan}

r"""Generate a stored data set of a target system by MCMC: sample, split, add forces, check, plot.

:func:`generate_data` is the gin root of ``tools/generate-data``. It runs
:func:`zoo.data.mcmc.run_chains` (resumable, chunked), flattens the thinned samples chain by
chain, assigns consecutive blocks to train / val / test (so the splits come from
(nearly) disjoint chains), shuffles within each split, computes the forces $F = -∇u$,
writes everything with :mod:`zoo.storage` and records the diagnostics and physical
statistics in the manifest.

Statistics for particle systems include the virial identity: for a translation-invariant
u sampled on the centre-of-mass-free subspace of dimension n = (N−1)d, integration by
parts gives $⟨x·∇u⟩ = n$ (36 for LJ13, 6 for DW4).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import jax
import numpy as np

import gin
from zoo import storage
from zoo.data.mcmc import SamplerSettings, run_chains
from zoo.experiments import config

# Statistics of the published LJ13 test set (Klein et al. 2023) in the 'ordered' convention:
# energy and pair-distance moments of its test split. The generator compares against them.
PUBLISHED_LJ13 = {
    "mean_energy": -43.1,
    "std_energy": 7.0,
    "pair_part_unordered": -26.1,
    "oscillator_part": 9.0,
    "min_pair_distance": 0.83,
    "virial": 36.0,
}


@functools.lru_cache(maxsize=16)
def _vmapped(system, what: str):
    """jit(vmap(·)) of a per-configuration function of ``system``, compiled once per system."""
    from zoo.systems.particles import pair_distances

    fns = {
        "energy": system.energy,
        "force": system.force,
        "pair_distances": lambda y: pair_distances(y.reshape(system.event_shape)),
    }
    return jax.jit(jax.vmap(fns[what]))


def _batched(system, what: str, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """Apply ``what`` to (n, dim) in batches padded to a power of two (few compiled shapes)."""
    f = _vmapped(system, what)
    x = np.asarray(x, dtype=np.float32).reshape(len(x), -1)
    out = []
    for i in range(0, len(x), batch):
        part = x[i : i + batch]
        size = min(batch, 1 << max(len(part) - 1, 0).bit_length())
        padded = np.concatenate([part, np.repeat(part[-1:], size - len(part), axis=0)], axis=0)
        out.append(np.asarray(f(padded))[: len(part)])
    return np.concatenate(out, axis=0)


def _mean_se(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)), "se": float(v.std(ddof=1) / math.sqrt(len(v)))}


def statistics(system, positions: np.ndarray, forces: np.ndarray | None = None) -> dict:
    r"""Energy, virial and geometry statistics of samples (n, dim) (standard errors assume independence).

    For particle systems: virial ⟨x·∇u⟩ (expected (N−1)d), smallest pair distance, mean
    pair distance; for Lennard-Jones also the pair part $Σ_{i<j}$ of the pair energy (one
    term per unordered pair) and the oscillator part; for the double well the fraction of
    pair distances below d₀ and the mean short and long distance.
    """
    from zoo.systems.particles import AbstractParticleSystem, DoubleWell, LennardJones

    x = np.asarray(positions, dtype=np.float32).reshape(len(positions), -1)
    u = _batched(system, "energy", x)
    out = {"n": int(len(x)), "energy": _mean_se(u)}
    if not isinstance(system, AbstractParticleSystem):
        return out
    N, d = system.n_particles, system.spatial_dim
    f = _batched(system, "force", x) if forces is None else np.asarray(forces).reshape(x.shape)
    p = x.reshape(-1, N, d).astype(np.float64)
    centred = p - p.mean(axis=1, keepdims=True)
    virial = -np.sum(centred.reshape(len(x), -1) * f.astype(np.float64), axis=1)
    out["virial"] = {**_mean_se(virial), "expected": float((N - 1) * d)}
    out["virial"]["relative_deviation"] = out["virial"]["mean"] / out["virial"]["expected"] - 1.0
    r = _batched(system, "pair_distances", x).astype(np.float64)
    smallest = r.min(axis=1)
    out["min_pair_distance"] = {
        **_mean_se(smallest),
        "overall_min": float(smallest.min()),
        "percentiles": {str(q): float(np.percentile(smallest, q)) for q in (0.1, 1.0, 50.0)},
    }
    out["mean_pair_distance"] = _mean_se(r.mean(axis=1))
    out["centre_of_mass_max_abs"] = float(np.abs(p.mean(axis=1)).max())
    if isinstance(system, LennardJones):
        pair = np.sum(np.asarray(system.pair_energy(r)), axis=1)
        osc = 0.5 * system.oscillator_scale * np.sum(centred**2, axis=(1, 2))
        out["pair_part_unordered"] = _mean_se(pair)
        out["oscillator_part"] = _mean_se(osc)
    if isinstance(system, DoubleWell):
        short = r < system.d0
        out["fraction_pair_distances_below_d0"] = float(short.mean())
        out["mean_short_distance"] = float(r[short].mean()) if short.any() else float("nan")
        out["mean_long_distance"] = float(r[~short].mean()) if (~short).any() else float("nan")
        hist, edges = np.histogram(r, bins=80)
        centres = 0.5 * (edges[1:] + edges[:-1])
        lo, hi = centres < system.d0, centres >= system.d0
        out["distance_modes"] = [float(centres[lo][np.argmax(hist[lo])]), float(centres[hi][np.argmax(hist[hi])])]
    return out


def compare_published_lj13(stats: dict) -> dict:
    """Our LJ13 statistics beside those of the published test set (:data:`PUBLISHED_LJ13`)."""
    ours = {
        "mean_energy": stats["energy"]["mean"],
        "std_energy": stats["energy"]["std"],
        "pair_part_unordered": stats["pair_part_unordered"]["mean"],
        "oscillator_part": stats["oscillator_part"]["mean"],
        "min_pair_distance": stats["min_pair_distance"]["mean"],
        "virial": stats["virial"]["mean"],
    }
    out = {k: {"ours": ours[k], "published": v} for k, v in PUBLISHED_LJ13.items()}
    # The published "smallest pair distance ≈ 0.83" is not the mean of the per-sample minimum
    # (0.908 here, std 0.022); it matches the smallest value over the whole set.
    out["min_pair_distance"]["ours_overall_min"] = stats["min_pair_distance"]["overall_min"]
    out["min_pair_distance"]["note"] = "ours = mean over samples of the smallest pair distance; ours_overall_min = smallest over the set"
    return out


def _is_lj13(system) -> bool:
    from zoo.systems.particles import LennardJones

    return (
        isinstance(system, LennardJones)
        and (system.n_particles, system.spatial_dim) == (13, 3)
        and system.pair_convention == "ordered"
        and (system.epsilon, system.r_m, system.oscillator_scale) == (1.0, 1.0, 1.0)
    )


def _thinned_observables(system, samples: np.ndarray) -> dict:
    """Per-chain series (c, m) of slow observables beside the energy, for τ and R̂."""
    from zoo.systems.particles import AbstractParticleSystem

    if not isinstance(system, AbstractParticleSystem) or samples.shape[1] < 4:
        return {}
    c, m, _ = samples.shape
    r = _batched(system, "pair_distances", samples.reshape(c * m, -1)).reshape(c, m, -1)
    return {"mean_pair_distance": r.mean(axis=-1), "min_pair_distance": r.min(axis=-1)}


@gin.configurable
def generate_data(
    workdir,
    *,
    system=gin.REQUIRED,
    output_dir=None,
    kernel: str = "mala",
    n_chains: int = 256,
    burn_in: int = 10_000,
    thin: int = 100,
    step_size: float = 0.05,
    target_accept: float | None = None,
    adapt: bool = True,
    hmc_steps: int = 10,
    hmc_jitter: float = 0.2,
    chunk_steps: int = 2_000,
    trace_chains: int = 16,
    init_spacing: float = 1.0,
    n_train: int = 10_000,
    n_val: int = 2_000,
    n_test: int = 10_000,
    seed: int = 0,
    resume: bool = True,
    max_chunks: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> dict | None:
    """Sample ``system`` by MCMC into ``output_dir`` (default: ``<workdir>/dataset``); returns the manifest.

    The chain state lives in ``workdir`` and is saved after every chunk, so a killed call
    resumes where it stopped (``resume=True``). Returns None while the run is incomplete
    (only after ``max_chunks``). Splits come from consecutive blocks of chains, each
    shuffled with ``seed``.
    """
    workdir = Path(workdir)
    output_dir = workdir / "dataset" if output_dir is None else Path(output_dir)
    if output_dir.resolve() == workdir.resolve():
        raise ValueError(f"output_dir must differ from the workdir {workdir} (the data set directory is replaced as a whole)")
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if any(n < 1 for n in counts.values()):
        raise ValueError(f"every split needs at least one sample, got {counts}")
    n_total = sum(counts.values())
    settings = SamplerSettings(
        kernel=kernel,
        n_chains=n_chains,
        burn_in=burn_in,
        thin=thin,
        step_size=step_size,
        target_accept=target_accept,
        adapt=adapt,
        hmc_steps=hmc_steps,
        hmc_jitter=hmc_jitter,
        chunk_steps=chunk_steps,
        trace_chains=trace_chains,
        init_spacing=init_spacing,
    )
    n_per_chain = math.ceil(n_total / n_chains)
    result = run_chains(
        system, workdir, settings=settings, n_per_chain=n_per_chain, seed=seed, resume=resume, max_chunks=max_chunks, progress=progress
    )
    if not result.complete:
        return None

    # Diagnostics: energy τ from the per-step trace; τ and R̂ of slower observables on the
    # thinned samples (≈ 1 when the thinning suffices).
    diagnostics = result.diagnostics()
    from zoo.data.mcmc import gelman_rubin, integrated_autocorr_time

    for name, series in _thinned_observables(system, result.samples).items():
        diagnostics[f"tau_{name}_thinned"] = integrated_autocorr_time(series)[0]
        diagnostics[f"rhat_{name}"] = gelman_rubin(series)

    flat = result.samples.reshape(-1, system.dim)[:n_total]
    rng = np.random.default_rng(seed)
    splits, start = {}, 0
    for name in ("train", "val", "test"):
        block = flat[start : start + counts[name]]
        start += counts[name]
        block = block[rng.permutation(len(block))]
        forces = _batched(system, "force", block).astype(np.float32)
        splits[name] = (block, forces)

    stats = {name: statistics(system, pos, frc) for name, (pos, frc) in splits.items()}
    stats["all"] = statistics(system, *(np.concatenate(a, axis=0) for a in zip(*splits.values())))
    extra = {
        "sampler": {**settings.as_dict(), "n_per_chain": n_per_chain, "steps_per_chain": result.steps_total},
        "seed": int(seed),
        "split_assignment": "chain-major blocks: train, then val, then test; shuffled within each split",
        "diagnostics": diagnostics,
        "statistics": stats,
    }
    if _is_lj13(system):
        extra["published_comparison"] = compare_published_lj13(stats["all"])
    manifest = storage.write_dataset(output_dir, splits, system=system, extra=extra)
    # gin records a configurable's bindings when it is called, so the operative config is
    # complete here; beside the data it tells how to regenerate them.
    config.write_operative_config(output_dir)
    if plots:
        write_plots(output_dir / "plots", system, splits, result)
    (output_dir / "README.md").write_text(describe(manifest))
    return {**manifest, "directory": str(output_dir)}


@gin.configurable
def generate(workdir, *, generator=generate_data, resume: bool = True, max_chunks: int | None = None, progress: bool = True):
    """Run the data generator a gin file selects (``generate.generator``; MCMC by default).

    The molecular generators (``@ad2_classical_md``, ``@ad2_xtb_relaxed`` in
    ``zoo.experiments.generate_ad2``) take the same workdir, resume, max_chunks and progress arguments
    and also return None while chunks remain.
    """
    return generator(workdir, resume=resume, max_chunks=max_chunks, progress=progress)


def describe(manifest: dict) -> str:
    """A short human-readable account of a generated data set (written as README.md beside it)."""
    sysname = manifest["system"]["name"]
    params = ", ".join(f"{k}={v}" for k, v in manifest["system"]["params"].items())
    sm, d = manifest["sampler"], manifest["diagnostics"]
    lines = [
        f"# {sysname} data set (MCMC)",
        "",
        f"System: `{sysname}({params})`, energies in k_BT. Generated by `tools/generate-data` "
        f"(zoo {manifest['zoo_version']}, {manifest['created']}); the exact configuration is in "
        "`operative_config.gin`, every number below is also in `manifest.json`.",
        "",
        "| split | samples |",
        "|---|---|",
        *[f"| {k} | {v['count']} |" for k, v in manifest["splits"].items()],
        "",
        "Arrays: `<split>/positions`, `<split>/forces` (zarr, float32, shape (n, "
        + ", ".join(map(str, manifest["event_shape"]))
        + ")); forces are −∇u. Load with `zoo.data.load_dataset(path, split)` or the gin "
        "dataset `stored_dataset(path=...)`, which check the sha256 of every array.",
        "",
        "## Sampler",
        "",
        f"{sm['n_chains']} chains of `{sm['kernel']}`"
        + (f" ({sm['hmc_steps']} leapfrog steps)" if sm["kernel"] == "hmc" else "")
        + f", burn-in {sm['burn_in']} steps with per-chain step-size adaptation to acceptance "
        f"{sm['target_accept']}, then one sample every {sm['thin']} steps ({sm['n_per_chain']} per chain). "
        "Splits are consecutive blocks of chains (train, val, test), shuffled within each split.",
        "",
        f"- acceptance {d['acceptance_mean']:.3f} (chains {d['acceptance_min']:.3f}–{d['acceptance_max']:.3f})",
    ]
    if "tau_energy_steps" in d:
        lines.append(f"- integrated autocorrelation time of the energy {d['tau_energy_steps']:.1f} steps (thin/τ = {d['thin_over_tau']:.1f})")
    for key, label in (("rhat_energy", "energy"), ("rhat_mean_pair_distance", "mean pair distance")):
        if key in d:
            lines.append(f"- split-R̂ over chains of the {label}: {d[key]:.4f}")
    for key in ("tau_energy_thinned", "tau_mean_pair_distance_thinned"):
        if key in d:
            lines.append(f"- τ of the recorded samples ({key.removeprefix('tau_').removesuffix('_thinned').replace('_', ' ')}): {d[key]:.2f} samples")
    lines += ["", "## Statistics (± one standard error, samples taken as independent)", ""]
    stats = manifest["statistics"]
    columns = [c for c in ("test", "all") if c in stats]
    st = stats[columns[-1]]

    def cell(entry, what="mean"):
        return f"{entry[what]:.4f}" + (f" ± {entry['se']:.4f}" if what == "mean" else "")

    lines += ["| quantity | " + " | ".join(f"{c} (n={stats[c]['n']})" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    lines.append("| ⟨u⟩ | " + " | ".join(cell(stats[c]["energy"]) for c in columns) + " |")
    lines.append("| std u | " + " | ".join(cell(stats[c]["energy"], "std") for c in columns) + " |")
    for key, label in (
        ("pair_part_unordered", "pair part Σ_{i<j}"),
        ("oscillator_part", "oscillator part"),
        ("min_pair_distance", "smallest pair distance"),
        ("mean_pair_distance", "mean pair distance"),
        ("virial", "virial ⟨x·∇u⟩"),
    ):
        if key in st:
            lines.append(f"| {label} | " + " | ".join(cell(stats[c][key]) for c in columns) + " |")
    if "virial" in st:
        v = st["virial"]
        lines.append(
            f"\nVirial identity ({columns[-1]}): expected (N−1)d = {v['expected']:.0f}, deviation "
            f"{100 * v['relative_deviation']:+.2f} % ± {100 * v['se'] / v['expected']:.2f} % (one standard error)."
        )
    if "fraction_pair_distances_below_d0" in st:
        lines.append(
            f"\nPair distances: {100 * st['fraction_pair_distances_below_d0']:.1f} % below d₀; modes at "
            f"{st['distance_modes'][0]:.2f} and {st['distance_modes'][1]:.2f}; mean short {st['mean_short_distance']:.3f}, "
            f"mean long {st['mean_long_distance']:.3f}."
        )
    for check in manifest.get("independent_checks", []):
        lines += ["", f"## Independent check: {check['title']}", "", check["text"]]
    if "published_comparison" in manifest:
        lines += ["", "## Against the published LJ13 set (Klein et al. 2023)", "", "| quantity | ours | published |", "|---|---|---|"]
        for k, v in manifest["published_comparison"].items():
            lines.append(f"| {k.replace('_', ' ')} | {v['ours']:.3f} | {v['published']} |")
            if "ours_overall_min" in v:
                lines.append(f"| smallest pair distance over the set | {v['ours_overall_min']:.3f} | {v['published']} |")
    lines += ["", "Plots: `plots/energy_histogram.png`, `plots/pair_distance_histogram.png`, `plots/energy_trace.png`.", ""]
    return "\n".join(lines)


def write_plots(folder, system, splits: dict, result) -> None:
    """Energy histogram per split, pair-distance histograms and the energy trace of the chains."""
    from zoo.plotting import views
    from zoo.systems.particles import AbstractParticleSystem

    folder = Path(folder)
    name = type(system).__name__
    energies = {k: _batched(system, "energy", v[0]) for k, v in splits.items()}
    views.split_energies(energies, folder / "energy_histogram.png", title=f"{name}: energy per split")
    if isinstance(system, AbstractParticleSystem):
        distances = {k: _batched(system, "pair_distances", v[0]) for k, v in splits.items()}
        views.split_pair_distances(distances, folder / "pair_distance_histogram.png", name=name)
    views.chain_energy_trace(result.trace, result.burn_in, folder / "energy_trace.png", name=name)


__all__ = ["PUBLISHED_LJ13", "generate_data", "statistics", "write_plots"]

"""``tools/generate-data`` entry points for alanine dipeptide (``gin/data_ad2_*.gin``).

``generate.generator`` selects the generator a gin file runs; these two wrap the chunked,
resumable generators of :mod:`zoo.systems.alanine.data` and, once every chunk is done, write the data
set (manifest, splits with forces, diagnostics, plots, README):

- :func:`ad2_classical_md` — unbiased OpenMM Langevin runs at 300 K, one per seed side by
  side, each split in time (train, then val, then test: blocks far apart in time are closer
  to independent than shuffled neighbouring frames), with the φ > 0 fraction and the number
  of entries into that state per split, beside the long reference runs' statistics;
- :func:`ad2_xtb_relaxed` — classical states (from a stored classical set, split by split)
  relaxed by short GFN2-xTB Langevin runs.
"""

from __future__ import annotations

import concurrent.futures
import shutil
from pathlib import Path

import numpy as np

import gin
from zoo import parallel
from zoo._workers import spawn_pool
from zoo.experiments import config
from zoo.storage import ChunkLog
from zoo.systems import alanine
from zoo.systems.alanine import data as alanine_data


def _prepare(workdir: Path, output_dir, resume: bool, caches: tuple[str, ...]) -> Path:
    output_dir = workdir / "dataset" if output_dir is None else Path(output_dir)
    if output_dir.resolve() == workdir.resolve():
        raise ValueError(f"output_dir must differ from the workdir {workdir} (the data set directory is replaced as a whole)")
    if not resume:
        for name in caches:
            shutil.rmtree(workdir / name, ignore_errors=True)
    return output_dir


def _finish(output_dir: Path, manifest_entry: dict, plots: bool) -> dict:
    config.write_operative_config(output_dir)
    if plots:
        write_plots(output_dir)
    summary = describe(manifest_entry)
    (output_dir / "README.md").write_text(summary + "\n")
    return {"directory": str(output_dir), "summary": summary, "ad2": manifest_entry}


@gin.configurable
def ad2_classical_md(
    workdir,
    *,
    output_dir=None,
    n_frames: int = 500_000,
    seeds: tuple[int, ...] = (1,),
    n_workers: int | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    temperature: float = 300.0,
    friction_per_ps: float = 1.0,
    timestep_fs: float = 2.0,
    save_every_ps: float = 1.0,
    equilibration_ps: float = 100.0,
    chunk_frames: int = 1000,
    platform: str = "Reference",
    resume: bool = True,
    max_chunks: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> dict | None:
    """Unbiased classical MD, one run of ``n_frames`` per seed into ``workdir/md_seed<seed>``
    (resumable); the data set when every run is complete.

    The runs go side by side in ``n_workers`` processes (default: one per seed, at most one
    per usable core; OpenMM's Reference platform uses one core), each run a chunk at a time,
    so that a failing run or an interrupt stops the whole within a chunk. Returns None while
    chunks remain (``max_chunks`` bounds the chunks of each run in this call). Every run is
    split in time: its first ``1 - val_fraction - test_fraction`` go to train, then val, then
    test, and each split holds its part of every run in seed order (``source_index``: the
    frame in its run plus ``n_frames`` times the run's place in ``seeds``). ``n_frames`` may
    differ from the runs' earlier calls: runs go on to a larger value, and the data set of a
    smaller one is the first ``n_frames`` of each run (e.g. a short set from longer runs). A cache of the
    single run this generator made before it took seeds (``workdir/md``) is continued as its
    seed's run.
    """
    workdir = Path(workdir)
    seeds = tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be distinct and at least one, got {seeds}")
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) and sum below 1")
    caches = {seed: workdir / f"md_seed{seed}" for seed in seeds}
    _adopt_single_run_cache(workdir, caches)
    output_dir = _prepare(workdir, output_dir, resume, tuple(p.name for p in caches.values()))
    md = dict(
        n_frames=n_frames,
        temperature=temperature,
        friction_per_ps=friction_per_ps,
        timestep_fs=timestep_fs,
        save_every_ps=save_every_ps,
        equilibration_ps=equilibration_ps,
        chunk_frames=chunk_frames,
        platform=platform,
        max_chunks=1,
        log=print if progress else None,
    )
    jobs = [(caches[seed], {**md, "seed": seed}) for seed in seeds]
    n_workers = min(len(seeds), parallel.usable_cpu_cores()) if n_workers is None else n_workers
    pool = None
    if n_workers > 1 and len(jobs) > 1:
        pool = spawn_pool(min(n_workers, len(jobs)))
    try:
        status = _run_chunks(jobs, n_frames, max_chunks, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if any(s is None or s["frames"] < n_frames for s in status):
        return None
    # A run may hold more than n_frames (it was run further): the data set is its first n_frames.
    runs = [alanine_data.collect(caches[seed], n_frames=n_frames) for seed in seeds]
    n_test, n_val = round(test_fraction * n_frames), round(val_fraction * n_frames)
    bounds = {"train": (0, n_frames - n_val - n_test), "val": (n_frames - n_val - n_test, n_frames - n_test), "test": (n_frames - n_test, n_frames)}
    for i, arrays in enumerate(runs):
        arrays["source_index"] = arrays["source_index"] + i * n_frames
    splits = {name: {k: np.concatenate([run[k][a:b] for run in runs]) for k in runs[0]} for name, (a, b) in bounds.items()}
    phi = [alanine_data.phi_psi(run["positions"])[0] for run in runs]
    energies = {"energies": np.concatenate([run["energies"] for run in runs])}
    statistics = alanine_data.classical_statistics(energies, temperature, phi=np.concatenate(phi), n_runs=len(runs))
    meta = {
        "description": (
            f"AD2 classical (ff99SB-ILDN + OBC, 300 K): {len(runs)} unbiased Langevin MD run{'s' if len(runs) > 1 else ''}"
            " (seeds " + ", ".join(map(str, seeds)) + "), each split in time (train, val, test)"
        ),
        "generator": {
            **{k: v for k, v in ChunkLog.existing(caches[seeds[0]]).manifest["params"].items() if k not in ("seed", "n_frames")},
            "seeds": list(seeds),
            "n_frames_per_run": n_frames,
            "frames": len(runs) * n_frames,
            "chunks": sum(s["chunks"] for s in status),
            "failed": sum(s["failed"] for s in status),
            "seconds": sum(s["seconds"] for s in status),
        },
        "statistics": statistics,
        "phi_positive_entries": {
            "all": statistics["phi_positive_entries"],
            **{name: sum(alanine_data.phi_positive_entries(p[a:b]) for p in phi) for name, (a, b) in bounds.items()},
        },
        "simulated_ns": len(runs) * n_frames * save_every_ps / 1000,
    }
    entry = alanine_data.write_dataset(output_dir, splits, meta)
    return _finish(output_dir, entry, plots)


def _run_chunks(jobs, n_frames: int, max_chunks: int | None, pool) -> list[dict | None]:
    """Every run's chunks, at most ``max_chunks`` each; the runs' progress.

    In a pool each run's next chunk is submitted as soon as its last one returns, so a
    faster run never waits for a slower one; one chunk at a time per run, so an error or an
    interrupt stops everything within a chunk. Without a pool the runs take turns.
    """
    status: list[dict | None] = [None] * len(jobs)
    done = [0] * len(jobs)

    def wanted(i: int) -> bool:
        unfinished = status[i] is None or status[i]["frames"] < n_frames
        return unfinished and (max_chunks is None or done[i] < max_chunks)

    def record(i: int, result: dict) -> None:
        status[i] = result
        done[i] += 1

    if pool is None:
        while todo := [i for i in range(len(jobs)) if wanted(i)]:
            for i in todo:
                record(i, _run_classical(jobs[i]))
        return status
    running = {pool.submit(_run_classical, jobs[i]): i for i in range(len(jobs)) if wanted(i)}
    while running:
        finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in finished:
            i = running.pop(future)
            record(i, future.result())
            if wanted(i):
                running[pool.submit(_run_classical, jobs[i])] = i
    return status


def _adopt_single_run_cache(workdir: Path, caches: dict[int, Path]) -> None:
    """Move a cache of the generator's former single run (``workdir/md``) to its seed's folder."""
    single = workdir / "md"
    if not (single / ChunkLog.MANIFEST).is_file():
        return
    seed = ChunkLog.existing(single).manifest["params"].get("seed")
    target = caches.get(seed)
    if target is not None and not target.exists():
        single.rename(target)
        print(f"continuing the run of seed {seed} in {single} as {target}")


def _run_classical(job) -> dict:
    """One seed's MD (:func:`zoo.systems.alanine.data.generate_classical`), in a worker process or here."""
    cache_dir, kwargs = job
    return alanine_data.generate_classical(cache_dir, **kwargs)


@gin.configurable
def ad2_xtb_relaxed(
    workdir,
    *,
    output_dir=None,
    classical_dir: str = str(alanine_data.ASSET_DATA / "ad2_classical"),
    n_train: int = 1800,
    n_val: int = 200,
    n_test: int = 600,
    seed: int = 0,
    time_fs: float = 100.0,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 49.1,
    chunk_states: int = 25,
    n_workers: int = 2,
    resume: bool = True,
    max_chunks: int | None = None,
    progress: bool = True,
    plots: bool = True,
) -> dict | None:
    """GFN2-xTB relaxations of the classical set's states, split by split, into ``workdir/xtb``.

    ``max_chunks`` counts rounds (one chunk of each split per round). Returns None while
    states remain.
    """
    workdir = Path(workdir)
    output_dir = _prepare(workdir, output_dir, resume, ("xtb",))
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    status = alanine_data.generate_xtb_splits(
        workdir / "xtb",
        Path(classical_dir),
        sizes=sizes,
        seed=seed,
        chunk_states=chunk_states,
        max_rounds=max_chunks,
        time_fs=time_fs,
        timestep_fs=timestep_fs,
        friction_per_ps=friction_per_ps,
        n_workers=n_workers,
        log=print if progress else None,
    )
    failed = sum(s["failed"] for s in status.values())
    if any(status[name]["frames"] + status[name]["failed"] < sizes[name] for name in sizes):
        return None
    entry = alanine_data.build_xtb_set(workdir / "xtb", output_dir, meta={"classical_source": str(classical_dir), "failed_relaxations": failed})
    return _finish(output_dir, entry, plots)


def describe(entry: dict) -> str:
    """A few lines on a written AD2 data set: sizes, φ > 0 fractions, energies, entries."""
    lines = [entry.get("description", "alanine dipeptide data set"), ""]
    entries = entry.get("phi_positive_entries", {})
    for name, s in entry["splits"].items():
        extra = f", {entries[name]} entries into φ > 0" if name in entries else ""
        lines.append(f"- {name}: {s['n']} frames, φ > 0 fraction {s['phi_positive_fraction']:.4f}{extra}, u = {s['energy_mean_kbt']:.2f} ± {s['energy_sd_kbt']:.2f} k_BT (mean ± sd)")
    stats = entry.get("statistics")
    if stats:
        ref = stats["reference"]
        lines += [
            "",
            ("Whole run" if stats.get("n_runs", 1) == 1 else f"All {stats['n_runs']} runs")
            + f": ⟨E⟩ = {stats['mean_potential_kj_mol']:.2f}{_error(stats, 'mean_potential_kj_mol_se')} kJ/mol "
            f"(sd {stats['sd_potential_kj_mol']:.2f}), φ > 0 fraction {stats['phi_positive_fraction']:.4f}"
            f"{_error(stats, 'phi_positive_fraction_se')}, {entries.get('all', '?')} entries"
            + (f" (errors from {stats['n_blocks']} blocks in time{' within the runs' if stats.get('n_runs', 1) > 1 else ''})" if "n_blocks" in stats else "")
            + "; "
            f"the long reference runs: ⟨E⟩ = {ref['mean_potential_kj_mol'][0]} / {ref['mean_potential_kj_mol'][1]} kJ/mol "
            f"(sd {ref['sd_potential_kj_mol'][0]} / {ref['sd_potential_kj_mol'][1]}), φ > 0 fraction "
            f"{ref['phi_positive_fraction'][0]} / {ref['phi_positive_fraction'][1]}"
            + (f", {ref['phi_positive_entries'][0]} / {ref['phi_positive_entries'][1]} entries" if "phi_positive_entries" in ref else "")
            + " (164 / 165 ns).",
        ]
    return "\n".join(lines)


def _error(stats: dict, key: str) -> str:
    return f" ± {stats[key]:.2g}" if key in stats else ""


def write_plots(output_dir: Path) -> None:
    """Ramachandran map and energy histogram per split, under ``output_dir/plots``."""
    from zoo.plotting import views

    folder = Path(output_dir) / "plots"
    splits = {name: alanine_data.read_arrays(output_dir, name) for name in alanine_data.SPLITS}
    views.split_ramachandran({name: alanine_data.phi_psi(arrays["positions"]) for name, arrays in splits.items()}, folder / "ramachandran.png")
    energies = {name: arrays["energies"] for name, arrays in splits.items() if "energies" in arrays}
    views.split_energies(energies, folder / "energy_histogram.png", title=f"{alanine.N_ATOMS}-atom alanine dipeptide: energy per split")

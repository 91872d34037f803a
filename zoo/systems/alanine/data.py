r"""Alanine dipeptide data: stored splits, and the classical and xTB generators.

Stored format: the project's data-set directory (:mod:`zoo.storage`, ``manifest.json`` +
zarr arrays ``<split>/positions`` and ``<split>/forces`` of shape (n, 22, 3) float32, each
checked against its sha256), read by ``zoo.data.stored_dataset`` (gin: ``@stored_dataset``) like every other set.
The AD2 sets add, per split, ``<split>/energies`` (n,) u in k_BT and
``<split>/source_index`` (n,) (frame of the source run, int64; float32 in sets written before), listed with
their sha256 under the manifest's ``extra_arrays``, and an ``ad2`` entry (units,
provenance, per-split sizes, φ > 0 fractions, energy statistics).

Units: positions in nm, particle-major in the atom order of
``assets/ad2/alanine-dipeptide.pdb``, centred (geometric centre at the origin, the
subspace of ``MeanFreeNormal``; the energy is translation invariant); forces −∇u in k_BT/nm;
energies u in k_BT at 300 K.

Generators (for ``tools/generate-data``), both chunked and resumable — a cache directory
is a :class:`zoo.storage.ChunkLog` (``progress.json`` with the parameters and the chunks
done, ``chunk_#####.npz``); calling again with the same parameters continues where the last
call stopped, different parameters raise ``RunStateError`` (a ``ValueError``):

- :func:`generate_classical` — OpenMM Langevin MD (ff99SB-ILDN + OBC, 300 K, friction
  1/ps, 2 fs, a frame with forces every 1 ps);
- :func:`generate_xtb` — states drawn from a classical set, each relaxed by a short
  GFN2-xTB Langevin run (:func:`baoab_relax`), final frame with forces kept;
  :func:`generate_xtb_splits` runs it for train/val/test round-robin;
- :func:`collect` gathers a cache into arrays, :func:`write_dataset` stores splits,
  :func:`build_classical_small_set` makes the shipped classical set, :func:`build_xtb_set` an
  xTB set (the shipped one, or the cache's full one from `tools/generate-data`).
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from zoo import resources
from zoo.data import SPLITS
from zoo.data.mcmc import block_mean_and_error
from zoo.errors import ZooError
from zoo.storage import ChunkLog, RunStateError
from zoo.systems import alanine
from zoo.systems.alanine.engines import XTBEngine, kbt_kj_per_mol, openmm_system, xtb_pool

ASSET_DATA = resources.ASSETS / "data"
FIELDS = ("positions", "forces", "energies", "source_index")
EXTRA_ARRAYS = ("energies", "source_index")
# amu, IUPAC standard atomic weights (conventional values)
MASSES = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999}


# ---------------------------------------------------------------------------------------
# Storage


def centre(positions: np.ndarray) -> np.ndarray:
    """Positions (n, 22, 3) or (n, 66) with the geometric centre of each frame moved to 0."""
    p = np.asarray(positions)
    shaped = p.reshape(p.shape[0], -1, 3)
    return (shaped - shaped.mean(axis=1, keepdims=True)).reshape(p.shape)


def write_dataset(path, splits: Mapping[str, Mapping[str, np.ndarray]], meta: Mapping | None = None, *, system=None) -> dict:
    """Store splits {split: {positions, forces, energies[, source_index]}} as a zoo data set.

    Positions are centred; ``system`` (default: the classical target) is recorded in the
    manifest. Returns the ``ad2`` manifest entry: ``meta`` plus per-split sizes, φ > 0
    fractions and energy statistics.
    """
    from zoo import storage

    path = Path(path)
    system = alanine.AlanineDipeptideClassical() if system is None else system
    n_atoms = alanine.N_ATOMS
    prepared, extras = {}, {}
    info = dict(meta or {})
    info.setdefault("units", {"positions": "nm, centred", "forces": "k_BT/nm (-grad u)", "energies": "k_BT", "temperature_K": 300.0})
    info["splits"] = {}
    for name in SPLITS:
        arrays = splits[name]
        n = len(arrays["positions"])
        pos = centre(np.asarray(arrays["positions"], np.float64).reshape(n, n_atoms, 3)).astype(np.float32)
        prepared[name] = (pos, np.asarray(arrays["forces"], np.float32).reshape(n, n_atoms, 3))
        extras[name] = {
            "energies": np.asarray(arrays["energies"], np.float32).reshape(n),
            "source_index": np.asarray(arrays.get("source_index", np.arange(n)), np.int64).reshape(n),
        }
        phi = phi_psi(pos)[0]
        info["splits"][name] = {
            "n": n,
            "phi_positive_fraction": float(np.mean(phi > 0)),
            "energy_mean_kbt": float(extras[name]["energies"].mean()),
            "energy_sd_kbt": float(extras[name]["energies"].std()),
        }
    storage.write_dataset(path, prepared, system=system)
    listed = {}
    for name, arrays in extras.items():
        for field, arr in arrays.items():
            storage.write_array(path / name / field, arr)
            listed[f"{name}/{field}"] = {"shape": list(arr.shape), "sha256": storage.array_sha256(arr, storage.stored_dtype(arr))}
    storage.update_manifest(path, ad2=info, extra_arrays=listed)
    return info


def read_arrays(path, split: str) -> dict[str, np.ndarray]:
    """One stored split as flat arrays: positions, forces (n, 66); energies, source_index (n,)."""
    from zoo import storage

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(path)
    manifest = storage.read_manifest(path)
    positions, forces = storage.read_split(path, split, manifest=manifest)
    n = len(positions)
    out = {"positions": positions.reshape(n, -1), "forces": None if forces is None else forces.reshape(n, -1)}
    for field in EXTRA_ARRAYS:
        entry = manifest.get("extra_arrays", {}).get(f"{split}/{field}")
        if entry is None:
            continue
        arr = storage.read_array(path / split / field)
        if storage.array_sha256(arr, storage.stored_dtype(arr)) != entry["sha256"]:
            raise storage.DatasetError(f"array {path / split / field} does not match its sha256 in the manifest")
        out[field] = arr.astype(np.int64) if field == "source_index" else arr
    return out


def phi_psi(positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(φ, ψ) in radians of a NumPy batch (n, 66) or (n, 22, 3), via the JAX dihedral code."""
    import jax

    x = np.asarray(positions, np.float64).reshape(-1, 3 * alanine.N_ATOMS)
    phi, psi = jax.jit(jax.vmap(alanine.dihedrals))(x)
    return np.asarray(phi), np.asarray(psi)


# ---------------------------------------------------------------------------------------
# Resumable chunked runs


def collect(cache_dir, fields=FIELDS, *, n_frames: int | None = None) -> dict[str, np.ndarray]:
    """Concatenate the chunks of a generator cache: positions (n, 22, 3) nm, forces, energies, ...;
    with ``n_frames``, the run's first frames only (the chunks past them are not read)."""
    return ChunkLog.existing(cache_dir).concatenate(fields, length=n_frames)


def progress(cache_dir) -> dict:
    """Chunks done, frames done, failures and compute seconds of a generator cache."""
    log = ChunkLog.existing(cache_dir)
    n = sum(int(log.load(k, ("energies",))["energies"].shape[0]) for k in range(log.n_chunks))
    return {"chunks": log.n_chunks, "frames": n, "failed": len(log.manifest["failed"]), "seconds": log.seconds}


# ---------------------------------------------------------------------------------------
# Classical MD (OpenMM)


class SimulationError(ZooError, RuntimeError):
    """A molecular-dynamics run that produced non-finite energies, forces or positions."""


def generate_classical(
    cache_dir,
    *,
    n_frames: int,
    seed: int = 1,
    temperature: float = 300.0,
    friction_per_ps: float = 1.0,
    timestep_fs: float = 2.0,
    save_every_ps: float = 1.0,
    equilibration_ps: float = 100.0,
    chunk_frames: int = 1000,
    platform: str = "Reference",
    max_chunks: int | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    r"""Unbiased Langevin MD of AD2 with OpenMM, saved with forces; chunked and resumable.

    ff99SB-ILDN + OBC, no cutoff, no constraints, ``LangevinMiddleIntegrator`` at
    ``temperature`` with the given friction and step; minimised, equilibrated for
    ``equilibration_ps``, then one frame every ``save_every_ps``. Each chunk of
    ``chunk_frames`` frames stores positions (nm), forces −∇u (k_BT/nm), energies u (k_BT)
    and the final positions and velocities; every chunk starts a fresh Context from those
    with a chunk-indexed random seed, so an interrupted and resumed run produces the same
    frames as an uninterrupted one. ``max_chunks`` bounds the chunks done by this call.
    ``n_frames`` is the run's length, not part of what it is: a cache run to fewer frames
    continues to more (from its last full chunk), one run further keeps its extra frames.
    A frame with a non-finite energy, force or position stops the run with
    :class:`SimulationError` naming the chunk; the chunks before it stay.
    Returns :func:`progress`; compare a finished run with :func:`classical_statistics`.
    """
    import openmm
    import openmm.unit as unit

    params = {
        "kind": "classical",
        "n_frames": n_frames,
        "seed": seed,
        "temperature": temperature,
        "friction_per_ps": friction_per_ps,
        "timestep_fs": timestep_fs,
        "save_every_ps": save_every_ps,
        "equilibration_ps": equilibration_ps,
        "chunk_frames": chunk_frames,
        "forcefield": ["amber99sbildn.xml", "amber99_obc.xml"],
    }
    # n_frames is the run's length: a finished run goes on to a larger one; a smaller one ends it there.
    cache = ChunkLog(cache_dir, params, length_keys=("n_frames",))
    n_chunks = math.ceil(n_frames / chunk_frames)
    if 0 < cache.n_chunks < n_chunks and cache.load(-1, ("energies",))["energies"].shape[0] < chunk_frames:
        cache.close()
        raise RunStateError(
            f"{cache.dir} ends in a short chunk (a run of n_frames not a multiple of chunk_frames={chunk_frames}): "
            f"it cannot be lengthened to {n_frames} frames; use another directory"
        )
    steps_per_frame = round(save_every_ps * 1000 / timestep_fs)
    if not math.isclose(steps_per_frame * timestep_fs, save_every_ps * 1000):
        raise ValueError(f"save_every_ps={save_every_ps} is not a whole number of {timestep_fs} fs steps")
    kbt = kbt_kj_per_mol(temperature)
    kj, kj_nm = unit.kilojoule_per_mole, unit.kilojoule_per_mole / unit.nanometer

    # Given up when this call ends, so that another process (a worker of ad2_classical_md) may continue the run.
    try:
        topology, system = openmm_system(str(alanine.PDB_PATH), tuple(params["forcefield"]))
        done_here = 0
        while cache.n_chunks < n_chunks and (max_chunks is None or done_here < max_chunks):
            k = cache.n_chunks
            integrator = openmm.LangevinMiddleIntegrator(
                temperature * unit.kelvin, friction_per_ps / unit.picosecond, timestep_fs * unit.femtosecond
            )
            # 0 would mean "pick a random seed"; keep every chunk reproducible and distinct.
            integrator.setRandomNumberSeed(1 + seed * 100_003 + k)
            context = openmm.Context(system, integrator, openmm.Platform.getPlatformByName(platform))
            t0 = time.perf_counter()
            if k == 0:
                context.setPositions(openmm.app.PDBFile(str(alanine.PDB_PATH)).positions)
                openmm.LocalEnergyMinimizer.minimize(context)
                context.setVelocitiesToTemperature(temperature * unit.kelvin, 1 + seed)
                integrator.step(round(equilibration_ps * 1000 / timestep_fs))
            else:
                last = cache.load(k - 1)
                context.setPositions(last["final_positions"])
                context.setVelocities(last["final_velocities"])
            n = min(chunk_frames, n_frames - k * chunk_frames)
            pos = np.empty((n, alanine.N_ATOMS, 3))
            frc = np.empty_like(pos)
            ene = np.empty(n)
            for i in range(n):
                integrator.step(steps_per_frame)
                state = context.getState(getPositions=True, getEnergy=True, getForces=True)
                pos[i] = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)
                frc[i] = state.getForces(asNumpy=True).value_in_unit(kj_nm) / kbt
                ene[i] = state.getPotentialEnergy().value_in_unit(kj) / kbt
                # The Reference platform integrates NaN coordinates without complaint: stop at
                # the first bad frame instead of storing a chunk (and a run) of them.
                finite_positions = np.isfinite(pos[i]).all()
                if not (np.isfinite(ene[i]) and finite_positions and np.isfinite(frc[i]).all()):
                    raise SimulationError(
                        f"the classical MD of seed {seed} blew up in chunk {k + 1}/{n_chunks}, frame {i + 1} of {n} "
                        f"({(k * chunk_frames + i + 1) * save_every_ps:g} ps into the run): potential energy {ene[i]:.6g} k_BT, "
                        f"{'finite' if finite_positions else 'non-finite'} positions. The {k} chunks before it are kept in "
                        f"{cache.dir}; a rerun repeats this chunk exactly (its random seed is fixed), so change the "
                        "integrator (ad2_classical_md.timestep_fs, friction_per_ps) in a new workdir"
                    )
            state = context.getState(getPositions=True, getVelocities=True)
            arrays = {
                "positions": pos.astype(np.float32),
                "forces": frc.astype(np.float32),
                "energies": ene.astype(np.float32),
                "source_index": np.arange(k * chunk_frames, k * chunk_frames + n),
                "final_positions": state.getPositions(asNumpy=True).value_in_unit(unit.nanometer),
                "final_velocities": state.getVelocities(asNumpy=True).value_in_unit(unit.nanometer / unit.picosecond),
            }
            seconds = time.perf_counter() - t0
            cache.append(arrays, seconds=seconds)
            done_here += 1
            if log:
                log(f"classical chunk {k + 1}/{n_chunks}: {n} frames in {seconds:.1f} s ({cache.dir})")
    finally:
        cache.close()
    return progress(cache.dir)


# Statistics of the two long reference runs (OpenMM 8.6.1, same force field and integrator,
# 164 and 165 ns, frames every 4 ps): the classical generator should reproduce them.
CLASSICAL_REFERENCE = {
    "mean_potential_kj_mol": (-59.38, -59.41),
    "sd_potential_kj_mol": (13.57, 13.61),
    "phi_positive_fraction": (0.0268, 0.0168),  # rare state: uncertain
    # Transitions into the φ > 0 basin core (phi_positive_entries below, on the
    # 4-ps frames; the runs' own summaries count 20 and 19 "entries", recrossings included).
    "phi_positive_entries": (2, 4),
}


#: Cores of the two φ basins, in rad, for counting transitions: φ > 0 (αL / C7ax, around
#: φ ≈ 1) and the rest (C7eq / β / αR, φ < 0 and the β basin's wrap to φ ≈ +π). Frames
#: between the cores keep the last core's state, so recrossings of φ = 0 count once.
PHI_POSITIVE_CORE = (0.2, 1.8)
PHI_NEGATIVE_CORE = (-0.2, 2.5)  # φ < −0.2 or φ > 2.5


def phi_positive_entries(phi: np.ndarray) -> int:
    """Transitions into the φ > 0 basin along a trajectory: arrivals in its core from the other core.

    A whole transition can fit between two 1-ps frames (φ = −2.2 → 1.2 was seen), so a
    step's size says nothing about wraps; instead the β basin's excursions to φ ≈ +π lie in
    the other core and are no entry.
    """
    phi = np.asarray(phi)
    in_positive = (phi > PHI_POSITIVE_CORE[0]) & (phi < PHI_POSITIVE_CORE[1])
    in_negative = (phi < PHI_NEGATIVE_CORE[0]) | (phi > PHI_NEGATIVE_CORE[1])
    entries, state = 0, None
    for pos, neg in zip(in_positive, in_negative):
        if pos and state == "negative":
            entries += 1
        if pos or neg:
            state = "positive" if pos else "negative"
    return entries


def classical_statistics(
    arrays: Mapping[str, np.ndarray], temperature: float = 300.0, n_blocks: int = 20, *, phi: np.ndarray | None = None, n_runs: int = 1
) -> dict:
    """Mean and sd of the potential energy (kJ/mol), the φ > 0 fraction and the entries into
    that state of MD in time order, beside the reference runs.

    ``arrays`` has ``energies`` (u in k_BT) and ``positions`` (n, 22, 3) or (n, 66) nm,
    e.g. :func:`collect` of a :func:`generate_classical` cache, or ``n_runs`` independent
    runs of equal length one after the other. The errors (``*_se``) come from contiguous
    blocks in time, ``n_blocks // n_runs`` within each run (at least one, at most a frame
    each; the returned ``n_blocks`` is the number used) (:func:`zoo.data.mcmc.block_mean_and_error`); the φ > 0 fraction's is only as good as the
    number of entries is large (a block with no visit says little about the next). Entries
    are counted within each run. ``sem_potential_kj_mol_uncorrelated`` ignores the
    correlation of neighbouring frames, a lower bound kept for comparison. ``phi`` is the
    φ series if the caller has it already (:func:`phi_psi` of the positions otherwise).
    """
    e = np.asarray(arrays["energies"], np.float64) * kbt_kj_per_mol(temperature)
    phi = phi_psi(arrays["positions"])[0] if phi is None else np.asarray(phi)
    if n_runs < 1 or len(e) % n_runs:
        raise ValueError(f"{len(e)} frames cannot be {n_runs} runs of equal length")
    run_length = len(e) // n_runs
    # A short run: one frame a block; several runs: at least one block each.
    blocks_per_run = max(1, min(n_blocks // n_runs, run_length))
    mean_e, se_e = block_mean_and_error(e.reshape(n_runs, run_length), blocks_per_run)
    fraction, se_fraction = block_mean_and_error((phi > 0).astype(np.float64).reshape(n_runs, run_length), blocks_per_run)
    return {
        "n": int(len(e)),
        "n_runs": n_runs,
        "mean_potential_kj_mol": mean_e,
        "mean_potential_kj_mol_se": se_e,
        "sem_potential_kj_mol_uncorrelated": float(e.std(ddof=1) / math.sqrt(len(e))),
        "sd_potential_kj_mol": float(e.std(ddof=1)),
        "phi_positive_fraction": fraction,
        "phi_positive_fraction_se": se_fraction,
        "phi_positive_entries": sum(phi_positive_entries(run) for run in phi.reshape(n_runs, run_length)),
        "n_blocks": blocks_per_run * n_runs,
        "reference": CLASSICAL_REFERENCE,
    }


# ---------------------------------------------------------------------------------------
# GFN2-xTB relaxation


def masses() -> np.ndarray:
    """Atomic masses (22,) in amu (g/mol) in the PDB atom order."""
    return np.array([MASSES[e] for e in alanine.ELEMENTS])


def baoab_relax(
    engine: XTBEngine,
    positions: np.ndarray,
    rng: np.random.Generator,
    *,
    time_fs: float = 100.0,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 49.1,
) -> tuple[np.ndarray, float, np.ndarray]:
    r"""Langevin dynamics (BAOAB) on the engine's potential from one configuration (22, 3) nm.

    Units nm, ps, amu, kJ/mol, so F/m is in nm/ps². With c = exp(−γΔt), one step is
    v += ΔtF/2m; x += Δt v/2; v ← c v + √((1−c²) k_BT/m) ξ; x += Δt v/2; F ← F(x); v += ΔtF/2m.
    Velocities start from Maxwell–Boltzmann at the engine's temperature. Each SCF starts
    from the previous step's wavefunction (falls back to a fresh guess if that fails).
    Returns the final (positions nm, energy kJ/mol, forces kJ/(mol·nm)); raises
    ``RuntimeError`` if the engine fails twice or the state becomes non-finite.
    """
    m = masses()[:, None]
    kbt = kbt_kj_per_mol(engine.temperature)
    dt = timestep_fs * 1e-3
    c1 = math.exp(-friction_per_ps * dt)
    c2 = math.sqrt(1.0 - c1 * c1)
    sigma = np.sqrt(kbt / m)
    x = np.array(positions, np.float64).reshape(alanine.N_ATOMS, 3)
    v = sigma * rng.standard_normal(x.shape)

    restart = None

    def force(x):
        nonlocal restart
        try:
            e, f, restart = engine.singlepoint(x, restart)
        except Exception:
            e, f, restart = engine.singlepoint(x)  # a stale wavefunction can stall the SCF
        if not (np.isfinite(e) and np.isfinite(f).all()):
            raise RuntimeError("non-finite xTB energy or force during relaxation")
        return e, f

    e, f = force(x)
    for _ in range(round(time_fs / timestep_fs)):
        v += 0.5 * dt * f / m
        x += 0.5 * dt * v
        v = c1 * v + c2 * sigma * rng.standard_normal(x.shape)
        x += 0.5 * dt * v
        e, f = force(x)
        v += 0.5 * dt * f / m
    return x, e, f


def _relax_state(args) -> tuple[int, tuple | None]:
    """Worker: relax one (state index, positions, seed); (index, (positions, energy, forces)), or (index, None) if it failed."""
    engine, (index, x0, seed), relax_kwargs = args
    try:
        return index, baoab_relax(engine, x0, np.random.default_rng(seed), **relax_kwargs)
    except Exception:  # an SCF that fails twice or a blown-up state: skip and record it
        return index, None


def generate_xtb(
    cache_dir,
    source_positions: np.ndarray,
    *,
    n_states: int,
    seed: int = 0,
    time_fs: float = 100.0,
    timestep_fs: float = 1.0,
    friction_per_ps: float = 49.1,
    temperature: float = 300.0,
    chunk_states: int = 50,
    n_workers: int = 1,
    max_chunks: int | None = None,
    energy_offset: float = alanine.XTB_ENERGY_OFFSET_HARTREE,
    log: Callable[[str], None] | None = print,
    pool: concurrent.futures.Executor | None = None,
) -> dict:
    r"""GFN2-xTB relaxations of randomly chosen classical states; chunked and resumable.

    ``n_states`` indices are drawn without replacement (seeded) from ``source_positions``
    (n, 66) or (n, 22, 3) nm; each state is relaxed by :func:`baoab_relax` for ``time_fs``
    (defaults: 100 fs, 1 fs steps, friction 49.1/ps = 0.5 in ASE's time unit, our reading
    of the reference set's "0.5 a.u."); the final configuration is stored with forces
    (k_BT/nm) and u = (E − offset)/k_BT. A state whose relaxation fails is recorded in the
    manifest and skipped. ``n_workers`` > 1 spawned processes (one OpenMP thread each)
    share a chunk; 0 or 1 runs in this process (set ``OMP_NUM_THREADS=1`` to keep it on one
    core). ``max_chunks`` bounds this call. ``pool``: open xTB workers (:func:`xtb_pool`) to use
    instead of starting ``n_workers`` for this call, as :func:`generate_xtb_splits` does between
    its one-chunk calls (starting two workers costs ~2 s, a tenth of a 25-state chunk). Returns
    :func:`progress`.
    """
    src = np.asarray(source_positions, np.float64).reshape(-1, alanine.N_ATOMS, 3)
    if n_states > len(src):
        raise ValueError(f"asked for {n_states} states but the source has {len(src)} frames")
    params = {
        "kind": "xtb",
        "n_states": n_states,
        "seed": seed,
        "source_frames": len(src),
        "source_checksum": float(np.round(src.sum(dtype=np.float64), 6)),
        "time_fs": time_fs,
        "timestep_fs": timestep_fs,
        "friction_per_ps": friction_per_ps,
        "temperature": temperature,
        "chunk_states": chunk_states,
        "energy_offset_hartree": energy_offset,
        "method": "GFN2-xTB",
    }
    cache = ChunkLog(cache_dir, params)
    order = np.random.default_rng(seed).choice(len(src), n_states, replace=False)
    n_chunks = math.ceil(n_states / chunk_states)
    engine = XTBEngine(alanine.ATOMIC_NUMBERS, energy_offset=energy_offset, n_workers=0, temperature=temperature)
    kbt = kbt_kj_per_mol(temperature)
    relax_kwargs = {"time_fs": time_fs, "timestep_fs": timestep_fs, "friction_per_ps": friction_per_ps}

    own_pool = pool is None and n_workers > 1
    if own_pool:
        pool = xtb_pool(n_workers)
    try:
        done_here = 0
        while cache.n_chunks < n_chunks and (max_chunks is None or done_here < max_chunks):
            k = cache.n_chunks
            idx = order[k * chunk_states : (k + 1) * chunk_states]
            # Per-state seeds: a state's trajectory does not depend on chunking or workers.
            items = [(int(i), src[i], [seed, int(i)]) for i in idx]
            t0 = time.perf_counter()
            # One task per state: a pool's workers, however many, take the next state as they
            # finish, so uneven relaxation times do not leave a core idle; without one, they run here.
            run = map if pool is None else pool.map
            outcomes = list(run(_relax_state, [(engine, item, relax_kwargs) for item in items]))
            results = sorted(((index, *relaxed) for index, relaxed in outcomes if relaxed is not None), key=lambda r: r[0])
            failed = [index for index, relaxed in outcomes if relaxed is None]
            arrays = {
                "positions": np.array([r[1] for r in results], np.float32).reshape(-1, alanine.N_ATOMS, 3),
                "forces": (np.array([r[3] for r in results]) / kbt).astype(np.float32).reshape(-1, alanine.N_ATOMS, 3),
                "energies": (np.array([r[2] for r in results]) / kbt).astype(np.float32),
                "source_index": np.array([r[0] for r in results], np.int64),
            }
            seconds = time.perf_counter() - t0
            cache.append(arrays, seconds=seconds, failed=failed)
            done_here += 1
            if log:
                log(
                    f"xtb chunk {k + 1}/{n_chunks}: {len(results)} states relaxed, {len(failed)} failed, "
                    f"{seconds:.1f} s ({cache.dir})"
                )
    finally:
        if own_pool:
            pool.shutdown()
    return progress(cache.dir)


def generate_xtb_splits(
    cache_root,
    classical_dir=ASSET_DATA / "ad2_classical",
    *,
    sizes: Mapping[str, int] = (("train", 1800), ("val", 200), ("test", 600)),
    seed: int = 0,
    chunk_states: int = 25,
    max_rounds: int | None = None,
    **kwargs,
) -> dict:
    """xTB relaxations for train/val/test, each drawn from the same split of a classical set.

    Splits advance round-robin, one chunk each per round, so a run stopped early still has
    all three splits; every split has its own resumable cache ``cache_root/<split>`` and
    seed ``seed + k`` (k its position in train/val/test). Other keywords go to
    :func:`generate_xtb`. Returns {split: progress}.
    """
    sizes = dict(sizes)
    cache_root = Path(cache_root)
    sources = {name: read_arrays(classical_dir, name)["positions"] for name in sizes}
    # One pool for all the rounds: each call below relaxes one chunk.
    pool = xtb_pool(kwargs["n_workers"]) if kwargs.get("n_workers", 1) > 1 else None
    rounds = 0
    try:
        while max_rounds is None or rounds < max_rounds:
            busy = False
            for k, name in enumerate(SPLITS):
                if name not in sizes:
                    continue
                before = _chunks_done(cache_root / name)
                generate_xtb(
                    cache_root / name,
                    sources[name],
                    n_states=sizes[name],
                    seed=seed + k,
                    chunk_states=chunk_states,
                    max_chunks=1,
                    pool=pool,
                    **kwargs,
                )
                busy |= _chunks_done(cache_root / name) > before
            rounds += 1
            if not busy:
                break
    finally:
        if pool is not None:
            pool.shutdown()
    return {name: progress(cache_root / name) for name in sizes}


def _chunks_done(cache_dir: Path) -> int:
    return ChunkLog.existing(cache_dir).n_chunks if (Path(cache_dir) / ChunkLog.MANIFEST).exists() else 0


# ---------------------------------------------------------------------------------------
# Writing the sets (the shipped small ones; the xTB writer also makes the full set)


def build_classical_small_set(
    train_run: str | Path,
    test_run: str | Path,
    out_dir=ASSET_DATA / "ad2_classical",
    *,
    n_train: int = 2000,
    n_val: int = 500,
    n_test: int = 1000,
    temperature: float = 300.0,
) -> dict:
    r"""Subsample two stored MD runs (npz: positions (n, 22, 3) nm, energy (n,) kJ/mol).

    Frames are evenly spaced over each run; from ``train_run`` every fifth of the
    ``n_train + n_val`` picks goes to val (val interleaves train in time), ``test_run``
    gives test. Forces are recomputed with OpenMM; the recomputed energies are checked
    against the stored ones and the largest difference (kJ/mol) goes into the meta.
    """
    from zoo.systems.alanine.engines import OpenMMEngine

    engine = OpenMMEngine(str(alanine.PDB_PATH), alanine.N_ATOMS, temperature=temperature)
    kbt = kbt_kj_per_mol(temperature)
    splits, checks = {}, {}
    for run, picks in ((train_run, {"train": n_train, "val": n_val}), (test_run, {"test": n_test})):
        data = np.load(run)
        n_total = sum(picks.values())
        idx = np.linspace(0, len(data["positions"]) - 1, n_total).round().astype(int)
        if "val" in picks:
            is_val = np.zeros(n_total, bool)
            is_val[np.linspace(0, n_total - 1, picks["val"]).round().astype(int)] = True
            chosen = {"train": idx[~is_val], "val": idx[is_val]}
        else:
            chosen = {"test": idx}
        for name, ii in chosen.items():
            x = data["positions"][ii].astype(np.float64)
            e, f, failed = engine.energies_and_forces_kj(x)
            if failed.any():
                raise RuntimeError(f"OpenMM failed on {int(failed.sum())} stored frames of {run}")
            checks[name] = float(np.abs(e - data["energy"][ii]).max())
            splits[name] = {"positions": x, "forces": f / kbt, "energies": e / kbt, "source_index": ii}
    meta = {
        "description": "AD2 classical (ff99SB-ILDN + OBC, 300 K) small set: unbiased MD subsampled, forces by OpenMM",
        "source": {
            "train_val": Path(train_run).name,
            "test": Path(test_run).name,
            "md": "LangevinMiddleIntegrator 300 K, friction 1/ps, 2 fs, frames kept every 4 ps, OpenMM 8.6.1",
        },
        "max_abs_energy_difference_kj_mol": checks,
    }
    return write_dataset(out_dir, splits, meta)


def build_xtb_set(cache_root, out_dir=ASSET_DATA / "ad2_xtb", *, meta: Mapping | None = None) -> dict:
    """Write an xTB data set (the shipped small one, or the cache's full one) from ``cache_root/{train,val,test}`` generator caches."""
    cache_root = Path(cache_root)
    splits, params = {}, {}
    for name in SPLITS:
        arrays = collect(cache_root / name)
        if not arrays:
            raise ValueError(f"{cache_root / name} has no finished chunk yet")
        splits[name] = arrays
        params[name] = {**ChunkLog.existing(cache_root / name).manifest["params"], **progress(cache_root / name)}
    full = {
        "description": "AD2 GFN2-xTB (tblite): classical states relaxed by short xTB Langevin runs",
        "generator": params,
        "units": {
            "positions": "nm, centred",
            "forces": "k_BT/nm (-grad u)",
            "energies": f"k_BT, u = (E - ({alanine.XTB_ENERGY_OFFSET_HARTREE}) Hartree)/k_BT",
            "temperature_K": 300.0,
        },
        **(meta or {}),
    }
    return write_dataset(out_dir, splits, full, system=alanine.AlanineDipeptideXTB())

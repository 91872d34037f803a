"""Data in the formats the field publishes, read into zoo's layout with every convention checked.

- **Coordinate arrays** (``.npy``, or ``.npz`` with one array or an ``x``/``positions``
  entry): (n, N·d) flat, as the equivariant-flow-matching DW4/LJ13/LJ55 sets are
  distributed, or (n, N, d). Any other layout is refused (never reshaped). Molecular
  arrays need their length unit declared (``nm`` or ``angstrom``; zoo works in nm).
- **Trajectories** (anything mdtraj reads: ``.dcd``, ``.xtc``, ``.trr``, ``.h5``,
  ``.pdb``, ...) with a topology file when the format has none; the atoms must be the
  target's, in its order (element and name), or the error names the first that is not.
- Particle configurations are moved to their centre of mass (the flows live on the
  centre-of-mass-free subspace; the energy is translation invariant), and how far off
  they were is reported.
- Forces F = −∇u are computed with the target's energy (files rarely carry them in zoo's
  units, k_BT per length unit).

:func:`imported_dataset` is the gin data source (``make_dataset.dataset =
@imported_dataset``); ``tools/import-data`` writes the same as a stored data set.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from zoo.data import SPLITS, Dataset, DatasetError, as_event_batch, make_split
from zoo.systems.particles import AbstractParticleSystem

#: Length units a molecular array may be declared in, as factors to nm.
LENGTH_UNITS = {"nm": 1.0, "angstrom": 0.1}
ARRAY_SUFFIXES = (".npy", ".npz")


def _read_array(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path)
    with np.load(path) as archive:
        for name in ("x", "positions", "xyz", "coordinates"):
            if name in archive.files:
                return archive[name]
        if len(archive.files) == 1:
            return archive[archive.files[0]]
        raise DatasetError(f"{path} holds {archive.files}; name the positions 'x' or 'positions'")


def _check_atoms(system, topology, where: str) -> None:
    expected = system.topology()
    got = [(a.element.symbol if a.element else "?", a.name) for a in topology.atoms]
    want = [(a.element.symbol if a.element else "?", a.name) for a in expected.atoms]
    if len(got) != len(want):
        raise DatasetError(f"{where} has {len(got)} atoms; {type(system).__name__} has {len(want)}")
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise DatasetError(
                f"{where}: atom {i} is {g[0]} {g[1]!r} but {type(system).__name__} expects {w[0]} {w[1]!r} "
                "(same atoms in the target's order are needed; reorder the file)"
            )


def read_positions(path, system, *, length_unit: str | None = None, topology=None) -> tuple[np.ndarray, dict]:
    """Positions (n, *event_shape) in the target's units from ``path``, and what was done to them.

    ``length_unit`` is required for molecular arrays; ``topology`` (a file mdtraj reads) for
    trajectory formats without one. Returns (positions, report) where the report says the
    file, the count, the unit and, for particles, the largest centre-of-mass offset removed.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"no file {path}")
    shape = tuple(system.event_shape)
    molecular = system.topology() is not None
    report: dict = {"file": str(path)}
    if path.suffix in ARRAY_SUFFIXES:
        x = as_event_batch(_read_array(path), shape, f"positions in {path}")
        if molecular:
            if length_unit not in LENGTH_UNITS:
                raise DatasetError(
                    f"{path} is a bare array of molecular coordinates: declare its length unit "
                    f"({' or '.join(LENGTH_UNITS)}), got {length_unit!r}"
                )
            x = x * LENGTH_UNITS[length_unit]
            report["length_unit"] = length_unit
    else:
        if not molecular:
            raise DatasetError(f"{path}: trajectories need a molecular target; give {type(system).__name__} positions as .npy")
        import mdtraj

        try:
            trajectory = mdtraj.load(str(path), top=None if topology is None else str(topology))
        except (OSError, ValueError, TypeError) as err:
            hint = "" if topology is not None else " (formats without atoms need a topology file)"
            raise DatasetError(f"mdtraj cannot read {path}: {err}{hint}") from None
        _check_atoms(system, trajectory.topology, str(path))
        x = trajectory.xyz.astype(np.float32)  # mdtraj works in nm
        report["length_unit"] = "nm (mdtraj)"
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x.reshape(len(x), -1))).any(axis=1).sum())
        raise DatasetError(f"{path}: {bad} of {len(x)} configurations contain NaN or inf")
    if isinstance(system, AbstractParticleSystem):
        com = x.mean(axis=1, keepdims=True)
        report["max_centre_of_mass_offset"] = float(np.abs(com).max())
        x = x - com
    report["count"] = int(len(x))
    return np.asarray(x, np.float32), report


def forces_of(system, x: np.ndarray, chunk_size: int = 1024) -> np.ndarray:
    """F = −∇u (n, *event_shape) of the target at positions x (n, *event_shape)."""
    flat = np.asarray(x, np.float32).reshape(len(x), -1)
    if hasattr(system, "energies_and_forces"):  # engine-backed molecules: host batches
        return np.asarray(system.energies_and_forces(flat)[1], np.float32).reshape(x.shape)
    force = jax.jit(jax.vmap(system.force))
    parts = [np.asarray(force(flat[i : i + chunk_size])) for i in range(0, len(flat), chunk_size)]
    return np.concatenate(parts).astype(np.float32).reshape(x.shape)


def import_splits(system, files: dict, *, length_unit=None, topology=None, with_forces: bool = True) -> tuple[dict, dict]:
    """{split: (positions, forces or None)} and {split: report} from {split: file}."""
    unknown = set(files) - set(SPLITS)
    if unknown:
        raise DatasetError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    splits, reports = {}, {}
    for name, file in files.items():
        x, reports[name] = read_positions(file, system, length_unit=length_unit, topology=topology)
        splits[name] = (x, forces_of(system, x) if with_forces else None)
    return splits, reports


def imported_dataset(system, *, train, val, test, length_unit: str | None = None, topology: str | None = None) -> Dataset:
    """A data set read straight from published files (one per split; :func:`read_positions`), with forces from the energy."""
    splits, _ = import_splits(system, {"train": train, "val": val, "test": test}, length_unit=length_unit, topology=topology)
    parts = [make_split(*splits[name], event_shape=tuple(system.event_shape)) for name in SPLITS]
    return Dataset(*parts, description=f"{type(system).__name__} imported from {train}, {val}, {test}")

"""Data sets: target samples (flat positions) and their forces, split train/val/test.

Forces are always $F = -∇_x u(x)$ in k_B T per length unit, the same flat layout as the
positions. Path-gradient losses read them; flow matching ignores them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path

import equinox as eqx
import jax
import numpy as np

from zoo import resources
from zoo._types import Array
from zoo.errors import ZooError

SPLITS = ("train", "val", "test")


class DatasetError(ZooError, ValueError):
    """Data that cannot be used: wrong layout, non-finite values, missing or corrupt stored files, wrong system."""


def as_event_batch(arr, event_shape: tuple[int, ...], what: str = "positions") -> np.ndarray:
    """``arr`` as float32 (n, *event_shape), accepting only (n, *event_shape) or flat (n, prod(event_shape)).

    Any other layout of the same size, such as (n, d, N) for particles stored (n, N, d), is
    an error naming both shapes: reshaping it would scramble coordinates without a trace.
    """
    arr = np.asarray(arr, dtype=np.float32)
    flat = (int(np.prod(event_shape)),)
    if arr.ndim < 1 or arr.shape[1:] not in (tuple(event_shape), flat):
        expected = f"(n, {', '.join(map(str, event_shape))})" + (f" or (n, {flat[0]})" if len(event_shape) > 1 else "")
        raise DatasetError(f"{what} have shape {arr.shape}; expected {expected}")
    return arr.reshape(arr.shape[0], *event_shape)


class Batch(eqx.Module):
    """A mini-batch of target samples: ``x`` (b, dim) and optionally ``forces`` (b, dim).

    ``noise`` (b, dim), when set, is base noise already drawn and paired with ``x`` row by row
    ahead of the training step (:meth:`zoo.losses.base.AbstractLoss.prepare`).
    """

    x: Array
    forces: Array | None = None
    noise: Array | None = None


@dataclasses.dataclass(frozen=True)
class Split:
    positions: np.ndarray
    forces: np.ndarray | None = None

    def __len__(self) -> int:
        return self.positions.shape[0]

    def batch(self, index) -> Batch:
        return Batch(x=self.positions[index], forces=None if self.forces is None else self.forces[index])


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/val/test splits of flat samples for one system."""

    train: Split
    val: Split
    test: Split
    description: str = ""

    def split(self, name: str) -> Split:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    @property
    def has_forces(self) -> bool:
        return all(s.forces is not None for s in (self.train, self.val, self.test))

    def sha256(self) -> str:
        """Hash of the training split (positions and forces), recorded in checkpoints."""
        h = hashlib.sha256()
        for arr in (self.train.positions, self.train.forces):
            if arr is not None:
                a = np.ascontiguousarray(arr)
                h.update(str((a.shape, a.dtype.str)).encode())
                h.update(a.tobytes())
        return h.hexdigest()

    def validate(self, dim: int) -> None:
        """Raise a DatasetError naming the split and the problem for bad shapes or non-finite values."""
        for name in SPLITS:
            s = self.split(name)
            for what, arr in (("positions", s.positions), ("forces", s.forces)):
                if arr is None:
                    continue
                if arr.ndim != 2 or arr.shape[1] != dim:
                    raise DatasetError(f"{name} {what} have shape {arr.shape}; the system needs (n, {dim})")
                bad = ~np.isfinite(arr).all(axis=1)
                if bad.any():
                    first = int(np.flatnonzero(bad)[0])
                    raise DatasetError(
                        f"{name} {what} contain NaN or inf in {int(bad.sum())} of {len(arr)} samples (first at index {first})"
                    )
            if s.forces is not None and s.forces.shape != s.positions.shape:
                raise DatasetError(f"{name} forces have shape {s.forces.shape} but positions {s.positions.shape}")
            if len(s) == 0:
                raise DatasetError(f"{name} split is empty")


def make_split(positions, forces=None, *, event_shape: tuple[int, ...] | None = None) -> Split:
    """A split stored flat as float32, from arrays of shape (n, *event_shape) or (n, dim).

    With ``event_shape`` (a system's, e.g. (N, d) for particles) any other layout is an
    error (:func:`as_event_batch`); without it, each sample is flattened as it comes.
    """
    if event_shape is None:
        positions = np.asarray(positions, dtype=np.float32)
        positions = positions.reshape(positions.shape[0], -1)
        if forces is not None:
            forces = np.asarray(forces, dtype=np.float32).reshape(positions.shape)
        return Split(positions=positions, forces=forces)
    positions = as_event_batch(positions, event_shape).reshape(-1, math.prod(event_shape))
    if forces is not None:
        forces = as_event_batch(forces, event_shape, "forces")
        if len(forces) != len(positions):
            raise DatasetError(f"{len(forces)} forces for {len(positions)} positions")
        forces = forces.reshape(positions.shape)
    return Split(positions=positions, forces=forces)


def exact_samples(system, *, n_train: int = 2000, n_val: int = 2048, n_test: int = 2048, seed: int = 0) -> Dataset:
    """Draw a data set from a target's exact sampler, with forces −∇u from autodiff."""
    if not system.has_exact_sampler:
        raise ValueError(f"{type(system).__name__} has no exact sampler; configure a stored data set instead")
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    force = jax.jit(jax.vmap(system.force))
    splits = []
    for key, n in zip(keys, (n_train, n_val, n_test)):
        x = system.sample(key, n)
        splits.append(make_split(np.asarray(x), np.asarray(force(x)), event_shape=system.event_shape))
    return Dataset(*splits, description=f"{type(system).__name__} exact samples, seed {seed}")


# ---------------------------------------------------------------------------- stored data sets
def resolve_data_path(path) -> Path:
    """A data-set directory as given, or relative to the repository root when it is not found here."""
    p = Path(path).expanduser()
    if p.exists() or p.is_absolute():
        return p
    if (resources.ROOT / p).exists():
        return resources.ROOT / p
    return p


def load_dataset(directory, split: str = "test"):
    """(positions (n, *event_shape), forces (n, *event_shape) or None) of a stored split, as numpy.

    For particle systems the event shape is (N, d). Every array is checked against the sha256
    recorded in the manifest; errors name the file (``zoo.storage.DatasetError``).
    """
    from zoo import storage

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return storage.read_split(resolve_data_path(directory), split)


def stored_dataset(system, *, path, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None) -> Dataset:
    """A data set read from a stored directory (``tools/generate-data``), checked against ``system``.

    ``n_train``/``n_val``/``n_test`` take the first n samples of a split (the generator
    shuffles each split, so any prefix spans all chains); None takes them all. A relative
    ``path`` is looked up in the working directory, then under the repository root.
    """
    from zoo import storage

    directory = resolve_data_path(path)
    manifest = storage.read_manifest(directory)
    storage.check_system(manifest, system, where=str(directory))
    splits = []
    for name, n in zip(SPLITS, (n_train, n_val, n_test)):
        positions, forces = storage.read_split(directory, name, manifest=manifest)
        if n is not None:
            if not 0 < n <= len(positions):
                raise ValueError(f"requested n_{name}={n} but {directory} holds {len(positions)} {name} samples")
            positions = positions[:n]
            forces = None if forces is None else forces[:n]
        splits.append(make_split(positions, forces, event_shape=system.event_shape))
    sha = manifest["splits"]["train"]["arrays"]["positions"]["sha256"][:12]
    return Dataset(*splits, description=f"{manifest['system']['name']} stored at {directory} (train positions sha256 {sha}…)")

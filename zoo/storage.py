r"""Stored data sets: positions and forces per split in zarr arrays (tensorstore), plus a manifest.

Layout of a data-set directory::

    manifest.json                 system, sampler, seed, counts, sha256 of every array, statistics
    train/positions  train/forces zarr arrays (n, *event_shape), float32, blosc-zstd
    val/...   test/...
    plots/*.png                   (written by the generator, optional)

The sha256 of an array is taken over its C-ordered little-endian float32 bytes,
``hashlib.sha256(np.ascontiguousarray(a, '<f4').tobytes())``, so it can be checked with
numpy alone. Reading verifies every array against the manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from zoo._version import __version__
from zoo.data import DatasetError, as_event_batch
from zoo.errors import ZooError

MANIFEST = "manifest.json"
FORMAT = "zoo-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
ARRAYS = ("positions", "forces")
_COMPRESSOR = {"id": "blosc", "cname": "zstd", "clevel": 9, "shuffle": 2}
_CHUNK_ROWS = 8192


# ---------------------------------------------------------------------------- systems
def _json_value(v):
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (np.generic,)):
        return v.item()
    if isinstance(v, (tuple, list)):
        return [_json_value(a) for a in v]
    try:
        return np.asarray(v).tolist()
    except Exception:  # noqa: BLE001  (an unserialisable field is recorded by its repr)
        return repr(v)


def system_spec(system) -> dict:
    """JSON-able identity of a system: its class name and its dataclass fields."""
    params = {}
    if dataclasses.is_dataclass(system):
        for f in dataclasses.fields(system):
            params[f.name] = _json_value(getattr(system, f.name))
    return json.loads(json.dumps({"name": type(system).__name__, "params": params}, sort_keys=True))


def check_system(manifest: dict, system, *, where: str = "") -> None:
    """Raise DatasetError when the manifest's system differs from ``system`` (name or any parameter)."""
    want = system_spec(system)
    have = manifest.get("system")
    if not isinstance(have, dict) or "name" not in have:
        raise DatasetError(f"manifest {where} records no system")
    if have["name"] != want["name"]:
        raise DatasetError(f"data set {where} holds samples of {have['name']}, but the configured system is {want['name']}")
    # Settings that change how a target is evaluated, not its Boltzmann density (an atom
    # encoding, a worker count), do not invalidate stored samples.
    ignored = set(getattr(system, "data_independent_fields", ()))
    diffs = [
        f"{k}: stored {have.get('params', {}).get(k)!r}, configured {v!r}"
        for k, v in want["params"].items()
        if k not in ignored and have.get("params", {}).get(k) != v
    ]
    if diffs:
        raise DatasetError(f"data set {where} was generated for {have['name']} with other parameters: " + "; ".join(diffs))


# ---------------------------------------------------------------------------- arrays
def array_sha256(a: np.ndarray, dtype="<f4") -> str:
    """sha256 of an array's bytes in C order as ``dtype``: the one hash of data sets (float32,
    little-endian, the stored type) and checkpoints (each leaf's own dtype)."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=dtype).reshape(-1).view(np.uint8)).hexdigest()


def _kvstore(path: Path) -> dict:
    return {"driver": "file", "path": str(Path(path).resolve())}


def stored_dtype(a: np.ndarray) -> str:
    """The type :func:`write_array` stores ``a`` as: int64 for integers (frame indices stay
    exact past 2**24), float32 for everything else."""
    return "<i8" if np.issubdtype(np.asarray(a).dtype, np.integer) else "<f4"


def write_array(path, a: np.ndarray) -> None:
    """Write an array as a zarr array at ``path`` (replacing any existing one), typed by :func:`stored_dtype`."""
    import tensorstore as ts

    dtype = stored_dtype(a)
    a = np.ascontiguousarray(a, dtype=dtype)
    chunks = [max(1, min(a.shape[0], _CHUNK_ROWS)), *a.shape[1:]]
    spec = {
        "driver": "zarr",
        "kvstore": _kvstore(path),
        "metadata": {"dtype": dtype, "shape": list(a.shape), "chunks": chunks, "compressor": _COMPRESSOR, "order": "C"},
        "create": True,
        "delete_existing": True,
    }
    store = ts.open(spec).result()
    store.write(a).result()


def read_array(path) -> np.ndarray:
    """Read a zarr array written by :func:`write_array`; DatasetError names the path on failure."""
    import tensorstore as ts

    path = Path(path)
    if not (path / ".zarray").is_file():
        raise DatasetError(f"array {path} is missing (no {path / '.zarray'})")
    try:
        store = ts.open({"driver": "zarr", "kvstore": _kvstore(path), "open": True}).result()
        return np.asarray(store.read().result())
    except Exception as e:  # noqa: BLE001  (tensorstore raises several types; all mean "unreadable")
        raise DatasetError(f"array {path} cannot be read (corrupt or truncated?): {e}") from e


# ---------------------------------------------------------------------------- data sets
def write_dataset(directory, splits: dict, *, system, extra: dict | None = None) -> dict:
    """Write ``splits`` = {name: (positions, forces or None)} and the manifest; returns the manifest.

    Positions have shape (n, *event_shape) or (n, dim); they are stored in the system's
    event shape. The directory is assembled beside the target and swapped in by renames,
    so an interrupted write leaves either the old data set or the new one; an existing
    non-empty directory without a manifest is refused rather than replaced.
    """
    directory = Path(directory)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    if directory.exists() and not (directory / MANIFEST).is_file() and any(directory.iterdir()):
        # The directory is swapped out whole: never do that to a folder that is not a data set.
        raise DatasetError(f"refusing to replace {directory}: it is not empty and holds no {MANIFEST}")
    shape = tuple(system.event_shape)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "zoo_version": __version__,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "system": system_spec(system),
        "event_shape": list(shape),
        "dtype": "float32",
        "sha256_convention": "sha256 of the C-ordered little-endian float32 bytes of the array",
        "splits": {},
    }
    try:
        for name, (positions, forces) in splits.items():
            entry = {"arrays": {}}
            for what, arr in (("positions", positions), ("forces", forces)):
                if arr is None:
                    continue
                arr = as_event_batch(arr, shape, f"{name} {what}")
                if not np.isfinite(arr).all():
                    raise DatasetError(f"{name} {what} contain NaN or inf; refusing to store them")
                write_array(tmp / name / what, np.asarray(arr, np.float32))
                entry["arrays"][what] = {"path": f"{name}/{what}", "shape": list(arr.shape), "sha256": array_sha256(arr)}
            entry["count"] = int(np.shape(positions)[0])
            manifest["splits"][name] = entry
        manifest.update(extra or {})
        _write_json_atomic(tmp / MANIFEST, manifest)
        old = directory.with_name(f".{directory.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if directory.exists():
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return manifest


def write_atomic(path, write) -> Path:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed onto it.

    ``path`` is either untouched or completely replaced; on any failure (a full disk, an
    interrupt) the temporary file is removed and the error propagates.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_atomic_path(path, write) -> Path:
    """``write(tmp)`` for writers that take a file name (mdtraj): a temporary name beside
    ``path`` with the same suffix, renamed onto ``path`` when complete, removed on failure."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror or str(err), str(path)) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_npz(path, **arrays) -> Path:
    """A compressed .npz at exactly ``path`` (NumPy would append '.npz' to a name without it), atomically."""
    return write_atomic(path, lambda f: np.savez_compressed(f, **arrays))


def _write_json_atomic(path: Path, obj) -> None:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_value) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def update_manifest(directory, **fields) -> dict:
    """Add or replace top-level manifest fields (e.g. statistics computed after writing)."""
    manifest = read_manifest(directory)
    manifest.update(fields)
    _write_json_atomic(Path(directory) / MANIFEST, manifest)
    return manifest


def read_manifest(directory) -> dict:
    """The parsed manifest of a data-set directory (DatasetError if missing or not valid JSON)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        what = "does not exist" if not Path(directory).exists() else f"has no {MANIFEST}"
        raise DatasetError(f"data set directory {directory} {what}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"manifest {path} is corrupt: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or "splits" not in manifest:
        raise DatasetError(f"{path} is not a {FORMAT} manifest")
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise DatasetError(f"{path} has format version {manifest['format_version']}; this zoo reads up to {FORMAT_VERSION}")
    return manifest


def read_split(directory, split: str = "test", *, manifest: dict | None = None, verify: bool = True):
    """(positions, forces or None) of one split, shape (n, *event_shape), checked against the manifest."""
    directory = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(directory)
    if split not in manifest["splits"]:
        raise DatasetError(f"data set {directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
    entry = manifest["splits"][split]
    out = {}
    for what in ARRAYS:
        info = entry["arrays"].get(what)
        if info is None:
            out[what] = None
            continue
        arr = read_array(directory / info["path"])
        if list(arr.shape) != list(info["shape"]):
            raise DatasetError(f"array {directory / info['path']} has shape {arr.shape}; the manifest says {info['shape']}")
        if verify and array_sha256(arr) != info["sha256"]:
            raise DatasetError(f"array {directory / info['path']} does not match its sha256 in the manifest (corrupt or modified)")
        out[what] = arr
    if out["positions"] is None:
        raise DatasetError(f"split {split!r} of {directory} has no positions")
    return out["positions"], out["forces"]


# ---------------------------------------------------------------------------- metric files
#: Key under which :func:`write_json` lists the non-finite numbers it stored as null.
NONFINITE = "nonfinite"


def write_json(path: Path, data: dict) -> None:
    """Write a flat dict as strict JSON, atomically.

    JSON has no infinity or NaN: such a value is stored as ``null`` and named, with its
    value as text, under ``"nonfinite"`` (e.g. ``"nll": null, "nonfinite": {"nll": "inf"}``);
    :func:`read_json` restores it.
    """
    nonfinite = {k: str(v) for k, v in data.items() if isinstance(v, float) and not math.isfinite(v)}
    clean = {k: (None if k in nonfinite else v) for k, v in data.items() if k != NONFINITE}
    if nonfinite:
        clean[NONFINITE] = nonfinite
    text = json.dumps(clean, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomic(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> dict:
    """A dict written by :func:`write_json`, with its non-finite numbers restored as floats
    (files written before that encoding, with "inf" as text, read the same way)."""
    data = json.loads(Path(path).read_text())
    for key, text in data.pop(NONFINITE, {}).items():
        data[key] = float(text)
    for key, value in data.items():
        if value in ("inf", "-inf", "nan"):
            data[key] = float(value)
    return data



# ---------------------------------------------------------------------------- resumable chunks
# Two kinds of long computation are cut into chunks written as they finish, so that a killed run
# loses at most one chunk: independent chunks (evaluations: any chunk can be computed alone), kept
# by ChunkStore under a digest of their settings, and sequential ones (Markov chains, molecular
# dynamics: each chunk continues from the state the previous one ended in), kept by ChunkLog. Both
# store chunk k as ``chunk_<k>.npz``, written atomically.


def _chunk_file(directory: Path, index: int) -> Path:
    return directory / f"chunk_{index:05d}.npz"


def _save_chunk(path: Path, arrays: dict) -> None:
    write_atomic(path, lambda f: np.savez(f, **{name: np.asarray(value) for name, value in arrays.items()}))


class ChunkStore:
    """The finished chunks of a long chunked computation, so that an interrupted run resumes.

    Results live in ``directory/<digest>/chunk_<index>.npz`` (each written atomically), where
    the digest is the sha256 of ``fingerprint``: a JSON-serialisable description of
    everything the results depend on (model weights, solver, PRNG key, sizes). A run with
    any other setting therefore never sees these chunks, and one with the same settings
    reads them instead of computing them again. An unreadable chunk is computed again.
    """

    def __init__(self, directory, fingerprint: dict):
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        self.path = Path(directory) / hashlib.sha256(text.encode()).hexdigest()[:16]
        self.path.mkdir(parents=True, exist_ok=True)
        if not (self.path / "fingerprint.json").exists():
            _write_json_atomic(self.path / "fingerprint.json", fingerprint)

    def load(self, index: int) -> dict[str, np.ndarray] | None:
        """Chunk ``index``'s arrays, or ``None`` if it has not been finished (or cannot be read)."""
        path = _chunk_file(self.path, index)
        try:
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files}
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as err:
            print(f"warning: {path} cannot be read ({err}); computing that chunk again")
            return None

    def save(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        _save_chunk(_chunk_file(self.path, index), arrays)


#: Folders this process holds as their one writer (:func:`hold_folder`), with the descriptors of their locks.
HELD_FOLDERS: dict[Path, int] = {}


def hold_folder(folder, lock_name: str, busy: Callable[[Path], Exception]) -> Path:
    """Make this process the one writer of ``folder`` (re-entrant within the process).

    A second process writing the same folder (a forgotten background job, a resume started
    twice) would interleave its files with the first one's: it gets ``busy(folder)`` raised
    instead. The lock is the kernel's (``flock`` on ``folder/lock_name``), so a killed process
    leaves none behind; it lasts until :func:`release_folder` or the end of the process.
    """
    folder = Path(folder).resolve()
    if folder in HELD_FOLDERS:
        if (folder / lock_name).exists():
            return folder
        os.close(HELD_FOLDERS.pop(folder))  # the folder was removed since: its lock went with it
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / lock_name, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise busy(folder) from None
    HELD_FOLDERS[folder] = fd
    return folder


@contextlib.contextmanager
def exclusive(lock_file) -> Iterator[None]:
    """Wait until no other process holds ``lock_file``, then hold it for the ``with`` block.

    For a read-modify-write of files several processes update (the kernel's ``flock``, so a
    killed holder leaves no lock behind).
    """
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def release_folder(folder) -> None:
    """Give up ``folder`` if this process holds it (:func:`hold_folder`)."""
    fd = HELD_FOLDERS.pop(Path(folder).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the lock


class RunStateError(ZooError, ValueError):
    """The stored chunks of a sequential run cannot be continued: unreadable, or from other settings."""


class ChunkLog:
    """The chunks of a sequential run, in order, with the settings they were made with.

    ``directory/progress.json`` holds ``params`` (the JSON form of everything the chunks depend
    on), the finished chunk files in order, the indices of items that ``failed`` and the compute
    ``seconds`` so far; ``directory/chunk_<k>.npz`` holds chunk k, including whatever state the
    next chunk starts from. The manifest is rewritten atomically after each chunk file is in
    place, so a run killed at any moment continues from its last listed chunk. Opening a
    directory that holds a run with other ``params`` is refused with the settings that differ;
    ``resume=False`` starts that directory over. ``length_keys`` name params that say how far
    the run goes, not what its chunks hold (a run's length): a stored run with other values
    of them continues, or stops, at the new ones (stored with the next chunk). The process that opens a run to write it holds
    it until :meth:`close` or its end (:func:`hold_folder`): another process opening it to
    write meanwhile is refused; :meth:`existing` opens a run to read it.
    """

    MANIFEST = "progress.json"
    #: The lock that makes one process the writer of a run's chunks (:func:`hold_folder`).
    WRITER_LOCK = ".writer.lock"

    def __init__(self, directory, params: dict, *, resume: bool = True, write: bool = True, length_keys: tuple[str, ...] = ()):
        self.dir = Path(directory)
        if write:
            # Before anything is read or removed: a second process would append (or start
            # over) beside the first one's chunks.
            busy = f"another process is writing {self.dir} (it holds {self.WRITER_LOCK} there): let it finish or stop it first"
            hold_folder(self.dir, self.WRITER_LOCK, lambda _: RunStateError(busy))
        self.manifest_path = self.dir / self.MANIFEST
        params = json.loads(json.dumps(params, default=_json_value))  # tuples, numpy scalars as JSON has them
        if resume and self.manifest_path.exists():
            try:
                manifest = json.loads(self.manifest_path.read_text())
                stored = manifest["params"]
            except (OSError, ValueError, KeyError) as err:
                raise RunStateError(f"cannot read {self.manifest_path} ({err}); delete {self.dir} to start over") from err
            changed = sorted(k for k in set(params) | set(stored) if params.get(k) != stored.get(k) and k not in length_keys)
            if changed:
                raise RunStateError(
                    f"{self.dir} holds a run with other settings ({', '.join(changed)} differ); "
                    "use another directory, or start over (resume=False, --no-resume) or delete it"
                )
            # A new length is stored with the next chunk: a call that adds none (refused, or
            # reading a prefix of a longer run) leaves the stored run as it was.
            manifest["params"] = params
            self.manifest = manifest
        else:
            # The empty manifest first: a run killed while the old chunks go still starts over.
            self.manifest = {"params": params, "chunks": [], "failed": [], "seconds": 0.0}
            self._save_manifest()
            for stale in self.dir.glob("chunk_*.npz"):
                stale.unlink()

    @classmethod
    def existing(cls, directory) -> ChunkLog:
        """The run kept in ``directory``, whatever its settings (to read its chunks)."""
        path = Path(directory) / cls.MANIFEST
        try:
            params = json.loads(path.read_text())["params"]
        except FileNotFoundError:
            raise RunStateError(f"{directory} holds no chunked run (no {cls.MANIFEST})") from None
        except (OSError, ValueError, KeyError) as err:
            raise RunStateError(f"cannot read {path} ({err})") from err
        return cls(directory, params, write=False)

    def close(self) -> None:
        """Stop being the run's writer, so that another process may continue it."""
        release_folder(self.dir)

    def _save_manifest(self) -> None:
        _write_json_atomic(self.manifest_path, self.manifest)

    @property
    def n_chunks(self) -> int:
        return len(self.manifest["chunks"])

    @property
    def seconds(self) -> float:
        return float(self.manifest["seconds"])

    def load(self, index: int, fields=None) -> dict[str, np.ndarray]:
        """Chunk ``index``'s arrays (negative counts from the end, as for a list); with ``fields``
        only those of them the chunk has (an .npz member is read only when asked for)."""
        path = self.dir / self.manifest["chunks"][index]
        try:
            with np.load(path) as stored:
                return {name: stored[name] for name in stored.files if fields is None or name in fields}
        except (OSError, ValueError, EOFError) as err:
            raise RunStateError(f"cannot read {path} ({err}); delete {self.dir} to start over") from err

    def append(self, arrays: dict, *, seconds: float, failed=()) -> None:
        """Add the next chunk: its arrays, the compute seconds it took and the items that failed."""
        path = _chunk_file(self.dir, self.n_chunks)
        _save_chunk(path, arrays)
        self.manifest["chunks"].append(path.name)
        self.manifest["failed"].extend(int(i) for i in failed)
        self.manifest["seconds"] += float(seconds)
        self._save_manifest()

    def concatenate(self, fields, axis: int = 0, *, length: int | None = None) -> dict[str, np.ndarray]:
        """The named arrays of every chunk joined along ``axis`` (fields the chunks lack are left out);
        an empty dict before the first chunk. With ``length``, the first ``length`` entries along
        ``axis``, reading only the chunks that hold them (a short prefix of a long run)."""
        parts, held = [], 0
        for k in range(self.n_chunks):
            if length is not None and held >= length:
                break
            parts.append(self.load(k, fields))
            held += next(iter(parts[-1].values())).shape[axis] if parts[-1] else 0
        if not parts:
            return {}
        first = (slice(None),) * axis + (slice(length),)  # slice(None) when no length is asked for
        return {f: np.concatenate([p[f] for p in parts], axis=axis)[first] for f in fields if f in parts[0]}

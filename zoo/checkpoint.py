r"""Checkpoints: array leaves in tensorstore (zarr), written atomically, verified on load.

One checkpoint is a *step dir* under a checkpoint *root*::

    root/
      LATEST                          "step_00001000\n", replaced atomically after each save
      step_00001000/
        manifest.json                 every leaf: group, tree path, file, shape, dtype, sha256
        metadata.json                 step, zoo version, creation time (UTC), user metadata
        config.gin                    the operative gin config the model was built from
        arrays/model/field.mlp.layers.0.weight/   one zarr array (.zarray + one chunk) per leaf
        arrays/opt_state/0.mu.field.mlp.layers.0.weight/
        arrays/key/root/

Up to four groups of leaves are stored: ``model`` (the leaves of ``eqx.filter(model,
eqx.is_array)``: the weights to sample with), ``raw_model`` (the training weights, only when
``model`` holds their moving average), ``opt_state`` (its array leaves) and ``key`` (one PRNG
key; a typed key is stored as ``jax.random.key_data`` with its implementation's name). Each leaf is one
uncompressed zarr array holding a single chunk; the manifest records the sha256 of its
C-order bytes.

**Writing.** Everything goes into a hidden sibling ``.tmp-step_…`` dir; the manifest is
written last, every file and dir is fsynced, and one ``os.rename`` makes the complete step
dir appear. ``LATEST`` is then replaced by ``os.replace`` of a fsynced temporary file, and
older step dirs beyond ``keep`` are removed. A crash at any moment leaves the previous
``LATEST`` checkpoint intact plus hidden ``.tmp-``/``.trash-`` litter, which readers
ignore and the next save removes. One process writes a root at a time.

**Reading.** Every restored leaf is re-read and its sha256 compared with the manifest
(:class:`CorruptCheckpointError` names the leaf); the stored tree (paths, shapes, dtypes)
is compared with a template (:class:`CheckpointMismatchError` names the first differing
leaf); arrays are put back into the template with ``eqx.combine``, so everything that is
not an array (static fields, activation functions) comes from the template. The round
trip is bit-identical. :func:`read_checkpoint_info` gives the step, config and metadata
without a template, so a tool can rebuild the model from the stored gin config first.

**Shipping.** :func:`pack_checkpoint` turns a step dir into one deterministic ``.tar``
(sorted members, zero mtimes, fixed modes and owners), :func:`unpack_checkpoint` turns it
back (refusing links and paths that leave the destination), and
:func:`checkpoint_sha256` hashes a step dir's files independently of how they were copied.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import operator
import os
import pathlib
import re
import shutil
import tarfile
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts

from zoo._version import __version__
from zoo.errors import ZooError
from zoo.storage import array_sha256, write_atomic

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "checkpoint_sha256",
    "latest_checkpoint",
    "load_checkpoint",
    "pack_checkpoint",
    "read_checkpoint_info",
    "save_checkpoint",
    "unpack_checkpoint",
    "verify_checkpoint",
]

FORMAT = "zoo-checkpoint"
FORMAT_VERSION = 1
LATEST = "LATEST"
MANIFEST = "manifest.json"
METADATA = "metadata.json"
CONFIG = "config.gin"
ARRAYS = "arrays"
GROUPS = ("model", "raw_model", "opt_state", "key")

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
# Hidden names of unfinished writes and of step dirs on their way out; never checkpoints.
_LITTER_PREFIXES = (".tmp-", ".trash-")
_LEAF_KEYS = ("group", "path", "file", "shape", "dtype", "data_shape", "data_dtype", "sha256", "key_impl")
_HASH_BLOCK = 1 << 20


# ---------------------------------------------------------------------------- errors
class CheckpointError(ZooError):
    """Base class of all checkpoint errors."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was asked for."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file is missing, truncated, garbled, or fails its sha256."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (full disk, read-only folder); nothing was published."""


class CheckpointMismatchError(CheckpointError):
    """The stored tree differs from the template (paths, shapes or dtypes)."""


# ---------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint says about itself, read without a template model."""

    path: pathlib.Path
    step: int
    config: str
    metadata: dict
    zoo_version: str
    created: str
    #: Which of ``GROUPS`` were saved ("model" always; "raw_model", "opt_state" and "key" if given).
    groups: tuple[str, ...]


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint: the model rebuilt into its template, and what was saved with it.

    ``opt_state`` is ``None`` unless an ``opt_state_like`` template was given; ``key`` is
    ``None`` if none was saved. ``raw_model`` is ``None`` unless ``raw_model_like`` was given
    and the checkpoint stores one. ``metadata`` is the user's dict as saved.
    """

    step: int
    model: Any
    opt_state: Any
    key: Any
    config: str
    metadata: dict
    zoo_version: str = ""
    created: str = ""
    path: pathlib.Path | None = None
    raw_model: Any = None


# ---------------------------------------------------------------------------- saving
def save_checkpoint(
    directory,
    *,
    step: int,
    model,
    raw_model=None,
    opt_state=None,
    key=None,
    config: str = "",
    metadata: dict | None = None,
    keep: int | None = 3,
) -> pathlib.Path:
    """Write ``directory/step_{step:08d}/`` atomically, point ``LATEST`` at it, prune old ones.

    Arguments:
        directory: the checkpoint root (created if missing).
        step: the training step, a non-negative integer; names the step dir. Saving a step
            that already exists replaces it.
        model: any pytree (an ``eqx.Module``); its array leaves are stored. These are the
            weights every reader samples and evaluates with.
        raw_model: the training weights when ``model`` holds something else (their moving
            average), or ``None``; only resuming the training reads them.
        opt_state: the optax state, or ``None``; its array leaves are stored.
        key: one PRNG key (raw ``uint32`` or typed), or ``None``.
        config: the operative gin config string (``gin.operative_config_str()``).
        metadata: JSON-serialisable user metadata (e.g. the dataset's sha256); NumPy/JAX
            scalars are stored as Python numbers.
        keep: how many step dirs to keep, newest by step number; the one just written is
            always kept. ``None`` keeps all.

    Returns the final step dir. Stale temporary dirs of a crashed earlier write are removed.
    """
    step = _check_step(step)
    if keep is not None and (isinstance(keep, bool) or operator.index(keep) < 1):
        raise ValueError(f"keep must be a positive integer or None, got {keep!r}")
    if not isinstance(config, str):
        raise TypeError(f"config must be the gin config string, got {type(config).__name__}")
    user_metadata = _jsonable({} if metadata is None else metadata, "metadata")
    if not isinstance(user_metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    if key is not None and not isinstance(key, (jax.Array, np.ndarray)):
        raise TypeError(f"key must be one PRNG key array, got {type(key).__name__}")

    groups = {"model": _array_leaves(model)}
    if raw_model is not None:
        groups["raw_model"] = _array_leaves(raw_model)
    if opt_state is not None:
        groups["opt_state"] = _array_leaves(opt_state)
    if key is not None:
        groups["key"] = _array_leaves(key)

    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    _remove_litter(root)
    name = _step_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        leaves = []
        for group, flat in groups.items():
            taken: set[str] = set()
            for path, leaf in flat:
                data, key_impl = _host_data(leaf)
                rel = f"{ARRAYS}/{group}/{_unique(_leaf_name(path), taken)}"
                _write_leaf(tmp / rel, data)
                leaves.append(
                    {
                        "group": group,
                        "path": jax.tree_util.keystr(path),
                        "file": rel,
                        "shape": list(np.shape(leaf)),
                        "dtype": str(leaf.dtype),
                        "data_shape": list(data.shape),
                        "data_dtype": str(data.dtype),
                        "sha256": array_sha256(data, dtype=data.dtype),
                        "key_impl": key_impl,
                    }
                )

        meta = {
            "step": step,
            "zoo_version": __version__,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "metadata": user_metadata,
        }
        files = {
            CONFIG: config.encode("utf-8"),
            METADATA: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode("utf-8"),
        }
        for fname, payload in files.items():
            (tmp / fname).write_bytes(payload)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": step,
            "groups": list(groups),
            "files": {fname: hashlib.sha256(payload).hexdigest() for fname, payload in files.items()},
            "leaves": leaves,
        }
        # The manifest goes last: a step dir holding one was written to the end.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():
            os.rename(final, root / f".trash-{name}-{uuid.uuid4().hex[:12]}")
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, CheckpointError):
            raise CheckpointWriteError(err.errno, err.strerror or str(err)) from err
        if isinstance(err, CheckpointWriteError):
            # Name the checkpoint folder, not the temporary leaf; say what survived.
            raise CheckpointWriteError(
                err.errno,
                f"cannot write checkpoint {name} in {root}: {err.strerror}; nothing was published "
                f"(the checkpoints written before are intact)",
            ) from None
        raise
    _write_latest(root, name)
    if keep is not None:
        _prune(root, keep, protect=final)
    _remove_litter(root)
    return final


def _check_step(step) -> int:
    if isinstance(step, bool):
        raise TypeError(f"step must be an integer, got {step!r}")
    try:
        step = operator.index(step)
    except TypeError:
        raise TypeError(f"step must be an integer, got {step!r}") from None
    if step < 0:
        raise ValueError(f"step must be non-negative, got {step}")
    return step


def _step_name(step: int) -> str:
    return f"step_{step:08d}"


def _jsonable(obj, where: str):
    """A JSON-ready copy of ``obj``; NumPy/JAX scalars become Python numbers."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} has a non-string key {k!r}; JSON keys are strings")
            out[k] = _jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)) and np.ndim(obj) == 0:
        return np.asarray(obj).item()
    raise TypeError(f"{where} is a {type(obj).__name__}, which a checkpoint's metadata.json cannot store")


def _array_leaves(tree) -> list[tuple[tuple, Any]]:
    """(path, leaf) of the array leaves of ``tree``, in ``tree_flatten`` order."""
    return jax.tree_util.tree_flatten_with_path(eqx.filter(tree, eqx.is_array))[0]


def _is_key(leaf) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)) and jax.dtypes.issubdtype(
        leaf.dtype, jax.dtypes.prng_key
    )


def _host_data(leaf) -> tuple[np.ndarray, str | None]:
    """The C-contiguous host bytes of a leaf, and the key implementation of a typed key."""
    if _is_key(leaf):
        return np.asarray(jax.random.key_data(leaf), order="C"), str(jax.random.key_impl(leaf))
    # order="C" rather than ascontiguousarray, which would turn 0-d arrays into 1-d ones.
    return np.asarray(leaf, order="C"), None


def _leaf_name(path) -> str:
    """A file-name-safe name for a tree path: ``.field.layers[0].weight`` -> ``field.layers.0.weight``.

    Each path element is reduced to ``[A-Za-z0-9_-]``, so no name is hidden, ``..``, or
    holds a separator.
    """
    tokens = []
    for k in path:
        for attr in ("name", "key", "idx"):  # GetAttrKey, DictKey/FlattenedIndexKey, SequenceKey
            if hasattr(k, attr):
                token = str(getattr(k, attr))
                break
        else:
            token = str(k)
        tokens.append(re.sub(r"[^A-Za-z0-9_-]+", "_", token) or "_")
    name = ".".join(tokens) or "root"
    if len(name) > 120:  # keep well below NAME_MAX
        name = f"{name[:100]}-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
    return name


def _unique(name: str, taken: set[str]) -> str:
    # Case-insensitively unique, for case-insensitive file systems.
    candidate, n = name, 1
    while candidate.lower() in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate.lower())
    return candidate


def _zarr_spec(target: pathlib.Path) -> dict:
    return {
        "driver": "zarr",
        # We fsync the whole tree once ourselves, after every leaf is written.
        "kvstore": {"driver": "file", "path": str(target), "file_io_sync": False},
        # A missing chunk file is damage, not an array of fill values.
        "fill_missing_data_reads": False,
    }


def _write_leaf(target: pathlib.Path, data: np.ndarray) -> None:
    """Store one array as a zarr array at ``target``: one uncompressed chunk, C order."""
    spec = _zarr_spec(target)
    spec["metadata"] = {
        "shape": list(data.shape),
        "chunks": [max(1, n) for n in data.shape],
        "compressor": None,
        "order": "C",
    }
    # Write the chunk even when it equals the fill value, so every leaf has its file.
    spec["store_data_equal_to_fill_value"] = True
    try:
        dtype = ts.dtype(data.dtype.name)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"cannot store an array of dtype {data.dtype} in zarr: {err}") from err
    try:
        store = ts.open(spec, create=True, dtype=dtype).result()
        store.write(data).result()
    except ValueError as err:  # tensorstore reports I/O failures (a full disk, a read-only folder) as ValueError
        code = re.search(r"os_error_code='(\d+)'", str(err))
        raise CheckpointWriteError(int(code.group(1)) if code else None, os.strerror(int(code.group(1))) if code else str(err)) from None


def _fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path) -> None:
    """Make a rename or creation inside ``path`` durable (POSIX only)."""
    if os.name != "posix":
        return
    _fsync_file(path)


def _fsync_tree(top: pathlib.Path) -> None:
    for dirpath, _, filenames in os.walk(top):
        for fname in filenames:
            _fsync_file(os.path.join(dirpath, fname))
        _fsync_dir(dirpath)


def _write_latest(root: pathlib.Path, name: str) -> None:
    write_atomic(root / LATEST, lambda f: f.write((name + "\n").encode("utf-8")))
    _fsync_dir(root)


def _step_dirs(root: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """(step, path) of the step dirs in ``root``, by increasing step."""
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: pathlib.Path, keep: int, protect: pathlib.Path) -> None:
    for _, path in _step_dirs(root)[:-keep]:
        if path != protect:
            # Rename first, so a half-deleted dir never looks like a checkpoint.
            trash = root / f".trash-{path.name}-{uuid.uuid4().hex[:12]}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)


def _remove_litter(root: pathlib.Path) -> None:
    """Remove what crashed writes and interrupted prunes left behind."""
    for entry in root.iterdir():
        if entry.name.startswith(_LITTER_PREFIXES):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- finding
def latest_checkpoint(directory) -> pathlib.Path | None:
    """The step dir that ``directory/LATEST`` names, or ``None`` if there is no checkpoint.

    If ``LATEST`` is missing or names no existing step dir (a crash between a save's
    rename and its ``LATEST`` update), the step dir with the largest step is returned.
    Hidden temporary dirs of unfinished writes are never returned.
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        return None
    latest = root / LATEST
    if latest.is_file():
        try:
            name = latest.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        if _STEP_DIR.match(name) and (root / name).is_dir():
            return root / name
        steps = _step_dirs(root)
        if steps:
            warnings.warn(
                f"{latest} names no step dir ({name!r}); using the newest, {steps[-1][1].name}", stacklevel=2
            )
        return steps[-1][1] if steps else None
    steps = _step_dirs(root)
    return steps[-1][1] if steps else None


def _resolve(path) -> pathlib.Path:
    """A step dir from either a step dir or a checkpoint root (through ``LATEST``)."""
    p = pathlib.Path(path)
    if not p.exists():
        raise CheckpointNotFoundError(f"no checkpoint at {p}: the path does not exist")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file, not a checkpoint dir (unpack an archive with unpack_checkpoint)")
    if (p / MANIFEST).exists() or _STEP_DIR.match(p.name):
        return p
    found = latest_checkpoint(p)
    if found is None:
        raise CheckpointNotFoundError(f"{p} holds no checkpoint: no {MANIFEST}, no {LATEST}, no step_* dirs")
    return found


# ---------------------------------------------------------------------------- reading
def _read_manifest(step_dir: pathlib.Path) -> dict:
    path = step_dir / MANIFEST
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{step_dir} has no {MANIFEST}: the checkpoint is incomplete or damaged") from None
    try:
        manifest = json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{path} is not a {FORMAT} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {version!r}; this zoo reads versions up to {FORMAT_VERSION} (upgrade zoo)"
        )
    leaves = manifest.get("leaves")
    ok = (
        isinstance(manifest.get("step"), int)
        and isinstance(manifest.get("files"), dict)
        and isinstance(manifest.get("groups"), list)
        and isinstance(leaves, list)
        and all(isinstance(e, dict) and all(k in e for k in _LEAF_KEYS) for e in leaves)
    )
    if not ok:
        raise CorruptCheckpointError(f"{path} lacks required fields (step, files, groups, leaves)")
    return manifest


def _read_file(step_dir: pathlib.Path, name: str, manifest: dict) -> bytes:
    """One of the small files, checked against its sha256 in the manifest."""
    path = step_dir / name
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{path} is missing") from None
    expected = manifest["files"].get(name)
    if hashlib.sha256(payload).hexdigest() != expected:
        raise CorruptCheckpointError(f"{path} fails its sha256 check: the file is damaged")
    return payload


def _info(step_dir: pathlib.Path, manifest: dict) -> CheckpointInfo:
    config = _read_file(step_dir, CONFIG, manifest).decode("utf-8")
    try:
        meta = json.loads(_read_file(step_dir, METADATA, manifest))
    except ValueError as err:  # sha256 matched, so it was written this way; still say so
        raise CorruptCheckpointError(f"{step_dir / METADATA} is not valid JSON: {err}") from None
    if not isinstance(meta, dict):
        raise CorruptCheckpointError(f"{step_dir / METADATA} is not a JSON object")
    if meta.get("step") != manifest["step"]:
        raise CorruptCheckpointError(
            f"{step_dir}: metadata.json says step {meta.get('step')}, manifest says {manifest['step']}"
        )
    return CheckpointInfo(
        path=step_dir,
        step=manifest["step"],
        config=config,
        metadata=meta.get("metadata", {}),
        zoo_version=meta.get("zoo_version", ""),
        created=meta.get("created", ""),
        groups=tuple(manifest["groups"]),
    )


def read_checkpoint_info(path) -> CheckpointInfo:
    """Step, gin config, metadata and stored groups of a checkpoint, without a template.

    ``path`` is a checkpoint root (``LATEST`` is followed) or one step dir. The config and
    metadata files are checked against their sha256; array leaves are not read.
    """
    step_dir = _resolve(path)
    return _info(step_dir, _read_manifest(step_dir))


def _label(group: str, path: str) -> str:
    return f"{group}{path}" if path else group


def _describe(shape, dtype) -> str:
    return f"{dtype}[{','.join(str(n) for n in shape)}]"


def _read_leaf(step_dir: pathlib.Path, entry: dict) -> np.ndarray:
    """Read one leaf's stored data and check its shape, dtype and sha256."""
    label = _label(entry["group"], entry["path"])
    rel = pathlib.PurePosixPath(entry["file"])
    if rel.is_absolute() or ".." in rel.parts or rel.parts[:1] != (ARRAYS,):
        raise CorruptCheckpointError(f"leaf {label}: manifest names an unsafe file {entry['file']!r}")
    target = step_dir.joinpath(*rel.parts)
    try:
        store = ts.open(_zarr_spec(target), open=True, read=True).result()
        data = store.read().result()
    except Exception as err:  # tensorstore reports damage as ValueError with a status code
        reason = str(err).split(" [tensorstore_spec=")[0]
        raise CorruptCheckpointError(f"leaf {label} ({entry['file']}) is unreadable: {reason}") from err
    data = np.asarray(data)
    if list(data.shape) != list(entry["data_shape"]) or str(data.dtype) != entry["data_dtype"]:
        raise CorruptCheckpointError(
            f"leaf {label} ({entry['file']}) holds {_describe(data.shape, data.dtype)}, "
            f"the manifest says {_describe(entry['data_shape'], entry['data_dtype'])}"
        )
    if array_sha256(data, dtype=data.dtype) != entry["sha256"]:
        raise CorruptCheckpointError(f"leaf {label} ({entry['file']}) fails its sha256 check: the data is damaged")
    return data


def _is_template_leaf(x) -> bool:
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def _check_structure(group: str, stored: list[dict], template: list[tuple]) -> None:
    """Raise CheckpointMismatchError at the first leaf where stored and template differ."""
    for i in range(max(len(stored), len(template))):
        s = stored[i] if i < len(stored) else None
        t = template[i] if i < len(template) else None
        if s is None:
            path, leaf = t
            raise CheckpointMismatchError(
                f"template leaf {_label(group, jax.tree_util.keystr(path))} "
                f"{_describe(np.shape(leaf), leaf.dtype)} is not in the checkpoint, "
                f"which stores {len(stored)} {group} leaves to the template's {len(template)}"
            )
        if t is None:
            raise CheckpointMismatchError(
                f"stored leaf {_label(group, s['path'])} {_describe(s['shape'], s['dtype'])} is not in the template, "
                f"which has {len(template)} {group} leaves to the checkpoint's {len(stored)}"
            )
        path, leaf = t
        t_path, t_shape, t_dtype = jax.tree_util.keystr(path), list(np.shape(leaf)), str(leaf.dtype)
        if (s["path"], list(s["shape"]), s["dtype"]) != (t_path, t_shape, t_dtype):
            where = (
                _label(group, t_path)
                if s["path"] == t_path
                else f"{group} leaf #{i} (stored {_label(group, s['path'])}, template {_label(group, t_path)})"
            )
            raise CheckpointMismatchError(
                f"checkpoint and template differ at {where}: stored {_describe(s['shape'], s['dtype'])}, "
                f"template {_describe(t_shape, t_dtype)}"
            )


def _to_value(data: np.ndarray, entry: dict, like=None):
    """Turn stored data back into a leaf of the template's kind (jax, NumPy, typed key)."""
    label = _label(entry["group"], entry["path"])
    if isinstance(like, np.ndarray):
        return data
    if isinstance(like, np.generic):
        return data[()]
    value = jnp.asarray(data)
    if value.dtype != data.dtype:  # float64 under jax_enable_x64=False would be truncated
        raise CheckpointMismatchError(
            f"leaf {label} is stored as {data.dtype} but JAX made it {value.dtype}; enable jax_enable_x64 to load it"
        )
    if entry["key_impl"] is not None:
        value = jax.random.wrap_key_data(value, impl=entry["key_impl"])
    sharding = getattr(like, "sharding", None)
    return value if sharding is None else jax.device_put(value, sharding)


def _restore_group(step_dir: pathlib.Path, manifest: dict, group: str, like):
    stored = [e for e in manifest["leaves"] if e["group"] == group]
    arrays_like, static = eqx.partition(like, _is_template_leaf)
    template, treedef = jax.tree_util.tree_flatten_with_path(arrays_like)
    _check_structure(group, stored, template)
    values = [_to_value(_read_leaf(step_dir, e), e, leaf) for e, (_, leaf) in zip(stored, template)]
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, values), static)


def load_checkpoint(path, *, model_like, opt_state_like=None, raw_model_like=None) -> Checkpoint:
    """Load a checkpoint into templates, verifying every leaf it restores.

    Arguments:
        path: a checkpoint root (``LATEST`` is followed) or one step dir.
        model_like: a model of the same architecture (its arrays may be
            ``jax.ShapeDtypeStruct``, e.g. from ``eqx.filter_eval_shape``); it supplies
            the tree structure and every non-array part.
        opt_state_like: the optimiser state template (``optimizer.init(params)``), or
            ``None`` to skip the optimiser state.
        raw_model_like: a template for the training weights saved beside averaged ones
            (``model_like`` will do), or ``None`` to skip them; ignored when none were saved.

    Raises CorruptCheckpointError for missing/damaged files or a sha256 mismatch (naming
    the leaf) and CheckpointMismatchError when the stored tree differs from a template
    (naming the first differing leaf and both shapes/dtypes). Restored arrays take the
    template leaf's sharding when it has one. The model, key and (if asked for) optimiser
    state are read; use :func:`verify_checkpoint` to check every leaf without templates.
    """
    step_dir = _resolve(path)
    manifest = _read_manifest(step_dir)
    info = _info(step_dir, manifest)
    model = _restore_group(step_dir, manifest, "model", model_like)
    opt_state = None
    if opt_state_like is not None:
        if "opt_state" not in info.groups:
            raise CheckpointMismatchError(f"{step_dir} stores no optimiser state, but opt_state_like was given")
        opt_state = _restore_group(step_dir, manifest, "opt_state", opt_state_like)
    raw_model = None
    if raw_model_like is not None and "raw_model" in info.groups:
        raw_model = _restore_group(step_dir, manifest, "raw_model", raw_model_like)
    key = None
    if "key" in info.groups:
        entries = [e for e in manifest["leaves"] if e["group"] == "key"]
        if len(entries) != 1:
            raise CorruptCheckpointError(f"{step_dir}: the manifest lists {len(entries)} key leaves, not one")
        key = _to_value(_read_leaf(step_dir, entries[0]), entries[0])
    return Checkpoint(
        step=info.step,
        model=model,
        opt_state=opt_state,
        key=key,
        config=info.config,
        metadata=info.metadata,
        zoo_version=info.zoo_version,
        created=info.created,
        path=step_dir,
        raw_model=raw_model,
    )


def verify_checkpoint(path) -> CheckpointInfo:
    """Re-read every file and leaf of a checkpoint and check its sha256, without templates."""
    step_dir = _resolve(path)
    manifest = _read_manifest(step_dir)
    info = _info(step_dir, manifest)
    for entry in manifest["leaves"]:
        _read_leaf(step_dir, entry)
    return info


# ---------------------------------------------------------------------------- shipping
def _files(step_dir: pathlib.Path) -> list[str]:
    """Sorted relative POSIX paths of the regular files under ``step_dir``."""
    step_dir = pathlib.Path(step_dir)
    if not step_dir.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint dir at {step_dir}")
    out = []
    for dirpath, dirnames, filenames in os.walk(step_dir):
        for name in dirnames + filenames:
            full = pathlib.Path(dirpath, name)
            if full.is_symlink():
                raise CheckpointError(f"{full} is a symbolic link; checkpoints hold only regular files")
        out.extend(pathlib.Path(dirpath, f).relative_to(step_dir).as_posix() for f in filenames)
    return sorted(out)


def _file_blocks(path: pathlib.Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            yield block


def checkpoint_sha256(step_dir) -> str:
    r"""One sha256 over a step dir's files, independent of mtimes and copying.

    Hashes, for every regular file in sorted relative-path order,
    ``path (UTF-8) ‖ 0x00 ‖ size (8 bytes, little endian) ‖ bytes``.
    """
    step_dir = pathlib.Path(step_dir)
    h = hashlib.sha256()
    for rel in _files(step_dir):
        path = step_dir / rel
        h.update(rel.encode("utf-8") + b"\0" + path.stat().st_size.to_bytes(8, "little"))
        for block in _file_blocks(path):
            h.update(block)
    return h.hexdigest()


def file_sha256(path) -> str:
    """sha256 of one file's bytes (e.g. a packed checkpoint)."""
    h = hashlib.sha256()
    for block in _file_blocks(pathlib.Path(path)):
        h.update(block)
    return h.hexdigest()


def copy_with_bindings(step_dir, dest_dir, bindings) -> pathlib.Path:
    """Copy a step dir to ``dest_dir`` (which must not exist) with gin ``bindings`` appended to its config.

    The copy's manifest records the new config's sha256, so it verifies like any checkpoint.
    A release uses this to point a run trained on a cache-only data set at a shipped one.
    """
    step_dir, dest = pathlib.Path(step_dir), pathlib.Path(dest_dir)
    manifest = _read_manifest(step_dir)
    config = _read_file(step_dir, CONFIG, manifest).decode("utf-8")
    shutil.copytree(step_dir, dest)
    added = "".join(f"{b.strip()}\n" for b in bindings)
    payload = f"{config.rstrip()}\n\n# Bindings added on release:\n{added}".encode()
    (dest / CONFIG).write_bytes(payload)
    manifest["files"][CONFIG] = hashlib.sha256(payload).hexdigest()
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return dest


def pack_checkpoint(step_dir, out_file) -> pathlib.Path:
    """Write a step dir as one deterministic, uncompressed ``.tar`` (written atomically).

    Members are the step dir's files (relative paths, sorted), with mtime 0, mode 0644 and
    owner 0/0, so equal checkpoints give byte-identical archives.
    """
    step_dir = pathlib.Path(step_dir)
    if not (step_dir / MANIFEST).is_file():
        raise CheckpointError(f"{step_dir} is not a step dir (no {MANIFEST}); pack one step_* dir")
    out = pathlib.Path(out_file)

    def write(file) -> None:
        with tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for rel in _files(step_dir):
                path = step_dir / rel
                info = tarfile.TarInfo(rel)
                info.size = path.stat().st_size
                info.mtime = 0
                info.mode = 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)

    write_atomic(out, write)
    _fsync_dir(out.parent)
    return out


def unpack_checkpoint(archive, dest_dir, *, sha256: str | None = None) -> pathlib.Path:
    """Turn an archive from :func:`pack_checkpoint` back into a step dir at ``dest_dir``.

    ``dest_dir`` must not exist or be empty; it appears complete or not at all (extraction
    goes to a hidden sibling, then ``os.rename``). With ``sha256``, the archive's bytes are
    checked first. Members that are not regular files, absolute, or contain ``..`` are
    refused (CorruptCheckpointError). Returns ``dest_dir``; load it with
    :func:`load_checkpoint`, which verifies every leaf.
    """
    archive = pathlib.Path(archive)
    dest = pathlib.Path(dest_dir)
    if sha256 is not None and file_sha256(archive) != sha256.lower():
        raise CorruptCheckpointError(f"{archive} fails its sha256 check (expected {sha256})")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CheckpointError(f"{dest} already exists and is not an empty dir")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-unpack-{dest.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        try:
            tar = tarfile.open(archive, "r:")
        except tarfile.TarError as err:
            raise CorruptCheckpointError(f"{archive} is not a tar archive: {err}") from None
        with tar:
            seen = set()
            for member in tar:
                rel = pathlib.PurePosixPath(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise CorruptCheckpointError(f"{archive}: member {member.name!r} is not a regular file")
                if rel.is_absolute() or ".." in rel.parts or not rel.parts or member.name in seen:
                    raise CorruptCheckpointError(f"{archive}: refusing member {member.name!r}")
                seen.add(member.name)
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        if not (tmp / MANIFEST).is_file():
            raise CorruptCheckpointError(f"{archive} holds no {MANIFEST}: not a packed checkpoint")
        _fsync_tree(tmp)
        if dest.exists():
            dest.rmdir()
        os.rename(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(dest.parent)
    return dest

r"""Pretrained models: a model index file, verified downloads through tensorstore, a local cache.

The model index is ``assets/models.toml`` (``$ZOO_MODELS`` names another file). Each
``[[models]]`` entry gives ``name``, ``system``, ``gin`` (the config it was trained with),
``recipe`` (how it was trained, in words), ``metrics`` (nll, ess_q, ess_p, path_length,
kl where exact, with ``n_samples_q``/``n_samples_p``), ``size_bytes`` and ``sha256`` of
the packed checkpoint (:func:`zoo.checkpoint.pack_checkpoint`), and ``locations``, tried
in order. A location is

- a path (relative paths resolve against the repository root),
- a URL tensorstore's kvstore understands (``file://``, ``http(s)://``, ``gs://``,
  ``s3://``), or
- a table that is a tensorstore KvStore spec whose ``path`` names the archive, e.g.
  ``{driver = "s3", bucket = "zoo-models", path = "v1/gmm_fm.tar", endpoint = "…"}``.

**Download** (:func:`download`): the archive's bytes are read with
``ts.KvStore.open(spec).read(key)``; a location that fails is retried ``attempts`` times
with exponential backoff (tensorstore's own HTTP/GCS/S3 retries are switched off so that
this one policy applies to every driver), then the next location is tried. The bytes go
to a temporary file in the cache, whose sha256 is checked; the archive is unpacked into a
temporary dir together with a ``COMPLETE`` marker holding the sha256, and one
``os.rename`` makes the entry appear. An entry is used only when its marker names the
model index's sha256, so a killed download never leaves a usable half entry; a cached entry
needs no network at all.

Cache layout (``$ZOO_CACHE``, default ``~/.cache/zoo``)::

    models/
      gmm_fm-1a2b3c4d5e6f7a8b/        <name>-<first 16 hex of the archive's sha256>
        COMPLETE                       JSON: name, sha256, size, location, time
        checkpoint/                    the unpacked step dir (manifest.json, arrays/, …)
      .tmp-gmm_fm.<host>.<pid>.<uuid>.tar    an unfinished download (removed when stale)

:func:`resolve_checkpoint` is what the tools call: an existing path is used as it is,
anything else must be a model name. :func:`release` packs a training run's latest
checkpoint into ``assets/models/<name>.tar`` and writes its model index entry.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
import tomllib
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from zoo import checkpoint as ckpt
from zoo.errors import ConfigError, did_you_mean
from zoo.flows.cnf import DESCRIPTION_SETTINGS, describe_in_words
from zoo.metrics import ess_is_a_lower_bound
from zoo.resources import ROOT as REPO_ROOT
from zoo.resources import resolve_gin_file
from zoo.storage import read_json, write_atomic

__all__ = [
    "ChecksumMismatchError",
    "DownloadError",
    "ModelInfo",
    "PretrainedError",
    "ModelIndexError",
    "UnknownModelError",
    "cache_root",
    "download",
    "draft_recipe",
    "list_models",
    "load_index",
    "model_info",
    "index_path",
    "release",
    "resolve_checkpoint",
    "write_index",
]

INDEX_FILE = REPO_ROOT / "assets" / "models.toml"
ENV_INDEX = "ZOO_MODELS"
ENV_CACHE = "ZOO_CACHE"
COMPLETE = "COMPLETE"
CHECKPOINT = "checkpoint"
REQUIRED_FIELDS = ("name", "system", "gin", "recipe", "metrics", "size_bytes", "sha256", "locations")
METRIC_KEYS = (
    "nll", "ess_q", "ess_p", "nll_se", "ess_q_se", "ess_p_se", "path_length", "kl", "fm_loss", "n_samples_q", "n_samples_p",
    "top_weight_share_q", "top_weight_share_p", "top_log_q_error_q", "top_log_q_error_p", "n_top_checked",
    "log_q_offset_q", "log_q_offset_p", "top_log_q_excess_q", "top_log_q_excess_p",
)  # fmt: skip
# Temporary files older than this are taken to belong to a dead download even when their
# owner cannot be checked (another host sharing the cache).
STALE_AFTER_S = 24 * 3600
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Tensorstore's context resource that sets each remote driver's own retry policy.
_RETRY_RESOURCE = {"http": "http_request_retries", "gcs": "gcs_request_retries", "s3": "s3_request_retries"}


# ---------------------------------------------------------------------------- errors
class PretrainedError(ckpt.CheckpointError):
    """Base class of model index and download errors (a CheckpointError, so tools report it)."""


class ModelIndexError(PretrainedError):
    """The model index file is missing or an entry is malformed."""


class UnknownModelError(PretrainedError):
    """A name that is neither an existing path nor a model index entry."""


class ChecksumMismatchError(PretrainedError, ckpt.CorruptCheckpointError):
    """Downloaded bytes whose sha256 (or size) differs from the model index's."""


class DamagedCacheError(PretrainedError, ckpt.CorruptCheckpointError):
    """A cache entry that was complete when downloaded no longer matches its checksums."""


class DownloadError(PretrainedError):
    """No location of a model could be read."""


# ---------------------------------------------------------------------------- the model index
@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """One model index entry (``extra`` keeps any further fields of the entry)."""

    name: str
    system: str
    gin: str
    recipe: str
    metrics: Mapping[str, float]
    size_bytes: int
    sha256: str
    locations: tuple[str | Mapping[str, Any], ...]
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def parent(self) -> str | None:
        """The released model this one was fine-tuned from (the entry's ``parent``), if any."""
        return self.extra.get("parent")

    @property
    def parent_sha256(self) -> str | None:
        """The sha256 of the parent's archive that was fine-tuned (a later re-release of the parent differs)."""
        return self.extra.get("parent_sha256")

    @property
    def summary(self) -> str:
        """The recipe's first clause (up to the first ';' of its first line), for tables."""
        return self.recipe.strip().splitlines()[0].split(";")[0].strip() if self.recipe.strip() else ""


def index_path(model_index=None) -> Path:
    """The model index file: ``model_index`` if given, else ``$ZOO_MODELS``, else ``assets/models.toml``."""
    if model_index is not None:
        return Path(model_index)
    env = os.environ.get(ENV_INDEX)
    return Path(env) if env else INDEX_FILE


def cache_root(path=None) -> Path:
    """The cache root: ``path`` if given, else ``$ZOO_CACHE``, else ``~/.cache/zoo``."""
    if path is not None:
        return Path(path).expanduser()
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "zoo"


def _read_index_file(path: Path) -> list[dict]:
    """The raw ``[[models]]`` tables of a model index file ([] when the file does not exist)."""
    if not path.exists():
        return []
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ModelIndexError(f"{path} is not valid TOML: {e}") from None
    models = data.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        raise ModelIndexError(f"{path}: 'models' must be an array of tables ([[models]])")
    return models


def _check_entry(raw: dict, where: str) -> ModelInfo:
    missing = [k for k in REQUIRED_FIELDS if k not in raw]
    if missing:
        raise ModelIndexError(f"{where} lacks {', '.join(missing)}")
    name = raw["name"]
    if not isinstance(name, str) or not _NAME.match(name):
        raise ModelIndexError(f"{where}: name {name!r} must be letters, digits, '_', '.', '-' (it names cache folders)")
    for key in ("system", "gin", "recipe"):
        if not isinstance(raw[key], str):
            raise ModelIndexError(f"{where} ({name}): {key} must be a string, got {type(raw[key]).__name__}")
    sha = raw["sha256"]
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise ModelIndexError(f"{where} ({name}): sha256 must be 64 lowercase hex digits, got {sha!r}")
    size = raw["size_bytes"]
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ModelIndexError(f"{where} ({name}): size_bytes must be a positive integer, got {size!r}")
    metrics = raw["metrics"]
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in metrics.values()):
        raise ModelIndexError(f"{where} ({name}): metrics must be a table of numbers")
    locations = raw["locations"]
    if not isinstance(locations, list) or not locations:
        raise ModelIndexError(f"{where} ({name}): locations must be a non-empty list")
    for loc in locations:
        if not isinstance(loc, (str, dict)) or not loc:
            raise ModelIndexError(f"{where} ({name}): a location must be a path, a URL or a kvstore spec table, got {loc!r}")
    parent = raw.get("parent")
    if parent is not None and (not isinstance(parent, str) or not _NAME.match(parent) or parent == name):
        raise ModelIndexError(f"{where} ({name}): parent must name another model of the index, got {parent!r}")
    parent_sha = raw.get("parent_sha256")
    if parent_sha is not None and (parent is None or not isinstance(parent_sha, str) or not _SHA256.match(parent_sha)):
        raise ModelIndexError(f"{where} ({name}): parent_sha256 must be the parent's 64 lowercase hex digits, got {parent_sha!r}")
    extra = {k: v for k, v in raw.items() if k not in REQUIRED_FIELDS}
    return ModelInfo(
        name=name,
        system=raw["system"],
        gin=raw["gin"],
        recipe=raw["recipe"],
        metrics=dict(metrics),
        size_bytes=size,
        sha256=sha,
        locations=tuple(locations),
        extra=extra,
    )


def load_index(model_index=None) -> dict[str, ModelInfo]:
    """All entries of the model index file, by name, in file order (validated)."""
    path = index_path(model_index)
    out: dict[str, ModelInfo] = {}
    for i, raw in enumerate(_read_index_file(path)):
        info = _check_entry(raw, f"{path}: models[{i}]")
        if info.name in out:
            raise ModelIndexError(f"{path}: model {info.name!r} appears twice")
        out[info.name] = info
    for info in out.values():
        if info.parent is not None and info.parent not in out:
            raise ModelIndexError(f"{path}: {info.name} names {info.parent!r} as its parent, which the index does not hold")
    return out


def list_models(model_index=None) -> list[str]:
    """The names of the registered pretrained models, in index order."""
    return list(load_index(model_index))


def _unknown(name: str, known: Sequence[str], *, as_path: bool = False) -> UnknownModelError:
    lead = (
        f"{name!r} is neither an existing checkpoint path nor a pretrained model name"
        if as_path
        else f"no pretrained model named {name!r}"
    )
    listing = f" Known models: {', '.join(known)}." if known else " The model index is empty."
    return UnknownModelError(f"{lead}{did_you_mean(name, known)}.{listing} (`tools/zoo list --models` shows them)")


def model_info(name: str, model_index=None) -> ModelInfo:
    """The model index entry of ``name`` (UnknownModelError suggests the closest names)."""
    models = load_index(model_index)
    if name not in models:
        raise _unknown(name, list(models))
    return models[name]


def evaluation_table(info: ModelInfo) -> dict:
    """How the released metrics were computed: the entry's ``evaluation`` table, in the keys
    of :meth:`zoo.flows.CNF.describe` (``flow.as_described(table)`` reproduces them).

    A model may be trained with a cheaper solver than the one its log densities need (DW4:
    RK4 with 20 steps errs by up to 3.8 nats, Dopri5 at 1e-5 by 0.014).
    """
    return _evaluation_table(info.extra.get("evaluation", {}))


def evaluation_bindings(info: ModelInfo) -> list[str]:
    """:func:`evaluation_table` as gin bindings of ``CNF``."""
    return [f"CNF.{DESCRIPTION_SETTINGS[key]} = {value!r}" for key, value in evaluation_table(info).items()]


#: The metrics a fine-tuned model is set against its parent's, in the order tables show them.
GAIN_METRICS = ("nll", "ess_q", "ess_p", "path_length")
GAIN_LABELS = {"nll": "NLL", "ess_q": "ESS-q", "ess_p": "ESS-p", "path_length": "path length"}


@dataclasses.dataclass(frozen=True)
class FineTuningGain:
    """A fine-tuned model's released metrics against its parent's.

    ``change[key]`` is (child − parent, standard error of the change or None). The error
    adds the two evaluations' standard errors in quadrature, as for independent samples:
    right for the model samples, an overstatement for NLL and ESS-p when both evaluations
    used the same test samples (same count), whose per-sample terms then largely cancel.
    An ESS that is only a lower bound (Hutchinson log densities) on either side gets no
    change. ``differences`` names how the two evaluations differ (solver, sample counts);
    empty when they were measured alike, the only case in which the change is the model's.
    """

    child: str
    parent: str
    change: Mapping[str, tuple[float, float | None]]
    differences: tuple[str, ...]

    @property
    def alike(self) -> bool:
        return not self.differences

    def significance(self, key: str) -> float | None:
        """The change of ``key`` in standard errors (None without one)."""
        value, se = self.change.get(key, (math.nan, None))
        return value / se if se else None

    def change_in_words(self, key: str) -> str:
        """'+0.216 ± 0.060 (+3.6 SE)'; '-0.149' without an error; '-' where there is no change."""
        if key not in self.change:
            return "-"
        value, se = self.change[key]
        if se is None:
            return f"{value:+.3g}"
        return f"{value:+.3f} ± {se:.3f} ({value / se:+.1f} SE)" if se else f"{value:+.3f} ± 0"

    def in_words(self) -> str:
        """One line: every change, and whether both models were evaluated alike."""
        changes = ", ".join(f"{GAIN_LABELS[k]} {self.change_in_words(k)}" for k in GAIN_METRICS if k in self.change)
        how = "evaluated alike" if self.alike else "NOT evaluated alike: " + "; ".join(self.differences)
        return f"against {self.parent}: {changes} ({how})"


def fine_tuning_gain(child: ModelInfo, parent: ModelInfo) -> FineTuningGain:
    """``child``'s metrics against ``parent``'s (see :class:`FineTuningGain`)."""
    evaluations = [p.extra.get("evaluation", {}) for p in (parent, child)]
    change = {}
    for key in GAIN_METRICS:
        if key not in parent.metrics or key not in child.metrics:
            continue
        if key.startswith("ess") and any(ess_is_a_lower_bound(e) for e in evaluations):
            continue
        ses = [m.metrics.get(f"{key}_se") for m in (parent, child)]
        se = math.hypot(*ses) if None not in ses else None
        change[key] = (child.metrics[key] - parent.metrics[key], se)
    differences = []
    if child.parent_sha256 not in (None, parent.sha256):
        differences.append(f"fine-tuned from an earlier release of {parent.name} (sha256 {child.parent_sha256[:12]}…)")
    if evaluations[0] != evaluations[1]:
        differences.append(" vs ".join(describe_in_words(e) for e in evaluations))
    counts = [(m.metrics.get("n_samples_q"), m.metrics.get("n_samples_p")) for m in (parent, child)]
    if counts[0] != counts[1]:
        differences.append(" vs ".join(f"n={q}/{p}" for q, p in counts))
    return FineTuningGain(child=child.name, parent=parent.name, change=change, differences=tuple(differences))


def fine_tuning_gains(models: Mapping[str, ModelInfo], *, involving: str | None = None) -> list[FineTuningGain]:
    """Every model of ``models`` (:func:`load_index`) with a parent, against it, in index order;
    with ``involving``, only the pairs in which that model is the child or the parent."""
    return [
        fine_tuning_gain(info, models[info.parent])
        for info in models.values()
        if info.parent in models and involving in (None, info.name, info.parent)
    ]


# ---------------------------------------------------------------------------- locations
def _kvstore_location(location) -> tuple[dict, str, str]:
    """(kvstore spec of the archive's folder, key of the archive, label for messages)."""
    import tensorstore as ts

    if isinstance(location, str):
        label = location
        if "://" in location:
            try:
                spec = ts.KvStore.Spec(location).to_json()
            except ValueError as e:
                raise DownloadError(f"location {location!r} is not a URL tensorstore understands: {e}") from None
        else:
            spec = {"driver": "file", "path": str(_repo_path(location))}
    else:
        label = json.dumps(location, sort_keys=True)
        try:
            spec = ts.KvStore.Spec(dict(location)).to_json()
        except (ValueError, TypeError) as e:
            raise DownloadError(f"location {label} is not a tensorstore kvstore spec: {e}") from None
        if spec.get("driver") == "file" and not Path(spec.get("path", "")).is_absolute():
            spec["path"] = str(_repo_path(spec.get("path", "")))
    path = spec.get("path", "")
    folder, _, key = path.rpartition("/")
    if not key:
        raise DownloadError(f"location {label!r} names a folder, not the archive file")
    spec["path"] = folder + "/" if folder or path.startswith("/") else ""
    return spec, key, label


def _repo_path(path: str) -> Path:
    # Normalised: tensorstore's file driver refuses '..' components.
    return Path(os.path.abspath(REPO_ROOT / Path(path).expanduser()))


class _Missing(Exception):
    """The location answered that the archive does not exist (not worth retrying)."""


#: Seconds between two "still waiting" lines while a location has not answered.
HEARTBEAT_S = 10.0
#: Default total seconds a download may spend on all its locations and attempts.
DEFAULT_DEADLINE_S = 600.0


def _read_once(location, timeout_s: float, log=None) -> bytes:
    import tensorstore as ts

    spec, key, label = _kvstore_location(location)
    resource = _RETRY_RESOURCE.get(spec.get("driver"))
    if resource is not None:
        context = dict(spec.get("context", {}))
        context.setdefault(resource, {"max_retries": 0})
        spec["context"] = context
    start = time.monotonic()
    store = ts.KvStore.open(spec).result(timeout=timeout_s)
    future = store.read(key)
    while True:  # wait in slices, saying so, so that a silent server is visibly a silent server
        left = timeout_s - (time.monotonic() - start)
        if left <= 0:
            future.cancel()
            raise TimeoutError(f"no complete answer within {timeout_s:.0f} s")
        try:
            result = future.result(timeout=min(HEARTBEAT_S, left))
            break
        except TimeoutError:
            if log is not None and timeout_s - (time.monotonic() - start) > 0:
                log(f"  still waiting for {label}: {time.monotonic() - start:.0f} s of at most {timeout_s:.0f} s")
    if result.state != "value":
        raise _Missing(f"{label} does not exist")
    return result.value


def _read_location(location, *, attempts: int, backoff_s: float, timeout_s: float, deadline: float, log) -> bytes:
    """The bytes at ``location``; transient failures are retried with exponential backoff.

    ``deadline`` (a ``time.monotonic()`` value) bounds every attempt and wait.
    """
    last: Exception | None = None
    for attempt in range(attempts):
        if attempt:
            delay = backoff_s * 2 ** (attempt - 1)
            if time.monotonic() + delay >= deadline:
                break
            log(f"  retrying in {delay:.1g} s ({type(last).__name__}: {_short(last)})")
            time.sleep(delay)
        left = deadline - time.monotonic()
        if left <= 0:
            break
        attempt_s = min(timeout_s, left)
        log(f"  attempt {attempt + 1}/{attempts} (gives up after {attempt_s:.0f} s)")
        try:
            return _read_once(location, attempt_s, log)
        except (_Missing, DownloadError):
            raise
        except Exception as e:  # tensorstore reports network failures as ValueError
            last = e
    if last is None:
        raise TimeoutError("the download deadline passed before this location was tried")
    raise last


def _short(err: BaseException | None, limit: int = 300) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---------------------------------------------------------------------------- cache
def _entry_dir(root: Path, info: ModelInfo) -> Path:
    return root / "models" / f"{info.name}-{info.sha256[:16]}"


def _is_complete(entry: Path, sha256: str) -> bool:
    try:
        marker = json.loads((entry / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256 and (entry / CHECKPOINT / ckpt.MANIFEST).is_file()


def _temp_name(name: str) -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())
    return f".tmp-{name}.{host}.{os.getpid()}.{uuid.uuid4().hex[:12]}"


def _owner_dead(path: Path) -> bool:
    """Whether the temporary ``path`` belongs to no running download."""
    try:
        age = time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if age > STALE_AFTER_S:
        return True
    parts = path.name.split(".")
    # .tmp-<name>.<host>.<pid>.<uuid>[.tar]; names may contain dots, so count from the end.
    stem = parts[:-1] if path.name.endswith(".tar") else parts
    if len(stem) < 4 or not stem[-2].isdigit():
        return False
    host, pid = stem[-3], int(stem[-2])
    if host != re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _clean_litter(models: Path) -> None:
    """Remove unfinished downloads of dead processes and entries on their way out."""
    if not models.is_dir():
        return
    for p in models.iterdir():
        if p.name.startswith(".trash-") or (p.name.startswith(".tmp-") and _owner_dead(p)):
            _remove(p)


def _discard(entry: Path) -> None:
    """Move an entry out of the way atomically, then delete it."""
    if not entry.exists():
        return
    trash = entry.with_name(f".trash-{entry.name}-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:
        return
    _remove(trash)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _install(models: Path, info: ModelInfo, payload: bytes, source: str, *, force: bool = False) -> Path:
    """Write, verify, unpack and atomically publish one downloaded archive; returns the entry."""
    entry = _entry_dir(models.parent, info)
    base = _temp_name(info.name)
    archive = models / f"{base}.tar"
    staging = models / base
    try:
        with open(archive, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        size = archive.stat().st_size
        digest = ckpt.file_sha256(archive)
        if size != info.size_bytes or digest != info.sha256:
            raise ChecksumMismatchError(
                f"{source}: got {size} bytes with sha256 {digest}, expected {info.size_bytes} bytes with sha256 {info.sha256}"
            )
        staging.mkdir()
        ckpt.unpack_checkpoint(archive, staging / CHECKPOINT)
        ckpt.verify_checkpoint(staging / CHECKPOINT)
        marker = {
            "name": info.name,
            "sha256": info.sha256,
            "size_bytes": info.size_bytes,
            "source": source,
            "downloaded": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (staging / COMPLETE).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        _fsync(staging / COMPLETE)
        _fsync(staging)
        if force or not _is_complete(entry, info.sha256):
            _discard(entry)  # replaced by a verified copy; a racing writer's complete entry is kept
        try:
            os.rename(staging, entry)
        except OSError:
            # Another process published the same entry meanwhile; theirs is as good as ours.
            if not _is_complete(entry, info.sha256):
                raise
        _fsync(models)
        return entry
    finally:
        archive.unlink(missing_ok=True)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def download(
    name: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    model_index=None,
    attempts: int = 3,
    backoff_s: float = 1.0,
    timeout_s: float | None = None,
    deadline_s: float | None = DEFAULT_DEADLINE_S,
    verify: bool = False,
    quiet: bool = False,
) -> Path:
    """The unpacked checkpoint step dir of pretrained model ``name`` in the cache.

    A complete cache entry (its marker names the model index's sha256) is returned without
    network access unless ``force`` (which replaces it only once a new copy is verified). Otherwise each location is read in turn, each tried
    ``attempts`` times with backoff ``backoff_s · 2^k`` seconds and a per-attempt
    ``timeout_s`` (default 120 s plus 1 s per MiB), all within ``deadline_s`` seconds in
    total (None: no bound); the first archive with the right size and sha256 is unpacked
    and published atomically. Unless ``quiet``, each attempt and every
    :data:`HEARTBEAT_S` seconds without an answer is reported on stderr.

    ``verify`` re-hashes a cached entry's files before returning it (a few milliseconds
    per MB) and raises :class:`DamagedCacheError`, naming the entry and ``--force``, when
    one was changed after the download.

    Raises UnknownModelError, ChecksumMismatchError (every location that answered sent
    other bytes), DownloadError (nothing reachable; every location and its error listed).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"deadline_s must be positive or None, got {deadline_s}")
    info = model_info(name, model_index)
    root = cache_root(cache_dir)
    models = root / "models"
    entry = _entry_dir(root, info)
    if not force and _is_complete(entry, info.sha256):
        if verify:
            _verify_entry(entry, info)
        return entry / CHECKPOINT
    # An entry without a valid marker was not published by a finished download: never used.
    # With ``force`` the old entry stays until the new one is ready (see _install).
    if not force and entry.exists():
        _discard(entry)
    models.mkdir(parents=True, exist_ok=True)
    _clean_litter(models)
    if timeout_s is None:
        timeout_s = 120.0 + info.size_bytes / 2**20
    deadline = time.monotonic() + (math.inf if deadline_s is None else deadline_s)

    def log(msg):
        if not quiet:
            print(msg, file=sys.stderr, flush=True)

    failures: list[tuple[str, str]] = []
    mismatches = 0
    for location in info.locations:
        label = location if isinstance(location, str) else json.dumps(location, sort_keys=True)
        log(f"zoo: downloading {info.name} ({_human_size(info.size_bytes)}) from {label}")
        try:
            payload = _read_location(location, attempts=attempts, backoff_s=backoff_s, timeout_s=timeout_s, deadline=deadline, log=log)
            entry = _install(models, info, payload, label, force=force)
        except ChecksumMismatchError as e:
            mismatches += 1
            failures.append((label, str(e)))
            log(f"  checksum mismatch: {e}")
            continue
        except Exception as e:
            failures.append((label, _short(e) if isinstance(e, _Missing) else f"{type(e).__name__}: {_short(e)}"))
            log(f"  failed: {_short(e)}")
            continue
        return entry / CHECKPOINT
    listing = "\n".join(f"  - {loc}: {err}" for loc, err in failures)
    if time.monotonic() >= deadline:
        listing += f"\n  (stopped at the {deadline_s:.0f} s deadline; a longer one: tools/download --deadline)"
    if mismatches:
        raise ChecksumMismatchError(
            f"pretrained model {info.name!r}: no location gave the archive with sha256 {info.sha256} "
            f"({mismatches} sent other bytes; nothing was cached):\n{listing}"
        )
    raise DownloadError(
        f"pretrained model {info.name!r} could not be downloaded from any of its {len(info.locations)} "
        f"location(s) ({attempts} attempt(s) each) and is not in the cache {root}:\n{listing}"
    )


def _verify_entry(entry: Path, info: ModelInfo) -> None:
    try:
        ckpt.verify_checkpoint(entry / CHECKPOINT)
    except ckpt.CheckpointError as e:
        raise DamagedCacheError(
            f"the cached copy of pretrained model {info.name!r} in {entry} was changed after its download ({e}); "
            f"`tools/download {info.name} --force` replaces it"
        ) from None


def released_info(name_or_path, model_index=None) -> ModelInfo | None:
    """The model index entry when ``name_or_path`` names a released model rather than an existing path."""
    if Path(os.fspath(name_or_path)).expanduser().exists():
        return None
    return model_info(os.fspath(name_or_path), model_index)


def resolve_checkpoint(name_or_path, *, cache_dir=None, model_index=None) -> Path:
    """A checkpoint folder for ``name_or_path``: an existing path as it is, else a downloaded released model.

    A cached model is re-verified each time (its files are a few MB), so damage after the
    download is reported as such, with the command that repairs it.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.exists():
        return path
    name = os.fspath(name_or_path)
    models = load_index(model_index)
    if name not in models:
        raise _unknown(name, list(models), as_path=True)
    return download(name, cache_dir=cache_dir, model_index=model_index, verify=True)


def _human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


# ---------------------------------------------------------------------------- writing the model index
HEADER = """\
# Pretrained models of the zoo (read by zoo/pretrained.py; `tools/zoo list --models`).
# Entries are written by `tools/release-model`: sha256 and size_bytes are those of the
# packed checkpoint (.tar); recipe says how it was trained; metrics, with evaluation (how they
# were measured), are the archive's latest evaluation (metrics.json; release-model --reevaluated).
# locations are tried in order: a path relative to the repository root, or any URL or
# kvstore spec table tensorstore reads (file://, http(s)://, gs://, s3://).
"""


def _toml_key(key: str) -> str:
    return key if re.match(r"^[A-Za-z0-9_-]+$", key) else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _dump_index(entries: Sequence[Mapping[str, Any]]) -> str:
    lines = [HEADER]
    for entry in entries:
        lines.append("[[models]]")
        tables = {k: v for k, v in entry.items() if isinstance(v, Mapping)}
        for key, value in entry.items():
            if key not in tables:
                lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        for key, table in tables.items():
            lines.append(f"\n[models.{_toml_key(key)}]")
            lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines)


def _same(a, b) -> bool:
    """Structural equality in which NaN equals NaN (and tuples equal lists)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def write_index(entries: Sequence[Mapping[str, Any]], model_index=None) -> Path:
    """Write raw entries as the model index file (atomically), after validating each."""
    path = index_path(model_index)
    for i, raw in enumerate(entries):
        _check_entry(dict(raw), f"entry {i}")
    text = _dump_index(entries)
    if not _same([dict(e) for e in entries], tomllib.loads(text).get("models", [])):  # the writer must round-trip
        raise ModelIndexError("internal error: the model index text does not read back as written")
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------- releasing
def _run_step_dir(workdir_or_checkpoint) -> tuple[Path, Path | None]:
    """(step dir, the run's workdir if found) for a workdir, a checkpoint root or a step dir."""
    p = Path(workdir_or_checkpoint)
    if (p / ckpt.MANIFEST).is_file():
        step = p
    else:
        step = ckpt.latest_checkpoint(p / "checkpoint") or ckpt.latest_checkpoint(p)
        if step is None:
            raise ckpt.CheckpointNotFoundError(f"no checkpoint in {p} (looked in {p / 'checkpoint'} and {p})")
    for candidate in (step.parent.parent, step.parent, p):
        if (candidate / "metrics.json").is_file():
            return step, candidate
    return step, None


def _read_log(workdir: Path | None) -> list[dict]:
    if workdir is None or not (workdir / "log.jsonl").is_file():
        return []
    records = []
    for line in (workdir / "log.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash
    return records


def _binding(config: str, name: str) -> str | None:
    m = re.search(rf"^{re.escape(name)}\s*=\s*(.+)$", config, flags=re.MULTILINE)
    return m.group(1).strip() if m else None


def this_machine() -> str:
    """A short description of the machine running now: CPU count and JAX's devices."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    devices = jax.devices()
    accel = "" if jax.default_backend() == "cpu" else f", {len(devices)}× {devices[0].device_kind}"
    return f"{os.cpu_count()} CPU cores ({cpu}){accel}, JAX {jax.__version__} on {jax.default_backend()}"


def draft_recipe(workdir_or_checkpoint, *, machine: str | None = None) -> str:
    """A recipe text from a run's stored config and log: loss, steps, batch, optimizer, wall time, machine.

    ``machine`` defaults to :func:`this_machine`, which is right only when releasing on
    the machine that trained the model.
    """
    step_dir, workdir = _run_step_dir(workdir_or_checkpoint)
    info = ckpt.read_checkpoint_info(step_dir)
    cfg = info.config
    loss = (_binding(cfg, "train.loss") or info.metadata.get("loss", "?")).lstrip("@").rstrip("()")
    opt = (_binding(cfg, "train.optimizer") or "?").lstrip("@").rstrip("()")
    lr = _binding(cfg, f"{opt}.learning_rate") or _binding(cfg, "learning_rate")
    batch = _binding(cfg, "train.batch_size") or "256 (default)"
    parts = [f"{loss}, {info.step} steps, batch {batch}, {opt}" + (f" lr {lr}" if lr else "")]
    log = _read_log(workdir)
    train_s = max((r["time_s"] for r in log if isinstance(r.get("time_s"), (int, float))), default=None)
    compile_s = sum(r["compile_s"] for r in log if isinstance(r.get("compile_s"), (int, float)))
    if train_s is not None:
        parts.append(f"{train_s:.0f} s training" + (f" (+{compile_s:.0f} s compilation)" if compile_s else ""))
    parts.append(machine or this_machine())
    return "; ".join(parts)


def release(
    workdir_or_checkpoint,
    name: str,
    *,
    gin_file,
    recipe: str | None = None,
    dest="assets/models",
    model_index=None,
    locations: Sequence[str | Mapping[str, Any]] = (),
    machine: str | None = None,
    bindings: Sequence[str] = (),
    parent: str | None = None,
) -> ModelInfo:
    r"""Pack a run's latest checkpoint as ``dest/<name>.tar`` and write its model index entry.

    ``workdir_or_checkpoint`` is a training workdir (``WORKDIR/checkpoint`` is used), a
    checkpoint root or one step dir. The metrics come from the run's ``metrics.json``,
    which must describe the released step (the last step in ``log.jsonl``). ``dest`` and a
    relative ``gin_file`` resolve against the repository root. The entry's locations are
    the archive (relative to the repository when inside it) followed by ``locations``
    (mirrors). An existing entry of the same name is replaced in place. ``recipe``
    defaults to :func:`draft_recipe`. ``bindings`` (gin) are appended to the released
    checkpoint's stored config, e.g. ``stored_dataset.path = 'assets/data/lj13'`` for a run
    trained on a data set in the cache: its metrics.json must then have been computed with
    them too (``tools/evaluate RUN --gin_param=...``), so that the release reproduces them.
    ``parent``: the released model the run was fine-tuned from; by default the model index
    name the run's ``finetune.pretrained`` binds (see :func:`_fine_tuned_from`).
    """
    if not _NAME.match(name):
        raise ModelIndexError(f"model name {name!r} must be letters, digits, '_', '.', '-'")
    step_dir, workdir = _run_step_dir(workdir_or_checkpoint)
    info = ckpt.verify_checkpoint(step_dir)
    if workdir is None:
        raise ModelIndexError(f"no metrics.json beside {step_dir}: evaluate the run (tools/evaluate) before releasing it")
    log = _read_log(workdir)
    last_step = max((r["step"] for r in log if isinstance(r.get("step"), int)), default=None)
    if last_step is not None and last_step != info.step:
        raise ModelIndexError(
            f"{workdir}/metrics.json describes the run's last step {last_step}, but the checkpoint is step {info.step}"
        )
    raw_metrics = read_json(workdir / "metrics.json")
    metrics = _index_metrics(raw_metrics, workdir / "metrics.json")

    try:
        given = Path(gin_file)
        gin_path = given if given.is_file() else _repo_path(str(gin_file))
        gin_path = gin_path if gin_path.is_file() else resolve_gin_file(gin_file)
    except ConfigError as e:
        raise ModelIndexError(str(e)) from None
    gin_rel = _relative_to_repo(gin_path)

    dest_dir = _repo_path(str(dest))
    dest_dir.mkdir(parents=True, exist_ok=True)
    if bindings:
        with tempfile.TemporaryDirectory() as tmp:
            archive = ckpt.pack_checkpoint(ckpt.copy_with_bindings(step_dir, Path(tmp) / step_dir.name, bindings), dest_dir / f"{name}.tar")
    else:
        archive = ckpt.pack_checkpoint(step_dir, dest_dir / f"{name}.tar")
    sha = ckpt.file_sha256(archive)
    entry = {
        "name": name,
        "system": info.metadata.get("system", "?"),
        "gin": gin_rel,
        "recipe": recipe if recipe is not None else draft_recipe(step_dir, machine=machine),
        "size_bytes": archive.stat().st_size,
        "sha256": sha,
        "locations": [_relative_to_repo(archive), *locations],
        "step": info.step,
        "created": info.created,
        "zoo_version": info.zoo_version,
        "metrics": metrics,
    }
    evaluation = _evaluation_table(raw_metrics)
    if evaluation:
        entry["evaluation"] = evaluation
    path = index_path(model_index)
    entries = _read_index_file(path)
    names = [e.get("name") for e in entries]
    lineage = {"parent": parent} if parent is not None else _fine_tuned_from(info.config, name, entries)
    if lineage:
        parent = lineage["parent"]
        if parent == name or parent not in names:
            raise ModelIndexError(f"the parent of {name} must be another model of {path}, got {parent!r}")
        lineage.setdefault("parent_sha256", entries[names.index(parent)]["sha256"])
        at = list(entry).index("recipe") + 1
        entry = dict([*list(entry.items())[:at], *lineage.items(), *list(entry.items())[at:]])
    if name in names:
        old = entries[names.index(name)]
        if old.get("sha256") == sha and not locations:
            entry["locations"] = list(old.get("locations", entry["locations"]))
        entries[names.index(name)] = entry
    else:
        entries.append(entry)
    write_index(entries, path)
    return _check_entry(entry, name)


def _fine_tuned_from(config: str, name: str, entries: Sequence[Mapping[str, Any]]) -> dict:
    """The ``parent`` of a fine-tuning run: its ``finetune.pretrained`` when that is a name in
    the index (a checkpoint folder names no released model: {}). A run that continued
    ``name`` itself keeps the lineage ``name`` has, ``parent_sha256`` included."""
    bound = _binding(config, "finetune.pretrained")
    pretrained = bound.strip("'\"") if bound else None
    by_name = {e.get("name"): e for e in entries}
    if pretrained == name:
        return {k: by_name[name][k] for k in ("parent", "parent_sha256") if k in by_name.get(name, {})}
    return {"parent": pretrained} if pretrained in by_name else {}


def _index_metrics(raw: Mapping[str, Any], where) -> dict:
    """The model index's metrics table from a metrics.json (counts as int, the rest as float)."""
    metrics = {}
    for key in METRIC_KEYS:
        if key in raw:
            metrics[key] = int(raw[key]) if key.startswith("n_") else float(raw[key])  # "nan"/"inf" strings too
    for key in ("nll", "ess_q", "ess_p", "n_samples_q", "n_samples_p"):
        if key not in metrics:
            raise ModelIndexError(f"{where} lacks {key}")
    return metrics


def _evaluation_table(raw: Mapping[str, Any]) -> dict:
    return {k: raw[k] for k in DESCRIPTION_SETTINGS if k in raw}


def replace_metrics(name: str, metrics_file, *, model_index=None) -> ModelInfo:
    """Replace a released model's metrics by a new evaluation of the same archive.

    ``metrics_file`` must be the ``metrics.json`` of ``tools/evaluate NAME`` (it records
    the model name it evaluated). The archive, sha256 and recipe stay as they are: the
    recipe says how the model was trained, the entry's ``evaluation`` table and sample
    counts say how its metrics were measured.
    """
    metrics_file = Path(metrics_file)
    raw = read_json(metrics_file)
    if raw.get("checkpoint") != name:
        raise ModelIndexError(
            f"{metrics_file} is an evaluation of {raw.get('checkpoint')!r}, not of the released {name!r}: "
            f"run tools/evaluate {name} --workdir=DIR and pass DIR/metrics.json"
        )
    path = index_path(model_index)
    entries = _read_index_file(path)
    names = [e.get("name") for e in entries]
    if name not in names:
        raise _unknown(name, [n for n in names if n])
    entry = dict(entries[names.index(name)])
    entry["metrics"] = _index_metrics(raw, metrics_file)
    # The previous evaluation's settings go with its metrics, even those the new one does not name.
    entry.pop("evaluation", None)
    evaluation = _evaluation_table(raw)
    if evaluation:
        entry["evaluation"] = evaluation
    entries[names.index(name)] = entry
    write_index(entries, path)
    return _check_entry(entry, name)


def _relative_to_repo(path: Path) -> str:
    path = Path(path).resolve()
    try:
        return path.relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return str(path)

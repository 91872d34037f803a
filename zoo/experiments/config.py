"""Gin configuration: finding config files, parsing them with clear errors, building models.

A bare name such as ``--gin=gmm_fm.gin`` resolves against the repository's ``gin/``
folder (and any folders in ``$ZOO_GIN_PATH``), as users type it; a path that exists is
used as given.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path

import gin
from zoo import resources
from zoo.errors import ConfigError
from zoo.flows.cnf import CNF
from zoo.resources import gin_search_path, resolve_gin_file  # noqa: F401  (part of this module's interface)

GIN_DIR = resources.GIN_DIR


@contextlib.contextmanager
def isolated():
    """Parse and build inside without changing the caller's gin configuration.

    gin keeps one global configuration; :func:`parse` clears it. A library call such as
    :func:`zoo.load` must not clear a configuration its caller parsed, so its state is
    saved and put back (gin has no public API for this; these are its module globals).
    """
    import gin.config as gc

    saved = (
        {k: dict(v) for k, v in gc._CONFIG.items()},
        dict(gc._SINGLETONS),
        set(gc._IMPORTS),
        {k: copy.copy(v) for k, v in gc._OPERATIVE_CONFIG.items()},
        gc.config_is_locked(),
    )
    try:
        yield
    finally:
        config, singletons, imports, operative, locked = saved
        gc._set_config_is_locked(False)
        gc._CONFIG.clear()
        gc._CONFIG.update(config)
        gc._SINGLETONS.clear()
        gc._SINGLETONS.update(singletons)
        gc._IMPORTS.clear()
        gc._IMPORTS.update(imports)
        with gc._OPERATIVE_CONFIG_LOCK:
            gc._OPERATIVE_CONFIG.clear()
            gc._OPERATIVE_CONFIG.update(operative)
        gc._set_config_is_locked(locked)


def parse(gin_files=(), bindings=(), *, config_str: str | None = None) -> None:
    """Clear gin and parse files, bindings (and/or a stored operative config), with clear errors."""
    from zoo.experiments import registry

    registry.import_all()
    gin.clear_config()
    search = [str(p) for p in gin_search_path()]
    for folder in search:
        gin.add_config_file_search_path(folder)
    # gin logs an ERROR each time an include is not found relative to the working
    # directory before it tries the search path; that is noise for our users.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        if config_str is not None:
            gin.parse_config(config_str)
        files = [str(resolve_gin_file(f)) for f in gin_files]
        gin.parse_config_files_and_bindings(files, list(bindings), finalize_config=False)
    except ConfigError:
        raise
    except (ValueError, KeyError, SyntaxError, TypeError, OSError) as e:
        raise ConfigError(f"invalid gin configuration: {e}") from e
    finally:
        root.setLevel(level)


def stored_config(pretrained) -> tuple[Path, str]:
    """The checkpoint folder of ``pretrained`` (a path or a model-index name) and its stored config."""
    from zoo import checkpoint
    from zoo.pretrained import resolve_checkpoint

    path = resolve_checkpoint(pretrained)
    return path, checkpoint.read_checkpoint_info(path).config


def parse_over_pretrained(gin_files=(), bindings=(), *, selector: str) -> Path | None:
    """Parse files and bindings that may start from a pretrained model bound at ``selector``.

    ``selector`` is the binding that names it (``finetune.pretrained``,
    ``compare.pretrained``: a checkpoint folder or a model-index name). When it is bound,
    the checkpoint's stored config is parsed underneath the files and bindings, so the
    system, data and field are the checkpoint's own and the files change only what they
    bind. Returns the checkpoint folder, or None when ``selector`` is unbound or None.
    """
    parse(gin_files, bindings)
    try:
        pretrained = gin.query_parameter(selector)
    except ValueError:
        return None
    if pretrained is None:
        return None
    path, stored = stored_config(pretrained)
    parse(gin_files, bindings, config_str=stored)
    return path


OPERATIVE_CONFIG = "operative_config.gin"


def write_operative_config(folder, *, everything: bool = False) -> Path:
    """Record the configuration of a run as ``folder/operative_config.gin`` (atomically).

    By default the operative bindings (those the run has read so far); ``everything=True``
    writes every parsed binding, for a record made before the run has read them all (a run
    that may be killed still leaves its full configuration behind).
    """
    from zoo.storage import write_atomic

    text = gin.config_str() if everything else gin.operative_config_str()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / OPERATIVE_CONFIG, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------- model construction
@gin.configurable
def make_system(system=gin.REQUIRED):
    """The target system of the experiment (``make_system.system = @LennardJones()``)."""
    return system


@gin.configurable
def make_dataset(system, dataset=gin.REQUIRED):
    """The data set: a factory called with the system (``make_dataset.dataset = @exact_samples``)."""
    data = dataset(system)
    data.validate(system.dim)
    return data


def _accepted_kwargs(factory, available: dict) -> dict:
    """The entries of ``available`` that ``factory`` (possibly gin-wrapped) accepts by name."""
    import inspect

    target = getattr(factory, "__wrapped__", factory)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return available
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return available
    return {k: v for k, v in available.items() if k in params}


@gin.configurable
def make_flow(system, *, key, field=gin.REQUIRED, flow=CNF, base=None) -> CNF:
    """A CNF for ``system``: ``field`` is a factory (``@MLPField``), called with the shape facts it accepts."""
    base = base if base is not None else system.default_base()
    field_module = field(**_accepted_kwargs(field, system.field_kwargs()), key=key)
    return flow(field=field_module, base=base)


def restore_flow(checkpoint_dir, system):
    """The checkpoint in ``checkpoint_dir`` restored into the flow the parsed config builds for
    ``system`` (:func:`make_flow` gives the template; a stored model of another structure is
    refused by :func:`zoo.checkpoint.load_checkpoint`). Returns its ``Checkpoint`` record."""
    import jax

    from zoo import checkpoint

    return checkpoint.load_checkpoint(checkpoint_dir, model_like=make_flow(system, key=jax.random.PRNGKey(0)))

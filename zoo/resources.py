"""Where zoo's shipped files are: the configs (``gin/``) and the assets (``assets/``: the
model index, released checkpoints, small data sets, the alanine dipeptide structure).

In a source checkout (an editable install, or the tools run from the tree) they are the
checkout's top-level folders. A wheel carries them inside the package as
``zoo/_shipped/{gin,assets}`` (``pyproject.toml``). :data:`ROOT` is whichever holds them;
relative paths in configs and in the model index (``assets/data/lj13``,
``assets/models/gmm_fm.tar``) resolve against it. The cache of downloads is separate
(``$ZOO_CACHE``, :mod:`zoo.pretrained`), and outputs go where the user points the tools.
"""

from __future__ import annotations

import os
from pathlib import Path

from zoo.errors import ConfigError

PACKAGE = Path(__file__).resolve().parent
_SHIPPED = PACKAGE / "_shipped"


def _root() -> Path:
    if (_SHIPPED / "gin").is_dir():  # installed from a wheel
        return _SHIPPED
    return PACKAGE.parent  # a source checkout


#: The folder holding ``gin/`` and ``assets/``.
ROOT = _root()
GIN_DIR = ROOT / "gin"
ASSETS = ROOT / "assets"


def gin_search_path() -> list[Path]:
    """Where bare gin file names are looked up: the folders of ``$ZOO_GIN_PATH``, then ``gin/``."""
    extra = [Path(p) for p in os.environ.get("ZOO_GIN_PATH", "").split(os.pathsep) if p]
    return [*extra, GIN_DIR]


def resolve_gin_file(name: str | os.PathLike) -> Path:
    """The path of a gin file given as a path or as a bare name inside ``gin/`` (or ``$ZOO_GIN_PATH``)."""
    path = Path(name)
    if path.is_file():
        return path
    candidates = [path.name] if path.suffix == ".gin" else [path.name, path.name + ".gin"]
    for folder in gin_search_path():
        for candidate in candidates:
            if (folder / candidate).is_file():
                return folder / candidate
    available = sorted(p.name for p in GIN_DIR.glob("*.gin")) if GIN_DIR.is_dir() else []
    raise ConfigError(
        f"gin file {str(name)!r} not found (looked in the working directory and {', '.join(map(str, gin_search_path()))}); "
        f"available: {', '.join(available)}"
    )

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

from pathlib import Path

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

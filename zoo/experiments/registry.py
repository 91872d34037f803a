"""One registry for everything a gin file can name.

Each component (system, field, flow, base, loss, metric, optimizer, schedule, solver,
dataset, ...) is registered with gin under a stable, module-free name so that a gin file
writes ``@GaussianMixture2D()`` or ``train.loss = @OTFlowMatching()``. The registry also
remembers the *kind* of each name, so ``tools/zoo list`` can show users, grouped by kind,
which loss variants, fields and systems exist.

Registration goes through :func:`gin.external_configurable`, which returns a configurable
wrapper and leaves the original class untouched: a Python user calling
``MLPField(dim=2, key=key)`` gets exactly the arguments they pass, while gin references
(``@MLPField``) receive the operative bindings.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TypeVar

import gin
from zoo.errors import ZooError, did_you_mean

KINDS = (
    "system",
    "dataset",
    "base",
    "field",
    "flow",
    "solver",
    "method",
    "divergence",
    "loss",
    "coupling",
    "metric",
    "optimizer",
    "schedule",
    "recipe",
)

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    target: object
    summary: str


_REGISTRY: dict[str, Entry] = {}


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def register(kind: str, name: str | None = None) -> Callable[[T], T]:
    """Register a class or function with gin under ``name`` and record its kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")

    def decorator(obj: T) -> T:
        register_external(obj, kind=kind, name=name)
        return obj

    return decorator


def register_external(obj: object, *, kind: str, name: str | None = None, summary: str | None = None) -> None:
    """Register a (possibly third-party) callable with gin under a stable name."""
    if kind not in KINDS:
        raise ValueError(f"unknown registry kind {kind!r}; expected one of {KINDS}")
    gin_name = name or obj.__name__  # type: ignore[attr-defined]
    previous = _REGISTRY.get(gin_name)
    if previous is not None:
        if previous.target is obj:
            return
        raise ValueError(f"registry name {gin_name!r} is already taken by {previous.target!r}")
    gin.external_configurable(obj, name=gin_name)
    _REGISTRY[gin_name] = Entry(kind=kind, name=gin_name, target=obj, summary=summary or _summary(obj))


def entries(kind: str | None = None) -> list[Entry]:
    """Registered entries (all, or one kind), sorted by kind then name."""
    import_all()
    found = [e for e in _REGISTRY.values() if kind is None or e.kind == kind]
    return sorted(found, key=lambda e: (KINDS.index(e.kind), e.name.lower()))


class UnknownNameError(ZooError, KeyError):
    """A name nothing is registered under."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def lookup(name: str) -> Entry:
    import_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(f"nothing is registered as {name!r}{did_you_mean(name, _REGISTRY)}") from None


#: The modules whose import registers names: the core components (all in one module) and the
#: gin roots of the experiments (train, evaluation, finetune, compare, data generation).
REGISTERING_MODULES = (
    "zoo.experiments.configurables",
    "zoo.experiments.config",
    "zoo.experiments.runs",
    "zoo.experiments.finetune",
    "zoo.experiments.compare",
    "zoo.experiments.generate",
    "zoo.experiments.generate_ad2",
)


def import_all() -> None:
    """Import every module that registers names, so that any config can be parsed."""
    import importlib

    for module in REGISTERING_MODULES:
        importlib.import_module(module)

r"""XLA settings zoo needs for correct results, applied when ``zoo`` is imported.

XLA's while-loop-invariant code motion pass miscompiles zoo's batched fixed-step solves
on CPU (JAX 0.10.2): in a ``vmap`` of an RK4 ``diffeqsolve`` whose right-hand side is the
exact trace of an EGNN Jacobian, the log densities of part of the batch come out wrong
by 0.1–2.4 nats (entries 4–7 of a batch of 8 on the released LJ13 models; more of a
batch of 16), while each sample solved alone, a ``lax.map`` over the batch and the same
program with the pass disabled are right. Which entries break depends on the batch size
and on how the field is written, so no rewrite of ours is safe against it; the pass is
switched off for every computation instead, before JAX creates its backends. The
reproducer: ``tests/flows/test_batched_solves.py``.

``ZOO_KEEP_XLA_PASSES=1`` leaves XLA's passes as they are (to reproduce the bug or to
measure the pass's effect); zoo's chunked evaluation still checks batched against
per-sample solves (:func:`zoo.flows.cnf.log_prob_chunked`) and refuses to report metrics
when they disagree.
"""

from __future__ import annotations

import os
import warnings

#: HLO passes zoo switches off, by XLA's pass name.
DISABLED_PASSES = ("while-loop-invariant-code-motion",)
_FLAG = "--xla_disable_hlo_passes="


def with_disabled_passes(flags: str, passes=DISABLED_PASSES) -> str:
    """``flags`` (an ``XLA_FLAGS`` string) with ``passes`` added to its disabled-pass list.

    XLA reads one ``--xla_disable_hlo_passes`` list, so an existing one is extended, not
    repeated.
    """
    parts = flags.split()
    for i, part in enumerate(parts):
        if part.startswith(_FLAG):
            listed = [p for p in part[len(_FLAG) :].split(",") if p]
            parts[i] = _FLAG + ",".join(listed + [p for p in passes if p not in listed])
            return " ".join(parts)
    return " ".join(parts + [_FLAG + ",".join(passes)])


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - a JAX without this module
        return False
    return bool(getattr(xla_bridge, "_backends", None))


def apply() -> bool:
    """Disable the passes in ``XLA_FLAGS`` unless ``ZOO_KEEP_XLA_PASSES=1``; True if applied.

    Warns when JAX already created its backends (the flags are read only then): a program
    that runs JAX computations before importing zoo must import zoo first.
    """
    if os.environ.get("ZOO_KEEP_XLA_PASSES", "") == "1":
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    updated = with_disabled_passes(flags)
    if updated != flags:
        if _backends_started():
            warnings.warn(
                "zoo was imported after JAX started its backends, so XLA's while-loop-invariant code motion "
                "(which miscompiles batched exact-trace solves on CPU) stays on: import zoo before running JAX "
                "computations, or set XLA_FLAGS=--xla_disable_hlo_passes=while-loop-invariant-code-motion",
                RuntimeWarning,
                stacklevel=3,
            )
        os.environ["XLA_FLAGS"] = updated
    return True

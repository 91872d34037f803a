r"""Divergence estimators of a CNF's field: the exact trace, or Hutchinson's estimate.

Both act on the base's support: with the projector $P$ onto it (identity for a full-space
base, the mean-free subspace for particles) the divergence is $\mathrm{tr}(P\,∂v/∂x\,P)
= \mathrm{tr}(U\,∂v/∂x\,U^\top)$ for any orthonormal basis $U$ of the support (its rows).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import Array, PRNGKeyArray, Scalar, Vector
from zoo.flows.base import AbstractBase

NOISES = ("rademacher", "gaussian")


class AbstractDivergence(eqx.Module):
    """How ``∇·v`` is computed along a trajectory."""

    #: The name the metrics record (``'exact'``, ``'hutchinson'``).
    name: eqx.AbstractClassVar[str]
    #: Whether each trajectory needs a noise vector (and so log densities a PRNG key).
    needs_noise: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def velocity_and_divergence(
        self, v: Callable[[Vector], Vector], x: Vector, eps: Vector | None, base: AbstractBase
    ) -> tuple[Vector, Scalar]:
        """``v(x)`` and its divergence on the support of ``base``."""

    def draw_noise(self, key: PRNGKeyArray, n: int, dim: int, dtype) -> Array:
        """One noise vector per trajectory (before projection onto the support)."""
        raise ValueError(f"the {self.name} divergence takes no noise")


class ExactTrace(AbstractDivergence):
    r"""The trace of the Jacobian on the base's support: one forward-mode JVP per row of
    :meth:`AbstractBase.support_basis` (an orthonormal basis of the mean-free subspace for
    particle bases: (N-1)·d rows for N particles in d dimensions, not N·d).

    ``chunk``: how many basis-vector JVPs are evaluated together (None: the whole basis at
    once); smaller chunks bound the memory of the tangent tensors (b · chunk copies of the
    field's intermediates for a batch of b) at the price of a sequential loop over them, so
    they are for memory, not speed.
    """

    name: ClassVar[str] = "exact"
    needs_noise: ClassVar[bool] = False
    chunk: int | None = None

    def __check_init__(self):
        if self.chunk is not None and (isinstance(self.chunk, bool) or self.chunk < 1):
            raise ValueError(f"the trace chunk must be a positive number of basis vectors, got {self.chunk!r}")

    def velocity_and_divergence(self, v, x, eps, base):
        del eps
        basis = jnp.asarray(base.support_basis(), dtype=x.dtype)
        velocity, jvp_fn = jax.linearize(v, x)
        if self.chunk is None or self.chunk >= basis.shape[0]:
            return velocity, jnp.sum(jax.vmap(jvp_fn)(basis) * basis)
        diagonal_terms = jax.lax.map(lambda e: jnp.vdot(e, jvp_fn(e)), basis, batch_size=self.chunk)
        return velocity, jnp.sum(diagonal_terms)


class Hutchinson(AbstractDivergence):
    r"""Hutchinson's estimate $ε^\top (∂v/∂x)\,ε$ with ε held fixed along a trajectory.

    ``noise``: ``'rademacher'`` (default, the lower-variance choice) or ``'gaussian'``.
    Unbiased for log q, not for ESS or for exp(log q).
    """

    name: ClassVar[str] = "hutchinson"
    needs_noise: ClassVar[bool] = True
    noise: str = "rademacher"

    def __check_init__(self):
        if self.noise not in NOISES:
            raise ValueError(f"unknown Hutchinson noise {self.noise!r}; expected one of {NOISES}")

    def velocity_and_divergence(self, v, x, eps, base):
        del base  # the noise is drawn on the support already
        if eps is None:
            raise ValueError("Hutchinson divergence needs noise: pass a PRNG key")
        velocity, jvp = jax.jvp(v, (x,), (eps,))
        return velocity, jnp.vdot(eps, jvp)

    def draw_noise(self, key, n, dim, dtype):
        if self.noise == "rademacher":
            return jax.random.rademacher(key, (n, dim), dtype=dtype)
        return jax.random.normal(key, (n, dim), dtype=dtype)


DIVERGENCES: dict[str, type[AbstractDivergence]] = {"exact": ExactTrace, "hutchinson": Hutchinson}


def divergence_from_settings(
    divergence=None, *, noise: str | None = None, trace_chunk: int | None = None, previous: AbstractDivergence | None = None
) -> AbstractDivergence:
    """A divergence estimator from an object or a name (``'exact'``, ``'hutchinson'``) and ``CNF``'s loose settings.

    With a name (the form released configs use) the setting of the other estimator is
    ignored, as it always was (``noise`` for the exact trace, ``trace_chunk`` for
    Hutchinson); settings not given are kept from ``previous`` of the same kind. With an
    object such a setting is an error.
    """
    if isinstance(divergence, str):
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {divergence!r}; expected one of {tuple(DIVERGENCES)}")
        kept = previous if isinstance(previous, DIVERGENCES[divergence]) else None
        if divergence == "exact":
            return ExactTrace(chunk=trace_chunk if trace_chunk is not None else (kept.chunk if kept else None))
        return Hutchinson(noise=noise if noise is not None else (kept.noise if kept else "rademacher"))
    if divergence is None:
        divergence = previous if previous is not None else ExactTrace()
    if not isinstance(divergence, AbstractDivergence):
        raise TypeError(f"CNF.divergence must be ExactTrace(), Hutchinson() or a name, got {divergence!r}")
    if isinstance(divergence, ExactTrace):
        if noise is not None:
            raise ValueError("noise belongs to the Hutchinson divergence, not to the exact trace")
        return divergence if trace_chunk is None else ExactTrace(chunk=trace_chunk)
    if trace_chunk is not None:
        raise ValueError("trace_chunk belongs to the exact trace, not to the Hutchinson divergence")
    return divergence if noise is None else Hutchinson(noise=noise)

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

NOISES = ("rademacher", "gaussian", "orthogonal")


def _sum_of_quadratic_forms(jvp_fn: Callable[[Vector], Vector], vectors: Array, chunk: int | None = None) -> Scalar:
    r"""$\sum_j e_j^\top J e_j$ over the rows $e_j$ of ``vectors``, with ``jvp_fn`` = $e \mapsto J e$
    of one linearization: the exact trace over a basis, Hutchinson's over probes. All rows at
    once, or ``chunk`` rows at a time one chunk after another (bounded memory, ``ExactTrace.chunk``)."""
    if chunk is None or chunk >= vectors.shape[0]:
        return jnp.sum(jax.vmap(jvp_fn)(vectors) * vectors)
    return jnp.sum(jax.lax.map(lambda e: jnp.vdot(e, jvp_fn(e)), vectors, batch_size=chunk))


class AbstractDivergence(eqx.Module):
    """How ``∇·v`` is computed along a trajectory."""

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The name the metrics record (``'exact'``, ``'hutchinson'``, ``'hutchinson-8-orthogonal'``)."""

    #: Whether each trajectory needs a noise vector (and so log densities a PRNG key).
    needs_noise: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def tangents(self, base: AbstractBase) -> int:
        """Forward-mode tangents each sample carries through the field (its working set, for chunking)."""

    @abc.abstractmethod
    def velocity_and_divergence(self, v: Callable[[Vector], Vector], x: Vector, eps: Array | None, base: AbstractBase) -> tuple[Vector, Scalar]:
        """``v(x)`` and its divergence on the support of ``base``."""

    def draw_noise(self, key: PRNGKeyArray, n: int, base: AbstractBase, dtype) -> Array:
        """The noise of n trajectories on the support of ``base``, held fixed along each."""
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

    needs_noise: ClassVar[bool] = False
    chunk: int | None = None

    @property
    def name(self) -> str:
        return "exact"

    def __check_init__(self):
        if self.chunk is not None and (isinstance(self.chunk, bool) or self.chunk < 1):
            raise ValueError(f"the trace chunk must be a positive number of basis vectors, got {self.chunk!r}")

    def tangents(self, base):
        return base.support_basis().shape[0]

    def velocity_and_divergence(self, v, x, eps, base):
        del eps
        basis = jnp.asarray(base.support_basis(), dtype=x.dtype)
        velocity, jvp_fn = jax.linearize(v, x)
        return velocity, _sum_of_quadratic_forms(jvp_fn, basis, self.chunk)


class Hutchinson(AbstractDivergence):
    r"""Hutchinson's estimate $\frac1k \sum_j ε_j^\top (∂v/∂x)\,ε_j$ from ``probes`` = k noise
    vectors per trajectory, held fixed along it. Unbiased for log q, not for ESS or for
    exp(log q): the ESS it gives is lowered by the estimate's spread, which k probes shrink.

    ``noise``: ``'rademacher'`` (default), ``'gaussian'``, or ``'orthogonal'``: k orthonormal
    directions of the base's support drawn uniformly (the first k columns of a Haar-random
    rotation of it), scaled by $\sqrt{d}$ for a support of dimension d. Orthogonal probes
    never repeat a direction, so their spread falls faster than 1/k and vanishes at k = d,
    where the estimate is the exact trace. ``probes`` > 1 costs one linearization and k
    Jacobian-vector products per field evaluation (the exact trace takes d).

    Its :attr:`name`, which metrics and the model index record, says both: ``'hutchinson'``
    (one Rademacher probe), ``'hutchinson-8'``, ``'hutchinson-16-orthogonal'``,
    ``'hutchinson-gaussian'``; :func:`divergence_from_settings` reads them back.
    """

    needs_noise: ClassVar[bool] = True
    noise: str = "rademacher"
    probes: int = 1

    def __check_init__(self):
        if self.noise not in NOISES:
            raise ValueError(f"unknown Hutchinson noise {self.noise!r}; expected one of {NOISES}")
        if isinstance(self.probes, bool) or not isinstance(self.probes, int) or self.probes < 1:
            raise ValueError(f"Hutchinson probes must be a positive number of noise vectors, got {self.probes!r}")

    @property
    def name(self) -> str:
        parts = ["hutchinson"] + ([str(self.probes)] if self.probes > 1 else []) + ([self.noise] if self.noise != "rademacher" else [])
        return "-".join(parts)

    def tangents(self, base):
        return self.probes

    def velocity_and_divergence(self, v, x, eps, base):
        del base  # the noise is drawn on the support already
        if eps is None:
            raise ValueError("Hutchinson divergence needs noise: pass a PRNG key")
        if eps.ndim == 1:
            velocity, jvp = jax.jvp(v, (x,), (eps,))
            return velocity, jnp.vdot(eps, jvp)
        velocity, jvp_fn = jax.linearize(v, x)
        return velocity, _sum_of_quadratic_forms(jvp_fn, eps) / eps.shape[0]

    def draw_noise(self, key, n, base, dtype):
        """(n, dim) for one probe, (n, probes, dim) for several."""
        shape = (n, base.dim) if self.probes == 1 else (n, self.probes, base.dim)
        if self.noise == "rademacher":
            return base.project(jax.random.rademacher(key, shape, dtype=dtype))
        if self.noise == "gaussian":
            return base.project(jax.random.normal(key, shape, dtype=dtype))
        basis = jnp.asarray(base.support_basis(), dtype)  # (d, dim), orthonormal rows
        d = basis.shape[0]
        if self.probes > d:
            raise ValueError(f"{self.probes} orthogonal probes exceed the {d} dimensions of the base's support")
        # Q of a Gaussian matrix's QR, with the signs of R's diagonal moved onto it, is Haar-distributed.
        q, r = jnp.linalg.qr(jax.random.normal(key, (n, d, self.probes), dtype=dtype))
        q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
        probes = jnp.sqrt(jnp.asarray(d, dtype)) * jnp.einsum("ndk,dm->nkm", q, basis)
        return probes[:, 0] if self.probes == 1 else probes


DIVERGENCES: dict[str, type[AbstractDivergence]] = {"exact": ExactTrace, "hutchinson": Hutchinson}


def parse_hutchinson_name(name: str) -> tuple[int, str | None]:
    """(probes, noise or None) from a Hutchinson name: ``'hutchinson'`` → (1, None),
    ``'hutchinson-16-orthogonal'`` → (16, 'orthogonal'), ``'hutchinson-gaussian'`` → (1, 'gaussian')."""
    unknown = ValueError(
        f"unknown divergence {name!r}; expected 'exact' or 'hutchinson[-PROBES][-NOISE]' with NOISE one of {NOISES}, "
        "e.g. 'hutchinson', 'hutchinson-16-orthogonal'"
    )
    head, *parts = name.split("-")
    if head != "hutchinson":
        raise unknown
    probes, noise = None, None
    for part in parts:  # at most one count, then at most one noise
        if part.isdigit() and int(part) >= 1 and probes is None and noise is None:
            probes = int(part)
        elif part in NOISES and noise is None:
            noise = part
        else:
            raise unknown
    return probes or 1, noise


def divergence_from_settings(
    divergence=None, *, noise: str | None = None, trace_chunk: int | None = None, previous: AbstractDivergence | None = None
) -> AbstractDivergence:
    """A divergence estimator from an object or a name (``'exact'``, ``'hutchinson'``,
    ``'hutchinson-16-orthogonal'``: :attr:`Hutchinson.name`) and ``CNF``'s loose settings.

    With a name (the form released configs use) the setting of the other estimator is
    ignored, as it always was (``noise`` for the exact trace, ``trace_chunk`` for
    Hutchinson); settings not given are kept from ``previous`` of the same kind. A
    Hutchinson name sets the number of probes (one when it names none); a noise it names
    wins over ``noise``. With an object such a setting is an error.
    """
    if isinstance(divergence, str):
        kind = "exact" if divergence == "exact" else "hutchinson"
        kept = previous if isinstance(previous, DIVERGENCES[kind]) else None
        if kind == "exact":
            return ExactTrace(chunk=trace_chunk if trace_chunk is not None else (kept.chunk if kept else None))
        probes, named_noise = parse_hutchinson_name(divergence)
        noise = named_noise or noise or (kept.noise if kept else "rademacher")
        return Hutchinson(noise=noise, probes=probes)
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

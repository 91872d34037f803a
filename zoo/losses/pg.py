r"""Path gradients of the forward KL for CNFs, and the maximum-likelihood baseline.

The forward KL read as a reverse KL in base space (Vaitl et al., path gradients for CNFs): for
target samples $x_i \sim μ$ with forces $F = -∇_x u$, and $z_i = T_θ^{-1}(x_i)$ held fixed,

$$g_{PG} = \frac1n \sum_i c(x_i)^\top \frac{∂T_θ(z_i)}{∂θ}, \qquad
  c(x) = ∇_x \log q_θ(x) + ∇_x u(x) = ∇_x \log q_θ(x) - F(x),$$

the gradient of the surrogate $\frac1n\sum_i \langle \mathrm{sg}(c(x_i)), T_θ(\mathrm{sg}(z_i))\rangle$.
In expectation over μ it equals the maximum-likelihood gradient $-E_μ[∇_θ \log q_θ(x)]$, and
it vanishes sample by sample when $q_θ = μ$ ("sticking the landing").

One step per batch, all three solves with the model's own solver settings:

1. $z = T_θ^{-1}(x)$: integrate x from t = 1 back to 0 (no divergence).
2. Augmented adjoint (Vaitl et al. 2022): integrate forward from z the pair (x(t), a(t)),
   $a(0) = ∇_z \log q_0(z)$, $\dot a = -(∂v/∂x)^\top a - ∇_x(∇\!\cdot v)$, so that
   $a(1) = ∇_x \log q_θ(x(1))$. The divergence integral rides along for free (it is the
   primal output of the same vector-Jacobian product), giving $\log q_θ(x)$ for the logs.
3. θ-gradient of $T_θ(z)$ by a continuous adjoint integrated from t = 1 back to 0 on the
   whole batch: $\dot x = v$, $\dot a_x = -(∂v/∂x)^\top a_x$, $\dot a_θ = -(∂v/∂θ)^\top a_x$,
   $a_x(1) = c$, $a_θ(1) = 0$; the gradient is $a_θ(0)$. Memory does not grow with the
   number of solver steps. The end point $T_θ(z)$ is the x(1) of step 2, so no separate
   forward solve is needed (``diffrax.BacksolveAdjoint`` would do one). With an adaptive
   solver the batch shares one step-size sequence in this solve (steps 1 and 2 control
   each sample's steps, as ``CNF.log_prob`` does).

``adjoint='direct'`` instead differentiates a fresh forward solve $T_θ(z)$ through the
solver (diffrax's ``RecursiveCheckpointAdjoint``): the independent check, with memory that
grows with the number of steps.

Steps 2 and 3 run chunk by chunk over the batch (``chunk_size`` samples at a time,
``lax.map``/``lax.scan``; a_θ is summed across chunks), which keeps a chunk's pair tensors in
cache for the EGNN (``field.solve_chunk_size``) and bounds memory for any field; step 1 has
no reverse pass and runs on the whole batch. Chunks are strided
(:func:`~zoo.chunking.to_chunks`), so a batch sharded over devices stays sharded in each.
The numbers do not depend on the chunking (with an adaptive solver, step 3 shares one
step-size sequence per chunk instead).

For the mean-free base every vector (score, adjoint states, c) is projected onto the
centre-of-mass-free subspace with ``model.base.project``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

from zoo._types import Array, PRNGKeyArray
from zoo.chunking import map_chunks, to_chunks
from zoo.data import Batch
from zoo.losses.base import AbstractLoss
from zoo.losses.chunked import resolve_chunk_size

ADJOINTS = ("backsolve", "direct")
FORCE_SOURCES = ("data", "energy")


class PathGradientTerms(NamedTuple):
    """Per-sample pieces of the path-gradient estimator for a batch of n samples.

    ``surrogate[i]`` = ⟨sg(c_i), T_θ(sg(z_i))⟩; its θ-gradient is sample i's path gradient.
    """

    surrogate: Array  # (n,)
    grad_log_q: Array  # (n, dim): ∇_x log q_θ at T_θ(z) (= x up to solver error)
    c: Array  # (n, dim): ∇_x log q_θ + ∇_x u
    z: Array  # (n, dim): T_θ⁻¹(x)
    x_end: Array  # (n, dim): T_θ(z) from the augmented solve
    log_q: Array  # (n,): log q_θ(T_θ(z)) from the augmented solve


def _frozen(model):
    """The model with every floating-point array behind stop_gradient (no tangents, no residuals)."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    return eqx.combine(jax.lax.stop_gradient(params), static)


def augmented_forward(model, z: Array, eps: Array | None = None) -> tuple[Array, Array, Array]:
    r"""Integrate (x, a, ∫∇·v) forward from one base sample z (dim,); returns x(1), a(1), log q_θ(x(1)).

    $a(0) = ∇_z \log q_0(z)$, $\dot a = -(∂v/∂x)^\top a - ∇_x(∇\!\cdot v)$, so
    $a(1) = ∇_x \log q_θ(x(1))$; both terms come from one vector-Jacobian product of
    $x \mapsto (v, ∇\!\cdot v)$ with cotangent (a, 1). The divergence is exact or
    Hutchinson with the fixed ε (``model.divergence``), as in ``model.log_prob_single``.
    """
    base = model.base

    def rhs(t, state, eps):
        x, a, _ = state
        (v, div), vjp = jax.vjp(lambda y: model.velocity_and_divergence(t, y, eps), x)
        (g,) = vjp((a, jnp.ones_like(div)))
        return v, -base.project(g), div

    z = base.project(z)
    x1, a1, div = model.solve(rhs, (z, base.project(base.score(z)), jnp.zeros((), z.dtype)), 0.0, 1.0, eps)
    return x1, a1, base.log_prob(z) - div


def augmented_forward_batched(model, z: Array, eps: Array) -> tuple[Array, Array, Array]:
    r""":func:`augmented_forward` for a batch z (b, dim) with Hutchinson noise eps (b, dim), on the
    field's batched fast path (``field.batched``) and a fixed-step solver.

    The fast path has a hand-written reverse pass and no forward mode, so the Hutchinson
    divergence is taken in reverse mode, $ε^\top J ε = ⟨ε, J^\top ε⟩$, and its x-gradient by
    a second reverse pass (reverse over reverse) instead of a JVP inside a VJP: the same
    numbers, with every pass on the hand-written kernels (``benchmarks/pg_vs_fm.py`` times it).
    """
    base, field = model.base, model.field

    def rhs(t, state, eps):
        x, a, _ = state
        times = jnp.full((x.shape[0],), t, x.dtype)

        def velocity_and_divergence(y):
            v, vjp = jax.vjp(lambda yy: field.batched(times, yy), y)
            (eps_jac,) = vjp(eps)
            return v, jnp.sum(eps_jac * eps, axis=-1)

        (v, div), vjp = jax.vjp(velocity_and_divergence, x)
        (g,) = vjp((a, jnp.ones_like(div)))
        return v, -base.project(g), div

    z = base.project(z)
    score = base.project(jax.vmap(base.score)(z))
    x1, a1, div = model.solve(rhs, (z, score, jnp.zeros((z.shape[0],), z.dtype)), 0.0, 1.0, eps)
    return x1, a1, jax.vmap(base.log_prob)(z) - div


def _batched_augmented_applies(model, eps) -> bool:
    """The batched augmented solve needs one Hutchinson probe per sample, a field fast path and
    fixed steps (one batched state would share an adaptive step-size sequence across samples)."""
    return eps is not None and eps.ndim == 2 and model.field.fused_batched and not model.solver.adaptive


def grad_log_prob(model, x: Array, eps: Array | None = None) -> tuple[Array, Array, Array]:
    """∇_x log q_θ(x) for one sample x (dim,) by the augmented adjoint; returns (grad, z, log q)."""
    z = model.base.project(model.inverse(x))
    _, a1, log_q = augmented_forward(model, z, eps)
    return a1, z, log_q


@eqx.filter_custom_vjp
def _transport_backsolve(field, x_end, model, chunk_size):
    """T_θ(z) for a batch whose end points x_end (b, dim) are known; its VJP is the continuous adjoint."""
    del field, model, chunk_size
    return x_end


@_transport_backsolve.def_fwd
def _transport_backsolve_fwd(perturbed, field, x_end, model, chunk_size):
    del perturbed, field, model, chunk_size
    return x_end, None


@_transport_backsolve.def_bwd
def _transport_backsolve_bwd(residuals, cotangent, perturbed, field, x_end, model, chunk_size):
    r"""a_θ(0) from $\dot x = v$, $\dot a_x = -(∂v/∂x)^\top a_x$, $\dot a_θ = -(∂v/∂θ)^\top a_x$, t: 1 → 0.

    Each chunk of ``chunk_size`` samples is solved as one state, so $a_θ$ is summed over its
    samples at every stage, and over chunks by the scan (no per-sample parameter gradients
    are stored).
    """
    del residuals
    params, static = eqx.partition(field, eqx.is_inexact_array)
    project = model.base.project
    if cotangent is None:
        cotangent = jnp.zeros_like(x_end)

    def rhs(t, state, params):
        x, a_x, _ = state

        def velocity(p, y):
            f = eqx.combine(p, static)
            # Reverse mode only here, so a field's batched fast path (the EGNN's hand-written
            # pair-message VJP) applies; the augmented solve needs forward mode and cannot use it.
            if f.fused_batched:
                return f.batched(jnp.full((y.shape[0],), t, y.dtype), y)
            return jax.vmap(lambda yi: f(t, yi))(y)

        v, vjp = jax.vjp(velocity, params, x)
        g_params, g_x = vjp(a_x)
        return v, -project(g_x), jax.tree.map(jnp.negative, g_params)

    zeros = jax.tree.map(jnp.zeros_like, params)

    def add_chunk(total, chunk):
        x_chunk, cotangent_chunk = chunk
        _, _, a_params = model.solve(rhs, (x_chunk, project(cotangent_chunk), zeros), 1.0, 0.0, params)
        return jax.tree.map(jnp.add, total, a_params), None

    b = x_end.shape[0]
    if chunk_size == b:
        a_params, _ = add_chunk(zeros, (x_end, cotangent))
    else:
        chunks = (to_chunks(x_end, chunk_size), to_chunks(cotangent, chunk_size))
        a_params, _ = jax.lax.scan(add_chunk, zeros, chunks)
    return jax.tree.map(lambda g, p: g if p else None, a_params, perturbed, is_leaf=lambda n: n is None)


def path_gradient(
    model,
    x: Array,
    forces: Array,
    key: PRNGKeyArray | None = None,
    *,
    eps: Array | None = None,
    adjoint: str = "backsolve",
    chunk_size: int | None = None,
) -> PathGradientTerms:
    r"""Per-sample path-gradient surrogates for a batch x (n, dim) with forces F = −∇u (n, dim).

    ``mean(terms.surrogate)`` has θ-gradient $g_{PG}$; ``terms.surrogate[i]`` alone has
    sample i's path gradient. Hutchinson noise (one ε per sample, fixed along its
    trajectories) is drawn from ``key`` with ``model.hutchinson_noise`` unless ``eps``
    ((n, dim), or (n, probes, dim) for several probes) is given.

    The augmented and adjoint solves take ``chunk_size`` samples at a time (at most; a
    divisor of n); None asks the field (``field.solve_chunk_size(n)``), else one chunk.
    """
    if adjoint not in ADJOINTS:
        raise ValueError(f"unknown adjoint {adjoint!r}; expected one of {ADJOINTS}")
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != model.dim:
        raise ValueError(f"path_gradient takes a batch of shape (n, {model.dim}), got {x.shape}")
    if forces is None:
        raise ValueError("path_gradient needs the target forces F = -grad u, got None")
    forces = jnp.asarray(forces, x.dtype)
    if forces.shape != x.shape:
        raise ValueError(f"forces have shape {forces.shape} but samples {x.shape}")
    if model.needs_key and eps is None:
        if key is None:
            raise ValueError("this CNF uses the Hutchinson divergence: path_gradient needs a PRNG key or eps")
        eps = model.hutchinson_noise(key, x.shape[0], x.dtype)

    chunk_size = resolve_chunk_size(x.shape[0], chunk_size, model.field.solve_chunk_size(x.shape[0]))

    frozen = _frozen(model)
    project = model.base.project
    z = project(jax.vmap(frozen.inverse)(x))
    if eps is None:
        augmented = jax.vmap(lambda zi: augmented_forward(frozen, zi))
        x_end, grad_log_q, log_q = map_chunks(augmented, chunk_size, z)
    elif _batched_augmented_applies(frozen, eps):
        augmented = lambda zc, ec: augmented_forward_batched(frozen, zc, ec)  # noqa: E731
        x_end, grad_log_q, log_q = map_chunks(augmented, chunk_size, z, eps)
    else:
        augmented = jax.vmap(lambda zi, ei: augmented_forward(frozen, zi, ei))
        x_end, grad_log_q, log_q = map_chunks(augmented, chunk_size, z, eps)
    c = jax.lax.stop_gradient(project(grad_log_q - forces))
    if adjoint == "backsolve":
        transported = _transport_backsolve(model.field, x_end, frozen, chunk_size)
    else:
        transported = jax.vmap(model.forward)(z)
    surrogate = jnp.sum(c * transported, axis=-1)
    return PathGradientTerms(surrogate=surrogate, grad_log_q=grad_log_q, c=c, z=z, x_end=x_end, log_q=log_q)


class PathGradientForwardKL(AbstractLoss):
    r"""Path gradient of the forward KL on target samples with forces (path-gradient paper).

    The returned scalar is the surrogate $\mathrm{mean}_i\langle \mathrm{sg}(c_i), T_θ(\mathrm{sg}(z_i))\rangle$;
    only its gradient is meaningful. ``aux`` logs ``nll`` (−mean log q_θ of the batch,
    the forward KL up to the θ-independent $E_μ \log μ$; with ``force_source='energy'`` also
    ``kl_plus_log_z`` = mean(−u − log q_θ)), ``grad_log_q_norm``, ``force_norm`` and
    ``c_norm`` (mean norms; c → 0 as q_θ → μ) and ``reconstruction_error`` (mean
    ‖T_θ(T_θ⁻¹(x)) − x‖, the solver's round-trip error). All come from the solves the
    gradient needs anyway.

    Arguments:
        adjoint: ``'backsolve'`` (continuous adjoint, memory flat in the number of steps)
            or ``'direct'`` (differentiate through the solver; for checks).
        force_source: ``'data'`` reads ``batch.forces``; ``'energy'`` takes −∇u from
            ``energy`` (one configuration → u in k_B T), for analytic targets.
        energy: the reduced energy for ``force_source='energy'``, e.g. ``system.energy``.
        chunk_size: samples per chunk in the augmented and adjoint solves (see
            :func:`path_gradient`); None lets the field choose.
    """

    adjoint: str = eqx.field(static=True, default="backsolve")
    force_source: str = eqx.field(static=True, default="data")
    energy: Callable | None = None
    chunk_size: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.adjoint not in ADJOINTS:
            raise ValueError(f"unknown adjoint {self.adjoint!r}; expected one of {ADJOINTS}")
        if self.force_source not in FORCE_SOURCES:
            raise ValueError(f"unknown force_source {self.force_source!r}; expected one of {FORCE_SOURCES}")
        if self.force_source == "energy" and self.energy is None:
            raise ValueError("force_source='energy' needs an energy callable (e.g. energy=system.energy)")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of samples or None, got {self.chunk_size}")

    @property
    def needs_forces(self) -> bool:
        """Data forces are read only with ``force_source='data'``; the energy supplies its own."""
        return self.force_source == "data"

    def forces(self, batch: Batch) -> Array:
        """F = −∇u for the batch (n, dim), from the data set or from the energy."""
        return self._forces_and_energies(batch)[0]

    def _forces_and_energies(self, batch: Batch) -> tuple[Array, Array | None]:
        if self.force_source == "energy":
            u, grad_u = jax.vmap(jax.value_and_grad(self.energy))(batch.x)
            return -grad_u, u
        if batch.forces is None:
            raise ValueError(
                "PathGradientForwardKL needs target forces but batch.forces is None: store forces with the "
                "data set (F = -grad u in k_BT units) or use force_source='energy' with an energy callable"
            )
        return batch.forces, None

    def __call__(self, model, batch: Batch, key: PRNGKeyArray):
        forces, energies = self._forces_and_energies(batch)
        terms = path_gradient(model, batch.x, forces, key, adjoint=self.adjoint, chunk_size=self.chunk_size)
        norm = lambda v: jnp.mean(jnp.sqrt(jnp.sum(v**2, axis=-1)))  # noqa: E731
        aux = {
            "nll": -jnp.mean(terms.log_q),
            "grad_log_q_norm": norm(terms.grad_log_q),
            "force_norm": norm(forces),
            "c_norm": norm(terms.c),
            "reconstruction_error": norm(terms.x_end - model.base.project(batch.x)),
        }
        if energies is not None:
            # KL(μ‖q_θ) + log Z = E_μ[−u − log q_θ]; u came with the forces at no extra cost.
            aux["kl_plus_log_z"] = -jnp.mean(energies + terms.log_q)
        return jnp.mean(terms.surrogate), jax.lax.stop_gradient(aux)


class MaximumLikelihood(AbstractLoss):
    r"""Forward KL by maximum likelihood: $-\mathrm{mean}_i \log q_θ(x_i)$, differentiated through the solver."""

    def __call__(self, model, batch: Batch, key: PRNGKeyArray):
        nll = -jnp.mean(model.log_prob(batch.x, key=key if model.needs_key else None))
        return nll, {"nll": jax.lax.stop_gradient(nll)}

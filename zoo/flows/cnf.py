r"""Continuous normalizing flows on Diffrax.

$dx/dt = v_θ(t, x)$ on $t ∈ [0, 1]$, $x(0) = z \sim q_0$, $T_θ(z) = x(1)$ and

$$\log q_θ(x(1)) = \log q_0(z) - \int_0^1 ∇\!\cdot v_θ(t, x(t))\,dt .$$

Sampling integrates 0 → 1, density evaluation of data integrates 1 → 0. Every solve also
carries the path length $\int \|v_θ\|\,|dt|$ (one norm per evaluation, nearly free).

The single-sample methods (``integrate``, ``forward``, ``inverse``) are the primitives;
the batched methods ``vmap`` them and are safe under ``jit`` and ``grad``. For large n,
:func:`sample_and_log_prob_chunked` and :func:`log_prob_chunked` evaluate in fixed-size,
compiled chunks with a progress bar.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import math
from collections.abc import Mapping
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from zoo import parallel
from zoo._types import Array, PRNGKeyArray, Scalar, Vector
from zoo.chunking import largest_divisor_at_most, map_chunks
from zoo.errors import ZooError
from zoo.fields.base import AbstractVectorField
from zoo.flows.base import AbstractBase
from zoo.flows.divergence import AbstractDivergence, Hutchinson, divergence_from_settings
from zoo.flows.solvers import AbstractODESolver, method_name, solver_from_settings

#: How log densities were computed, as metrics and the model index record it (the keys of
#: :meth:`CNF.describe`), and the ``CNF`` setting each key stands for.
DESCRIPTION_SETTINGS = {"divergence": "divergence", "solver": "solver", "n_solver_steps": "n_steps", "solver_rtol": "rtol", "solver_atol": "atol"}
#: Methods whose fixed-step form reads as one word with its steps (``RK4-40``).
_FIXED_STEP_NAMES = {"rk4": "RK4", "euler": "Euler", "midpoint": "midpoint", "heun": "Heun"}


def describe_in_words(description: Mapping) -> str:
    """A :meth:`CNF.describe` record in words: 'exact divergence, RK4-40' or 'exact
    divergence, Dopri5 rtol = atol = 1e-5' (what a metric's reader needs to weigh it)."""
    if "divergence" not in description and "solver" not in description:
        return "unknown divergence and solver"
    solver = str(description.get("solver", "?"))
    if "n_solver_steps" in description:
        how = f"{_FIXED_STEP_NAMES.get(solver, solver)}-{description['n_solver_steps']}"
    elif "solver_rtol" in description:
        short = lambda x: f"{x:g}".replace("e-0", "e-")  # noqa: E731  (1e-5, not 1e-05)
        rtol, atol = description["solver_rtol"], description.get("solver_atol")
        tol = f"rtol = atol = {short(rtol)}" if atol == rtol else f"rtol = {short(rtol)}, atol = {short(atol)}"
        how = f"{solver.capitalize()} {tol}"
    else:
        how = solver
    return f"{description.get('divergence', '?')} divergence, {how}"


class Solution(NamedTuple):
    """End state of one solve from t0 to t1."""

    x: Array
    #: ∫_{t0}^{t1} ∇·v dt (signed: negative of the forward integral when t1 < t0).
    divergence: Array
    #: ∫ ‖v‖ |dt|.
    path_length: Array


class CNF(eqx.Module):
    r"""A continuous normalizing flow $T_θ$ pushing ``base`` forward along ``field``.

    Arguments:
        field: the vector field v_θ(t, x) on flat vectors.
        base: the base density q_0 (``StandardNormal`` or ``MeanFreeNormal``).
        solver: how the ODE is integrated, a :class:`~zoo.flows.solvers.FixedStep` (default:
            RK4 with 15 steps, as in the path-gradient paper) or an
            :class:`~zoo.flows.solvers.AdaptiveStep` (Dopri5 and kin with ``rtol``/``atol``);
            or a method name (``'rk4'``, ``'dopri5'``), the form of released configs.
        divergence: :class:`~zoo.flows.divergence.ExactTrace` (one forward-mode JVP per row of
            ``base.support_basis()``: (N-1)·d for N particles in d dimensions)
            or :class:`~zoo.flows.divergence.Hutchinson` (ε held fixed along a trajectory);
            or a name: ``'exact'``, ``'hutchinson'``, ``'hutchinson-16-orthogonal'`` (16 orthogonal probes).
        n_steps, rtol, atol, max_steps: override the solver's own settings (``CNF.n_steps
            = 40`` on the command line); ``noise`` (Hutchinson's) and ``trace_chunk`` (the
            exact trace's chunk) likewise for the divergence. See
            :func:`~zoo.flows.solvers.solver_from_settings` for which combinations hold.
    """

    field: AbstractVectorField
    base: AbstractBase
    solver: AbstractODESolver = eqx.field(static=True)
    divergence: AbstractDivergence = eqx.field(static=True)

    def __init__(
        self,
        field: AbstractVectorField,
        base: AbstractBase,
        solver: AbstractODESolver | str | None = None,
        divergence: AbstractDivergence | str | None = None,
        *,
        n_steps: int | None = None,
        rtol: float | None = None,
        atol: float | None = None,
        max_steps: int | None = None,
        noise: str | None = None,
        trace_chunk: int | None = None,
    ):
        if field.dim != base.dim:
            raise ValueError(f"field dim {field.dim} does not match base dim {base.dim}")
        self.field = field
        self.base = base
        self.solver = solver_from_settings(solver, n_steps=n_steps, rtol=rtol, atol=atol, max_steps=max_steps)
        self.divergence = divergence_from_settings(divergence, noise=noise, trace_chunk=trace_chunk)

    def with_settings(self, **settings) -> CNF:
        """This flow with other solver or divergence settings (the keywords of ``CNF``); the rest is kept.

        ``flow.with_settings(n_steps=40)`` keeps the method; ``with_settings(solver='rk4')``
        keeps the steps of a fixed-step solver; ``with_settings(divergence='exact')`` the chunk.
        """
        unknown = set(settings) - {"solver", "n_steps", "rtol", "atol", "max_steps", "divergence", "noise", "trace_chunk"}
        if unknown:
            raise TypeError(f"unknown CNF settings {sorted(unknown)}")
        solver = solver_from_settings(
            settings.get("solver"), n_steps=settings.get("n_steps"), rtol=settings.get("rtol"), atol=settings.get("atol"),
            max_steps=settings.get("max_steps"), previous=self.solver,
        )  # fmt: skip
        divergence = divergence_from_settings(
            settings.get("divergence"), noise=settings.get("noise"), trace_chunk=settings.get("trace_chunk"), previous=self.divergence
        )
        return CNF(self.field, self.base, solver, divergence)

    def describe(self) -> dict:
        """How this flow computes log densities, in the keys metrics and the model index record."""
        return {"divergence": self.divergence.name, **self.solver.describe()}

    def as_described(self, description: Mapping) -> CNF:
        """This flow computing log densities as a :meth:`describe` record says (its keys that
        are given and not None; other keys, e.g. the rest of a metrics record, are ignored)."""
        settings = {DESCRIPTION_SETTINGS[k]: v for k, v in description.items() if k in DESCRIPTION_SETTINGS and v is not None}
        return self.with_settings(**settings) if settings else self

    @property
    def dim(self) -> int:
        return self.base.dim

    @property
    def needs_key(self) -> bool:
        """Whether log densities need a PRNG key (Hutchinson noise)."""
        return self.divergence.needs_noise

    # ------------------------------------------------------------------ primitives
    def velocity_and_divergence(self, t, x: Vector, eps: Vector | None) -> tuple[Vector, Scalar]:
        """v(t, x) and its divergence on the base's support (:attr:`divergence`)."""
        return self.divergence.velocity_and_divergence(lambda y: self.field(t, y), x, eps, self.base)

    def integrate(
        self,
        x: Vector,
        t0: float,
        t1: float,
        *,
        eps: Vector | None = None,
        with_divergence: bool = True,
    ) -> Solution:
        """Solve one sample from t0 to t1 (either direction)."""
        if x.shape != (self.dim,):
            raise ValueError(f"CNF.integrate takes one flat sample of shape ({self.dim},), got {x.shape}")

        def rhs(t, state, args):
            y = state[0]
            if with_divergence:
                v, div = self.velocity_and_divergence(t, y, args)
            else:
                v, div = self.field(t, y), jnp.zeros((), y.dtype)
            return v, div, jnp.sqrt(jnp.sum(v**2) + 1e-30)

        # Built from x so that under vmap the divergence and length channels are batched
        # whatever the field: a divergence that does not depend on the state (an affine
        # field) otherwise leaves that channel unbatched, and its parameter gradient through
        # the batched solve came out batch-size times too large.
        zero = 0.0 * x[0]
        x1, div, length = self.solve(rhs, (x, zero, zero), t0, t1, eps)
        return Solution(x=x1, divergence=div, path_length=jnp.abs(length))

    def solve(self, rhs, y0, t0: float, t1: float, args=None):
        """Solve dy/dt = rhs(t, y, args) from t0 to t1 with this flow's solver settings.

        The one ODE solve of zoo: the flow's own integration and the path-gradient adjoints
        (:mod:`zoo.losses.pg`) go through it. ``y0`` is any pytree; returns the state at t1,
        NaN throughout where the solver failed (too many steps, a non-finite step), so a
        failed sample shows up in the metrics instead of raising inside compiled code.
        """
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(rhs),
            self.solver.method,
            t0=t0,
            t1=t1,
            y0=y0,
            args=args,
            saveat=diffrax.SaveAt(t1=True),
            throw=False,
            **self.solver.diffeqsolve_options(t0, t1),
        )
        failed = sol.result != diffrax.RESULTS.successful
        return jax.tree.map(lambda leaf: jnp.where(failed, jnp.nan, leaf[-1]), sol.ys)

    def forward(self, z: Vector) -> Vector:
        """T_θ(z): one base sample to data space (no log density)."""
        return self.integrate(z, 0.0, 1.0, with_divergence=False).x

    def inverse(self, x: Vector) -> Vector:
        """T_θ⁻¹(x): one data sample back to base space (no log density)."""
        return self.integrate(x, 1.0, 0.0, with_divergence=False).x

    def log_prob_single(self, x: Vector, eps: Vector | None = None) -> Scalar:
        """log q_θ(x) for one sample (integrating 1 → 0)."""
        return self.log_prob_and_path_length_single(x, eps)[0]

    # ------------------------------------------------------------------ batched
    def _over_batch(self, single, x: Array, eps: Array | None = None, *, with_divergence: bool = True):
        """``vmap(single)`` over a batch (``eps`` None or batched with it), solved in chunks of the
        field's :meth:`~zoo.fields.base.AbstractVectorField.sampling_chunk_size`: on a CPU a few
        samples at a time keep the tangent copies of the exact trace in cache. Chunks are strided
        (:func:`~zoo.chunking.to_chunks`), so a batch sharded over devices stays sharded."""
        tangents = self.divergence.tangents(self.base) if with_divergence else 0
        chunk = largest_divisor_at_most(x.shape[0], self.field.sampling_chunk_size(x.shape[0], tangents))
        return map_chunks(jax.vmap(single), chunk, *((x,) if eps is None else (x, eps)))

    def hutchinson_noise(self, key: PRNGKeyArray, n: int, dtype=jnp.float32) -> Array:
        """The noise of n trajectories on the base's support: (n, dim), or (n, probes, dim) for a
        multi-probe Hutchinson estimate (one Rademacher vector each unless the divergence says otherwise)."""
        estimator = self.divergence if self.divergence.needs_noise else Hutchinson()
        return estimator.draw_noise(key, n, self.base, dtype)

    def noise_or_none(self, key: PRNGKeyArray | None, n: int, dtype) -> Array | None:
        """Hutchinson noise for n trajectories, or None for the exact divergence."""
        if not self.needs_key:
            return None
        if key is None:
            raise ValueError("this CNF uses the Hutchinson divergence: log densities need a PRNG key")
        return self.hutchinson_noise(key, n, dtype)

    def log_prob(self, x: Array, *, key: PRNGKeyArray | None = None) -> Array:
        """log q_θ(x) for a batch x of shape (n, dim)."""
        x = _check_batch(x, self.dim)
        eps = self.noise_or_none(key, x.shape[0], x.dtype)
        return self._over_batch(self.log_prob_single, x, eps)

    def log_prob_and_path_length(self, x: Array, *, key: PRNGKeyArray | None = None) -> tuple[Array, Array]:
        x = _check_batch(x, self.dim)
        return self.log_prob_and_path_length_with_noise(x, self.noise_or_none(key, x.shape[0], x.dtype))

    def log_prob_and_path_length_with_noise(self, x: Array, eps: Array | None) -> tuple[Array, Array]:
        """Batched log q_θ(x) and path lengths with given Hutchinson noise (None for exact)."""
        return self._over_batch(self.log_prob_and_path_length_single, x, eps)

    def log_prob_and_path_length_single(self, x: Vector, eps: Vector | None = None) -> tuple[Scalar, Scalar]:
        sol = self.integrate(x, 1.0, 0.0, eps=eps)
        return self.base.log_prob(sol.x) + sol.divergence, sol.path_length

    def sample(self, key: PRNGKeyArray, n: int) -> Array:
        """n samples x = T_θ(z), z ~ q_0, shape (n, dim)."""
        return self._over_batch(self.forward, self.base.sample(key, n), with_divergence=False)

    def sample_and_log_prob(self, key: PRNGKeyArray, n: int) -> tuple[Array, Array]:
        """n samples and their log densities log q_θ(x) (integrating 0 → 1)."""
        x, log_q, _ = self.sample_log_prob_and_path_length(key, n)
        return x, log_q

    def sample_log_prob_and_path_length(self, key: PRNGKeyArray, n: int) -> tuple[Array, Array, Array]:
        return self.push_forward(*self.draw_base(key, n))

    def draw_base(self, key: PRNGKeyArray, n: int) -> tuple[Array, Array | None]:
        """Base samples z (n, dim) and, for Hutchinson, their trajectories' noise."""
        z_key, noise_key = jax.random.split(key)
        z = self.base.sample(z_key, n)
        return z, self.hutchinson_noise(noise_key, n, z.dtype) if self.needs_key else None

    def push_forward(self, z: Array, eps: Array | None = None) -> tuple[Array, Array, Array]:
        """x = T_θ(z), log q_θ(x) and path lengths for a batch of base samples z (n, dim)."""
        return self._over_batch(self.push_forward_single, z, eps)

    def push_forward_single(self, z: Vector, eps: Vector | None = None) -> tuple[Vector, Scalar, Scalar]:
        """x = T_θ(z), log q_θ(x) and the path length for one base sample."""
        sol = self.integrate(z, 0.0, 1.0, eps=eps)
        return sol.x, self.base.log_prob(z) - sol.divergence, sol.path_length


def _check_batch(x: Array, dim: int) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected a batch of flat samples of shape (n, {dim}), got {x.shape}")
    return x


# ---------------------------------------------------------------------- chunked evaluation
class BatchedSolveError(ZooError, RuntimeError):
    """A compiled batched solve disagrees with the same samples solved one at a time."""


#: Float tolerance of the batched-against-per-sample check: |Δ| ≤ atol + rtol·|per-sample|.
#: Both sides are float32 solves of the same arithmetic; the miscompilation it guards
#: against put 1e-3 to 2.4 nats between them.
VERIFY_ATOL = 1e-3
VERIFY_RTOL = 1e-5
#: With an adaptive solver the check widens by this multiple of its rtol and atol (see _verify_tolerance).
ADAPTIVE_VERIFY_FACTOR = 2000


@eqx.filter_jit
def _compiled(flow: CNF, method: str, *args):
    """``flow.<method>(*args)`` compiled (once per method, flow structure and shapes)."""
    return getattr(flow, method)(*args)


def _host_workers() -> int:
    """How many pieces of a chunk to solve at once: the cores this process may use on a CPU
    backend (a few-sample solve keeps one core busy and its cache warm; concurrent executions
    of the compiled program use the rest), one elsewhere (an accelerator takes the chunk whole)."""
    if jax.default_backend() != "cpu":
        return 1
    return parallel.usable_cpu_cores()


def _solve_chunk(flow: CNF, method: str, arrays: tuple, advance, workers: int | None = None) -> tuple:
    """``flow.<method>(*arrays)`` for one chunk (arrays batched along axis 0, None allowed).

    Several local devices: the chunk is split over them (data-parallel, one program). One
    device: with ``workers`` > 1 (default: :func:`_host_workers`) the chunk is cut into equal
    pieces (about four per worker, so the progress bar moves within a chunk) solved by that
    many threads at once, each running the same compiled program; with one, the chunk is one
    call. ``advance(k)`` is told of every k samples done.
    """
    n = arrays[0].shape[0]
    mesh = parallel.data_mesh()
    if mesh.devices.size > 1 and n % mesh.devices.size == 0:
        out = _compiled(parallel.replicate(flow, mesh), method, *parallel.shard_batch(jax.device_get(arrays), mesh))
        advance(n)
        return tuple(np.asarray(a) for a in out)
    workers = _host_workers() if workers is None else workers
    # Pieces of at least two samples: XLA compiles a one-sample batch into a much slower program.
    piece = largest_divisor_at_most(n, max(2, n // (4 * workers))) if workers > 1 else n
    starts = range(0, n, piece)

    def solve(start):
        part = tuple(None if a is None else a[start : start + piece] for a in arrays)
        return tuple(np.asarray(a) for a in _compiled(flow, method, *part))

    # The first piece alone: it compiles the program, which concurrent first calls would each do.
    results = {0: solve(0)}
    advance(piece)
    with concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="zoo-solve") as pool:
        futures = {pool.submit(solve, start): start for start in starts[1:]}
        for future in concurrent.futures.as_completed(futures):
            results[futures[future]] = future.result()
            advance(piece)
    return tuple(np.concatenate([results[start][k] for start in starts]) for k in range(len(results[0])))


def fingerprint(flow: CNF) -> str:
    """sha256 of everything a flow's outputs depend on: its arrays (values, shapes, dtypes) and its static settings."""
    arrays, static = eqx.partition(flow, eqx.is_array)
    h = hashlib.sha256(repr(static).encode())
    for leaf in jax.tree.leaves(arrays):
        data = np.asarray(leaf)
        h.update(f"{data.dtype}{data.shape}".encode())
        h.update(np.ascontiguousarray(data).tobytes())
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    from zoo import progress

    return progress.bar(total, desc, "sample", enabled=enabled, leave=False)


def _checked_entries(valid: int, n_checks: int, chunk_index: int) -> np.ndarray:
    """Which entries of a chunk to recompute: the last valid one and random others."""
    if n_checks <= 0:
        return np.zeros(0, int)
    others = np.random.default_rng([7, chunk_index]).permutation(valid - 1)[: n_checks - 1]
    return np.unique(np.concatenate([[valid - 1], others]))


def _verify_tolerance(flow: CNF) -> tuple[float, float]:
    """(atol, rtol) of the batched-against-per-sample check for this flow's solver.

    An adaptive solve takes its own accepted steps per sample, and rounding differences
    between the batched and the single program can change an accept/reject decision, and
    so the whole step sequence: the two then differ by up to the solve's *global* error,
    which is far above its per-step tolerance (Dopri5 at rtol = atol = 1e-5 is off by up to
    0.014 nats in log q on DW4 against 1e-8 in float64, ``tools/check-solver``). Hence
    ADAPTIVE_VERIFY_FACTOR × the tolerance; miscompiled solves were off by ≥ 0.7 nats.
    """
    if not flow.solver.adaptive:
        return VERIFY_ATOL, VERIFY_RTOL
    return VERIFY_ATOL + ADAPTIVE_VERIFY_FACTOR * flow.solver.atol, VERIFY_RTOL + ADAPTIVE_VERIFY_FACTOR * flow.solver.rtol


def _verify(flow: CNF, what: str, label: str, chunk_index: int, entries, batched: dict, single) -> None:
    """Raise :class:`BatchedSolveError` unless batched and per-sample values agree."""
    atol, rtol = _verify_tolerance(flow)
    for i in entries:
        for name, value in single(int(i)).items():
            got, want = np.asarray(batched[name][i]), np.asarray(value)
            both_nonfinite = ~np.isfinite(got) & ~np.isfinite(want)
            close = np.abs(got - want) <= atol + rtol * np.abs(want)
            if not np.all(close | both_nonfinite):
                raise BatchedSolveError(
                    f"{label}: {what} of chunk {chunk_index}, entry {int(i)}: the batched solve gives {name} "
                    f"{np.round(got, 5).tolist()} but the same sample solved alone gives {np.round(want, 5).tolist()} "
                    f"(tolerance {atol:.3g} + {rtol:.3g}·|value|, {method_name(flow.solver.method)}). The compiled batched program is wrong "
                    "(XLA miscompiled it before; see zoo/_xla.py); no metrics are reported from it."
                )


def _chunk_progress(bar, valid: int):
    """(advance, finish) for one chunk: ``advance(k)`` moves ``bar`` by k samples, never past the
    chunk's ``valid`` ones (a last chunk's padding is not progress); ``finish()`` completes it."""
    done = 0

    def advance(k: int) -> None:
        nonlocal done
        k = min(k, valid - done)
        if k > 0:
            done += k
            bar.update(k)

    return advance, lambda: advance(valid)


def _chunk_loop(n: int, chunk: int, desc: str, progress: bool, store, compute) -> dict[str, np.ndarray]:
    """``compute(c, advance)`` for every chunk c of n samples in chunks of ``chunk`` (its result
    dict; it calls ``advance(k)`` as k more of the chunk's samples are done), or the result
    ``store`` holds for it; each fresh result is saved to ``store`` as soon as it exists.
    Returns each array concatenated over the chunks."""
    out: dict[str, list] = {}
    with _progress(n, desc, progress) as bar:
        for c in range(math.ceil(n / chunk)):
            valid = min(chunk, n - c * chunk)
            result = None if store is None else store.load(c)
            if result is None:
                advance, finish = _chunk_progress(bar, valid)
                result = compute(c, advance)
                if store is not None:
                    store.save(c, result)
                finish()
            else:
                bar.update(valid)
            for name, value in result.items():
                out.setdefault(name, []).append(value)
    return {name: np.concatenate(parts) for name, parts in out.items()}


def sample_and_log_prob_chunked(
    flow: CNF,
    key: PRNGKeyArray,
    n: int,
    *,
    chunk_size: int = 1024,
    progress: bool = False,
    verify: int = 2,
    label: str = "flow",
    store=None,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """Draw n samples with log densities and path lengths in compiled chunks of fixed size.

    Returns NumPy arrays ``x`` (n, dim), ``log_q`` (n,), ``path_length`` (n,). Memory is
    bounded by ``chunk_size``; every chunk has the same shape, so it compiles once.

    ``verify`` entries of every chunk (its last and random others) are solved again one at
    a time; a disagreement beyond float tolerance raises :class:`BatchedSolveError` naming
    ``label`` and the chunk. ``verify=0`` skips the check.

    With ``store`` (a :class:`zoo.storage.ChunkStore` fingerprinted by :func:`fingerprint`)
    finished chunks are saved as they complete and read back instead of recomputed, so an
    interrupted evaluation resumes.

    On one CPU device a chunk is solved as pieces by ``workers`` threads at once (default:
    the cores this process may use); the samples and numbers are those of one batched solve.
    """
    if n < 1:
        raise ValueError(f"need at least one sample, got n={n}")
    chunk = min(chunk_size, n)
    n_chunks = math.ceil(n / chunk)
    keys = jax.random.split(key, n_chunks)

    def compute(c, advance):
        z, eps = _compiled(flow, "draw_base", keys[c], chunk)
        x, log_q, length = _solve_chunk(flow, "push_forward", (np.asarray(z), None if eps is None else np.asarray(eps)), advance, workers)
        result = {"x": np.asarray(x), "log_q": np.asarray(log_q), "path_length": np.asarray(length)}

        def one(i):
            xi, lq, pl = _compiled(flow, "push_forward_single", z[i], None if eps is None else eps[i])
            return {"x": xi, "log_q": lq, "path_length": pl}

        _verify(flow, "sampling", label, c, _checked_entries(chunk, verify, c), result, one)
        return result

    # The last chunk is drawn whole and cut to n.
    out = _chunk_loop(n, chunk, "sampling", progress, store, compute)
    return {name: value[:n] for name, value in out.items()}


def log_prob_chunked(
    flow: CNF,
    x: Array,
    *,
    key: PRNGKeyArray | None = None,
    chunk_size: int = 1024,
    progress: bool = False,
    verify: int = 2,
    label: str = "flow",
    store=None,
    workers: int | None = None,
) -> dict[str, np.ndarray]:
    """log q_θ(x) and path lengths for many samples, in compiled chunks of fixed size.

    The last chunk is padded (with copies of the first sample) so that every call has the
    same shape. Returns NumPy arrays ``log_q`` (n,) and ``path_length`` (n,). ``verify``,
    ``label``, ``store`` and ``workers``: as in :func:`sample_and_log_prob_chunked`.
    """
    x = np.asarray(_check_batch(x, flow.dim))
    n = x.shape[0]
    if n == 0:
        raise ValueError("need at least one sample")
    chunk = min(chunk_size, n)
    n_chunks = math.ceil(n / chunk)
    if flow.needs_key and key is None:
        raise ValueError("this CNF uses the Hutchinson divergence: log densities need a PRNG key")
    keys = jax.random.split(key, n_chunks) if key is not None else [None] * n_chunks

    def compute(c, advance):
        part = x[c * chunk : (c + 1) * chunk]
        valid = part.shape[0]
        if valid < chunk:
            part = np.concatenate([part, np.repeat(part[:1], chunk - valid, axis=0)])
        eps = _compiled(flow, "noise_or_none", keys[c], chunk, part.dtype)
        lq, pl = _solve_chunk(flow, "log_prob_and_path_length_with_noise", (part, None if eps is None else np.asarray(eps)), advance, workers)
        result = {"log_q": np.asarray(lq), "path_length": np.asarray(pl)}

        def one(i):
            lq_i, pl_i = _compiled(flow, "log_prob_and_path_length_single", part[i], None if eps is None else eps[i])
            return {"log_q": lq_i, "path_length": pl_i}

        _verify(flow, "log density", label, c, _checked_entries(valid, verify, c), result, one)
        return {name: value[:valid] for name, value in result.items()}

    return _chunk_loop(n, chunk, "log density", progress, store, compute)

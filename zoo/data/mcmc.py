r"""Many parallel Markov chains for a Boltzmann target, chunked and resumable.

The chains are vmapped, the steps run under ``lax.scan`` inside ``jax.jit``. Kernels:

- ``'rwm'``  random-walk Metropolis, $y = x + h\,Pξ$;
- ``'mala'`` Metropolis-adjusted Langevin, $y = x - \tfrac{h^2}{2} P∇u(x) + h\,Pξ$ with the
  Metropolis-Hastings ratio of the Gaussian proposal
  $\log q(y|x) = -\|y - x + \tfrac{h^2}{2}P∇u(x)\|^2 / 2h^2$;
- ``'hmc'``  Hamiltonian Monte Carlo, momentum $p = Pξ$, ``hmc_steps`` leapfrog steps of size
  $h·(1 + j·U[-1, 1])$ with the jitter j = ``hmc_jitter``.

$P$ is the projection onto the support of the system's base (``default_base().project``):
the centre-of-mass-free subspace for particle systems, whose energies are translation
invariant (the Lennard-Jones tether acts on $x_i - \bar x$, so it does not pin the centre
of mass either). Chains start mean free and every move is projected, so they stay on that
subspace and sample the density the flows are trained on.

Each chain adapts its own step size during burn-in by dual averaging (Hoffman & Gelman
2014, Alg. 5) toward ``target_accept``, using the Metropolis acceptance probability of each
step, restarted at 1/8, 1/4 and 1/2 of the burn-in to forget the initial transient; after burn-in it keeps its averaged step size $\bar h$ fixed, so the sampling phase is
a time-homogeneous Markov chain with the exact target as its stationary law.

The run proceeds in chunks of ``chunk_steps`` steps; each chunk's samples, together with the
chain state, adaptation state and PRNG key it ends in, are written atomically to
``<workdir>/mcmc/`` (a :class:`zoo.storage.ChunkLog`). A killed run continues from the last
chunk and yields exactly the samples of an uninterrupted run (same chunk boundaries, same keys).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zoo._types import Array
from zoo.progress import bar as progress_bar
from zoo.storage import ChunkLog, RunStateError

KERNELS = ("rwm", "mala", "hmc")
DEFAULT_TARGET_ACCEPT = {"rwm": 0.3, "mala": 0.5, "hmc": 0.65}
CHUNK_DIR = "mcmc"
#: Where zoo before the chunk log kept a run's whole state; such a run is continued (adopted).
LEGACY_STATE_FILE = "mcmc_state.npz"


# ---------------------------------------------------------------------------- settings
@dataclasses.dataclass(frozen=True)
class SamplerSettings:
    """Everything that determines the chains (and so must match when a run is resumed).

    ``burn_in`` and ``thin`` count steps of one chain; the sampling phase records one state
    every ``thin`` steps. ``chunk_steps`` is rounded up to a multiple of ``thin``.
    ``init_spacing`` is the lattice spacing of the initial particle configurations
    (ignored for non-particle systems, which start from ``init_scale``·N(0, 1)).
    """

    kernel: str = "mala"
    n_chains: int = 256
    burn_in: int = 10_000
    thin: int = 100
    step_size: float = 0.05
    target_accept: float | None = None
    adapt: bool = True
    hmc_steps: int = 10
    hmc_jitter: float = 0.2
    chunk_steps: int = 2_000
    trace_chains: int = 16
    init_spacing: float = 1.0
    init_scale: float = 1.0

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"unknown MCMC kernel {self.kernel!r}; expected one of {KERNELS}")
        for name in ("n_chains", "thin", "chunk_steps", "hmc_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.burn_in < 0:
            raise ValueError(f"burn_in must be >= 0, got {self.burn_in}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be positive, got {self.step_size}")
        if not 0 <= self.hmc_jitter < 1:
            raise ValueError(f"hmc_jitter must lie in [0, 1), got {self.hmc_jitter}")
        if self.target_accept is not None and not 0 < self.target_accept < 1:
            raise ValueError(f"target_accept must lie in (0, 1), got {self.target_accept}")

    @property
    def accept_target(self) -> float:
        return DEFAULT_TARGET_ACCEPT[self.kernel] if self.target_accept is None else float(self.target_accept)

    @property
    def chunk(self) -> int:
        """Chunk length in steps, a multiple of ``thin``."""
        return int(math.ceil(self.chunk_steps / self.thin) * self.thin)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_accept"] = self.accept_target
        d["chunk_steps"] = self.chunk
        return d


class ChainState(NamedTuple):
    """State of all chains: positions (c, dim), energies (c,), energy gradients (c, dim)."""

    x: Array
    u: Array
    grad: Array


class Adaptation(NamedTuple):
    """Per-chain dual-averaging state (each (c,)); ``t`` counts steps since the last restart."""

    log_h: Array
    log_h_bar: Array
    h_bar_stat: Array
    t: Array
    mu: Array


def adaptation_restarts(burn_in: int) -> tuple[int, ...]:
    """Burn-in steps at which dual averaging restarts from its current averaged step size.

    Dual averaging drives the *all-time* mean acceptance to the target, so the transient
    of the first steps (far from equilibrium, step size far off) is compensated later by
    a biased step size. Restarting in doubling windows (as Stan does) forgets the
    transient: the final window is the second half of the burn-in.
    """
    return tuple(sorted({b for b in (burn_in // 8, burn_in // 4, burn_in // 2) if 0 < b < burn_in}))


# ---------------------------------------------------------------------------- kernels
def _sq(v: Array) -> Array:
    return jnp.sum(v * v, axis=-1)


def make_kernel(
    name: str, value_and_grad: Callable, project: Callable, *, hmc_steps: int = 10, hmc_jitter: float = 0.2
) -> Callable:
    """One MCMC step for ONE chain: ``step(state, h, noise) -> (state, accept_prob, accepted)``.

    ``state`` is (x, u, ∇u) of one chain, ``value_and_grad`` maps one flat x to (u, ∇u),
    ``project`` maps a flat vector onto the sampled subspace. ``noise`` = (ξ ~ N(0, I) of
    shape (dim,), v ~ U(0, 1), w ~ U(−1, 1)) is drawn outside for all chains at once: one
    PRNG call per step instead of one per chain keeps the compiled program small.
    """

    def finish(x, u, g, y, log_ratio, v):
        u_y, g_y = value_and_grad(y)
        log_ratio = log_ratio(u_y, g_y)
        # A non-finite proposal (overlapping particles, overflow) is simply rejected.
        log_ratio = jnp.where(jnp.isfinite(log_ratio) & jnp.isfinite(u_y), log_ratio, -jnp.inf)
        accept_prob = jnp.exp(jnp.minimum(log_ratio, 0.0))
        accepted = jnp.log(v) < log_ratio
        new = (jnp.where(accepted, y, x), jnp.where(accepted, u_y, u), jnp.where(accepted, g_y, g))
        return new, accept_prob, accepted

    def rwm(state, h, noise):
        x, u, g = state
        xi, v, _ = noise
        y = x + h * project(xi)
        return finish(x, u, g, y, lambda u_y, g_y: u - u_y, v)

    def mala(state, h, noise):
        x, u, g = state
        xi, v, _ = noise
        half = 0.5 * h * h
        gx = project(g)
        y = x - half * gx + h * project(xi)

        def log_ratio(u_y, g_y):
            forward = _sq(y - x + half * gx)  # -2h² log q(y|x) up to a constant
            backward = _sq(x - y + half * project(g_y))
            return u - u_y + (forward - backward) / (4.0 * half)

        return finish(x, u, g, y, log_ratio, v)

    def hmc(state, h, noise):
        x, u, g = state
        xi, v, w = noise
        p0 = project(xi)
        # A random step size per trajectory (independent of the state, so detailed balance
        # holds) breaks the periodic orbits of fixed-length leapfrog (Neal 2011, §5.4.2.2).
        h = h * (1.0 + hmc_jitter * w)

        def leapfrog(carry, _):
            q, p, gq = carry
            p = p - 0.5 * h * project(gq)
            q = q + h * p
            _, gq = value_and_grad(q)
            p = p - 0.5 * h * project(gq)
            return (q, p, gq), None

        (y, p1, _), _ = jax.lax.scan(leapfrog, (x, p0, g), None, length=hmc_steps)
        # The last gradient is recomputed with the energy in ``finish`` (one extra call keeps
        # the code shared with the other kernels; HMC is not the default kernel).
        return finish(x, u, g, y, lambda u_y, g_y: u - u_y + 0.5 * (_sq(p0) - _sq(p1)), v)

    kernels = {"rwm": rwm, "mala": mala, "hmc": hmc}
    if name not in kernels:
        raise ValueError(f"unknown MCMC kernel {name!r}; expected one of {KERNELS}")
    return kernels[name]


def dual_averaging_update(ad: Adaptation, accept_prob: Array, *, target: float) -> Adaptation:
    r"""One dual-averaging step (Hoffman & Gelman 2014, Alg. 5; γ = 0.05, t₀ = 10, κ = 0.75).

    $$\bar H_t = (1 - \tfrac{1}{t+t_0})\bar H_{t-1} + \tfrac{1}{t+t_0}(δ - α_t),\quad
      \log h_t = μ - \tfrac{\sqrt t}{γ}\bar H_t,\quad
      \log \bar h_t = t^{-κ}\log h_t + (1 - t^{-κ})\log \bar h_{t-1}.$$
    """
    gamma, t0, kappa = 0.05, 10.0, 0.75
    t = ad.t + 1.0
    alpha = jnp.where(jnp.isfinite(accept_prob), accept_prob, 0.0)
    w = 1.0 / (t + t0)
    h_stat = (1.0 - w) * ad.h_bar_stat + w * (target - alpha)
    log_h = ad.mu - jnp.sqrt(t) / gamma * h_stat
    eta = t ** (-kappa)
    log_h_bar = eta * log_h + (1.0 - eta) * ad.log_h_bar
    return Adaptation(log_h=log_h, log_h_bar=log_h_bar, h_bar_stat=h_stat, t=t, mu=ad.mu)


def restart_adaptation(ad: Adaptation) -> Adaptation:
    """Dual averaging anew around the current averaged step size (μ = log h̄, no history)."""
    zero = jnp.zeros_like(ad.t)
    return Adaptation(log_h=ad.log_h_bar, log_h_bar=ad.log_h_bar, h_bar_stat=zero, t=zero, mu=ad.log_h_bar)


# ---------------------------------------------------------------------------- diagnostics
def autocorrelation(x) -> np.ndarray:
    r"""Normalised autocorrelation ρ(k) of one series (T,) or the chain average of (c, T).

    Autocovariances are computed per chain by FFT about the chain's own mean and averaged
    over chains before normalising, $ρ(k) = \bar C(k) / \bar C(0)$.
    """
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    if x.ndim != 2 or x.shape[1] < 2:
        raise ValueError(f"autocorrelation needs a series of length >= 2 per chain, got shape {x.shape}")
    n = x.shape[1]
    xc = x - x.mean(axis=1, keepdims=True)
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(xc, n=size, axis=1)
    acov = np.fft.irfft(f * np.conj(f), n=size, axis=1)[:, :n] / n
    acov = acov.mean(axis=0)
    if acov[0] <= 0:
        return np.ones(n)  # a constant series: treat as uncorrelated rather than dividing by 0
    return acov / acov[0]


def integrated_autocorr_time(x, c: float = 5.0) -> tuple[float, int]:
    r"""Integrated autocorrelation time with Sokal's automatic window.

    $$τ(M) = 1 + 2\sum_{k=1}^{M} ρ(k),$$

    with the smallest window M ≥ c·τ(M) (Sokal 1997; Madras & Sokal 1988). For an AR(1)
    process $x_t = φx_{t-1} + ε_t$ the exact value is $(1+φ)/(1-φ)$. Input (T,) or (c, T)
    chains of equal length; returns (τ, M) in units of the series' spacing. If no window
    satisfies the condition the series is too short and τ at the largest window is
    returned (an underestimate; compare it with T).
    """
    rho = autocorrelation(x)
    taus = 2.0 * np.cumsum(rho) - 1.0
    windows = np.arange(len(taus))
    ok = windows >= c * taus
    m = int(np.argmax(ok)) if ok.any() else len(taus) - 1
    return float(taus[m]), m


def block_mean_and_error(x, n_blocks: int = 20) -> tuple[float, float]:
    r"""Mean of a correlated series (T,) and its standard error from contiguous blocks.

    The series is cut into ``n_blocks`` equal blocks (the last T mod n_blocks values sit in
    none) and the error is $\mathrm{sd}(\bar x_b)/\sqrt{B}$ over the $B$ = ``n_blocks`` block means. It
    is right when a block is much longer than the integrated autocorrelation time, so that
    block means are nearly independent; for a rare event, also when each block sees several
    entries into and exits from the state (else it understates, and the count of entries
    says more). Unlike the naive $\mathrm{sd}(x)/\sqrt{T}$ it needs no estimate of τ.

    ``x`` of shape (R, T) is R independent runs of equal length: each is cut into
    ``n_blocks`` blocks (no block straddles two runs), $B = R \cdot$ ``n_blocks``.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"block_mean_and_error takes one series (T,) or equal runs (R, T), got shape {x.shape}")
    runs = x.reshape(-1, x.shape[-1])
    if n_blocks < 1 or runs.shape[0] * n_blocks < 2 or runs.shape[1] < n_blocks:
        raise ValueError(f"need at least two blocks of at least one value each, got n_blocks={n_blocks} for runs of shape {x.shape}")
    size = runs.shape[1] // n_blocks
    means = runs[:, : size * n_blocks].reshape(-1, size).mean(axis=1)
    return float(x.mean()), float(means.std(ddof=1) / math.sqrt(len(means)))


def gelman_rubin(x) -> float:
    r"""Split-R̂ of a scalar over chains (c, n) (Gelman et al., BDA3 §11.4).

    Each chain is split in halves; with W the mean within-chain variance and B/n the
    variance of the chain means, $\hat R = \sqrt{((n-1)/n\,W + B/n)/W}$. Values near 1
    mean the chains agree; above ≈ 1.01–1.1 they have not mixed.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] < 4:
        raise ValueError(f"gelman_rubin needs (chains, n >= 4) values, got shape {x.shape}")
    half = x.shape[1] // 2
    x = np.concatenate([x[:, :half], x[:, half : 2 * half]], axis=0)
    n = x.shape[1]
    w = x.var(axis=1, ddof=1).mean()
    b_over_n = x.mean(axis=1).var(ddof=1)
    if w <= 0:
        return float("nan")
    return float(np.sqrt(((n - 1) / n * w + b_over_n) / w))


# ---------------------------------------------------------------------------- the sampler
@dataclasses.dataclass
class MCMCResult:
    """Outcome of :func:`run_chains` (complete or, with ``max_chunks``, partial).

    samples (c, m, dim) and their energies (c, m) are the thinned sampling-phase states,
    ``trace`` (steps, trace_chains) the per-step energies of the first chains over burn-in
    and sampling, ``step_size`` and ``acceptance`` (c,) the frozen step sizes and the
    sampling-phase acceptance rate of each chain.
    """

    samples: np.ndarray
    energies: np.ndarray
    step_size: np.ndarray
    acceptance: np.ndarray
    trace: np.ndarray
    burn_in: int
    thin: int
    steps_done: int
    steps_total: int
    seconds: float
    settings: dict

    @property
    def complete(self) -> bool:
        return self.steps_done >= self.steps_total

    def diagnostics(self) -> dict:
        """Acceptance, τ of the energy, split-R̂ and the spread of the per-chain mean energy."""
        out: dict = {
            "acceptance_mean": float(np.mean(self.acceptance)),
            "acceptance_min": float(np.min(self.acceptance)),
            "acceptance_max": float(np.max(self.acceptance)),
            "step_size_median": float(np.median(self.step_size)),
            "step_size_min": float(np.min(self.step_size)),
            "step_size_max": float(np.max(self.step_size)),
            "seconds": float(self.seconds),
        }
        sampling = self.trace[self.burn_in :]
        if sampling.shape[0] >= 16:
            tau, window = integrated_autocorr_time(sampling.T)
            out["tau_energy_steps"] = tau
            out["tau_window_steps"] = window
            out["tau_series_steps"] = int(sampling.shape[0])
            out["thin_over_tau"] = self.thin / tau
        e = self.energies
        if e.shape[1] >= 4:
            out["rhat_energy"] = gelman_rubin(e)
            tau_thin, _ = integrated_autocorr_time(e)
            out["tau_energy_thinned"] = tau_thin
            chain_means = e.mean(axis=1)
            out["chain_mean_energy_spread"] = float(chain_means.std(ddof=1))
            # Expected spread of chain means if the recorded samples had the τ just measured.
            out["chain_mean_energy_spread_expected"] = float(e.std() * math.sqrt(max(tau_thin, 1.0) / e.shape[1]))
        out["mean_energy"] = float(e.mean()) if e.size else float("nan")
        return out


def _initial_positions(system, settings: SamplerSettings, key) -> Array:
    """Chains start on a jittered lattice (particles) or from a scaled normal, projected."""
    base = system.default_base()
    n = settings.n_chains
    if hasattr(system, "n_particles") and hasattr(system, "spatial_dim"):
        N, d = system.n_particles, system.spatial_dim
        side = int(math.ceil(N ** (1.0 / d) - 1e-9))
        grid = np.stack(np.meshgrid(*[np.arange(side)] * d, indexing="ij"), -1).reshape(-1, d)[:N]
        lattice = jnp.asarray(grid * settings.init_spacing, dtype=jnp.float32)
        noise = 0.05 * settings.init_spacing * jax.random.normal(key, (n, N, d))
        x = (lattice[None] + noise).reshape(n, N * d)
    else:
        x = settings.init_scale * jax.random.normal(key, (n, system.dim))
    return base.project(x)


class _Chunks:
    """Jitted burn-in and sampling chunks for one (system, settings)."""

    def __init__(self, system, settings: SamplerSettings):
        self.settings = settings
        base = system.default_base()
        project = base.project

        def energy(x):
            return system.energy(x)

        value_and_grad = jax.value_and_grad(energy)
        step = make_kernel(settings.kernel, value_and_grad, project, hmc_steps=settings.hmc_steps, hmc_jitter=settings.hmc_jitter)
        self.value_and_grad = jax.jit(jax.vmap(value_and_grad))
        vstep = jax.vmap(step)
        k = settings.trace_chains
        target = settings.accept_target

        def one_step(state, h, key):
            k_xi, k_v, k_w = jax.random.split(key, 3)
            x = state[0]
            xi = jax.random.normal(k_xi, x.shape, x.dtype)
            v = jax.random.uniform(k_v, h.shape, x.dtype, minval=jnp.finfo(x.dtype).tiny)
            w = jax.random.uniform(k_w, h.shape, x.dtype, -1.0, 1.0)
            return vstep(state, h, (xi, v, w))

        restarts = jnp.asarray(adaptation_restarts(settings.burn_in) or (-1,))

        def burn(state, ad, key, first_step, n_steps):
            def body(carry, i):
                state, ad, key = carry
                key, sub = jax.random.split(key)
                if settings.adapt:
                    ad = jax.lax.cond(jnp.any(i == restarts), restart_adaptation, lambda a: a, ad)
                state, prob, _ = one_step(state, jnp.exp(ad.log_h), sub)
                if settings.adapt:
                    ad = dual_averaging_update(ad, prob, target=target)
                return (ChainState(*state), ad, key), (state[1][:k], prob)

            steps = first_step + jnp.arange(n_steps)
            (state, ad, key), (trace, prob) = jax.lax.scan(body, (state, ad, key), steps)
            return state, ad, key, trace, prob.mean(axis=0)

        def sample(state, h, key, n_steps):
            def inner(carry, _):
                state, key, n_acc = carry
                key, sub = jax.random.split(key)
                state, _, acc = one_step(state, h, sub)
                return (ChainState(*state), key, n_acc + acc), state[1][:k]

            def outer(carry, _):
                carry, trace = jax.lax.scan(inner, carry, None, length=settings.thin)
                state = carry[0]
                return carry, (state.x, state.u, trace)

            n_acc = jnp.zeros(h.shape, jnp.int32)
            (state, key, n_acc), (xs, us, trace) = jax.lax.scan(
                outer, (state, key, n_acc), None, length=n_steps // settings.thin
            )
            return state, key, n_acc, xs, us, trace.reshape(-1, trace.shape[-1])

        self.burn = jax.jit(burn, static_argnames="n_steps")
        self.sample = jax.jit(sample, static_argnames="n_steps")


def _chunk_index(done: int, s: SamplerSettings) -> int:
    """Number of chunks completed after ``done`` steps (burn-in and sampling chunked separately)."""
    if done <= s.burn_in:
        return math.ceil(done / s.chunk)
    return math.ceil(s.burn_in / s.chunk) + math.ceil((done - s.burn_in) / s.chunk)


@functools.lru_cache(maxsize=8)
def _chunks(system, settings: SamplerSettings) -> _Chunks:
    """Compiled chunks, reused when the same run is continued in the same process."""
    return _Chunks(system, settings)


_STATE_FIELDS = (
    "x", "u", "grad", "log_h", "log_h_bar", "h_bar_stat", "t", "mu", "step_size", "key", "steps_done", "n_accepted",
)  # fmt: skip
_RECORD_FIELDS = ("samples", "energies", "trace")


def _params(system, settings: SamplerSettings, n_per_chain: int, seed: int) -> dict:
    from zoo.storage import system_spec

    return {"system": system_spec(system), "settings": settings.as_dict(), "n_per_chain": n_per_chain, "seed": seed}


def _settle_state_file(workdir: Path, log: ChunkLog, *, resume: bool) -> None:
    """Deal with a run that an earlier zoo kept in one state file (``mcmc_state.npz``). Resuming
    into an empty log, its chains so far become the first chunk and the file is kept beside as
    ``mcmc_state.npz.adopted``; starting over, the file is set aside as ``.superseded`` so that no
    later call adopts it."""
    path = workdir / LEGACY_STATE_FILE
    if not path.exists():
        return
    if not resume:
        path.rename(path.with_name(path.name + ".superseded"))
        return
    if log.n_chunks:
        return
    try:
        with np.load(path) as f:
            st = {name: f[name] for name in f.files}
        stored = json.loads(str(st["fingerprint"]))
    except Exception as e:  # noqa: BLE001  (any unreadable file: say which and why)
        raise RunStateError(f"cannot read the MCMC state {path}: {e}; delete it to start over") from e
    if stored != log.manifest["params"]:
        raise RunStateError(f"{path} belongs to a run with other settings; use another workdir or resume=False to start over")
    if not bool(st["fresh"]):
        log.append({name: st[name] for name in _STATE_FIELDS + _RECORD_FIELDS}, seconds=float(st["seconds"]))
    path.rename(path.with_name(path.name + ".adopted"))


def run_chains(
    system,
    workdir,
    *,
    settings: SamplerSettings,
    n_per_chain: int,
    seed: int = 0,
    resume: bool = True,
    max_chunks: int | None = None,
    progress: bool = True,
) -> MCMCResult:
    """Run (or continue) ``settings.n_chains`` chains until each holds ``n_per_chain`` samples.

    Each chunk's samples and the chain state it ends in go to ``<workdir>/mcmc/`` (a
    :class:`zoo.storage.ChunkLog`) as it finishes. With ``resume`` (default) a run of the same
    system, settings and seed is continued; one with different settings is an error (choose
    another workdir or ``resume=False``, which starts over). ``max_chunks`` stops after that
    many chunks in this call (the result is then partial, ``result.complete`` is False).
    """
    if n_per_chain < 1:
        raise ValueError(f"n_per_chain must be >= 1, got {n_per_chain}")
    workdir = Path(workdir)
    s = settings
    n_c, dim, k = s.n_chains, system.dim, min(s.trace_chains, s.n_chains)
    if k != s.trace_chains:
        s = dataclasses.replace(s, trace_chains=k)
    log = ChunkLog(workdir / CHUNK_DIR, _params(system, s, n_per_chain, seed), resume=resume)
    _settle_state_file(workdir, log, resume=resume)
    sampling_steps = n_per_chain * s.thin
    total = s.burn_in + sampling_steps

    if log.n_chunks:
        st = log.load(-1, _STATE_FIELDS)  # only the last chunk's end state is continued from
        parts = [log.load(i, _RECORD_FIELDS) for i in range(log.n_chunks)]
        records = {
            "samples": np.concatenate([p["samples"] for p in parts], axis=1),
            "energies": np.concatenate([p["energies"] for p in parts], axis=1),
            "trace": np.concatenate([p["trace"] for p in parts], axis=0),
        }
    else:
        key, k_init = jax.random.split(jax.random.PRNGKey(seed))
        st = {
            "x": np.asarray(_initial_positions(system, s, k_init).astype(jnp.float32)),
            "log_h": np.full(n_c, math.log(s.step_size), np.float32),
            "log_h_bar": np.full(n_c, math.log(s.step_size), np.float32),
            "h_bar_stat": np.zeros(n_c, np.float32),
            "t": np.zeros(n_c, np.float32),
            # Hoffman & Gelman's μ = log(10 h₀): early trials err toward large steps.
            "mu": np.full(n_c, math.log(10.0 * s.step_size), np.float32),
            "step_size": np.full(n_c, s.step_size, np.float32),
            "key": np.asarray(key),
            "steps_done": np.array(0),
            "n_accepted": np.zeros(n_c, np.int64),
        }
        records = {
            "samples": np.zeros((n_c, 0, dim), np.float32),
            "energies": np.zeros((n_c, 0), np.float32),
            "trace": np.zeros((0, k), np.float32),
        }

    chunks = _chunks(system, s)
    x = jnp.asarray(st["x"])
    if not log.n_chunks:
        u, g = chunks.value_and_grad(x)
    else:
        # The stored energies and gradients, not recomputed ones: a recomputation may differ in
        # the last bit and change an accept decision, and a resumed run must equal a straight one.
        u, g = jnp.asarray(st["u"]), jnp.asarray(st["grad"])
    state = ChainState(x, u, g)
    ad = Adaptation(*(jnp.asarray(st[n]) for n in ("log_h", "log_h_bar", "h_bar_stat", "t", "mu")))
    key = jnp.asarray(st["key"])
    done = int(st["steps_done"])
    samples, energies, trace = [records["samples"]], [records["energies"]], [records["trace"]]
    n_accepted = st["n_accepted"].copy()
    step_size = st["step_size"].copy()
    seconds = log.seconds

    bar = None
    if progress and done < total:
        bar = progress_bar(total, f"MCMC {type(system).__name__}", "step", initial=done)
    try:
        n_run = 0
        while done < total and (max_chunks is None or n_run < max_chunks):
            t_start = time.perf_counter()
            new_samples, new_energies = np.zeros((n_c, 0, dim), np.float32), np.zeros((n_c, 0), np.float32)
            if done < s.burn_in:
                n = min(s.chunk, s.burn_in - done)
                state, ad, key, tr, acc = chunks.burn(state, ad, key, done, n_steps=n)
                acc_mean, phase = float(np.mean(np.asarray(acc))), "burn-in"
                if s.adapt:
                    step_size = np.exp(np.asarray(ad.log_h_bar)).astype(np.float32)
            else:
                n = min(s.chunk, total - done)
                state, key, n_acc, xs, us, tr = chunks.sample(state, jnp.asarray(step_size), key, n_steps=n)
                n_accepted = n_accepted + np.asarray(n_acc)
                new_samples, new_energies = np.swapaxes(np.asarray(xs), 0, 1), np.asarray(us).T
                acc_mean, phase = float(np.asarray(n_acc).mean() / n), "sampling"
            tr = np.asarray(tr)
            done += n
            n_run += 1
            chunk_seconds = time.perf_counter() - t_start
            seconds += chunk_seconds
            samples.append(new_samples)
            energies.append(new_energies)
            trace.append(tr)
            log.append(
                {
                    "x": state.x, "u": state.u, "grad": state.grad,
                    "log_h": ad.log_h, "log_h_bar": ad.log_h_bar, "h_bar_stat": ad.h_bar_stat, "t": ad.t, "mu": ad.mu,
                    "step_size": step_size, "key": key, "steps_done": np.array(done), "n_accepted": n_accepted,
                    "samples": new_samples, "energies": new_energies, "trace": tr,
                },  # fmt: skip
                seconds=chunk_seconds,
            )
            if bar is not None:
                n_chunks = math.ceil(s.burn_in / s.chunk) + math.ceil(sampling_steps / s.chunk)
                bar.set_postfix_str(
                    f"chunk {_chunk_index(done, s)}/{n_chunks} {phase}, acc {acc_mean:.3f}, h {np.median(step_size):.3g}", refresh=False
                )
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()  # also stops its heartbeat when a chunk fails

    sampling_done = max(done - s.burn_in, 0)
    acceptance = n_accepted / max(sampling_done, 1)
    return MCMCResult(
        samples=np.concatenate(samples, axis=1),
        energies=np.concatenate(energies, axis=1),
        step_size=step_size,
        acceptance=acceptance,
        trace=np.concatenate(trace, axis=0),
        burn_in=s.burn_in,
        thin=s.thin,
        steps_done=done,
        steps_total=total,
        seconds=seconds,
        settings=s.as_dict(),
    )

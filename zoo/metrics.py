r"""Sampling metrics of a Boltzmann generator, computed in log space.

With log weights $\log w = -u(x) - \log q_θ(x)$ (Z cancels in every ratio):

- ESS-q from model samples (Kish): $(\sum w)^2 / (n \sum w^2)$;
- ESS-p from target samples (Nicoli et al. 2023): $n^2 / (\sum w \cdot \sum 1/w)$;
- NLL: $-\frac1n \sum \log q_θ(x_i)$ over held-out target samples, including the base's
  normalising constant;
- exact KL(p‖q) $= \mathbb E_p[\log p - \log q]$ where log Z is known;
- path length $\int_0^1 \|v_θ(t, x(t))\|dt$ averaged over model trajectories;
- standard errors of NLL, ESS-q and ESS-p by the delta method (``*_se``);
- the largest weight's share of all weight, of model and of target samples: whether one
  sample decides an ESS.

Non-finite model log weights (an exploded sample, an energy engine that failed) get
weight zero and are counted; a target sample the model gives zero density drives ESS-p
to zero, which is the point of that estimator.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from scipy.special import logsumexp

from zoo.data import Batch
from zoo.flows.cnf import describe_in_words, fingerprint, log_prob_chunked, sample_and_log_prob_chunked
from zoo.losses.fm import FlowMatching
from zoo.storage import ChunkStore, array_sha256
from zoo.systems import AbstractParticleSystem, AlanineDipeptideClassical, AlanineDipeptideXTB
from zoo.systems.alanine import dihedrals


def _clean_model_log_w(log_w) -> np.ndarray:
    """Model-sample log weights with every non-finite entry (NaN, ±inf) set to −inf (weight 0)."""
    log_w = np.asarray(log_w, dtype=np.float64)
    return np.where(np.isfinite(log_w), log_w, -np.inf)


def ess_q(log_w) -> float:
    """Relative Kish ESS in [0, 1] from log weights of model samples (non-finite → weight 0)."""
    log_w = _clean_model_log_w(log_w)
    n = log_w.shape[0]
    if n == 0:
        raise ValueError("ESS needs at least one sample")
    if np.all(log_w == -np.inf):
        return 0.0
    return float(np.exp(2 * logsumexp(log_w) - logsumexp(2 * log_w) - math.log(n)))


def ess_p(log_w) -> float:
    """Relative ESS from log weights of TARGET samples: n² / (Σw · Σ1/w), in [0, 1].

    A target sample with log w = +inf (the model puts no mass there) or NaN gives 0.
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    n = log_w.shape[0]
    if n == 0:
        raise ValueError("ESS needs at least one sample")
    if not np.all(np.isfinite(log_w)):
        return 0.0
    return float(np.exp(2 * math.log(n) - logsumexp(log_w) - logsumexp(-log_w)))


def _relative_se(terms: list[tuple[np.ndarray, float]]) -> float:
    """Delta-method relative standard error of a product Π m_k^{p_k} of sample means m_k.

    ``terms`` are (per-sample values, exponent p_k); the relative variance is
    gᵀ Σ g / n with g_k = p_k / m_k and Σ the covariance of the per-sample values.
    """
    values = np.stack([v for v, _ in terms])
    n = values.shape[1]
    if n < 2:
        return float("nan")
    grad = np.array([p / v.mean() for v, p in terms])
    cov = np.atleast_2d(np.cov(values))
    return float(np.sqrt(max(grad @ cov @ grad, 0.0) / n))


def ess_q_se(log_w) -> float:
    """Delta-method standard error of :func:`ess_q` (Kish: mean(w)² / mean(w²)).

    Like any moment-based error it is only as good as the second moment of w² is finite;
    with heavy-tailed weights it understates the error.
    """
    log_w = _clean_model_log_w(log_w)
    if np.all(log_w == -np.inf):
        return 0.0
    w = np.exp(log_w - log_w.max())
    return ess_q(log_w) * _relative_se([(w, 2.0), (w * w, -1.0)])


def ess_p_se(log_w) -> float:
    """Delta-method standard error of :func:`ess_p` (1 / (mean(w) · mean(1/w)))."""
    log_w = np.asarray(log_w, dtype=np.float64)
    if not np.all(np.isfinite(log_w)):
        return 0.0
    w, inv_w = np.exp(log_w - log_w.max()), np.exp(log_w.min() - log_w)  # each scaled to ≤ 1
    return ess_p(log_w) * _relative_se([(w, -1.0), (inv_w, -1.0)])


def top_weight_share(log_w, k: int = 1) -> float:
    """The share of the total importance weight carried by the ``k`` largest weights, in [k/n, 1].

    Of model samples, how far the Kish ESS rests on a few samples; of target samples
    (w = p/q), whether a few states the model all but misses decide ESS-p, whose
    Σw they dominate. Non-finite log weights count as weight 0 (model side) and make the
    share 1 where one is +inf. 0 when no weight is positive.
    """
    log_w = np.asarray(log_w, dtype=np.float64)
    if not 1 <= k <= log_w.shape[0]:
        raise ValueError(f"top_weight_share takes 1 <= k <= n = {log_w.shape[0]}, got k={k}")
    if np.any(log_w == np.inf):
        return 1.0
    log_w = np.where(np.isfinite(log_w), log_w, -np.inf)
    if np.all(log_w == -np.inf):
        return 0.0
    top = np.sort(log_w)[-k:]
    return float(np.exp(logsumexp(top) - logsumexp(log_w)))


#: How the highest-weight samples' log q is solved again to check it: tight enough that its own
#: error (~0.01 nats in float32 on LJ13) is far below what would change an ESS.
REFERENCE_SOLVE = {"divergence": "exact", "solver": "dopri5", "solver_rtol": 1e-6, "solver_atol": 1e-6}
#: The same in words, for the messages and tables that report the check.
REFERENCE_IN_WORDS = describe_in_words(REFERENCE_SOLVE)
#: A top-weight log q difference (nats) above which the evaluation warns: 0.1 nats moves a
#: dominant weight by ~10 %.
TOP_LOG_Q_TOLERANCE = 0.1


class TopWeightCheck(NamedTuple):
    """How far the evaluation's log q lies from :data:`REFERENCE_SOLVE`'s (log q − log q_ref, nats).

    An ESS is unchanged when every log q moves by the same amount (a common offset scales
    every weight alike), so what decides whether it depends on the solver is how far the
    highest weights' errors stand from the typical sample's: ``top_excess``. The NLL, on the
    other hand, moves by the whole typical error: ``offset``.
    """

    #: The largest |log q − log q_ref| over the highest-weight samples.
    top_error: float
    #: The median of log q − log q_ref over randomly chosen other samples (NaN when there are none).
    offset: float
    #: The largest |(log q − log q_ref) − offset| over the highest-weight samples.
    top_excess: float


def check_top_weights(flow, x, log_q, log_w, k: int = 8, seed: int = 0) -> TopWeightCheck:
    """Solve the ``k`` samples with the largest finite weights and ``k`` others chosen at
    random again with :data:`REFERENCE_SOLVE`, and compare with the evaluation's ``log_q``.

    An ESS rests on its largest weights, and those sit where the model's density is lowest
    relative to the target's, where the field is hardest to integrate: a fixed-step solver
    that is accurate on typical samples can be off by a nat there. The random samples give
    the typical error, which shifts every log weight alike (and so the NLL, not the ESS).
    Deterministic divergences only: Hutchinson's noise would dominate the differences. NaN
    throughout when no weight is finite.
    """
    if flow.needs_key:
        raise ValueError("the top-weight check needs a deterministic divergence (the exact trace), not Hutchinson's estimate")
    log_w, log_q = np.asarray(log_w, dtype=np.float64), np.asarray(log_q)
    finite = np.flatnonzero(np.isfinite(log_w) & np.isfinite(log_q))
    if finite.size == 0:
        return TopWeightCheck(float("nan"), float("nan"), float("nan"))
    top = finite[np.argsort(log_w[finite])[-k:]]
    others = np.setdiff1d(finite, top)
    typical = np.random.default_rng(seed).choice(others, size=min(k, others.size), replace=False)
    checked = np.concatenate([top, typical])
    reference = log_prob_chunked(flow.as_described(REFERENCE_SOLVE), np.asarray(x)[checked], chunk_size=checked.size, verify=0)["log_q"]
    error = log_q[checked] - np.asarray(reference)
    top_error, typical_error = error[: top.size], error[top.size :]
    offset = float(np.median(typical_error)) if typical_error.size else float("nan")
    excess = np.abs(top_error - (offset if typical_error.size else 0.0))
    return TopWeightCheck(float(np.max(np.abs(top_error))), offset, float(np.max(excess)))


def nll_se(log_q) -> float:
    """Standard error of :func:`nll` (finite entries only)."""
    log_q = np.asarray(log_q, dtype=np.float64)
    log_q = log_q[np.isfinite(log_q)]
    return float(log_q.std(ddof=1) / math.sqrt(log_q.size)) if log_q.size > 1 else float("nan")


def nll(log_q) -> float:
    """Mean negative log likelihood of held-out target samples (finite entries only)."""
    log_q = np.asarray(log_q, dtype=np.float64)
    finite = np.isfinite(log_q)
    if not finite.any():
        return float("inf")
    return float(-log_q[finite].mean())


def kl_exact(log_p, log_q) -> float:
    """KL(p‖q) = E_p[log p − log q] from target samples with normalised log p."""
    diff = np.asarray(log_p, np.float64) - np.asarray(log_q, np.float64)
    return float(diff.mean()) if np.all(np.isfinite(diff)) else float("inf")


@functools.lru_cache(maxsize=16)
def _batched_energy(system):
    return jax.jit(jax.vmap(system.energy))


class Reweighted(NamedTuple):
    """A self-normalised importance-sampling estimate of E_p[f] from model samples."""

    mean: np.ndarray  # E_p[f] (shape of one f value)
    se: np.ndarray  # its delta-method standard error
    ess: float  # Kish effective sample size (a count, not a fraction)
    n: int  # samples used (finite weight and finite f)

    def __str__(self) -> str:
        fmt = np.array2string if np.ndim(self.mean) else (lambda v: f"{float(v):.6g}")
        return f"{fmt(self.mean)} ± {fmt(self.se)} (ESS {self.ess:.1f} of {self.n})"


def reweight(values, log_w) -> Reweighted:
    r"""E_p[f] from model samples x_i ~ q with values f(x_i) and log weights log w_i = −u − log q.

    $\hat μ = \sum_i w_i f_i / \sum_i w_i$ with standard error
    $\sqrt{\sum_i w_i^2 (f_i − \hat μ)^2} / \sum_i w_i$ (delta method for a ratio of means),
    computed with weights scaled by their maximum. ``values`` is (n,) or (n, k) (k
    observables at once); samples with a non-finite weight or value are dropped and the
    rest counted in ``n``. Like every importance-sampling error, the standard error
    describes the sampling noise only and understates it when the weights are heavy-tailed
    (a small ESS says so).
    """
    values = np.asarray(values, dtype=np.float64)
    log_w = np.asarray(log_w, dtype=np.float64)
    if values.shape[:1] != log_w.shape or log_w.ndim != 1:
        raise ValueError(f"reweight takes values (n,) or (n, k) and log_w (n,); got {values.shape} and {log_w.shape}")
    flat = values.reshape(len(values), -1)
    keep = np.isfinite(log_w) & np.all(np.isfinite(flat), axis=1)
    if not keep.any():
        raise ValueError("reweight: no sample has a finite weight and a finite value")
    w = np.exp(log_w[keep] - log_w[keep].max())
    f = flat[keep]
    total = w.sum()
    mean = (w[:, None] * f).sum(axis=0) / total
    se = np.sqrt((w[:, None] ** 2 * (f - mean) ** 2).sum(axis=0)) / total
    shape = values.shape[1:]
    return Reweighted(mean=mean.reshape(shape), se=se.reshape(shape), ess=float(total**2 / np.sum(w * w)), n=int(keep.sum()))


def free_energy_difference(in_a, log_w=None) -> tuple[float, float]:
    r"""ΔF = F_A − F_B = −log(P(A) / P(B)) in k_BT, B the complement of A, and its standard error.

    ``in_a`` (n,) says which samples lie in A (e.g. φ > 0 for alanine dipeptide). With
    ``log_w`` (model samples) P(A) is the :func:`reweight` estimate of E_p[1_A]; without,
    the samples' own fraction. The error is the delta method's,
    $\mathrm{se}(ΔF) = \mathrm{se}(P) / (P(1 − P))$. A state no sample reaches gives ±inf
    (and a NaN error).
    """
    in_a = np.asarray(in_a, dtype=np.float64)
    p = reweight(in_a, np.zeros(len(in_a)) if log_w is None else log_w)
    prob, se = float(p.mean), float(p.se)
    if prob <= 0.0 or prob >= 1.0:
        return (math.inf if prob <= 0.0 else -math.inf), math.nan
    return -math.log(prob / (1.0 - prob)), se / (prob * (1.0 - prob))


def pair_distances(x, n_particles: int, spatial_dim: int) -> np.ndarray:
    """All inter-particle distances, (n, n_particles(n_particles − 1)/2), of flat samples (n, n_particles·spatial_dim)."""
    x = np.asarray(x)
    p = x.reshape(x.shape[0], n_particles, spatial_dim)
    i, j = np.triu_indices(n_particles, k=1)
    return np.linalg.norm(p[:, i] - p[:, j], axis=-1)


def phi_angles(x) -> np.ndarray:
    """The backbone dihedral φ (radians) of flat alanine dipeptide samples (n, 66)."""
    phi, _ = jax.jit(jax.vmap(dihedrals))(jnp.asarray(x))
    return np.asarray(phi)


def observables(system, arrays: dict) -> dict:
    """The numbers beyond the weights by which a system's samples are judged.

    ``arrays`` holds ``x_target`` (data), ``x_model`` and ``log_w_model`` (as
    :func:`evaluate_flow` returns them); non-finite model samples are left out.

    - alanine dipeptide: the fraction of data with φ > 0, and ΔF = F(φ > 0) − F(φ < 0) in
      k_BT with its standard error (:func:`free_energy_difference`) for the data, the model
      samples, and the model samples reweighted to the target;
    - other particle systems: the mean over samples of the smallest inter-particle distance,
      for data and model (a model that lets particles overlap shows it here first);
    - anything else: nothing.
    """
    x_data, x_model = np.asarray(arrays["x_target"]), np.asarray(arrays["x_model"])
    finite = np.all(np.isfinite(x_model), axis=1)
    x_model = x_model[finite]
    if isinstance(system, (AlanineDipeptideClassical, AlanineDipeptideXTB)):
        phi_data, phi_model = phi_angles(x_data), phi_angles(x_model)
        numbers = {"phi_positive_fraction_data": float(np.mean(phi_data > 0))}
        for name, phi, log_w in (("data", phi_data, None), ("model", phi_model, None),
                                 ("reweighted", phi_model, np.asarray(arrays["log_w_model"])[finite])):  # fmt: skip
            numbers[f"delta_f_phi_{name}"], numbers[f"delta_f_phi_{name}_se"] = free_energy_difference(phi > 0, log_w)
        return numbers
    if isinstance(system, AbstractParticleSystem):
        shape = (system.n_particles, system.spatial_dim)
        return {
            "min_pair_distance_data": float(pair_distances(x_data, *shape).min(axis=1).mean()),
            "min_pair_distance_model": float(pair_distances(x_model, *shape).min(axis=1).mean()) if len(x_model) else math.nan,
        }
    return {}


def energies_chunked(system, x: np.ndarray, chunk_size: int = 4096) -> np.ndarray:
    """u(x) for many flat samples, jit-compiled in chunks; non-finite energies stay non-finite."""
    energy = _batched_energy(system)
    out = []
    for i in range(0, x.shape[0], chunk_size):
        part = x[i : i + chunk_size]
        pad = chunk_size - part.shape[0] if x.shape[0] > chunk_size else 0
        if pad:
            part = np.concatenate([part, np.repeat(part[:1], pad, axis=0)])
        out.append(np.asarray(energy(jnp.asarray(part)))[: part.shape[0] - pad])
    return np.concatenate(out).astype(np.float64)


@eqx.filter_jit
def _fm_loss_batch(flow, loss, x, key):
    return loss(flow, Batch(x=x), key)[0]


def fm_loss_on(flow, split_positions: np.ndarray, loss, key, batch_size: int = 256) -> float:
    """Mean flow-matching loss over a data split (fixed key), for tracking PG's effect on FM."""
    n = split_positions.shape[0]
    batch_size = min(batch_size, n)
    n_batches = n // batch_size
    keys = jax.random.split(key, n_batches)
    values = [
        float(_fm_loss_batch(flow, loss, jnp.asarray(split_positions[i * batch_size : (i + 1) * batch_size]), keys[i]))
        for i in range(n_batches)
    ]
    return float(np.mean(values))


def _key_list(key) -> list:
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return np.asarray(key).tolist()


def evaluate_flow(
    flow,
    system,
    dataset,
    *,
    key,
    n_samples: int = 2048,
    n_target: int | None = None,
    split: str = "test",
    chunk_size: int = 1024,
    fm_loss=None,
    progress: bool = False,
    label: str = "flow",
    resume_dir=None,
    check_top: int = 8,
) -> tuple[dict, dict]:
    """All metrics of ``flow`` against ``system`` with target samples from ``dataset``.

    Returns (metrics, arrays): flat metric keys ``nll, ess_q, ess_p, kl (where exact),
    path_length, fm_loss`` plus sample counts; arrays hold the model samples, their log
    densities/weights and the target log densities, for plots. A few samples of every
    chunk are solved again one at a time, and a disagreement with the batched solve raises
    :class:`zoo.flows.cnf.BatchedSolveError` naming ``label`` instead of reporting metrics.

    With ``resume_dir`` every finished chunk of samples and log densities is kept there
    (:class:`zoo.storage.ChunkStore`), and a repeated call with the same flow and settings
    continues from them: a 10 000-sample evaluation killed midway loses one chunk at most.

    With the exact divergence, the log q of the ``check_top`` highest-weight model and target
    samples, and of as many others at random, is solved again with :data:`REFERENCE_SOLVE`
    (:func:`check_top_weights`; 0: no check): ``top_log_q_error_q``/``_p`` are the top weights'
    largest differences, ``log_q_offset_q``/``_p`` the typical sample's (which biases the NLL),
    ``top_log_q_excess_q``/``_p`` the top weights' beyond it (which changes the ESS).
    """

    sample_key, density_key, fm_key = jax.random.split(key, 3)
    target = dataset.split(split).positions
    if n_target is not None:
        target = target[:n_target]

    sample_store = density_store = None
    if resume_dir is not None:
        common = {"flow": fingerprint(flow), "chunk_size": chunk_size, "jax": jax.__version__}
        sample_store = ChunkStore(
            resume_dir, {"what": "samples", **common, "key": _key_list(sample_key), "n": n_samples}
        )
        # The exact divergence draws no noise: its log densities of the same target samples are
        # the same under every evaluation seed, and are kept as such (no key in the fingerprint).
        density_store = ChunkStore(
            resume_dir,
            {"what": "log densities", **common, "key": _key_list(density_key) if flow.needs_key else None,
             "x_sha256": array_sha256(np.asarray(target))},
        )  # fmt: skip

    model = sample_and_log_prob_chunked(
        flow, sample_key, n_samples, chunk_size=chunk_size, progress=progress, label=label, store=sample_store
    )
    x_unfolded, log_q_unfolded = model["x"], model["log_q"]
    model["x"], model["log_q"] = system.fold(flow, model["x"], model["log_q"])
    u_model = energies_chunked(system, model["x"])
    log_w_q = -u_model - model["log_q"]
    model_ess, model_ess_se = ess_q(log_w_q), ess_q_se(log_w_q)
    if progress:
        # The model side is complete here, and the target side can take as long again (the
        # exact divergence on CPU: hours): its ESS need not wait for it.
        print(
            f"model samples: ESS-q {model_ess:.4g} ± {model_ess_se:.2g} from {n_samples}; "
            f"log densities of {target.shape[0]} target samples next",
            flush=True,
        )

    density = log_prob_chunked(
        flow, target, key=density_key, chunk_size=chunk_size, progress=progress, label=label, store=density_store
    )
    target_log_q_unfolded = density["log_q"]
    _, density["log_q"] = system.fold(flow, target, density["log_q"])
    u_target = energies_chunked(system, target)
    log_w_p = -u_target - density["log_q"]
    checks = {}
    if check_top > 0 and not flow.needs_key:
        # Compared before the fold: the reference solves the points the flow produced and was given.
        for side, check in (
            ("q", check_top_weights(flow, x_unfolded, log_q_unfolded, log_w_q, check_top)),
            ("p", check_top_weights(flow, target, target_log_q_unfolded, log_w_p, check_top)),
        ):
            checks |= {f"top_log_q_error_{side}": check.top_error, f"log_q_offset_{side}": check.offset,
                       f"top_log_q_excess_{side}": check.top_excess}  # fmt: skip
        checks["n_top_checked"] = int(check_top)

    metrics = {
        "nll": nll(density["log_q"]),
        "ess_q": model_ess,
        "ess_p": ess_p(log_w_p),
        # Delta-method standard errors over the samples (metrics.*_se).
        "nll_se": nll_se(density["log_q"]),
        "ess_q_se": model_ess_se,
        "ess_p_se": ess_p_se(log_w_p),
        # The largest single weight's share of all weight: near 1/n for a good sampler, near 1
        # when one sample decides the ESS (on the target side: a state the model all but misses).
        "top_weight_share_q": top_weight_share(log_w_q),
        "top_weight_share_p": top_weight_share(log_w_p),
        # How far the largest weights' log q moves under a tight adaptive solver, how far a
        # typical sample's does, and the difference of the two (nats; TopWeightCheck).
        **checks,
        "path_length": float(np.mean(model["path_length"][np.isfinite(model["path_length"])])),
        "fm_loss": fm_loss_on(flow, dataset.split(split).positions, fm_loss or FlowMatching(), fm_key),
        "n_samples_q": int(n_samples),
        "n_samples_p": int(target.shape[0]),
        # Model samples with no usable weight: failed energy (u = +inf), NaN or infinite log q.
        "n_nonfinite_q": int((~np.isfinite(log_w_q)).sum()),
        # Target samples with no usable weight: failed target energy, NaN or infinite log q.
        "n_nonfinite_p": int((~np.isfinite(log_w_p)).sum()),
        # Model samples the target's fold moved (AD2: mirror images inverted onto L).
        "n_folded_q": int(np.any(model["x"] != x_unfolded, axis=-1).sum()),
        # How the log densities were computed: the numbers depend on it (Hutchinson adds
        # variance to log w, which lowers the ESS), so it travels with them.
        # An adaptive solver's steps are its own: its tolerances say how it solved.
        **flow.describe(),
    }
    if system.log_z is not None:
        metrics["kl"] = kl_exact(-u_target - system.log_z, density["log_q"])
    arrays = {
        "x_model": model["x"],
        "log_q_model": model["log_q"],
        "log_w_model": log_w_q,
        "u_model": u_model,
        "x_target": target,
        "log_q_target": density["log_q"],
        "u_target": u_target,
        "log_w_target": log_w_p,
    }
    return metrics, arrays


# ---------------------------------------------------------------------- printing
def with_error(metrics: dict, key: str, fmt: str = ".4g") -> str:
    """``metrics[key]`` formatted, followed by ``± metrics[key + '_se']`` where there is one; '-' if absent.

    A nonzero value that ``fmt`` would print as zero (an ESS-p of 2e-8 at ``.3f``) is printed
    with two significant digits instead: "0.000" would read as an exact zero.
    """
    if key not in metrics:
        return "-"
    value, se = metrics[key], metrics.get(f"{key}_se")
    text = format(value, fmt)
    if value != 0 and float(text) == 0:
        text = format(value, ".2g")
    return text + (f" ± {se:.2g}" if se is not None else "")


def ess_is_a_lower_bound(description: dict) -> bool:
    """Whether ESS values computed as ``description`` says (a :meth:`~zoo.flows.CNF.describe`
    record, e.g. metrics or a model's evaluation table) are only lower bounds: Hutchinson's
    estimate of log q puts its noise into every log weight, which lowers the ESS."""
    return str(description.get("divergence", "")).startswith("hutchinson")


def _finer_solver_binding(metrics: dict) -> str:
    """The evaluation binding that makes the solve of ``metrics`` finer, in words."""
    steps = metrics.get("n_solver_steps")
    if steps:
        return f"twice the solver steps (evaluation.n_solver_steps = {2 * int(steps)})"
    return "tighter tolerances (evaluation.solver_rtol, evaluation.solver_atol)"


def format_metrics(metrics: dict) -> str:
    """The headline metrics on one line, with their standard errors and sample counts, and a
    warning line when the highest weights' log q depends on the solver (the ESS does) or a typical
    target sample's does (the NLL does), or when the ESS comes
    from Hutchinson's estimate of log q (its noise enters every log weight and lowers the ESS;
    the NLL stays unbiased)."""
    keys = [k for k in ("kl", "nll", "ess_q", "ess_p", "path_length", "fm_loss") if k in metrics]
    failed = [f"{k}={metrics[k]}" for k in ("n_nonfinite_q", "n_nonfinite_p") if metrics.get(k)]
    counts = f"n_q={metrics.get('n_samples_q')}, n_p={metrics.get('n_samples_p')}" + "".join(f", {f}" for f in failed)
    line = "  ".join(f"{k}={with_error(metrics, k)}" for k in keys) + f"  ({counts})"
    # Evaluations before the typical sample was checked too report the top weights' error alone.
    relative = "top_log_q_excess_q" in metrics
    errors = [metrics.get(f"top_log_q_{'excess' if relative else 'error'}_{side}", 0.0) for side in "qp"]
    beyond = " more than a typical sample's" if relative else ""
    if any(e > TOP_LOG_Q_TOLERANCE for e in errors):  # NaN (no finite weight) compares False
        line += (
            f"\n  warning: the {metrics.get('n_top_checked')} highest-weight samples' log q moves by up to "
            f"{errors[0]:.2g} (model) / {errors[1]:.2g} (target) nats{beyond} "
            f"under {REFERENCE_IN_WORDS}: these ESS values depend on the solver; evaluate again with {_finer_solver_binding(metrics)}"
        )
    offset = metrics.get("log_q_offset_p", 0.0)
    if abs(offset) > TOP_LOG_Q_TOLERANCE:  # NaN compares False
        line += (
            f"\n  warning: a typical target sample's log q lies {offset:+.2g} nats from {REFERENCE_IN_WORDS}'s: "
            f"the NLL is off by {-offset:+.2g}; evaluate again with {_finer_solver_binding(metrics)}"
        )
    if ess_is_a_lower_bound(metrics) and any(k in metrics for k in ("ess_q", "ess_p")):
        line += (
            f"\n  note: log q from Hutchinson's estimate ({metrics['divergence']}): its noise lowers the ESS, which is a "
            "lower bound, far below the exact one for particle systems (tools/check-solver --divergence measures how far); "
            "the NLL is unbiased. evaluation.divergence = 'exact' gives the ESS"
        )
    return line

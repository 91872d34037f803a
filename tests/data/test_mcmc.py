"""MCMC sampler: estimators (τ, R̂) on processes with known answers, kernels against exact
expectations, the mean-free projection against the virial identity, and resumability."""

from __future__ import annotations

import math
import shutil

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.data.mcmc import SamplerSettings, autocorrelation, block_mean_and_error, gelman_rubin, integrated_autocorr_time, run_chains
from zoo.systems import DoubleWell, GaussianMixture2D, LennardJones
from zoo.systems.base import AbstractTarget


class Gaussian(AbstractTarget):
    """Standard normal in n_dim dimensions: u = ‖x‖²/2, so ⟨u⟩ = var(u) = n_dim/2 exactly."""

    n_dim: int = eqx.field(static=True)

    @property
    def event_shape(self):
        return (self.n_dim,)

    def energy(self, x):
        x = self.flat(x)
        return 0.5 * jnp.sum(x**2)


def ar1(phi: float, n_chains: int, n: int, seed: int = 0) -> np.ndarray:
    """Stationary AR(1) chains x_t = φ x_{t−1} + √(1−φ²) ε_t, shape (n_chains, n)."""
    rng = np.random.default_rng(seed)
    eps = rng.standard_normal((n_chains, n)) * math.sqrt(1 - phi**2)
    x = np.empty((n_chains, n))
    x[:, 0] = rng.standard_normal(n_chains)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + eps[:, t]
    return x


# ---------------------------------------------------------------------------- estimators
@pytest.mark.parametrize("phi", [0.0, 0.5, 0.9])
def test_tau_of_ar1_process(phi):
    exact = (1 + phi) / (1 - phi)
    x = ar1(phi, n_chains=16, n=20_000, seed=1)
    tau, window = integrated_autocorr_time(x)
    assert tau == pytest.approx(exact, rel=0.08)
    assert window >= 5 * tau - 1
    # One long chain gives the same answer.
    tau1, _ = integrated_autocorr_time(x[0])
    assert tau1 == pytest.approx(exact, rel=0.25)


def test_autocorrelation_of_ar1_is_geometric():
    x = ar1(0.7, n_chains=32, n=10_000, seed=2)
    rho = autocorrelation(x)
    np.testing.assert_allclose(rho[:6], 0.7 ** np.arange(6), atol=0.02)


def test_block_error_of_an_ar1_mean_matches_the_exact_variance():
    """For stationary AR(1) with unit variance, var(mean of n) → (1+φ)/((1−φ) n): the block
    errors of 200 independent series match it, and so does the spread of their means (the
    naive sd/√n would be (1+φ)/(1−φ) = 19 times too small in variance)."""
    phi, n = 0.9, 20_000
    x = ar1(phi, n_chains=200, n=n, seed=3)
    exact_se = math.sqrt((1 + phi) / (1 - phi) / n)
    results = np.array([block_mean_and_error(series, n_blocks=20) for series in x])
    assert np.sqrt(np.mean(results[:, 1] ** 2)) == pytest.approx(exact_se, rel=0.1)
    assert np.std(results[:, 0], ddof=1) == pytest.approx(exact_se, rel=0.15)
    np.testing.assert_allclose(results[:, 0], x.mean(axis=1))


def test_block_error_over_independent_runs_matches_the_exact_variance():
    """Four independent AR(1) runs of n/4 each, blocked within each run: the error of their
    grand mean is that of one series of n, and no block straddles two runs (a run with a
    constant offset against the others widens the error as the spread of four runs does)."""
    phi, n_runs, n = 0.9, 4, 20_000
    x = ar1(phi, n_chains=200 * n_runs, n=n // n_runs, seed=4).reshape(200, n_runs, n // n_runs)
    exact_se = math.sqrt((1 + phi) / (1 - phi) / n)
    results = np.array([block_mean_and_error(runs, n_blocks=5) for runs in x])
    assert np.sqrt(np.mean(results[:, 1] ** 2)) == pytest.approx(exact_se, rel=0.12)
    np.testing.assert_allclose(results[:, 0], x.reshape(200, -1).mean(axis=1))
    offset = np.array([0.0, 0.0, 0.0, 1.0])[:, None]
    _, se = block_mean_and_error(np.zeros((n_runs, 100)) + offset, n_blocks=5)
    assert se == pytest.approx(np.repeat([0.0, 0.0, 0.0, 1.0], 5).std(ddof=1) / math.sqrt(20))


def test_gelman_rubin_detects_disagreeing_chains():
    rng = np.random.default_rng(0)
    iid = rng.standard_normal((8, 2000))
    assert gelman_rubin(iid) == pytest.approx(1.0, abs=0.01)
    shifted = iid + np.arange(8)[:, None] * 0.5
    assert gelman_rubin(shifted) > 1.2
    # A chain that drifts within itself is caught by the splitting.
    drift = iid + np.linspace(0, 3, 2000)[None]
    assert gelman_rubin(drift) > 1.1


def test_estimators_reject_bad_input():
    with pytest.raises(ValueError, match="length"):
        integrated_autocorr_time(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="chains"):
        gelman_rubin(np.zeros(10))
    with pytest.raises(ValueError, match="n_blocks"):
        block_mean_and_error(np.zeros(10), n_blocks=1)
    with pytest.raises(ValueError, match="one series"):
        block_mean_and_error(np.zeros((2, 2, 10)))
    with pytest.raises(ValueError, match="n_blocks"):
        block_mean_and_error(np.zeros((2, 10)), n_blocks=11)


def test_settings_validation():
    with pytest.raises(ValueError, match="kernel"):
        SamplerSettings(kernel="nuts")
    with pytest.raises(ValueError, match="target_accept"):
        SamplerSettings(target_accept=1.5)
    assert SamplerSettings(thin=300, chunk_steps=1000).chunk == 1200


# ---------------------------------------------------------------------------- kernels
# Compiling a chunk takes seconds on a busy CPU, so the default run keeps one case of each
# kind and the other parameters are marked slow.
@pytest.mark.parametrize("sigma", [2.0, pytest.param(1.0, marks=pytest.mark.slow), pytest.param(4.0, marks=pytest.mark.slow)])
def test_rwm_acceptance_matches_closed_form(tmp_path, sigma):
    """For N(0,1) and proposal N(x, σ²) the mean acceptance is (2/π)·arctan(2/σ)."""
    settings = SamplerSettings(kernel="rwm", n_chains=512, burn_in=0, thin=1, step_size=sigma, adapt=False, chunk_steps=200)
    r = run_chains(Gaussian(1), tmp_path, settings=settings, n_per_chain=200, seed=3, progress=False)
    expected = 2 / math.pi * math.atan(2 / sigma)
    assert r.acceptance.mean() == pytest.approx(expected, abs=0.01)
    np.testing.assert_allclose(r.step_size, sigma)


def _mean_and_se(values: np.ndarray) -> tuple[float, float]:
    """Mean of (chains, n) values and its standard error from the spread of chain means."""
    means = values.mean(axis=1)
    return float(means.mean()), float(means.std(ddof=1) / math.sqrt(len(means)))


@pytest.mark.parametrize("kernel", ["mala", pytest.param("rwm", marks=pytest.mark.slow), pytest.param("hmc", marks=pytest.mark.slow)])
def test_gaussian_mean_energy_is_half_dim(tmp_path, kernel):
    d = 6
    # Dual averaging needs ~1000 steps to settle (HMC's acceptance is 0.87 after 400).
    settings = SamplerSettings(kernel=kernel, n_chains=128, burn_in=1000, thin=4, step_size=0.5, hmc_steps=5, chunk_steps=500, init_scale=0.5)
    r = run_chains(Gaussian(d), tmp_path, settings=settings, n_per_chain=125, seed=4, progress=False)
    # HMC's acceptance is not monotonic in the step size on a Gaussian (near-periodic orbits),
    # so its adaptation lands less precisely.
    assert r.acceptance.mean() == pytest.approx(settings.accept_target, abs=0.12 if kernel == "hmc" else 0.04)
    mean, se = _mean_and_se(r.energies)
    assert abs(mean - d / 2) < 4 * se + 1e-3, (mean, se)
    assert r.energies.var() == pytest.approx(d / 2, rel=0.1)


@pytest.mark.slow
def test_mala_energy_on_gmm_matches_exact_reference(tmp_path):
    gmm = GaussianMixture2D()
    ref = np.asarray(jax.vmap(gmm.energy)(gmm.sample(jax.random.PRNGKey(0), 400_000)))
    ref_mean, ref_se = ref.mean(), ref.std() / math.sqrt(len(ref))
    settings = SamplerSettings(kernel="mala", n_chains=256, burn_in=300, thin=5, step_size=0.3, chunk_steps=1000, init_scale=1.5)
    r = run_chains(gmm, tmp_path, settings=settings, n_per_chain=100, seed=5, progress=False)
    mean, se = _mean_and_se(r.energies)
    assert abs(mean - ref_mean) < 4 * math.hypot(se, ref_se), (mean, se, ref_mean)
    # Chains stay in the modes they fell into, but all four are populated by the start.
    x = r.samples.reshape(-1, 2)
    quadrant = (x[:, 0] > 0).astype(int) * 2 + (x[:, 1] > 0)
    assert np.bincount(quadrant, minlength=4).min() > 0.1 * len(x)


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["mala", "hmc"])
def test_particle_chains_stay_mean_free_and_satisfy_virial(tmp_path, kernel):
    """⟨x·∇u⟩ = (N−1)d = 6 for DW4: checks the Metropolis ratio of the projected moves."""
    dw = DoubleWell()
    settings = SamplerSettings(kernel=kernel, hmc_steps=5, n_chains=512, burn_in=1000, thin=25, step_size=0.2, chunk_steps=1000, init_spacing=4.0)
    r = run_chains(dw, tmp_path, settings=settings, n_per_chain=40, seed=6, progress=False)
    x = r.samples.reshape(-1, 4, 2)
    assert np.abs(x.mean(axis=1)).max() < 1e-4
    grad = -np.asarray(jax.vmap(dw.force)(jnp.asarray(r.samples.reshape(-1, 8))))
    virial = np.sum(r.samples.reshape(-1, 8) * grad, axis=1).reshape(r.energies.shape)
    mean, se = _mean_and_se(virial)
    assert abs(mean - 6.0) < 4 * se and se < 0.3, (mean, se)


@pytest.mark.slow
def test_lj_initial_state_is_finite_and_sampling_works(tmp_path):
    lj = LennardJones(n_particles=6, spatial_dim=3)
    settings = SamplerSettings(kernel="mala", n_chains=32, burn_in=200, thin=10, step_size=0.02, chunk_steps=200)
    r = run_chains(lj, tmp_path, settings=settings, n_per_chain=10, seed=7, progress=False)
    assert np.isfinite(r.energies).all()
    assert np.isfinite(r.trace).all()
    assert 0.3 < r.acceptance.mean() < 0.7


# ---------------------------------------------------------------------------- resumability
RESUME_SETTINGS = SamplerSettings(kernel="mala", n_chains=16, burn_in=200, thin=10, step_size=0.2, chunk_steps=100, init_spacing=4.0)


def test_resume_after_kill_gives_identical_samples(tmp_path):
    dw = DoubleWell()
    kwargs = dict(settings=RESUME_SETTINGS, n_per_chain=30, seed=8, progress=False)
    straight = run_chains(dw, tmp_path / "a", **kwargs)
    assert straight.complete
    # "Kill" after one chunk (mid burn-in), then after two more (into sampling; the
    # adaptation restarts at steps 25, 50, 100 fall into the first two chunks).
    partial = run_chains(dw, tmp_path / "b", max_chunks=1, **kwargs)
    assert not partial.complete and partial.steps_done == 100
    partial = run_chains(dw, tmp_path / "b", max_chunks=2, **kwargs)
    assert not partial.complete and partial.samples.shape[1] == 10
    resumed = run_chains(dw, tmp_path / "b", **kwargs)
    assert resumed.complete
    np.testing.assert_array_equal(resumed.samples, straight.samples)
    np.testing.assert_array_equal(resumed.energies, straight.energies)
    np.testing.assert_array_equal(resumed.step_size, straight.step_size)
    np.testing.assert_array_equal(resumed.acceptance, straight.acceptance)
    np.testing.assert_array_equal(resumed.trace, straight.trace)
    # A finished run resumes to the same result without sampling again.
    again = run_chains(dw, tmp_path / "b", **kwargs)
    np.testing.assert_array_equal(again.samples, straight.samples)


def test_a_run_kept_in_the_old_single_state_file_is_continued(tmp_path):
    """Runs an earlier zoo kept in one ``mcmc_state.npz`` (chains so far + the state they ended in)
    are adopted as the first chunk and continue to the samples of an uninterrupted run."""
    import json

    from zoo.data.mcmc import CHUNK_DIR, LEGACY_STATE_FILE
    from zoo.storage import ChunkLog

    dw = DoubleWell()
    kwargs = dict(settings=RESUME_SETTINGS, n_per_chain=30, seed=8, progress=False)
    straight = run_chains(dw, tmp_path / "a", **kwargs)
    run_chains(dw, tmp_path / "b", max_chunks=3, **kwargs)  # into the sampling phase
    log = ChunkLog.existing(tmp_path / "b" / CHUNK_DIR)
    parts = [log.load(i) for i in range(log.n_chunks)]
    old = {name: value for name, value in parts[-1].items() if name not in ("samples", "energies", "trace")}
    old.update(
        samples=np.concatenate([p["samples"] for p in parts], axis=1),
        energies=np.concatenate([p["energies"] for p in parts], axis=1),
        trace=np.concatenate([p["trace"] for p in parts]),
        fingerprint=np.array(json.dumps(log.manifest["params"], sort_keys=True)),
        version=np.array(2),
        fresh=np.array(False),
        seconds=np.array(log.seconds),
    )
    assert old["samples"].shape[1] > 0
    np.savez(tmp_path / "b" / LEGACY_STATE_FILE, **old)
    shutil.rmtree(tmp_path / "b" / CHUNK_DIR)
    resumed = run_chains(dw, tmp_path / "b", **kwargs)
    np.testing.assert_array_equal(resumed.samples, straight.samples)
    np.testing.assert_array_equal(resumed.trace, straight.trace)
    np.testing.assert_array_equal(resumed.acceptance, straight.acceptance)
    assert (tmp_path / "b" / (LEGACY_STATE_FILE + ".adopted")).exists()  # kept, not deleted
    assert not (tmp_path / "b" / LEGACY_STATE_FILE).exists()


def test_an_old_state_file_of_other_settings_is_refused_or_set_aside(tmp_path):
    """An old single-file state of other settings is refused by a resuming call and set aside
    (kept as ``.superseded``, never adopted later) by one that starts over."""
    import json

    from zoo.data.mcmc import LEGACY_STATE_FILE
    from zoo.storage import RunStateError

    dw = DoubleWell()
    kwargs = dict(settings=RESUME_SETTINGS, n_per_chain=10, progress=False)
    legacy = tmp_path / LEGACY_STATE_FILE
    np.savez(legacy, fingerprint=np.array(json.dumps({"seed": "some other run"})), fresh=np.array(False))
    with pytest.raises(RunStateError, match="other settings"):
        run_chains(dw, tmp_path, seed=0, max_chunks=1, **kwargs)
    assert legacy.exists()
    run_chains(dw, tmp_path, seed=0, resume=False, max_chunks=1, **kwargs)
    assert not legacy.exists() and (tmp_path / (LEGACY_STATE_FILE + ".superseded")).exists()
    assert run_chains(dw, tmp_path, seed=0, **kwargs).complete  # continues its own chunks


def test_resume_with_other_settings_is_refused(tmp_path):
    dw = DoubleWell()
    kwargs = dict(settings=RESUME_SETTINGS, n_per_chain=10, progress=False)  # compiled above
    run_chains(dw, tmp_path, seed=0, max_chunks=1, **kwargs)
    with pytest.raises(ValueError, match="other settings"):
        run_chains(dw, tmp_path, seed=1, **kwargs)
    fresh = run_chains(dw, tmp_path, seed=1, resume=False, **kwargs)
    assert fresh.complete


# ---------------------------------------------------------------------------- long runs
@pytest.mark.slow
def test_lj13_statistics_and_virial_within_one_percent(tmp_path):
    """LJ13 by HMC, 3·10⁵ samples (≈ 5 min): ⟨u⟩ ≈ −42.94, std ≈ 6.95, virial 36 within 1 %.

    x·∇u has a std of ≈ 59, so the 1 % claim needs this many samples (se ≈ 0.3 %); the
    energies were measured with two kernels (HMC −42.94 ± 0.02, MALA in the report).
    """
    lj = LennardJones()
    settings = SamplerSettings(kernel="hmc", hmc_steps=10, n_chains=500, burn_in=3000, thin=10, step_size=0.02, target_accept=0.65, chunk_steps=1000)
    r = run_chains(lj, tmp_path, settings=settings, n_per_chain=600, seed=99, progress=False)
    x = r.samples.reshape(-1, lj.dim)
    force = jax.jit(jax.vmap(lj.force))
    f = np.concatenate([np.asarray(force(x[i : i + 10_000])) for i in range(0, len(x), 10_000)])
    virial = -np.sum(x.astype(np.float64) * f, axis=1).reshape(r.energies.shape)
    v_mean, v_se = _mean_and_se(virial)
    assert abs(v_mean / 36.0 - 1.0) < 0.01 and v_se / 36.0 < 0.005, (v_mean, v_se)
    u_mean, u_se = _mean_and_se(r.energies)
    assert u_mean == pytest.approx(-42.94, abs=max(0.1, 4 * u_se))
    assert r.energies.std() == pytest.approx(6.95, abs=0.1)
    assert gelman_rubin(r.energies) < 1.01

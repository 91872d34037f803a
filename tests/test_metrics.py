"""ESS, NLL and KL estimators against analytic Gaussian cases."""

import json
import math
import warnings

import equinox as eqx
import numpy as np
import pytest
import scipy.stats

from zoo.metrics import ess_p, ess_q, kl_exact, nll


def test_equal_densities_give_unit_ess():
    log_w = np.full(1000, -3.7)
    assert ess_q(log_w) == pytest.approx(1.0)
    assert ess_p(log_w) == pytest.approx(1.0)


def test_log_space_is_overflow_safe():
    log_w = np.array([1000.0, 1000.0, 1000.0 - math.log(4)])
    w = np.array([1.0, 1.0, 0.25])
    assert ess_q(log_w) == pytest.approx(w.sum() ** 2 / (3 * (w**2).sum()))
    assert ess_p(log_w) == pytest.approx(9 / (w.sum() * (1 / w).sum()))


@pytest.mark.parametrize("shift", [0.5, 1.0])
def test_mean_shifted_gaussians_match_analytic_ess(shift):
    # p = N(0, 1), q = N(μ, 1): w = p/q = exp(−μx + μ²/2); E_q[w²]/E_q[w]² = E_p[w] = exp(μ²),
    # E_p[1/w] = 1, so both ESS-q and ESS-p tend to exp(−μ²).
    rng = np.random.default_rng(0)
    n = 200_000
    p, q = scipy.stats.norm(0, 1), scipy.stats.norm(shift, 1)
    xq = q.rvs(n, random_state=rng)
    xp = p.rvs(n, random_state=rng)
    expected = math.exp(-(shift**2))
    got_q = ess_q(p.logpdf(xq) - q.logpdf(xq))
    got_p = ess_p(p.logpdf(xp) - q.logpdf(xp))
    # Relative MC error of these ratio estimators is a few 1e-3 at this n.
    assert got_q == pytest.approx(expected, rel=0.03)
    assert got_p == pytest.approx(expected, rel=0.03)


def test_wider_model_matches_analytic_ess():
    # p = N(0, 1), q = N(0, s²): ESS → sqrt(2s² − 1) / s² for both estimators.
    s = 1.3
    rng = np.random.default_rng(1)
    n = 200_000
    p, q = scipy.stats.norm(0, 1), scipy.stats.norm(0, s)
    expected = math.sqrt(2 * s**2 - 1) / s**2
    xq, xp = q.rvs(n, random_state=rng), p.rvs(n, random_state=rng)
    assert ess_q(p.logpdf(xq) - q.logpdf(xq)) == pytest.approx(expected, rel=0.02)
    assert ess_p(p.logpdf(xp) - q.logpdf(xp)) == pytest.approx(expected, rel=0.02)


def test_nonfinite_weights():
    # An exploded model sample (NaN or −inf log weight) carries no weight in ESS-q ...
    assert ess_q(np.array([0.0, 0.0, np.nan, -np.inf])) == pytest.approx(0.5)
    # ... while a target sample the model cannot reach (log w = +inf) sends ESS-p to zero.
    assert ess_p(np.array([0.0, 0.0, np.inf])) == 0.0
    with pytest.raises(ValueError):
        ess_q(np.array([]))


def test_nll_and_kl_against_scipy():
    rng = np.random.default_rng(2)
    p, q = scipy.stats.norm(0, 1), scipy.stats.norm(0.3, 1.2)
    x = p.rvs(100_000, random_state=rng)
    assert nll(q.logpdf(x)) == pytest.approx(-q.logpdf(x).mean())
    # Analytic KL(N(0,1) ‖ N(μ, s²)) = log s + (1 + μ²)/(2 s²) − 1/2.
    analytic = math.log(1.2) + (1 + 0.09) / (2 * 1.44) - 0.5
    assert kl_exact(p.logpdf(x), q.logpdf(x)) == pytest.approx(analytic, abs=5e-3)


def test_evaluate_flow_counts_failed_energies():
    """A target whose energy engine fails (u = +inf) on part of space: counted, weight zero, no crash."""
    import jax
    import jax.numpy as jnp

    from zoo.data import exact_samples
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.metrics import evaluate_flow
    from zoo.systems import GaussianMixture2D

    class HalfBroken(GaussianMixture2D):
        def energy(self, x):
            return jnp.where(self.flat(x)[0] > 0, jnp.inf, super().energy(x))

    system = HalfBroken()
    data = exact_samples(GaussianMixture2D(), n_train=64, n_val=64, n_test=64)
    flow = CNF(MLPField(2, width=8, depth=1, key=jax.random.PRNGKey(0)), StandardNormal(2), n_steps=2)
    metrics, arrays = evaluate_flow(flow, system, data, key=jax.random.PRNGKey(1), n_samples=256, n_target=64)
    broken = int((arrays["x_model"][:, 0] > 0).sum())
    assert 0 < broken < 256
    assert metrics["n_nonfinite_q"] == broken
    assert 0 < metrics["ess_q"] <= 1 - broken / 256 + 1e-9
    # Failed target energies count too (their weight is unusable), and the summary says so.
    assert metrics["n_nonfinite_p"] == int((arrays["x_target"][:, 0] > 0).sum()) > 0
    from zoo.metrics import format_metrics

    assert f"n_nonfinite_q={broken}" in format_metrics(metrics)


def test_top_weight_share_against_direct_sums():
    """The k largest weights' share of Σw, with the weights written out; bounds and edge cases."""
    from zoo.metrics import top_weight_share

    rng = np.random.default_rng(3)
    log_w = rng.normal(0.0, 2.0, size=500) + 700.0  # exp overflows float64 without log space
    w = np.exp(log_w - 700.0)
    for k in (1, 5, 500):
        assert top_weight_share(log_w, k) == pytest.approx(np.sort(w)[-k:].sum() / w.sum(), rel=1e-12)
    assert top_weight_share(np.zeros(8)) == pytest.approx(1 / 8)
    # A model sample without a usable weight counts as weight 0; a target sample the model
    # gives zero density (log w = +inf) carries all the weight; nothing usable: share 0.
    assert top_weight_share(np.array([0.0, 0.0, np.nan, -np.inf])) == pytest.approx(0.5)
    assert top_weight_share(np.array([0.0, np.inf, 1.0])) == 1.0
    assert top_weight_share(np.array([np.nan, -np.inf])) == 0.0
    with pytest.raises(ValueError, match="k="):
        top_weight_share(np.zeros(3), k=4)


def test_evaluation_reports_and_plots_where_the_weights_sit(tmp_path):
    """evaluation() records the top weight shares, equal to the shares of its own log weights, and draws log_weights.png."""
    import jax

    from zoo.data import exact_samples
    from zoo.experiments.runs import evaluation
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.metrics import evaluate_flow, top_weight_share
    from zoo.systems import GaussianMixture2D

    system = GaussianMixture2D()
    data = exact_samples(system, n_train=64, n_val=64, n_test=64)
    flow = CNF(MLPField(2, width=8, depth=1, key=jax.random.PRNGKey(0)), StandardNormal(2), n_steps=2)
    metrics = evaluation(flow, system, data, tmp_path, n_samples=128, n_target=64, progress=False)
    _, arrays = evaluate_flow(flow, system, data, key=jax.random.PRNGKey(1234), n_samples=128, n_target=64)
    assert metrics["top_weight_share_q"] == pytest.approx(top_weight_share(arrays["log_w_model"]), rel=1e-6)
    assert metrics["top_weight_share_p"] == pytest.approx(top_weight_share(arrays["log_w_target"]), rel=1e-6)
    assert 1 / 128 <= metrics["top_weight_share_q"] <= 1 and 1 / 64 <= metrics["top_weight_share_p"] <= 1
    assert (tmp_path / "log_weights.png").stat().st_size > 10_000


def test_metric_files_store_nonfinite_numbers_as_strict_json(tmp_path):
    import json

    from zoo.storage import read_json, write_json

    metrics = {"nll": float("inf"), "ess_q": 0.5, "kl": float("nan"), "n": 3, "name": "x"}
    write_json(tmp_path / "m.json", metrics)
    raw = json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-standard {c}"))
    assert raw["nll"] is None and raw["nonfinite"] == {"nll": "inf", "kl": "nan"}
    back = read_json(tmp_path / "m.json")
    assert back["nll"] == float("inf") and math.isnan(back["kl"]) and back["ess_q"] == 0.5 and "nonfinite" not in back
    (tmp_path / "old.json").write_text('{"nll": "inf", "ess_q": 0.1}')  # the encoding before
    assert read_json(tmp_path / "old.json")["nll"] == float("inf")


def test_density_hist_with_no_mass_in_range_draws_a_legend_entry_only():
    from zoo.plotting.plots import density_hist, subplots

    fig, ax = subplots(figsize=(4, 3))
    bins = np.linspace(0.0, 1.0, 11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division by an empty histogram's zero mass
        density_hist(ax, np.array([5.0, 6.0]), bins, label="outside")
        density_hist(ax, np.array([0.2, 0.5]), bins, weights=np.array([0.0, 0.0]), label="weightless")
        density_hist(ax, np.array([0.2, 0.5]), bins, label="inside")
    labels = [t.get_text() for t in ax.legend().get_texts()]
    assert labels == ["outside (none in range)", "weightless (none in range)", "inside"]
    assert len(ax.patches) == 10  # only the histogram inside the range drew bars


# ----------------------------------------------------------------------------- standard errors
def test_ess_and_nll_standard_errors_against_log_normal_weights():
    """Log-normal weights, log w ~ N(μ, σ²): both ESS estimators tend to exp(−σ²). The
    delta-method standard errors match the spread of the estimates over 400 replications,
    and the estimates lie within a few of them of the analytic value."""
    from zoo.metrics import ess_p, ess_p_se, ess_q, ess_q_se, nll, nll_se

    sigma, n, reps = 0.5, 2000, 400
    rng = np.random.default_rng(0)
    log_w = 3.0 + sigma * rng.normal(size=(reps, n))
    expected = np.exp(-(sigma**2))
    for estimate, se in ((ess_q, ess_q_se), (ess_p, ess_p_se)):
        values = np.array([estimate(lw) for lw in log_w])
        errors = np.array([se(lw) for lw in log_w])
        assert abs(values.mean() - expected) < 4 * values.std() / np.sqrt(reps)
        np.testing.assert_allclose(errors.mean(), values.std(ddof=1), rtol=0.15)
        assert abs(values[0] - expected) < 4 * errors[0]
    # The NLL's error is the standard error of a mean.
    values = np.array([nll(lw) for lw in log_w])
    np.testing.assert_allclose(np.mean([nll_se(lw) for lw in log_w]), values.std(ddof=1), rtol=0.1)
    np.testing.assert_allclose(nll_se(log_w[0]), sigma / np.sqrt(n), rtol=0.1)


def test_ess_standard_errors_of_degenerate_weights():
    from zoo.metrics import ess_p_se, ess_q_se

    assert ess_q_se(np.zeros(50)) < 1e-12  # equal weights: ESS is exactly 1
    assert ess_p_se(np.zeros(50)) < 1e-12
    assert ess_q_se(np.full(10, -np.inf)) == 0.0
    assert ess_p_se(np.array([0.0, np.inf])) == 0.0


def test_evaluation_reports_the_model_side_ess_before_the_target_side(capsys, monkeypatch):
    """With progress on, ESS-q is printed once the model samples have weights: before any target log density."""
    import jax

    from zoo import metrics as metrics_module
    from zoo.data import exact_samples
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.metrics import evaluate_flow
    from zoo.systems import GaussianMixture2D

    system = GaussianMixture2D()
    data = exact_samples(system, n_train=8, n_val=8, n_test=16)
    flow = CNF(MLPField(2, width=8, depth=1, key=jax.random.PRNGKey(0)), StandardNormal(2), n_steps=2)
    printed_before_target = []
    real = metrics_module.log_prob_chunked

    def target_side(*args, **kwargs):
        printed_before_target.append(capsys.readouterr().out)
        return real(*args, **kwargs)

    monkeypatch.setattr(metrics_module, "log_prob_chunked", target_side)
    metrics, _ = evaluate_flow(flow, system, data, key=jax.random.PRNGKey(1), n_samples=32, n_target=16, progress=True, check_top=0)
    line = [ln for ln in printed_before_target[0].splitlines() if ln.startswith("model samples:")]
    assert line == [f"model samples: ESS-q {metrics['ess_q']:.4g} ± {metrics['ess_q_se']:.2g} from 32; log densities of 16 target samples next"]


def test_an_interrupted_evaluation_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    """Killed after two chunks, run again: the finished chunks are read, the rest computed, the metrics unchanged."""
    import jax

    from zoo.data import exact_samples
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal, cnf
    from zoo.metrics import evaluate_flow
    from zoo.systems import GaussianMixture2D

    system = GaussianMixture2D()
    data = exact_samples(system, n_train=64, n_val=64, n_test=70)
    flow = CNF(MLPField(2, width=8, depth=1, key=jax.random.PRNGKey(0)), StandardNormal(2), n_steps=2)
    kwargs = dict(key=jax.random.PRNGKey(1), n_samples=64, n_target=70, chunk_size=16, check_top=0)  # counts the solves: no top-weight re-solve
    straight, _ = evaluate_flow(flow, system, data, **kwargs)

    real, solves = cnf._solve_chunk, []

    def counting(flow, method, *args, **kwargs):  # one call per chunk (however it is cut into pieces)
        solves.append(method)
        if limit is not None and len(solves) > limit:
            raise KeyboardInterrupt
        return real(flow, method, *args, **kwargs)

    monkeypatch.setattr(cnf, "_solve_chunk", counting)
    limit = 2
    with pytest.raises(KeyboardInterrupt):
        evaluate_flow(flow, system, data, resume_dir=tmp_path, **kwargs)
    limit, solves[:] = None, []
    resumed, _ = evaluate_flow(flow, system, data, resume_dir=tmp_path, **kwargs)
    assert solves.count("push_forward") == 2 and solves.count("log_prob_and_path_length_with_noise") == 5
    solves[:] = []
    again, _ = evaluate_flow(flow, system, data, resume_dir=tmp_path, **kwargs)
    assert solves == []
    for metrics in (resumed, again):
        for name in ("nll", "ess_q", "ess_p", "path_length", "nll_se"):
            assert metrics[name] == straight[name], name
    # Another model (or setting) never reads these chunks.
    other = CNF(MLPField(2, width=8, depth=1, key=jax.random.PRNGKey(5)), StandardNormal(2), n_steps=2)
    evaluate_flow(other, system, data, resume_dir=tmp_path, **kwargs)
    assert solves.count("push_forward") == 4
    # Another evaluation seed draws new model samples; the exact log densities of the same
    # target samples do not depend on it and are read back (Hutchinson's would not be).
    solves[:] = []
    reseeded, _ = evaluate_flow(flow, system, data, resume_dir=tmp_path, **{**kwargs, "key": jax.random.PRNGKey(2)})
    assert solves.count("push_forward") == 4 and solves.count("log_prob_and_path_length_with_noise") == 0
    assert reseeded["nll"] == straight["nll"] and reseeded["ess_q"] != straight["ess_q"]
    noisy = CNF(MLPField(2, width=8, depth=1, key=jax.random.PRNGKey(0)), StandardNormal(2), n_steps=2, divergence="hutchinson")
    for seed in (1, 2):
        evaluate_flow(noisy, system, data, resume_dir=tmp_path, **{**kwargs, "key": jax.random.PRNGKey(seed)})
    assert solves.count("log_prob_and_path_length_with_noise") == 10


@pytest.mark.slow  # it switches float64 on and off for the whole process; in the full suite a later compile then segfaulted
def test_solver_agreement_reports_differences_that_shrink_with_the_step():
    """The reference row differs from itself by nothing; RK4's error falls ~16× from 20 to 40 steps (4th order,
    for a smooth field: with ELU's kink in the derivative the order is lost)."""
    import jax

    from zoo.data import exact_samples
    from zoo.experiments.runs import solver_agreement
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.systems import GaussianMixture2D

    system = GaussianMixture2D()
    data = exact_samples(system, n_train=16, n_val=16, n_test=32)
    field = MLPField(2, width=16, depth=2, activation_name="tanh", key=jax.random.PRNGKey(3))
    flow = jax.tree.map(lambda a: 3.0 * a if eqx.is_inexact_array(a) and a.ndim == 2 else a, CNF(field, StandardNormal(2)))  # curved
    rows = solver_agreement(flow, system, data, n=32)
    assert [r["setting"] for r in rows] == [
        "exact divergence, Dopri5 rtol = atol = 1e-8", "exact divergence, RK4-20", "exact divergence, RK4-40"
    ]  # fmt: skip
    assert rows[0]["data_log_q_minus_reference_max_abs"] == 0 and rows[0]["model_log_w_minus_reference_max_abs"] == 0
    err20, err40 = rows[1]["data_log_q_minus_reference_max_abs"], rows[2]["data_log_q_minus_reference_max_abs"]
    assert err20 > 1e-6 and 4 < err20 / err40 < 64
    assert not jax.config.jax_enable_x64  # switched back after the call


def test_divergence_check_measures_hutchinson_noise_on_the_same_samples(tmp_path, monkeypatch, capsys):
    """tools/check-solver --divergence on the shipped 2-D model: the exact trace is the
    reference; Hutchinson's log q of the same test points scatters around it (unbiased:
    mean difference within 4 standard errors) and its ESS-q comes out no higher."""
    from zoo.cli import check_solver

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    check_solver.main(["gmm_fm", f"--workdir={tmp_path / 'check'}", "--divergence", "--n=128"])
    rows = json.loads((tmp_path / "check" / "divergence_check.json").read_text())["rows"]
    assert [r["setting"].split(",")[0] for r in rows] == ["exact divergence", "hutchinson divergence"]
    assert rows[0]["data_log_q_minus_reference_max_abs"] == 0
    hutchinson = rows[1]
    assert hutchinson["data_log_q_minus_reference_max_abs"] > 1e-3 and hutchinson["n_compared_model"] == 128
    assert 1e-4 < hutchinson["data_log_q_minus_reference_sd"] <= hutchinson["data_log_q_minus_reference_max_abs"]
    assert abs(hutchinson["data_log_q_minus_reference_mean"]) < 4 * hutchinson["data_log_q_minus_reference_sd"] / np.sqrt(128)
    assert hutchinson["ess_q"] <= rows[0]["ess_q"] + 2 * rows[0]["ess_q_se"]
    assert "hutchinson divergence" in capsys.readouterr().out


def test_divergence_check_takes_named_estimators(tmp_path, monkeypatch, capsys):
    """--estimators picks the rows: two orthogonal probes on the 2-D model span its space, so their
    estimate is the exact trace (float32 rounding apart); an unknown name is refused by name."""
    from zoo.cli import check_solver

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    check_solver.main(["gmm_fm", f"--workdir={tmp_path / 'check'}", "--divergence", "--n=32", "--estimators=exact,hutchinson-2-orthogonal"])
    rows = json.loads((tmp_path / "check" / "divergence_check.json").read_text())["rows"]
    assert [r["setting"].split(",")[0] for r in rows] == ["exact divergence", "hutchinson-2-orthogonal divergence"]
    assert rows[1]["data_log_q_minus_reference_max_abs"] < 1e-3 and rows[1]["model_log_w_minus_reference_max_abs"] < 1e-3
    with pytest.raises(SystemExit):
        check_solver.main(["gmm_fm", f"--workdir={tmp_path / 'bad'}", "--divergence", "--estimators=exact,hutchinson-two"])
    assert "unknown divergence 'hutchinson-two'" in capsys.readouterr().err


def test_solver_check_refuses_solver_lists_it_cannot_run(tmp_path, monkeypatch, capsys):
    """--solvers names the solvers to compare; a list without a second solver, a malformed name or a
    solver list beside --divergence is refused before any solve, saying why."""
    from zoo.cli import check_solver

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    for arguments, message in [
        (["--solvers=rk4-20"], "at least one solver to compare"),
        (["--solvers=dopri5-1e-6,rk4-ten"], "--solvers: solver name 'rk4-ten'"),
        (["--divergence", "--solvers=rk4-10,rk4-20"], "leave out --divergence"),
    ]:
        with pytest.raises(SystemExit):
            check_solver.main(["gmm_fm", f"--workdir={tmp_path / 'bad'}", *arguments])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad" / "solver_check.json").exists()


@pytest.mark.slow  # float64 switched on and off, as in the solver-agreement test above
def test_solver_check_compares_the_named_solvers(tmp_path, monkeypatch):
    """tools/check-solver --solvers=rk4-40,rk4-5: the rows are the named solvers, the first the reference,
    and five steps are further from forty than nothing."""
    from zoo.cli import check_solver

    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    check_solver.main(["gmm_fm", f"--workdir={tmp_path / 'check'}", "--n=16", "--solvers=rk4-40,rk4-5"])
    rows = json.loads((tmp_path / "check" / "solver_check.json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["exact divergence, RK4-40", "exact divergence, RK4-5"]
    assert rows[0]["data_log_q_minus_reference_max_abs"] == 0 < rows[1]["data_log_q_minus_reference_max_abs"]


def test_metrics_from_hutchinson_log_densities_say_their_ess_is_a_lower_bound():
    from zoo.metrics import format_metrics

    metrics = {"nll": 1.0, "ess_q": 0.01, "ess_p": 1e-6, "n_samples_q": 10, "n_samples_p": 10}
    assert "lower bound" in format_metrics({**metrics, "divergence": "hutchinson-8-orthogonal"})
    assert "hutchinson-8-orthogonal" in format_metrics({**metrics, "divergence": "hutchinson-8-orthogonal"})
    assert "lower bound" not in format_metrics({**metrics, "divergence": "exact"})
    assert "lower bound" not in format_metrics({"nll": 1.0, "divergence": "hutchinson"})


def test_default_divergence_estimators_stay_below_the_support_dimension():
    from zoo.experiments.runs import divergence_settings

    names = lambda d: [s["divergence"] for s in divergence_settings(d)]  # noqa: E731
    assert names(36) == ["exact", "hutchinson", "hutchinson-4-orthogonal", "hutchinson-9-orthogonal", "hutchinson-18-orthogonal"]
    assert names(6) == ["exact", "hutchinson", "hutchinson-3-orthogonal", "hutchinson-4-orthogonal"]
    assert names(2) == ["exact", "hutchinson"]


def test_free_energy_difference_and_its_error_against_a_two_state_model():
    """Two states with P(A) = 0.2: ΔF = −log(0.2/0.8) = log 4. Unweighted it is the samples'
    own log ratio; reweighted from a proposal with P(A) = 0.5 it lies within 4 standard errors,
    and the error matches the spread over repetitions."""
    import math

    from zoo.metrics import free_energy_difference

    in_a = np.array([1] * 30 + [0] * 70)
    value, se = free_energy_difference(in_a)
    assert value == pytest.approx(-math.log(30 / 70))
    assert se == pytest.approx(math.sqrt(0.3 * 0.7 / 100) / (0.3 * 0.7))
    rng = np.random.default_rng(0)

    def draw(n):
        a = rng.random(n) < 0.5  # proposal: P(A) = 0.5
        log_w = np.where(a, math.log(0.2 / 0.5), math.log(0.8 / 0.5))
        return free_energy_difference(a, log_w)

    value, se = draw(20000)
    assert abs(value - math.log(4.0)) < 4 * se
    values, ses = zip(*(draw(2000) for _ in range(300)))
    assert np.std(values, ddof=1) == pytest.approx(np.mean(ses), rel=0.15)
    assert free_energy_difference(np.zeros(5))[0] == math.inf and math.isnan(free_energy_difference(np.zeros(5))[1])


def test_with_error_never_prints_a_nonzero_value_as_zero():
    from zoo.metrics import with_error

    assert with_error({"ess_p": 1.674e-08, "ess_p_se": 1.4e-08}, "ess_p", ".3f") == "1.7e-08 ± 1.4e-08"
    assert with_error({"ess_q": 0.5512, "ess_q_se": 0.0167}, "ess_q", ".3f") == "0.551 ± 0.017"
    assert with_error({"ess_p": 0.0}, "ess_p", ".3f") == "0.000"
    assert with_error({}, "nll") == "-"


def test_top_weight_check_reports_the_solver_error_of_the_largest_weights():
    """The reported error is the largest |log q − fine solve| over the k highest-weight samples
    of each side (the fine solve here: RK4 with 400 steps, not the check's Dopri5); a solver
    that gets the field wrong is flagged; check_top=0 skips the check, Hutchinson flows refuse it."""
    import jax

    from zoo.data import exact_samples
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.flows.cnf import log_prob_chunked
    from zoo.metrics import TOP_LOG_Q_TOLERANCE, check_top_weights, evaluate_flow, format_metrics
    from zoo.systems import GaussianMixture2D

    system = GaussianMixture2D()
    data = exact_samples(system, n_train=64, n_val=64, n_test=64)
    field = MLPField(2, width=16, depth=2, key=jax.random.PRNGKey(3))
    field = jax.tree.map(lambda a: 3.0 * a if eqx.is_inexact_array(a) else a, field)  # a field RK4-1 gets wrong
    coarse = CNF(field, StandardNormal(2), n_steps=1)
    kwargs = dict(key=jax.random.PRNGKey(1), n_samples=64, n_target=64)
    metrics, arrays = evaluate_flow(coarse, system, data, check_top=5, **kwargs)
    assert metrics["n_top_checked"] == 5
    fine = CNF(field, StandardNormal(2), n_steps=400)
    errors = {}
    for side, x, log_q, log_w in (
        ("q", arrays["x_model"], arrays["log_q_model"], arrays["log_w_model"]),
        ("p", arrays["x_target"], arrays["log_q_target"], arrays["log_w_target"]),
    ):
        error = np.abs(log_prob_chunked(fine, x, chunk_size=64)["log_q"] - log_q)
        errors[side] = error
        assert metrics[f"top_log_q_error_{side}"] == pytest.approx(error[np.argsort(log_w)[-5:]].max(), abs=2e-3), side
    # On the model side the largest error of all lies outside the top weights: the check looked at those only.
    assert errors["q"].max() > metrics["top_log_q_error_q"] + 0.01
    assert max(metrics["top_log_q_error_q"], metrics["top_log_q_error_p"]) > TOP_LOG_Q_TOLERANCE
    assert "highest-weight samples' log q moves" in format_metrics(metrics)
    assert "evaluation.n_solver_steps = 8" in format_metrics({**metrics, "n_solver_steps": 4})
    assert "evaluation.solver_rtol" in format_metrics({**metrics, "n_solver_steps": None})
    for side in "qp":  # the typical samples' offset was checked too, and the excess is measured from it
        assert np.isfinite(metrics[f"log_q_offset_{side}"])
        assert metrics[f"top_log_q_excess_{side}"] <= metrics[f"top_log_q_error_{side}"] + abs(metrics[f"log_q_offset_{side}"]) + 1e-6
    calm = {**metrics, "top_log_q_excess_q": 0.01, "top_log_q_excess_p": float("nan"), "log_q_offset_p": 0.05}
    assert "highest-weight" not in format_metrics(calm) and "NLL is off" not in format_metrics(calm)
    # A common offset leaves the ESS alone but not the NLL; entries from before the offset was checked warn on the error.
    assert "the NLL is off by -1.2" in format_metrics({**calm, "log_q_offset_p": 1.2})
    assert "highest-weight" in format_metrics({k: v for k, v in calm.items() if "excess" not in k} | {"top_log_q_error_q": 2.0})
    assert "n_top_checked" not in evaluate_flow(coarse, system, data, check_top=0, **kwargs)[0]
    with pytest.raises(ValueError, match="deterministic divergence"):
        check_top_weights(CNF(field, StandardNormal(2), divergence="hutchinson"), arrays["x_model"], arrays["log_q_model"], arrays["log_w_model"])


def test_top_weight_check_separates_a_common_offset_from_the_top_weights_excess():
    """log q off by 2 nats everywhere and by 0.5 more on the 4 highest weights: the check reports
    an error of 2.5, an offset of 2 and an excess of 0.5 (against RK4 with 400 steps, which agrees
    with the check's Dopri5 reference to well below the tolerance here); non-finite weights are skipped."""
    import jax

    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal
    from zoo.flows.cnf import log_prob_chunked
    from zoo.metrics import check_top_weights

    field = MLPField(2, width=16, depth=2, key=jax.random.PRNGKey(5))
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(6), (40, 2)))
    log_q_fine = np.asarray(log_prob_chunked(CNF(field, StandardNormal(2), n_steps=400), x, chunk_size=40)["log_q"], dtype=np.float64)
    log_w = np.asarray(jax.random.normal(jax.random.PRNGKey(7), (40,)), dtype=np.float64)
    log_w[0] = np.nan
    top = np.argsort(np.where(np.isfinite(log_w), log_w, -np.inf))[-4:]
    log_q = log_q_fine + 2.0
    log_q[top] += 0.5
    check = check_top_weights(CNF(field, StandardNormal(2), n_steps=4), x, log_q, log_w, k=4)
    assert check.top_error == pytest.approx(2.5, abs=5e-3)
    assert check.offset == pytest.approx(2.0, abs=5e-3)
    assert check.top_excess == pytest.approx(0.5, abs=5e-3)
    assert all(np.isnan(check_top_weights(CNF(field, StandardNormal(2)), x, log_q, np.full(40, np.nan))))

"""The Python API (zoo.load, BoltzmannGenerator, zoo.reweight) against independent computations,
and the README's example as written."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin
import zoo
from zoo.experiments import config
from zoo.resources import ROOT as REPO_ROOT


@pytest.fixture(scope="module")
def gmm():
    return zoo.load("gmm_fm")


def test_load_leaves_the_callers_gin_configuration_alone():
    config.parse(["gmm_fm.gin"], ["train.n_steps = 7"])
    bg = zoo.load("gmm_fm", bindings=["CNF.n_steps = 5"])
    assert gin.query_parameter("train.n_steps") == 7
    assert bg.flow.solver.n_steps == 5 and bg.source == "gmm_fm" and bg.step > 0


def test_sample_log_prob_and_energy_agree_with_the_flow_and_the_system(gmm):
    s = gmm.sample(64, seed=3)
    assert s["x"].shape == (64, 2) and all(s[k].shape == (64,) for k in ("log_q", "energy", "log_w", "path_length"))
    # Forward-solve log densities against the flow's own reverse solve (they differ by RK4's error).
    np.testing.assert_allclose(np.asarray(gmm.flow.log_prob(jnp.asarray(s["x"]))), s["log_q"], atol=2e-2)
    np.testing.assert_allclose(gmm.log_prob(s["x"]), np.asarray(gmm.flow.log_prob(jnp.asarray(s["x"]))), atol=1e-5)
    np.testing.assert_allclose(s["energy"], np.asarray(jax.vmap(gmm.system.energy)(jnp.asarray(s["x"]))), rtol=1e-5)
    np.testing.assert_allclose(s["log_w"], -s["energy"] - s["log_q"])
    with pytest.raises(ValueError, match="expected"):
        gmm.log_prob(np.zeros((3, 3)))


def test_score_matches_autodiff_through_the_solver():
    """The adjoint-ODE score against jax.grad of the discretised log density: they differ by
    the solver's error, which shrinks with the step count."""
    bg = zoo.load("gmm_fm", bindings=["CNF.n_steps = 64"])
    x = np.asarray(bg.sample(4, seed=1)["x"], np.float32)
    autodiff = np.asarray(jax.vmap(jax.grad(lambda xi: bg.flow.log_prob(xi[None])[0]))(jnp.asarray(x)))
    np.testing.assert_allclose(bg.score(x), autodiff, rtol=1e-3, atol=1e-3)
    assert np.abs(autodiff).max() > 0.1  # not a trivially flat density


def test_reweight_recovers_analytic_expectations_with_honest_errors():
    """Proposal q = N(0, 2²), target p = N(1, 1): E_p[x] = 1, E_p[x²] = 2. The estimate lies
    within 4 standard errors, and the standard error matches the spread over repetitions."""
    rng = np.random.default_rng(0)

    def draw(n):
        x = 2.0 * rng.standard_normal(n)
        log_w = -0.5 * (x - 1.0) ** 2 + 0.5 * (x / 2.0) ** 2  # log p − log q up to constants
        return x, log_w

    x, log_w = draw(20000)
    est = zoo.reweight(np.stack([x, x**2], axis=1), log_w)
    assert np.all(np.abs(est.mean - [1.0, 2.0]) < 4 * est.se)
    w = np.exp(log_w - log_w.max())
    assert est.ess == pytest.approx(w.sum() ** 2 / (w * w).sum()) and est.n == 20000
    means, ses = zip(*[(r.mean, r.se) for r in (zoo.reweight(*draw(2000)) for _ in range(300))])
    assert np.std(means, ddof=1) == pytest.approx(np.mean(ses), rel=0.15)
    # Non-finite weights or values are dropped and counted; bad shapes are named.
    x[:3], log_w[3] = np.nan, -np.inf
    assert zoo.reweight(x, log_w).n == 20000 - 4
    with pytest.raises(ValueError, match=r"values \(n,\) or \(n, k\)"):
        zoo.reweight(x[:10], log_w)


def test_the_readme_example_runs():
    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Python API)", "exec"), {})


# The GPU table's commands start from runs they made themselves; checked here against the
# released models of the same architecture and system.
GPU_TABLE_RUNS = {
    "runs/lj13_eqotfm_gpu/checkpoint": "lj13_eqotfm",
    "runs/lj55_eqotfm_gpu/checkpoint": "lj55_eqotfm",
    "runs/ad2_xtb_gpu/checkpoint": "ad2_xtb_fm",
}


def test_the_readme_gpu_commands_name_configs_and_bindings_that_exist(tmp_path):
    """No GPU runs them here, so a renamed file or binding would go unnoticed: each command's
    gin files and bindings parse (over the pretrained model's stored config where it has one)."""
    import inspect
    import shlex

    from zoo.cli import common
    from zoo.experiments import compare, finetune, runs
    from zoo.train import RunSettings

    text = (REPO_ROOT / "README.md").read_text()
    section = text[text.index("## On a GPU machine") :]
    section = section[: section.index("\n## ", 1)]
    # The tools' own parser reads --gin and --gin_param; the tool-specific flags are not checked.
    flags = common.parser("a README command")
    flags.add_argument("--pretrained")
    commands = re.findall(r"`(tools/[^`]+)`", section)
    assert len(commands) >= 9
    for command in commands:
        tool, *argv = shlex.split(command.replace("$Z", str(tmp_path)))
        args, _ = flags.parse_known_args(argv)
        assert args.gin, command
        bindings = list(args.gin_param)
        selector = {"tools/finetune": "finetune.pretrained", "tools/compare": "compare.pretrained"}.get(tool)
        with config.isolated():
            if selector:
                if args.pretrained is not None:
                    bindings.append(f"{selector} = {GPU_TABLE_RUNS[args.pretrained]!r}")
                assert config.parse_over_pretrained(args.gin, bindings, selector=selector) is not None, command
            else:
                config.parse(args.gin, bindings)
            # The run settings (train.batch_size, finetune.time_budget_s, ...) are keyword
            # arguments that gin takes without checking; the runs check them when they start.
            for root in (runs.train, finetune.finetune, compare.compare):
                explicit = set(inspect.signature(root).parameters)
                RunSettings.of(root.__name__, {k: v for k, v in gin.get_bindings(root.__name__).items() if k not in explicit})

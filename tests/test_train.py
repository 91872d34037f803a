"""Training loop: exact resume, skipped non-finite steps, configs and tools end to end."""

import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo import config
from zoo.data import exact_samples, make_split
from zoo.errors import ConfigError
from zoo.fields import MLPField
from zoo.flows import CNF, StandardNormal
from zoo.losses import FlowMatching
from zoo.systems import GaussianMixture2D
from zoo.train import RunSettings, fit


def _setup(seed=0):
    system = GaussianMixture2D()
    data = exact_samples(system, n_train=256, n_val=64, n_test=64, seed=seed)
    flow = CNF(MLPField(2, width=16, depth=2, key=jax.random.PRNGKey(seed)), StandardNormal(2), n_steps=4)
    return system, data, flow


def _params(model):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


def test_resume_continues_exactly(tmp_path):
    _, data, flow = _setup()
    kwargs = dict(batch_size=32, accumulation=2, clip_norm=1.0, seed=3, progress=False, log_every=1)
    straight, _ = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=10, **kwargs), workdir=tmp_path / "a")
    fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=5, **kwargs), workdir=tmp_path / "b")
    resumed, _ = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=10, **kwargs), workdir=tmp_path / "b", resume=True)
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 11)), "the resumed log continues the first without repeats or gaps"


def test_parameter_average_follows_its_recurrence():
    """The EMA transformation against the recurrence written out in NumPy (SGD, fixed gradients)."""
    from zoo.optim import parameter_average_of, with_parameter_average

    grads = [np.array([1.0, -2.0]), np.array([0.5, 0.25]), np.array([-3.0, 1.0])] * 4
    for warmup in (True, False):
        from zoo.optim import parameter_average

        opt = optax.chain(optax.sgd(0.1), parameter_average(0.8, warmup=warmup))
        params = jnp.array([0.3, -0.7])
        state = opt.init(params)
        theta, average = np.array([0.3, -0.7]), np.array([0.3, -0.7])
        for t, g in enumerate(grads, start=1):
            updates, state = opt.update(jnp.asarray(g), state, params)
            params = optax.apply_updates(params, updates)
            theta = theta - 0.1 * g
            beta = min(0.8, (1 + t) / (10 + t)) if warmup else 0.8
            average = beta * average + (1 - beta) * theta
            np.testing.assert_allclose(params, theta, rtol=1e-6)  # updates pass through unchanged
            np.testing.assert_allclose(parameter_average_of(state), average, rtol=1e-6)
    assert parameter_average_of(optax.adam(1e-3).init(params)) is None
    assert with_parameter_average(optax.sgd(0.1), None).init(params) == optax.sgd(0.1).init(params)
    with pytest.raises(ValueError, match="decay"):
        parameter_average(1.0)


def test_moving_average_is_checkpointed_evaluated_and_resumed(tmp_path):
    """With ema_decay the model returned, evaluated and checkpointed is the average; resume is exact."""
    from zoo import checkpoint as ckpt

    _, data, flow = _setup()
    seen = {}

    def evaluate(model, step):
        seen[step] = _params(model)
        return {}

    kwargs = dict(batch_size=32, seed=3, progress=False, log_every=1, ema_decay=0.9, eval_every=10)
    straight, _ = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=10, **kwargs), evaluate=evaluate, workdir=tmp_path / "a")
    fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=5, **kwargs), evaluate=evaluate, workdir=tmp_path / "b")
    resumed, _ = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=10, **kwargs), evaluate=evaluate, workdir=tmp_path / "b", resume=True)
    for a, b in zip(_params(straight), _params(resumed)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_params(straight), seen[10]):
        np.testing.assert_array_equal(a, b)
    plain, _ = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=10, **{**kwargs, "ema_decay": None}), evaluate=evaluate, workdir=tmp_path / "c")

    stored = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint", model_like=flow, raw_model_like=flow)
    for a, b in zip(_params(straight), _params(stored.model)):
        np.testing.assert_array_equal(a, b)
    # The raw weights are the plain run's (the average does not feed back into training) and differ from the average.
    for a, b in zip(_params(plain), _params(stored.raw_model)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(_params(stored.model), _params(stored.raw_model)))
    assert ckpt.read_checkpoint_info(tmp_path / "c" / "checkpoint").groups == ("model", "opt_state", "key")


def test_a_time_budget_survives_resume(tmp_path, monkeypatch):
    """A run killed midway and resumed stops where the uninterrupted one does (±1 step for the recompile).

    A fake clock advances one second per training step, so the budgets are exact."""
    import zoo.train as train_module

    clock = {"now": 0.0}
    real_make_step = train_module.make_step

    def make_step(*args):
        step = real_make_step(*args)

        def timed_step(*a):
            clock["now"] += 1.0
            return step(*a)

        return timed_step

    monkeypatch.setattr(train_module, "make_step", make_step)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock["now"])
    _, data, flow = _setup()
    kwargs = dict(batch_size=32, seed=3, progress=False, log_every=1, checkpoint_every=1)
    _, straight = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(time_budget_s=12, **kwargs), workdir=tmp_path / "a")
    fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(time_budget_s=12, n_steps=5, **kwargs), workdir=tmp_path / "b")
    _, resumed = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(time_budget_s=12, **kwargs), workdir=tmp_path / "b", resume=True)
    assert straight[-1]["step"] == 13  # the first (compiling) step is not on the clock
    assert resumed[-1]["step"] - straight[-1]["step"] in (0, 1)
    assert resumed[-1]["time_s"] == pytest.approx(12.0, abs=1.0)
    # Resumed past its budget, a run takes no further step.
    _, again = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(time_budget_s=12, **kwargs), workdir=tmp_path / "b", resume=True)
    assert all(r["step"] <= resumed[-1]["step"] for r in again)


def test_resume_refuses_different_data(tmp_path):
    _, data, flow = _setup()
    fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=2, batch_size=32, progress=False), workdir=tmp_path)
    _, other, _ = _setup(seed=1)
    from zoo.checkpoint import CheckpointMismatchError

    with pytest.raises(CheckpointMismatchError, match="sha256"):
        fit(flow, other, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=4, batch_size=32, progress=False), workdir=tmp_path, resume=True)


class NaNOnStep(FlowMatching):
    """FM loss that turns NaN whenever the batch holds sample 0 of the training set."""

    poison: jax.Array = None

    def __call__(self, model, batch, key):
        loss, aux = super().__call__(model, batch, key)
        hit = jnp.any(jnp.all(batch.x == self.poison, axis=-1))
        return jnp.where(hit, jnp.nan, loss), aux


def test_nonfinite_step_is_skipped(tmp_path, capsys):
    _, data, flow = _setup()
    loss = NaNOnStep(poison=jnp.asarray(data.train.positions[0]))
    # With batch = whole training set every step is poisoned: parameters never change.
    model, records = fit(flow, data, loss, optax.adam(1e-1), RunSettings(n_steps=3, batch_size=256, progress=False), workdir=tmp_path)
    for a, b in zip(_params(flow), _params(model)):
        np.testing.assert_array_equal(a, b)
    assert all(not r["finite"] for r in records if "finite" in r)
    assert "skipped" in capsys.readouterr().out


def test_forces_required_for_pg_like_losses(tmp_path):
    _, data, flow = _setup()

    class NeedsForces(FlowMatching):
        needs_forces = True

    no_forces = type(data)(make_split(data.train.positions), data.val, data.test)
    with pytest.raises(ValueError, match="forces"):
        fit(flow, no_forces, NeedsForces(), optax.adam(1e-2), RunSettings(n_steps=1, batch_size=32, progress=False), workdir=tmp_path)


def test_nan_in_data_is_named():
    system, data, _ = _setup()
    bad = data.train.positions.copy()
    bad[7, 1] = np.nan
    broken = type(data)(make_split(bad, data.train.forces), data.val, data.test)
    with pytest.raises(ValueError, match=r"train positions contain NaN or inf in 1 of 256 samples \(first at index 7\)"):
        broken.validate(system.dim)
    with pytest.raises(ValueError, match=r"shape"):
        broken.validate(3)


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(config.ConfigError, match="not found"):
        config.parse(["no_such_config.gin"])
    with pytest.raises(config.ConfigError, match="No configurable matching reference '@NotALoss\\(\\)'"):
        config.parse(["gmm_fm.gin"], ["train.loss = @NotALoss()"])
    with pytest.raises(config.ConfigError, match="unknown_parameter"):
        config.parse(["gmm_fm.gin"], ["make_flow.unknown_parameter = 3"])
    # train's run settings are RunSettings' fields, checked when the run starts, before any work.
    from zoo.experiment import train

    config.parse(["gmm_fm.gin"], ["train.unknown_parameter = 3"])
    with pytest.raises(config.ConfigError, match="train has no setting train.unknown_parameter; its settings: n_steps, "):
        train(tmp_path / "run")
    assert not (tmp_path / "run").exists()
    bad = tmp_path / "bad.gin"
    bad.write_text("train.n_steps = = 3\n")
    with pytest.raises(config.ConfigError):
        config.parse([str(bad)])


def test_train_then_evaluate_reproduces_metrics(tmp_path):
    from zoo.cli import evaluate, train

    bindings = [
        "--gin_param=train.n_steps = 30",
        "--gin_param=train.batch_size = 64",
        "--gin_param=train.progress = False",
        "--gin_param=exact_samples.n_train = 512",
        "--gin_param=evaluation.n_samples = 256",
        "--gin_param=evaluation.n_target = 256",
        "--gin_param=evaluation.progress = False",
        "--gin_param=CNF.n_steps = 6",
    ]
    train.main(["--gin=gmm_fm.gin", f"--workdir={tmp_path / 'run'}", *bindings])
    run = tmp_path / "run"
    for name in ("metrics.json", "log.jsonl", "operative_config.gin", "density.png", "loss_curve.png", "energy_histogram.png"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("nll", "ess_q", "ess_p", "kl", "path_length", "fm_loss", "n_samples_q", "n_samples_p"):
        assert key in metrics
    evaluate.main([str(run / "checkpoint"), f"--workdir={tmp_path / 'eval'}", "--gin_param=evaluation.progress = False"])
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in ("nll", "ess_q", "ess_p", "kl", "path_length"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-5, abs=1e-6), key


def test_finetune_with_path_gradients_end_to_end(tmp_path):
    """FM pre-training, then tools/finetune with the PG loss from the checkpoint path: before/after files and report."""
    from zoo.cli import finetune, train

    small = [
        "--gin_param=exact_samples.n_train = 256",
        "--gin_param=evaluation.n_samples = 128",
        "--gin_param=evaluation.n_target = 128",
        "--gin_param=evaluation.progress = False",
        "--gin_param=CNF.n_steps = 4",
    ]
    train.main(["--gin=gmm_fm.gin", f"--workdir={tmp_path / 'fm'}", "--gin_param=train.n_steps = 20", "--gin_param=train.batch_size = 64", "--gin_param=train.progress = False", *small])
    args = [
        "--gin=gmm_pg.gin",
        f"--workdir={tmp_path / 'pg'}",
        f"--pretrained={tmp_path / 'fm' / 'checkpoint'}",
        "--steps=3",
        "--gin_param=finetune.batch_size = 32",
        "--gin_param=finetune.accumulation = 2",
        "--gin_param=finetune.clip_norm = 1.0",
        "--gin_param=finetune.progress = False",
        "--gin_param=finetune.eval_every = 3",
        *small,
    ]
    finetune.main(args)
    run = tmp_path / "pg"
    for name in ("metrics_before.json", "metrics.json", "report.md", "before_density.png", "density.png", "fm_loss_during_finetuning.png"):
        assert (run / name).is_file(), name
    before = json.loads((run / "metrics_before.json").read_text())
    after = json.loads((run / "metrics.json").read_text())
    assert before["nll"] != after["nll"], "three PG steps must move the model"
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r][-1] == 3
    assert all("c_norm" in r for r in steps if "loss" in r)
    assert "| nll |" in (run / "report.md").read_text()
    assert before["pretrained"] == str(tmp_path / "fm" / "checkpoint")

    # The same run from Python: the checkpoint's stored config goes underneath the same files
    # and bindings, and the result is the tool's.
    from zoo.finetune import run_finetuning

    bindings = [a.removeprefix("--gin_param=") for a in args if a.startswith("--gin_param=")]
    bindings += [f"finetune.pretrained = {str(tmp_path / 'fm' / 'checkpoint')!r}", "finetune.n_steps = 3"]
    run_finetuning(tmp_path / "py", ["gmm_pg.gin"], bindings)
    from_python = json.loads((tmp_path / "py" / "metrics.json").read_text())
    assert from_python["nll"] == pytest.approx(after["nll"], rel=1e-6)

    # Resuming a finished run: the pretrained model's metrics are reused, not recomputed
    # (its plots stay untouched), no step is added and the after-metrics come out the same.
    stamp = (run / "before_density.png").stat().st_mtime_ns
    finetune.main([*args, "--resume"])
    assert (run / "before_density.png").stat().st_mtime_ns == stamp
    assert json.loads((run / "metrics_before.json").read_text()) == before
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r][-1] == 3
    assert json.loads((run / "metrics.json").read_text())["nll"] == pytest.approx(after["nll"], rel=1e-6)

    # The learning-rate probe: one first step per learning rate, no training, no checkpoint.
    probe = tmp_path / "probe"
    finetune.main([*args[:1], f"--workdir={probe}", *args[2:], "--probe_lr", "1e-4", "1e-2", "--probe_samples=32"])
    result = json.loads((probe / "lr_probe.json").read_text())
    assert result["learning_rates"] == [1e-4, 1e-2] and result["configured_learning_rate"] == 5e-3
    assert all(np.isfinite(result["d_nll_mean"])) and (probe / "lr_probe.png").is_file()
    assert not (probe / "checkpoint").exists()


def test_finetune_of_a_released_model_evaluates_it_as_the_model_index_does(tmp_path, monkeypatch):
    """A model named from the model index is measured before and after with its index's
    solver (not the cheaper one stored with it for training), so the report's "before" is
    the index's model; an ``evaluation.*`` binding still overrides, and a resumed run whose
    before-metrics were computed another way evaluates again."""
    import hashlib

    from zoo import checkpoint as ckpt
    from zoo import pretrained
    from zoo.cli import finetune, train

    small = [
        "--gin_param=exact_samples.n_train = 256",
        "--gin_param=evaluation.n_samples = 64",
        "--gin_param=evaluation.n_target = 64",
        "--gin_param=evaluation.progress = False",
        "--gin_param=CNF.n_steps = 4",
    ]
    train.main(["--gin=gmm_fm.gin", f"--workdir={tmp_path / 'fm'}", "--gin_param=train.n_steps = 5", "--gin_param=train.batch_size = 64", "--gin_param=train.progress = False", *small])
    archive = ckpt.pack_checkpoint(ckpt.latest_checkpoint(tmp_path / "fm" / "checkpoint"), tmp_path / "toy_gmm.tar")
    data = archive.read_bytes()
    entry = {
        "name": "toy_gmm", "system": "GaussianMixture", "gin": "gin/gmm_fm.gin", "recipe": "a test fixture",
        "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "locations": [str(archive)],
        "metrics": {"nll": 1.0, "ess_q": 0.5, "ess_p": 0.5, "n_samples_q": 64, "n_samples_p": 64},
        "evaluation": {"divergence": "exact", "solver": "rk4", "n_solver_steps": 6},
    }  # fmt: skip
    monkeypatch.setenv("ZOO_MODELS", str(pretrained.write_index([entry], tmp_path / "models.toml")))
    monkeypatch.setenv("ZOO_CACHE", str(tmp_path / "cache"))
    args = ["--gin=gmm_pg.gin", f"--workdir={tmp_path / 'pg'}", "--pretrained=toy_gmm", "--steps=1", "--gin_param=finetune.progress = False", *small]
    finetune.main(args)
    before = json.loads((tmp_path / "pg" / "metrics_before.json").read_text())
    after = json.loads((tmp_path / "pg" / "metrics.json").read_text())
    assert (before["solver"], before["n_solver_steps"]) == (after["solver"], after["n_solver_steps"]) == ("rk4", 6)
    assert "Log densities: exact divergence, RK4-6." in (tmp_path / "pg" / "report.md").read_text()
    # The same model by its path: no index, so the stored config's (and the bindings') solver.
    finetune.main([args[0], f"--workdir={tmp_path / 'by_path'}", f"--pretrained={tmp_path / 'fm' / 'checkpoint'}", *args[3:]])
    assert json.loads((tmp_path / "by_path" / "metrics_before.json").read_text())["n_solver_steps"] == 4
    # An evaluation binding wins over the index, and the resumed run does not reuse the
    # before-metrics computed with 6 steps.
    finetune.main([*args, "--resume", "--gin_param=evaluation.n_solver_steps = 5"])
    assert json.loads((tmp_path / "pg" / "metrics_before.json").read_text())["n_solver_steps"] == 5
    assert json.loads((tmp_path / "pg" / "metrics.json").read_text())["n_solver_steps"] == 5


def test_learning_rate_probe_matches_the_first_order_prediction(x64):
    """The probe's NLL change against −η ⟨∇NLL_test, g_train⟩ (SGD, whole training set in one step)."""
    from zoo.finetune import probe_learning_rates
    from zoo.losses import MaximumLikelihood

    _, data, flow = _setup()
    flow = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, flow)
    nll = lambda model, x: -jnp.mean(model.log_prob(x))  # noqa: E731
    grad_train = eqx.filter_grad(nll)(flow, jnp.asarray(data.train.positions))
    grad_test = eqx.filter_grad(nll)(flow, jnp.asarray(data.test.positions))
    slope = -sum(float(jnp.vdot(a, b)) for a, b in zip(jax.tree.leaves(grad_test), jax.tree.leaves(grad_train)))
    lrs = [1e-4, 1e-3]
    result = probe_learning_rates(
        flow, MaximumLikelihood(), optax.sgd(0.5), data, lrs, configured_learning_rate=0.5,
        batch_size=64, accumulation=4, n_eval=64,
    )  # fmt: skip
    assert slope < 0  # train and test gradients agree: a small SGD step helps
    for lr, change in zip(lrs, result["d_nll_mean"]):
        assert change == pytest.approx(lr * slope, rel=2e-2)
    assert result["n_gradient_samples"] == 256 and result["n_eval"] == 64
    with pytest.raises(ValueError, match="positive"):
        probe_learning_rates(flow, MaximumLikelihood(), optax.sgd(0.5), data, [0.0], configured_learning_rate=0.5, batch_size=64)


#: Bindings that shrink an EGNN experiment to seconds: tiny field, 2 solver steps, 16 samples.
TINY_EGNN_RUN = [
    "--gin_param=EGNNField.hidden = 8",
    "--gin_param=EGNNField.n_layers = 1",
    "--gin_param=CNF.n_steps = 2",
    "--gin_param=evaluation.n_samples = 16",
    "--gin_param=evaluation.n_target = 16",
    "--gin_param=evaluation.progress = False",
]


def test_alanine_dipeptide_fm_then_path_gradient_finetune(tmp_path):
    """The molecular route on the shipped small classical set: FM pre-training of a tiny TBG
    EGNN, then tools/finetune with ad2_classical_pg.gin: report, Ramachandran maps, folded
    mirror images counted, before/after metrics."""
    pytest.importorskip("openmm")
    from zoo.cli import finetune, train

    small = TINY_EGNN_RUN
    train.main(["--gin=ad2_classical_fm.gin", f"--workdir={tmp_path / 'fm'}", "--gin_param=train.n_steps = 3", "--gin_param=train.batch_size = 16", "--gin_param=train.progress = False", *small])
    finetune.main(
        [
            "--gin=ad2_classical_pg.gin",
            f"--workdir={tmp_path / 'pg'}",
            f"--pretrained={tmp_path / 'fm' / 'checkpoint'}",
            "--steps=2",
            "--gin_param=finetune.batch_size = 4",
            "--gin_param=finetune.accumulation = 2",
            "--gin_param=finetune.eval_every = 0",
            *small,
        ]
    )
    run = tmp_path / "pg"
    for name in ("metrics_before.json", "metrics.json", "report.md", "ramachandran.png", "before_ramachandran.png", "bond_lengths.png", "energy_histogram.png"):
        assert (run / name).is_file(), name
    before = json.loads((run / "metrics_before.json").read_text())
    after = json.loads((run / "metrics.json").read_text())
    assert before["nll"] != after["nll"], "two PG steps must move the model"
    for metrics in (before, after):
        assert metrics["divergence"] == "exact" and 0 <= metrics["n_folded_q"] <= 16
        assert np.isfinite(metrics["nll"])
        # The φ free-energy differences come with their errors (metrics.free_energy_difference).
        assert all(f"delta_f_phi_{w}" in metrics and f"delta_f_phi_{w}_se" in metrics for w in ("data", "model", "reweighted"))
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r][-1] == 2


@pytest.mark.parametrize("system", ["dw4", "lj13"])
@pytest.mark.parametrize("variant", ["fm", "otfm", "eqotfm"])
def test_particle_configs_train_end_to_end(system, variant, tmp_path):
    """Every shipped FM variant on DW4 and LJ13 trains from its gin file on the stored data
    and evaluates (a tiny EGNN and few samples, so the suite stays fast)."""
    from zoo.cli import train

    workdir = tmp_path / f"{system}_{variant}"
    train.main(
        [
            f"--gin={system}_{variant}.gin",
            f"--workdir={workdir}",
            "--gin_param=train.n_steps = 2",
            "--gin_param=train.batch_size = 16",
            "--gin_param=train.progress = False",
            *TINY_EGNN_RUN,
        ]
    )
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["n_samples_q"] == 16 and np.isfinite(metrics["nll"]) and metrics["path_length"] > 0
    assert (workdir / "pair_distances.png").is_file() and (workdir / "energy_histogram.png").is_file()
    log = [json.loads(line) for line in (workdir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "loss" in r][-1] == 2


def test_compare_tool_writes_table_curves_and_views(tmp_path):
    """tools/compare on the GMM: two recipes at one tiny budget, table and JSON, curves, and
    each run's evaluation (under the evaluation bindings) and views; its checkpoints carry the
    config, so tools/evaluate can reload them."""
    from zoo.cli import compare, evaluate

    workdir = tmp_path / "cmp"
    compare.main(
        [
            "--gin=gmm_compare.gin",
            f"--workdir={workdir}",
            "--gin_param=compare.recipes = [@fm_only/Recipe(), @hybrid/Recipe()]",
            "--gin_param=compare.seeds = (0,)",
            "--gin_param=compare.time_budget_s = 1.0",
            "--gin_param=compare.eval_every = 5",
            "--gin_param=compare.n_track = 64",
            "--gin_param=evaluation.n_samples = 64",
            "--gin_param=evaluation.n_target = 64",
            "--gin_param=evaluation.divergence = 'hutchinson'",
            "--gin_param=exact_samples.n_train = 256",
            "--gin_param=CNF.n_steps = 4",
        ]
    )
    table = (workdir / "table.md").read_text()
    assert "| FM only |" in table and "hutchinson divergence" in table
    results = json.loads((workdir / "results.json").read_text())["results"]
    # The evaluation bindings of training runs apply to the comparison's evaluations too.
    assert [(m["divergence"], m["n_samples_q"], m["n_samples_p"]) for ms in results.values() for m in ms] == [("hutchinson", 64, 64)] * 2
    for name in ("kl_vs_time.png", "fm_only_seed0_density.png", "fm_only_seed0_energy_histogram.png", "fm_only_seed0_metrics.json"):
        assert (workdir / name).is_file(), name
    run = next((workdir / "runs").glob("fm_only_seed0_stage0"))
    evaluate.main([str(run / "checkpoint"), f"--workdir={tmp_path / 'eval'}", "--gin_param=evaluation.n_samples = 32", "--gin_param=evaluation.n_target = 32", "--gin_param=evaluation.progress = False"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_samples_q"] == 32


def test_an_interrupted_comparison_resumes_to_the_same_budget(tmp_path, monkeypatch, capsys):
    """tools/compare killed (Ctrl-C) midway, then run with --resume: each run stops where the
    uninterrupted one does (±1 step). A fake clock advances one second per training step."""
    import zoo.train as train_module
    from zoo.cli import compare

    clock = {"now": 0.0, "calls": 0, "interrupt_at": None}
    real_make_step = train_module.make_step

    def make_step(*args):
        step = real_make_step(*args)

        def timed_step(*a):
            clock["calls"] += 1
            if clock["calls"] == clock["interrupt_at"]:
                raise KeyboardInterrupt
            clock["now"] += 1.0
            return step(*a)

        return timed_step

    monkeypatch.setattr(train_module, "make_step", make_step)
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: clock["now"])

    def run(workdir, *extra):
        compare.main(
            ["--gin=gmm_compare.gin", f"--workdir={workdir}", "--gin_param=compare.recipes = [@fm_only/Recipe()]",
             "--gin_param=compare.seeds = (0,)", "--gin_param=compare.time_budget_s = 12.0", "--gin_param=compare.eval_every = 5",
             "--gin_param=compare.n_track = 32", "--gin_param=evaluation.n_samples = 32", "--gin_param=evaluation.n_target = 32", "--gin_param=exact_samples.n_train = 256",
             "--gin_param=CNF.n_steps = 2", *extra]  # fmt: skip
        )
        return json.loads((workdir / "results.json").read_text())["results"]["FM only"][0]

    straight = run(tmp_path / "a")
    clock["calls"], clock["interrupt_at"] = 0, 9  # after the checkpoint at step 5
    with pytest.raises(SystemExit) as stop:
        run(tmp_path / "b")
    assert stop.value.code == 130 and "interrupted" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # not without --resume or --overwrite
        run(tmp_path / "b")
    assert stop.value.code == 2 and "--resume" in capsys.readouterr().err
    clock["interrupt_at"] = None
    resumed = run(tmp_path / "b", "--resume")
    assert straight["steps"] == 13
    assert resumed["steps"] - straight["steps"] in (0, 1)
    assert resumed["train_time_s"] == pytest.approx(12.0, abs=1.0)


def test_published_lj13_architecture_config():
    """gin/lj13_eqotfm_h32.gin builds the reference's LJ13 EGNN: h32, 3 layers, attention, tanh.

    The reference counts 22 468 parameters; ours has 3 169 fewer, exactly its last layer's
    node MLP (2·32·32 + 32 + 32·32 + 32 = 3 136) and its output embedding (32 + 1)."""
    config.parse(["lj13_eqotfm_h32.gin"], [])
    system = config.make_system()
    flow = config.make_flow(system, key=jax.random.PRNGKey(0))
    field = flow.field
    assert (field.hidden, len(field.layers)) == (32, 3)
    assert all(layer.att is not None and layer.tanh for layer in field.layers)
    n_params = sum(a.size for a in jax.tree.leaves(eqx.filter(field, eqx.is_inexact_array)))
    assert n_params == 22_468 - 3_136 - 33


def test_a_rerun_without_resume_refuses_to_replace_the_run(tmp_path, capsys):
    """tools/train into a folder holding a run: refused (naming --resume and --overwrite), nothing touched;
    --overwrite starts afresh."""
    from zoo.cli import train

    argv = ["--gin=gmm_fm.gin", f"--workdir={tmp_path}", "--gin_param=train.n_steps = 2", "--gin_param=train.progress = False",
            "--gin_param=evaluation.n_samples = 16", "--gin_param=evaluation.n_target = 16"]  # fmt: skip
    train.main(argv)
    log = (tmp_path / "log.jsonl").read_text()
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert "--resume" in message and "--overwrite" in message
    assert (tmp_path / "log.jsonl").read_text() == log
    train.main([*argv, "--overwrite"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps.count(2) >= 1 and max(steps) == 2


@pytest.mark.parametrize(
    "binding, named",
    [
        ("train.log_every = 0", "train.log_every"),
        ("train.batch_size = 0", "train.batch_size"),
        ("train.n_steps = 'ten'", "train.n_steps"),
        ("train.n_steps = -3", "train.n_steps"),
        ("train.time_budget_s = -1.0", "train.time_budget_s"),
        ("train.ema_decay = 1.0", "train.ema_decay"),
        ("train.n_epochs = 0", "train.n_epochs"),
        ("train.n_epochs = 2", "train.n_steps or train.n_epochs, not both"),
    ],
)
def test_unusable_settings_are_refused_by_name(binding, named, tmp_path, capsys):
    from zoo.cli import train

    with pytest.raises(SystemExit) as exit_info:
        train.main(["--gin=gmm_fm.gin", f"--workdir={tmp_path}", f"--gin_param={binding}"])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err
    assert not (tmp_path / "checkpoint").exists()


def test_tools_refuse_an_unwritable_output_before_any_work(tmp_path, capsys):
    """tools/evaluate and tools/sample check their outputs first (a file where a folder should be:
    root ignores permission bits, so read-only folders cannot stand in here)."""
    from zoo.cli import evaluate, sample

    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")
    for tool, argv in ((evaluate, ["gmm_fm", f"--workdir={blocker / 'eval'}"]), (sample, ["gmm_fm", f"--out={blocker / 's.npz'}"])):
        with pytest.raises(SystemExit) as exit_info:
            tool.main(argv)
        assert exit_info.value.code != 0
        assert "cannot write outputs" in capsys.readouterr().err


def test_metrics_are_written_before_the_plots(tmp_path, monkeypatch):
    from zoo import experiment

    system, data, flow = _setup()

    def broken_views(*args, **kwargs):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(experiment, "write_views", broken_views)
    with pytest.raises(RuntimeError, match="plotting"):
        experiment.evaluation(flow, system, data, tmp_path, n_samples=32, n_target=32, progress=False)
    assert np.isfinite(json.loads((tmp_path / "metrics.json").read_text())["nll"])


def test_an_epoch_budget_is_whole_passes_over_the_training_set(tmp_path):
    """n_epochs counts the whole batches BatchSampler draws per pass, rounded up; it ends the run like n_steps."""
    from zoo.train import steps_for_budget

    assert steps_for_budget("train", None, 2, 1000, 64) == 2 * 15  # 15 whole batches of 64 per pass over 1000
    assert steps_for_budget("train", None, 0.5, 1000, 64) == 8
    assert steps_for_budget("train", 7, None, 1000, 64) == 7
    with pytest.raises(ConfigError, match="exceeds the 10 training samples"):
        steps_for_budget("finetune", None, 1, 10, 64)
    _, data, flow = _setup()
    per_epoch = len(data.train) // 32
    _, records = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_epochs=1.5, batch_size=32, progress=False), workdir=tmp_path)
    assert records[-1]["step"] == math.ceil(1.5 * per_epoch)

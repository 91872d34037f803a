"""Training loop: exact resume, skipped non-finite steps, configs and tools end to end."""

import json
import math
import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testing_utils import TINY_EGNN_RUN, gmm_setup

from zoo.data import make_split
from zoo.errors import ConfigError
from zoo.experiments import config
from zoo.losses import FlowMatching
from zoo.train import RunSettings, fit, read_log


def _params(model):
    return [np.asarray(a) for a in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))]


def test_resume_continues_exactly(tmp_path):
    _, data, flow = gmm_setup()
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

    _, data, flow = gmm_setup()
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
    _, data, flow = gmm_setup()
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
    _, data, flow = gmm_setup()
    fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_steps=2, batch_size=32, progress=False), workdir=tmp_path)
    _, other, _ = gmm_setup(seed=1)
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
    _, data, flow = gmm_setup()
    loss = NaNOnStep(poison=jnp.asarray(data.train.positions[0]))
    # With batch = whole training set every step is poisoned: parameters never change.
    model, records = fit(flow, data, loss, optax.adam(1e-1), RunSettings(n_steps=3, batch_size=256, progress=False), workdir=tmp_path)
    for a, b in zip(_params(flow), _params(model)):
        np.testing.assert_array_equal(a, b)
    assert all(not r["finite"] for r in records if "finite" in r)
    assert "skipped" in capsys.readouterr().out


def test_forces_required_for_pg_like_losses(tmp_path):
    _, data, flow = gmm_setup()

    class NeedsForces(FlowMatching):
        needs_forces = True

    no_forces = type(data)(make_split(data.train.positions), data.val, data.test)
    with pytest.raises(ValueError, match="forces"):
        fit(flow, no_forces, NeedsForces(), optax.adam(1e-2), RunSettings(n_steps=1, batch_size=32, progress=False), workdir=tmp_path)


def test_nan_in_data_is_named():
    system, data, _ = gmm_setup()
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
    from zoo.experiments.runs import train

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
    from zoo.experiments import runs as experiment

    system, data, flow = gmm_setup()

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
    _, data, flow = gmm_setup()
    per_epoch = len(data.train) // 32
    _, records = fit(flow, data, FlowMatching(), optax.adam(1e-2), RunSettings(n_epochs=1.5, batch_size=32, progress=False), workdir=tmp_path)
    assert records[-1]["step"] == math.ceil(1.5 * per_epoch)


def test_a_second_process_cannot_train_in_a_run_another_holds(tmp_path):
    """The run folder's lock (train.RUN_LOCK): a run another process holds is refused by name; it is
    re-entrant within a process, and fit releases what it claimed when it returns."""
    import subprocess
    import sys

    from zoo import storage, train

    holder = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)"
    proc = subprocess.Popen([sys.executable, "-c", holder, str(tmp_path / train.RUN_LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(train.RunExistsError, match="another process is training"):
            train.claim_run_dir(tmp_path / "checkpoint", resume=True, overwrite=False)
    finally:
        proc.kill()
        proc.wait()
    _, data, flow = gmm_setup()
    settings = RunSettings(n_steps=2, batch_size=32, progress=False, log_every=1)
    fit(flow, data, FlowMatching(), optax.adam(1e-2), settings, workdir=tmp_path)  # the holder is gone
    assert tmp_path.resolve() not in storage.HELD_FOLDERS
    train.claim_run_dir(tmp_path / "checkpoint", resume=True, overwrite=False)
    train.claim_run_dir(tmp_path / "checkpoint", resume=True, overwrite=False)  # re-entrant
    fit(flow, data, FlowMatching(), optax.adam(1e-2), settings.replace(n_steps=3), workdir=tmp_path, resume=True)
    assert tmp_path.resolve() in storage.HELD_FOLDERS  # claimed before fit: kept
    storage.release_folder(tmp_path)


def _particle_setup(n_particles: int = 5, n: int = 96):
    """Random mean-free 3-D particle data and a tiny EGNN flow: an equivariant-OT training problem."""
    from zoo.data import Dataset
    from zoo.fields import EGNNField
    from zoo.flows import CNF, MeanFreeNormal

    rng = np.random.default_rng(0)
    x = rng.normal(size=(3 * n, n_particles, 3)) * np.array([1.0, 0.6, 0.3])
    x = (x - x.mean(axis=1, keepdims=True)).reshape(3 * n, -1).astype(np.float32)
    data = Dataset(train=make_split(x[:n]), val=make_split(x[n : 2 * n]), test=make_split(x[2 * n :]))
    field = EGNNField(n_particles, 3, hidden=8, n_layers=1, key=jax.random.PRNGKey(1))
    return data, CNF(field, MeanFreeNormal(n_particles, 3), n_steps=2)


def test_pairing_prepared_ahead_gives_the_run_without_it(tmp_path):
    """With prepare_ahead the equivariant-OT pairing of step s + 1 runs in a second thread while
    step s trains; the trained weights equal those of the same run paired inside each step."""
    from zoo.losses import EquivariantOTFlowMatching, OTFlowMatching

    data, flow = _particle_setup()
    loss = EquivariantOTFlowMatching(alignment="host")
    assert loss.prepares_ahead and OTFlowMatching().prepares_ahead and not FlowMatching().prepares_ahead
    kwargs = dict(n_steps=4, batch_size=16, accumulation=2, seed=5, progress=False, log_every=1)
    runs = {}
    for ahead in (False, True):
        settings = RunSettings(prepare_ahead=ahead, **kwargs)
        runs[ahead], records = fit(flow, data, loss, optax.adam(1e-2), settings, workdir=tmp_path / str(ahead))
        assert [r["step"] for r in records if "loss" in r] == list(range(1, 5))
    changed = [not np.allclose(a, b) for a, b in zip(_params(flow), _params(runs[True]))]
    assert any(changed), "the runs trained"
    for a, b in zip(_params(runs[False]), _params(runs[True])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs a CPU affinity mask to run on one core")
def test_equivariant_ot_training_on_one_core_finishes(tmp_path):
    """A process allowed one core trains equivariant-OT FM to the end. With the pairing prepared
    ahead there, a batch of 256 hung at step 2 (XLA's CPU client runs one thread; the pairing's
    host callback waited there for its operand while a step was dispatched beside it)."""
    script = textwrap.dedent(
        f"""
        import os
        os.sched_setaffinity(0, {{min(os.sched_getaffinity(0))}})  # before JAX sizes its threads
        import jax, numpy as np, optax
        from zoo.data import Dataset, make_split
        from zoo.fields import EGNNField
        from zoo.flows import CNF, MeanFreeNormal
        from zoo.losses import EquivariantOTFlowMatching
        from zoo.train import RunSettings, fit, read_log
        x = np.random.default_rng(0).normal(size=(768, 5, 3))
        x = (x - x.mean(1, keepdims=True)).reshape(768, 15).astype(np.float32)
        data = Dataset(train=make_split(x[:512]), val=make_split(x[512:640]), test=make_split(x[640:]))
        flow = CNF(EGNNField(5, 3, hidden=8, n_layers=1, key=jax.random.PRNGKey(1)), MeanFreeNormal(5, 3), n_steps=2)
        settings = RunSettings(n_steps=6, batch_size=256, seed=5, progress=False, log_every=1)
        fit(flow, data, EquivariantOTFlowMatching(), optax.adam(1e-2), settings, workdir={str(tmp_path)!r})
        print([r["step"] for r in read_log({str(tmp_path)!r}) if "loss" in r])
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("equivariant-OT training on one core did not finish in 180 s (hung?)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == str(list(range(1, 7)))


def test_the_next_steps_pairing_runs_while_this_step_trains(tmp_path, monkeypatch):
    """A slow preparation overlaps the step: 6 steps whose preparation and update each take 0.15 s
    run in well under the 1.8 s they take one after the other."""
    import time

    _, data, flow = gmm_setup()

    def slow(seconds):
        def sleep_then(x):
            time.sleep(seconds)
            return x

        return lambda x: jax.pure_callback(sleep_then, jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    class SlowPairing(FlowMatching):
        @property
        def prepares_ahead(self):
            return True

        def prepare(self, base, batch, key):
            prepared = super().prepare(base, batch, key)
            return eqx.tree_at(lambda b: b.noise, prepared, slow(0.15)(prepared.noise))

        def __call__(self, model, batch, key):
            loss, aux = super().__call__(model, batch, key)
            waited = slow(0.15)(jax.lax.stop_gradient(loss))
            return loss + 0.0 * jax.lax.stop_gradient(waited), aux

    times = {}
    for ahead in (False, True):
        settings = RunSettings(n_steps=7, batch_size=32, seed=0, progress=False, prepare_ahead=ahead)
        fit(flow, data, SlowPairing(), optax.adam(1e-3), settings, workdir=tmp_path / str(ahead))
        times[ahead] = [r["time_s"] for r in read_log(tmp_path / str(ahead)) if "time_s" in r][-1]
    assert times[False] > 1.7  # six timed steps of 0.3 s
    assert times[True] < 0.75 * times[False], times

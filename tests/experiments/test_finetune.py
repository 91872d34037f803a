"""Fine-tuning (zoo.experiments.finetune, tools/finetune): path gradients from a checkpoint or a
released model, the evaluations before and after, the learning-rate probe, the alanine route."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testing_utils import TINY_EGNN_RUN, gmm_setup


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
    from zoo.experiments.finetune import run_finetuning

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
    from zoo.experiments.finetune import probe_learning_rates
    from zoo.losses import MaximumLikelihood

    _, data, flow = gmm_setup()
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

"""Equal-compute comparisons (zoo.experiments.compare, tools/compare): table, curves and views,
and an interrupted comparison resumed to the same budget."""

import json

import pytest


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

"""Equal-compute comparisons (zoo.experiments.compare, tools/compare): table, curves and views,
and an interrupted comparison resumed to the same budget."""

import json
import shutil

import jax
import pytest


def test_compare_tool_writes_table_curves_and_views(tmp_path, monkeypatch):
    """tools/compare on the GMM from the released gmm_fm (--pretrained): two recipes at one tiny
    budget, table and JSON, curves, and each run's evaluation (under the evaluation bindings,
    reporting progress whatever compare.progress says) and views; its checkpoints carry the
    config, so tools/evaluate can reload them. Every run starts from the released model, which
    is evaluated once per seed and heads the table; a stage's own eval_every sets its tracking
    cadence. (A fresh start: the resume test below.)"""
    from zoo import checkpoint
    from zoo.cli import compare, evaluate
    from zoo.experiments import compare as compare_module
    from zoo.experiments import config
    from zoo.experiments.compare import _tracked
    from zoo.experiments.runs import configured_evaluation_flow
    from zoo.train import read_log

    trained_with = []  # the divergence each stage's fit trains with, and the one the flow has after it
    real_fit = compare_module.fit

    def spy_fit(flow, *args, **kwargs):
        trained_with.append(flow.divergence.name)
        return real_fit(flow, *args, **kwargs)

    monkeypatch.setattr(compare_module, "fit", spy_fit)
    evaluations_report_progress = []  # compare.progress is the training bars only: evaluations report anyway
    real_evaluation = compare_module.evaluation

    def spy_evaluation(*args, **kwargs):
        evaluations_report_progress.append(kwargs["progress"])
        return real_evaluation(*args, **kwargs)

    monkeypatch.setattr(compare_module, "evaluation", spy_evaluation)
    workdir = tmp_path / "cmp"
    compare.main(
        [
            "--gin=gmm_compare.gin",
            f"--workdir={workdir}",
            "--pretrained=gmm_fm",
            "--gin_param=compare.recipes = [@fm_only/Recipe(), @hybrid/Recipe()]",
            "--gin_param=compare.seeds = (0,)",
            "--gin_param=compare.time_budget_s = 2.0",
            "--gin_param=compare.eval_every = 50",
            "--gin_param=fm_half/Stage.eval_every = 3",
            "--gin_param=compare.n_track = 64",
            "--gin_param=evaluation.n_samples = 64",
            "--gin_param=evaluation.n_target = 64",
            "--gin_param=evaluation.divergence = 'hutchinson'",
            "--gin_param=exact_samples.n_train = 256",
            "--gin_param=CNF.n_steps = 4",
            "--gin_param=pg_half/Stage.divergence = 'hutchinson-2-orthogonal'",
        ]
    )
    # The PG stage trains with its own divergence; the next run starts from the flow's (exact) again.
    assert trained_with == ["exact", "exact", "hutchinson-2-orthogonal"]
    assert evaluations_report_progress == [True] * 3
    table = (workdir / "table.md").read_text()
    assert "| FM only |" in table and "hutchinson divergence" in table
    assert "| start: gmm_fm |" in table and "starts from gmm_fm" in table
    summary = json.loads((workdir / "results.json").read_text())
    results = summary["results"]
    assert summary["pretrained"] == "gmm_fm" and summary["complete"] and list(results) == ["start: gmm_fm", "FM only", "hybrid FM -> PG"]
    assert results["start: gmm_fm"][0]["steps"] == 0
    # The evaluation bindings of training runs apply to the comparison's evaluations too.
    assert [(m["divergence"], m["n_samples_q"], m["n_samples_p"]) for ms in results.values() for m in ms] == [("hutchinson", 64, 64)] * 3
    for name in ("kl_vs_time.png", "fm_only_seed0_density.png", "fm_only_seed0_energy_histogram.png", "fm_only_seed0_metrics.json", "start_seed0_metrics.json"):
        assert (workdir / name).is_file(), name

    # Both recipes' curves begin at the released model's tracked metrics (not at a fresh flow's).
    path, _ = config.stored_config("gmm_fm")
    system = config.make_system()
    released = checkpoint.load_checkpoint(path, model_like=config.make_flow(system, key=jax.random.PRNGKey(0))).model
    expected = _tracked(configured_evaluation_flow(released), system, config.make_dataset(system), 64, jax.random.PRNGKey(10_000))
    for name in ("FM only", "hybrid FM -> PG"):
        first = summary["curves"][name][0][0]
        assert first["step"] == 0 and first["nll"] == pytest.approx(expected["nll"], rel=1e-5)
    # FM steps on the GMM are ~1 ms, so the stage tracks several times even on a busy machine.
    stage_evals = [r["step"] for r in read_log(next((workdir / "runs").glob("hybrid*_seed0_stage0"))) if "eval" in r]
    assert stage_evals and all(step % 3 == 0 for step in stage_evals)

    run = next((workdir / "runs").glob("fm_only_seed0_stage0"))
    evaluate.main([str(run / "checkpoint"), f"--workdir={tmp_path / 'eval'}", "--gin_param=evaluation.n_samples = 32", "--gin_param=evaluation.n_target = 32", "--gin_param=evaluation.progress = False"])
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["n_samples_q"] == 32


def test_an_interrupted_comparison_resumes_to_the_same_budget(tmp_path, monkeypatch, capsys):
    """tools/compare killed (Ctrl-C) midway, then run with --resume: each run stops where the
    uninterrupted one does (±1 step); another recipe run into the same workdir joins its table,
    and rows without runs count as an earlier comparison. A fake clock advances one second per
    training step."""
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
    # Another arm into the same workdir (as a second process would run it beside the first): one table.
    run(tmp_path / "b", "--resume", "--gin_param=compare.recipes = [@pg_only/Recipe()]")
    summary = json.loads((tmp_path / "b" / "results.json").read_text())
    assert list(summary["results"]) == ["PG only", "FM only"] and summary["complete"]
    assert summary["results"]["FM only"][0]["steps"] == resumed["steps"]
    assert "| FM only |" in (tmp_path / "b" / "table.md").read_text()
    shutil.copytree(tmp_path / "b" / "rows", tmp_path / "c" / "rows")
    with pytest.raises(SystemExit) as stop:  # rows without runs are an earlier comparison too
        run(tmp_path / "c")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "0 runs in" in err and "2 rows in" in err
    run(tmp_path / "c", "--overwrite")  # replaces them
    assert list(json.loads((tmp_path / "c" / "results.json").read_text())["results"]) == ["FM only"]


def test_a_stage_setting_that_is_no_count_is_refused():
    from zoo.experiments.compare import Stage

    with pytest.raises(ValueError, match="Stage.eval_every"):
        Stage(loss=None, learning_rate=1e-3, eval_every=0)
    with pytest.raises(ValueError, match="Stage.ema_decay"):
        Stage(loss=None, learning_rate=1e-3, ema_decay=1.5)
    with pytest.raises(ValueError, match="Stage.batch_size"):
        Stage(loss=None, learning_rate=1e-3, batch_size=2.5)
    with pytest.raises(ValueError, match="Stage.clip_norm"):
        Stage(loss=None, learning_rate=1e-3, clip_norm=-1.0)
    assert Stage(loss=None, learning_rate=1e-3, accumulation=4, eval_every=3).run_overrides() == {"accumulation": 4, "eval_every": 3}
    with pytest.raises(ValueError, match="Stage.divergence: unknown divergence 'hutchinson-many'"):
        Stage(loss=None, learning_rate=1e-3, divergence="hutchinson-many")


def test_a_resumed_comparison_must_start_where_it_started(tmp_path):
    """start.json: resuming with another pretrained model (or none) is refused by name; the same start passes."""
    from zoo.experiments import config
    from zoo.experiments.compare import _claim_start

    released = {"pretrained": "gmm_fm", "flow": "ab" * 32}
    _claim_start(tmp_path, released, resume=False)
    _claim_start(tmp_path, dict(released), resume=True)
    with pytest.raises(config.ConfigError, match="start from gmm_fm .*not from a fresh initialisation"):
        _claim_start(tmp_path, {"pretrained": None, "flow": None}, resume=True)
    with pytest.raises(config.ConfigError, match="--overwrite"):
        _claim_start(tmp_path, {"pretrained": "gmm_fm", "flow": "cd" * 32}, resume=True)
    _claim_start(tmp_path, {"pretrained": None, "flow": None}, resume=False)  # starting over records the new start
    assert json.loads((tmp_path / "start.json").read_text())["pretrained"] is None


def test_the_table_so_far_names_the_runs_it_lacks(tmp_path):
    """After each run the comparison writes its table: a recipe with some seeds done says how
    many, one with none has no row yet, and results.json says the comparison is incomplete."""
    from zoo.experiments.compare import _save_row, _write_summary

    run = {"nll": 2.0, "ess_q": 0.5, "ess_p": 0.4, "steps": 10, "n_samples_q": 64, "n_samples_p": 32, "seed": 0}
    about = dict(time_budget_s=5.0, seeds=(0, 1), pretrained=None)
    _save_row(tmp_path, "FM only", run, [{"time_s": 0.0, "nll": 3.0}], time_budget_s=5.0)
    table = _write_summary(tmp_path, ["FM only", "PG only"], **about)
    assert "| FM only (1 of 2 seeds so far) | 2 |" in table and "PG only" not in table
    assert "from 64 model samples" in table and (tmp_path / "table.md").read_text() == table
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["complete"] is False and summary["results"] == {"FM only": [run], "PG only": []}
    assert summary["curves"] == {"FM only": [[{"time_s": 0.0, "nll": 3.0}]], "PG only": []}
    _save_row(tmp_path, "FM only", {**run, "nll": 4.0, "seed": 1}, [], time_budget_s=5.0)
    for seed in (0, 1):
        _save_row(tmp_path, "PG only", {**run, "seed": seed}, [], time_budget_s=5.0)
    table = _write_summary(tmp_path, ["FM only", "PG only"], **about)
    assert "| FM only | 3 ± 1.4 |" in table and "| PG only | 2 ± 0 |" in table
    # One seed: the row's own standard error over its samples, not a spread of 0 over one seed.
    (tmp_path / "one").mkdir()
    _save_row(tmp_path / "one", "FM only", {**run, "nll_se": 0.25}, [], time_budget_s=5.0)
    one_seed = _write_summary(tmp_path / "one", ["FM only"], **{**about, "seeds": (0,)})
    assert "| FM only | 2 ± 0.25 | 0.5 | 0.4 | 10 |" in one_seed
    assert json.loads((tmp_path / "results.json").read_text())["complete"] is True


def test_rows_of_other_processes_join_the_table(tmp_path, capsys):
    """Arms run side by side in separate processes (each its own compare.recipes and
    compare.seeds, one workdir): each process's table holds every row finished so far, its own
    recipes first and a start row ahead; rows of another budget stay out, with a note."""
    from zoo.experiments.compare import _save_row, _write_summary

    def row(seed, nll):
        return {"nll": nll, "steps": 10, "n_samples_q": 64, "n_samples_p": 32, "seed": seed}

    _save_row(tmp_path, "start: gmm_fm", row(1, 5.0), None, time_budget_s=5.0)
    _save_row(tmp_path, "FM continued", row(1, 4.0), [{"time_s": 0.0, "nll": 5.0}], time_budget_s=5.0)  # the other process's arm
    _save_row(tmp_path, "PG", row(1, 3.0), [{"time_s": 0.0, "nll": 5.0}], time_budget_s=5.0)
    _save_row(tmp_path, "PG", row(2, 3.5), [{"time_s": 1.0, "nll": 5.0}], time_budget_s=5.0)
    _save_row(tmp_path, "FM continued", row(0, 9.0), [], time_budget_s=60.0)  # an earlier comparison's budget
    table = _write_summary(tmp_path, ["start: gmm_fm", "PG"], time_budget_s=5.0, seeds=(1, 2), pretrained="gmm_fm")
    summary = json.loads((tmp_path / "results.json").read_text())
    assert list(summary["results"]) == ["start: gmm_fm", "PG", "FM continued"]
    assert summary["seeds"] == [1, 2] and summary["complete"] is False
    assert [m["seed"] for m in summary["results"]["PG"]] == [1, 2]
    assert list(summary["curves"]) == ["PG", "FM continued"] and summary["curves"]["PG"][1] == [{"time_s": 1.0, "nll": 5.0}]
    assert "| FM continued (1 of 2 seeds so far) | 4 |" in table and "| PG | 3.25 ± 0.35 |" in table
    assert "budgets [60.0] s" in capsys.readouterr().out


def test_a_comparison_without_seeds_is_refused(tmp_path):
    from zoo.errors import ConfigError
    from zoo.experiments.compare import compare

    with pytest.raises(ConfigError, match="compare.seeds is empty"):
        compare(tmp_path, recipes=[], seeds=(), time_budget_s=1.0)
    assert not list(tmp_path.iterdir())

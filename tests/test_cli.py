"""What every tool shares: one line and exit status 2 for a problem it can name, 130 for
Ctrl-C, a traceback only for bugs; progress a person can read on a terminal and in a log."""

from __future__ import annotations

import errno
import importlib

import pytest

from zoo import progress
from zoo.cli import common
from zoo.errors import EXIT_ERROR, EXIT_INTERRUPTED, ZooError


def _stopped(capsys, run) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stop:
        run()
    return stop.value.code, capsys.readouterr().err


def test_the_tool_wrapper_maps_problems_to_one_line_and_keeps_bugs(capsys):
    def raising(error):
        @common.tool
        def main(argv=None):
            raise error

        return main

    code, err = _stopped(capsys, raising(ZooError("the data set has 3 atoms, the system 22")))
    assert code == EXIT_ERROR and err == "error: the data set has 3 atoms, the system 22\n"
    code, err = _stopped(capsys, raising(OSError(errno.ENOSPC, "No space left on device", "/runs/x/metrics.json")))
    assert code == EXIT_ERROR and err == "error: No space left on device: /runs/x/metrics.json\n"
    code, err = _stopped(capsys, raising(PermissionError(errno.EACCES, "Permission denied", "/ro")))
    assert code == EXIT_ERROR and err == "error: Permission denied: /ro\n"
    gin_wrapped = ZooError("train.n_steps must be an integer >= 1 or None, got -3\n  In call to configurable 'train' (<function train at 0x7f>)")
    code, err = _stopped(capsys, raising(gin_wrapped))
    assert err == "error: train.n_steps must be an integer >= 1 or None, got -3\n"
    code, err = _stopped(capsys, raising(KeyboardInterrupt()))
    assert code == EXIT_INTERRUPTED and "interrupted" in err
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        raising(ZeroDivisionError("bug"))()
    # A ValueError that passed last through zoo's own code (here, train) is a bug too, and keeps its traceback.
    with pytest.raises(ValueError):
        raising(ValueError("bug\n  In call to configurable 'train' (<function train at 0x7f>)"))()


def test_project_errors_share_one_root():
    from zoo import checkpoint, pretrained, storage, train
    from zoo.experiments import config, registry
    from zoo.flows import cnf

    for error in (
        config.ConfigError,
        storage.DatasetError,
        checkpoint.CheckpointError,
        pretrained.DownloadError,
        pretrained.DamagedCacheError,
        cnf.BatchedSolveError,
        train.RunExistsError,
        train.NonFiniteStepError,
        storage.RunStateError,
        registry.UnknownNameError,
    ):
        assert issubclass(error, ZooError), error
    # Callers that caught the builtins before still do.
    assert issubclass(config.ConfigError, ValueError) and issubclass(train.RunExistsError, FileExistsError)
    assert str(registry.UnknownNameError("nothing is registered as 'x'")) == "nothing is registered as 'x'"


def test_unknown_names_are_answered_with_one_kind_of_hint():
    """A misspelt model, registered name and run setting each end with the same suggestion."""
    from zoo.errors import did_you_mean
    from zoo.experiments import registry

    assert did_you_mean("lj13_eqtofm", ["lj13_eqotfm", "dw4_eqotfm", "gmm_fm"]) == " (did you mean 'lj13_eqotfm'?)"
    assert did_you_mean("n_stesp", ["n_steps", "seed"], prefix="train.") == " (did you mean 'train.n_steps'?)"
    assert did_you_mean("zzz", ["n_steps", "seed"]) == ""
    with pytest.raises(registry.UnknownNameError, match=r"nothing is registered as 'EGNNFeld' \(did you mean 'EGNNField'"):
        registry.lookup("EGNNFeld")


# Each tool, given something it cannot use, in-process: (module, argv, words the message must contain).
BAD_INPUTS = [
    ("train", ["--gin=no_such_config.gin", "--workdir={tmp}/w"], "no_such_config"),
    ("evaluate", ["no_such_model", "--workdir={tmp}/w"], "no_such_model"),
    ("sample", ["no_such_model", "--out={tmp}/s.npz"], "no_such_model"),
    ("check_solver", ["no_such_model", "--workdir={tmp}/w"], "no_such_model"),
    ("sample", ["gmm_fm", "--out={tmp}/s.pdb", "--n=4"], "no molecular topology"),
    ("finetune", ["--gin=gmm_pg.gin", "--pretrained=no_such_model", "--workdir={tmp}/w"], "no_such_model"),
    ("compare", ["--gin=no_such_config.gin", "--workdir={tmp}/w"], "no_such_config"),
    # Run settings are one declaration (RunSettings): a misspelt one is named with the closest.
    ("train", ["--gin=gmm_fm.gin", "--workdir={tmp}/w", "--gin_param=train.n_stesp = 5"], "train.n_stesp (did you mean 'train.n_steps'?)"),
    # An optax schedule refusing its bindings (the warm-up is longer than the run) is a config problem.
    ("train", ["--gin=gmm_fm.gin", "--gin=recipe.gin", "--workdir={tmp}/w", "--gin_param=TRAINING_STEPS = 100"], "schedule warmup_cosine_decay_schedule rejected its gin bindings"),
    ("finetune", ["--gin=gmm_pg.gin", "--pretrained=gmm_fm", "--workdir={tmp}/w", "--gin_param=finetune.ema_decy = 0.9"], "finetune.ema_decay"),
    ("compare", ["--gin=gmm_compare.gin", "--workdir={tmp}/w", "--gin_param=compare.n_steps = 5"], "compare.time_budget_s seconds"),
    ("generate_data", ["--gin=no_such_config.gin", "--workdir={tmp}/w"], "no_such_config"),
    ("download", ["no_such_model", "--cache_dir={tmp}/cache"], "no_such_model"),
    ("release_model", ["{tmp}/no_run", "x", "--gin=gin/gmm_fm.gin", "--index={tmp}/models.toml"], "no_run"),
    ("zoo", ["list", "--kind=no_such_kind"], "no_such_kind"),
]


@pytest.mark.parametrize("tool, argv, named", BAD_INPUTS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD_INPUTS)])
def test_every_tool_names_a_problem_in_one_line_with_status_2(tool, argv, named, tmp_path, capsys):
    main = importlib.import_module(f"zoo.cli.{tool}").main
    code, err = _stopped(capsys, lambda: main([a.format(tmp=tmp_path) for a in argv]))
    assert code == EXIT_ERROR, err
    # A pretrained model fetched on first use reports its download before the problem.
    lines = err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("error: "))
    assert all(line.startswith(("zoo: downloading", "  attempt")) for line in lines[:first]), err
    problem = "\n".join(lines[first:])
    assert named in problem and "Traceback" not in err and problem.count("error: ") == 1


@pytest.mark.parametrize("tool", ["train", "evaluate", "sample", "check_solver", "finetune", "compare", "generate_data"])
def test_every_long_running_tool_takes_no_progress(tool, capsys):
    main = importlib.import_module(f"zoo.cli.{tool}").main
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "--no_progress" in capsys.readouterr().out


def test_plain_progress_lines_when_not_a_terminal(capsys):
    """Off a terminal (capsys is not one): whole lines with count, rate, time left and the latest loss."""
    progress.enable()
    bar = progress.bar(100, "training", "step")
    assert isinstance(bar, progress.PlainProgress)
    bar.interval = 0.0
    bar.set_postfix(loss="1.25", refresh=False)
    for _ in range(40):
        bar.update(1)
    bar.write("step 40: evaluation nll=3.1")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert lines[0].startswith("training: 1/100 step (1%)") and "loss=1.25" in lines[0] and "left" in lines[0]
    assert any(line.startswith("training: 40/100 step (40%)") for line in lines)
    assert "step 40: evaluation nll=3.1" in lines


def test_progress_lines_are_spaced_and_can_be_switched_off(capsys):
    progress.enable()
    bar = progress.bar(1000, "sampling", "sample")
    for _ in range(1000):  # well under PLAIN_INTERVAL_S: no line at all
        bar.update(1)
    bar.close()
    assert capsys.readouterr().err == ""
    progress.disable()
    try:
        bar = progress.bar(10, "sampling", "sample")
        bar.interval = 0.0
        bar.update(10)
        bar.write("a message is still shown")
        bar.close()
        assert capsys.readouterr().err == "a message is still shown\n"
    finally:
        progress.enable()


def test_training_off_a_terminal_writes_plain_lines_and_evaluations(tmp_path, capsys, monkeypatch):
    from zoo.cli import train

    monkeypatch.setattr(progress, "PLAIN_INTERVAL_S", 0.0)
    train.main(
        ["--gin=gmm_fm.gin", f"--workdir={tmp_path}", "--gin_param=train.n_steps = 20", "--gin_param=train.eval_every = 10",
         "--gin_param=evaluation.n_samples = 16", "--gin_param=evaluation.n_target = 16"]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "training: 20/20 step (100%)" in err and "loss=" in err
    assert "step 10: evaluation val_fm_loss=" in err and "step 20: evaluation val_fm_loss=" in err


def test_samples_go_to_exactly_the_file_named_and_a_full_disk_is_one_line(tmp_path, capsys):
    """NumPy appends '.npz' to a name without it; tools/sample writes the name given, atomically,
    and a failed write leaves nothing behind."""
    import numpy as np

    from zoo import storage

    out = storage.write_npz(tmp_path / "samples", x=np.arange(3))
    assert out == tmp_path / "samples" and sorted(p.name for p in tmp_path.iterdir()) == ["samples"]
    np.testing.assert_array_equal(np.load(out)["x"], np.arange(3))

    def failing(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "samples"))

    with pytest.raises(OSError):
        storage.write_atomic(tmp_path / "samples", failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]  # the old file intact, no temporary left
    np.testing.assert_array_equal(np.load(out)["x"], np.arange(3))


def test_a_loop_with_long_steps_still_reports_every_interval():
    """A chunk of exact log densities can take minutes: the log gets lines while it runs, and none after close."""
    import io
    import time

    out = io.StringIO()
    bar = progress.PlainProgress(2, "sampling", "sample", interval=0.0, file=out)
    bar.interval = progress.HEARTBEAT_FLOOR_S  # the heartbeat's shortest spacing
    time.sleep(2.6 * progress.HEARTBEAT_FLOOR_S)  # no update: the first chunk is still running
    waiting = out.getvalue().splitlines()
    assert len(waiting) >= 2 and all(line.startswith("sampling: 0/2 sample (0%), ") for line in waiting)
    assert "sample/s" not in waiting[0]  # no rate before anything finished
    bar.update(2)
    bar.close()
    closed = out.getvalue()
    time.sleep(1.5 * progress.HEARTBEAT_FLOOR_S)
    assert out.getvalue() == closed and closed.rstrip().endswith("(finished)")

"""The plots carry what a reader needs: the right lines, labels, legends and markers."""

from __future__ import annotations

import pytest

from zoo.plotting import plots


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions would save, kept for inspection."""
    kept = []

    def keep(fig, path):
        kept.append(fig)
        return path

    monkeypatch.setattr(plots, "save", keep)
    return kept


def _labels(ax):
    return [line.get_label() for line in ax.get_lines()]


def test_fm_loss_curve_draws_training_and_held_out_loss_once_each(figures, tmp_path):
    records = [{"step": 1, "compile_s": 3.0}]
    records += [{"step": s, "time_s": s / 10, "loss": 2.0 / s, "fm_loss": 2.0 / s, "finite": True} for s in range(1, 101, 10)]
    records += [{"step": s, "time_s": s / 10, "eval": {"val_fm_loss": 1.5 / s}} for s in (50, 100)]
    plots.loss_curves(records, tmp_path / "x.png", title="t")
    (ax,) = figures[0].axes
    assert _labels(ax) == ["training loss (FM)", "held-out FM loss"]
    held_out = ax.get_lines()[1]
    assert list(held_out.get_xdata()) == [50, 100] and held_out.get_marker() == "o"
    assert ax.get_xlabel() == "optimiser step" and ax.get_ylabel() == "FM loss" and ax.get_yscale() == "log"
    assert ax.get_legend() is not None


def test_path_gradient_curve_puts_the_held_out_fm_loss_on_its_own_axis(figures, tmp_path):
    records = [{"step": s, "time_s": s, "loss": -30.0 + s, "nll": 18.0} for s in range(1, 6)]
    records += [{"step": 5, "time_s": 5, "eval": {"val_fm_loss": 1.05}}]
    plots.loss_curves(records, tmp_path / "x.png")
    left, right = figures[0].axes
    assert _labels(left) == ["training loss"] and _labels(right) == ["held-out FM loss"]
    assert left.get_yscale() == "linear" and right.get_ylabel() == "held-out FM loss"


def test_compare_curves_show_each_seed_with_markers_and_the_mean(figures, tmp_path):
    run = lambda shift: [{"time_s": t + shift, "nll": 10.0 - t + shift} for t in (0.0, 1.0, 2.0)]  # noqa: E731
    curves = {"fm": {3: run(0.0), 4: run(0.2)}, "otfm": {3: run(0.1), 5: run(0.3)}}
    plots.metric_vs_time(curves, "nll", tmp_path / "x.png", ylabel="NLL", title="GMM: fm, otfm")
    (ax,) = figures[0].axes
    assert _labels(ax) == ["fm, seed 3", "fm, seed 4", "fm, mean of 2 seeds", "otfm, seed 3", "otfm, seed 5", "otfm, mean of 2 seeds"]
    seed_line, mean_line = ax.get_lines()[0], ax.get_lines()[2]
    assert seed_line.get_marker() not in ("", "None") and len(seed_line.get_xdata()) == 3
    assert list(mean_line.get_xdata()) == pytest.approx([0.1, 1.1, 2.1]) and list(mean_line.get_ydata()) == pytest.approx([10.1, 9.1, 8.1])
    assert ax.get_title() == "GMM: fm, otfm" and ax.get_xlabel() == "training time (s)"

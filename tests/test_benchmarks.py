"""The benchmark suite keeps running (its numbers are not tested: they belong to benchmarks/)."""

import pytest

from benchmarks import suite


def _check(results, names):
    assert list(results) == names
    for r in results.values():
        timing = r["timing"]
        assert {"fm", "pg", "sample_hutchinson"} <= set(timing)
        assert all(e["wall_ms"] > 0 and e["rounds"] >= 1 for e in timing.values())
        assert r["pg_over_fm"] > 1  # a PG step solves three ODEs; an FM step evaluates the field once


def test_quick_suite_on_the_2d_model(capsys):
    results = suite.main(["--quick", "--only", "mlp2d"])
    _check(results, ["mlp2d"])
    assert results["mlp2d"]["pg_memory_by_steps"]  # memory against solver steps is measured
    assert "| 2-D GMM, MLP 4×64 | FM step |" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_suite_on_every_case():
    names = list(suite.CASES)
    _check(suite.main(["--quick", "--only", *names]), names)

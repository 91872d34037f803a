"""The benchmark suite keeps running (its numbers are not tested: they belong to benchmarks/)."""

import json

import pytest

from benchmarks import suite


def _check(results, names):
    assert list(results) == names
    for name, r in results.items():
        timing = r["timing"]
        assert {"fm", "pg", "sample_hutchinson"} <= set(timing)
        assert all(e["wall_ms"] > 0 and e["rounds"] >= 1 for e in timing.values())
        assert r["pg_over_fm"] > 1  # a PG step solves three ODEs; an FM step evaluates the field once
        assert ("eqot" in timing) == suite.CASES[name].eqot  # the EQ-OT step where the case asks for it


def test_quick_suite_on_the_2d_model(capsys, tmp_path):
    out = tmp_path / "results.json"
    results = suite.main(["--quick", "--only", "mlp2d", "--out", str(out)])
    _check(results, ["mlp2d"])
    assert results["mlp2d"]["pg_memory_by_steps"]  # memory against solver steps is measured
    assert "| 2-D GMM, MLP 4×64 | FM step |" in capsys.readouterr().out

    # --merge: the cases run now replace theirs; the file's other cases stay, in suite order.
    saved = json.loads(out.read_text())
    saved["results"]["dw4"] = dict(results["mlp2d"], label="an earlier DW4 run", measured={"date": "2026-01-01 00:00", "load_average_1min": [0.0, 0.0]})
    out.write_text(json.dumps(saved))
    rerun = dict(results["mlp2d"], label="a new 2-D run")
    merged = suite.merged({"mlp2d": rerun}, out)
    assert list(merged) == ["mlp2d", "dw4"] and merged["mlp2d"]["label"] == "a new 2-D run"
    text = suite.table(merged, saved["machine"])
    assert "an earlier DW4 run measured 2026-01-01 00:00" in text and "| a new 2-D run | FM step |" in text
    assert "different machines" not in text
    # A kept case from another machine is named with its CPU, and the table warns.
    saved["results"]["dw4"]["measured"]["cpu"] = "Some Other CPU"
    out.write_text(json.dumps(saved))
    text = suite.table(suite.merged({"mlp2d": rerun}, out), saved["machine"])
    assert "Some Other CPU" in text and "different machines" in text


@pytest.mark.slow
def test_quick_suite_on_every_case():
    names = list(suite.CASES)
    _check(suite.main(["--quick", "--only", *names]), names)

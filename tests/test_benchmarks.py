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
        # A wall-clock ratio is the benchmark's number, not the test's: the tiny 2-D model's PG step
        # ran below its FM step once in CI (0.97) on a noisy machine. The work ratio is checked below.
        assert r["pg_over_fm"] > 0
        assert ("eqot" in timing) == suite.CASES[name].eqot  # the EQ-OT step where the case asks for it
        assert timing["fm"]["gflop_per_s"] > 0 and timing["fm"]["of_attainable"] > 0  # FLOP rate against the machine's
        assert timing["pg"]["gflop_per_s"] > 0 and timing["pg"]["of_attainable"] > 0  # every row has a rate
        assert r["pg_over_fm_flops"] > 4 * suite.PG_STEPS  # 4 × 15 stages, each (three solves) more work than an FM step


def test_quick_suite_on_the_2d_model(capsys, tmp_path):
    out = tmp_path / "results.json"
    results = suite.main(["--quick", "--only", "mlp2d", "--out", str(out)])
    _check(results, ["mlp2d"])
    assert results["mlp2d"]["pg_memory_by_steps"]  # memory against solver steps is measured
    printed = capsys.readouterr().out
    assert "| 2-D GMM, MLP 4×64 | FM step |" in printed and "GFLOP/s (share)" in printed and "best float32 matmul" in printed

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


def test_flop_counts_against_formulas():
    """XLA's count of a matmul is 2mkn, a loop body is counted once (which is why benchmarks/flops.py
    multiplies loops out), an MLP field costs its products plus a few operations per unit, and the
    PG stage's parts cost what their forward and reverse passes make them."""
    import jax
    import jax.numpy as jnp

    from benchmarks import flops
    from zoo.fields import MLPField
    from zoo.flows import CNF, StandardNormal

    a, b = jnp.ones((30, 20)), jnp.ones((20, 10))
    assert flops.count_flops(jnp.matmul, a, b) == 2 * 30 * 20 * 10
    looped = flops.count_flops(lambda x, y: jax.lax.fori_loop(0, 10, lambda i, z: z + x @ y, jnp.zeros((30, 10))), a, b)
    assert 2 * 30 * 20 * 10 <= looped < 2 * (2 * 30 * 20 * 10)

    field = MLPField(2, width=64, depth=4, key=jax.random.PRNGKey(0))
    shapes = [layer.weight.shape for layer in field.mlp.layers]
    products = sum(2 * o * i for o, i in shapes)
    units = flops.unit_flops(CNF(field, StandardNormal(2)))
    assert products <= units["field"] <= products + 12 * sum(o for o, _ in shapes)
    assert 2 * units["field"] <= units["fm"] <= 4 * units["field"]  # forward plus a reverse pass
    assert units["field"] < units["stage_hutchinson"] <= units["stage_exact"] <= 4 * units["field"]  # d = 2 JVPs
    assert flops.work_flops(units, "sample_exact", 10, n_steps=20) == units["stage_exact"] * 4 * 20 * 10
    assert flops.work_flops(units, "eqot", 8) == 8 * units["fm"]
    # A PG stage: the inverse's field evaluation, the augmented solve's reverse pass over velocity and
    # divergence (about twice their forward work), the adjoint's reverse pass in parameters and position.
    assert 2 * units["field"] <= units["pg_adjoint"] <= 3 * units["field"]
    assert 1.5 * units["stage_hutchinson"] <= units["pg_augmented"] <= 3 * units["stage_hutchinson"]
    assert units["stage_pg"] == units["field"] + units["pg_augmented"] + units["pg_adjoint"]
    exact_pg = flops.unit_flops(CNF(field, StandardNormal(2)), pg_divergence="exact")
    assert 1.5 * units["stage_exact"] <= exact_pg["pg_augmented"] <= 3 * units["stage_exact"]
    assert flops.work_flops(units, "pg", 8, n_steps=15) == units["stage_pg"] * 4 * 15 * 8
    assert flops.work_flops(units, "unknown", 8) != flops.work_flops(units, "unknown", 8)  # NaN: not counted
    assert flops.product_shapes(field, [5]) == [(5, i, o) for o, i in shapes]
    rate = flops.matmul_rate([(64, 32, 16), (128, 32, 16)], repeats=3, min_seconds=0.001)
    assert rate["best"] == max(rate["by_shape"].values()) > 0


def test_interleaved_rounds_time_a_cheap_call_warm_after_an_expensive_one():
    """A cheap call is timed on its second run in a row, as a training loop runs it, not cold
    after the expensive call before it in the round; an expensive call is timed as it comes."""
    from benchmarks._timing import run_interleaved

    last = {"name": None}

    def fake(name, warm_s, cold_s):
        def call():
            wall = warm_s if last["name"] == name else cold_s
            last["name"] = name
            return wall, wall

        return call

    calls = {"pg": fake("pg", 2.0, 2.5), "fm": fake("fm", 0.04, 0.085)}
    timing = run_interleaved(calls, 3, warmup=1)
    assert timing["fm"]["wall_ms"] == pytest.approx(40.0) and timing["fm"]["rounds"] == 3
    assert timing["pg"]["wall_ms"] == pytest.approx(2500.0)
    assert run_interleaved(calls, 3, warmup=1, settle_below_s=0.0)["fm"]["wall_ms"] == pytest.approx(85.0)

"""ODE solvers and divergence estimators as objects: the same numbers as the names they replace,
settings that combine as documented, and the gin forms of both."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gin
from zoo.experiments import config
from zoo.fields import MLPField
from zoo.flows import CNF, RK4, AdaptiveStep, ExactTrace, FixedStep, Hutchinson, StandardNormal
from zoo.systems import GaussianMixture2D


@pytest.fixture
def field(key):
    return MLPField(3, width=16, depth=2, key=key)


def _log_q(flow, x, seed=0):
    return np.asarray(flow.log_prob(x, key=jax.random.PRNGKey(seed) if flow.needs_key else None))


@pytest.mark.parametrize(
    "named,obj",
    [
        ({"solver": "rk4", "n_steps": 12}, {"solver": FixedStep(RK4(), n_steps=12)}),
        ({"solver": "heun", "n_steps": 9}, {"solver": FixedStep(diffrax.Heun(), n_steps=9)}),
        ({"solver": "dopri5", "rtol": 1e-6, "atol": 1e-7}, {"solver": AdaptiveStep(diffrax.Dopri5(), rtol=1e-6, atol=1e-7)}),
        ({"divergence": "hutchinson", "noise": "gaussian"}, {"divergence": Hutchinson(noise="gaussian")}),
        ({"divergence": "exact", "trace_chunk": 2}, {"divergence": ExactTrace(chunk=2)}),
    ],
)
def test_objects_give_the_numbers_of_the_names_they_replace(field, named, obj):
    x = jax.random.normal(jax.random.PRNGKey(3), (5, 3))
    by_name, by_object = CNF(field, StandardNormal(3), **named), CNF(field, StandardNormal(3), **obj)
    assert by_name.solver == by_object.solver and by_name.divergence == by_object.divergence
    np.testing.assert_array_equal(_log_q(by_name, x), _log_q(by_object, x))


def test_the_solver_describes_itself_in_the_metrics_keys(field):
    fixed = CNF(field, StandardNormal(3), solver=FixedStep("rk4", n_steps=20))
    adaptive = CNF(field, StandardNormal(3), solver="dopri5", rtol=1e-5, atol=1e-6)
    assert fixed.solver.describe() == {"solver": "rk4", "n_solver_steps": 20}
    assert adaptive.solver.describe() == {"solver": "dopri5", "solver_rtol": 1e-5, "solver_atol": 1e-6}
    assert (fixed.divergence.name, CNF(field, StandardNormal(3), divergence="hutchinson").divergence.name) == ("exact", "hutchinson")


def test_a_description_rebuilds_the_flow_it_describes(field):
    """``as_described(other.describe())`` computes log densities as ``other`` does, whatever
    the flow started as; keys that are no setting (a metrics record's counts) or None change nothing."""
    flows = [
        CNF(field, StandardNormal(3), solver=FixedStep("rk4", n_steps=20)),
        CNF(field, StandardNormal(3), solver="dopri5", rtol=1e-5, atol=1e-6, divergence="hutchinson"),
        CNF(field, StandardNormal(3), solver=FixedStep(diffrax.Heun(), n_steps=7)),
    ]
    for start in flows:
        for other in flows:
            rebuilt = start.as_described({**other.describe(), "n_samples_q": 10, "nll": 1.0})
            assert (rebuilt.solver, rebuilt.divergence, rebuilt.describe()) == (other.solver, other.divergence, other.describe())
        assert start.as_described({"nll": 1.0, "solver": None}) is start
    assert flows[0].as_described({"n_solver_steps": 40}).describe() == {"divergence": "exact", "solver": "rk4", "n_solver_steps": 40}


def test_a_short_solver_name_is_the_record_of_the_solver_it_names(field):
    """``parse_solver_name`` (tools/check-solver --solvers) gives the describe() record of the
    solver written out, so ``as_described`` builds that solver; malformed names are refused by name."""
    from zoo.flows.solvers import parse_solver_name

    start = CNF(field, StandardNormal(3), solver=FixedStep("rk4", n_steps=20))
    for name, solver in [
        ("rk4-10", FixedStep("rk4", n_steps=10)),
        ("heun-7", FixedStep(diffrax.Heun(), n_steps=7)),
        ("dopri5-1e-6", AdaptiveStep("dopri5", rtol=1e-6, atol=1e-6)),
        (" tsit5-0.001", AdaptiveStep("tsit5", rtol=1e-3, atol=1e-3)),
    ]:
        assert parse_solver_name(name) == solver.describe()
        assert start.as_described(parse_solver_name(name)).solver == solver
    for bad, message in [
        ("rk4", "METHOD-STEPS"),
        ("rk4-", "METHOD-STEPS"),
        ("rk4-0", "positive whole number of steps"),
        ("rk4-1e-6", "positive whole number of steps"),
        ("dopri5-0", "positive tolerance"),
        ("dopri5-inf", "positive tolerance"),
        ("dopri5-tight", "positive tolerance"),
        ("rk45-20", "unknown method 'rk45'"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_solver_name(bad)


def test_an_adaptive_solve_takes_the_steps_its_tolerance_needs(field):
    """Tighter tolerances take more steps (counted by the solve itself) and agree with fine fixed steps."""
    x = jax.random.normal(jax.random.PRNGKey(4), (3,))
    reference = CNF(field, StandardNormal(3), solver=FixedStep("rk4", n_steps=400)).log_prob_single(x)
    for tol in (1e-3, 1e-7):
        flow = CNF(field, StandardNormal(3), solver=AdaptiveStep("tsit5", rtol=tol, atol=tol))
        # float32: below ~1e-6 relative, rounding over the steps, not the tolerance, sets the error
        assert abs(float(flow.log_prob_single(x) - reference)) < 50 * tol + 1e-5


def test_settings_combine_as_documented(field):
    flow = CNF(field, StandardNormal(3), solver="rk4", n_steps=20, divergence=ExactTrace(chunk=2))
    # Changing one setting keeps the others.
    assert flow.with_settings(n_steps=40).solver == FixedStep("rk4", 40)
    assert flow.with_settings(solver="rk4").solver.n_steps == 20
    assert flow.with_settings(solver="euler").solver == FixedStep(diffrax.Euler(), 20)
    assert flow.with_settings(divergence="exact").divergence == ExactTrace(chunk=2)
    assert flow.with_settings(divergence="hutchinson").divergence == Hutchinson()
    adaptive = flow.with_settings(solver="dopri5", rtol=1e-6)
    assert adaptive.solver == AdaptiveStep("dopri5", rtol=1e-6, atol=AdaptiveStep().atol)
    assert adaptive.with_settings(atol=1e-8).solver == AdaptiveStep("dopri5", rtol=1e-6, atol=1e-8)
    # The released configs' form: a method name with the other policy's settings beside it,
    # which were always ignored (a model trained with RK4-20 evaluated with Dopri5).
    assert CNF(field, StandardNormal(3), solver="dopri5", n_steps=20, rtol=1e-5).solver == AdaptiveStep("dopri5", rtol=1e-5, atol=1e-4)
    assert CNF(field, StandardNormal(3), divergence="exact", noise="gaussian").divergence == ExactTrace()
    # With an object, a setting it does not have is a mistake worth naming.
    with pytest.raises(ValueError, match="n_steps belongs to fixed-step solvers"):
        CNF(field, StandardNormal(3), solver=AdaptiveStep(), n_steps=20)
    with pytest.raises(ValueError, match="rtol, atol and max_steps belong to adaptive solvers"):
        adaptive.with_settings(solver=FixedStep(), rtol=1e-3)
    with pytest.raises(ValueError, match="trace_chunk belongs to the exact trace"):
        CNF(field, StandardNormal(3), divergence=Hutchinson(), trace_chunk=3)
    with pytest.raises(TypeError, match="unknown CNF settings"):
        flow.with_settings(n_step=3)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: FixedStep("rk5"), "unknown ODE method 'rk5'"),
        (lambda: FixedStep("rk4", n_steps=0), "n_steps must be a positive"),
        (lambda: AdaptiveStep("rk4"), "unknown ODE method 'rk4' for AdaptiveStep"),
        (lambda: AdaptiveStep(RK4()), "RK4 has no error estimate"),
        (lambda: AdaptiveStep(diffrax.Euler()), "Euler has no error estimate"),
        (lambda: AdaptiveStep(rtol=0.0), "tolerances must be positive"),
        (lambda: Hutchinson(noise="uniform"), "unknown Hutchinson noise"),
        (lambda: ExactTrace(chunk=0), "trace chunk must be a positive"),
    ],
)
def test_bad_settings_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_gin_builds_both_forms():
    """``CNF.solver = @FixedStep()`` with a registered diffrax method, and the name form."""
    common = """
make_flow.field = @MLPField
MLPField.width = 8
make_flow.flow = @CNF
"""
    objects = """
CNF.solver = @FixedStep()
FixedStep.method = @Midpoint()
FixedStep.n_steps = 7
CNF.divergence = @Hutchinson()
Hutchinson.noise = 'gaussian'
"""
    names = """
CNF.solver = 'midpoint'
CNF.n_steps = 7
CNF.divergence = 'hutchinson'
CNF.noise = 'gaussian'
"""
    flows = []
    for text in (objects, names):
        config.parse(config_str=common + text)
        flows.append(config.make_flow(GaussianMixture2D(), key=jax.random.PRNGKey(0)))
    gin.clear_config()
    assert flows[0].solver == flows[1].solver == FixedStep(diffrax.Midpoint(), 7)
    assert flows[0].divergence == flows[1].divergence == Hutchinson(noise="gaussian")
    x = jnp.ones((2, 2))
    np.testing.assert_array_equal(_log_q(flows[0], x), _log_q(flows[1], x))

"""How a CNF integrates its ODE: a Diffrax method with a step-size policy, as one object.

``FixedStep(method, n_steps)`` takes ``n_steps`` equal steps (the path-gradient paper's RK4
with 15 or 20 steps); ``AdaptiveStep(method, rtol, atol)`` lets a PID controller choose
them. ``method`` is a Diffrax solver instance (``diffrax.Dopri5()``, :class:`RK4`) or its
lower-case name (``'rk4'``, ``'dopri5'``). Both describe themselves in the terms the
metrics record (:meth:`AbstractODESolver.describe`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import numpy as np

_rk4_tableau = diffrax.ButcherTableau(
    a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
    # No embedded method: RK4 is used with constant steps only.
    b_error=np.zeros(4),
    c=np.array([0.5, 0.5, 1.0]),
)


class RK4(diffrax.AbstractERK):
    """The classical fourth-order Runge-Kutta method (fixed steps; 4 evaluations a step)."""

    tableau: ClassVar[diffrax.ButcherTableau] = _rk4_tableau
    interpolation_cls: ClassVar[Callable[..., diffrax.ThirdOrderHermitePolynomialInterpolation]] = (
        diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
    )

    def order(self, terms):
        del terms
        return 4


FIXED_STEP_METHODS: dict[str, type] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "rk4": RK4,
}
#: Methods with an embedded error estimate, which AdaptiveStep needs.
ADAPTIVE_METHODS: dict[str, type] = {
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}


def method_name(method: diffrax.AbstractSolver) -> str:
    """The lower-case name the metrics record for a Diffrax method (``RK4()`` → ``'rk4'``)."""
    return type(method).__name__.lower()


def _method(method, known: dict[str, type], policy: str) -> diffrax.AbstractSolver:
    if isinstance(method, diffrax.AbstractSolver):
        return method
    if isinstance(method, str) and method in known:
        return known[method]()
    raise ValueError(f"unknown ODE method {method!r} for {policy}; give a diffrax solver or one of {sorted(known)}")


class AbstractODESolver(eqx.Module):
    """A Diffrax method and the policy that chooses its steps."""

    method: eqx.AbstractVar[diffrax.AbstractSolver]
    #: Whether the steps depend on the solution (then a batched solve takes its own steps).
    adaptive: eqx.AbstractClassVar[bool]

    @abc.abstractmethod
    def diffeqsolve_options(self, t0: float, t1: float) -> dict:
        """``dt0``, ``stepsize_controller`` and ``max_steps`` for :func:`diffrax.diffeqsolve`."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """How it solved, in the metrics' keys: ``solver`` and ``n_solver_steps`` or ``solver_rtol``/``solver_atol``."""


class FixedStep(AbstractODESolver):
    """``n_steps`` equal steps of ``method`` (default: classical RK4)."""

    adaptive: ClassVar[bool] = False
    method: diffrax.AbstractSolver
    n_steps: int

    def __init__(self, method="rk4", n_steps: int = 15):
        if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive whole number of steps, got {n_steps!r}")
        self.method = _method(method, {**FIXED_STEP_METHODS, **ADAPTIVE_METHODS}, "FixedStep")
        self.n_steps = int(n_steps)

    def diffeqsolve_options(self, t0: float, t1: float) -> dict:
        return {"dt0": (t1 - t0) / self.n_steps, "stepsize_controller": diffrax.ConstantStepSize(), "max_steps": self.n_steps}

    def describe(self) -> dict:
        return {"solver": method_name(self.method), "n_solver_steps": self.n_steps}


class AdaptiveStep(AbstractODESolver):
    """Steps of ``method`` (default Dopri5) chosen by a PID controller to ``rtol``/``atol``.

    A solve that needs more than ``max_steps`` steps fails (NaN, see ``CNF.solve``)."""

    adaptive: ClassVar[bool] = True
    method: diffrax.AbstractSolver
    rtol: float
    atol: float
    max_steps: int

    def __init__(self, method="dopri5", rtol: float = 1e-4, atol: float = 1e-4, max_steps: int = 4096):
        self.method = _method(method, ADAPTIVE_METHODS, "AdaptiveStep")
        if not isinstance(self.method, diffrax.AbstractAdaptiveSolver) or isinstance(self.method, RK4):
            raise ValueError(f"{type(self.method).__name__} has no error estimate to adapt its steps by; use FixedStep")
        if not (rtol > 0 and atol > 0):
            raise ValueError(f"tolerances must be positive, got rtol={rtol!r}, atol={atol!r}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be positive, got {max_steps!r}")
        self.rtol, self.atol, self.max_steps = float(rtol), float(atol), int(max_steps)

    def diffeqsolve_options(self, t0: float, t1: float) -> dict:
        del t0, t1
        return {"dt0": None, "stepsize_controller": diffrax.PIDController(rtol=self.rtol, atol=self.atol), "max_steps": self.max_steps}

    def describe(self) -> dict:
        return {"solver": method_name(self.method), "solver_rtol": self.rtol, "solver_atol": self.atol}


def solver_from_settings(
    solver=None,
    *,
    n_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
    previous: AbstractODESolver | None = None,
) -> AbstractODESolver:
    """An ODE solver from an object or a method name and the loose settings of ``CNF``.

    ``solver`` is an :class:`AbstractODESolver`, a method name or None (keep ``previous``,
    default ``FixedStep()``). The loose settings (``n_steps``, ``rtol``, ``atol``,
    ``max_steps``) override the solver's own. Settings not given are kept from ``previous``
    when it has the same step policy, so ``n_steps = 40`` alone changes only the number of
    steps.

    A method name is the form every released config uses (``CNF.solver = 'dopri5'`` beside
    the training's ``CNF.n_steps = 20``): ``'rk4'``, ``'euler'``, ``'midpoint'``, ``'heun'``
    take fixed steps, ``'dopri5'``, ``'tsit5'``, ``'bosh3'``, ``'dopri8'`` adaptive ones, and
    the settings of the other policy are ignored. With a solver object such a setting is an
    error.
    """
    if isinstance(solver, str):
        adaptive = solver in ADAPTIVE_METHODS
        if not adaptive and solver not in FIXED_STEP_METHODS:
            raise ValueError(
                f"unknown ODE solver {solver!r}; fixed-step: {sorted(FIXED_STEP_METHODS)}, adaptive: {sorted(ADAPTIVE_METHODS)}"
            )
        kept = previous if previous is not None and previous.adaptive == adaptive else None
        # The name becomes the object of its policy with the kept settings; the other policy's
        # loose settings are dropped, as the name form always ignored them.
        if adaptive:
            base = kept or AdaptiveStep()
            solver, n_steps = AdaptiveStep(solver, rtol=base.rtol, atol=base.atol, max_steps=base.max_steps), None
        else:
            solver, rtol, atol, max_steps = FixedStep(solver, n_steps=(kept or FixedStep()).n_steps), None, None, None
    if solver is None:
        solver = previous if previous is not None else FixedStep()
    if not isinstance(solver, AbstractODESolver):
        raise TypeError(f"CNF.solver must be a FixedStep, an AdaptiveStep or a method name, got {solver!r}")
    if isinstance(solver, FixedStep):
        if rtol is not None or atol is not None or max_steps is not None:
            raise ValueError(f"rtol, atol and max_steps belong to adaptive solvers; {method_name(solver.method)} takes fixed steps")
        return solver if n_steps is None else FixedStep(solver.method, n_steps)
    if n_steps is not None:
        raise ValueError(f"n_steps belongs to fixed-step solvers; {method_name(solver.method)} adapts its steps (set rtol/atol)")
    if rtol is None and atol is None and max_steps is None:
        return solver
    return AdaptiveStep(
        solver.method,
        rtol=solver.rtol if rtol is None else rtol,
        atol=solver.atol if atol is None else atol,
        max_steps=solver.max_steps if max_steps is None else max_steps,
    )


def parse_solver_name(name: str) -> dict:
    """A solver written as one short name, as a :meth:`AbstractODESolver.describe` record.

    ``'rk4-20'`` is 20 equal steps of a fixed-step method; ``'dopri5-1e-6'`` is an adaptive
    method with rtol = atol = 1e-6 (the form ``tools/check-solver --solvers`` takes).
    """
    method, sep, setting = name.strip().partition("-")
    if not sep or not setting:
        raise ValueError(f"solver name {name!r}: expected METHOD-STEPS (e.g. 'rk4-20') or METHOD-TOLERANCE (e.g. 'dopri5-1e-6')")
    if method in FIXED_STEP_METHODS:
        if not setting.isdigit() or int(setting) < 1:
            raise ValueError(f"solver name {name!r}: a fixed-step method takes a positive whole number of steps, got {setting!r}")
        return {"solver": method, "n_solver_steps": int(setting)}
    if method in ADAPTIVE_METHODS:
        try:
            tolerance = float(setting)
        except ValueError:
            tolerance = float("nan")
        if not (np.isfinite(tolerance) and tolerance > 0):
            raise ValueError(f"solver name {name!r}: an adaptive method takes a positive tolerance (rtol = atol), got {setting!r}")
        return {"solver": method, "solver_rtol": tolerance, "solver_atol": tolerance}
    raise ValueError(f"solver name {name!r}: unknown method {method!r}; fixed-step: {sorted(FIXED_STEP_METHODS)}, adaptive: {sorted(ADAPTIVE_METHODS)}")

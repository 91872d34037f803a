"""ODE solvers by name, including the classical RK4 the path-gradient paper uses."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import diffrax
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


FIXED_STEP_SOLVERS: dict[str, type] = {
    "euler": diffrax.Euler,
    "midpoint": diffrax.Midpoint,
    "heun": diffrax.Heun,
    "rk4": RK4,
}
ADAPTIVE_SOLVERS: dict[str, type] = {
    "bosh3": diffrax.Bosh3,
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
}


def make_solver(name: str) -> diffrax.AbstractSolver:
    cls = FIXED_STEP_SOLVERS.get(name) or ADAPTIVE_SOLVERS.get(name)
    if cls is None:
        raise ValueError(
            f"unknown ODE solver {name!r}; fixed-step: {sorted(FIXED_STEP_SOLVERS)}, adaptive: {sorted(ADAPTIVE_SOLVERS)}"
        )
    return cls()


def is_adaptive(name: str) -> bool:
    make_solver(name)  # validates the name
    return name in ADAPTIVE_SOLVERS


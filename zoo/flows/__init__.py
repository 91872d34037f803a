"""Flows: base distributions, ODE solvers and the continuous normalizing flow."""

from zoo.flows.base import AbstractBase, MeanFreeNormal, StandardNormal
from zoo.flows.cnf import CNF, Solution, log_prob_chunked, sample_and_log_prob_chunked
from zoo.flows.solvers import RK4, make_solver

__all__ = [
    "AbstractBase",
    "CNF",
    "MeanFreeNormal",
    "RK4",
    "Solution",
    "StandardNormal",
    "log_prob_chunked",
    "make_solver",
    "sample_and_log_prob_chunked",
]

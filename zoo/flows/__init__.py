"""Flows: base distributions, ODE solvers, divergence estimators and the continuous normalizing flow."""

from zoo.flows.base import AbstractBase, MeanFreeNormal, StandardNormal
from zoo.flows.cnf import CNF, Solution, log_prob_chunked, sample_and_log_prob_chunked
from zoo.flows.divergence import AbstractDivergence, ExactTrace, Hutchinson
from zoo.flows.solvers import RK4, AbstractODESolver, AdaptiveStep, FixedStep

__all__ = [
    "AbstractBase",
    "AbstractDivergence",
    "AbstractODESolver",
    "AdaptiveStep",
    "CNF",
    "ExactTrace",
    "FixedStep",
    "Hutchinson",
    "MeanFreeNormal",
    "RK4",
    "Solution",
    "StandardNormal",
    "log_prob_chunked",
    "sample_and_log_prob_chunked",
]

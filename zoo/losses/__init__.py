"""Training losses: flow-matching variants, path gradients, maximum likelihood."""

from zoo.losses.base import AbstractLoss
from zoo.losses.coupling import AbstractCoupling, IndependentCoupling, OTCoupling, exact_assignment, squared_distances
from zoo.losses.equivariant import EquivariantOTCoupling, EquivariantOTFlowMatching, aligned_cost_matrix, linear_assignment
from zoo.losses.fm import FlowMatching, OTFlowMatching, fm_regression
from zoo.losses.pg import MaximumLikelihood, PathGradientForwardKL, PathGradientTerms, grad_log_prob, path_gradient

__all__ = [
    "AbstractCoupling",
    "AbstractLoss",
    "EquivariantOTCoupling",
    "EquivariantOTFlowMatching",
    "FlowMatching",
    "IndependentCoupling",
    "MaximumLikelihood",
    "OTCoupling",
    "OTFlowMatching",
    "PathGradientForwardKL",
    "PathGradientTerms",
    "aligned_cost_matrix",
    "exact_assignment",
    "fm_regression",
    "grad_log_prob",
    "linear_assignment",
    "path_gradient",
    "squared_distances",
]

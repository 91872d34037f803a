"""Training losses: flow-matching variants, path gradients, maximum likelihood."""

from zoo.losses.base import AbstractLoss
from zoo.losses.coupling import exact_assignment, squared_distances
from zoo.losses.equivariant import EquivariantOTFlowMatching, aligned_cost_matrix, linear_assignment
from zoo.losses.fm import FlowMatching, OTFlowMatching, fm_regression

__all__ = [
    "AbstractLoss",
    "EquivariantOTFlowMatching",
    "FlowMatching",
    "OTFlowMatching",
    "aligned_cost_matrix",
    "exact_assignment",
    "fm_regression",
    "linear_assignment",
    "squared_distances",
]

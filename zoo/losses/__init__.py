"""Training losses: flow-matching variants, path gradients, maximum likelihood."""

from zoo.losses.base import AbstractLoss
from zoo.losses.coupling import exact_assignment, squared_distances
from zoo.losses.fm import FlowMatching, OTFlowMatching, fm_regression

__all__ = ["AbstractLoss", "FlowMatching", "OTFlowMatching", "exact_assignment", "fm_regression", "squared_distances"]

"""Target systems: energies in k_B T, forces, exact samplers where they exist."""

from zoo.systems.base import AbstractTarget
from zoo.systems.gmm import GaussianMixture2D

__all__ = ["AbstractTarget", "GaussianMixture2D"]

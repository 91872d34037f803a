"""Target systems: energies in k_B T, forces, exact samplers where they exist."""

from zoo.systems.alanine import AlanineDipeptideClassical, AlanineDipeptideXTB
from zoo.systems.base import AbstractTarget
from zoo.systems.gmm import GaussianMixture2D
from zoo.systems.particles import AbstractParticleSystem, DoubleWell, LennardJones

__all__ = [
    "AbstractParticleSystem",
    "AbstractTarget",
    "AlanineDipeptideClassical",
    "AlanineDipeptideXTB",
    "DoubleWell",
    "GaussianMixture2D",
    "LennardJones",
]

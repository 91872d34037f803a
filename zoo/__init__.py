"""zoo: a JAX model zoo for Boltzmann generators.

Continuous normalizing flows (Diffrax) trained by flow matching and fine-tuned with path
gradients of the forward KL, with the metrics to judge them as samplers.

``import zoo`` exports the public names of the numerical core and the Python API
(``zoo.load(name).sample(n)``). It selects no plotting backend; gin names are registered in
:mod:`zoo.experiments.configurables`, which every config parse imports.
"""

from zoo import _xla  # noqa: E402  (first: XLA flags must be set before JAX starts its backends)
from zoo._version import __version__

_xla.apply()

from zoo.boltzmann import BoltzmannGenerator, load  # noqa: E402
from zoo.data import Batch, Dataset, Split  # noqa: E402
from zoo.experiments import configurables  # noqa: E402,F401  (the names gin configs use)
from zoo.fields import AbstractVectorField, EGNNField, MLPField  # noqa: E402
from zoo.flows import CNF, MeanFreeNormal, StandardNormal  # noqa: E402
from zoo.losses import (  # noqa: E402
    AbstractCoupling,
    AbstractLoss,
    EquivariantOTCoupling,
    EquivariantOTFlowMatching,
    FlowMatching,
    IndependentCoupling,
    MaximumLikelihood,
    OTCoupling,
    OTFlowMatching,
    PathGradientForwardKL,
)
from zoo.metrics import reweight  # noqa: E402
from zoo.systems import AbstractTarget, AlanineDipeptideClassical, AlanineDipeptideXTB, DoubleWell, GaussianMixture2D, LennardJones  # noqa: E402

__all__ = [
    "CNF",
    "AbstractCoupling",
    "AbstractLoss",
    "AbstractTarget",
    "AbstractVectorField",
    "AlanineDipeptideClassical",
    "AlanineDipeptideXTB",
    "Batch",
    "BoltzmannGenerator",
    "Dataset",
    "DoubleWell",
    "EGNNField",
    "EquivariantOTCoupling",
    "EquivariantOTFlowMatching",
    "FlowMatching",
    "GaussianMixture2D",
    "IndependentCoupling",
    "LennardJones",
    "MLPField",
    "MaximumLikelihood",
    "MeanFreeNormal",
    "OTCoupling",
    "OTFlowMatching",
    "PathGradientForwardKL",
    "Split",
    "StandardNormal",
    "__version__",
    "load",
    "reweight",
]

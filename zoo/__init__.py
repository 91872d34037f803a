"""zoo: a JAX model zoo for Boltzmann generators.

Continuous normalizing flows (Diffrax) trained by flow matching and fine-tuned with path
gradients of the forward KL, with the metrics to judge them as samplers.
"""

__version__ = "0.1.0"

from zoo import _xla  # noqa: E402  (first: XLA flags must be set before JAX starts its backends)

_xla.apply()

from zoo import data, fields, flows, losses, metrics, optim, systems  # noqa: E402  (registration side effects)
from zoo import ad2_data, ad2_generate  # noqa: E402,F401  (registers the AD2 data sets and their generators)
from zoo import generate, mcmc, storage  # noqa: E402,F401  (MCMC data sets; registers generate_data)
from zoo import importing  # noqa: E402,F401  (registers imported_dataset)
from zoo.data import Batch, Dataset, Split  # noqa: E402
from zoo.fields import AbstractVectorField, MLPField  # noqa: E402
from zoo.flows import CNF, MeanFreeNormal, StandardNormal  # noqa: E402
from zoo.losses import AbstractLoss, FlowMatching, OTFlowMatching  # noqa: E402
from zoo.systems import AbstractTarget, GaussianMixture2D  # noqa: E402
from zoo import compare, experiment, finetune  # noqa: E402,F401  (the gin roots: train, evaluation, finetune, compare)
from zoo.boltzmann import BoltzmannGenerator, load  # noqa: E402  (the Python API: zoo.load(name).sample(n))
from zoo.metrics import reweight  # noqa: E402

"""Every component of the numerical core that a gin file can name, registered in one place.

The core (``systems``, ``fields``, ``flows``, ``losses``, ``metrics``, ``data``) knows nothing of
gin: its classes and functions are plain Python. This module, part of the experiments layer,
is the only place that makes them nameable from a config (``@EGNNField()``,
``train.loss = @OTFlowMatching()``) and records their kind for ``tools/zoo list``. The names
are stable and module-free, so released checkpoints' stored configs keep resolving wherever
the code lives.
"""

from __future__ import annotations

import optax

from zoo import data, losses, metrics
from zoo.data import importing
from zoo.experiments.registry import register_external
from zoo.fields import EGNNField, MLPField
from zoo.flows import CNF, AdaptiveStep, ExactTrace, FixedStep, Hutchinson, MeanFreeNormal, StandardNormal
from zoo.flows.solvers import ADAPTIVE_METHODS, FIXED_STEP_METHODS
from zoo.systems import AlanineDipeptideClassical, AlanineDipeptideXTB, DoubleWell, GaussianMixture2D, LennardJones

OPTIMIZERS = ("adam", "adamw", "sgd", "lamb", "rmsprop", "lion")
SCHEDULES = (
    "constant_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "exponential_decay",
    "linear_schedule",
    "piecewise_constant_schedule",
)

_CORE = {
    "system": (GaussianMixture2D, LennardJones, DoubleWell, AlanineDipeptideClassical, AlanineDipeptideXTB),
    "dataset": (data.exact_samples, data.stored_dataset, importing.imported_dataset),
    "base": (StandardNormal, MeanFreeNormal),
    "field": (MLPField, EGNNField),
    "flow": (CNF,),
    "solver": (FixedStep, AdaptiveStep),
    "divergence": (ExactTrace, Hutchinson),
    "loss": (losses.FlowMatching, losses.OTFlowMatching, losses.EquivariantOTFlowMatching, losses.PathGradientForwardKL, losses.MaximumLikelihood),
    "coupling": (losses.IndependentCoupling, losses.OTCoupling, losses.EquivariantOTCoupling),
    "metric": (metrics.ess_q, metrics.ess_p, metrics.ess_q_se, metrics.ess_p_se, metrics.nll, metrics.nll_se, metrics.kl_exact),
}


def register_core() -> None:
    """Register the core components, optax's optimisers and schedules, and diffrax's methods.

    Idempotent: registering the same object under the same name again is a no-op.
    """
    for kind, objects in _CORE.items():
        for obj in objects:
            register_external(obj, kind=kind)
    for name in OPTIMIZERS:
        register_external(getattr(optax, name), kind="optimizer", name=name)
    for name in SCHEDULES:
        register_external(getattr(optax, name), kind="schedule", name=name)
    for name, cls in {**FIXED_STEP_METHODS, **ADAPTIVE_METHODS}.items():
        policy = "FixedStep" if name in FIXED_STEP_METHODS else "AdaptiveStep"
        register_external(cls, kind="method", name=cls.__name__, summary=f"diffrax method '{name}' ({policy}.method = @{cls.__name__}())")


register_core()

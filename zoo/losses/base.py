"""The interface every training loss implements."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx

from zoo._types import Array, PRNGKeyArray, Scalar
from zoo.data import Batch


class AbstractLoss(eqx.Module):
    """``loss(model, batch, key) -> (scalar, aux)``; the gradient of the scalar is the update.

    For surrogate losses (path gradients) the scalar's *value* is not the objective; ``aux``
    carries the numbers worth logging. ``needs_forces`` says whether batches must carry
    target forces.
    """

    needs_forces: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, model, batch: Batch, key: PRNGKeyArray) -> tuple[Scalar, dict[str, Array]]:
        ...

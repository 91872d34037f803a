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

    @property
    def prepares_ahead(self) -> bool:
        """Whether :meth:`prepare` does work worth running ahead of the step."""
        return False

    def prepare(self, base, batch: Batch, key: PRNGKeyArray) -> Batch:
        """The part of the loss that needs neither the parameters nor their gradients.

        ``loss(model, prepare(model.base, batch, key), key)`` equals ``loss(model, batch, key)``;
        the training loop runs it for the next step while the current one trains
        (:class:`~zoo.train.RunSettings` ``prepare_ahead``). By default there is nothing to do.
        """
        del base, key
        return batch

    @abc.abstractmethod
    def __call__(self, model, batch: Batch, key: PRNGKeyArray) -> tuple[Scalar, dict[str, Array]]:
        ...

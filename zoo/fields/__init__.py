"""Vector fields v_θ(t, x)."""

from zoo.fields.base import AbstractVectorField
from zoo.fields.egnn import EGNNField
from zoo.fields.mlp import MLPField

__all__ = ["AbstractVectorField", "EGNNField", "MLPField"]

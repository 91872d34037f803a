"""Optax optimisers and schedules, registered with gin under their optax names."""

from __future__ import annotations

import optax

from zoo.registry import register_external

for _name in ("adam", "adamw", "sgd", "lamb", "rmsprop", "lion"):
    register_external(getattr(optax, _name), kind="optimizer", name=_name)

for _name in (
    "constant_schedule",
    "cosine_decay_schedule",
    "warmup_cosine_decay_schedule",
    "exponential_decay",
    "linear_schedule",
    "piecewise_constant_schedule",
):
    register_external(getattr(optax, _name), kind="schedule", name=_name)


def with_clipping(optimizer: optax.GradientTransformation, clip_norm: float | None) -> optax.GradientTransformation:
    """Clip the (accumulated) gradient to a global norm before the optimiser sees it."""
    if clip_norm is None:
        return optimizer
    if clip_norm <= 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), optimizer)

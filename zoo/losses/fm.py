r"""Flow-matching losses: standard (random pairing) and OT (exact batch assignment).

Interpolant between $x_0 \sim q_0$ and data $x_1$, $t \sim U[0, 1]$ (Lipman et al. 2023 with
an optional Gaussian smoothing σ as in the molecular references):

$$x_t = (1 - (1 - σ_{min})t)\,x_0 + t\,x_1 + σ ε, \qquad u_t = x_1 - (1 - σ_{min})\,x_0,$$

loss $\mathrm{mean}\,(v_θ(t, x_t) - u_t)^2$ over the batch *and* the coordinates (the MSE
the references report). ε is drawn from the flow's base, so it is mean-free for
particle systems.
"""

from __future__ import annotations

import equinox as eqx
import jax

from zoo._types import Array, PRNGKeyArray
from zoo.data import Batch
from zoo.losses.base import AbstractLoss
from zoo.losses.chunked import chunked_squared_error, resolve_chunk_size
from zoo.losses.coupling import exact_assignment, squared_distances


def fm_regression(
    model, x0: Array, x1: Array, key: PRNGKeyArray, *, sigma_min: float, sigma: float, chunk_size: int | None = None
) -> Array:
    """The flow-matching MSE for given pairs (x0[i], x1[i]).

    ``chunk_size`` samples (at most; a divisor of b) are evaluated and differentiated at a time, see
    :func:`zoo.losses.chunked.chunked_squared_error`; None asks the field
    (``field.train_chunk_size(b)``), else the whole batch is one chunk.
    """
    t_key, eps_key = jax.random.split(key)
    b = x1.shape[0]
    t = jax.random.uniform(t_key, (b, 1), dtype=x1.dtype)
    xt = (1.0 - (1.0 - sigma_min) * t) * x0 + t * x1
    if sigma > 0:
        xt = xt + sigma * model.base.sample(eps_key, b).astype(x1.dtype)
    ut = x1 - (1.0 - sigma_min) * x0
    chunk_size = resolve_chunk_size(b, chunk_size, model.field.train_chunk_size(b))
    return chunked_squared_error(model.field, t[:, 0], xt, ut, chunk_size)


class FlowMatching(AbstractLoss):
    """Standard flow matching: noise and data paired at random (Lipman et al. 2023)."""

    sigma_min: float = eqx.field(static=True, default=0.0)
    sigma: float = eqx.field(static=True, default=0.0)
    #: Samples evaluated at a time (a divisor of the batch size); None: the field's choice.
    chunk_size: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if not (0.0 <= self.sigma_min < 1.0) or self.sigma < 0:
            raise ValueError(f"need 0 <= sigma_min < 1 and sigma >= 0, got {self.sigma_min}, {self.sigma}")

    def pair(self, x0: Array, x1: Array, key: PRNGKeyArray, *, base=None) -> tuple[Array, Array]:
        """Reorder (or align) the noise x0 to pair it with the data x1 (identity: independent coupling).

        ``base`` is the flow's base distribution, for couplings that need the particle shape.
        """
        del key, base
        return x0, x1

    def __call__(self, model, batch: Batch, key: PRNGKeyArray):
        x1 = batch.x
        noise_key, pair_key, fm_key = jax.random.split(key, 3)
        x0 = model.base.sample(noise_key, x1.shape[0]).astype(x1.dtype)
        x0, x1 = self.pair(x0, x1, pair_key, base=model.base)
        loss = fm_regression(
            model, x0, x1, fm_key, sigma_min=self.sigma_min, sigma=self.sigma, chunk_size=self.chunk_size
        )
        return loss, {"fm_loss": loss}


class OTFlowMatching(FlowMatching):
    """OT flow matching (Tong et al. 2023): exact assignment of noise to data per batch, squared Euclidean cost."""

    def pair(self, x0: Array, x1: Array, key: PRNGKeyArray, *, base=None) -> tuple[Array, Array]:
        del key, base
        perm = exact_assignment(jax.lax.stop_gradient(squared_distances(x0, x1)))
        return x0[perm], x1

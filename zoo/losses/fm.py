r"""Flow matching with a coupling of noise and data: standard (independent), OT, equivariant OT.

Interpolant between $x_0 \sim q_0$ and data $x_1$, $t \sim U[0, 1]$ (Lipman et al. 2023 with
an optional Gaussian smoothing σ as in the molecular references):

$$x_t = (1 - (1 - σ_{min})t)\,x_0 + t\,x_1 + σ ε, \qquad u_t = x_1 - (1 - σ_{min})\,x_0,$$

loss $\mathrm{mean}\,(v_θ(t, x_t) - u_t)^2$ over the batch *and* the coordinates (the MSE
the references report). ε is drawn from the flow's base, so it is mean-free for
particle systems. How x0 and x1 are paired is the loss's ``coupling``
(:mod:`zoo.losses.coupling`); ``OTFlowMatching`` and ``EquivariantOTFlowMatching`` are
``FlowMatching`` with the OT and equivariant-OT couplings, under the names the released
configs use.
"""

from __future__ import annotations

import equinox as eqx
import jax

from zoo._types import Array, PRNGKeyArray
from zoo.data import Batch
from zoo.losses.base import AbstractLoss
from zoo.losses.chunked import chunked_squared_error, resolve_chunk_size
from zoo.losses.coupling import AbstractCoupling, IndependentCoupling, OTCoupling


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
    """Flow matching on the pairs ``coupling`` makes of noise and data; by default the
    independent coupling (standard flow matching, Lipman et al. 2023)."""

    sigma_min: float = eqx.field(static=True, default=0.0)
    sigma: float = eqx.field(static=True, default=0.0)
    #: Samples evaluated at a time (a divisor of the batch size); None: the field's choice.
    chunk_size: int | None = eqx.field(static=True, default=None)
    coupling: AbstractCoupling = eqx.field(default_factory=IndependentCoupling)

    def __check_init__(self):
        if not (0.0 <= self.sigma_min < 1.0) or self.sigma < 0:
            raise ValueError(f"need 0 <= sigma_min < 1 and sigma >= 0, got {self.sigma_min}, {self.sigma}")
        if not isinstance(self.coupling, AbstractCoupling):
            raise TypeError(f"coupling must be a zoo.losses.coupling.AbstractCoupling, got {type(self.coupling).__name__}")

    def pair(self, x0: Array, x1: Array, key: PRNGKeyArray, *, base=None) -> tuple[Array, Array]:
        """The noise x0 paired with the data x1 by this loss's coupling (``base``: the flow's base)."""
        return self.coupling(x0, x1, key, base=base)

    @property
    def prepares_ahead(self) -> bool:
        # Drawing independent noise is nothing to run ahead; an OT pairing is.
        return not isinstance(self.coupling, IndependentCoupling)

    def prepare(self, base, batch: Batch, key: PRNGKeyArray) -> Batch:
        """The batch with its noise drawn from ``base`` and paired with the data by the coupling."""
        noise_key, pair_key, _ = jax.random.split(key, 3)
        x0 = base.sample(noise_key, batch.x.shape[0]).astype(batch.x.dtype)
        x0, x1 = self.pair(x0, batch.x, pair_key, base=base)
        return Batch(x=x1, forces=batch.forces, noise=x0)

    def __call__(self, model, batch: Batch, key: PRNGKeyArray):
        if batch.noise is None:
            batch = self.prepare(model.base, batch, key)
        fm_key = jax.random.split(key, 3)[2]
        loss = fm_regression(
            model, batch.noise, batch.x, fm_key, sigma_min=self.sigma_min, sigma=self.sigma, chunk_size=self.chunk_size
        )
        return loss, {"fm_loss": loss}


class OTFlowMatching(FlowMatching):
    """OT flow matching (Tong et al. 2023): ``FlowMatching(coupling=OTCoupling())``, the exact
    assignment of noise to data per batch for the squared Euclidean cost."""

    def __init__(self, sigma_min: float = 0.0, sigma: float = 0.0, chunk_size: int | None = None):
        self.sigma_min, self.sigma, self.chunk_size = sigma_min, sigma, chunk_size
        self.coupling = OTCoupling()

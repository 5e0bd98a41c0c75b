"""A richer posterior: state-dependent (autoregressive) transitions, optionally non-Gaussian.

The GRU guide's force depends on the data only. Here the force also depends on the sampled
state, through a small MLP::

    (u, r) = MLP([h_t, z_{t-1}, v_{t-1}])
    q(v_t | z_{t-1}, v_{t-1}, h_t) = Normal(prior_loc + u, prior_scale * exp(r))

so the guide can correct the prior dynamics differently in different parts of latent space (a
nonlinear Gaussian autoregressive posterior). ``h_t`` comes from a bidirectional GRU. With
``flow=True`` the standardised noise of each step goes through a learned monotonic rational-
quadratic spline (``pyro.distributions.transforms.Spline``, shared over steps, initialised to the
identity) before the affine map, so the per-step law is non-Gaussian::

    v_t = loc + scale * spline(eps),   eps ~ Normal(0, I)

The KL of that law to the prior transition has no closed form; ``TraceMeanField_ELBO`` then falls
back to the Monte Carlo estimate ``log q - log p`` for those sites (``fit`` works unchanged).
The last MLP layer is zero-initialised, so ``q`` starts equal to the prior.
"""

from __future__ import annotations

import math
from typing import Optional

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch

from pyro_langevin.guides.base import EncoderGuide, ForceHead, shifted_prior
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.transition import TransitionOutput

__all__ = ["AutoregressiveGuide"]


def _identity_spline(dim: int, count_bins: int, bound: float) -> T.Spline:
    """A quadratic ``Spline`` transform that starts as the identity map."""
    spline = T.Spline(dim, count_bins=count_bins, bound=bound, order="quadratic")
    with torch.no_grad():
        spline.unnormalized_widths.zero_()
        spline.unnormalized_heights.zero_()
        # derivative = 1e-3 (pyro's floor) + softplus(u) = 1 at every knot
        spline.unnormalized_derivatives.fill_(math.log(math.expm1(1.0 - 1e-3)))
    return spline


class AutoregressiveGuide(EncoderGuide):
    """Bidirectional-GRU guide whose per-step force is an MLP of the data features and the state.

    Parameters
    ----------
    model : LangevinFlow
        The model (held by reference).
    n_heldin : int
        Neurons the guide reads.
    hidden : int
        GRU state size per direction.
    mlp_hidden : int
        Width of the force MLP's hidden layer.
    flow : bool
        Make each step's law non-Gaussian with a learned spline of the standardised noise.
    count_bins, bound : int, float
        Spline options (bins in ``[-bound, bound]``; identity outside).
    dropout : float
        Dropout on the GRU inputs and outputs.
    """

    def __init__(
        self,
        model: LangevinFlow,
        n_heldin: int,
        hidden: int = 64,
        mlp_hidden: int = 64,
        flow: bool = False,
        count_bins: int = 8,
        bound: float = 3.0,
        dropout: float = 0.05,
    ) -> None:
        super().__init__(model, n_heldin, hidden, bidirectional=True, dropout=dropout)
        d = model.latent_dim
        self.force_head = ForceHead(self.encoder.out_features + 2 * d, d, hidden=mlp_hidden)
        self.spline = _identity_spline(d, count_bins, bound) if flow else None

    def step(
        self, t: int, z: torch.Tensor, v: torch.Tensor, prior: TransitionOutput, ctx: tuple[torch.Tensor, torch.Tensor]
    ) -> Optional[dist.Distribution]:
        h = ctx[0][:, t]
        # under a draws plate z and v carry a leading draws dimension that the data features lack
        h = h.expand(*z.shape[:-1], h.shape[-1])
        force, log_scale = self.force_head(torch.cat([h, z, v], dim=-1))
        if self.spline is None:
            return shifted_prior(prior, force, log_scale)
        loc = prior.v_loc + force
        scale = prior.v_scale * torch.exp(log_scale)
        base = dist.Normal(torch.zeros_like(loc), torch.ones_like(loc))
        return dist.TransformedDistribution(base, [self.spline, T.AffineTransform(loc, scale)]).to_event(1)

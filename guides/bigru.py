"""Bidirectional GRU guide: the GRU guide's per-step stochastic force, read from both directions.

``h_t`` concatenates a forward GRU state (bins ``0..t``) and a backward GRU state (bins
``t..T-1``), so each step's posterior sees the whole trial (smoothing rather than filtering)::

    q(v_t | z_{t-1}, v_{t-1}, h_t) = Normal(prior_loc + u(h_t), prior_scale * exp(r(h_t)))

with ``u``, ``r`` linear and zero-initialised; ``q(z_0, v_0)`` reads both directions' last states.
Forward bins (no data) use the prior transition.
"""

from __future__ import annotations

from typing import Optional

import pyro.distributions as dist
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.guides.base import EncoderGuide, ForceHead, shifted_prior
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.transition import TransitionOutput

__all__ = ["BiGRUGuide"]


class BiGRUGuide(EncoderGuide):
    """Amortized guide with a bidirectional GRU encoder and a linear learned force per step.

    Parameters
    ----------
    model : LangevinFlow
        The model (held by reference).
    n_heldin : int
        Neurons the guide reads.
    hidden : int
        GRU state size per direction.
    dropout : float
        Dropout on the GRU inputs and outputs.
    """

    def __init__(self, model: LangevinFlow, n_heldin: int, hidden: int = 64, dropout: float = 0.05) -> None:
        super().__init__(model, n_heldin, hidden, bidirectional=True, dropout=dropout)
        self.force_head = ForceHead(self.encoder.out_features, model.latent_dim)

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        h, h_ic = self.encoder(batch)
        return (h, h_ic, *self.force_head(h))  # forces of all bins in one call

    def step(
        self, t: int, z: torch.Tensor, v: torch.Tensor, prior: TransitionOutput, ctx: tuple[torch.Tensor, ...]
    ) -> Optional[dist.Distribution]:
        _, _, force, log_scale = ctx
        return shifted_prior(prior, force[:, t], log_scale[:, t])

"""The amortized GRU guide (the LangevinFlow paper's recurrent encoder), done right.

A GRU reads the held-in spikes, each bin once and in order (no lag: the state ``h_t`` used for
``v_t`` has read bins ``0..t``). The initial state posterior ``q(z_0, v_0)`` comes from a backward
GRU over the whole trial (default) or from the forward GRU's first state. Each step's posterior is
the prior transition plus a learned stochastic force::

    q(v_t | z_{t-1}, v_{t-1}, h_t) = Normal(prior_loc + u(h_t), prior_scale * exp(r(h_t)))

with ``u`` and ``r`` zero-initialised, so ``q`` starts equal to the prior. Forward bins (no data)
use the prior transition itself.
"""

from __future__ import annotations

from typing import Literal, Optional

import pyro.distributions as dist
import torch

from pyro_langevin.batch import Batch
from pyro_langevin.guides.base import ForceHead, GRUEncoder, InitialStateHead, StepwiseGuide, shifted_prior
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.transition import TransitionOutput

__all__ = ["GRUGuide"]


class GRUGuide(StepwiseGuide):
    """Amortized guide over ``z_0``, ``v_0`` and every ``v_t`` of a :class:`LangevinFlow` model.

    Parameters
    ----------
    model : LangevinFlow
        The model whose prior transition the guide builds on (held by reference, not as a
        submodule, so its parameters are not duplicated).
    n_heldin : int
        Neurons the guide reads.
    hidden : int
        GRU state size.
    initial_state : {"backward", "first"}
        Where ``q(z_0, v_0)`` reads from: a backward GRU over the trial, or the forward GRU's
        first state ``h_0``.
    dropout : float
        Dropout on the GRU inputs and states.
    """

    deterministic_prepare = True
    supports_draws_plate = True

    def __init__(
        self,
        model: LangevinFlow,
        n_heldin: int,
        hidden: int = 64,
        initial_state: Literal["backward", "first"] = "backward",
        dropout: float = 0.05,
    ) -> None:
        super().__init__(model)
        if initial_state not in ("backward", "first"):
            raise ValueError(f"initial_state must be 'backward' or 'first', got {initial_state!r}")
        self.n_heldin, self.hidden = n_heldin, hidden
        self.initial_state = initial_state
        self.encoder = GRUEncoder(n_heldin, hidden, bidirectional=False, dropout=dropout)
        self.ic_encoder = (
            GRUEncoder(n_heldin, hidden, bidirectional=False, dropout=dropout, reverse=True)
            if initial_state == "backward" else None
        )
        self.initial_head = InitialStateHead(hidden, model.latent_dim)
        self.force_head = ForceHead(hidden, model.latent_dim)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """GRU features: per-bin states (trial, T, hidden) and the initial-state summary (trial, hidden)."""
        h, _ = self.encoder(batch)
        h_ic = self.ic_encoder(batch)[1] if self.ic_encoder is not None else h[:, 0]
        return h, h_ic

    def prepare(self, batch: Batch) -> tuple[torch.Tensor, ...]:
        h, h_ic = self.encode(batch)
        return (h_ic, *self.force_head(h))  # forces of all bins in one call

    def initial(self, ctx: tuple[torch.Tensor, ...], batch: Batch) -> tuple[dist.Distribution, dist.Distribution]:
        return self.initial_head(ctx[0])

    def step(
        self, t: int, z: torch.Tensor, v: torch.Tensor, prior: TransitionOutput, ctx: tuple[torch.Tensor, ...]
    ) -> Optional[dist.Distribution]:
        _, force, log_scale = ctx
        return shifted_prior(prior, force[:, t], log_scale[:, t])

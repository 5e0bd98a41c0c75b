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

from typing import Literal

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_langevin.batch import Batch
from pyro_langevin.models.langevin_flow import LangevinFlow, velocity_site

__all__ = ["GRUGuide"]


class GRUGuide(nn.Module):
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
        Where ``q(z_0, v_0)`` reads from: a backward GRU over the trial, or ``h_0``.
    dropout : float
        Dropout on the GRU inputs and states.
    """

    def __init__(
        self,
        model: LangevinFlow,
        n_heldin: int,
        hidden: int = 64,
        initial_state: Literal["backward", "first"] = "backward",
        dropout: float = 0.05,
    ) -> None:
        super().__init__()
        if initial_state not in ("backward", "first"):
            raise ValueError(f"initial_state must be 'backward' or 'first', got {initial_state!r}")
        self.__dict__["prior"] = model  # plain attribute: not a submodule
        self.n_heldin = n_heldin
        self.initial_state = initial_state
        d = model.latent_dim
        self.dropout = nn.Dropout(dropout)
        self.gru = nn.GRU(n_heldin, hidden, batch_first=True)
        self.ic_gru = nn.GRU(n_heldin, hidden, batch_first=True) if initial_state == "backward" else None
        self.ic_net = nn.Linear(hidden, 4 * d)
        self.force_net = nn.Linear(hidden, 2 * d)
        nn.init.zeros_(self.force_net.weight)
        nn.init.zeros_(self.force_net.bias)
        with torch.no_grad():  # q(z_0, v_0) starts at N(0, I): loc 0, scale softplus(0.5413) = 1
            self.ic_net.weight.mul_(0.1)
            self.ic_net.bias.zero_()
            self.ic_net.bias[2 * d:].fill_(0.5413)

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """GRU features: per-bin states (trial, T, hidden) and the initial-state summary (trial, hidden)."""
        if batch.n_heldin != self.n_heldin:
            raise ValueError(f"guide reads {self.n_heldin} held-in neurons, batch has {batch.n_heldin}")
        x = self.dropout(torch.log1p(batch.input))
        h, _ = self.gru(x)
        h = self.dropout(h)
        if self.ic_gru is not None:
            _, h_back = self.ic_gru(x.flip(1))
            h_ic = h_back[-1]
        else:
            h_ic = h[:, 0]
        return h, self.dropout(h_ic)

    def forward(self, batch: Batch) -> None:
        model = self.prior
        d = model.latent_dim
        h, h_ic = self.encode(batch)
        z_loc, v_loc, z_raw, v_raw = self.ic_net(h_ic).split(d, dim=-1)
        force, log_scale = self.force_net(h).split(d, dim=-1)  # (trial, T, D) each
        n_obs = batch.n_observed_bins
        with pyro.plate("trials", batch.n_trials, dim=-1):
            z = pyro.sample("z_0", dist.Normal(z_loc, F.softplus(z_raw) + 1e-4).to_event(1))
            v = pyro.sample(velocity_site(0), dist.Normal(v_loc, F.softplus(v_raw) + 1e-4).to_event(1))
            transition = model.transition_fn()
            for t in pyro.markov(range(1, batch.n_bins)):
                step = transition(z, v)
                z = step.z_next
                loc, scale = step.v_loc, step.v_scale
                if t < n_obs:
                    loc = loc + force[:, t]
                    scale = scale * torch.exp(log_scale[:, t])
                v = pyro.sample(velocity_site(t), dist.Normal(loc, scale).to_event(1))

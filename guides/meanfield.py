"""Mean-field, non-amortized guide: free per-trial Gaussian parameters for every latent site.

Like ``pyro.infer.autoguide.AutoNormal`` but keyed by trial id: trial ``batch.index[i]`` owns its
own ``loc`` and ``scale`` for ``z_0``, ``v_0`` and each ``v_t`` of the observed bins, and the
sites are independent of each other (no dependence on the sampled past)::

    q(z_0) q(v_0) prod_t q(v_t),   q(.) = Normal(loc[trial, t], softplus(raw_scale[trial, t]))

(``AutoNormal`` itself does not fit here: it would give one parameter vector for the whole
``trials`` plate of the first batch it sees, while ``fit`` draws mini-batches of different trials.)
Forward bins (no data) use the prior transition, as in every guide. The guide has parameters for a
fixed number of trials (the size of the dataset ``batch.index`` points into) and observed bins,
so it cannot infer new trials without further optimisation: to score held-out trials, fit the
guide on them with the model frozen (see ``examples/ablate_guides.py``).
"""

from __future__ import annotations

from typing import Optional

import pyro.distributions as dist
import torch
from torch import nn
from torch.nn import functional as F

from pyro_langevin.batch import Batch
from pyro_langevin.guides.base import StepwiseGuide
from pyro_langevin.models.langevin_flow import LangevinFlow
from pyro_langevin.transition import TransitionOutput

__all__ = ["MeanFieldGuide"]


def _inv_softplus(x: float) -> float:
    return float(torch.log(torch.expm1(torch.tensor(x))))


class MeanFieldGuide(StepwiseGuide):
    """Per-trial independent Normals over ``z_0``, ``v_0`` and ``v_1 .. v_{T-1}``.

    Parameters
    ----------
    model : LangevinFlow
        The model (held by reference).
    n_trials : int
        Number of trial ids (``batch.index`` must lie in ``0 .. n_trials - 1``).
    n_observed_bins : int
        T; batches may have at most this many observed bins.
    init_scale : float
        Initial posterior standard deviation of every site (AutoNormal's default is 0.1).
    """

    deterministic_prepare = True
    supports_draws_plate = True

    def __init__(self, model: LangevinFlow, n_trials: int, n_observed_bins: int, init_scale: float = 0.1) -> None:
        super().__init__(model)
        if n_trials < 1 or n_observed_bins < 1:
            raise ValueError(f"n_trials and n_observed_bins must be >= 1, got {n_trials}, {n_observed_bins}")
        d = model.latent_dim
        self.n_trials = n_trials
        self.n_observed_bins = n_observed_bins
        # site 0 of ``v`` is v_0; z_0 has its own table
        self.z0_loc = nn.Parameter(torch.zeros(n_trials, d))
        self.z0_raw_scale = nn.Parameter(torch.full((n_trials, d), _inv_softplus(init_scale)))
        self.v_loc = nn.Parameter(torch.zeros(n_trials, n_observed_bins, d))
        self.v_raw_scale = nn.Parameter(torch.full((n_trials, n_observed_bins, d), _inv_softplus(init_scale)))

    def prepare(self, batch: Batch) -> torch.Tensor:
        if batch.n_observed_bins > self.n_observed_bins:
            raise ValueError(f"guide has parameters for {self.n_observed_bins} observed bins, batch has {batch.n_observed_bins}")
        idx = batch.index.to(self.v_loc.device)
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n_trials):
            raise ValueError(f"batch.index must lie in [0, {self.n_trials}), got range [{int(idx.min())}, {int(idx.max())}]")
        return idx

    def initial(self, ctx: torch.Tensor, batch: Batch) -> tuple[dist.Distribution, dist.Distribution]:
        q_z = dist.Normal(self.z0_loc[ctx], F.softplus(self.z0_raw_scale[ctx]) + 1e-4).to_event(1)
        q_v = dist.Normal(self.v_loc[ctx, 0], F.softplus(self.v_raw_scale[ctx, 0]) + 1e-4).to_event(1)
        return q_z, q_v

    def step(
        self, t: int, z: torch.Tensor, v: torch.Tensor, prior: TransitionOutput, ctx: torch.Tensor
    ) -> Optional[dist.Distribution]:
        return dist.Normal(self.v_loc[ctx, t], F.softplus(self.v_raw_scale[ctx, t]) + 1e-4).to_event(1)

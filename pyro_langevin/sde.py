"""The Langevin prior in continuous time as a :class:`torchsde.SDE`.

Same drift and diffusion as :func:`pyro_langevin.transition.langevin_transition`, on the stacked
state ``y = [z, v]``: use it to sample the prior at any resolution with ``torchsde.sdeint``.
"""

from __future__ import annotations

import torch
import torchsde
from torch import nn

from pyro_langevin.potentials import Potential
from pyro_langevin.transition import LangevinParams

__all__ = ["LangevinSDE", "sample_prior_paths"]


class LangevinSDE(nn.Module):
    """``dz = v dt``, ``m dv = (-grad U(z) - gamma v) dt + sigma dW`` with diagonal (Ito) noise.

    Parameters
    ----------
    potential : Potential
    params : LangevinParams
        Supplies ``gamma``, ``sigma`` and ``mass`` (its ``dt`` is not used here).
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, potential: Potential, params: LangevinParams) -> None:
        super().__init__()
        if params.overdamped:
            raise ValueError("LangevinSDE describes the underdamped prior; overdamped=True has no velocity state")
        self.potential = potential
        self.params = params
        self.latent_dim = potential.latent_dim

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Drift of ``[z, v]``."""
        z, v = y.split(self.latent_dim, dim=-1)
        m = self.params.mass
        return torch.cat([v, (self.potential.force(z) - self.params.gamma * v) / m], dim=-1)

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Diagonal diffusion: zero on ``z``, ``sigma / m`` on ``v``."""
        z, v = y.split(self.latent_dim, dim=-1)
        return torch.cat([torch.zeros_like(z), (self.params.sigma / self.params.mass).expand_as(v)], dim=-1)


@torch.no_grad()
def sample_prior_paths(
    sde: LangevinSDE,
    z0: torch.Tensor,
    v0: torch.Tensor,
    ts: torch.Tensor,
    dt: float | None = None,
    method: str = "euler",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integrate the SDE from ``(z0, v0)`` (shape (trial, D)) at times ``ts``.

    Returns ``(z, v)`` of shape (trial, len(ts), D).
    """
    y0 = torch.cat([z0, v0], dim=-1)
    dt = float(ts[1] - ts[0]) / 10 if dt is None else dt
    ys = torchsde.sdeint(sde, y0, ts, dt=dt, method=method)  # (time, trial, 2D)
    z, v = ys.permute(1, 0, 2).split(sde.latent_dim, dim=-1)
    return z, v

"""Potentials ``U(z)`` for the Langevin prior; each gives ``energy(z)`` and ``force(z) = -grad U(z)``.

The default is :class:`CoupledOscillatorPotential`: latent units on a 1-D lattice of ``sites`` with
``channels`` per site, coupled to their nearest neighbours by a learned ``C x C x 3`` kernel, plus
optional per-unit natural frequencies and a confining quartic term. Ablations: :class:`ZeroPotential`
(free particle), :class:`QuadraticPotential` (isotropic spring) and :class:`MLPPotential`.
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "Potential",
    "CoupledOscillatorPotential",
    "ZeroPotential",
    "QuadraticPotential",
    "MLPPotential",
    "make_potential",
]


class Potential(nn.Module):
    """Base class: subclasses define :meth:`energy`; :meth:`force` defaults to autograd."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be >= 1, got {latent_dim}")
        self.latent_dim = latent_dim

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        """``U(z)`` with shape ``z.shape[:-1]``."""
        raise NotImplementedError

    def autograd_force(self, z: torch.Tensor) -> torch.Tensor:
        """``-grad U(z)`` by automatic differentiation (double backprop when training)."""
        # Under no_grad (sampling) the graph is not kept; while training it is (create_graph).
        track = torch.is_grad_enabled()
        with torch.enable_grad():
            zz = z if z.requires_grad else z.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.energy(zz).sum(), zz, create_graph=track)
        return -grad

    def force(self, z: torch.Tensor) -> torch.Tensor:
        """``-grad U(z)``, same shape as ``z``."""
        return self.autograd_force(z)

    def force_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """``force`` with whatever does not depend on ``z`` computed once (build it once per pass)."""
        return self.force

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.force(z)


class CoupledOscillatorPotential(Potential):
    """Locally coupled oscillators on a 1-D lattice (the LangevinFlow potential).

    ``z`` (size ``D = channels * sites``) is viewed as ``Z`` of shape ``(channels, sites)`` and::

        U(z) = sum_sites (K * Z) . Z  +  0.5 sum_i omega_i^2 z_i^2  +  (lambda / 4) sum_i z_i^4

    where ``K * Z`` is a 1-D convolution with a learned ``C x C x 3`` kernel whose tap triples are
    normalised to unit L2 norm and multiplied by a learned coupling strength, with zero padding
    (open ``"chain"``) or circular padding (``"ring"``).

    Parameters
    ----------
    latent_dim : int
        D, divisible by ``channels``.
    channels : int, optional
        Channels per lattice site; default the largest of 4, 2, 1 dividing ``latent_dim``.
    boundary : {"chain", "ring"}
    natural_frequencies : bool
        Add ``0.5 omega_i^2 z_i^2`` with learned ``omega_i``, initialised log-uniformly in
        ``freq_range`` (cycles per time unit; with the 100 ms unit, 0.1-1.0 is 1-10 Hz).
    coupling : float
        Initial coupling strength.
    quartic : float
        Confining quartic coefficient lambda (0 turns it off; fixed unless ``learn_quartic``).
    closed_form : bool
        Use the analytic force (the quadratic part's force is linear) instead of double backprop.
    """

    def __init__(
        self,
        latent_dim: int,
        channels: Optional[int] = None,
        boundary: Literal["chain", "ring"] = "chain",
        natural_frequencies: bool = True,
        freq_range: tuple[float, float] = (0.1, 1.0),
        coupling: float = 0.5,
        quartic: float = 0.0,
        learn_quartic: bool = False,
        closed_form: bool = True,
    ) -> None:
        super().__init__(latent_dim)
        if channels is None:
            channels = next(c for c in (4, 2, 1) if latent_dim % c == 0)
        if latent_dim % channels:
            raise ValueError(f"latent_dim={latent_dim} is not divisible by channels={channels}")
        if boundary not in ("chain", "ring"):
            raise ValueError(f"boundary must be 'chain' or 'ring', got {boundary!r}")
        self.channels, self.sites = channels, latent_dim // channels
        self.boundary = boundary
        self.closed_form = closed_form
        self.kernel = nn.Parameter(torch.randn(channels, channels, 3) / math.sqrt(3 * channels))
        self.log_coupling = nn.Parameter(torch.tensor(math.log(coupling)))
        if natural_frequencies:
            lo, hi = freq_range
            freqs = torch.exp(torch.linspace(math.log(lo), math.log(hi), latent_dim))
            self.log_omega = nn.Parameter(torch.log(2 * math.pi * freqs))
        else:
            self.log_omega = None
        q = torch.tensor(float(quartic))
        self._has_quartic = learn_quartic or quartic != 0.0
        if learn_quartic:
            self.quartic = nn.Parameter(q)
        else:
            self.register_buffer("quartic", q)

    def effective_kernel(self) -> torch.Tensor:
        """Kernel with unit-norm tap triples times the coupling strength, shape (C, C, 3)."""
        k = self.kernel / self.kernel.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        return torch.exp(self.log_coupling) * k

    def _lattice(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(-1, self.channels, self.sites)

    def _conv(self, zl: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.boundary == "ring":
            return F.conv1d(F.pad(zl, (1, 1), mode="circular"), k)
        return F.conv1d(zl, k, padding=1)

    def _conv_adjoint(self, zl: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.boundary == "ring":
            return F.conv1d(F.pad(zl, (1, 1), mode="circular"), k.transpose(0, 1).flip(-1))
        return F.conv_transpose1d(zl, k, padding=1)

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        zl = self._lattice(z)
        u = (self._conv(zl, self.effective_kernel()) * zl).sum(dim=(-1, -2)).reshape(z.shape[:-1])
        if self.log_omega is not None:
            u = u + 0.5 * (torch.exp(2 * self.log_omega) * z**2).sum(-1)
        return u + 0.25 * self.quartic * (z**4).sum(-1)

    def stiffness_matrix(self) -> torch.Tensor:
        """Symmetric ``S`` with ``grad U(z) = S z`` for the quadratic part (coupling + frequencies)."""
        d = self.latent_dim
        eye = torch.eye(d, device=self.kernel.device, dtype=self.kernel.dtype)
        conv_t = self._conv(self._lattice(eye), self.effective_kernel()).reshape(d, d)  # row i = K e_i
        s = conv_t + conv_t.T
        if self.log_omega is not None:
            s = s + torch.diag(torch.exp(2 * self.log_omega))
        return s

    def force_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Closed-form force as one matrix product per step: ``-S z - lambda z^3``."""
        if not self.closed_form:
            return self.autograd_force
        s = self.stiffness_matrix()
        if not self._has_quartic:
            return lambda z: -(z @ s)
        quartic = self.quartic
        return lambda z: -(z @ s) - quartic * z**3

    def force(self, z: torch.Tensor) -> torch.Tensor:
        if not self.closed_form:
            return self.autograd_force(z)
        k = self.effective_kernel()
        zl = self._lattice(z)
        grad = (self._conv(zl, k) + self._conv_adjoint(zl, k)).reshape(z.shape)
        if self.log_omega is not None:
            grad = grad + torch.exp(2 * self.log_omega) * z
        grad = grad + self.quartic * z**3
        return -grad


class ZeroPotential(Potential):
    """``U = 0``: a free (damped, noisy) particle."""

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        return z.new_zeros(z.shape[:-1])

    def force(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


class QuadraticPotential(Potential):
    """Isotropic spring ``U = 0.5 k ||z||^2`` with learned stiffness ``k > 0``."""

    def __init__(self, latent_dim: int, stiffness: float = 1.0) -> None:
        super().__init__(latent_dim)
        self.log_stiffness = nn.Parameter(torch.tensor(math.log(stiffness)))

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.exp(self.log_stiffness) * (z**2).sum(-1)

    def force(self, z: torch.Tensor) -> torch.Tensor:
        return -torch.exp(self.log_stiffness) * z


class MLPPotential(Potential):
    """``U(z) = MLP(z) + 0.5 eps ||z||^2``, force by autograd (a small confining term keeps it bounded below)."""

    def __init__(self, latent_dim: int, hidden: int = 64, confinement: float = 0.1) -> None:
        super().__init__(latent_dim)
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        self.confinement = confinement

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).squeeze(-1) + 0.5 * self.confinement * (z**2).sum(-1)


POTENTIALS = {
    "oscillators": CoupledOscillatorPotential,
    "zero": ZeroPotential,
    "quadratic": QuadraticPotential,
    "mlp": MLPPotential,
}


def make_potential(name: str, latent_dim: int, **kwargs) -> Potential:
    """Build a potential by name: ``"oscillators"`` (default), ``"zero"``, ``"quadratic"`` or ``"mlp"``."""
    try:
        cls = POTENTIALS[name]
    except KeyError:
        raise ValueError(f"unknown potential {name!r}; choose one of {sorted(POTENTIALS)}") from None
    return cls(latent_dim, **kwargs)

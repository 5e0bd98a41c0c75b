"""Potentials ``U(z)`` for the Langevin prior; each gives ``energy(z)`` and ``force(z) = -grad U(z)``.

The default is :class:`CoupledOscillatorPotential`: latent units on a 1-D lattice of ``sites`` with
``channels`` per site, coupled to their neighbours by a learned ``C x C x 3`` kernel, plus per-unit
natural frequencies and an optional quartic term; its stiffness is positive definite and bounded for
every parameter value (a confining, stably discretised prior). Ablations: :class:`ZeroPotential`
(free particle), :class:`QuadraticPotential` (isotropic spring) and :class:`MLPPotential`.
"""

from __future__ import annotations

import math
import numbers
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
    "FixedStiffnessPotential",
    "make_potential",
]


class Potential(nn.Module):
    """Base class: subclasses define :meth:`energy`; :meth:`force` defaults to autograd."""

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        if isinstance(latent_dim, bool) or not isinstance(latent_dim, numbers.Integral) or latent_dim < 1:
            raise ValueError(f"latent_dim must be an integer >= 1, got {latent_dim!r}")
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
    """Locally coupled oscillators on a 1-D lattice (the LangevinFlow potential), confining by construction.

    ``z`` (size ``D = channels * sites``) is viewed as ``Z`` of shape ``(channels, sites)``; ``K * Z``
    is a 1-D convolution with a learned ``C x C x 3`` kernel whose tap triples are normalised to unit
    L2 norm and multiplied by a learned coupling strength, with zero padding (open ``"chain"``) or
    circular padding (``"ring"``). The quadratic part of the energy is ``0.5 z^T S z`` with::

        "gram"      (default):  U = 0.5 ||K * Z||^2 + 0.5 sum_i omega_i^2 z_i^2
        "reference" (released code): U = sum_sites (K * Z) . Z + 0.5 sum_i omega_i^2 z_i^2

    plus an optional quartic ``(lambda / 4) sum_i z_i^4``. The ``"gram"`` coupling is positive
    semi-definite for every kernel, and ``omega_i^2 >= omega_min^2 > 0``, so the stiffness ``S`` is
    positive definite for every parameter value: the prior is confined (its variance stays bounded
    over any horizon). The ``"reference"`` form ``K + K^T`` is indefinite in general (the prior can
    grow without bound); it is kept for ablations only.

    The learned quadratic part (all but the ``omega_min`` floor) is scaled down when needed so that
    the largest frequency ``sqrt(lambda_max(S))`` is at most ``max_omega``. The damped
    symplectic-Euler step is stable while ``omega dt < sqrt(2)``; :class:`LangevinFlow` sets
    ``max_omega = 1.35 / dt`` unless given (see ``STABLE_OMEGA_DT`` there).

    Parameters
    ----------
    latent_dim : int
        D, divisible by ``channels``.
    channels : int, optional
        Channels per lattice site; default the largest of 4, 2, 1 dividing ``latent_dim``.
    boundary : {"chain", "ring"}
    coupling_form : {"gram", "reference"}
        Positive semi-definite Gram coupling (default) or the released code's indefinite form.
    natural_frequencies : bool
        Add ``0.5 omega_i^2 z_i^2`` with learned ``omega_i``, initialised log-uniformly in
        ``freq_range`` (cycles per time unit; with the 100 ms unit, 0.1-1.0 is 1-10 Hz). Without
        them only ``omega_min`` remains on the diagonal.
    coupling : float
        Initial coupling strength.
    quartic : float
        Confining quartic coefficient lambda (0 turns it off; fixed unless ``learn_quartic``).
    closed_form : bool
        Use the analytic force (the quadratic part's force is linear) instead of double backprop.
    omega_min : float
        Floor of every natural frequency (radians per time unit; default ``2 pi 0.05``, 0.5 Hz).
    max_omega : float
        Ceiling of the largest frequency of ``S`` (radians per time unit; default 9, about 14 Hz:
        stable for ``dt`` up to 0.15).
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
        coupling_form: Literal["gram", "reference"] = "gram",
        omega_min: float = 2 * math.pi * 0.05,
        max_omega: float = 9.0,
    ) -> None:
        super().__init__(latent_dim)
        if channels is None:
            channels = next(c for c in (4, 2, 1) if latent_dim % c == 0)
        if isinstance(channels, bool) or not isinstance(channels, numbers.Integral) or channels < 1 or latent_dim % channels:
            raise ValueError(f"latent_dim={latent_dim} is not divisible by channels={channels!r}")
        if boundary not in ("chain", "ring"):
            raise ValueError(f"boundary must be 'chain' or 'ring', got {boundary!r}")
        if coupling_form not in ("gram", "reference"):
            raise ValueError(f"coupling_form must be 'gram' or 'reference', got {coupling_form!r}")
        for name, value in (("coupling", coupling), ("omega_min", omega_min), ("max_omega", max_omega)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not omega_min < max_omega:
            raise ValueError(f"omega_min ({omega_min}) must be below max_omega ({max_omega})")
        lo, hi = freq_range
        if not (0 < lo <= hi and 2 * math.pi * lo > omega_min):
            raise ValueError(f"freq_range must satisfy omega_min / 2pi < lo <= hi, got {freq_range}")
        self.channels, self.sites = channels, latent_dim // channels
        self.boundary = boundary
        self.coupling_form = coupling_form
        self.closed_form = closed_form
        self.omega_min, self.max_omega = float(omega_min), float(max_omega)
        self.kernel = nn.Parameter(torch.randn(channels, channels, 3) / math.sqrt(3 * channels))
        self.log_coupling = nn.Parameter(torch.tensor(math.log(coupling)))
        if natural_frequencies:
            omega = 2 * math.pi * torch.exp(torch.linspace(math.log(lo), math.log(hi), latent_dim))
            # omega^2 = omega_min^2 + exp(2 log_omega): the floor holds for every parameter value
            self.log_omega = nn.Parameter(0.5 * torch.log(omega**2 - self.omega_min**2))
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

    def omega_squared(self) -> torch.Tensor:
        """Squared natural frequencies ``omega_i^2 >= omega_min^2``, shape (D,) (before the cap)."""
        floor = torch.full((self.latent_dim,), self.omega_min**2, device=self.kernel.device, dtype=self.kernel.dtype)
        return floor if self.log_omega is None else floor + torch.exp(2 * self.log_omega)

    def _lattice(self, z: torch.Tensor) -> torch.Tensor:
        return z.reshape(-1, self.channels, self.sites)

    def _conv(self, zl: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if self.boundary == "ring":
            return F.conv1d(F.pad(zl, (1, 1), mode="circular"), k)
        return F.conv1d(zl, k, padding=1)

    def _learned_stiffness(self) -> torch.Tensor:
        """Coupling plus the learned part of the frequencies (everything above the floor)."""
        d = self.latent_dim
        eye = torch.eye(d, device=self.kernel.device, dtype=self.kernel.dtype)
        conv_t = self._conv(self._lattice(eye), self.effective_kernel()).reshape(d, d)  # row i = K e_i
        coupling = conv_t @ conv_t.T if self.coupling_form == "gram" else conv_t + conv_t.T
        if self.log_omega is None:
            return coupling
        return coupling + torch.diag(torch.exp(2 * self.log_omega))

    def _cap(self, learned: torch.Tensor) -> torch.Tensor:
        """Factor in (0, 1] on the learned part so that no eigenvalue of ``S`` exceeds ``max_omega^2``."""
        top = torch.linalg.eigvalsh(learned).abs().max()
        return ((self.max_omega**2 - self.omega_min**2) / top).clamp(max=1.0)

    def stiffness_matrix(self) -> torch.Tensor:
        """Symmetric ``S`` with ``grad U(z) = S z`` for the quadratic part.

        ``S = omega_min^2 I + c L`` with ``L`` the coupling plus the learned frequencies and ``c``
        the cap. With the ``"gram"`` form its eigenvalues lie in ``[omega_min^2, max_omega^2]`` for
        every parameter value.
        """
        learned = self._learned_stiffness()
        eye = torch.eye(self.latent_dim, device=learned.device, dtype=learned.dtype)
        return self.omega_min**2 * eye + self._cap(learned) * learned

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        # Written with the convolution itself, independently of stiffness_matrix, so that tests of
        # the closed-form force against autograd check the matrix.
        zl = self._lattice(z)
        kz = self._conv(zl, self.effective_kernel())
        if self.coupling_form == "gram":
            u = 0.5 * (kz**2).sum(dim=(-1, -2))
        else:
            u = (kz * zl).sum(dim=(-1, -2))
        u = u.reshape(z.shape[:-1])
        if self.log_omega is not None:
            u = u + 0.5 * (torch.exp(2 * self.log_omega) * z**2).sum(-1)
        u = u * self._cap(self._learned_stiffness()) + 0.5 * self.omega_min**2 * (z**2).sum(-1)
        return u + 0.25 * self.quartic * (z**4).sum(-1)

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
        return self.force_fn()(z)

    def extra_repr(self) -> str:
        return (f"latent_dim={self.latent_dim}, channels={self.channels}, boundary={self.boundary!r}, "
                f"coupling_form={self.coupling_form!r}, max_omega={self.max_omega:.3g}")


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


class FixedStiffnessPotential(Potential):
    """``U = 0.5 z^T S z + (lambda / 4) sum_i z_i^4`` with a fixed symmetric stiffness ``S`` (no parameters).

    What an intervention on a fitted potential swaps in (:mod:`pyro_langevin.dynamics`): the fitted
    stiffness with some couplings cut, kept fixed. ``max_omega`` is the square root of the largest
    eigenvalue, so a model checks the step's stability on it as for the oscillators.

    Parameters
    ----------
    stiffness : tensor, shape (D, D)
        Symmetric stiffness matrix (per time unit squared, times the mass).
    quartic : float
        Confining quartic coefficient lambda (0: none).
    """

    def __init__(self, stiffness: torch.Tensor, quartic: float = 0.0) -> None:
        stiffness = torch.as_tensor(stiffness)
        if stiffness.dim() != 2 or stiffness.shape[0] != stiffness.shape[1]:
            raise ValueError(f"stiffness must be a square matrix, got shape {tuple(stiffness.shape)}")
        if not torch.allclose(stiffness, stiffness.T, atol=1e-6 * float(stiffness.abs().max().clamp_min(1.0))):
            raise ValueError("stiffness must be symmetric")
        if not torch.isfinite(stiffness).all():
            raise ValueError("stiffness has NaN or infinite entries")
        super().__init__(stiffness.shape[0])
        self.register_buffer("stiffness", 0.5 * (stiffness + stiffness.T))
        self.register_buffer("quartic", torch.tensor(float(quartic), dtype=stiffness.dtype))
        self.max_omega = float(torch.linalg.eigvalsh(self.stiffness.double()).max().clamp_min(0.0).sqrt())

    def stiffness_matrix(self) -> torch.Tensor:
        """``S`` (the Hessian of ``U`` at the origin)."""
        return self.stiffness

    def energy(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((z @ self.stiffness) * z).sum(-1) + 0.25 * self.quartic * (z**4).sum(-1)

    def force(self, z: torch.Tensor) -> torch.Tensor:
        return -(z @ self.stiffness) - self.quartic * z**3


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

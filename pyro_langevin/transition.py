"""The Langevin prior transition: one function used by the model, every guide and the SDE.

Continuous time, mass ``m``::

    dz = v dt
    m dv = (-grad U(z) - gamma v) dt + sigma dW

One bin of length ``dt`` is discretised by splitting: a symplectic-Euler kick-drift for the
conservative part, then the exact Ornstein-Uhlenbeck update for damping and noise::

    v' = v - dt * grad U(z) / m
    z' = z + dt * v'
    v_next ~ Normal(a v', s^2),   a = exp(-gamma dt / m),   s^2 = sigma^2 (1 - a^2) / (2 gamma m)

With the default ``sigma^2 = 2 gamma m`` (unit temperature) the stationary velocity law is
Normal(0, 1/m), which matches the ``v_0 ~ Normal(0, 1)`` prior at ``m = 1``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LangevinParams", "TransitionOutput", "Transition", "langevin_transition", "make_transition", "ou_coefficients"]


def _inv_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


class TransitionOutput(NamedTuple):
    """Result of one prior step from ``(z, v)``.

    z_next : position after the step (deterministic given z, v)
    v_loc : mean of the next velocity, ``a * v'``
    v_scale : standard deviation of the next velocity (broadcastable to ``v_loc``)
    """

    z_next: torch.Tensor
    v_loc: torch.Tensor
    v_scale: torch.Tensor


def ou_coefficients(
    gamma: torch.Tensor, sigma: torch.Tensor, mass: float, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decay factor ``a`` and noise scale ``s`` of the exact OU velocity update over ``dt``."""
    a = torch.exp(-gamma * dt / mass)
    # (1 - a^2) / (2 gamma) -> dt / m as gamma -> 0 (pure Brownian velocity); expm1 keeps it exact.
    var = sigma**2 * (-torch.expm1(-2.0 * gamma * dt / mass)) / (2.0 * gamma.clamp_min(1e-8) * mass)
    return a, var.sqrt()


class LangevinParams(nn.Module):
    """Damping, noise and mass of the Langevin prior, each learnable or fixed.

    Parameters
    ----------
    dt : float
        Step per bin in model time units. The defaults below assume a unit of 100 ms, so a 5 ms bin
        is ``dt = 0.05`` and a 20 ms bin ``dt = 0.2``.
    gamma : float
        Damping rate (per time unit). Default 2.0: velocity memory ~50 ms at the 100 ms unit.
    sigma : float, optional
        Noise amplitude. Default ``sqrt(2 gamma m)`` (unit temperature), kept so while ``gamma``
        is learned (unless ``learn_sigma``, which then starts from that value).
    mass : float
        Particle mass ``m`` (fixed).
    learn_gamma, learn_sigma : bool
        Whether damping / noise are trained (positive through softplus).
    overdamped : bool
        If True the velocity carries no memory: ``z' = z + dt v`` and
        ``v_next ~ Normal(-grad U(z') / gamma, sigma^2 / (gamma^2 dt))``, the overdamped (Brownian)
        limit ``dz = -grad U / gamma dt + sigma / gamma dW``.
    """

    def __init__(
        self,
        dt: float = 0.05,
        gamma: float = 2.0,
        sigma: Optional[float] = None,
        mass: float = 1.0,
        learn_gamma: bool = False,
        learn_sigma: bool = False,
        overdamped: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("dt", dt), ("gamma", gamma), ("mass", mass)) + ((("sigma", sigma),) if sigma is not None else ()):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        self.dt = float(dt)
        self.mass = float(mass)
        self.overdamped = bool(overdamped)
        # Unit temperature (sigma^2 = 2 gamma m) is a relation, not a number: with a learned gamma
        # and no sigma given, sigma follows gamma so the stationary velocity law stays N(0, 1/m).
        self.unit_temperature = sigma is None and not learn_sigma
        if sigma is None:
            sigma = math.sqrt(2.0 * gamma * mass)
        raw_g = torch.tensor(_inv_softplus(gamma))
        raw_s = torch.tensor(_inv_softplus(sigma))
        if learn_gamma:
            self.raw_gamma = nn.Parameter(raw_g)
        else:
            self.register_buffer("raw_gamma", raw_g)
        if learn_sigma:
            self.raw_sigma = nn.Parameter(raw_s)
        else:
            self.register_buffer("raw_sigma", raw_s)

    @property
    def gamma(self) -> torch.Tensor:
        return F.softplus(self.raw_gamma)

    @property
    def sigma(self) -> torch.Tensor:
        if self.unit_temperature:
            return torch.sqrt(2.0 * self.gamma * self.mass)
        return F.softplus(self.raw_sigma)

    def coefficients(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, s)`` for one bin: velocity decay and noise scale."""
        if self.overdamped:
            # Brownian limit: no velocity memory; noise of the position increment sigma/gamma * sqrt(dt),
            # expressed as velocity noise (z' = z + dt v).
            s = self.sigma / self.gamma / math.sqrt(self.dt)
            return torch.zeros_like(s), s
        return ou_coefficients(self.gamma, self.sigma, self.mass, self.dt)

    def extra_repr(self) -> str:
        return f"dt={self.dt}, mass={self.mass}, overdamped={self.overdamped}, unit_temperature={self.unit_temperature}"


Transition = Callable[[torch.Tensor, torch.Tensor], TransitionOutput]


def make_transition(force: Callable[[torch.Tensor], torch.Tensor], params: LangevinParams) -> Transition:
    """The prior step as a function ``step(z, v) -> TransitionOutput`` with its constants computed once.

    Build it once per model or guide call and reuse it for every bin: the OU coefficients (and,
    through ``potential.force_fn()``, the potential's linear operator) are then not recomputed
    per step. The law is the one of :func:`langevin_transition`.
    """
    dt, m = params.dt, params.mass
    a, s = params.coefficients()
    if params.overdamped:
        inv_gamma = 1.0 / params.gamma

        def overdamped_step(z: torch.Tensor, v: torch.Tensor) -> TransitionOutput:
            # v is the last step's drift-plus-noise displacement rate; the next one follows the force.
            z_next = z + dt * v
            v_loc = force(z_next) * inv_gamma
            return TransitionOutput(z_next, v_loc, s.expand_as(v_loc))

        return overdamped_step

    def step(z: torch.Tensor, v: torch.Tensor) -> TransitionOutput:
        v_prime = v + (dt / m) * force(z)
        z_next = z + dt * v_prime
        return TransitionOutput(z_next, a * v_prime, s.expand_as(v_prime))

    return step


def langevin_transition(
    z: torch.Tensor,
    v: torch.Tensor,
    force: Callable[[torch.Tensor], torch.Tensor],
    params: LangevinParams,
) -> TransitionOutput:
    """One prior step of underdamped Langevin dynamics (see the module docstring).

    Parameters
    ----------
    z, v : tensor, shape (..., D)
        Position and velocity at the previous bin.
    force : callable
        ``force(z) = -grad U(z)``, same shape as ``z``.
    params : LangevinParams

    Returns
    -------
    TransitionOutput
        ``z_next`` and the Normal law ``(v_loc, v_scale)`` of the next velocity.
    """
    return make_transition(force, params)(z, v)

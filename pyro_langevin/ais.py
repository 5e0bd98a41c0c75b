"""Annealed importance sampling (AIS) of each trial's ``log p(x)``, from the guide to the posterior.

AIS (Neal 2001) moves ``C`` chains per trial through the geometric path of densities

    log f_beta(z) = (1 - beta) log q(z | x) + beta log p(x, z),      0 = beta_0 < ... < beta_S = 1,

from the guide (the proposal, ``beta = 0``, normalised) to the unnormalised posterior
(``beta = 1``, normaliser ``p(x)``). A chain starts at a guide draw ``z_0 ~ q`` and for
``t = 1 .. S`` adds ``(beta_t - beta_{t-1}) [log p(x, z_{t-1}) - log q(z_{t-1} | x)]`` to its log
weight, then moves ``z_t ~ T_t(z_{t-1})`` with a kernel that leaves ``f_{beta_t}`` invariant. Each
chain's weight is an unbiased estimate of ``p(x)``: ``log mean_c w_c`` is a stochastic lower bound
of ``log p(x)`` (in expectation) that closes as the schedule lengthens, whatever the guide. With
``S = 1`` (no transition) it is the IWAE estimate of ``C`` draws.

* **Transitions**: one Hamiltonian Monte Carlo step per temperature: a fresh standard-normal
  momentum, ``L`` leapfrog steps (``pyro.ops.integrator.velocity_verlet``, identity mass matrix) and
  a Metropolis accept/reject **per trial and per chain** (Pyro's ``HMC`` kernel has one accept for
  its whole state, which here would be every trial at once). All latent sites of a trial
  (``z_0, v_0 .. v_{T+F-1}``) are one flat vector; trials and chains are rows of one tiled batch,
  so one model + guide pass and one backward pass per leapfrog step serve all of them.
* **Schedule**: sigmoidal (Grosse, Ghahramani & Adams 2015, :func:`sigmoid_schedule`): dense steps
  near ``beta = 0`` and ``beta = 1``, where ``log f`` changes fastest relative to its width.
* **Step sizes**: one per trial and temperature, tuned by dual averaging
  (``pyro.ops.dual_averaging.DualAveraging``, Hoffman & Gelman 2014) towards an acceptance rate of
  ``target_accept`` on a **separate pilot run** of ``adapt_chains`` chains along the same schedule,
  then frozen. The estimate's chains never adapt: their kernels depend on nothing they produce, so
  each weight stays an unbiased estimate of ``p(x)`` and the reverse run of :mod:`pyro_langevin.bdmc`
  uses the same kernels.

Reverse AIS (``reverse_from``) starts every chain of a trial at an exact posterior draw (the latent
path that generated a simulated trial), runs the temperatures from 1 down to 0 with the same
kernels, and gives weights with ``E w = 1 / p(x)``: ``-log mean_c w_c`` is a stochastic **upper**
bound of ``log p(x)`` (bidirectional Monte Carlo, Grosse et al. 2015).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.ops.dual_averaging import DualAveraging
from pyro.ops.integrator import velocity_verlet
from pyro.poutine.util import prune_subsample_sites

from pyro_langevin.batch import Batch
from pyro_langevin.trace_density import check_guide_covers_model, latent_sites, trial_log_density

__all__ = ["sigmoid_schedule", "AISRun", "ais_log_weights", "tile_trials"]


def sigmoid_schedule(num_steps: int, sharpness: float = 4.0) -> np.ndarray:
    """Inverse temperatures ``beta_0 = 0 < ... < beta_S = 1`` on a sigmoid (Grosse et al. 2015).

    ``beta_t`` is ``sigmoid(sharpness (2 t / S - 1))`` rescaled to run exactly from 0 to 1; larger
    ``sharpness`` puts more steps near both ends. ``S = 1`` gives ``[0, 1]``.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
    if not sharpness > 0:
        raise ValueError(f"sharpness must be > 0, got {sharpness!r}")
    s = 1.0 / (1.0 + np.exp(-sharpness * np.linspace(-1.0, 1.0, num_steps + 1)))
    return (s - s[0]) / (s[-1] - s[0])


def tile_trials(batch: Batch, copies: int) -> Batch:
    """``copies`` copies of the trials, draw-major (row ``j * n + i`` is copy ``j`` of trial ``i``)."""
    return batch if copies == 1 else batch[torch.arange(batch.n_trials, device=batch.device).repeat(copies)]


class _PathDensity:
    """``log p(x, z)`` and ``log q(z | x)`` per row of a tiled batch, at flat latent paths.

    A path is every latent site of a row concatenated (site order of the model), shape (rows, dim).
    """

    def __init__(self, model: Callable, guide: Callable, batch: Batch, shapes: dict[str, torch.Size]) -> None:
        self.model, self.guide, self.batch, self.shapes = model, guide, batch, shapes
        self.sizes = [int(np.prod(s)) for s in shapes.values()]

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes, dim=-1)
        return {name: p.reshape(flat.shape[0], *shape) for (name, shape), p in zip(self.shapes.items(), parts)}

    def flatten(self, latents: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([latents[name].reshape(latents[name].shape[0], -1) for name in self.shapes], dim=-1)

    def __call__(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        data, n = self.unflatten(flat), flat.shape[0]
        guide_trace = prune_subsample_sites(poutine.trace(poutine.condition(self.guide, data=data)).get_trace(self.batch))
        model_trace = prune_subsample_sites(poutine.trace(poutine.condition(self.model, data=data)).get_trace(self.batch))
        return trial_log_density(model_trace, n), trial_log_density(guide_trace, n)


def _guide_draws(model: Callable, guide: Callable, batch: Batch) -> dict[str, torch.Tensor]:
    """One guide draw of every latent site per row of ``batch`` (checked against the model's sites)."""
    guide_trace = prune_subsample_sites(poutine.trace(guide).get_trace(batch))
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(batch))
    check_guide_covers_model(model_trace, guide_trace)
    return {name: model_trace.nodes[name]["value"].detach() for name in latent_sites(model_trace)}


@dataclass
class _State:
    """Chains at one temperature: flat paths (rows, dim) and their ``log p(x, z)``, ``log q(z | x)``."""

    z: torch.Tensor
    log_p: torch.Tensor
    log_q: torch.Tensor

    def log_f(self, beta: float) -> torch.Tensor:
        return (1.0 - beta) * self.log_q + beta * self.log_p


def _hmc_step(state: _State, density: _PathDensity, beta: float, step_size: torch.Tensor,
              num_leapfrog: int) -> tuple[_State, torch.Tensor]:
    """One HMC transition leaving ``f_beta`` invariant, accepted or rejected row by row.

    ``step_size`` has one entry per row. Returns the new state and each row's acceptance probability.
    """
    momentum = torch.randn_like(state.z)
    proposal: dict[str, torch.Tensor] = {}

    def potential(z: dict[str, torch.Tensor]) -> torch.Tensor:
        log_p, log_q = density(z["z"])
        proposal["log_p"], proposal["log_q"] = log_p.detach(), log_q.detach()
        return -((1.0 - beta) * log_q + beta * log_p).sum()

    with torch.enable_grad():
        z_new, r_new, _, _ = velocity_verlet({"z": state.z}, {"z": momentum}, potential, lambda r: r,
                                             step_size.unsqueeze(-1), num_leapfrog)
    new = _State(z_new["z"].detach(), proposal["log_p"], proposal["log_q"])
    kinetic = 0.5 * momentum.double().pow(2).sum(-1)
    kinetic_new = 0.5 * r_new["z"].detach().double().pow(2).sum(-1)
    log_ratio = (new.log_f(beta) - kinetic_new) - (state.log_f(beta) - kinetic)
    accept_prob = torch.nan_to_num(log_ratio.clamp(max=0.0).exp(), nan=0.0)
    accept = (torch.rand_like(accept_prob) < accept_prob) & torch.isfinite(new.z).all(-1)
    keep = accept.unsqueeze(-1)
    return _State(torch.where(keep, new.z, state.z), torch.where(accept, new.log_p, state.log_p),
                  torch.where(accept, new.log_q, state.log_q)), accept_prob


@dataclass
class AISRun:
    """Log weights of AIS chains, and the kernels they used.

    Attributes
    ----------
    log_weights : Tensor, shape (trial, chain), float64
        Forward runs: ``log w`` with ``E w = p(x)``. Reverse runs: ``log w`` with ``E w = 1 / p(x)``.
    betas : ndarray, shape (S + 1,)
        The schedule.
    step_sizes : Tensor, shape (S + 1, trial)
        Leapfrog step size of each temperature's transition (rows 0 and S unused: no transition there).
    accept_prob : Tensor, shape (S + 1, trial)
        Mean acceptance probability over chains at each temperature (NaN where no transition ran).
    """

    log_weights: torch.Tensor
    betas: np.ndarray
    step_sizes: torch.Tensor
    accept_prob: torch.Tensor


def _anneal(density: _PathDensity, state: _State, betas: np.ndarray, n_trials: int, step_sizes: Optional[torch.Tensor],
            num_leapfrog: int, reverse: bool, init_step_size: float, target_accept: float) -> AISRun:
    """Run the chains of ``state`` (rows ``chain * n_trials + trial``) along the schedule.

    Forward: temperatures 0 .. S; reverse: S .. 0 (then the weights estimate ``1 / p(x)``). With
    ``step_sizes`` None they are adapted per trial by dual averaging as the run goes (a pilot run).
    """
    s = len(betas) - 1
    chains = state.z.shape[0] // n_trials
    order = range(s, -1, -1) if reverse else range(s + 1)
    order = list(order)
    adapt = step_sizes is None
    if adapt:
        step_sizes = torch.full((s + 1, n_trials), float("nan"), dtype=state.z.dtype, device=state.z.device)
        averager = DualAveraging(prox_center=math.log(10.0 * init_step_size))
        log_step = torch.full((n_trials,), math.log(init_step_size), dtype=state.z.dtype, device=state.z.device)
    accept_trace = torch.full((s + 1, n_trials), float("nan"), dtype=torch.float64, device=state.z.device)
    log_w = torch.zeros_like(state.log_p)
    for here, there in zip(order[:-1], order[1:]):
        log_w = log_w + (betas[there] - betas[here]) * (state.log_p - state.log_q)
        if there in (0, s):
            continue  # the last temperature needs no transition
        if adapt:
            step_sizes[there] = log_step.exp()
        state, prob = _hmc_step(state, density, float(betas[there]), step_sizes[there].repeat(chains), num_leapfrog)
        accept_trace[there] = prob.reshape(chains, n_trials).mean(0)
        if adapt:  # the next temperature starts from the running average (the current iterate is noisy)
            averager.step(target_accept - accept_trace[there].to(log_step.dtype))
            log_step = averager.get_state()[1]
    return AISRun(log_weights=log_w.reshape(chains, n_trials).T.cpu(), betas=betas, step_sizes=step_sizes,
                  accept_prob=accept_trace.cpu())


def ais_log_weights(
    model: Callable,
    guide: Callable,
    batch: Batch,
    num_chains: int,
    num_steps: int,
    *,
    num_leapfrog: int = 5,
    step_sizes: Optional[torch.Tensor] = None,
    adapt_chains: int = 4,
    pilot_steps: int = 100,
    init_step_size: float = 0.05,
    target_accept: float = 0.65,
    sharpness: float = 4.0,
    reverse_from: Optional[dict[str, torch.Tensor]] = None,
) -> AISRun:
    """AIS log weights of ``num_chains`` chains for every trial of ``batch``, in one tiled pass.

    Model and guide run as given (put them in eval mode first; :func:`~pyro_langevin.evidence.log_evidence`
    does), with Pyro's argument validation off (a rejected leapfrog proposal may reach rates a
    distribution would refuse).

    Parameters
    ----------
    model, guide : callable
        ``model(batch)`` and ``guide(batch)`` with the same latent sites, all in the ``"trials"`` plate.
    batch : Batch
        The trials; the model's likelihood scores ``batch.target`` under ``batch.mask``.
    num_chains : int
        C, chains per trial.
    num_steps : int
        S, temperatures after ``beta = 0`` (``S - 1`` HMC transitions; ``S = 1`` is plain importance sampling).
    num_leapfrog : int
        L, leapfrog steps per HMC transition.
    step_sizes : Tensor, shape (S + 1, trial), optional
        Frozen step sizes (an earlier run's ``AISRun.step_sizes``). Without them a pilot run of
        ``adapt_chains`` chains tunes them first.
    adapt_chains : int
        Chains of the pilot run (their weights are discarded).
    pilot_steps : int
        Temperatures of the pilot run (at most ``num_steps``): a good step size depends on
        ``beta`` only, so a coarser pilot schedule tunes it at a fraction of the cost and its log
        step sizes are interpolated (linearly in ``beta``) onto the run's schedule.
    init_step_size, target_accept : float
        Dual averaging's starting step size and target acceptance probability.
    sharpness : float
        Of :func:`sigmoid_schedule`.
    reverse_from : dict of site -> Tensor (trial, ...), optional
        Exact posterior draws (one per trial): run in reverse from them (needs ``step_sizes``).

    Returns
    -------
    AISRun
    """
    betas = sigmoid_schedule(num_steps, sharpness)
    n = batch.n_trials
    if reverse_from is not None and step_sizes is None:
        raise ValueError("reverse_from: a reverse run needs the forward run's step_sizes (the same kernels)")
    with pyro.validation_enabled(False):
        if step_sizes is None:
            pilot_betas = sigmoid_schedule(min(num_steps, pilot_steps), sharpness)
            pilot = _run(model, guide, batch, adapt_chains, pilot_betas, None, num_leapfrog, None, init_step_size,
                         target_accept)
            step_sizes = _interpolate_step_sizes(pilot, betas)
        return _run(model, guide, batch, num_chains, betas, step_sizes.to(batch.device), num_leapfrog, reverse_from,
                    init_step_size, target_accept)


def _interpolate_step_sizes(pilot: AISRun, betas: np.ndarray) -> torch.Tensor:
    """The pilot's step sizes at the temperatures ``betas`` (log-linear in beta, per trial; NaN at both ends)."""
    inner = slice(1, len(pilot.betas) - 1)
    out = torch.full((len(betas), pilot.step_sizes.shape[1]), float("nan"), dtype=pilot.step_sizes.dtype)
    if len(betas) < 3:
        return out  # no transitions to run
    if len(pilot.betas) < 3:
        raise ValueError("pilot_steps must be >= 2 (a pilot run needs a transition to tune) when num_steps >= 2")
    log_steps = pilot.step_sizes[inner].log().cpu().numpy()
    for i in range(log_steps.shape[1]):
        out[1:-1, i] = torch.from_numpy(np.exp(np.interp(betas[1:-1], pilot.betas[inner], log_steps[:, i])))
    return out


def _run(model: Callable, guide: Callable, batch: Batch, chains: int, betas: np.ndarray, step_sizes: Optional[torch.Tensor],
         num_leapfrog: int, reverse_from: Optional[dict[str, torch.Tensor]], init_step_size: float,
         target_accept: float) -> AISRun:
    tiled = tile_trials(batch, chains)
    draws = _guide_draws(model, guide, tiled)
    density = _PathDensity(model, guide, tiled, {name: v.shape[1:] for name, v in draws.items()})
    if reverse_from is not None:
        missing = set(draws) - set(reverse_from)
        if missing:
            raise ValueError(f"reverse_from: no value for latent site(s) {sorted(missing)[:5]}")
        draws = {name: reverse_from[name].to(tiled.device).repeat(chains, *[1] * (reverse_from[name].dim() - 1))
                 for name in draws}
    z = density.flatten(draws)
    log_p, log_q = density(z)
    state = _State(z, log_p.detach(), log_q.detach())
    return _anneal(density, state, betas, batch.n_trials, step_sizes, num_leapfrog, reverse_from is not None,
                   init_step_size, target_accept)

"""Bidirectional Monte Carlo (BDMC): how far AIS and the IWAE are from ``log p(x)``, measured.

On real data ``log p(x)`` is unknown, and every estimate here is a stochastic lower bound of it.
On data simulated from the fitted model the latent path that generated each trial is known, and it
is an exact draw from that trial's posterior. So (Grosse, Ghahramani & Adams 2015; Wu et al. 2017):

* forward AIS from the guide gives a stochastic **lower** bound of each trial's ``log p(x)``;
* reverse AIS from the true latent path, with the same schedule and kernels, gives a stochastic
  **upper** bound (:mod:`pyro_langevin.ais`);
* their gap per trial bounds the error of the forward AIS estimate on data like this, and so
  certifies (or not) the schedule; and the IWAE estimate of the same simulated trials at ``K``
  draws, minus the two bounds, brackets the IWAE's bias at that ``K`` for that model and guide.

The brackets hold on simulated trials; they carry over to real trials as far as the model's
simulations resemble the data (check with the predictive checks).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites

from pyro_langevin.ais import ais_log_weights
from pyro_langevin.batch import Batch
from pyro_langevin.evidence import Evidence, evidence_from_log_weights, log_evidence
from pyro_langevin.trace_density import evaluation_mode, latent_sites

__all__ = ["simulate_trials", "BDMC", "bdmc"]


@torch.no_grad()
def simulate_trials(model: Callable, batch: Batch, obs_site: str = "spikes") -> tuple[Batch, dict[str, torch.Tensor]]:
    """Trials drawn from the model's prior predictive in ``batch``'s layout, and their latent paths.

    The model is called as ``model(n_trials=..., n_bins=...)`` (prior predictive, as
    :class:`~pyro_langevin.models.LangevinFlow`). The simulated batch keeps ``batch``'s mask, trial
    ids and split into held-in / held-out neurons and observed / forward bins.

    Returns
    -------
    (Batch, dict of site -> Tensor (trial, ...))
        The simulated trials and the values of every latent site that generated them.
    """
    trace = prune_subsample_sites(poutine.trace(model).get_trace(n_trials=batch.n_trials, n_bins=batch.n_bins))
    if obs_site not in trace.nodes:
        raise ValueError(f"obs_site {obs_site!r} is not a site of the model's prior predictive trace")
    x = trace.nodes[obs_site]["value"].to(batch.target.dtype)
    latents = {name: trace.nodes[name]["value"] for name in latent_sites(trace) if name != obs_site}
    sim = Batch(input=x[:, :batch.n_observed_bins, :batch.n_heldin].clone(), target=x, mask=batch.mask.clone(),
                index=batch.index.clone())
    return sim.validate(), latents


@dataclass
class BDMC:
    """Forward and reverse AIS bounds on simulated trials, and the IWAE on the same trials.

    Attributes
    ----------
    trial : ndarray of int
        Trial ids (those of the template batch).
    lower : Evidence
        Forward AIS (``method="ais"``): per-trial stochastic lower bound of ``log p(x)``, nats.
    upper : ndarray
        Reverse AIS from the true latent path: per-trial stochastic upper bound, nats.
    upper_mc_se : ndarray
        Delta-method Monte Carlo standard error of ``upper`` over the reverse chains, nats.
    upper_log_weights : ndarray, shape (trial, chain)
        The reverse chains' log weights (``E w = 1 / p(x)``).
    iwae : dict of K -> Evidence
        The IWAE estimate of the same simulated trials at each ``K``.
    num_steps, num_chains : int
    seconds : dict of str -> float
        Wall time of ``"forward"``, ``"reverse"`` and ``"iwae_<K>"``.
    """

    trial: np.ndarray
    lower: Evidence
    upper: np.ndarray
    upper_mc_se: np.ndarray
    upper_log_weights: np.ndarray = field(repr=False)
    iwae: dict[int, Evidence]
    num_steps: int
    num_chains: int
    seconds: dict[str, float]

    @property
    def gap(self) -> np.ndarray:
        """``upper - lower`` per trial (nats): bounds the forward AIS estimate's error on such data."""
        return self.upper - self.lower.log_evidence

    def iwae_bias(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-trial bracket of the IWAE's bias at ``K = k``: ``(iwae - upper, iwae - lower)`` (nats).

        The bias ``iwae - log p(x)`` lies between the two (up to the bounds' Monte Carlo error).
        """
        est = self.iwae[k].log_evidence
        return est - self.upper, est - self.lower.log_evidence

    def summary(self) -> dict[str, Any]:
        """Per-trial means and totals over trials as plain numbers (nats), JSON-ready."""
        n = len(self.trial)
        out: dict[str, Any] = {
            "n_trials": n, "num_steps": self.num_steps, "num_chains": self.num_chains,
            "gap_mean_nats": float(self.gap.mean()), "gap_max_nats": float(self.gap.max()),
            "gap_total_nats": float(self.gap.sum()), "lower_total_nats": self.lower.total(),
            "upper_total_nats": float(self.upper.sum()), "seconds": dict(self.seconds),
        }
        for k in self.iwae:
            lo, hi = self.iwae_bias(k)
            out[f"iwae_{k}_bias_per_trial_nats"] = [float(lo.mean()), float(hi.mean())]
            out[f"iwae_{k}_bias_total_nats"] = [float(lo.sum()), float(hi.sum())]
        return out


@torch.no_grad()
def bdmc(
    model: Callable,
    guide: Callable,
    batch: Batch,
    num_chains: int = 16,
    num_steps: int = 100,
    *,
    iwae_particles: Sequence[int] = (1000,),
    seed: Optional[int] = 0,
    ais_options: Optional[Mapping[str, Any]] = None,
    obs_site: str = "spikes",
) -> BDMC:
    """Bidirectional Monte Carlo on ``batch.n_trials`` trials simulated from ``model``.

    Simulates trials in ``batch``'s layout (:func:`simulate_trials`), runs forward AIS from the guide
    (its step sizes tuned by a pilot run) and reverse AIS from the true latent paths with the same
    step sizes, then the IWAE at each of ``iwae_particles``. All trials of ``batch`` go in one tiled
    pass per run (``num_chains x trials`` rows): pass as many trials as memory allows.

    Parameters
    ----------
    model, guide : callable
        As for :func:`~pyro_langevin.evidence.log_evidence`; run in eval mode.
    batch : Batch
        Template: layout, mask and trial ids of the simulated trials (its counts are not used).
    num_chains, num_steps : int
        AIS chains per trial and temperatures (the same for both directions).
    iwae_particles : sequence of int
        ``K`` values at which to bracket the IWAE's bias.
    seed : int, optional
        Seeds the simulation and every run (forked torch RNG); None: unseeded.
    ais_options : mapping, optional
        Passed to :func:`pyro_langevin.ais.ais_log_weights` (``num_leapfrog``, ``adapt_chains`` ...).
    obs_site : str
        The model's observed site.

    Returns
    -------
    BDMC
    """
    options = dict(ais_options or {})
    seconds: dict[str, float] = {}
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    with rng, evaluation_mode(model, guide):
        if seed is not None:
            torch.manual_seed(seed)
        sim, latents = simulate_trials(model, batch, obs_site)
        share = getattr(guide, "shared_context", None)
        with share(sim) if share is not None else nullcontext():
            t0 = time.perf_counter()
            forward = ais_log_weights(model, guide, sim, num_chains, num_steps, **options)
            seconds["forward"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            reverse = ais_log_weights(model, guide, sim, num_chains, num_steps, **{**options, "step_sizes": forward.step_sizes},
                                      reverse_from=latents)
            seconds["reverse"] = time.perf_counter() - t0
        iwae = {}
        for k in iwae_particles:
            iwae[k] = log_evidence(model, guide, sim, k, seed=None, warn=False)
            seconds[f"iwae_{k}"] = iwae[k].seconds
    trial = batch.index.detach().cpu().numpy()
    lower = replace(evidence_from_log_weights(forward.log_weights.numpy(), trial=trial, seconds=seconds["forward"],
                                              warn=False), method="ais", num_steps=num_steps)
    upper = evidence_from_log_weights(reverse.log_weights.numpy(), trial=trial, warn=False)
    return BDMC(trial=trial, lower=lower, upper=-upper.log_evidence, upper_mc_se=upper.mc_se,
                upper_log_weights=upper.log_weights, iwae=iwae,
                num_steps=num_steps, num_chains=num_chains, seconds=seconds)

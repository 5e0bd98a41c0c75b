"""Held-out evidence: each trial's ``log p(x)`` by importance sampling (IWAE) or annealed importance
sampling (AIS), with the guide as proposal.

``method="iwae"`` (default, the cheap screen). For a trial ``x`` and ``K`` draws ``z_k ~ q(z | x)``
of the guide, the log importance weights are

    log w_k = log p(x, z_k) - log q(z_k | x)

with the model's FULL log joint (every latent site, ``z_0``, ``v_0`` ... ``v_{T+F-1}``, and the
observed spikes under the batch mask) and the guide's log density of the same draws, both read off
Pyro traces (the guide traced, the model replayed on its draws), summed per trial over the
``"trials"`` plate. ``log_evidence = log (1/K) sum_k w_k`` is the IWAE bound: never below the ELBO
of the same draws, rising to ``log p(x)`` as ``K`` grows, but with a bias that stays large where the
guide is a poor proposal (Pareto k-hat says where).

``method="ais"``: annealed importance sampling (:mod:`pyro_langevin.ais`) with ``K`` chains per
trial from the guide to the posterior over ``num_steps`` temperatures, HMC transitions accepted per
trial and chain. Each chain's ``w`` is again an unbiased estimate of ``p(x)``, and the same numbers
are reported over chains; the bias shrinks with the schedule's length, whatever the guide.
:func:`pyro_langevin.bdmc.bdmc` measures it on data simulated from the model (upper and lower
bounds).

Per trial, from the ``K`` log weights: the estimate ``log mean_k w_k`` (logsumexp, float64); ``elbo``,
their mean; ``spread``, their standard deviation; ``khat``, Pareto k-hat (``az.psislw``), flagged
above ArviZ's threshold ``min(1 - 1/log10 K, 0.7)`` (:func:`khat_threshold`); ``ess``, Kish's
effective sample size; ``mc_se``, the delta-method Monte Carlo standard error (meaningful only where
k-hat is small).

Quantities (``quantity``):

* ``"joint"`` (default): ``log p(x)`` of every entry the batch mask keeps (held-in and held-out
  neurons, observed and forward bins) on trials the fit never used.
* ``"heldout"``: ``log p(x_rest | x_heldin) = log p(x) - log p(x_heldin)``, where ``x_rest`` is the
  held-out neurons in the observed bins AND every neuron in the forward bins: co-smoothing and
  forward prediction together, so its bits per spike is not co-bps. A ratio of two estimates:
  consistent, not a bound. With IWAE both come from the same draws (self-normalised importance
  sampling); with AIS from two runs.
* ``"heldout_neurons"``: ``log p(x_heldout | x_heldin)`` in the observed bins only (forward bins
  left out of both terms): the integrated-latent analogue of co-smoothing, whose bits per spike
  (above each held-out neuron's mean rate) reads like co-bps.

:func:`compare` ranks models by the summed per-trial estimates with ArviZ's standard errors, and
refuses evidences that are not on the same footing; :func:`compare_folds` reports per-fold paired
differences and their spread over folds and seeds. docs/evidence.md says what each number means.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from scipy.special import gammaln, logsumexp

from pyro_langevin.batch import Batch
from pyro_langevin.data.splits import heldin_only
from pyro_langevin.ais import ais_log_weights, tile_trials
from pyro_langevin.posterior import check_posterior_inputs
from pyro_langevin.progress import progress_bar
from pyro_langevin.trace_density import check_guide_covers_model, evaluation_mode, trial_log_density

with warnings.catch_warnings():  # arviz 0.23 announces its 1.0 refactor with a FutureWarning on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "Evidence", "log_evidence", "trial_log_weights", "evidence_from_log_weights", "compare", "compare_folds",
    "check_same_footing", "UNCERTAINTY",
    "KHAT_THRESHOLD", "khat_threshold", "MIN_DRAWS_FOR_KHAT", "QUANTITIES", "METHODS", "format_compare",
    "COMPARE_COLUMNS",
]

#: Ceiling of the Pareto k-hat threshold (Vehtari et al. 2024); :func:`khat_threshold` lowers it for few draws.
KHAT_THRESHOLD = 0.7
#: Fewest draws for which ``az.psislw`` fits the tail (it needs more than 4 tail draws, and takes
#: ``min(K / 5, 3 sqrt(K))`` of them); below it k-hat is NaN.
MIN_DRAWS_FOR_KHAT = 25
QUANTITIES = ("joint", "heldout", "heldout_neurons")
Quantity = Literal["joint", "heldout", "heldout_neurons"]
METHODS = ("iwae", "ais")
Method = Literal["iwae", "ais"]


def khat_threshold(num_draws: int) -> float:
    """Pareto k-hat above which ``num_draws`` importance weights are not trusted, as ArviZ computes it:
    ``min(1 - 1 / log10(S), 0.7)`` (0.5 at S = 100, 0.67 at S = 1000, 0.7 from S = 2155 on)."""
    if num_draws <= 10:
        return 0.0  # log10(S) <= 1: ArviZ's formula gives <= 0, no k-hat is acceptable
    return min(1.0 - 1.0 / math.log10(num_draws), KHAT_THRESHOLD)


# ----- numbers from log weights --------------------------------------------------------------------
@dataclass
class Evidence:
    """Per-trial evidence of one model on a batch, by importance sampling (IWAE) or AIS.

    Every array has one entry per trial, in the batch's order; log densities are in nats.

    Attributes
    ----------
    trial : ndarray of int
        The batch's trial ids (``batch.index``).
    log_evidence : ndarray
        ``log mean_k w_k`` of the chosen quantity (see the module docstring), nats per trial.
    elbo : ndarray
        Mean log weight (IWAE: the ELBO of the same draws; AIS: the mean log AIS weight, also a
        stochastic lower bound; for the conditional quantities, the difference of the two terms').
    khat : ndarray
        Pareto k-hat of the log weights (NaN with fewer than :data:`MIN_DRAWS_FOR_KHAT` draws).
    ess : ndarray
        Kish effective sample size of the weights, in draws or chains (1 .. K).
    mc_se : ndarray
        Delta-method Monte Carlo standard error of ``log_evidence``, nats.
    n_spikes : ndarray
        Spikes in the entries the quantity scores.
    null_log_lik : ndarray
        Log-likelihood of those entries under each neuron's mean count per bin over the batch's
        scored entries (the null model of NLB's bits per spike), nats.
    num_particles : int
        K, draws (IWAE) or chains (AIS) per trial.
    quantity : {"joint", "heldout", "heldout_neurons"}
    seconds : float
        Wall time of the estimate.
    method : {"iwae", "ais"}
    num_steps : int
        AIS temperatures after 0 (1 for IWAE).
    spread : ndarray or None
        Standard deviation of the log weights over draws or chains (for the conditional quantities,
        the root sum of squares of both terms'), nats.
    layout : tuple or None
        ``(observed bins, forward bins, held-in neurons, held-out neurons)`` of the batch.
    bin_ms : float or None
        Bin width the trials were binned at, when the caller said.
    units : tuple or None
        Neuron ids in the batch's column order, when the caller said.
    log_weights : ndarray, shape (trial, K)
        Log weights of the quantity's numerator (``log p(x, z) - log q(z | x)`` for ``"joint"``).
    log_weights_heldin : ndarray or None, shape (trial, K)
        Log weights of ``p(x_heldin)`` (the conditional quantities only).
    joint : Evidence or None
        For ``"heldout"`` by IWAE: the ``"joint"`` evidence of the same draws (no extra cost).
    """

    trial: np.ndarray
    log_evidence: np.ndarray
    elbo: np.ndarray
    khat: np.ndarray
    ess: np.ndarray
    mc_se: np.ndarray
    n_spikes: np.ndarray
    null_log_lik: np.ndarray
    num_particles: int
    quantity: str
    seconds: float = float("nan")
    method: str = "iwae"
    num_steps: int = 1
    spread: Optional[np.ndarray] = None
    layout: Optional[tuple[int, ...]] = None
    bin_ms: Optional[float] = None
    units: Optional[tuple] = None
    log_weights: Optional[np.ndarray] = field(default=None, repr=False)
    log_weights_heldin: Optional[np.ndarray] = field(default=None, repr=False)
    joint: Optional["Evidence"] = field(default=None, repr=False)

    @property
    def khat_threshold(self) -> float:
        """ArviZ's k-hat threshold for this many draws (:func:`khat_threshold`)."""
        return khat_threshold(self.num_particles)

    @property
    def flagged(self) -> np.ndarray:
        """True for trials whose k-hat exceeds :attr:`khat_threshold` (estimate not trusted)."""
        return np.nan_to_num(self.khat, nan=0.0) > self.khat_threshold

    @property
    def gap(self) -> np.ndarray:
        """``log_evidence - elbo`` per trial (nats, >= 0 for ``"joint"``): for IWAE the guide's
        posterior gap as far as ``K`` draws see it."""
        return self.log_evidence - self.elbo

    def total(self) -> float:
        """Summed log evidence over trials (nats): the ``elpd`` of :func:`compare`."""
        return float(self.log_evidence.sum())

    def to_frame(self) -> pd.DataFrame:
        """One row per trial: ``log_evidence, elbo, gap, spread, khat, flagged, ess, mc_se, n_spikes``."""
        return pd.DataFrame({
            "log_evidence": self.log_evidence, "elbo": self.elbo, "gap": self.gap,
            "spread": np.full(len(self.trial), np.nan) if self.spread is None else self.spread, "khat": self.khat,
            "flagged": self.flagged, "ess": self.ess, "mc_se": self.mc_se, "n_spikes": self.n_spikes,
        }, index=pd.Index(self.trial, name="trial"))

    def to_dict(self) -> dict[str, Any]:
        """Per-trial numbers as plain lists (JSON-ready; log weights left out), :meth:`from_dict`'s input."""
        out: dict[str, Any] = {"num_particles": int(self.num_particles), "quantity": self.quantity,
                               "seconds": float(self.seconds), "method": self.method, "num_steps": int(self.num_steps),
                               "layout": None if self.layout is None else list(self.layout),
                               "bin_ms": self.bin_ms, "units": None if self.units is None else list(self.units)}
        for name in (*_PER_TRIAL, "spread"):
            value = getattr(self, name)
            out[name] = None if value is None else np.asarray(value).tolist()
        if self.joint is not None:
            out["joint"] = self.joint.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Evidence":
        """Inverse of :meth:`to_dict` (without the log weights); reads dicts of older versions too."""
        missing = [k for k in (*_PER_TRIAL, "num_particles", "quantity") if k not in d]
        if missing:
            raise ValueError(f"Evidence.from_dict: missing field(s) {missing}")
        arrays = {k: np.asarray(d[k], dtype=np.int64 if k == "trial" else np.float64) for k in _PER_TRIAL}
        return cls(**arrays, num_particles=int(d["num_particles"]), quantity=str(d["quantity"]),
                   seconds=float(d.get("seconds", float("nan"))), method=str(d.get("method", "iwae")),
                   num_steps=int(d.get("num_steps", 1)),
                   spread=None if d.get("spread") is None else np.asarray(d["spread"], dtype=np.float64),
                   layout=None if d.get("layout") is None else tuple(d["layout"]), bin_ms=d.get("bin_ms"),
                   units=None if d.get("units") is None else tuple(d["units"]),
                   joint=cls.from_dict(d["joint"]) if d.get("joint") else None)

    def summary(self) -> dict[str, float]:
        """Totals and diagnostics as plain numbers (JSON-ready): nats, nats and bits per spike."""
        spikes = float(self.n_spikes.sum())
        elpd = self.total()
        has_khat = bool(np.isfinite(self.khat).any())
        return {
            "quantity": self.quantity, "method": self.method, "num_particles": int(self.num_particles),
            "num_steps": int(self.num_steps), "n_trials": int(len(self.trial)),
            "elpd_nats": elpd, "se_nats": _se(self.log_evidence), "elbo_nats": float(self.elbo.sum()),
            "gap_nats": float(self.gap.sum()), "mc_se_nats": float(np.sqrt(np.sum(self.mc_se ** 2))),
            "nats_per_spike": elpd / spikes if spikes else float("nan"),
            "bits_per_spike": _bits_per_spike(elpd, float(self.null_log_lik.sum()), spikes),
            "khat_max": float(np.nanmax(self.khat)) if has_khat else float("nan"),
            "khat_threshold": self.khat_threshold,
            "frac_flagged": float(self.flagged.mean()) if has_khat else float("nan"),
            "frac_khat_gt_0_7": float(np.mean(np.nan_to_num(self.khat) > KHAT_THRESHOLD)) if has_khat else float("nan"),
            "ess_median": float(np.median(self.ess)),
            "seconds": float(self.seconds),
        }


_PER_TRIAL = ("trial", "log_evidence", "elbo", "khat", "ess", "mc_se", "n_spikes", "null_log_lik")


def _se(values: np.ndarray) -> float:
    """Standard error of a sum of per-trial values, ``sqrt(n var)``, as ``arviz.compare`` takes it."""
    return float(np.sqrt(len(values) * np.var(values)))


def _bits_per_spike(total: float, null_total: float, spikes: float) -> float:
    return (total - null_total) / (spikes * math.log(2.0)) if spikes else float("nan")


def _log_mean_exp(lw: np.ndarray) -> np.ndarray:
    return logsumexp(lw, axis=-1) - math.log(lw.shape[-1])


def _weight_diagnostics(lw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k-hat, Kish ESS and delta-method Monte Carlo s.e. of ``log mean exp`` for (trial, K) log weights."""
    k = lw.shape[-1]
    norm = np.exp(lw - logsumexp(lw, axis=-1, keepdims=True))
    sum_sq = np.sum(norm ** 2, axis=-1)
    ess = 1.0 / sum_sq
    mc_se = np.sqrt(np.maximum(k * sum_sq - 1.0, 0.0) / k)
    if k >= MIN_DRAWS_FOR_KHAT:
        with warnings.catch_warnings():  # psislw's own warnings say no more than the k-hat it returns
            warnings.simplefilter("ignore")
            _, khat = az.psislw(lw.copy(), reff=1.0)
        khat = np.asarray(khat, dtype=np.float64)
    else:
        khat = np.full(lw.shape[:-1], np.nan)
    return khat, ess, mc_se


def evidence_from_log_weights(
    log_weights: np.ndarray,
    log_weights_heldin: Optional[np.ndarray] = None,
    *,
    trial: Optional[np.ndarray] = None,
    n_spikes: Optional[np.ndarray] = None,
    null_log_lik: Optional[np.ndarray] = None,
    seconds: float = float("nan"),
    warn: bool = True,
    quantity: Optional[str] = None,
) -> Evidence:
    """Per-trial evidence, k-hat, ESS and Monte Carlo error from log importance weights.

    Parameters
    ----------
    log_weights : array, shape (trial, K)
        ``log p(x, z_k) - log q(z_k | x)``.
    log_weights_heldin : array, shape (trial, K), optional
        ``log p(x_heldin, z_k) - log q(z_k | x)`` of the same draws: gives the ``"heldout"``
        quantity ``log p(x) - log p(x_heldin)``; without it the quantity is ``"joint"``.
    trial, n_spikes, null_log_lik : arrays, shape (trial,), optional
        Trial ids (default ``0 .. n-1``), spikes scored and the null model's log-likelihood per
        trial (default NaN: no per-spike numbers).
    seconds : float
        Wall time to record.
    warn : bool
        Warn (``RuntimeWarning``) when k-hat flags trials or cannot be estimated.
    quantity : str, optional
        The name to record (default ``"joint"``, or ``"heldout"`` with ``log_weights_heldin``).
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 2 or lw.shape[1] < 1:
        raise ValueError(f"log_weights: expected shape (trial, K), got {lw.shape}")
    if not np.isfinite(lw).all():
        bad = np.argwhere(~np.isfinite(lw))[0].tolist()
        raise FloatingPointError(f"log_weights: non-finite log weight at (trial row, draw) {bad}: the model or the "
                                 "guide gives a zero or infinite density there")
    n, k = lw.shape
    est = _log_mean_exp(lw)
    elbo = lw.mean(axis=-1)
    khat, ess, mc_se = _weight_diagnostics(lw)
    spread = lw.std(axis=-1)
    if log_weights_heldin is not None:
        lw_in = np.asarray(log_weights_heldin, dtype=np.float64)
        if lw_in.shape != lw.shape:
            raise ValueError(f"log_weights_heldin: shape {lw_in.shape} differs from log_weights {lw.shape}")
        est = est - _log_mean_exp(lw_in)
        elbo = elbo - lw_in.mean(axis=-1)
        khat_in, ess_in, se_in = _weight_diagnostics(lw_in)
        khat = np.fmax(khat, khat_in)
        ess = np.minimum(ess, ess_in)
        # ignores the terms' correlation: exact for independent AIS runs, conservative for the
        # positively correlated IWAE terms of the same draws
        mc_se = np.sqrt(mc_se ** 2 + se_in ** 2)
        spread = np.sqrt(spread ** 2 + lw_in.std(axis=-1) ** 2)
    if quantity is None:
        quantity = "joint" if log_weights_heldin is None else "heldout"
    nan = np.full(n, np.nan)
    ev = Evidence(
        trial=np.arange(n) if trial is None else np.asarray(trial), log_evidence=est, elbo=elbo, khat=khat,
        ess=ess, mc_se=mc_se, n_spikes=nan if n_spikes is None else np.asarray(n_spikes, dtype=np.float64),
        null_log_lik=nan if null_log_lik is None else np.asarray(null_log_lik, dtype=np.float64),
        num_particles=k, quantity=quantity, seconds=seconds, spread=spread, log_weights=lw,
        log_weights_heldin=None if log_weights_heldin is None else lw_in,
    )
    if warn:
        _warn_khat(ev)
    return ev


def _warn_khat(ev: Evidence, name: str = "") -> None:
    who = f"{name}: " if name else ""
    if ev.num_particles < MIN_DRAWS_FOR_KHAT:
        warnings.warn(f"{who}k-hat needs at least {MIN_DRAWS_FOR_KHAT} draws per trial (got K={ev.num_particles}); "
                      "the evidence estimate has no PSIS diagnostic", RuntimeWarning, stacklevel=3)
        return
    n_bad = int(ev.flagged.sum())
    if n_bad:
        what = "the AIS weights are too uneven" if ev.method == "ais" else "the guide is too poor a proposal"
        warnings.warn(
            f"{who}Pareto k-hat > {ev.khat_threshold:.2f} (ArviZ's threshold for {ev.num_particles} draws) for {n_bad} "
            f"of {len(ev.trial)} trials (max {np.nanmax(ev.khat):.2f}): {what} there and their evidence estimates "
            f"are not trusted (see Evidence.flagged / the 'flagged' column)", RuntimeWarning, stacklevel=3)


# ----- log weights from Pyro traces ----------------------------------------------------------------
def trial_log_weights(model: Callable, guide: Callable, batch: Batch, draws: int = 1,
                      heldin: bool = False) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log importance weights of ``draws`` guide draws of every trial of ``batch``, in one pass.

    The trials are tiled ``draws`` times along the trial axis (draw-major: row ``j * n + i`` is draw
    ``j`` of trial ``i``; every site is in the ``"trials"`` plate, so copies are independent draws),
    the guide is traced and the model replayed on its draws. Model and guide are called as given
    (put them in eval mode first: :func:`log_evidence` does).

    Returns
    -------
    (log_w, log_w_heldin) : tensors of shape (trial, draws), float64, on the CPU
        ``log p(x, z) - log q(z | x)`` with the model's full log joint under ``batch.mask``, and
        (``heldin=True``) the same with only the held-in observed entries in the likelihood.
    """
    n = batch.n_trials
    tiled = tile_trials(batch, draws)
    guide_trace = poutine.trace(guide).get_trace(tiled)
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(tiled))
    guide_trace = prune_subsample_sites(guide_trace)
    check_guide_covers_model(model_trace, guide_trace)
    log_q = trial_log_density(guide_trace, n * draws, observed=False).cpu()
    log_w = (trial_log_density(model_trace, n * draws).cpu() - log_q).reshape(draws, n).T
    log_w_in = None
    if heldin:
        trace_in = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(heldin_only(tiled)))
        log_w_in = (trial_log_density(trace_in, n * draws).cpu() - log_q).reshape(draws, n).T
    return log_w, log_w_in


def _observed_bins_only(batch: Batch) -> Batch:
    """A copy whose mask drops the forward bins (every neuron of the observed bins kept)."""
    mask = batch.mask.clone()
    mask[:, batch.n_observed_bins:] = False
    return batch.with_inputs(batch.input, mask)


def _quantity_batches(batch: Batch, quantity: str) -> tuple[Batch, Optional[Batch]]:
    """The batches whose ``log p`` the quantity is the difference of: numerator and (conditional
    quantities) the held-in denominator."""
    if quantity == "joint":
        return batch, None
    numerator = batch if quantity == "heldout" else _observed_bins_only(batch)
    return numerator, heldin_only(batch)


def _scored_counts(batch: Batch, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    """Spikes per trial in the entries the quantity scores, and their log-likelihood under each
    neuron's mean count per bin over those entries (NLB's null model for bits per spike)."""
    mask = batch.mask.detach().cpu().numpy().copy()
    if quantity != "joint":
        mask[:, :batch.n_observed_bins, :batch.n_heldin] = False
    if quantity == "heldout_neurons":
        mask[:, batch.n_observed_bins:] = False
    x = np.where(mask, batch.target.detach().cpu().numpy().astype(np.float64), 0.0)
    counts = mask.sum(axis=(0, 1))
    mean = np.divide(x.sum(axis=(0, 1)), counts, out=np.zeros(x.shape[-1]), where=counts > 0)
    lam = np.where(mean > 0, mean, 1e-9)[None, None, :]
    ll = np.where(mask, x * np.log(lam) - lam - gammaln(x + 1.0), 0.0)
    return x.sum(axis=(1, 2)), ll.sum(axis=(1, 2))


def _check_inputs(model: Callable, guide: Callable, batch: Batch, quantity: str, method: str, **counts: int) -> None:
    check_posterior_inputs(model, guide, batch, **counts)
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    numerator, denominator = _quantity_batches(batch, quantity)
    if denominator is not None and not bool(denominator.mask.ne(numerator.mask).any()):
        what = "held-out neurons" if quantity == "heldout_neurons" else "held-out neurons or forward bins"
        raise ValueError(f"quantity={quantity!r}: the batch has no {what} in its mask, "
                         "nothing to predict from the held-in spikes")


def _iwae_chunk(model: Callable, guide: Callable, chunk: Batch, num_particles: int, per_pass: int,
                heldin: bool, bar: Any) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Log weights (trial, K) of a chunk's numerator, and of its held-in denominator from the same draws."""
    parts, parts_in = [], []
    for first in range(0, num_particles, per_pass):
        lw, lw_in = trial_log_weights(model, guide, chunk, min(per_pass, num_particles - first), heldin=heldin)
        parts.append(lw)
        parts_in.append(lw_in)
        bar.update(1)
    return torch.cat(parts, dim=1), torch.cat(parts_in, dim=1) if heldin else None


def _ais_chunk(model: Callable, guide: Callable, chunk: Batch, num_chains: int, per_pass: int, num_steps: int,
               options: Mapping[str, Any], bar: Any) -> torch.Tensor:
    """AIS log weights (trial, C) of a chunk: the first pass tunes the step sizes (a pilot run), the
    others reuse them."""
    parts, step_sizes = [], options.get("step_sizes")
    for first in range(0, num_chains, per_pass):
        run = ais_log_weights(model, guide, chunk, min(per_pass, num_chains - first), num_steps,
                              **{**options, "step_sizes": step_sizes})
        step_sizes = run.step_sizes
        parts.append(run.log_weights)
        bar.update(1)
    return torch.cat(parts, dim=1)


@torch.no_grad()
def log_evidence(
    model: Callable,
    guide: Callable,
    batch: Batch,
    num_particles: int = 1000,
    *,
    method: Method = "iwae",
    num_steps: int = 100,
    quantity: Quantity = "joint",
    batch_size: int = 256,
    max_tiled: int = 512,
    seed: Optional[int] = 0,
    progress: bool = False,
    warn: bool = True,
    ais_options: Optional[Mapping[str, Any]] = None,
    bin_ms: Optional[float] = None,
    units: Optional[Sequence] = None,
) -> Evidence:
    """Each trial's held-out log evidence by importance sampling (IWAE) or AIS, the guide as proposal.

    See the module docstring for the estimators and the quantities. Every ``nn.Module`` the model
    and guide call runs in eval mode (no dropout), also when they are wrapped in something that is
    not a module; no KL weight, no coordinated dropout or temporal shift (those are training-time
    only; pass the plain batch). Trials are taken ``batch_size`` at a time and their draws or chains
    in passes of at most ``max_tiled`` tiled trials, so memory does not grow with ``K`` beyond the
    ``(trial, K)`` log weights. For a predictive number, ``batch`` must hold trials the fit never
    used (neither trained on nor selected on).

    Parameters
    ----------
    model, guide : callable
        ``model(batch)`` and ``guide(batch)`` with the same latent sites, all in the ``"trials"``
        plate (every model and guide of this package).
    batch : Batch
        Trials to score; the model's likelihood scores ``batch.target`` under ``batch.mask``.
    num_particles : int
        K: guide draws (IWAE) or AIS chains per trial. k-hat needs at least :data:`MIN_DRAWS_FOR_KHAT`.
    method : {"iwae", "ais"}
        Plain importance sampling (cheap; biased low where the guide is a poor proposal) or annealed
        importance sampling (:mod:`pyro_langevin.ais`; each chain ``num_steps`` temperatures of HMC).
    num_steps : int
        AIS temperatures after 0 (sigmoidal schedule); ignored by IWAE.
    quantity : {"joint", "heldout", "heldout_neurons"}
        ``log p(x)``; ``log p(x_rest | x_heldin)`` (held-out neurons and forward bins together, given
        the held-in spikes in the observed bins); or ``log p(x_heldout | x_heldin)`` in the observed
        bins only (co-smoothing).
    batch_size : int
        Trials per chunk.
    max_tiled : int
        Most tiled trials (trials x draws) per guide + model pass (about 0.25 MiB each at
        MC_Maze_Small size in 20 ms bins, latent 32; AIS also keeps one backward graph of them).
    seed : int, optional
        Seeds the draws (on a forked torch RNG: the global stream is left untouched); None: unseeded.
    progress : bool
        Show a progress bar over passes.
    warn : bool
        Warn when k-hat flags trials (they are flagged in the result either way).
    ais_options : mapping, optional
        Passed to :func:`pyro_langevin.ais.ais_log_weights` (``num_leapfrog``, ``adapt_chains``,
        ``init_step_size``, ``target_accept``, ``sharpness``).
    bin_ms, units : optional
        Bin width (ms) and neuron ids of the batch's columns, recorded so that :func:`compare`
        can refuse evidences of different binnings or unit sets.

    Returns
    -------
    Evidence
    """
    _check_inputs(model, guide, batch, quantity, method, num_particles=num_particles, batch_size=batch_size,
                  max_tiled=max_tiled, num_steps=num_steps)
    start_time = time.perf_counter()
    chunk_size = min(batch_size, max_tiled)
    starts = list(range(0, batch.n_trials, chunk_size))
    per_pass = [max(1, min(num_particles, max_tiled // min(chunk_size, batch.n_trials - s))) for s in starts]
    numerator, denominator = _quantity_batches(batch, quantity)
    terms = 2 if (method == "ais" and denominator is not None) else 1
    n_passes = terms * sum(math.ceil(num_particles / k) for k in per_pass)
    lw_all, lw_in_all = [], []
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    bar = progress_bar(total=n_passes, desc=f"log evidence ({method})", unit="pass", disable=not progress)
    with rng, evaluation_mode(model, guide), bar:
        if seed is not None:
            torch.manual_seed(seed)
        for start, k_max in zip(starts, per_pass):
            rows = slice(start, start + chunk_size)
            share = getattr(guide, "shared_context", None)
            with share(batch[rows]) if share is not None else nullcontext():
                if method == "iwae":
                    lw, lw_in = _iwae_chunk(model, guide, numerator[rows], num_particles, k_max,
                                            denominator is not None, bar)
                else:
                    options = dict(ais_options or {})
                    lw = _ais_chunk(model, guide, numerator[rows], num_particles, k_max, num_steps, options, bar)
                    lw_in = None if denominator is None else _ais_chunk(
                        model, guide, denominator[rows], num_particles, k_max, num_steps, options, bar)
            lw_all.append(lw)
            lw_in_all.append(lw_in)
    seconds = time.perf_counter() - start_time
    meta = {"method": method, "num_steps": num_steps if method == "ais" else 1, "bin_ms": bin_ms,
            "units": None if units is None else tuple(units),
            "layout": (batch.n_observed_bins, batch.n_forward_bins, batch.n_heldin, batch.n_heldout)}
    trial = batch.index.detach().cpu().numpy()
    lw = torch.cat(lw_all).numpy()
    n_spikes, null_ll = _scored_counts(batch, quantity)
    ev = evidence_from_log_weights(lw, None if denominator is None else torch.cat(lw_in_all).numpy(), trial=trial,
                                   n_spikes=n_spikes, null_log_lik=null_ll, seconds=seconds, warn=False,
                                   quantity=quantity)
    ev = replace(ev, **meta)
    if quantity == "heldout" and method == "iwae":  # the joint evidence of the same draws comes for free
        n_spikes, null_ll = _scored_counts(batch, "joint")
        ev.joint = replace(evidence_from_log_weights(lw, trial=trial, n_spikes=n_spikes, null_log_lik=null_ll,
                                                     seconds=seconds, warn=False), **meta)
    if warn:
        _warn_khat(ev)
    return ev


# ----- comparison -----------------------------------------------------------------------------------
COMPARE_COLUMNS = [
    "rank", "elpd", "se", "d_elpd", "dse", "warning", "khat_max", "khat_threshold", "frac_flagged",
    "frac_khat_gt_0_7", "elbo", "gap", "mc_se", "nats_per_spike", "bits_per_spike", "d_bits_per_spike", "n_trials",
    "num_particles", "method", "num_steps",
]
#: Which uncertainty each standard error of :func:`compare` and :func:`compare_folds` is.
UNCERTAINTY = {
    "se": "trial-level: sqrt(n var) of the per-trial values (the fits held fixed)",
    "dse": "trial-level: sqrt(n var) of the paired per-trial differences (the fits held fixed)",
    "mc_se": "Monte Carlo: the estimator's own error, delta method (meaningless where k-hat is flagged)",
    "se_folds": "fit-level: s.d. over folds (and seeds) of the per-fold differences / sqrt(number of folds)",
}


def _footing(ev: Evidence) -> dict[str, Any]:
    """What must agree between evidences before their totals can be compared."""
    return {"trials": tuple(np.asarray(ev.trial).tolist()), "quantity": ev.quantity, "method": ev.method,
            "layout (observed bins, forward bins, held-in, held-out neurons)": ev.layout, "bin width (ms)": ev.bin_ms,
            "units": ev.units}


def _difference(key: str, value: Any, reference: Any) -> str:
    if key != "trials":
        return f"{value} vs {reference}"
    if len(value) != len(reference):
        return f"{len(value)} trials vs {len(reference)}"
    return "other trial ids or order"


def check_same_footing(results: Mapping[str, Evidence]) -> None:
    """Raise one ``ValueError`` listing every way the evidences differ from the first one's footing:
    trial set and order, quantity, method, bin layout and neuron counts, bin width, unit ids.

    A field left unknown (None: ``bin_ms`` or ``units`` not given to :func:`log_evidence`) on every
    evidence is not checked; known on some and unknown on others is a difference.
    """
    names = list(results)
    first = _footing(results[names[0]])
    problems = []
    for name in names[1:]:
        for key, value in _footing(results[name]).items():
            if value != first[key]:
                problems.append(f"{name!r} differs from {names[0]!r} in {key}: {_difference(key, value, first[key])}")
    if problems:
        raise ValueError("compare: the evidences are not on the same footing (paired differences need the same "
                         "trials, quantity, method, binning and units): " + "; ".join(problems))


def _evidences(models: Mapping[str, Union[Evidence, tuple[Callable, Callable]]], batch: Optional[Batch],
               evidence_kwargs: Mapping[str, Any]) -> dict[str, Evidence]:
    """Each model's evidence: given, or computed on ``batch`` (k-hat warnings left to the caller)."""
    if not models:
        raise ValueError("models: give at least one name -> (model, guide) or Evidence")
    results: dict[str, Evidence] = {}
    for name, item in models.items():
        if isinstance(item, Evidence):
            results[name] = item
            continue
        if batch is None:
            raise ValueError(f"models[{name!r}]: a (model, guide) pair needs the batch to score it on")
        try:
            model, guide = item
        except (TypeError, ValueError):
            raise TypeError(f"models[{name!r}]: expected a (model, guide) pair or an Evidence, got "
                            f"{type(item).__name__}") from None
        results[name] = log_evidence(model, guide, batch, **{**evidence_kwargs, "warn": False})
    return results


def compare(
    models: Mapping[str, Union[Evidence, tuple[Callable, Callable]]],
    batch: Optional[Batch] = None,
    **evidence_kwargs: Any,
) -> pd.DataFrame:
    """Rank models by held-out log evidence, in the shape of ``arviz.compare``'s table.

    Parameters
    ----------
    models : mapping of name -> (model, guide) or :class:`Evidence`
        ``(model, guide)`` pairs are scored on ``batch`` by :func:`log_evidence`; results already
        computed may be given instead. All must be on the same footing (:func:`check_same_footing`:
        same trials, quantity, method, binning and units), else one ``ValueError`` says how they differ.
    batch : Batch, optional
        Needed for ``(model, guide)`` pairs.
    **evidence_kwargs
        Passed to :func:`log_evidence` (``num_particles``, ``method``, ``quantity``, ``seed`` ...).

    Returns
    -------
    pandas.DataFrame
        One row per model (index: name), best first. ``elpd``: summed per-trial log evidence
        (nats); ``se``: ``sqrt(n var)`` of the per-trial values; ``d_elpd``: best ``elpd`` minus
        this one; ``dse``: ``sqrt(n var)`` of the paired per-trial differences to the best (both
        trial-level errors with the fits held fixed: they say nothing of fit-to-fit variation, see
        :func:`compare_folds`); ``warning``: some trial's k-hat exceeds ``khat_threshold``
        (ArviZ's ``min(1 - 1/log10 K, 0.7)``); ``khat_max``, ``frac_flagged``,
        ``frac_khat_gt_0_7``; ``elbo`` (mean log weights, summed), ``gap`` = ``elpd - elbo``;
        ``mc_se``: Monte Carlo error of ``elpd``; ``nats_per_spike``, ``bits_per_spike`` (above
        NLB's per-neuron mean-rate null model) and ``d_bits_per_spike`` (``d_elpd`` per spike,
        bits); ``n_trials``, ``num_particles``, ``method``, ``num_steps``. ``attrs`` holds
        ``quantity``, ``uncertainty`` (which error each column is) and the ``per_trial`` log evidence.
    """
    results = _evidences(models, batch, evidence_kwargs)
    check_same_footing(results)
    for name, ev in results.items():
        _warn_khat(ev, name)
    first = next(iter(results.values()))
    order = sorted(results, key=lambda k: -results[k].total())
    best = results[order[0]]
    rows = {}
    for rank, name in enumerate(order):
        ev = results[name]
        s = ev.summary()
        diff = best.log_evidence - ev.log_evidence
        spikes = float(ev.n_spikes.sum())
        rows[name] = {
            "rank": rank, "elpd": s["elpd_nats"], "se": s["se_nats"], "d_elpd": float(diff.sum()),
            "dse": _se(diff), "warning": bool(ev.flagged.any()), "khat_max": s["khat_max"],
            "khat_threshold": s["khat_threshold"], "frac_flagged": s["frac_flagged"],
            "frac_khat_gt_0_7": s["frac_khat_gt_0_7"], "elbo": s["elbo_nats"], "gap": s["gap_nats"],
            "mc_se": s["mc_se_nats"], "nats_per_spike": s["nats_per_spike"], "bits_per_spike": s["bits_per_spike"],
            "d_bits_per_spike": float(diff.sum()) / (spikes * math.log(2.0)) if spikes else float("nan"),
            "n_trials": len(ev.trial), "num_particles": ev.num_particles, "method": ev.method,
            "num_steps": ev.num_steps,
        }
    table = pd.DataFrame.from_dict(rows, orient="index")[COMPARE_COLUMNS]
    table.index.name = "model"
    table.attrs["quantity"] = first.quantity
    table.attrs["uncertainty"] = {k: UNCERTAINTY[k] for k in ("se", "dse", "mc_se")}
    table.attrs["per_trial"] = {name: results[name].log_evidence.tolist() for name in order}
    return table


def compare_folds(folds: Mapping[Any, Mapping[str, Evidence]], reference: Optional[str] = None) -> pd.DataFrame:
    """Paired differences per fold, and their mean +- s.e. over folds (and seeds).

    Trial-level errors (``dse``) treat a fold's trials as independent given its fits; pooled over
    folds they treat trials scored by different fits as draws of one experiment and ignore the
    fit-to-fit variation, often the larger part. Here each fold (a ``(seed, fold)`` key, say) is one
    replicate: the per-fold difference ``reference - model`` is summed over its trials, and the
    spread of those sums over folds gives a fit-level standard error.

    Parameters
    ----------
    folds : mapping of fold key -> (mapping of model name -> Evidence)
        Every fold must hold the same model names; within a fold the evidences must be on the same
        footing (:func:`check_same_footing`), and every fold must share quantity, method, layout,
        bin width and units (its trials differ).
    reference : str, optional
        The model differences are taken against (default: the one with the highest mean per-fold total).

    Returns
    -------
    pandas.DataFrame
        One row per fold and model other than the reference (columns ``fold, model, reference, d_elpd,
        dse, n_trials``), then one summary row per model with ``fold == "mean"``: ``d_elpd`` the mean
        over folds, ``se_folds`` its fit-level standard error (s.d. / sqrt(folds)), ``n_folds``,
        ``n_positive`` (folds where the reference is ahead) and ``dse`` of the pooled trials for
        contrast. ``attrs["uncertainty"]`` says which error each column is.
    """
    if not folds:
        raise ValueError("folds: give at least one fold key -> {model name: Evidence}")
    keys = list(folds)
    names = list(folds[keys[0]])
    for key in keys:
        if sorted(folds[key]) != sorted(names):
            raise ValueError(f"folds[{key!r}] holds models {sorted(folds[key])}, the first fold {sorted(names)}")
        check_same_footing(folds[key])
    across = {key: folds[key][names[0]] for key in keys}
    firsts = [_footing(ev) for ev in across.values()]
    for key, f in zip(keys, firsts):
        differs = [k for k in f if k != "trials" and f[k] != firsts[0][k]]
        if differs:
            raise ValueError(f"compare_folds: fold {key!r} differs from fold {keys[0]!r} in {', '.join(differs)}")
    if reference is None:
        reference = max(names, key=lambda m: np.mean([folds[k][m].total() for k in keys]))
    elif reference not in names:
        raise ValueError(f"reference {reference!r} is not one of the models {names}")
    rows = []
    for name in (m for m in names if m != reference):
        per_fold = []
        for key in keys:
            diff = folds[key][reference].log_evidence - folds[key][name].log_evidence
            per_fold.append(diff)
            rows.append({"fold": key, "model": name, "reference": reference, "d_elpd": float(diff.sum()),
                         "dse": _se(diff), "n_trials": len(diff)})
        sums = np.array([d.sum() for d in per_fold])
        pooled = np.concatenate(per_fold)
        rows.append({"fold": "mean", "model": name, "reference": reference, "d_elpd": float(sums.mean()),
                     "se_folds": float(sums.std(ddof=1) / math.sqrt(len(sums))) if len(sums) > 1 else float("nan"),
                     "n_folds": len(sums), "n_positive": int((sums > 0).sum()), "dse": _se(pooled),
                     "n_trials": len(pooled)})
    table = pd.DataFrame(rows, columns=["fold", "model", "reference", "d_elpd", "dse", "se_folds", "n_folds",
                                        "n_positive", "n_trials"])
    table.attrs["uncertainty"] = {"dse": UNCERTAINTY["dse"] + "; on the 'mean' rows, of all folds' trials pooled",
                                  "se_folds": UNCERTAINTY["se_folds"]}
    table.attrs["quantity"] = across[keys[0]].quantity
    return table


def format_compare(table: pd.DataFrame) -> str:
    """The comparison table as text (nats, 1 decimal; per-spike numbers 4 decimals)."""
    fmt = {c: "{:.1f}".format for c in ("elpd", "se", "d_elpd", "dse", "elbo", "gap", "mc_se")}
    fmt.update({c: "{:.4f}".format for c in ("nats_per_spike", "bits_per_spike", "d_bits_per_spike")})
    fmt.update({c: "{:.2f}".format for c in ("khat_max", "khat_threshold", "frac_flagged", "frac_khat_gt_0_7")})
    return table.to_string(formatters=fmt)

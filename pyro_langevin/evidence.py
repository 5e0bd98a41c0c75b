"""Held-out evidence: importance-sampled ``log p(x)`` per trial with the guide as proposal.

For a trial ``x`` and ``K`` draws ``z_k ~ q(z | x)`` of the guide, the log importance weights are

    log w_k = log p(x, z_k) - log q(z_k | x)

with the model's FULL log joint (every latent site, ``z_0``, ``v_0`` ... ``v_{T+F-1}``, and the
observed spikes under the batch mask) and the guide's log density of the same draws, both read off
Pyro traces (the guide traced, the model replayed on its draws), summed per trial over the
``"trials"`` plate. Then

* ``log_evidence = log (1/K) sum_k w_k`` (logsumexp, float64): the IWAE bound for ``K`` draws. It
  is never below the ELBO of the same draws and rises to ``log p(x)`` as ``K`` grows;
* ``elbo = (1/K) sum_k log w_k``: the ELBO of the same draws (Pyro's ``Trace_ELBO`` on them);
* ``khat``: Pareto k-hat of the ``log w_k`` (ArviZ's Pareto-smoothed importance sampling,
  ``az.psislw``). Above 0.7 the weights' tail is too heavy for the estimate to be trusted: the
  guide is too poor a proposal for that trial. Such trials are flagged (a column, and a warning);
* ``ess``: Kish's effective sample size ``(sum w)^2 / sum w^2`` of the raw weights;
* ``mc_se``: the delta-method Monte Carlo standard error of ``log_evidence``,
  ``sqrt((K sum w_norm^2 - 1) / K)`` (meaningful only where k-hat is small).

Two quantities are offered (``quantity``):

* ``"joint"`` (default): ``log p(x)`` of every entry the batch mask keeps (held-in and held-out
  neurons, observed and forward bins) on trials the fit never used: the held-out marginal
  likelihood of new trials under the fitted model. This is the number to compare priors with.
* ``"heldout"``: ``log p(x_rest | x_heldin) = log p(x) - log p(x_heldin)``, the co-smoothing
  quantity: how well the model predicts the held-out neurons and forward bins of a trial given its
  held-in spikes in the observed bins, with the latent integrated out. Both terms come from the
  SAME draws (``log p(x_heldin)`` replays the model on them with only the held-in entries in the
  mask), so the difference is the self-normalised importance-sampling estimate
  ``log sum_k w_in_k p(x_rest | z_k) / sum_k w_in_k``. It is consistent, not a bound; its k-hat is
  the larger of the two weight sets', its ESS the smaller.

:func:`compare` ranks models by the summed per-trial estimates, with standard errors from the
per-trial values and of the paired per-trial differences, as ``arviz.compare`` does for ELPD.
docs/evidence.md says what each number means.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites
from scipy.special import gammaln, logsumexp

from pyro_langevin.batch import Batch
from pyro_langevin.data.splits import heldin_only
from pyro_langevin.posterior import check_posterior_inputs, eval_mode
from pyro_langevin.progress import progress_bar

with warnings.catch_warnings():  # arviz 0.23 announces its 1.0 refactor with a FutureWarning on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "Evidence", "log_evidence", "trial_log_weights", "evidence_from_log_weights", "compare", "KHAT_THRESHOLD",
    "MIN_DRAWS_FOR_KHAT", "QUANTITIES", "format_compare", "COMPARE_COLUMNS",
]

#: Above this Pareto k-hat the importance-sampling estimate of a trial is not trusted (Vehtari et al.).
KHAT_THRESHOLD = 0.7
#: Fewest draws for which ``az.psislw`` fits the tail (it needs more than 4 tail draws, and takes
#: ``min(K / 5, 3 sqrt(K))`` of them); below it k-hat is NaN.
MIN_DRAWS_FOR_KHAT = 25
QUANTITIES = ("joint", "heldout")
Quantity = Literal["joint", "heldout"]
#: The plate every site of a model or guide of this project is in.
TRIALS_PLATE = "trials"


# ----- numbers from log weights --------------------------------------------------------------------
@dataclass
class Evidence:
    """Per-trial importance-sampling evidence of one model (with its guide as proposal) on a batch.

    Every array has one entry per trial, in the batch's order; log densities are in nats.

    Attributes
    ----------
    trial : ndarray of int
        The batch's trial ids (``batch.index``).
    log_evidence : ndarray
        The IWAE estimate of the chosen quantity (see the module docstring), nats per trial.
    elbo : ndarray
        Mean log weight of the same draws (the ELBO; for ``"heldout"``, ``E_q log p(x_rest | z)``).
    khat : ndarray
        Pareto k-hat of the log weights (NaN with fewer than :data:`MIN_DRAWS_FOR_KHAT` draws).
    ess : ndarray
        Kish effective sample size of the importance weights, in draws (1 .. K).
    mc_se : ndarray
        Delta-method Monte Carlo standard error of ``log_evidence``, nats.
    n_spikes : ndarray
        Spikes in the entries the quantity scores.
    null_log_lik : ndarray
        Log-likelihood of those entries under each neuron's mean count per bin over the batch's
        scored entries (the null model of NLB's bits per spike), nats.
    num_particles : int
        K, draws per trial.
    quantity : {"joint", "heldout"}
    seconds : float
        Wall time of the estimate.
    log_weights : ndarray, shape (trial, K)
        ``log p(x, z_k) - log q(z_k | x)`` of every draw (float64).
    log_weights_heldin : ndarray or None, shape (trial, K)
        ``log p(x_heldin, z_k) - log q(z_k | x)`` of the same draws (``"heldout"`` only).
    joint : Evidence or None
        For ``"heldout"``: the ``"joint"`` evidence of the same draws (no extra cost).
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
    log_weights: Optional[np.ndarray] = field(default=None, repr=False)
    log_weights_heldin: Optional[np.ndarray] = field(default=None, repr=False)
    joint: Optional["Evidence"] = field(default=None, repr=False)

    @property
    def flagged(self) -> np.ndarray:
        """True for trials whose k-hat exceeds :data:`KHAT_THRESHOLD` (estimate not trusted)."""
        return np.nan_to_num(self.khat, nan=0.0) > KHAT_THRESHOLD

    @property
    def gap(self) -> np.ndarray:
        """``log_evidence - elbo`` per trial (nats, >= 0 for ``"joint"``): the guide's posterior gap
        as far as ``K`` draws see it."""
        return self.log_evidence - self.elbo

    def total(self) -> float:
        """Summed log evidence over trials (nats): the ``elpd`` of :func:`compare`."""
        return float(self.log_evidence.sum())

    def to_frame(self) -> pd.DataFrame:
        """One row per trial: ``log_evidence, elbo, gap, khat, flagged, ess, mc_se, n_spikes`` (nats, draws)."""
        return pd.DataFrame({
            "log_evidence": self.log_evidence, "elbo": self.elbo, "gap": self.gap, "khat": self.khat,
            "flagged": self.flagged, "ess": self.ess, "mc_se": self.mc_se, "n_spikes": self.n_spikes,
        }, index=pd.Index(self.trial, name="trial"))

    def to_dict(self) -> dict[str, Any]:
        """Per-trial numbers as plain lists (JSON-ready; log weights left out), :meth:`from_dict`'s input."""
        out: dict[str, Any] = {"num_particles": int(self.num_particles), "quantity": self.quantity,
                               "seconds": float(self.seconds)}
        for name in _PER_TRIAL:
            out[name] = np.asarray(getattr(self, name)).tolist()
        if self.joint is not None:
            out["joint"] = self.joint.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Evidence":
        """Inverse of :meth:`to_dict` (without the log weights)."""
        missing = [k for k in (*_PER_TRIAL, "num_particles", "quantity") if k not in d]
        if missing:
            raise ValueError(f"Evidence.from_dict: missing field(s) {missing}")
        arrays = {k: np.asarray(d[k], dtype=np.int64 if k == "trial" else np.float64) for k in _PER_TRIAL}
        return cls(**arrays, num_particles=int(d["num_particles"]), quantity=str(d["quantity"]),
                   seconds=float(d.get("seconds", float("nan"))),
                   joint=cls.from_dict(d["joint"]) if d.get("joint") else None)

    def summary(self) -> dict[str, float]:
        """Totals and diagnostics as plain numbers (JSON-ready): nats, nats and bits per spike."""
        spikes = float(self.n_spikes.sum())
        elpd = self.total()
        return {
            "quantity": self.quantity, "num_particles": int(self.num_particles), "n_trials": int(len(self.trial)),
            "elpd_nats": elpd, "se_nats": _se(self.log_evidence), "elbo_nats": float(self.elbo.sum()),
            "gap_nats": float(self.gap.sum()), "mc_se_nats": float(np.sqrt(np.sum(self.mc_se ** 2))),
            "nats_per_spike": elpd / spikes if spikes else float("nan"),
            "bits_per_spike": _bits_per_spike(elpd, float(self.null_log_lik.sum()), spikes),
            "khat_max": float(np.nanmax(self.khat)) if np.isfinite(self.khat).any() else float("nan"),
            "frac_khat_gt_0_7": float(self.flagged.mean()) if np.isfinite(self.khat).any() else float("nan"),
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
    quantity = "joint"
    if log_weights_heldin is not None:
        lw_in = np.asarray(log_weights_heldin, dtype=np.float64)
        if lw_in.shape != lw.shape:
            raise ValueError(f"log_weights_heldin: shape {lw_in.shape} differs from log_weights {lw.shape}")
        quantity = "heldout"
        est = est - _log_mean_exp(lw_in)
        elbo = elbo - lw_in.mean(axis=-1)
        khat_in, ess_in, se_in = _weight_diagnostics(lw_in)
        khat = np.fmax(khat, khat_in)
        ess = np.minimum(ess, ess_in)
        mc_se = np.sqrt(mc_se ** 2 + se_in ** 2)  # ignores their (positive) correlation: conservative
    nan = np.full(n, np.nan)
    ev = Evidence(
        trial=np.arange(n) if trial is None else np.asarray(trial), log_evidence=est, elbo=elbo, khat=khat,
        ess=ess, mc_se=mc_se, n_spikes=nan if n_spikes is None else np.asarray(n_spikes, dtype=np.float64),
        null_log_lik=nan if null_log_lik is None else np.asarray(null_log_lik, dtype=np.float64),
        num_particles=k, quantity=quantity, seconds=seconds, log_weights=lw,
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
        warnings.warn(
            f"{who}Pareto k-hat > {KHAT_THRESHOLD} for {n_bad} of {len(ev.trial)} trials (max {np.nanmax(ev.khat):.2f}): "
            f"the guide is too poor a proposal there and their evidence estimates are not trusted "
            f"(see Evidence.flagged / the 'flagged' column)", RuntimeWarning, stacklevel=3)


# ----- log weights from Pyro traces ----------------------------------------------------------------
def _per_trial(log_prob: torch.Tensor, site: dict, n: int) -> torch.Tensor:
    """A site's log-density summed to one value per trial of the ``"trials"`` plate, float64 (n,)."""
    name = site["name"]
    frames = [f for f in site["cond_indep_stack"] if f.name == TRIALS_PLATE]
    if not frames:
        raise ValueError(f"site {name!r} is outside the {TRIALS_PLATE!r} plate: its density cannot be split per "
                         "trial (a global latent has no per-trial evidence)")
    dim = frames[0].dim
    if log_prob.dim() == 0:
        raise ValueError(f"site {name!r}: a scalar log-density inside the {TRIALS_PLATE!r} plate")
    if log_prob.dim() != -dim or log_prob.shape[0] != n:
        raise ValueError(f"site {name!r}: log-density of shape {tuple(log_prob.shape)} does not have the {n} trials "
                         f"of the {TRIALS_PLATE!r} plate (dim {dim}) as its leftmost batch dimension")
    return log_prob.reshape(n, -1).sum(1, dtype=torch.float64)


def _trace_log_density(trace: "poutine.Trace", n: int, observed: bool) -> torch.Tensor:
    """Per-trial sum of the log-densities of a trace's sample sites (latent, and observed if asked)."""
    total = torch.zeros(n, dtype=torch.float64)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic"):
            continue
        if site["is_observed"] and not observed:
            continue
        if float(site["scale"]) != 1.0:
            raise ValueError(f"site {name!r} has scale {float(site['scale'])}: the evidence needs the model and guide "
                             "as they are (no KL annealing, no subsampling)")
        lp = scale_and_mask(site["fn"].log_prob(site["value"]), mask=site["mask"])
        total = total + _per_trial(lp, site, n).cpu()
    return total


def _latent_sites(trace: "poutine.Trace") -> set[str]:
    return {name for name, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}


def _check_sites(model_trace: "poutine.Trace", guide_trace: "poutine.Trace") -> None:
    """The guide must sample exactly the model's latent sites (else the weights are not p/q)."""
    model_latent, guide_latent = _latent_sites(model_trace), _latent_sites(guide_trace)
    if model_latent - guide_latent:
        raise ValueError(f"model latent site(s) {sorted(model_latent - guide_latent)[:5]} are not sampled by the guide: "
                         "the importance weights need the guide's density of every latent")
    if guide_latent - model_latent:
        raise ValueError(f"guide site(s) {sorted(guide_latent - model_latent)[:5]} are not in the model "
                         "(auxiliary guide sites are not supported)")


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
    tiled = batch if draws == 1 else batch[torch.arange(n, device=batch.device).repeat(draws)]
    guide_trace = poutine.trace(guide).get_trace(tiled)
    model_trace = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(tiled))
    guide_trace = prune_subsample_sites(guide_trace)
    _check_sites(model_trace, guide_trace)
    log_q = _trace_log_density(guide_trace, n * draws, observed=False)
    log_w = (_trace_log_density(model_trace, n * draws, observed=True) - log_q).reshape(draws, n).T
    log_w_in = None
    if heldin:
        trace_in = prune_subsample_sites(poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(heldin_only(tiled)))
        log_w_in = (_trace_log_density(trace_in, n * draws, observed=True) - log_q).reshape(draws, n).T
    return log_w, log_w_in


def _scored_counts(batch: Batch, quantity: str) -> tuple[np.ndarray, np.ndarray]:
    """Spikes per trial in the entries the quantity scores, and their log-likelihood under each
    neuron's mean count per bin over those entries (NLB's null model for bits per spike)."""
    mask = batch.mask.detach().cpu().numpy().copy()
    if quantity == "heldout":
        mask[:, :batch.n_observed_bins, :batch.n_heldin] = False
    x = np.where(mask, batch.target.detach().cpu().numpy().astype(np.float64), 0.0)
    counts = mask.sum(axis=(0, 1))
    mean = np.divide(x.sum(axis=(0, 1)), counts, out=np.zeros(x.shape[-1]), where=counts > 0)
    lam = np.where(mean > 0, mean, 1e-9)[None, None, :]
    ll = np.where(mask, x * np.log(lam) - lam - gammaln(x + 1.0), 0.0)
    return x.sum(axis=(1, 2)), ll.sum(axis=(1, 2))


def _check_inputs(model: Callable, guide: Callable, batch: Batch, quantity: str, **counts: int) -> None:
    check_posterior_inputs(model, guide, batch, **counts)
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    if quantity == "heldout" and not bool(heldin_only(batch).mask.ne(batch.mask).any()):
        raise ValueError("quantity='heldout': the batch has no held-out neurons or forward bins in its mask, "
                         "nothing to predict from the held-in spikes")


@torch.no_grad()
def log_evidence(
    model: Callable,
    guide: Callable,
    batch: Batch,
    num_particles: int = 1000,
    *,
    quantity: Quantity = "joint",
    batch_size: int = 256,
    max_tiled: int = 512,
    seed: Optional[int] = 0,
    progress: bool = False,
    warn: bool = True,
) -> Evidence:
    """Importance-sampling estimate of each trial's held-out log evidence, with the guide as proposal.

    See the module docstring for the estimator and the two quantities. Model and guide run in eval
    mode (no dropout) as given: no KL weight, no coordinated dropout or temporal shift (those are
    training-time only; pass the plain batch). Trials are taken ``batch_size`` at a time and their
    ``num_particles`` draws in passes of at most ``max_tiled`` tiled trials, so memory does not grow
    with ``K`` beyond the ``(trial, K)`` log weights. For a predictive number, ``batch`` must hold
    trials the fit never used (neither trained on nor selected on).

    Parameters
    ----------
    model, guide : callable
        ``model(batch)`` and ``guide(batch)`` with the same latent sites, all in the ``"trials"``
        plate (every model and guide of this package).
    batch : Batch
        Trials to score; the model's likelihood scores ``batch.target`` under ``batch.mask``.
    num_particles : int
        K, guide draws per trial. Raise it until doubling it moves the total by less than its
        standard error (docs/evidence.md); k-hat needs at least :data:`MIN_DRAWS_FOR_KHAT`.
    quantity : {"joint", "heldout"}
        ``log p(x)``, or ``log p(x_rest | x_heldin)`` (held-out neurons and forward bins given the
        held-in observed spikes).
    batch_size : int
        Trials per chunk.
    max_tiled : int
        Most tiled trials (trials x draws) per guide + model pass (about 0.25 MiB each at
        MC_Maze_Small size in 20 ms bins, latent 32).
    seed : int, optional
        Seeds the draws (on a forked torch RNG: the global stream is left untouched); None: unseeded.
    progress : bool
        Show a progress bar over passes.
    warn : bool
        Warn when k-hat flags trials (they are flagged in the result either way).

    Returns
    -------
    Evidence
    """
    _check_inputs(model, guide, batch, quantity, num_particles=num_particles, batch_size=batch_size,
                  max_tiled=max_tiled)
    start_time = time.perf_counter()
    modules = [m for m in (model, guide) if isinstance(m, torch.nn.Module)]
    chunk_size = min(batch_size, max_tiled)
    starts = list(range(0, batch.n_trials, chunk_size))
    per_pass = [max(1, min(num_particles, max_tiled // min(chunk_size, batch.n_trials - s))) for s in starts]
    n_passes = sum(math.ceil(num_particles / k) for k in per_pass)
    lw_all, lw_in_all = [], []
    rng = torch.random.fork_rng(devices=[]) if seed is not None else nullcontext()
    bar = progress_bar(total=n_passes, desc="log evidence", unit="pass", disable=not progress)
    with rng, eval_mode(*modules), bar:
        if seed is not None:
            torch.manual_seed(seed)
        for start, k_max in zip(starts, per_pass):
            chunk = batch[start:start + chunk_size]
            share = getattr(guide, "shared_context", None)
            parts, parts_in = [], []
            with share(chunk) if share is not None else nullcontext():
                for first in range(0, num_particles, k_max):
                    k = min(k_max, num_particles - first)
                    lw, lw_in = trial_log_weights(model, guide, chunk, k, heldin=quantity == "heldout")
                    parts.append(lw)
                    parts_in.append(lw_in)
                    bar.update(1)
            lw_all.append(torch.cat(parts, dim=1))
            if quantity == "heldout":
                lw_in_all.append(torch.cat(parts_in, dim=1))
    trial = batch.index.detach().cpu().numpy()
    seconds = time.perf_counter() - start_time
    lw = torch.cat(lw_all).numpy()
    n_spikes, null_ll = _scored_counts(batch, quantity)
    ev = evidence_from_log_weights(lw, torch.cat(lw_in_all).numpy() if lw_in_all else None, trial=trial,
                                   n_spikes=n_spikes, null_log_lik=null_ll, seconds=seconds, warn=warn)
    if quantity == "heldout":
        n_spikes, null_ll = _scored_counts(batch, "joint")
        ev.joint = evidence_from_log_weights(lw, trial=trial, n_spikes=n_spikes, null_log_lik=null_ll,
                                             seconds=seconds, warn=False)
    return ev


# ----- comparison -----------------------------------------------------------------------------------
COMPARE_COLUMNS = [
    "rank", "elpd", "se", "d_elpd", "dse", "warning", "khat_max", "frac_khat_gt_0_7", "elbo", "gap", "mc_se",
    "nats_per_spike", "bits_per_spike", "d_bits_per_spike", "n_trials", "num_particles",
]


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
        computed may be given instead. All must be on the same trials, with the same quantity.
    batch : Batch, optional
        Needed for ``(model, guide)`` pairs.
    **evidence_kwargs
        Passed to :func:`log_evidence` (``num_particles``, ``quantity``, ``seed`` ...).

    Returns
    -------
    pandas.DataFrame
        One row per model (index: name), best first. ``elpd``: summed per-trial log evidence
        (nats); ``se``: ``sqrt(n var)`` of the per-trial values; ``d_elpd``: best ``elpd`` minus
        this one; ``dse``: ``sqrt(n var)`` of the paired per-trial differences to the best;
        ``warning``: some trial has k-hat > 0.7; ``khat_max``, ``frac_khat_gt_0_7``; ``elbo`` (the
        same draws' ELBO, summed), ``gap`` = ``elpd - elbo``; ``mc_se``: Monte Carlo error of
        ``elpd``; ``nats_per_spike``, ``bits_per_spike`` (above NLB's per-neuron mean-rate null
        model) and ``d_bits_per_spike`` (``d_elpd`` per spike, bits); ``n_trials``,
        ``num_particles``. ``attrs`` holds ``quantity`` and the ``per_trial`` log evidence (lists).
    """
    if not models:
        raise ValueError("models: give at least one name -> (model, guide) or Evidence")
    results: dict[str, Evidence] = {}
    for name, item in models.items():
        if isinstance(item, Evidence):
            results[name] = item
            _warn_khat(item, name)
            continue
        if batch is None:
            raise ValueError(f"models[{name!r}]: a (model, guide) pair needs the batch to score it on")
        try:
            model, guide = item
        except (TypeError, ValueError):
            raise TypeError(f"models[{name!r}]: expected a (model, guide) pair or an Evidence, got "
                            f"{type(item).__name__}") from None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # warned below, with the model's name
            results[name] = log_evidence(model, guide, batch, **evidence_kwargs)
        _warn_khat(results[name], name)
    first = next(iter(results.values()))
    for name, ev in results.items():
        if not np.array_equal(ev.trial, first.trial):
            raise ValueError(f"models[{name!r}] was scored on other trials than the first model: paired "
                             "differences need the same trials in the same order")
        if ev.quantity != first.quantity:
            raise ValueError(f"models[{name!r}] has quantity {ev.quantity!r}, the first model {first.quantity!r}")
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
            "frac_khat_gt_0_7": s["frac_khat_gt_0_7"], "elbo": s["elbo_nats"], "gap": s["gap_nats"],
            "mc_se": s["mc_se_nats"], "nats_per_spike": s["nats_per_spike"], "bits_per_spike": s["bits_per_spike"],
            "d_bits_per_spike": float(diff.sum()) / (spikes * math.log(2.0)) if spikes else float("nan"),
            "n_trials": len(ev.trial), "num_particles": ev.num_particles,
        }
    table = pd.DataFrame.from_dict(rows, orient="index")[COMPARE_COLUMNS]
    table.index.name = "model"
    table.attrs["quantity"] = first.quantity
    table.attrs["per_trial"] = {name: results[name].log_evidence.tolist() for name in order}
    return table


def format_compare(table: pd.DataFrame) -> str:
    """The comparison table as text (nats, 1 decimal; per-spike numbers 4 decimals)."""
    fmt = {c: "{:.1f}".format for c in ("elpd", "se", "d_elpd", "dse", "elbo", "gap", "mc_se")}
    fmt.update({c: "{:.4f}".format for c in ("nats_per_spike", "bits_per_spike", "d_bits_per_spike")})
    fmt.update({"khat_max": "{:.2f}".format, "frac_khat_gt_0_7": "{:.2f}".format})
    return table.to_string(formatters=fmt)

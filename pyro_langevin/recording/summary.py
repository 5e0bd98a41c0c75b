"""What a fitted recording says, as numbers: posterior rates and latents per trial and per condition.

:func:`summarize_posterior` draws S posterior samples of the rates and latents of every trial from a
fitted model and guide (streamed over chunks of trials) and returns a :class:`PosteriorSummary`:
per trial the posterior mean and equal-tailed ``prob`` interval (padding NaN), per condition the
posterior of the condition-averaged rates and latents (mean and interval over draws of the average),
and the observed PSTHs with their standard errors. :func:`latent_components` projects the
condition-averaged latents onto their principal components. :func:`to_inference_data` packages it
as ArviZ InferenceData for ``posterior.nc``. The figures (:mod:`pyro_langevin.recording.figures`)
take these numbers.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, NamedTuple, Optional, Sequence

import numpy as np
import pyro
import xarray as xr

from pyro_langevin.predictive import posterior_predictive
from pyro_langevin.recording.data import Recording

with warnings.catch_warnings():  # arviz 0.23 announces its 1.0 refactor with a FutureWarning on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["PosteriorSummary", "RateMember", "summarize_posterior", "latent_components", "to_inference_data", "ALL_TRIALS"]

#: The condition label of every trial when the recording has no conditions.
ALL_TRIALS = "all trials"


@dataclass
class PosteriorSummary:
    """Posterior summaries of a fitted recording (see the module docstring).

    Rates are expected spike counts per bin; latents are the model's positions ``z``. Per-trial
    arrays are (trial, time, unit) / (trial, time, latent) in the recording's unit and trial order,
    NaN in padded bins; per-condition arrays are (condition, time, ...).

    Attributes
    ----------
    prob : float
        Mass of every interval (0.9: from the 5% to the 95% quantile of the draws).
    n_draws : int
    rates_mean, rates_lower, rates_upper : ndarray (trial, time, unit)
    latents_mean, latents_lower, latents_upper : ndarray (trial, time, latent)
    conditions : list of str
        Condition labels (``[ALL_TRIALS]`` without conditions).
    trial_condition : ndarray of int (trial,)
        Each trial's row in ``conditions``.
    cond_rates_mean, cond_rates_lower, cond_rates_upper : ndarray (condition, time, unit)
        The posterior of each condition's average rate over its trials observed in that bin.
    cond_latent_draws : ndarray (draw, condition, time, latent)
        Draws of each condition's average latent path (for :func:`latent_components`).
    psth, psth_sem : ndarray (condition, time, unit)
        Observed mean count per bin over the trials observed in that bin, and its standard error.
    n_trials_observed : ndarray (condition, time)
        How many trials of each condition are observed in each bin.
    rates_draws, latents_draws : ndarray (draw, trial, time, unit / latent), optional
        The first ``keep_draws`` draws themselves (float32, NaN in padded bins), when kept.
    rate_models : int
        How many fitted models the rates pool (1: the fit alone; ``K + 1`` with the fold ensemble,
        :class:`RateMember`). The latents are always the fit's alone.
    """

    prob: float
    n_draws: int
    rates_mean: np.ndarray
    rates_lower: np.ndarray
    rates_upper: np.ndarray
    latents_mean: np.ndarray
    latents_lower: np.ndarray
    latents_upper: np.ndarray
    conditions: List[str]
    trial_condition: np.ndarray
    cond_rates_mean: np.ndarray
    cond_rates_lower: np.ndarray
    cond_rates_upper: np.ndarray
    cond_latent_draws: np.ndarray
    psth: np.ndarray
    psth_sem: np.ndarray
    n_trials_observed: np.ndarray
    rates_draws: Optional[np.ndarray] = None
    latents_draws: Optional[np.ndarray] = None
    rate_models: int = 1


class RateMember(NamedTuple):
    """Another fitted model whose rate draws join the fit's (a cross-validation fold's model).

    ``batch`` is the recording's trials as that model reads them (its held-in units first,
    :meth:`~pyro_langevin.recording.data.Recording.batch`), and ``columns[u]`` the column of its
    ``rates`` that is the recording's unit ``u``.
    """

    model: Any
    guide: Any
    batch: Any
    columns: np.ndarray


def _label_key(label: str) -> tuple:
    """Numbers in numeric order (2 before 10), then other labels alphabetically."""
    try:
        return (0, float(label), "")
    except ValueError:
        return (1, 0.0, label)


def _chunk_size(n_draws: int, n_bins: int, width: int, budget: int = 20_000_000) -> int:
    """Trials per chunk so that one chunk's draws of the widest site hold about ``budget`` numbers."""
    return max(1, budget // max(1, n_draws * n_bins * width))


def summarize_posterior(model: Any, guide: Any, recording: Recording, n_draws: int = 50, prob: float = 0.9,
                        seed: int = 0, device: Any = "cpu", *, batch: Any = None,
                        rate_columns: Optional[np.ndarray] = None, keep_draws: int = 0,
                        rate_members: Sequence[RateMember] = ()) -> PosteriorSummary:
    """Posterior summaries of every trial and condition of ``recording`` (all units held in, as the
    final fit reads them), from ``n_draws`` draws of the guide replayed through the model.

    Parameters
    ----------
    model, guide : fitted, e.g. from :func:`~pyro_langevin.spec.load_run`.
    recording : Recording
    n_draws : int
        Posterior draws S.
    prob : float
        Interval mass in (0, 1).
    seed : int
        Seeds the draws.
    device : str or torch.device
        Where the model and guide are.
    batch, rate_columns : optional
        The recording's trials as the model reads them (default ``recording.batch()``; a stitched
        model reads them in its sessions' layout) and the columns of its ``rates`` that are the
        recording's units (default all).
    keep_draws : int
        Also return ``keep_draws`` draws of every trial's rates and latents (at most ``n_draws``),
        for ``posterior.nc``'s (chain, draw) variables.
    rate_members : sequence of RateMember
        Other fitted models of the same recording (the cross-validation folds' models): each adds
        ``n_draws`` draws of the rates, and every rate summary (per trial and per condition) is that
        of the equal mixture of the fit's and the members' posteriors, whose mean is the average of
        the models' posterior means. Latents are not pooled: each model has its own latent
        coordinates, so the latents stay the fit's. Kept rate draws are drawn evenly from the
        mixture.
    """
    if not 0 < prob < 1:
        raise ValueError(f"prob must be in (0, 1), got {prob}")
    if not 0 <= keep_draws <= n_draws:
        raise ValueError(f"keep_draws must be in 0..n_draws={n_draws}, got {keep_draws}")
    q = [(1 - prob) / 2, (1 + prob) / 2]
    batch = (recording.batch() if batch is None else batch).to(device)
    obs = recording.observed
    if recording.conditions is None:
        conditions, trial_cond = [ALL_TRIALS], np.zeros(recording.n_trials, dtype=int)
    else:
        conditions = sorted({str(c) for c in recording.conditions}, key=_label_key)
        row = {c: i for i, c in enumerate(conditions)}
        trial_cond = np.asarray([row[str(c)] for c in recording.conditions], dtype=int)
    n_cond = len(conditions)
    onehot = np.zeros((recording.n_trials, n_cond))
    onehot[np.arange(recording.n_trials), trial_cond] = 1.0
    weight = onehot[:, :, None] * obs[:, None, :]  # (trial, condition, time): observed trials per bin
    n_obs = weight.sum(0)  # (condition, time)
    pyro.set_rng_seed(seed)
    per_trial: Dict[str, List[List[np.ndarray]]] = {"rates": [], "z": []}
    kept: Dict[str, List[np.ndarray]] = {"rates": [], "z": []}
    sums: Dict[str, Optional[np.ndarray]] = {"rates": None, "z": None}
    width = max(recording.n_units, int(getattr(model, "latent_dim", 1)))
    n_models = 1 + len(rate_members)
    step = _chunk_size(n_draws * n_models, batch.n_bins, width)
    # kept rate draws: keep_draws of the pooled draws, spread evenly over the models
    pick = {"rates": np.sort(np.random.default_rng(seed).permutation(n_draws * n_models)[:keep_draws])
            if n_models > 1 else np.arange(keep_draws), "z": np.arange(keep_draws)}
    for start in range(0, recording.n_trials, step):
        rows = slice(start, start + step)
        draws = posterior_predictive(model, guide, batch[rows], n_samples=n_draws, sites=("rates", "z"))
        if rate_columns is not None:
            draws["rates"] = draws["rates"][..., rate_columns]
        if rate_members:
            draws["rates"] = np.concatenate([draws["rates"]] + [
                posterior_predictive(m.model, m.guide, m.batch[rows].to(device), n_samples=n_draws,
                                     sites=("rates",))["rates"][..., m.columns] for m in rate_members])
        for site in ("rates", "z"):
            x = draws[site].astype(np.float64)  # (draw, trial, time, width)
            lo, hi = np.quantile(x, q, axis=0)
            per_trial[site].append([x.mean(axis=0), lo, hi])
            if keep_draws:
                kept[site].append(x[pick[site]].astype(np.float32))
            part = np.einsum("skti,kct->scti", x, weight[rows])  # draws of each condition's sum over trials
            sums[site] = part if sums[site] is None else sums[site] + part
    with np.errstate(invalid="ignore", divide="ignore"):
        cond = {site: sums[site] / n_obs[None, :, :, None] for site in sums}  # (draw, condition, time, width)
    pad = ~obs[:, :, None]

    def stacked(site: str, i: int) -> np.ndarray:
        out = np.concatenate([part[i] for part in per_trial[site]]).astype(np.float32)
        out[np.broadcast_to(pad, out.shape)] = np.nan
        return out

    counts = recording.counts
    with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # bins no trial of a condition reaches: NaN
        psth = np.einsum("ktu,kct->ctu", counts, weight) / n_obs[:, :, None]
        sq = np.einsum("ktu,kct->ctu", counts ** 2, weight) / n_obs[:, :, None]
        sem = np.sqrt(np.maximum(sq - psth ** 2, 0.0) / np.maximum(n_obs[:, :, None] - 1, 1))
        r_lo, r_hi = np.nanquantile(cond["rates"], q, axis=0)

    def draws_of(site: str) -> Optional[np.ndarray]:
        if not keep_draws:
            return None
        out = np.concatenate(kept[site], axis=1)
        out[np.broadcast_to(pad[None], out.shape)] = np.nan
        return out

    return PosteriorSummary(
        prob=prob, n_draws=n_draws,
        rates_mean=stacked("rates", 0), rates_lower=stacked("rates", 1), rates_upper=stacked("rates", 2),
        latents_mean=stacked("z", 0), latents_lower=stacked("z", 1), latents_upper=stacked("z", 2),
        conditions=conditions, trial_condition=trial_cond,
        cond_rates_mean=cond["rates"].mean(axis=0), cond_rates_lower=r_lo, cond_rates_upper=r_hi,
        cond_latent_draws=cond["z"].astype(np.float32), psth=psth, psth_sem=sem, n_trials_observed=n_obs,
        rates_draws=draws_of("rates"), latents_draws=draws_of("z"), rate_models=n_models)


def latent_components(summary: PosteriorSummary, k: int = 3, basis: str = "auto") -> Dict[str, Any]:
    """The condition-averaged latent paths on their top ``k`` principal components.

    ``basis`` says whose variance the components explain: ``"conditions"`` (the posterior-mean
    condition averages, all conditions and observed bins pooled: how conditions differ) or
    ``"trials"`` (every trial's posterior-mean path: how trials differ); ``"auto"`` takes
    ``"conditions"`` when there are several, else ``"trials"``. Every draw of the condition averages
    is projected on them. Returns ``mean``, ``lower``, ``upper`` (condition, time, k), ``explained``
    (fraction of the basis' variance of each component), ``axes`` (latent, k), ``centre`` (latent,):
    any path ``z`` projects to ``(z - centre) @ axes``, and ``basis``.
    """
    draws = summary.cond_latent_draws.astype(np.float64)  # (draw, condition, time, latent)
    mean = draws.mean(axis=0)  # NaN where no trial of a condition reaches a bin
    if basis == "auto":
        basis = "conditions" if len(summary.conditions) > 1 else "trials"
    if basis not in ("conditions", "trials"):
        raise ValueError(f"basis must be 'conditions', 'trials' or 'auto', got {basis!r}")
    source = mean if basis == "conditions" else summary.latents_mean.astype(np.float64)
    flat = source.reshape(-1, source.shape[-1])
    flat = flat[np.isfinite(flat).all(axis=1)]
    centre = flat.mean(axis=0)
    _, sv, vt = np.linalg.svd(flat - centre, full_matrices=False)
    k = min(k, vt.shape[0])
    axes = vt[:k].T
    proj = (draws - centre) @ axes  # (draw, condition, time, k)
    q = [(1 - summary.prob) / 2, (1 + summary.prob) / 2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN bins stay NaN
        lo, hi = np.nanquantile(proj, q, axis=0)
    return {"mean": (mean - centre) @ axes, "lower": lo, "upper": hi,
            "explained": (sv[:k] ** 2) / max(float((sv ** 2).sum()), 1e-300), "axes": axes, "centre": centre,
            "basis": basis}


def to_inference_data(summary: PosteriorSummary, recording: Recording, attrs: Optional[Dict[str, Any]] = None) -> az.InferenceData:
    """``posterior.nc``'s InferenceData: posterior summaries with the recording's coordinates.

    Groups: ``posterior`` (``rates_mean``, ``rates_lower``, ``rates_upper``: expected counts per bin,
    dims (trial, time, unit); ``latents_mean``, ``latents_lower``, ``latents_upper``: dims (trial,
    time, latent); the condition-averaged ``condition_rates_*``: (condition, time, unit); NaN in padded
    bins). These are summaries of ``n_draws`` draws, not the draws (which grow with trials x bins x
    units x draws), so the group has no chain or draw dimension. ``observed_data`` (``spikes``: counts,
    NaN in padding) and ``constant_data`` (``observed``: 1 inside each trial; ``condition`` per trial;
    ``behavior`` when read). Coordinates: ``trial`` (the file's trial ids), ``time`` (bin centres in
    ms relative to the alignment event), ``unit`` (the file's unit ids), ``latent``, ``condition``.

    When the summary kept draws (``keep_draws``, ``fit --save-draws N``), the ``posterior`` group
    also holds them in ArviZ's convention: ``rates`` (chain, draw, trial, time, unit) and ``latents``
    (chain, draw, trial, time, latent), one chain (independent draws of the guide, not a Markov
    chain), so ``az.summary(idata, var_names=["rates"])``, ``az.hdi`` and ``az.plot_posterior`` work
    on them.

    With the fold ensemble (``rate_models`` in the group's attributes above 1: the fit and the
    cross-validation folds' models, :class:`RateMember`), the rate variables summarise the equal
    mixture of those models' posteriors; the latent variables are the fit's alone, so kept ``rates`` and
    ``latents`` draws of the same index are then not joint draws.
    """
    dims3 = ("trial", "time", "unit")
    lat3 = ("trial", "time", "latent")
    cond3 = ("condition", "time", "unit")
    coords = {"trial": recording.trial_ids, "time": recording.time_ms, "unit": recording.unit_ids,
              "latent": np.arange(summary.latents_mean.shape[-1]), "condition": np.asarray(summary.conditions)}
    posterior = xr.Dataset({
        "rates_mean": (dims3, summary.rates_mean), "rates_lower": (dims3, summary.rates_lower),
        "rates_upper": (dims3, summary.rates_upper), "latents_mean": (lat3, summary.latents_mean),
        "latents_lower": (lat3, summary.latents_lower), "latents_upper": (lat3, summary.latents_upper),
        "condition_rates_mean": (cond3, summary.cond_rates_mean.astype(np.float32)),
        "condition_rates_lower": (cond3, summary.cond_rates_lower.astype(np.float32)),
        "condition_rates_upper": (cond3, summary.cond_rates_upper.astype(np.float32)),
    }, coords={k: coords[k] for k in ("trial", "time", "unit", "latent", "condition")})
    if summary.rates_draws is not None:
        n = summary.rates_draws.shape[0]
        posterior["rates"] = (("chain", "draw", *dims3), summary.rates_draws[None])
        posterior["latents"] = (("chain", "draw", *lat3), summary.latents_draws[None])
        posterior = posterior.assign_coords(chain=[0], draw=np.arange(n))
    posterior.attrs.update({"prob": summary.prob, "n_draws": summary.n_draws, "rate_models": summary.rate_models,
                            "rates_units": "expected spikes per bin",
                            "bin_ms": recording.bin_ms, "time": f"bin centre, ms relative to {recording.align}",
                            **(attrs or {})})
    spikes = np.where(recording.observed[:, :, None], recording.counts, np.nan).astype(np.float32)
    observed = xr.Dataset({"spikes": (dims3, spikes)}, coords={k: coords[k] for k in ("trial", "time", "unit")})
    const = {"observed": (("trial", "time"), recording.observed.astype(np.int8)),
             "condition": (("trial",), np.asarray(summary.conditions)[summary.trial_condition].astype(str))}
    if recording.behavior is not None:
        const["behavior"] = (("trial", "time", "behavior_channel"), recording.behavior.astype(np.float32))
    constant = xr.Dataset(const, coords={k: coords[k] for k in ("trial", "time")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # arviz warns about groups without chain/draw dims
        return az.InferenceData(posterior=posterior, observed_data=observed, constant_data=constant)


def shared_latent_plane(summaries: Dict[str, PosteriorSummary], k: int = 2) -> Dict[str, Any]:
    """Every session's condition-averaged latent paths on ONE plane: the top ``k`` principal components
    of all sessions' condition averages together (a stitched fit's latents share one space).

    Returns ``{"paths": {session: (condition, time, k)}, "conditions": {session: [labels]},
    "explained": (k,) fraction of variance, "axes": (latent, k), "centre": (latent,)}``.
    """
    means = {name: s.cond_latent_draws.astype(np.float64).mean(axis=0) for name, s in summaries.items()}
    stacked = np.concatenate([m.reshape(-1, m.shape[-1]) for m in means.values()])
    stacked = stacked[np.isfinite(stacked).all(axis=1)]
    centre = stacked.mean(axis=0)
    _, sv, vt = np.linalg.svd(stacked - centre, full_matrices=False)
    axes = vt[:k].T
    return {"paths": {name: (m - centre) @ axes for name, m in means.items()},
            "conditions": {name: list(s.conditions) for name, s in summaries.items()},
            "explained": (sv[:k] ** 2) / max(float((sv ** 2).sum()), 1e-300), "axes": axes, "centre": centre}

"""Count-data predictive checks (numbers) on the InferenceData of :mod:`pyro_langevin.predictive`.

Checks compare the observed spike counts (``observed_data.spikes``, NaN where unobserved) with the
draws of a predictive group (``posterior_predictive`` or ``prior_predictive``), always on the
observed entries only:

* :func:`ppc_pvalues`: predictive p-values of per-neuron statistics (mean count, variance, Fano
  factor, fraction of zero bins, maximum count), pooled and per neuron;
* :func:`randomized_pit`: the randomized probability integral transform of every observed count
  (uniform under a calibrated model; randomisation makes it continuous for counts);
* :func:`psth` and :func:`psth_correlation`: PSTHs (optionally per condition) and how well the
  predicted PSTH tracks the observed one.

The pictures of the same checks are in :mod:`pyro_langevin.plots`.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "observed_and_draws",
    "neuron_statistics",
    "ppc_pvalues",
    "randomized_pit",
    "psth",
    "psth_correlation",
    "STATISTICS",
    "P_VALUE",
]


def observed_and_draws(idata: az.InferenceData, group: str = "posterior_predictive") -> tuple[np.ndarray, np.ndarray]:
    """Observed counts (trial, time, neuron; NaN where unobserved) and draws (S, trial, time, neuron).

    The draws are NaN wherever the observation is, so every statistic uses the same entries.
    """
    if group not in idata.groups():
        raise KeyError(f"InferenceData has no {group!r} group (groups: {idata.groups()})")
    if "observed_data" not in idata.groups():
        raise KeyError("InferenceData has no observed_data group")
    obs = idata.observed_data["spikes"].transpose("trial", "time", "neuron").values.astype(np.float64)
    draws = idata[group]["spikes"].stack(sample=("chain", "draw")).transpose("sample", "trial", "time", "neuron")
    draws = draws.values.astype(np.float64)
    if draws.shape[1:] != obs.shape:
        raise ValueError(f"{group} draws have shape {draws.shape[1:]}, observed_data {obs.shape}")
    draws[:, np.isnan(obs)] = np.nan
    return obs, draws


def _fano(x: np.ndarray, axis) -> np.ndarray:
    m = np.nanmean(x, axis=axis)
    return np.nanvar(x, axis=axis) / np.where(m > 0, m, np.nan)


#: Statistic name -> function of counts (..., trial, time, neuron) -> per-neuron values (..., neuron).
STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda x: np.nanmean(x, axis=(-3, -2)),
    "variance": lambda x: np.nanvar(x, axis=(-3, -2)),
    "fano": lambda x: _fano(x, (-3, -2)),
    "zero_fraction": lambda x: np.nanmean(np.where(np.isnan(x), np.nan, x == 0), axis=(-3, -2)),
    "max": lambda x: np.nanmax(x, axis=(-3, -2)),
}


def neuron_statistics(x: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of :data:`STATISTICS` per neuron of counts (..., trial, time, neuron)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN neurons
        return {k: f(x) for k, f in STATISTICS.items()}


#: The one p-value convention of the table and the figures (ArviZ's ``plot_bpv`` "bpv" too).
P_VALUE = "p = P(T_rep \u2264 T_obs)"


def _mid_p(rep: np.ndarray, obs: np.ndarray) -> np.ndarray:
    """``P(T_rep < T_obs) + 0.5 P(T_rep == T_obs)`` over the first axis of ``rep``.

    The fraction of draws at or below the observed statistic (ties counted half), as ArviZ's
    ``plot_bpv`` reports ``bpv``: near 0 the data's statistic is smaller than the model predicts,
    near 1 larger, near 0.5 well matched.
    """
    return np.mean(rep < obs, axis=0) + 0.5 * np.mean(rep == obs, axis=0)


def ppc_pvalues(idata: az.InferenceData, group: str = "posterior_predictive", extreme: float = 0.05) -> pd.DataFrame:
    """Predictive p-values of count statistics, as a table with one row per statistic.

    Columns: ``observed`` (statistic pooled over all neurons' observed entries, i.e. the mean of the
    per-neuron values), ``predicted`` (its predictive mean), ``p_pooled`` (mid p-value of the pooled
    statistic, ``P(T_rep < T_obs) + P(T_rep = T_obs) / 2``, the convention of ArviZ's ``bpv``: near 0
    the observed statistic is below the predictions, near 1 above), ``p_median`` (median over neurons
    of the per-neuron mid p-values) and
    ``frac_extreme`` (fraction of neurons with p < extreme/2 or p > 1 - extreme/2).

    Parameters
    ----------
    idata : arviz.InferenceData
    group : str
        ``posterior_predictive`` or ``prior_predictive``.
    extreme : float
        Two-sided level for ``frac_extreme``.

    Returns
    -------
    pandas.DataFrame
    """
    obs, draws = observed_and_draws(idata, group)
    s_obs, s_rep = neuron_statistics(obs), neuron_statistics(draws)
    rows = {}
    for k in STATISTICS:
        o, r = s_obs[k], s_rep[k]  # (neuron,), (S, neuron)
        ok = np.isfinite(o)
        p = _mid_p(r[:, ok], o[ok])
        pooled_o, pooled_r = np.nanmean(o), np.nanmean(r, axis=1)
        rows[k] = {
            "observed": pooled_o,
            "predicted": float(np.mean(pooled_r)),
            "p_pooled": float(_mid_p(pooled_r, pooled_o)),
            "p_median": float(np.median(p)) if p.size else np.nan,
            "frac_extreme": float(np.mean((p < extreme / 2) | (p > 1 - extreme / 2))) if p.size else np.nan,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def randomized_pit(idata: az.InferenceData, group: str = "posterior_predictive", seed: int = 0) -> np.ndarray:
    """Randomized PIT values ``P(y_rep < y) + V P(y_rep = y)``, ``V ~ U(0, 1)``, of the observed counts.

    For count data the plain PIT is not uniform even for a perfect model; the randomized one is
    (up to the Monte Carlo error of the S draws).

    Returns
    -------
    ndarray, shape (n_observed_entries,)
    """
    obs, draws = observed_and_draws(idata, group)
    ok = ~np.isnan(obs)
    y, rep = obs[ok], draws[:, ok]
    below, equal = np.mean(rep < y, axis=0), np.mean(rep == y, axis=0)
    v = np.random.default_rng(seed).uniform(size=y.shape)
    return below + v * equal


def psth(counts: np.ndarray, conditions: Optional[Sequence] = None) -> np.ndarray:
    """Mean over trials (NaN-aware) of counts (..., trial, time, neuron).

    With ``conditions`` (one label per trial) the result is per condition, shape
    (..., condition, time, neuron), conditions in sorted order; otherwise (..., time, neuron).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if conditions is None:
            return np.nanmean(counts, axis=-3)
        labels = np.asarray(conditions)
        if labels.shape != (counts.shape[-3],):
            raise ValueError(f"conditions: expected {counts.shape[-3]} labels, got shape {labels.shape}")
        return np.stack([np.nanmean(counts[..., labels == c, :, :], axis=-3) for c in np.unique(labels)], axis=-3)


def psth_correlation(
    idata: az.InferenceData, group: str = "posterior_predictive", conditions: Optional[Sequence] = None
) -> float:
    """Pearson correlation between the observed PSTH and the predictive-mean PSTH (all entries)."""
    obs, draws = observed_and_draws(idata, group)
    o = psth(obs, conditions)
    p = psth(draws, conditions).mean(axis=0)
    ok = np.isfinite(o) & np.isfinite(p)
    return float(np.corrcoef(o[ok], p[ok])[0, 1])


# ----- figures -----------------------------------------------------------------------------------

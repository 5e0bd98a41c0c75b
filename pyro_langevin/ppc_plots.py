"""Count-data predictive checks and figures on the InferenceData of :mod:`pyro_langevin.predictive`.

Checks compare the observed spike counts (``observed_data.spikes``, NaN where unobserved) with the
draws of a predictive group (``posterior_predictive`` or ``prior_predictive``), always on the
observed entries only:

* :func:`ppc_pvalues`: predictive p-values of per-neuron statistics (mean count, variance, Fano
  factor, fraction of zero bins, maximum count), pooled and per neuron;
* :func:`randomized_pit`: the randomized probability integral transform of every observed count
  (uniform under a calibrated model; randomisation makes it continuous for counts);
* :func:`psth` and :func:`psth_correlation`: PSTHs (optionally per condition) and how well the
  predicted PSTH tracks the observed one.

Figures (matplotlib, each returns a ``Figure``): hanging rootogram with a predictive band, PSTH
with credible bands, per-neuron Fano factor observed vs predicted, PIT histogram and ECDF
difference, plus ArviZ's own ``plot_ppc`` and ``plot_bpv`` where the data allow them (no
unobserved entries). :func:`save_ppc_figures` writes them all as PNG.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az  # noqa: E402

__all__ = [
    "observed_and_draws",
    "neuron_statistics",
    "ppc_pvalues",
    "randomized_pit",
    "psth",
    "psth_correlation",
    "plot_rootogram",
    "plot_psth",
    "plot_fano",
    "plot_pit",
    "plot_credible_intervals",
    "save_ppc_figures",
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
def _ax(ax, figsize=(5, 3.5)):
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        return fig, ax
    return ax.figure, ax


def plot_rootogram(
    idata: az.InferenceData, group: str = "posterior_predictive", max_count: Optional[int] = None,
    prob: float = 0.9, ax=None,
):
    """Hanging rootogram of the spike-count distribution (all observed entries pooled).

    Bars of height ``sqrt(observed frequency)`` hang from the curve ``sqrt(expected frequency)``
    (predictive mean); the shaded band is the ``prob`` interval of ``sqrt(frequency)`` over draws.
    A bar ending below zero means the count is under-predicted, above zero over-predicted.
    """
    obs, draws = observed_and_draws(idata, group)
    ok = ~np.isnan(obs)
    y, rep = obs[ok].astype(int), draws[:, ok].astype(int)
    kmax = int(max_count if max_count is not None else max(y.max(), np.quantile(rep, 0.999)))
    ks = np.arange(kmax + 1)
    f_obs = np.array([(y == k).sum() for k in ks], dtype=float)
    f_rep = np.stack([np.bincount(np.clip(r, 0, kmax + 1), minlength=kmax + 2)[: kmax + 1] for r in rep]).astype(float)
    exp_ = np.sqrt(f_rep.mean(axis=0))
    lo, hi = np.quantile(np.sqrt(f_rep), [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    fig, ax = _ax(ax)
    ax.bar(ks, np.sqrt(f_obs), bottom=exp_ - np.sqrt(f_obs), width=0.8, color="0.75", label="observed (hanging)")
    ax.fill_between(ks, lo, hi, alpha=0.3, color="C0", step=None, label=f"{int(prob * 100)}% predictive")
    ax.plot(ks, exp_, "o-", color="C0", label="predicted")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("spike count per bin")
    ax.set_ylabel("sqrt(frequency)")
    ax.set_title(f"Rootogram ({group.replace('_', ' ')})")
    ax.legend(fontsize=8, loc="upper right")
    return fig


def plot_psth(
    idata: az.InferenceData, group: str = "posterior_predictive", neurons: Optional[Sequence[int]] = None,
    conditions: Optional[Sequence] = None, condition: Optional[object] = None, prob: float = 0.9,
):
    """PSTH of a few neurons: observed vs the predictive mean with a ``prob`` credible band.

    With ``conditions`` (a label per trial) the PSTH of one ``condition`` (default: the first)
    is shown, otherwise the mean over all trials.
    """
    obs, draws = observed_and_draws(idata, group)
    if conditions is not None:
        labels = np.asarray(conditions)
        condition = np.unique(labels)[0] if condition is None else condition
        keep = labels == condition
        obs, draws = obs[keep], draws[:, keep]
    o, r = psth(obs), psth(draws)  # (time, neuron), (S, time, neuron)
    with warnings.catch_warnings():  # bins with no observed entries (forward bins) are all NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        lo, hi = np.nanquantile(r, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
        mean = np.nanmean(r, axis=0)
    neurons = list(range(min(6, o.shape[-1]))) if neurons is None else list(neurons)
    ncol = min(3, len(neurons))
    nrow = int(np.ceil(len(neurons) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.4 * nrow), squeeze=False, sharex=True)
    t = np.arange(o.shape[0])
    for ax, n in zip(axes.flat, neurons):
        ax.fill_between(t, lo[:, n], hi[:, n], color="C0", alpha=0.3, label=f"{int(prob * 100)}% band")
        ax.plot(t, mean[:, n], color="C0", label="predicted")
        ax.plot(t, o[:, n], color="k", lw=1, label="observed")
        ax.set_title(f"neuron {n}", fontsize=9)
    for ax in axes.flat[len(neurons):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8, loc="upper right")
    fig.supxlabel("time bin")
    fig.supylabel("mean count per bin")
    title = f"PSTH ({group.replace('_', ' ')})" + ("" if conditions is None else f", condition {condition}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_fano(idata: az.InferenceData, group: str = "posterior_predictive", prob: float = 0.9, ax=None):
    """Per-neuron Fano factor (variance / mean over observed bins): observed vs predicted interval."""
    obs, draws = observed_and_draws(idata, group)
    f_obs = neuron_statistics(obs)["fano"]
    f_rep = neuron_statistics(draws)["fano"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        med = np.nanmedian(f_rep, axis=0)
        lo, hi = np.nanquantile(f_rep, [(1 - prob) / 2, (1 + prob) / 2], axis=0)
    fig, ax = _ax(ax, (4, 4))
    ax.errorbar(f_obs, med, yerr=[med - lo, hi - med], fmt="o", ms=3, color="C0", alpha=0.8, label="one neuron")
    both = np.concatenate([f_obs[np.isfinite(f_obs)], hi[np.isfinite(hi)]])
    lim = [min(1.0, both.min()) * 0.95, both.max() * 1.05] if both.size else [0, 2]
    ax.plot(lim, lim, "k--", lw=0.8, label="predicted = observed")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_xlabel("observed Fano factor")
    ax.set_ylabel(f"predicted Fano factor (median, {int(prob * 100)}%)")
    ax.set_title(f"Fano factor per neuron ({group.replace('_', ' ')})", fontsize=10)
    return fig


def plot_pit(idata: az.InferenceData, group: str = "posterior_predictive", seed: int = 0, bins: int = 20):
    """Randomized PIT: histogram and ECDF minus the uniform CDF, with a 95% DKW band."""
    u = randomized_pit(idata, group, seed)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
    a1.hist(u, bins=bins, range=(0, 1), density=True, color="0.7")
    a1.axhline(1, color="k", lw=0.8)
    a1.set_xlabel("randomized PIT")
    a1.set_ylabel("density")
    grid = np.linspace(0, 1, 201)
    ecdf = np.searchsorted(np.sort(u), grid, side="right") / u.size
    eps = np.sqrt(np.log(2 / 0.05) / (2 * u.size))
    a2.fill_between(grid, -eps, eps, color="C0", alpha=0.2, label="95% band (DKW)")
    a2.plot(grid, ecdf - grid, color="C0")
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xlabel("u")
    a2.set_ylabel("ECDF(u) - u")
    a2.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"PIT ({group.replace('_', ' ')}, {u.size} counts)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_credible_intervals(
    summary, trial: int = 0, units: Optional[Sequence[int]] = None, truth: Optional[np.ndarray] = None,
    label: str = "rate (counts/bin)", unit_name: str = "neuron",
):
    """Posterior mean and credible band over time for a few units of one trial.

    Parameters
    ----------
    summary : pyro_langevin.predictive.CredibleSummary
        Arrays (trial, time, unit) from :func:`~pyro_langevin.predictive.credible_intervals`.
    trial : int
        Row of the trial to show.
    units : sequence of int, optional
        Neurons or latent dimensions (default: the first four).
    truth : ndarray (trial, time, unit), optional
        Ground truth to overlay (e.g. the true Lorenz rates).
    label : str
        y-axis label.
    unit_name : str
        What a unit is, for the panel titles: ``"neuron"`` (rates) or ``"latent"`` (latent states).
    """
    mean, lo, hi = summary.mean[trial], summary.lower[trial], summary.upper[trial]
    units = list(range(min(4, mean.shape[-1]))) if units is None else list(units)
    fig, axes = plt.subplots(1, len(units), figsize=(3.0 * len(units), 2.6), squeeze=False)
    t = np.arange(mean.shape[0])
    for ax, u in zip(axes[0], units):
        ax.fill_between(t, lo[:, u], hi[:, u], color="C1", alpha=0.3, label=f"{int(summary.prob * 100)}% CI")
        ax.plot(t, mean[:, u], color="C1", label="posterior mean")
        if truth is not None:
            ax.plot(t[: truth.shape[1]], truth[trial, :, u], "k--", lw=1, label="truth")
        ax.set_title(f"{unit_name} {u}", fontsize=10)
        ax.set_xlabel("time bin")
    axes[0, 0].set_ylabel(label)
    axes[0, 0].legend(fontsize=8, loc="upper right")
    fig.suptitle(f"Posterior of trial {trial}: mean and {int(summary.prob * 100)}% credible interval", fontsize=11)
    fig.tight_layout()
    return fig


def _arviz_figures(idata: az.InferenceData, group: str) -> dict[str, object]:
    """ArviZ's ``plot_ppc`` and ``plot_bpv`` on the spikes, when every entry is observed."""
    if np.isnan(idata.observed_data["spikes"].values).any():
        return {}  # ArviZ pools all entries; unobserved (NaN) ones would break its histograms
    figs = {}
    short = "posterior" if group.startswith("posterior") else "prior"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            n_draws = idata[group].sizes["chain"] * idata[group].sizes["draw"]
            ax = np.ravel(az.plot_ppc(idata, group=short, var_names=["spikes"], kind="cumulative", observed=True,
                                      num_pp_samples=min(50, n_draws), random_seed=0))[0]
            ax.set_xlabel("spike count per bin")
            ax.set_ylabel("fraction of bins with at most that count")
            ax.set_title(f"ArviZ plot_ppc: count distribution, observed vs {group.replace('_', ' ')}")
            figs["arviz_ppc"] = ax.figure
        except Exception:  # pragma: no cover - depends on the ArviZ version
            pass
        if short == "posterior":
            try:
                ax = np.ravel(az.plot_bpv(idata, kind="t_stat", t_stat="mean", var_names=["spikes"]))[0]
                ax.set_xlabel("mean spike count per bin, T (curve: draws T_rep; dot: observed T_obs)")
                ax.set_ylabel("density of T_rep")
                ax.set_title(f"ArviZ plot_bpv of the mean count: bpv = {P_VALUE}")
                figs["arviz_bpv_mean"] = ax.figure
            except Exception:  # pragma: no cover
                pass
    return figs


def save_ppc_figures(
    idata: az.InferenceData,
    out_dir: Union[str, Path],
    groups: Sequence[str] = ("prior_predictive", "posterior_predictive"),
    conditions: Optional[Sequence] = None,
    arviz_plots: bool = True,
) -> dict[str, Path]:
    """Write every figure of every available predictive group as PNG; return name -> path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for group in groups:
        if group not in idata.groups():
            continue
        tag = "prior" if group.startswith("prior") else "posterior"
        figs = {
            "rootogram": plot_rootogram(idata, group),
            "psth": plot_psth(idata, group, conditions=conditions),
            "fano": plot_fano(idata, group),
            "pit": plot_pit(idata, group),
        }
        if arviz_plots:
            figs.update(_arviz_figures(idata, group))
        for name, fig in figs.items():
            path = out / f"{tag}_{name}.png"
            with warnings.catch_warnings():  # ArviZ's legends use loc="best", slow only with huge data
                warnings.filterwarnings("ignore", message="Creating legend with loc")
                fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written[f"{tag}_{name}"] = path
    return written
